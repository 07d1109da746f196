"""Tokens/s of the default model (configs/tiny.toml) for each parallel layout, this machine.

    python benchmarks/train_throughput.py [--steps 20] [--json PATH] [--layouts ddp2,tp2]

Each layout is a real torchrun job; the figure is the median tokens/s over its steps after
the first 3 (start-up, allocator warm-up). Printed as a table and written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {
    "single": (1, []),
    "ddp2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "fsdp2": (2, []),
    "tp2": (2, ["--parallel.tp=2"]),
    "pp2": (2, ["--parallel.pp=2"]),
    "fsdp2xtp2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2"]),
    "zero1": (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=1"]),
    "zero2": (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=2"]),
    "zero3": (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=3"]),
}


def run(name: str, steps: int, workdir: Path) -> dict:
    nproc, flags = LAYOUTS[name]
    run_dir = workdir / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "trainer", "--config", str(ROOT / "configs" / "tiny.toml"), f"--train.run_dir={run_dir}",
           f"--train.steps={steps}", "--checkpoint.interval=0", "--snapshot.interval=0", "--diagnostics.inject=[]",
           "--train.progress=false", *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True)
    recs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    tps = [r["tokens_per_s"] for r in recs[3:]]
    return {"ranks": nproc, "tokens_per_s": statistics.median(tps), "step_ms": 1000 * statistics.median(r["step_time_s"] for r in recs[3:]),
            "final_loss": recs[-1]["loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layouts", default=",".join(LAYOUTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layouts.split(","):
            results[name] = run(name, args.steps, Path(tmp))
            r = results[name]
            print(f"{name:<10} {r['ranks']:>5} {r['tokens_per_s']:>12,.0f} {r['step_ms']:>10.0f} {r['final_loss']:>10.4f}", flush=True)
    header = f"\n| layout | ranks | tokens/s | step ms | loss at step {args.steps} |\n|---|---|---|---|---|"
    print(header)
    for name, r in results.items():
        print(f"| {name} | {r['ranks']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} | {r['final_loss']:.4f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu_count": os.cpu_count(), "steps": args.steps, "layouts": results}, indent=1))


if __name__ == "__main__":
    main()
