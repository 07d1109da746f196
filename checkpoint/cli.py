"""``kintsugi ckpt`` (also ``python -m checkpoint``): convert, inspect and verify checkpoints.

    kintsugi ckpt convert SRC DST --to {universal,deepspeed-universal,dcp,safetensors}
                          [--dtype bfloat16] [--max-memory 2G] [--workers 4] [--dry-run]
    kintsugi ckpt inspect PATH
    kintsugi ckpt verify A B
    kintsugi ckpt gc

The source format is detected (Kintsugi native or universal, DeepSpeed ZeRO 1/2/3 or
universal, torch DCP, consolidated safetensors). Exit codes: 0 done / equal, 1 ``verify``
found differences, 2 bad input or a damaged checkpoint (one line on stderr, nothing
half-written left behind), 130 interrupted (``convert`` keeps DST.partial for the rerun).
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from checkpoint.convert import TARGETS, convert, detect
from checkpoint.convert.stream import PARTIAL
from checkpoint.format import DTYPE_BY_NAME, human, CorruptCheckpoint
from comms import UserError, exits_on_user_error


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise UserError(f"--max-memory {text!r} is not a size; write e.g. 512M or 4G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def cmd_convert(a) -> int:
    dtype = None
    if a.dtype:
        dtype = DTYPE_BY_NAME.get(a.dtype.removeprefix("torch."))
        if dtype is None or not dtype.is_floating_point:
            raise UserError(f"--dtype {a.dtype!r} is not a floating dtype; use float32, bfloat16 or float16")
    plan = convert(Path(a.src), Path(a.dst), a.to, parse_size(a.max_memory), a.workers, a.dry_run, dtype,
                   progress=not a.quiet)
    if a.dry_run:
        print(f"plan: {len(plan.names)} tensors -> {a.to} at {a.dst}")
        for name in plan.names:
            info = plan.infos[name]
            print(f"  {name:60s} {str(list(info.shape)):>20s} {str(info.dtype).removeprefix('torch.'):>9s} {human(info.nbytes):>10s}")
        if plan.skipped:
            print(f"not written ({a.to} holds no such tensors): {len(plan.skipped)}")
        print(f"output size: {human(plan.out_bytes)}; peak memory: {human(plan.peak_bytes)} "
              f"({plan.workers} workers, --max-memory {human(plan.max_memory)}); nothing written (--dry-run)")
    elif not a.quiet:
        print(f"converted {len(plan.names)} tensors ({human(plan.out_bytes)}) to {a.to} at {a.dst}")
    return 0


def cmd_inspect(a) -> int:
    if a.keeper:
        # What a running job's node keeper holds in memory (L0 snapshots, EC shares).
        from checkpoint.snapshot import format_keeper, inspect_keeper

        print(format_keeper(inspect_keeper(Path(a.path), a.job, a.node_id)))
        return 0
    src = detect(Path(a.path))
    objects = src.objects()
    print(f"path:    {src.path}")
    print(f"format:  {src.format}")
    print(f"step:    {src.step}")
    print(f"layout:  {', '.join(f'{k}={v}' for k, v in src.layout.items()) or '-'}")
    dtypes = Counter(str(i.dtype).removeprefix("torch.") for i in src.tensors.values())
    print(f"tensors: {len(src.tensors)} ({human(src.nbytes)}; {', '.join(f'{n} {d}' for d, n in dtypes.items())})")
    for name, info in sorted(src.tensors.items()):
        print(f"  {name:60s} {str(list(info.shape)):>20s} {str(info.dtype).removeprefix('torch.'):>9s} {human(info.nbytes):>10s}")
    print(f"objects: {', '.join(sorted(objects)) or '-'}")
    print(f"missing: {', '.join(src.missing) if src.missing else 'nothing'}")
    return 0


def tolerance(*dtypes) -> tuple[float, float]:
    """(rtol, atol) of the coarser floating dtype: a value cast to it and back may move by one ulp."""
    floats = [d for d in dtypes if d.is_floating_point]
    if not floats:
        return 0.0, 0.0
    fi = max((torch.finfo(d) for d in floats), key=lambda f: f.eps)
    return 2 * fi.eps, fi.tiny


def cmd_verify(a) -> int:
    x, y = detect(Path(a.a)), detect(Path(a.b))
    diffs = []
    names_x, names_y = set(x.tensors), set(y.tensors)
    if "safetensors" in (x.format, y.format):  # consolidated weights: compare the model weights only
        names_x, names_y = {n for n in names_x if n.startswith("model.")}, {n for n in names_y if n.startswith("model.")}
    only_x, only_y = sorted(names_x - names_y), sorted(names_y - names_x)
    diffs += [f"only in A: {n}" for n in only_x] + [f"only in B: {n}" for n in only_y]
    common = sorted(names_x & names_y)
    for name in common:
        if x.tensors[name].shape != y.tensors[name].shape:
            diffs.append(f"{name}: shape {list(x.tensors[name].shape)} != {list(y.tensors[name].shape)}")
            continue
        tx, ty = x.read(name), y.read(name)
        rtol, atol = tolerance(tx.dtype, ty.dtype)
        if not torch.allclose(tx.double(), ty.double(), rtol=rtol, atol=atol, equal_nan=True):
            err = (tx.double() - ty.double()).abs().max().item()
            diffs.append(f"{name}: values differ (max abs difference {err:.3g})")
    if x.step != y.step and "safetensors" not in (x.format, y.format):
        diffs.append(f"step: {x.step} != {y.step}")
    for d in diffs:
        print(d)
    print(f"compared {len(common)} tensors of {x.format} {a.a} and {y.format} {a.b}: "
          f"{'equal' if not diffs else f'{len(diffs)} differences'}")
    return 1 if diffs else 0


def cmd_gc(a) -> int:
    from checkpoint.keeper import collect_garbage

    removed = collect_garbage()
    print(f"removed {len(removed)} shared-memory segment(s) of dead node keepers" if removed
          else "no shared memory of dead node keepers to remove")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kintsugi ckpt", description="Convert, inspect and verify checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint (format detected) to another format")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=TARGETS)
    c.add_argument("--dtype", help="safetensors only: cast weights (float32, bfloat16, float16)")
    c.add_argument("--max-memory", default="2G", help="bytes of tensors in flight at once (default 2G)")
    c.add_argument("--workers", type=int, default=4, help="tensors converted in parallel (default 4)")
    c.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("inspect", help="format, step, layout, tensors, what is missing")
    i.add_argument("path", help="a checkpoint, or with --keeper a running job's run directory")
    i.add_argument("--keeper", action="store_true", help="show what this machine's node keeper of the job holds in memory")
    i.add_argument("--job", default="local", help="with --keeper: the job id (torchrun's --rdzv-id; default: local)")
    i.add_argument("--node-id", default=None, help="with --keeper: KINTSUGI_NODE_ID of the node (several nodes on one host)")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="compare two checkpoints of any formats tensor by tensor")
    v.add_argument("a")
    v.add_argument("b")
    v.set_defaults(func=cmd_verify)
    g = sub.add_parser("gc", help="remove the shared memory of this user's node keepers that were killed (kill -9, "
                                  "OOM); live keepers' memory is never touched")
    g.set_defaults(func=cmd_gc)
    return p


@exits_on_user_error
def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, format="kintsugi: %(message)s")
    a = parser().parse_args(argv)
    try:
        return a.func(a)
    except CorruptCheckpoint as e:
        raise CorruptCheckpoint(f"{e}; use another copy (of a Kintsugi root: an older step_* directory)") from None
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT (128 + 2)
        partial = Path(a.dst).with_name(Path(a.dst).name + PARTIAL) if a.cmd == "convert" else None
        kept = f"; {partial} is kept, rerun the same command to resume" if partial and partial.exists() else ""
        print(f"kintsugi: interrupted{kept}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
