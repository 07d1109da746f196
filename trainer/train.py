"""The training loop. Read it top to bottom.

    torchrun --nproc-per-node 2 -m trainer --config configs/tiny.toml [--section.key=value ...]

Resumes by itself from the newest committed checkpoint of its run directory, so a job that
torchrun restarts after a crash continues where it was. SIGTERM/SIGINT: finish the step,
save, exit 0 once the save is durable.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from checkpoint import Checkpointer, Chunk, EcSnapshots, job_id
from comms import dist_utils, exits_on_user_error, trace, trace_cost
from comms.mesh import build_mesh, coordinate
from comms.placement import nccl_backend_override
from diagnostics import Injector
from trainer.config import JobConfig, load_config, to_toml
from trainer.data import Batches
from trainer.metrics import Metrics, rss_mb, setup_logging
from trainer.parallel_dims import ParallelDims
from trainer.parallelize import build_engine
from trainer.placement import resolve_plan

log = logging.getLogger("trainer")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m trainer", description="Train the Kintsugi model (run under torchrun for several ranks).",
                                 epilog="Any --section.key=value overrides the config, e.g. --train.steps=100 --parallel.tp=2.")
    ap.add_argument("--config", default=None, help="job TOML (default: configs/tiny.toml)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, overrides = ap.parse_known_args(argv)
    return args, overrides


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio x lr at the last step."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if o.schedule == "cosine" else 1 - progress
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * decay)


def job_state(engine, data: Batches, step: int, cfg: JobConfig) -> dict:
    """Everything a resumed run needs, in the one state model: model and optimizer chunks,
    step, data position, this rank's RNG, and the config that produced it."""
    state = engine.state()
    state["train.step"] = step
    state["data"] = data.state_dict()
    state["config"] = cfg.to_dict()
    rng = torch.get_rng_state()
    state[f"rng.rank{dist_utils.rank()}"] = Chunk(rng, tuple(rng.shape), (0,), replica=False)
    return state


def peer_failed(e: BaseException) -> bool:
    """A collective broke because another rank died (gloo/NCCL transport errors)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "NCCL", "Connection reset", "Connection closed"))


@exits_on_user_error
def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(to_toml(cfg))
        return 0
    try:
        return train(cfg)
    except RuntimeError as e:
        if not peer_failed(e):
            raise
        # The peer's death is the news, not this rank's stack: one line here, the stack in
        # the rank's log; exit non-zero so torchrun restarts the worker group.
        trace.failed(e)
        log.exception("collective failed")
        print(f"kintsugi: rank {dist_utils.rank()}: another rank stopped ({transport_reason(e)}); "
              "torchrun restarts the workers", file=sys.stderr, flush=True)
        return 1


def transport_reason(e: BaseException) -> str:
    """The backend's reason without its source location: gloo's "[.../pair.cc:553] Connection
    closed by peer [127.0.0.1]:8095. This is typically ..." -> "Connection closed by peer"."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's "[file:line]"
    return re.split(r" \[|\. ", text, maxsplit=1)[0][:120]


@dataclass
class Resumed:
    """Where a run continues from."""

    step: int
    source: str  # the level that held it (L0 memory, L1, L2) or the load_from path


def restore(cfg: JobConfig, ckpt: Checkpointer, engine, data: Batches) -> Resumed | None:
    """Fill the model, optimizer, data position and this rank's RNG from the newest complete
    step (collective). With snapshots on, the fastest place that has it: local keeper memory,
    else an EC rebuild from peer keepers, else disk; logged as one line."""
    state = job_state(engine, data, 0, cfg)
    optional = lambda name: name.startswith("rng.")
    if cfg.snapshot.interval:
        snapshots = EcSnapshots(cfg.snapshot, ckpt.keeper, dist.distributed_c10d._get_default_store(), job_id())
        got = snapshots.restore(ckpt, state, optional)
    else:
        got = ckpt.restore(state, optional, say=False)
    if got is None:
        return None
    step, objects, missing = got
    engine.load_state()
    data.load_state_dict(objects["data"])
    rng = f"rng.rank{dist_utils.rank()}"
    if rng not in missing:
        torch.set_rng_state(state[rng].tensor)
    return Resumed(step, (ckpt.restored_from or "").upper() or cfg.checkpoint.load_from)


def train(cfg: JobConfig) -> int:
    # ---- the process group, the mesh, and where output goes ----
    device = dist_utils.init_process_group(cfg.parallel.backend, cfg.parallel.timeout_s)
    rank, world = dist_utils.rank(), dist_utils.world_size()
    cfg.validate(world)
    dims = ParallelDims.resolve(cfg, world)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.run_dir).resolve()
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(dims.applied_to(cfg)))
    dist_utils.barrier()
    setup_logging(run_dir, rank)
    log.info("world %d, device %s, config %s", world, device, json.dumps(cfg.to_dict()))
    # Every collective from here on is recorded (RUN_DIR/diagnostics/) for the launcher's
    # monitor and `kintsugi diagnose report`; faults are injected only when asked for.
    tracer = trace.install(run_dir, rank, world, enabled=cfg.diagnostics.trace)
    injector = Injector(cfg.diagnostics.inject, rank, tracer)
    plan, dims = resolve_plan(cfg, dims, device, run_dir)  # a plan file, one made now from the detected cluster, or none
    mesh = build_mesh(device, dims.mesh_sizes(), plan.rank_grid if plan else None,
                      nccl_backend_override(plan, rank) if plan and device == "cuda" else None)

    if dims.pp_enabled:  # stages differ by design: the detector does not compare them as stragglers
        tracer.annotate(pipeline_stage=coordinate(mesh, "pp")[0])

    # ---- model, optimizer, data, checkpoints ----
    engine = build_engine(cfg, dims, mesh, device)
    data = Batches(cfg.data, dp_rank=dims.dp_rank(mesh), dp_size=dims.dp_size)
    # Saves return at once: tensors are copied into this node's keeper during the next
    # forward/backward (the optimizer waits only for what is not copied yet); the keeper
    # writes L1/L2 in the background and, with snapshots on, erasure-codes across nodes.
    ckpt = Checkpointer(cfg.checkpoint, run_dir)
    ckpt.attach(engine.optimizer)
    # The one stop path: SIGTERM/SIGINT make ckpt.check() true on every rank at the next
    # step boundary; the loop ends there and the final save below runs.
    ckpt.handle_sigterm()
    resumed = restore(cfg, ckpt, engine, data)
    step = resumed.step if resumed else 0
    metrics = Metrics(run_dir, rank == 0, cfg.train.steps, step, cfg.train.progress)
    n_params = sum(p.numel() for p in engine.model.parameters())
    metrics.print(f"kintsugi: {world} rank(s) on {device} | layout {dims.describe()} | {n_params:,} params on rank 0 "
                  f"| run dir {run_dir}")
    if resumed:
        metrics.print(f"resumed from step {step} ({resumed.source}; checkpoints in {ckpt.root})")
    if injector.planned and not resumed:
        metrics.print(f"kintsugi: drill: {', '.join(injector.planned)} (diagnostics.inject; set it to [] for a plain "
                      "run): the job recovers by itself")

    # ---- the loop ----
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    interval = cfg.snapshot.interval or cfg.checkpoint.interval
    t_start, first_step = time.perf_counter(), step
    loss, stopping = float("nan"), False
    # diagnostics.trace_cost_steps: every other block of steps untraced, to weigh tracing
    cost_k, cost_steps, after_save = cfg.diagnostics.trace_cost_steps, {}, set()
    while step < cfg.train.steps and not stopping:
        if cost_k:
            tracer.pause(not trace_cost.traced(step, cost_k))
        t0 = time.perf_counter()
        injector.before_step(step)
        lr = lr_at(step, cfg)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        with tracer.phase("data"):
            inputs, targets = data.next()
        with tracer.phase("forward_backward"):
            loss = engine.forward_backward(inputs, targets)
        with tracer.phase("optimizer"):
            grad_norm = engine.optimizer_step()
        step += 1
        # Commits what became durable, raises a keeper's error on every rank, and says
        # whether any rank was asked to stop: every rank stops at the same step.
        stopping = ckpt.check()
        # One small all-reduce: the loss, held by the last pipeline stage.
        summary = torch.tensor([loss if engine.holds_loss else 0.0, float(engine.holds_loss)])
        if dist_utils.initialized():
            dist.all_reduce(summary)
        loss = float(summary[0] / summary[1])
        dt = time.perf_counter() - t0
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                  "step_time_s": dt, "rss_mb": rss_mb()}
        if cost_k:
            record["traced"] = not tracer.paused
            cost_steps[step] = dt
        metrics.step(record, print_line=step % cfg.train.log_every == 0 or step == cfg.train.steps)
        metrics.saves(ckpt.finished_saves())
        if interval and step % interval == 0 and step < cfg.train.steps and not stopping:
            with tracer.phase("checkpoint"):
                ckpt.save(step, job_state(engine, data, step, cfg))
            log.info("step %d saved; levels commit in the background", step)
            after_save.add(step + 1)
        tracer.end_step(step)

    if cost_k:
        tracer.pause(False)
        cost = trace_cost.measure(cost_steps, cost_k, after_save)
        if cost is None:
            metrics.print(f"tracing cost not measured: {len(cost_steps)} steps in {cost_k}-step blocks leave fewer than "
                          f"two blocks with both neighbours after the first two blocks; raise --train.steps")
        else:
            metrics.print(cost.line())
            metrics.event("trace_cost", asdict(cost))

    # ---- the one way out (the last step, a stop request, or a run resumed at its end) ----
    # The final save goes to every level, and close() waits (bounded) until it is durable
    # there: the job never exits 0 without its final step on disk.
    with tracer.phase("checkpoint"):
        ckpt.save(step, job_state(engine, data, step, cfg), final=True)
    if stopping:
        metrics.print(f"stop requested: saved step {step}, exiting")
    ckpt.close()
    metrics.saves(ckpt.finished_saves())
    tracer.close()
    elapsed = time.perf_counter() - t_start
    if step == first_step:  # resumed a finished run: nothing was trained
        metrics.print(f"done: the run was already at step {step}/{cfg.train.steps}; raise --train.steps to "
                      f"train on, or delete {run_dir} to start over")
    else:
        metrics.print(f"done: step {step}/{cfg.train.steps}, final loss {loss:.4f}, "
                      f"{(step - first_step) * tokens_per_step / max(elapsed, 1e-9):,.0f} tok/s, "
                      f"checkpoints in {ckpt.root}, metrics in {run_dir / 'metrics.jsonl'}, logs in {run_dir / 'logs'}")
    metrics.close()
    return 0
