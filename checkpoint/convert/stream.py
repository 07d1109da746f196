"""Converting a checkpoint tensor by tensor: bounded memory, parallel, atomic, resumable.

``convert`` reads one logical tensor at a time from the source (consolidating its pieces),
hands it to the writer of the target format and drops it. Up to ``workers`` tensors are in
flight, and only as many as fit into ``max_memory`` bytes (a tensor larger than the budget
runs alone). There is no intermediate copy: each output file is written once, to a ``.tmp``
name renamed when complete, inside ``DST.partial/``; DST appears by one rename at the end.

A rerun after an interruption finds ``DST.partial/`` and skips every output file already
complete. An error caused by the input or the disk (missing shard, no space, ...) removes
``DST.partial/`` so nothing half-made stays behind; an interrupt (Ctrl-C) drops the queued
tensors at once, lets the ones being written finish and keeps ``DST.partial/`` for the rerun.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint.convert import deepspeed as ds_fmt
from checkpoint.convert.export import SafetensorsWriter
from checkpoint.convert.sources import Info, NameMap, Source, detect
from checkpoint.format import fsync_dir
from checkpoint.universal import atom_record, split_name, write_atom, write_meta
from comms import UserError

log = logging.getLogger(__name__)
TARGETS = ("universal", "deepspeed-universal", "dcp", "safetensors")
PARTIAL = ".partial"
STAMP = ".convert.json"


@dataclass
class Plan:
    to: str
    names: list[str]  # the tensors written, in order
    infos: dict[str, Info]  # their output shape and dtype
    costs: dict[str, int]  # peak bytes to convert each
    workers: int
    max_memory: int
    out_bytes: int = 0
    peak_bytes: int = 0
    dtype: torch.dtype | None = None
    skipped: list[str] = field(default_factory=list)  # source tensors the target does not hold
    shard_bytes: int = 5 << 30  # safetensors: at most this many bytes per file (Hugging Face's default)
    # Where the time went, seconds summed over the workers: read (the source's pieces into one
    # tensor), write (the target's file: for deepspeed-universal split into serialize,
    # checksum, write), finish (the non-tensor files), plus the wall time of convert().
    seconds: dict = field(default_factory=dict)


def make_plan(src: Source, to: str, workers: int, max_memory: int, dtype: torch.dtype | None,
              shard_bytes: int = 5 << 30) -> Plan:
    if to not in TARGETS:
        raise UserError(f"unknown target format {to!r}; use one of {', '.join(TARGETS)}")
    if dtype is not None and to != "safetensors":
        raise UserError("--dtype applies to --to safetensors only; drop it")
    if to == "deepspeed-universal" and not isinstance(src, (ds_fmt.DeepSpeedSource, ds_fmt.DeepSpeedUniversalSource)):
        raise UserError(f"--to deepspeed-universal needs the DeepSpeed engine's own model-state files, which a "
                        f"{src.format} checkpoint does not have; convert a DeepSpeed checkpoint, or use --to universal")
    names, skipped = [], []
    for name in sorted(src.tensors):
        keep = {"safetensors": name.startswith("model."),
                "deepspeed-universal": split_name(name) is not None}.get(to, True)
        (names if keep else skipped).append(name)
    if not names:
        what = {"safetensors": "model weights (names model.*)", "deepspeed-universal": "model or optimizer tensors"}
        raise UserError(f"nothing to write: {src.path} holds no tensors" if not skipped else
                        f"nothing to write: --to {to} takes {what[to]}, and none of the {len(skipped)} tensors of "
                        f"{src.path} is one (e.g. {', '.join(skipped[:3])}); rename them with --prefix model. or --map FILE")
    infos = {n: Info(src.tensors[n].shape, dtype or src.tensors[n].dtype) for n in names}
    # a tensor's cost: the source's buffers, the tensor, and for deepspeed-universal the torch.save
    # bytes built in memory (each worker keeps one such buffer, as large as its largest tensor)
    serialized = 2 if to == "deepspeed-universal" else 1
    costs = {n: src.peak_bytes(n) + serialized * infos[n].nbytes for n in names}
    plan = Plan(to, names, infos, costs, workers, max_memory, dtype=dtype, skipped=skipped, shard_bytes=shard_bytes)
    plan.out_bytes = sum(i.nbytes for i in infos.values())
    biggest = sorted(costs.values(), reverse=True)
    plan.peak_bytes = max(biggest[0] if biggest else 0, min(max_memory, sum(biggest[:workers])))
    return plan


class Cancelled(Exception):
    """The conversion was interrupted: tensors not yet started are not converted."""


class Budget:
    """Bytes in flight at most ``limit``; one task larger than that may run alone. After
    ``cancel`` every waiting and later ``acquire`` raises Cancelled."""

    def __init__(self, limit: int):
        self.limit, self.used, self.cancelled = limit, 0, False
        self.cv = threading.Condition()

    def acquire(self, n: int):
        with self.cv:
            self.cv.wait_for(lambda: self.cancelled or self.used == 0 or self.used + n <= self.limit)
            if self.cancelled:
                raise Cancelled
            self.used += n

    def cancel(self):
        with self.cv:
            self.cancelled = True
            self.cv.notify_all()

    def release(self, n: int):
        with self.cv:
            self.used -= n
            self.cv.notify_all()


# -- writers: each knows what is already complete in DST.partial and how to finish ------------

class UniversalWriter:
    def __init__(self, root: Path, src: Source, plan: Plan):
        self.root, self.src, self.plan = root, src, plan
        (root / "atoms").mkdir(parents=True, exist_ok=True)
        self.records = {}

    def done(self, name: str) -> bool:
        rec = atom_record(self.root, name)
        if rec is not None:
            self.records[name] = rec
        return rec is not None

    def write(self, name: str, t: torch.Tensor):
        self.records[name] = write_atom(self.root, name, t)

    def finish(self):
        source = {"format": self.src.format, "path": str(self.src.path), "layout": self.src.layout}
        write_meta(self.root, self.src.step, self.records, self.src.objects(), source, self.src.missing)


class DeepSpeedUniversalWriter:
    def __init__(self, root: Path, src: Source, plan: Plan):
        self.src, self.plan = src, plan
        self.tag = root / f"global_step{src.step}"
        self.zero = self.tag / "zero"
        self.zero.mkdir(parents=True, exist_ok=True)

    def done(self, name: str) -> bool:
        fqn, state = split_name(name)
        return (self.zero / fqn / f"{state}.pt").is_file()

    def write(self, name: str, t: torch.Tensor):
        ds_fmt.write_deepspeed_universal_atom(self.zero, self.src, name, t, self.plan.seconds)

    def finish(self):
        ds_fmt.finish_deepspeed_universal(self.tag, self.src)


class DCPWriter:
    def __init__(self, root: Path, src: Source, plan: Plan):
        from checkpoint.convert import dcp as dcp_fmt  # torch.distributed.checkpoint: a second's import, DCP's alone

        self.fmt = dcp_fmt
        self.root, self.src, self.plan = root, src, plan
        self.index = {n: k for k, n in enumerate(plan.names)}

    def done(self, name: str) -> bool:
        return (self.root / self.fmt.tensor_file(self.index[name])).is_file()

    def write(self, name: str, t: torch.Tensor):
        self.fmt.write_tensor(self.root, self.index[name], t)

    def finish(self):
        self.fmt.write_metadata(self.root, self.plan.names, self.plan.infos, self.src.objects())


WRITERS = {"universal": UniversalWriter, "deepspeed-universal": DeepSpeedUniversalWriter,
           "dcp": DCPWriter, "safetensors": SafetensorsWriter}


def _prepare(dst: Path, src: Source, plan: Plan) -> Path:
    """DST.partial/, resumed when it was left by the same conversion."""
    if dst.exists():
        raise UserError(f"{dst} already exists; choose another destination or remove it")
    partial = dst.with_name(dst.name + PARTIAL)
    stamp = {"source": str(src.path.resolve()), "to": plan.to, "dtype": str(plan.dtype), "step": src.step,
             "names": plan.names, "shard_bytes": plan.shard_bytes}
    if partial.exists():
        try:
            old = json.loads((partial / STAMP).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != stamp:
            raise UserError(f"{partial} was left by a different conversion; remove it or convert to another destination")
        log.info("resuming the conversion in %s", partial)
    else:
        partial.mkdir(parents=True)
        (partial / STAMP).write_text(json.dumps(stamp))
    return partial


def convert(src_path: Path, dst: Path, to: str, max_memory: int = 2 << 30, workers: int = 4,
            dry_run: bool = False, dtype: torch.dtype | None = None, progress: bool = True,
            names: NameMap | None = None, shard_bytes: int = 5 << 30) -> Plan:
    """Convert the checkpoint at ``src_path`` (format detected, tensors renamed by ``names``)
    to format ``to`` at ``dst``."""
    started = time.perf_counter()
    src = detect(src_path, names)
    plan = make_plan(src, to, max(1, workers), max_memory, dtype, shard_bytes)
    dst = Path(dst)
    if dry_run:
        if dst.exists():
            raise UserError(f"{dst} already exists; choose another destination or remove it")
        return plan
    dst.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dst.parent).free
    partial_exists = dst.with_name(dst.name + PARTIAL).exists()
    if not partial_exists and free < plan.out_bytes:
        raise UserError(f"{dst.parent} has {free / 2**20:.0f} MiB free but the conversion writes "
                        f"{plan.out_bytes / 2**20:.0f} MiB; free space or choose another destination")
    partial = _prepare(dst, src, plan)
    try:
        writer = WRITERS[to](partial, src, plan)
        todo = [n for n in plan.names if not writer.done(n)]
        budget = Budget(max_memory)
        bar = tqdm(total=sum(plan.infos[n].nbytes for n in todo), unit="B", unit_scale=True,
                   desc=f"convert -> {to}", disable=not progress or None)

        def one(name: str):
            cost = plan.costs[name]
            budget.acquire(cost)
            try:
                with timed(plan, "read"):
                    t = src.read(name)
                if budget.cancelled:
                    raise Cancelled
                with timed(plan, "write"):
                    writer.write(name, t)
                del t
            finally:
                budget.release(cost)
            bar.update(plan.infos[name].nbytes)

        with ThreadPoolExecutor(plan.workers) as pool:
            futures = [pool.submit(one, n) for n in todo]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
                for f in futures:
                    if f.done() and f.exception():
                        raise f.exception()
            except BaseException:
                # An error or Ctrl-C: drop the queued tensors and stop the waiting ones; only
                # those being read or written finish (at most `workers`, within max_memory).
                budget.cancel()
                pool.shutdown(cancel_futures=True)
                raise
        bar.close()
        with timed(plan, "finish"):
            writer.finish()
        (partial / STAMP).unlink()
        fsync_dir(partial)
        os.replace(partial, dst)
        fsync_dir(dst.parent)
    except UserError:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"writing {dst} failed ({e.strerror or e}); free space or fix the destination") from None
    plan.seconds["convert"] = time.perf_counter() - started
    return plan


_timing = threading.Lock()


@contextmanager
def timed(plan: Plan, part: str):
    """Add the block's seconds to ``plan.seconds[part]`` (from any worker thread)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        with _timing:
            plan.seconds[part] = plan.seconds.get(part, 0.0) + time.perf_counter() - t
