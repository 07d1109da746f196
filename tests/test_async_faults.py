"""Crash tests with real processes and real kill -9: a 2-rank gloo job (a small MLP under
DDP, AdamW) saves every 2 steps (L1 every 2, L2 every 4); we kill a trainer, the node
keeper, or everything at named points (checkpoint.format.fault_point) and check that every
committed step loads and hashes equal to the uninterrupted run at that step, and that a
restarted job reproduces the uninterrupted loss curve exactly.

Run as a script (``python tests/test_async_faults.py RUN_DIR STEPS``) it is one rank of that job.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CheckpointConfig, Checkpointer, flatten, load_state  # noqa: E402
from checkpoint.format import committed_steps  # noqa: E402
from checkpoint.keeper import KeeperAddress, KeeperClient  # noqa: E402
from comms import dist_utils  # noqa: E402

import conftest  # noqa: E402  (tests/ is on the path: pytest's rootdir, or this script's own directory)

STEPS = 16
pytestmark = pytest.mark.slow


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():  # create AdamW's state (a zero-gradient step at lr 0 changes no weight)
        p.grad = torch.zeros_like(p)
    opt.param_groups[0]["lr"] = 0.0
    opt.step()
    opt.param_groups[0]["lr"] = 1e-2
    return model, opt


def flat_state(model, opt, step: int) -> dict:
    return {**flatten({"model": model.state_dict(), "optim": opt.state_dict()["state"]}), "step": step}


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(n for n, v in state.items() if hasattr(v, "tensor")):
        h.update(name.encode())
        h.update(state[name].tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def config(run_dir: Path) -> CheckpointConfig:
    return CheckpointConfig(interval=2, l1_dir=str(run_dir / "l1"), l1_interval=2, l2_interval=4, keep_last=3,
                            l1_keep_last=3, keeper_timeout_s=30, host_memory_mb=64)


def worker(run_dir: Path, steps: int):
    """One rank of the test job: deterministic data per (step, rank), DDP over gloo."""
    dist_utils.init_process_group("gloo")
    rank = dist_utils.rank()
    model, opt = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ck = Checkpointer(config(run_dir), run_dir)
    ck.attach(opt)
    ck.handle_sigterm()
    got = ck.restore(flat_state(model, opt, 0))
    start = got[1]["step"] if got else 0
    log = open(run_dir / "loss.jsonl", "a") if rank == 0 else None
    for step in range(start + 1, steps + 1):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        stop = ck.check()
        if log:
            log.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
            log.flush()
        if step % 2 == 0 or stop or step == steps:
            state = flat_state(model, opt, step)
            if log:
                with open(run_dir / "hashes.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "sha": digest(state)}) + "\n")
            ck.save(step, state, final=stop or step == steps)
        if stop:
            break
    ck.close()
    dist_utils.exit_process()  # as the trainer does


# ----------------------------------------------------------------------------- the harness

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(run_dir: Path, env_by_rank: dict | None = None) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               **(env_by_rank or {}).get(rank, {})}
        env.pop("TORCHELASTIC_RUN_ID", None)
        procs.append(subprocess.Popen([sys.executable, __file__, str(run_dir), str(STEPS)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def supervise(procs: list[subprocess.Popen], until=None) -> tuple[list[int], str]:
    """Wait like torchrun's agent: when one worker fails, kill -9 the others. ``until()``
    returning True kills every worker (and the keeper, if it returns a pid)."""
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if until is not None and until():
            for p in procs:
                p.kill()
        time.sleep(0.05)
    return [p.returncode for p in procs], "".join(p.stdout.read() for p in procs)


def keeper_pid(run_dir: Path) -> int | None:
    addr = KeeperAddress.of(run_dir, "local")
    try:
        c = KeeperClient(addr.sock, addr.token_file.read_text().strip(), rank=-1)
    except (OSError, ConnectionError, RuntimeError):
        return None
    c.close()
    return c.pid


def stop_keeper(run_dir: Path):
    pid = keeper_pid(run_dir)
    if pid:
        os.kill(pid, signal.SIGKILL)


def losses(run_dir: Path) -> dict[int, float]:
    return conftest.losses(run_dir, "loss.jsonl")  # a resumed run rewrites the steps after its restore point


def hashes(run_dir: Path) -> dict[int, str]:
    return {r["step"]: r["sha"] for r in conftest.records(run_dir / "hashes.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    codes, out = supervise(launch(run_dir))
    assert codes == [0, 0], out
    stop_keeper(run_dir)
    return losses(run_dir), hashes(run_dir)


def check_committed(run_dir: Path, ref_hashes: dict) -> int:
    """Every committed step at every level loads, verifies, and equals the reference."""
    newest = 0
    for level in ("l1", "checkpoints"):
        for step in committed_steps(run_dir / level):
            model, opt = build()
            state = flat_state(model, opt, 0)
            load_state(run_dir / level, state, step=step)
            assert digest(state) == ref_hashes[step], f"{level} step {step} differs from the uninterrupted run"
            newest = max(newest, step)
    return newest


@pytest.mark.parametrize("point", ["crc", "write", "rename", "latest"])
def test_keeper_killed_mid_level(tmp_path, reference, point):
    """kill -9 of the keeper while checksumming a shard (its disk write running beside),
    writing a shard, between the manifest's fsync and the step's rename, or while moving
    ``latest``: the job fails on every rank (no hang), and
    every step visible at L1/L2 is complete and equal to the uninterrupted run's."""
    # the N-th time the keeper passes the point: after a few commits (2 shard writes per level per save)
    n = random.Random(point).randint(5, 9) if point in ("crc", "write") else random.Random(point).randint(2, 4)
    codes, out = supervise(launch(tmp_path, {0: {"KINTSUGI_FAULT": f"{point}:kill:{n}"}}))
    assert codes != [0, 0] and "node keeper" in out, out
    assert check_committed(tmp_path, reference[1]) > 0


def test_trainer_killed_during_copy_resumes_from_memory(tmp_path, reference):
    """kill -9 of rank 1 in the middle of a lazy copy: the keeper keeps the last complete
    snapshot; the restarted job restores it from L0 and reproduces the loss curve exactly."""
    n = random.Random("copy").randint(20, 40)
    codes, out = supervise(launch(tmp_path, {1: {"KINTSUGI_FAULT": f"copy:kill:{n}"}}))
    assert codes[1] == -9, out
    check_committed(tmp_path, reference[1])
    codes, out = supervise(launch(tmp_path))
    assert codes == [0, 0], out
    assert "from L0" in out
    assert losses(tmp_path) == reference[0]
    assert check_committed(tmp_path, reference[1]) == STEPS
    stop_keeper(tmp_path)


def test_whole_node_killed_resumes_from_disk(tmp_path, reference):
    """kill -9 of every trainer and the keeper at a random step: memory is gone, the job
    resumes from the newest committed step on disk, and the loss curve is the same."""
    at = random.Random("node").randint(6, 12)
    keeper = []

    def node_dies():
        done = max(losses(tmp_path), default=0) >= at
        if done and not keeper:
            keeper.append(keeper_pid(tmp_path))
            os.kill(keeper[0], signal.SIGKILL)
        return done

    supervise(launch(tmp_path), until=node_dies)
    assert check_committed(tmp_path, reference[1]) > 0
    codes, out = supervise(launch(tmp_path))
    assert codes == [0, 0], out
    assert "from L1" in out or "from L2" in out
    assert losses(tmp_path) == reference[0]
    stop_keeper(tmp_path)


def test_trainer_under_torchrun_resumes_from_keeper_memory(tmp_path):
    """``python -m trainer`` under torchrun: kill -9 one worker; torchrun restarts the
    workers, the keeper (alive while torchrun's agent is) hands back the newest snapshot
    from memory, and the loss curve equals an uninterrupted run's."""
    from conftest import ROOT, env, torchrun_cmd, train
    def args(run):
        return ["--train.steps=16", "--checkpoint.interval=2", f"--checkpoint.l1_dir={tmp_path / run / 'l1'}",
                "--checkpoint.l2_interval=8", "--checkpoint.keeper_timeout_s=5"]
    train(2, tmp_path / "plain", *args("plain"))
    agent = subprocess.Popen(torchrun_cmd(2, tmp_path / "killed", *args("killed"), max_restarts=3), env=env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while len(conftest.steps(tmp_path / "killed")) < 9:
        assert agent.poll() is None, agent.stdout.read()
        time.sleep(0.05)
    import psutil
    victim = [p for p in psutil.Process(agent.pid).children(recursive=True)
              if p.cmdline()[1:4].count("trainer")][-1]  # a worker (`python -u -m trainer`), not the keeper
    victim.kill()
    out, _ = agent.communicate()
    assert agent.returncode == 0, out[-3000:]
    assert "from L0" in out, out[-3000:]
    assert conftest.losses(tmp_path / "killed") == conftest.losses(tmp_path / "plain")


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
