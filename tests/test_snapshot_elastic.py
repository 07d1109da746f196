"""Elastic shrink: a node lost for good, the job continues on the survivors from the
rebuilt in-memory snapshot, resharded onto the smaller layout.

Three "nodes" on this machine are torchrun agents with ``--nnodes 2:3`` (c10d rendezvous on
127.0.0.1, KINTSUGI_NODE_ID telling their keepers apart), one worker each. The worker
trains a tiny MLP with FSDP2 (``fully_shard``: every parameter and optimizer state is split
in 3 chunks by rows), snapshots every step into its node keeper, and the keepers erasure-code
the snapshots (k=2, m=1) and write every step to disk (L2). At step K node 1 kill -9s its
agent, keeper and worker once the group has coded step K - 1; torchrun restarts the two
survivors as a 2-rank job, which must restore step K - 1 from memory: node 1's snapshot
rebuilt from the survivors' EC shares and every chunk read resharded 3 -> 2 (a new rank's
rows span two old ranks, one of them the lost one). The reference resumes the same step from
the disk checkpoint on 2 ranks (checkpoint.store.load_state); its losses must equal the
recovered job's. Afterwards the survivors' keepers code over the new 2-node group (k=1, m=1).
Torchrun numbers nodes by its agents' pids (here 0, 1, 2, and the recovery line names the
lost node by that number, which the worker records); node 2 goes on as rank 1, so its keeper
must count only rank 1 for a complete node snapshot from then on and free rank 2's slots.

    python tests/test_snapshot_elastic.py train RUN_DIR STEPS --kill-at NODE:STEP
    python tests/test_snapshot_elastic.py reference RUN_DIR STEPS --from-step S
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import on_testbed_instead
from diagnostics.drill import free_port
from test_snapshot_ec import Job, stop_keepers

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
BATCH = 12  # global samples per step: 4 per rank on 3 ranks, 6 on 2


# ============================================================================ the worker

def build(world: int):
    """The FSDP2 model, its AdamW, and the flat state a save or restore sees."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from checkpoint import flatten

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 6))
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():  # the optimizer state exists before a restore fills it
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    names = {p: n for n, p in model.named_parameters()}  # detached: a restore writes the shards in place
    state = flatten({"model": {n: p.detach() for n, p in model.named_parameters()},
                     "optim": {names[p]: s for p, s in opt.state.items()}})
    state["data.position"] = 0
    return model, opt, state


def step_once(model, opt, position: int) -> float:
    """One optimizer step on this rank's rows of the global batch at `position`; the
    global mean loss."""
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1000 + position // BATCH)
    x = torch.randn(BATCH, 12, generator=g)
    y = torch.sin(2 * x[:, :6] + x[:, 6:])
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    loss = ((model(x[rows]) - y[rows]) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    loss = loss.detach()
    dist.all_reduce(loss)
    return loss.item() / world


def train(run_dir: Path, steps: int, kill: str):
    import torch
    import torch.distributed as dist

    from checkpoint import CheckpointConfig, Checkpointer
    from checkpoint.format import committed_steps
    from checkpoint.keeper import job_id, messages
    from checkpoint.snapshot import EcSnapshots
    from checkpoint.snapshot_config import SnapshotConfig
    from comms import dist_utils

    dist_utils.init_process_group("gloo")
    rank, world, node = dist.get_rank(), dist.get_world_size(), int(os.environ["KINTSUGI_NODE_ID"])
    if world == 3:  # torchrun's node index (group rank), which the recovery line names
        (run_dir / f"node-{node}.index").write_text(os.environ["GROUP_RANK"])
    model, opt, state = build(world)
    ckpt = Checkpointer(CheckpointConfig(interval=1, dir=str(run_dir / "ckpt"), l2_interval=1, keep_last=steps + 1,
                                         host_memory_mb=64, keeper_timeout_s=30), run_dir)
    ckpt.attach(opt)
    (run_dir / f"keeper-{node}.pid").write_text(str(ckpt.keeper.pid))
    ec = EcSnapshots(SnapshotConfig(interval=1, k=2, m=1, peer_timeout_s=5), ckpt.keeper,
                     dist.distributed_c10d._get_default_store(), job_id())
    got = ec.restore(ckpt, state)
    step, position = (got[0], got[1]["data.position"]) if got else (0, 0)
    if rank == 0:
        with open(run_dir / "recoveries.txt", "a") as f:
            r = ec.recovery
            f.write(f"{r['level']} {r['step']} {r['world']} {r['was']} {r['rebuilt']}\n")
    kill_node, kill_step = map(int, kill.split(":"))
    while step < steps:
        loss = step_once(model, opt, position)
        step, position = step + 1, position + BATCH
        if rank == 0:
            with open(run_dir / "loss.txt", "a") as f:
                f.write(f"{step} {loss!r}\n")
        if step == kill_step and world == 3:
            # a reproducible fault point: step K - 1 is erasure-coded on every node and
            # committed on disk (the reference resumes it), step K is not saved yet
            while True:
                ckpt.check()
                coded = step - 1 in ckpt.keeper.call(messages.EcStatus()).encoded
                ready = torch.tensor(float(coded and step - 1 in committed_steps(run_dir / "ckpt")))
                dist.all_reduce(ready, op=dist.ReduceOp.MIN)
                if ready.item():
                    break
                time.sleep(0.05)
            if node == kill_node:  # the whole node: its agent and its keeper with it
                for pid in (os.getppid(), ckpt.keeper.pid):
                    os.kill(pid, signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
        state["data.position"] = position
        ckpt.save(step, state)
        ckpt.check()
    ckpt.close()
    dist_utils.exit_process()


def reference(run_dir: Path, steps: int, start: int):
    """Resume `start` from the elastic job's disk checkpoint on this world; same loop."""
    import torch.distributed as dist

    from checkpoint.store import load_state
    from comms import dist_utils

    dist_utils.init_process_group("gloo")
    model, opt, state = build(dist.get_world_size())
    step, objects, _ = load_state(run_dir / "ckpt", state, step=start)
    position = objects["data.position"]
    while step < steps:
        loss = step_once(model, opt, position)
        step, position = step + 1, position + BATCH
        if dist.get_rank() == 0:
            with open(run_dir / "reference.txt", "a") as f:
                f.write(f"{step} {loss!r}\n")
    dist_utils.exit_process()


# ============================================================================ the test

class ElasticJob(Job):
    """`nodes` torchrun agents allowed to shrink to nodes - 1. The test hosts the rendezvous
    store (as test_snapshot_ec.Job does, and a cluster's standing endpoint would); it opens
    it 2 s after starting the agents, which wait for it, so all join the first round at once
    (a node later than the last call would start the job with 2). Short keep-alives let the
    survivors notice a dead node in ~2 s (default 15 s); a rendezvous round waits 5 s for
    late nodes once the minimum is there."""

    def __init__(self, run_dir: Path, nodes: int, steps: int, kill: str):
        from torch.distributed import TCPStore

        self.run_dir, self.nodes, self.port = run_dir, nodes, free_port()
        self.args = ["train", str(run_dir), str(steps), "--kill-at", kill]
        self.agents = {i: self.start(i) for i in range(nodes)}
        time.sleep(2)
        self.store = TCPStore("127.0.0.1", self.port, is_master=True, wait_for_workers=False)

    def start(self, node: int) -> subprocess.Popen:
        env = {**os.environ, "KINTSUGI_NODE_ID": str(node), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        conf = "is_host=0,join_timeout=60,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", f"{self.nodes - 1}:{self.nodes}",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{self.port}",
               "--rdzv-id", "ecjob", "--rdzv-conf", conf, "--max-restarts", "2", "--monitor-interval", "0.2",
               str(HERE), *self.args]
        log = open(self.run_dir / f"agent-{node}.log", "ab")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def read_losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        out[int(step)] = float(loss)  # a redone step overwrites: the continued curve
    return out


@pytest.fixture
def run_dir(tmp_path):
    yield tmp_path
    stop_keepers(tmp_path)


@pytest.mark.slow
@on_testbed_instead("tests/test_cluster_jobs.py::test_elastic_shrink_across_hosts_reads_the_lost_ranks_shards_from_another_host")
def test_lost_node_job_continues_on_survivors_from_rebuilt_resharded_snapshot(run_dir):
    from checkpoint.format import committed_steps

    steps, kill_step = 8, 5
    job = ElasticJob(run_dir, 3, steps, kill=f"1:{kill_step}")
    # the reference: step K - 1 from disk on 2 ranks, same code; it starts once that step is
    # committed (node 1 is killed then) and runs while the survivors regroup
    while kill_step - 1 not in committed_steps(run_dir / "ckpt") and any(a.poll() is None for a in job.agents.values()):
        time.sleep(0.1)
    ref = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(HERE), "reference", str(run_dir), str(steps), "--from-step", str(kill_step - 1)],
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                           stdout=open(run_dir / "reference.log", "wb"), stderr=subprocess.STDOUT)
    rcs = job.wait()
    assert rcs[0] == rcs[2] == 0 and rcs[1] == -signal.SIGKILL, rcs
    first, (level, step, world, was, rebuilt) = [r.split(" ", 4) for r in (run_dir / "recoveries.txt").read_text().splitlines()]
    assert first[0] == "None"  # a fresh start
    lost = (run_dir / "node-1.index").read_text()
    assert (level, int(step), int(world), int(was), rebuilt) == ("l0", kill_step - 1, 2, 3, f"[{lost}]")
    logs = "".join((run_dir / f"agent-{n}.log").read_text() for n in (0, 2))
    assert re.search(rf"kintsugi: recovered step {kill_step - 1} from memory via EC rebuild of node\(s\) \[{lost}\] "
                     r"onto 2 ranks \(was 3\) in [\d.]+ s", logs), logs[-3000:]
    assert "snapshots are now erasure-coded over 2 nodes: group 0: 2 nodes, k=1, m=1" in logs

    # the survivors' keepers code the new snapshots over the 2-node group (asked before
    # they time out: 30 s after the job)
    from checkpoint.snapshot import inspect_keeper

    for node in (0, 2):
        for _ in range(100):  # the keepers code the last snapshot after the job ended
            report = inspect_keeper(run_dir, "ecjob", str(node))
            if steps in report["ec"]["encoded"]:
                break
            time.sleep(0.1)
        assert (report["ec"]["plan"]["k"], report["ec"]["plan"]["m"]) == (1, 1)
        assert steps in report["ec"]["encoded"] and report["l0"][steps]["world"] == 2
        assert {r for s in report["l0"].values() for r in s["ranks"]} <= {0, 1}  # old ranks' slots are freed

    assert ref.wait() == 0, (run_dir / "reference.log").read_text()[-3000:]
    got, want = read_losses(run_dir / "loss.txt"), read_losses(run_dir / "reference.txt")
    assert sorted(got) == list(range(1, steps + 1)) and sorted(want) == list(range(kill_step, steps + 1))
    assert [got[s] for s in want] == pytest.approx([want[s] for s in want], rel=1e-6)


@pytest.mark.parametrize("k, m, nodes, want", [
    (2, 1, 3, (2, 1)),  # fits: as configured
    (2, 1, 2, (1, 1)),  # shrank to 2 nodes: mirroring
    (6, 2, 5, (3, 2)),  # keeps both parity shares while they fit
    (3, 3, 4, (1, 3)),
    (0, 0, 2, (0, 0)),  # chosen for the job size anyway
])
def test_code_is_rechosen_for_the_surviving_nodes(k, m, nodes, want):
    from checkpoint.erasure import plan_groups
    from checkpoint.snapshot import fit_code

    assert fit_code(k, m, nodes) == want
    (group,) = plan_groups(nodes, *want)
    assert len(group.nodes) == nodes


# ---------------------------------------------------------------- kintsugi launch --nnodes MIN:MAX

@pytest.mark.parametrize("args, words", [
    (["--nnodes", "3:2"], ["--nnodes '3:2'", "MIN:MAX"]),
    (["--nnodes", "2:3"], ["data.batch_size", "with 3 node(s)", "--nnodes 2:3"]),  # 8 samples on 3 ranks
    (["--nnodes", "2:3", "--data.batch_size=12"], ["--rdzv-endpoint"]),
    (["--nnodes", "1:2", "--snapshot.interval=1", "--snapshot.k=2", "--snapshot.m=1"], ["k + m <= 2"]),
])
def test_launch_checks_elastic_bounds(args, words, capsys, tmp_path):
    from launch.launcher import main

    with pytest.raises(SystemExit) as exit_:
        main(["--skip-preflight", "--config", str(ROOT / "tests" / "job.toml"), "--run-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and all(w in err for w in words), err
    assert not any(tmp_path.iterdir())  # failed before anything started


def test_launch_passes_elastic_bounds_to_torchrun():
    from launch.launcher import split_args, torchrun_flags

    job = split_args(["--nnodes", "2:3", "--rdzv-endpoint", "10.0.0.1:29400", "--rdzv-id", "j"])
    flags = torchrun_flags(job, 1)
    assert flags[flags.index("--nnodes") + 1] == "2:3" and flags[flags.index("--rdzv-backend") + 1] == "c10d"
    assert "--rdzv-endpoint" in flags and "--standalone" not in flags
    job = split_args(["--nnodes", "2:3", "--rdzv-endpoint", "h:1", "--rdzv-backend", "etcd-v2"])
    assert torchrun_flags(job, 1).count("--rdzv-backend") == 1  # the user's choice stays


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("train", "reference"))
    p.add_argument("run_dir", type=Path)
    p.add_argument("steps", type=int)
    p.add_argument("--kill-at", default="-1:-1")
    p.add_argument("--from-step", type=int, default=0)
    a = p.parse_args()
    if a.mode == "train":
        train(a.run_dir, a.steps, a.kill_at)
    else:
        reference(a.run_dir, a.steps, a.from_step)
