"""Health checks before any worker starts: memory, disk, CPUs/GPUs (psutil).

A failed check is one line (UserError, exit 2) that says what is short and what to do.
"""
from __future__ import annotations

import os
from pathlib import Path

import psutil
import torch

from checkpoint import shm_free
from comms import UserError
from trainer import JobConfig, model_parameters

MB = 2**20
# A worker's own footprint before any model state: torch, gloo, data, Python (~350 MB
# measured for the default job on CPU).
WORKER_BASE_MB = 400
# Bytes per parameter held by a rank: fp32 weight + grad + 2 Adam moments, plus a host
# copy for checkpoints = 5 x 4 bytes.
STATE_BYTES_PER_PARAM = 20


def estimate(cfg: JobConfig, nproc: int) -> dict:
    """What one node of the job needs: host memory (MB) and checkpoint disk (MB)."""
    params = model_parameters(cfg)
    p = cfg.parallel
    # Sharding dims divide model state; dp_shard=-1 (auto) shards over what is left.
    shard = p.tp * p.pp * (p.dp_shard if p.dp_shard > 0 else max(1, nproc // (p.tp * p.pp * p.dp_replicate)))
    state_mb = params * STATE_BYTES_PER_PARAM / MB / shard
    ckpt_mb = params * 12 / MB  # weights + 2 moments, fp32, once per job
    return {"params": params, "memory_mb": nproc * (WORKER_BASE_MB + state_mb), "disk_mb": ckpt_mb * (cfg.checkpoint.keep_last + 1)}


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def run_checks(cfg: JobConfig, nproc: int, run_dir: Path, model: bool = True) -> list[str]:
    """Raise UserError on the first failed check; return notes for checks that passed narrowly.
    ``model``: the job is the built-in trainer, whose memory and checkpoint size are known
    from its config (a user's script is checked for devices only)."""
    notes = []
    if model:
        need = estimate(cfg, nproc)
        avail = psutil.virtual_memory().available / MB
        if need["memory_mb"] > avail:
            raise UserError(f"preflight: the job needs about {need['memory_mb']:,.0f} MB of memory on this node but "
                            f"{avail:,.0f} MB is available; use fewer processes per node or a smaller model")
        free = psutil.disk_usage(str(existing_ancestor(run_dir))).free / MB
        if need["disk_mb"] > free:
            raise UserError(f"preflight: checkpoints need about {need['disk_mb']:,.0f} MB in {run_dir} but "
                            f"{free:,.0f} MB is free; free disk space, lower checkpoint.keep_last, or choose another --run-dir")
    shm = shm_free() / MB
    if cfg.checkpoint.host_memory_mb > shm:
        notes.append(f"/dev/shm has {shm:,.0f} MB free, less than checkpoint.host_memory_mb="
                     f"{cfg.checkpoint.host_memory_mb}: the node keeper holds snapshots in what fits and saves that "
                     "do not fit go to disk directly; enlarge /dev/shm (e.g. docker --shm-size) or lower "
                     "checkpoint.host_memory_mb")
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise UserError(f"preflight: --nproc-per-node {nproc} but this node has {gpus} GPU(s); use at most {gpus}")
    else:
        cpus = os.cpu_count() or 1
        # Gloo ranks can share cores (the test suite runs 4 ranks on 2); past 4 per core a
        # job only thrashes.
        if nproc > 4 * cpus:
            raise UserError(f"preflight: --nproc-per-node {nproc} on {cpus} CPU core(s) and no GPU; use at most {4 * cpus}")
        if nproc > cpus:
            notes.append(f"{nproc} ranks share {cpus} CPU core(s): expect slow steps")
    return notes
