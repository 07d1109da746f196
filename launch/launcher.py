"""`kintsugi launch`: preflight, then torchrun's elastic agent running ``-m trainer``.

    kintsugi launch [torchrun flags] [--run-dir DIR] [--config FILE] [--section.key=value ...]

Torchrun flags (--nnodes, --nproc-per-node, --rdzv-backend, --rdzv-endpoint, --rdzv-id,
--node-rank, --max-restarts, --monitor-interval, ...) pass through unchanged to
``torch.distributed.run``, whose agent restarts failed workers; they resume from the newest
committed checkpoint by themselves. The launcher stays beside the agent as its parent, so
that it can watch the job and act on it.

``--nnodes MIN:MAX`` makes the job elastic (c10d rendezvous at ``--rdzv-endpoint``): when a
node is lost for good, torchrun restarts the survivors as a smaller world (down to MIN), and
they continue from the newest in-memory snapshot, the lost node's part rebuilt from erasure-
coded shares and resharded onto the new layout (docs/snapshots.md). The config is checked
here against every world size the bounds allow.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from checkpoint import start_keeper
from comms import UserError, exits_on_user_error
from launch.monitor import start_monitor
from launch.preflight import run_checks
from trainer import load_config

OVERRIDE = re.compile(r"^--[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*=")


def split_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="kintsugi launch", add_help=True,
                                 description="Run the Kintsugi trainer under torchrun's elastic agent.",
                                 epilog="Other flags go to torchrun (see `torchrun --help`); --section.key=value flags override the config.")
    ap.add_argument("--config", default=None, help="job TOML (default: configs/tiny.toml)")
    ap.add_argument("--run-dir", default=None, help="run directory (overrides train.run_dir)")
    ap.add_argument("--skip-preflight", action="store_true", help="do not run the health checks")
    ap.add_argument("--on-fault", choices=("warn", "restart", "exclude"), default=None,
                    help="on a hang or persistent straggler: warn, restart the workers, or exclude the suspect node "
                         "(default: diagnostics.policy)")
    ap.add_argument("--node-rank", "--node_rank", dest="node_rank", default="0", help="this node's rank (passed to torchrun)")
    ap.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc", default="1", help="workers on this node (passed to torchrun)")
    ap.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for an elastic job that continues on the survivors when nodes are lost "
                         "(passed to torchrun; elastic needs --rdzv-endpoint)")
    ap.add_argument("--max-restarts", "--max_restarts", dest="max_restarts", default="3",
                    help="worker-group restarts after a failure (passed to torchrun; default 3)")
    ap.add_argument("--plan", default=None, help="placement plan file from `kintsugi plan` (= --parallel.plan)")
    ap.add_argument("--placement", choices=("auto",), default=None,
                    help="auto: detect the cluster at start and plan placement and pipeline split (= --parallel.placement=auto)")
    ours, rest = ap.parse_known_args(argv)
    overrides = [a for a in rest if OVERRIDE.match(a)]
    torchrun = [a for a in rest if not OVERRIDE.match(a)]
    for key, value in (("train.run_dir", ours.run_dir), ("parallel.plan", ours.plan), ("parallel.placement", ours.placement)):
        if value:
            overrides.append(f"--{key}={value}")
    return ours, overrides, torchrun


def nproc_count(value: str) -> int:
    if value.isdigit():
        return int(value)
    import torch

    if value in ("gpu", "auto") and torch.cuda.is_available():
        return torch.cuda.device_count()
    if value in ("cpu", "auto"):
        return os.cpu_count() or 1
    raise UserError(f"--nproc-per-node {value!r}: give a number, auto, cpu or gpu")


def node_range(nnodes: str) -> tuple[int, int]:
    """--nnodes N or MIN:MAX -> (min, max) nodes."""
    m = re.fullmatch(r"(\d+)(?::(\d+))?", nnodes)
    lo, hi = (int(m[1]), int(m[2] or m[1])) if m else (0, 0)
    if not 1 <= lo <= hi:
        raise UserError(f"--nnodes {nnodes!r}: give a node count N, or MIN:MAX with 1 <= MIN <= MAX for an elastic job")
    return lo, hi


def check_world(cfg, nnodes: str, nproc: int):
    """The job's mesh and batch must fit every world size it may run at: an elastic job
    continues on fewer nodes after losing some (down to MIN); its erasure code must fit MAX."""
    lo, hi = node_range(nnodes)
    for n in range(lo, hi + 1):
        try:
            copy.deepcopy(cfg).validate(world_size=n * nproc)
        except UserError as e:
            if lo == hi:
                raise
            raise UserError(f"{e} (with {n} node(s) x {nproc} rank(s), which --nnodes {nnodes} allows)") from None
    snap = cfg.snapshot
    if snap.interval and snap.k + snap.m > hi:
        raise UserError(f"snapshot.k + snapshot.m = {snap.k + snap.m}, but --nnodes {nnodes} has at most {hi} node(s); "
                        f"use k + m <= {hi} (or 0 to choose them for the job size)")


def torchrun_flags(ours, torchrun: list[str], nproc: int) -> list[str]:
    flags = ["--nproc-per-node", str(nproc), "--nnodes", ours.nnodes, "--node-rank", ours.node_rank,
             "--max-restarts", ours.max_restarts, *torchrun]
    lo, hi = node_range(ours.nnodes)
    if lo < hi:  # elastic: torchrun restarts the job on the nodes still there, down to MIN
        if not any(a.startswith(("--rdzv-endpoint", "--rdzv_endpoint")) for a in torchrun):
            raise UserError(f"--nnodes {ours.nnodes}: an elastic job needs --rdzv-endpoint HOST:PORT (the same on every "
                            "node: where the first node serves the rendezvous) and --rdzv-id JOB")
        if not any(a.startswith(("--rdzv-backend", "--rdzv_backend")) for a in torchrun):
            flags += ["--rdzv-backend", "c10d"]
    if ours.nnodes == "1" and not any(a.startswith(("--rdzv", "--master")) for a in torchrun):
        flags.append("--standalone")  # a free port and c10d rendezvous on this host
    return flags


@exits_on_user_error
def main(argv: list[str]) -> int:
    ours, overrides, torchrun = split_args(argv)
    cfg = load_config(ours.config, overrides)  # a bad config fails here, before any worker
    nproc = nproc_count(ours.nproc)
    check_world(cfg, ours.nnodes, nproc)  # check the mesh now, not in every worker
    run_dir = Path(cfg.train.run_dir)
    if not ours.skip_preflight:
        for note in run_checks(cfg, nproc, run_dir):
            print(f"kintsugi: preflight: {note}", flush=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_flags(ours, torchrun, nproc), "-m", "trainer"]
    cmd += (["--config", ours.config] if ours.config else []) + overrides
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # Each rendezvous round's rank 0 hosts a fresh store. With torchrun's shared agent store,
    # keys of a failed round stay and a restarted gloo rank can read a dead peer's address
    # ("connectFullMesh ... Connection refused"), burning restarts.
    env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # This node's keeper: owns the shared-memory snapshots (level 0) so they outlive worker
    # restarts, and writes L1/L2 off the workers' cores. It leaves when this launcher does.
    keeper = start_keeper(run_dir, host_memory_mb=cfg.checkpoint.host_memory_mb,
                          timeout_s=cfg.checkpoint.keeper_timeout_s, agent_pid=os.getpid())
    env.update(keeper.env())
    # Its own session: the monitor's actions signal the agent's process group, never ours.
    agent = subprocess.Popen(cmd, env=env, start_new_session=True)
    # The agent forwards SIGTERM to its workers, which save and exit 0; pass ours on.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: agent.send_signal(signum))
    logging.basicConfig(format="kintsugi: %(message)s", level=logging.WARNING)
    monitor = start_monitor(run_dir, ours.on_fault or cfg.diagnostics.policy, agent, int(ours.node_rank), cfg=cfg.diagnostics)
    try:
        rc = agent.wait()
    finally:
        monitor.stop()
        keeper.stop()
    if rc == 0 and cfg.diagnostics.trace:
        print(f"kintsugi: diagnosis report: kintsugi diagnose report {run_dir}", flush=True)
    return rc
