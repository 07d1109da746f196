"""A fault drill: a tiny data-parallel training loop that exercises tracing, detection and
the launcher's actions without the full trainer (used by the tests and the benchmark, and by
users checking detection on their own cluster):

    torchrun --nproc-per-node 4 -m diagnostics.drill --run-dir runs/drill --steps 60 \\
        --inject slow:rank=1,pct=20

Each step: a small linear model's forward/backward plus ``--compute-ms`` of emulated
compute (a sleep, so the step time does not depend on how many cores the ranks share), a
gradient all-reduce, a both-ways ring exchange of blocking sends and receives
(point-to-point traffic for the link matrix), an SGD update, and every ``--ckpt-every`` steps a checkpoint (rank 0 writes
safetensors atomically; a restarted job resumes from it).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from comms import trace
from diagnostics.detect import stop_all
from diagnostics.inject import Injector


def run(rank: int, world: int, run_dir: str, steps: int = 30, inject: list | None = None,
        compute_ms: float = 20.0, p2p: bool = True, ckpt_every: int = 0, trace_on: bool = True,
        timeout_s: float = 120.0) -> dict:
    """One rank of the drill; joins the process group from the environment if needed."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    torch.manual_seed(0)
    torch.set_num_threads(1)
    tracer = trace.install(run_dir, rank, world, enabled=trace_on)
    injector = Injector(inject or [], rank, tracer)
    model = torch.nn.Linear(64, 64)
    ckpt = Path(run_dir) / "drill-ckpt.safetensors"
    start = 0
    if ckpt.exists():  # resume: the newest checkpoint, whatever the world size now is
        state = load_file(ckpt)
        start = int(state.pop("step").item()) + 1
        model.load_state_dict(state)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    step_times = []
    for step in range(start, steps):
        t0 = time.perf_counter()
        injector.before_step(step)
        with tracer.phase("data"):
            x = torch.randn(16, 64)
        with tracer.phase("forward_backward"):
            model.zero_grad()
            model(x).square().mean().backward()
            time.sleep(compute_ms / 1e3)
            for p in model.parameters():
                dist.all_reduce(p.grad)
            if p2p and world > 1:  # blocking, even ranks send first: see "p2p timing" in docs/diagnostics.md
                for to, frm in ((nxt, prv), (prv, nxt)):
                    buf = torch.ones(256)
                    if rank % 2 == 0:
                        dist.send(buf, to)
                        dist.recv(buf, frm)
                    else:
                        dist.recv(buf, frm)
                        dist.send(buf, to)
        with tracer.phase("optimizer"):
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad / world
        if ckpt_every and (step + 1) % ckpt_every == 0:
            with tracer.phase("checkpoint"):
                if rank == 0:
                    tmp = ckpt.with_suffix(".tmp")
                    save_file({**model.state_dict(), "step": torch.tensor(step)}, str(tmp))
                    os.replace(tmp, ckpt)
                dist.barrier()
        tracer.end_step(step)
        step_times.append(time.perf_counter() - t0)
    tracer.close()
    dist.barrier()
    dist.destroy_process_group()
    return {"rank": rank, "world": world, "first_step": start, "steps": steps, "step_times": step_times}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, kw: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(rank, world, **kw)


def run_local(world: int, run_dir, *, watch_s: float = 60.0, stop_on=(), start_method: str = "fork",
              **kw) -> tuple[list, float]:
    """Run the drill with ``world`` local processes (forked; ``spawn`` where the ranks must not
    inherit this process's torch state, e.g. its Flight Recorder ring) while a live Detector watches;
    stop when the ranks are done, when a verdict of a kind in ``stop_on`` comes, or after
    ``watch_s``; ranks still running then are killed. Returns (verdicts, seconds from start
    to the first verdict or None): the live ones, plus any that judging the finished
    directory adds (a crash whose ranks all exit within the live grace period)."""
    import torch.multiprocessing as mp

    from diagnostics.detect import Detector

    port = free_port()
    t0 = time.time()
    ctx = mp.start_processes(_entry, args=(world, port, {"run_dir": str(run_dir), **kw}), nprocs=world,
                             join=False, start_method=start_method)
    live = Detector(run_dir, live=True)
    first = None
    while any(p.is_alive() for p in ctx.processes) and time.time() - t0 < watch_s:
        time.sleep(0.25)
        new = live.poll()
        if new and first is None:
            first = time.time() - t0
        if any(v.kind in stop_on for v in new):
            break
    stop_all([p.pid for p in ctx.processes if p.is_alive()])
    for p in ctx.processes:
        p.join()
    seen = {v.key for v in live.verdicts}
    late = [v for v in Detector(run_dir, live=False, dump_stacks=False).poll() if v.key not in seen]
    return live.verdicts + late, first


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m diagnostics.drill", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--inject", action="append", default=[], help="a fault spec (repeatable), see diagnostics/inject.py")
    ap.add_argument("--compute-ms", type=float, default=20.0)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--no-p2p", action="store_true")
    ap.add_argument("--no-trace", action="store_true")
    a = ap.parse_args(argv)
    out = run(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), a.run_dir, a.steps, a.inject,
              a.compute_ms, not a.no_p2p, a.ckpt_every, not a.no_trace)
    done = Path(a.run_dir) / f"drill-done-r{out['rank']}.json"
    done.write_text(json.dumps(out))


if __name__ == "__main__":
    main()
