"""The fault matrix, with real processes and real kill -9.

A 2-rank gloo job (a small MLP under DDP, AdamW) saves every 2 steps (L1 every 2, L2 every
4). A fault point (``checkpoint.format.fault_point``) *holds* the process that reaches it
(a worker: the lazy copy, the final ``close``; the keeper: a shard write, the rename, the
``latest`` pointer, retention, an erasure-coded share transfer) while the test kills a
worker, the node keeper, or the whole node with SIGKILL; then the holder goes on (if
alive), the job dies as torchrun's agent would make it, and a relaunch must finish: exit
0, the loss curve of the uninterrupted run, the final step committed at every level, and
every committed step byte-equal to the uninterrupted run's at that step.

The conditions a user or the machine causes (an L2 that is read-only or full, a small
/dev/shm, damaged steps on disk) either end in one line naming the problem and a non-zero
exit, never a traceback and never exit 0 without the final step, or are survived with a
one-line warning. A seeded soak kills the whole job at random moments while it saves every
step.

Run as a script (``python tests/test_async_faults.py RUN_DIR STEPS``) it is one rank of
that job; ``KINTSUGI_TEST_EC=1`` makes every rank a node of its own, with erasure-coded
snapshots across the two nodes' keepers (``KINTSUGI_TEST_WAIT_CODED=1``: the ranks wait at
their first save until it is coded).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import CheckpointConfig, Checkpointer, flatten, load_state  # noqa: E402
from checkpoint.format import MANIFEST, committed_steps, step_dirname  # noqa: E402
from checkpoint.keeper import messages  # noqa: E402
from comms import dist_utils, exits_on_user_error  # noqa: E402
from diagnostics.drill import free_port  # noqa: E402

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


def config(run_dir: Path, node: str) -> CheckpointConfig:
    return CheckpointConfig(interval=2, l1_dir=str(run_dir / f"l1{node}"), l1_interval=2, l2_interval=4, keep_last=3,
                            l1_keep_last=3, keeper_timeout_s=30, host_memory_mb=64, close_timeout_s=60,
                            capture="lazy")  # the kill matrix's "copy" point is in the lazy copier


@exits_on_user_error
def worker(run_dir: Path, steps: int):
    """One rank of the test job: deterministic data per (step, rank), DDP over gloo."""
    dist_utils.init_process_group("gloo")
    rank = dist_utils.rank()
    every = int(os.environ.get("KINTSUGI_TEST_INTERVAL", "2"))
    model, opt = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ck = Checkpointer(config(run_dir, os.environ.get("KINTSUGI_NODE_ID", "")), run_dir)
    ck.attach(opt)
    ck.handle_sigterm()
    state = flat_state(model, opt, 0)
    ec = bool(os.environ.get("KINTSUGI_TEST_EC"))
    if ec:
        import torch.distributed as dist

        from checkpoint import EcSnapshots, SnapshotConfig, job_id

        snapshots = EcSnapshots(SnapshotConfig(interval=2, k=1, m=1, peer_timeout_s=5), ck.keeper,
                                dist.distributed_c10d._get_default_store(), job_id())
        got = snapshots.restore(ck, state)
    else:
        got = ck.restore(state)
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
        if step % every == 0 or stop or step == steps:
            state = flat_state(model, opt, step)
            if log:
                with open(run_dir / "hashes.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "sha": digest(state)}) + "\n")
            ck.save(step, state, final=stop or step == steps)
            if os.environ.get("KINTSUGI_TEST_WAIT_CODED") and step == every:
                wait_encoded(ck, step)
        if stop:
            break
    if start == steps:  # resumed at the end: the final step must still be durable everywhere
        ck.save(steps, flat_state(model, opt, steps), final=True)
    ck.close()
    dist_utils.exit_process()  # as the trainer does


def wait_encoded(ck: Checkpointer, step: int, timeout: float = 60.0):
    """Step boundaries (collective) until every rank's keeper has erasure-coded ``step``:
    without it a job on a loaded machine can outrun the keepers (each step superseded before
    it is coded) and end before any share is transferred, so a fault held at the transfer
    would never be reached."""
    deadline = time.monotonic() + timeout
    while True:
        ck.check()  # a snapshot is committed at level 0, and handed to the coder, at a step boundary
        done = step in ck.keeper.call(messages.EcStatus()).encoded
        gathered = dist_utils.all_gather_object((done, time.monotonic() > deadline))
        if all(d for d, _ in gathered) or any(late for _, late in gathered):
            return
        time.sleep(0.05)


# ----------------------------------------------------------------------------- the harness

def launch(run_dir: Path, env_by_rank: dict | None = None, ec: bool = False, prefix: list[str] | None = None,
           env: dict | None = None) -> list[subprocess.Popen]:
    """Start the 2 ranks (``ec``: as 2 nodes of one rank each); ``prefix`` runs them inside
    another command (e.g. nsenter into a mount namespace)."""
    port = free_port()
    procs = []
    for rank in range(2):
        e = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2",
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **(env or {})}
        if ec:
            e.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK=str(rank), KINTSUGI_NODE_ID=str(rank),
                     KINTSUGI_TEST_EC="1")
        e.update((env_by_rank or {}).get(rank, {}))
        e.pop("TORCHELASTIC_RUN_ID", None)
        procs.append(subprocess.Popen([*(prefix or []), sys.executable, __file__, str(run_dir), str(STEPS)], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def supervise(procs: list[subprocess.Popen], until=None) -> tuple[list[int], str]:
    """Wait like torchrun's agent: when one worker fails, kill -9 the others. ``until()``
    returning True kills every worker."""
    while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs) or (until is not None and until()):
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.05)
    return [p.returncode for p in procs], "".join(p.stdout.read() for p in procs)


def run_job(run_dir: Path, restarts: int = 3, **kw) -> tuple[list[int], str]:
    """The job under an agent that restarts the workers after a failure (``restarts`` times)."""
    out = ""
    for _ in range(restarts + 1):
        codes, o = supervise(launch(run_dir, **kw))
        out += o
        if codes == [0, 0]:
            break
    return codes, out


def keepers(run_dir: Path, ec: bool) -> dict[int, int]:
    """node -> pid of its keeper."""
    pids = {}
    for node in ((0, 1) if ec else (0,)):
        pid = conftest.keeper_pid(run_dir, node_id=str(node) if ec else "")
        if pid:
            pids[node] = pid
    return pids


def stop_keepers(run_dir: Path):
    for node in ("", "0", "1"):
        conftest.stop_keeper(run_dir, node_id=node)


def losses(run_dir: Path) -> dict[int, float]:
    return conftest.losses(run_dir, "loss.jsonl")  # a resumed run rewrites the steps after its restore point


def hashes(run_dir: Path) -> dict[int, str]:
    return {r["step"]: r["sha"] for r in conftest.records(run_dir / "hashes.jsonl")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    codes, out = supervise(launch(run_dir))
    assert codes == [0, 0], out
    stop_keepers(run_dir)
    return losses(run_dir), hashes(run_dir)


@pytest.fixture
def run_dir(tmp_path):
    yield tmp_path
    stop_keepers(tmp_path)


def check_committed(root: Path, ref_hashes: dict) -> list[int]:
    """Every committed step under ``root`` loads, verifies, and equals the reference."""
    steps = committed_steps(root)
    for step in steps:
        model, opt = build()
        state = flat_state(model, opt, 0)
        load_state(root, state, step=step)
        assert digest(state) == ref_hashes[step], f"{root} step {step} differs from the uninterrupted run"
    return steps


def check_finished(run_dir: Path, reference, levels=("l1", "checkpoints")):
    """The job's loss curve is the uninterrupted one, the final step is committed at every
    level, and every committed step equals the uninterrupted run's."""
    assert losses(run_dir) == reference[0]
    for level in levels:
        steps = check_committed(run_dir / level, reference[1])
        assert steps and steps[0] == STEPS, f"{level}: the final step is not committed ({steps})"


# ----------------------------------------------------------------------------- the kill matrix

POINTS = {  # fault point -> the N-th time it is passed (in rank 0 or its keeper)
    "copy": 3,  # a worker's lazy copy thread, mid-snapshot
    "write": 5,  # the keeper writing a shard (step 4 or 6)
    "rename": 2,  # the keeper, manifest fsynced, before the step's rename
    "latest": 2,  # the keeper moving `latest`
    "prune": 1,  # the keeper deleting a step beyond retention
    "ec_transfer": 1,  # the keeper serving an erasure-coded share to its peer
    "close": 1,  # a worker in the final close(), waiting for its levels
}


@pytest.mark.parametrize("victim", ["worker", "keeper", "node"])
@pytest.mark.parametrize("point", list(POINTS))
def test_kill_matrix(run_dir, reference, point, victim):
    ec = point == "ec_transfer"
    hold = {"KINTSUGI_FAULT": f"{point}:hold:{POINTS[point]}", "KINTSUGI_FAULT_DIR": str(run_dir)}
    procs = launch(run_dir, {0: hold}, ec=ec, env={"KINTSUGI_TEST_WAIT_CODED": "1"} if ec else None)
    marker = run_dir / f"{point}.held"
    while not marker.exists():
        if all(p.poll() is not None for p in procs):
            pytest.fail("the job ended before reaching the fault point:\n" + "".join(p.stdout.read() for p in procs)[-4000:])
        time.sleep(0.01)
    node_keeper = keepers(run_dir, ec).get(0)
    if victim in ("keeper", "node"):
        os.kill(node_keeper, signal.SIGKILL)
    if victim in ("worker", "node"):
        procs[1 if victim == "worker" else 0].kill()
        if victim == "node" and not ec:
            procs[1].kill()
    marker.unlink()  # the holder, if alive, goes on
    supervise(procs)
    codes, out = run_job(run_dir, ec=ec)
    assert codes == [0, 0], out[-4000:]
    check_finished(run_dir, reference, ("checkpoints",) if ec else ("l1", "checkpoints"))


# ----------------------------------------------------------------------------- conditions

def mount(*args: str):
    if subprocess.run(["mount", *args], capture_output=True).returncode:
        pytest.skip("cannot mount here (needs root and mount permission)")


def assert_one_line(out: str, what: str):
    assert "Traceback" not in out, out[-4000:]
    lines = [line for line in out.splitlines() if what in line]
    assert lines and all(line.startswith("kintsugi: error:") for line in lines), out[-4000:]


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_l2_unwritable_never_exits_0_without_the_final_step(run_dir, reference, how):
    """An L2 that refuses writes: training goes on with L1 (a warning per save), the job ends
    non-zero with one line on every restart, and once L2 is fixed a rerun commits the final step."""
    l2 = run_dir / "checkpoints"
    l2.mkdir()
    if how == "read-only":
        mount("--bind", str(l2), str(l2))
        mount("-o", "remount,ro,bind", str(l2))
    else:
        mount("-t", "tmpfs", "-o", "size=40k", "tmpfs", str(l2))  # a step or two fit, then ENOSPC
    try:
        codes, out = run_job(run_dir, restarts=1)
        assert codes != [0, 0]
        assert_one_line(out, "the final checkpoint (step 16) was not saved")
        assert "Read-only file system" in out if how == "read-only" else "No space left" in out
        assert "was not stored at l2" in out
        assert committed_steps(run_dir / "l1")[0] == STEPS  # L1 went on
    finally:
        subprocess.run(["umount", "-l", str(l2)])
    codes, out = run_job(run_dir)  # L2 is writable again: the final step reaches it
    assert codes == [0, 0], out[-4000:]
    check_finished(run_dir, reference)


def test_small_dev_shm_saves_to_disk_with_one_warning(run_dir, reference):
    """/dev/shm smaller than the keeper's budget (Docker's default is 64 MiB): no SIGBUS, one
    warning, snapshots that do not fit go to L2 directly, the job finishes as if nothing."""
    holder = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               "mount -t tmpfs -o size=16k tmpfs /dev/shm && echo up && exec sleep 600"],
                              stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "up":
            pytest.skip("cannot make a mount namespace with a small /dev/shm here")
        prefix = ["nsenter", "-t", str(holder.pid), "-m"]
        codes, out = supervise(launch(run_dir, prefix=prefix))
        assert codes == [0, 0], out[-4000:]
        said = [line for line in out.splitlines() if line.startswith("kintsugi: warning:")]
        assert sum("/dev/shm has" in line for line in said) == 1, out[-4000:]
        assert sum("directly (synchronously)" in line for line in said) == 1, out[-4000:]
        assert "Traceback" not in out
        check_finished(run_dir, reference, ("checkpoints",))
    finally:
        holder.kill()
        holder.wait()


def damage(step_dir: Path, how: str):
    shard = step_dir / "shard_00000.safetensors"
    if how == "corrupt header":
        with open(shard, "r+b") as f:
            f.write((1 << 62).to_bytes(8, "little"))  # a header length no file has
    elif how == "corrupt data":
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0xFF
        shard.write_bytes(bytes(raw))
    elif how == "truncated shard":
        os.truncate(shard, shard.stat().st_size // 2)
    elif how == "missing manifest":
        (step_dir / MANIFEST).unlink()


@pytest.fixture(scope="module")
def died_at_12(tmp_path_factory):
    """A run directory whose whole node died at step 12 (workers and keeper killed), for
    each damage below to copy."""
    run_dir = tmp_path_factory.mktemp("died_at_12")
    supervise(launch(run_dir), until=lambda: max(losses(run_dir), default=0) >= 12)
    pid = keepers(run_dir, False)[0]
    os.kill(pid, signal.SIGKILL)
    conftest.wait_dead(pid)
    return run_dir


@pytest.mark.parametrize("how", ["corrupt header", "corrupt data", "truncated shard", "missing manifest",
                                 "latest names a missing step"])
def test_damaged_newest_step_falls_back(run_dir, reference, died_at_12, how):
    """The whole node dies at step 12; the newest disk step is damaged on both levels (or
    `latest` names a step that is gone): the relaunch takes the previous good step, says so
    in one line, and finishes with the uninterrupted loss curve."""
    shutil.copytree(died_at_12, run_dir, dirs_exist_ok=True)
    newest = min(committed_steps(run_dir / "l1")[0], committed_steps(run_dir / "checkpoints")[0])
    for level in ("l1", "checkpoints"):
        root = run_dir / level
        if how == "latest names a missing step":
            (root / "latest").write_text(step_dirname(99) + "\n")
        else:
            for step in committed_steps(root):
                if step >= newest:
                    damage(root / step_dirname(step), how)
    codes, out = supervise(launch(run_dir))
    assert codes == [0, 0], out[-4000:]
    assert "Traceback" not in out
    if how not in ("missing manifest", "latest names a missing step"):  # those steps are simply not committed
        assert f"step {newest}" in out and "damaged" in out, out[-4000:]
    check_finished(run_dir, reference)


# ----------------------------------------------------------------------------- the soak

def test_soak_whole_job_killed_at_random_moments(run_dir, reference):
    """Saving every step, the whole job (workers and keeper) is killed with SIGKILL at random
    moments, 4 times (seeded); each relaunch resumes from what was committed, and the final
    loss curve and every committed step equal the uninterrupted run's."""
    rng = random.Random(12)
    interval = {"KINTSUGI_TEST_INTERVAL": "1"}
    for _ in range(4):
        procs = launch(run_dir, env=interval)
        deadline = time.monotonic() + rng.uniform(2.0, 6.0)
        supervise(procs, until=lambda: time.monotonic() > deadline)
        for pid in keepers(run_dir, False).values():
            os.kill(pid, signal.SIGKILL)
    codes, out = run_job(run_dir, env=interval)
    assert codes == [0, 0], out[-4000:]
    check_finished(run_dir, reference)


if __name__ == "__main__":
    worker(Path(sys.argv[1]), int(sys.argv[2]))
