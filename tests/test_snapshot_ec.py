"""Erasure-coded in-memory snapshots with real torchrun agents on one machine.

Every "node" is its own torchrun agent (c10d rendezvous on 127.0.0.1, KINTSUGI_NODE_ID
telling the nodes' keepers apart) with one worker; the worker trains a tiny model with
gloo DDP, snapshots every step into its node keeper, and the keepers erasure-code the
snapshots across the nodes. Faults are real kill -9s, fired by the worker itself at a
given step so that they are reproducible: of the worker alone, or of the whole node
(agent, worker and keeper). Afterwards the continued loss curve must equal the
uninterrupted run's, and the recovery line must name the right level.

    python tests/test_snapshot_ec.py train RUN_DIR STEPS [--kill NODE:STEP:worker|node ...]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import on_testbed_instead
from diagnostics.drill import free_port

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
pytestmark = pytest.mark.slow
# Where the testbed runs, hosts lost whole and replaced are proven across real hosts instead
# (the worker kill stays: it also checks `kintsugi ckpt inspect --keeper`).
ACROSS_HOSTS = on_testbed_instead("tests/test_cluster_jobs.py::test_hosts_lost_whole_are_rebuilt_from_peer_shares_then_disk")


# ============================================================================ the worker

def train(run_dir: Path, steps: int, kills: list[str], k: int, m: int, l2_interval: int):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from checkpoint import CheckpointConfig, Checkpointer, flatten
    from checkpoint.keeper import job_id, messages
    from checkpoint.snapshot import EcSnapshots
    from checkpoint.snapshot_config import SnapshotConfig
    from comms import dist_utils

    dist_utils.init_process_group("gloo")
    rank, node = dist.get_rank(), int(os.environ["KINTSUGI_NODE_ID"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():  # the optimizer state exists before a restore fills it
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    names = {p: n for n, p in model.named_parameters()}
    state = flatten({"model": dict(model.named_parameters()),
                     "optim": {names[p]: s for p, s in opt.state.items()}})
    ckpt = Checkpointer(CheckpointConfig(interval=1, dir=str(run_dir / "ckpt"), l2_interval=l2_interval,
                                         keep_last=2, host_memory_mb=64, keeper_timeout_s=30), run_dir)
    ckpt.attach(opt)
    (run_dir / f"keeper-{node}.pid").write_text(str(ckpt.keeper.pid))
    ec = EcSnapshots(SnapshotConfig(interval=1, k=k, m=m, peer_timeout_s=5), ckpt.keeper,
                     dist.distributed_c10d._get_default_store(), job_id())
    got = ec.restore(ckpt, state)
    start = got[0] if got else 0
    if rank == 0:
        with open(run_dir / "recoveries.txt", "a") as f:
            f.write(f"{ec.recovery['level']} {ec.recovery['step']} {ec.recovery['rebuilt']}\n")
    ddp = DDP(model)
    for step in range(start + 1, steps + 1):
        # the same batch on every rank: the averaged gradient then does not depend on which
        # rank torchrun gives a node after a restart (float sums in another order differ)
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 16, generator=g)
        loss = ((ddp(x) - x.sum(1, keepdim=True).sin()) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        dist.all_reduce(loss := loss.detach(), op=dist.ReduceOp.SUM)
        if rank == 0:
            with open(run_dir / "loss.txt", "a") as f:
                f.write(f"{step} {loss.item()!r}\n")
        due = [spec for spec in kills if int(spec.split(":")[1]) == step and not (run_dir / f"killed-{spec}").exists()]
        if any(spec.endswith(":node") for spec in due):
            # a reproducible fault point: the step before is erasure-coded on every node
            while True:
                ckpt.check()
                coded = torch.tensor(float(step - 1 in ckpt.keeper.call(messages.EcStatus()).encoded))
                dist.all_reduce(coded, op=dist.ReduceOp.MIN)
                if coded.item():
                    break
                time.sleep(0.05)
        for spec in due:
            kill_node, kill_step, what = spec.split(":")
            if int(kill_node) == node and int(kill_step) == step and not (run_dir / f"killed-{spec}").exists():
                (run_dir / f"killed-{spec}").touch()
                if what == "node":  # the whole node: its agent and its keeper with it
                    for pid in (os.getppid(), ckpt.keeper.pid):
                        os.kill(pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save(step, state)
        ckpt.check()
    ckpt.close()
    dist_utils.exit_process()


# ============================================================================ the tests

class Job:
    """N torchrun agents on this machine. The test hosts the rendezvous store, as a cluster's
    standing c10d endpoint does: when an agent hosts it, the others can fail their own exit
    (RendezvousConnectionError, exit 1) if the host's agent finishes first."""

    def __init__(self, run_dir: Path, nodes: int, steps: int, kills=(), k=2, m=1, l2_interval=4):
        from torch.distributed import TCPStore

        self.run_dir, self.nodes = run_dir, nodes
        self.port = free_port()
        self.store = TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False)
        self.args = ["train", str(run_dir), str(steps), "--data-shares", str(k), "--parity-shares", str(m), "--l2-interval", str(l2_interval)]
        for spec in kills:
            self.args += ["--kill-at", spec]
        self.agents = {i: self.start(i) for i in range(nodes)}

    def start(self, node: int) -> subprocess.Popen:
        # a fresh worker store per restart round: with the shared rendezvous store, gloo's
        # connection setup after a restart can read the dead round's addresses
        env = {**os.environ, "KINTSUGI_NODE_ID": str(node), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes), "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", "ecjob",
               "--rdzv-conf", "is_host=0,join_timeout=120", "--max-restarts", "3",
               "--monitor-interval", "0.2", str(HERE), *self.args]
        log = open(self.run_dir / f"agent-{node}.log", "ab")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait(self, replace: dict[int, str] = None, timeout: float = 600):
        """Until every agent exits; a node whose kill marker appears is started afresh."""
        replace = dict(replace or {})
        deadline = time.monotonic() + timeout
        while True:
            for node, marker in list(replace.items()):
                if (self.run_dir / marker).exists() and self.agents[node].poll() is not None:
                    self.agents[node] = self.start(node)
                    del replace[node]
            if not replace and all(a.poll() is not None for a in self.agents.values()):
                return [a.returncode for a in self.agents.values()]
            if time.monotonic() > deadline:
                for a in self.agents.values():
                    a.kill()
                raise AssertionError(f"job did not finish; see {self.run_dir}/agent-*.log")
            time.sleep(0.2)

    def losses(self) -> dict[int, str]:
        out = {}
        for line in (self.run_dir / "loss.txt").read_text().split("\n"):
            if line:
                step, loss = line.split()
                out[int(step)] = loss  # a redone step overwrites: the continued curve
        return out

    def recoveries(self) -> list[list[str]]:
        path = self.run_dir / "recoveries.txt"
        return [line.split(" ", 2) for line in path.read_text().split("\n") if line] if path.exists() else []


def stop_keepers(run_dir: Path):
    """Ask every node's keeper to exit (it unlinks its shared memory); kill a silent one and
    remove its shared memory."""
    import conftest

    for pid_file in run_dir.glob("keeper-*.pid"):
        conftest.stop_keeper(run_dir, "ecjob", pid_file.stem.split("-")[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref")
    job = Job(run_dir, 3, 12)
    assert job.wait() == [0, 0, 0]
    stop_keepers(run_dir)
    return job.losses()


@pytest.fixture
def run_dir(tmp_path):
    yield tmp_path
    stop_keepers(tmp_path)


def test_worker_kill_restores_from_memory(reference, run_dir):
    job = Job(run_dir, 3, 12, kills=["1:7:worker"])
    assert job.wait() == [0, 0, 0]
    assert job.losses() == reference
    (level, step, rebuilt), = job.recoveries()[1:]
    assert level == "l0" and int(step) >= 3 and rebuilt == "[]"
    # the keepers outlive the job for keeper_timeout_s: what does node 1's hold?
    from checkpoint.snapshot import format_keeper, inspect_keeper

    for _ in range(100):  # the keepers code the last snapshot after the job ended
        report = inspect_keeper(run_dir, "ecjob", "1")
        if 12 in report["ec"]["encoded"]:
            break
        time.sleep(0.1)
    assert 12 in report["l0"] and len(report["l0"][12]["ranks"]) == 1
    assert report["ec"]["plan"]["k"] == 2 and 12 in report["ec"]["encoded"]
    assert "EC step 12: coded" in format_keeper(report)


@ACROSS_HOSTS
def test_node_kill_rebuilds_from_erasure_coded_shares(reference, run_dir):
    job = Job(run_dir, 3, 12, kills=["2:7:node"])
    assert job.wait(replace={2: "killed-2:7:node"}) == [0, 0, 0]
    assert job.losses() == reference
    (level, step, rebuilt), = job.recoveries()[1:]
    assert level == "l0" and rebuilt == "[2]"


@ACROSS_HOSTS
def test_more_node_losses_than_parity_fall_back_to_disk(reference, run_dir):
    job = Job(run_dir, 3, 12, kills=["1:7:node", "2:7:node"])
    assert job.wait(replace={1: "killed-1:7:node", 2: "killed-2:7:node"}) == [0, 0, 0]
    assert job.losses() == reference
    (level, step, rebuilt), = job.recoveries()[1:]
    assert level == "l2" and int(step) == 4


if __name__ == "__main__" and sys.argv[1] == "train":
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("steps", type=int)
    p.add_argument("--kill-at", action="append", default=[])
    p.add_argument("--data-shares", type=int, default=2)
    p.add_argument("--parity-shares", type=int, default=1)
    p.add_argument("--l2-interval", type=int, default=4)
    a = p.parse_args(sys.argv[2:])
    train(a.run_dir, a.steps, a.kill_at, a.data_shares, a.parity_shares, a.l2_interval)
