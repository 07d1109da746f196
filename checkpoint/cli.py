"""``kintsugi ckpt`` (also ``python -m checkpoint``): convert, inspect and verify checkpoints.

    kintsugi ckpt convert SRC DST --to {universal,deepspeed-universal,dcp,safetensors}
                          [--map FILE] [--prefix P] [--dtype bfloat16] [--max-shard-size 5G]
                          [--max-memory 2G] [--workers 4] [--dry-run]
    kintsugi ckpt inspect PATH [--json]
    kintsugi ckpt verify A B [--map FILE] [--prefix P] [--rtol R] [--atol A] [--allow-subset] [--json]
    kintsugi ckpt gc

The source format is detected (Kintsugi native or universal, DeepSpeed ZeRO 1/2/3 or
universal, torch DCP from any job (torchtitan's too), safetensors files or Hugging Face
shards). ``--map``/``--prefix`` rename a foreign checkpoint's tensors onto Kintsugi's names
(``model.<fqn>``, ``optim.state.<fqn>.<key>``; checkpoint.convert.NameMap). Exit codes: 0
done / equal, 1 ``verify`` found differences, 2 bad input or a damaged checkpoint (one line
on stderr, nothing half-written left behind), 130 interrupted (``convert`` keeps
DST.partial for the rerun).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from pathlib import Path

import torch

from checkpoint.convert import TARGETS, NameMap, convert, detect
from checkpoint.convert.stream import PARTIAL
from checkpoint.format import CorruptCheckpoint, human
from checkpoint.shards import DTYPE_BY_NAME
from comms import UserError, exits_on_user_error


EXIT_CODES = "exit codes: 0 done (verify: equal), 1 verify found differences or compared nothing, " \
             "2 bad input (one line on stderr; nothing half-written is left behind)"


def parse_size(text: str, flag: str = "--max-memory") -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.I)
    if not m:
        raise UserError(f"{flag} {text!r} is not a size; write e.g. 512M or 4G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def cmd_convert(a) -> int:
    dtype = None
    if a.dtype:
        dtype = DTYPE_BY_NAME.get(a.dtype.removeprefix("torch."))
        if dtype is None or not dtype.is_floating_point:
            raise UserError(f"--dtype {a.dtype!r} is not a floating dtype; use float32, bfloat16 or float16")
    plan = convert(Path(a.src), Path(a.dst), a.to, parse_size(a.max_memory), a.workers, a.dry_run, dtype,
                   progress=not a.quiet, names=NameMap.load(a.map, a.prefix),
                   shard_bytes=parse_size(a.max_shard_size, "--max-shard-size"))
    if a.dry_run:
        print(f"plan: {len(plan.names)} tensors -> {a.to} at {a.dst}")
        for name in plan.names:
            info = plan.infos[name]
            print(f"  {name:60s} {str(list(info.shape)):>20s} {dtype_name(info.dtype):>9s} {human(info.nbytes):>10s}")
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

        held = inspect_keeper(Path(a.path), a.job, a.node_id)
        print(json.dumps(held, default=str) if a.json else format_keeper(held))
        return 0
    src = detect(Path(a.path))
    objects = src.objects()
    if a.json:
        print(json.dumps({"path": str(src.path), "format": src.format, "step": src.step, "layout": src.layout,
                          "bytes": src.nbytes, "tensors": {n: {"shape": list(i.shape), "dtype": dtype_name(i.dtype),
                                                                "bytes": i.nbytes} for n, i in sorted(src.tensors.items())},
                          "objects": sorted(objects), "missing": src.missing}, default=str))
        return 0
    print(f"path:    {src.path}")
    print(f"format:  {src.format}")
    print(f"step:    {src.step}")
    print(f"layout:  {', '.join(f'{k}={v}' for k, v in src.layout.items()) or '-'}")
    dtypes = Counter(dtype_name(i.dtype) for i in src.tensors.values())
    print(f"tensors: {len(src.tensors)} ({human(src.nbytes)}; {', '.join(f'{n} {d}' for d, n in dtypes.items())})")
    for name, info in sorted(src.tensors.items()):
        print(f"  {name:60s} {str(list(info.shape)):>20s} {dtype_name(info.dtype):>9s} {human(info.nbytes):>10s}")
    print(f"objects: {', '.join(sorted(objects)) or '-'}")
    print(f"missing: {', '.join(src.missing) if src.missing else 'nothing'}")
    return 0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tolerance(*dtypes) -> tuple[float, float]:
    """(rtol, atol) of the coarser floating dtype: a value cast to it and back may move by one ulp."""
    floats = [d for d in dtypes if d.is_floating_point]
    if not floats:
        return 0.0, 0.0
    fi = max((torch.finfo(d) for d in floats), key=lambda f: f.eps)
    return 2 * fi.eps, fi.tiny


def cmd_verify(a) -> int:
    names = NameMap.load(a.map, a.prefix)
    x, y = detect(Path(a.a), names), detect(Path(a.b), names)
    names_x, names_y = set(x.tensors), set(y.tensors)
    if "safetensors" in (x.format, y.format):  # consolidated weights: compare the model weights only
        names_x, names_y = {n for n in names_x if n.startswith("model.")}, {n for n in names_y if n.startswith("model.")}
    only_x, only_y = sorted(names_x - names_y), sorted(names_y - names_x)
    diffs = [] if a.allow_subset else [f"only in A: {n}" for n in only_x] + [f"only in B: {n}" for n in only_y]
    common = sorted(names_x & names_y)
    for name in common:
        if x.tensors[name].shape != y.tensors[name].shape:
            diffs.append(f"{name}: shape {list(x.tensors[name].shape)} != {list(y.tensors[name].shape)}")
            continue
        tx, ty = x.read(name), y.read(name)
        rtol, atol = tolerance(tx.dtype, ty.dtype)
        rtol, atol = a.rtol if a.rtol is not None else rtol, a.atol if a.atol is not None else atol
        if not torch.allclose(tx.double(), ty.double(), rtol=rtol, atol=atol, equal_nan=True):
            err = (tx.double() - ty.double()).abs().max().item()
            diffs.append(f"{name}: values differ (max abs difference {err:.3g}, rtol {rtol:.3g}, atol {atol:.3g})")
    if x.step != y.step and "safetensors" not in (x.format, y.format):
        diffs.append(f"step: {x.step} != {y.step}")
    what = f"{x.format} {a.a} and {y.format} {a.b}"
    if not common:
        verdict = (f"compared nothing: no tensor name is in both {what} (A has e.g. {', '.join(sorted(names_x)[:2]) or '-'}; "
                   f"B has e.g. {', '.join(sorted(names_y)[:2]) or '-'}); match the names with --map FILE or --prefix")
    elif diffs:
        verdict = f"compared {len(common)} tensors of {what}: {len(diffs)} differences, the first: {diffs[0]}"
    else:
        verdict = f"compared {len(common)} tensors of {what}: equal" + \
                  (f" ({len(only_x) + len(only_y)} tensors in only one of them, --allow-subset)" if only_x or only_y else "")
    equal = bool(common) and not diffs
    if a.json:
        print(json.dumps({"a": a.a, "b": a.b, "formats": [x.format, y.format], "compared": len(common), "equal": equal,
                          "differences": diffs, "only_in_a": only_x, "only_in_b": only_y, "summary": verdict}))
    else:
        for d in diffs:
            print(d)
        print(verdict)
    return 0 if equal else 1


def cmd_gc(a) -> int:
    from checkpoint.keeper import collect_garbage

    removed = collect_garbage()
    print(f"removed {len(removed)} shared-memory segment(s) of dead node keepers" if removed
          else "no shared memory of dead node keepers to remove")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kintsugi ckpt", description="Convert, inspect and verify checkpoints.", epilog=EXIT_CODES)
    sub = p.add_subparsers(dest="cmd", required=True)

    def names(q):
        q.add_argument("--map", metavar="FILE", help="rename tensors: lines of PATTERN REPLACEMENT (regex, first match "
                                                     "wins; - drops the tensor), e.g. ^optimizer\\. optim.")
        q.add_argument("--prefix", default="", help="prepend this to every tensor name that lacks it (after --map), "
                                                    "e.g. model. for weights saved without it (torchtitan)")

    c = sub.add_parser("convert", help="convert a checkpoint (format detected) to another format", epilog=EXIT_CODES)
    c.add_argument("src", help="the checkpoint to read (any supported format)")
    c.add_argument("dst", help="where to write it (must not exist; built in DST.partial, renamed when complete)")
    c.add_argument("--to", required=True, choices=TARGETS)
    names(c)
    c.add_argument("--dtype", help="safetensors only: cast weights (float32, bfloat16, float16)")
    c.add_argument("--max-shard-size", default="5G", help="safetensors only: bytes per file; more weights are written "
                                                          "as Hugging Face shards plus model.safetensors.index.json (default 5G)")
    c.add_argument("--max-memory", default="2G", help="bytes of tensors in flight at once (default 2G)")
    c.add_argument("--workers", type=int, default=4, help="tensors converted in parallel (default 4)")
    c.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("inspect", help="format, step, layout, tensors, what is missing", epilog=EXIT_CODES)
    i.add_argument("path", help="a checkpoint, or with --keeper a running job's run directory")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.add_argument("--keeper", action="store_true", help="show what this machine's node keeper of the job holds in memory")
    i.add_argument("--job", default="local", help="with --keeper: the job id (torchrun's --rdzv-id; default: local)")
    i.add_argument("--node-id", default=None, help="with --keeper: KINTSUGI_NODE_ID of the node (several nodes on one host)")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="compare two checkpoints of any formats tensor by tensor", epilog=EXIT_CODES)
    v.add_argument("a", help="a checkpoint (any supported format)")
    v.add_argument("b", help="the checkpoint to compare it with")
    names(v)
    v.add_argument("--rtol", type=float, help="relative tolerance (default: one ulp of the coarser dtype)")
    v.add_argument("--atol", type=float, help="absolute tolerance (default: the coarser dtype's smallest normal)")
    v.add_argument("--allow-subset", action="store_true", help="tensors in only one of them are not differences")
    v.add_argument("--json", action="store_true", help="print one JSON object")
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
