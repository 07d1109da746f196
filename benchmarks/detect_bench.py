"""How fast and how well diagnostics names faults, how often it cries wolf, what tracing costs.

Three parts, each a list of real runs:

- faults: each ``Case`` is run by a harness and watched live by the same Detector the
  launcher runs; a case counts when its verdicts are exactly the expected kind and suspects.
  Phase 1's harness is the drill (``diagnostics/drill.py``: real gloo processes whose faults
  are injected); the testbed's harness (the trainer on the emulated cluster: tc-shaped
  links, cgroup CPU quotas, SIGSTOP, dropped traffic, kill) plugs in as another ``Harness``
  with the same cases' expectations. The baseline is the process group's own timeout, the
  only thing that ends a hung job without Kintsugi (and names nobody).
- clean runs: the drill on 2-4 ranks and the default job (``kintsugi launch --config
  configs/tiny.toml``, FSDP2 on 2 ranks, no injected fault); any verdict is a false positive.
- trace overhead, measured: the default job with ``--diagnostics.trace`` on and off,
  interleaved (off/on, on/off, ...), the median step time of each run from its
  metrics.jsonl; ``trace_overhead_pct`` = 100 x (median over pairs of on/off - 1). Those
  traced runs are clean runs of the default job too.

    python benchmarks/detect_bench.py --json runs/bench/detect.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

from diagnostics import Detector  # noqa: E402
from diagnostics.drill import run_local  # noqa: E402
from diagnostics.traces import Generation, generations  # noqa: E402

HANGS = ("hang_noncomm", "hang_comm")


@dataclass
class Case:
    world: int
    fault: str  # what is done to the job: a drill injection spec here, a testbed action in phase 2
    kind: str  # the verdict expected
    suspects: set  # {("rank", r) | ("link", s, d) | ("group", *ranks)}
    onset: int = 12  # the step the fault begins at (stragglers' detection delay is counted from it)
    quick: bool = True  # part of --quick


# Slowdowns begin at step 12: the detector judges a window against the window's worth of
# steps before it, so a fault in the job's first steps reads as "slow from the start".
CASES = [
    Case(2, "hang:rank=1,step=10", "hang_noncomm", {("rank", 1)}),
    Case(3, "hang:rank=2,step=10", "hang_noncomm", {("rank", 2)}),
    Case(2, "slow:rank=1,pct=20,from=12", "straggler", {("rank", 1)}),
    Case(3, "slow:rank=0,pct=20,from=12", "straggler", {("rank", 0)}),
    Case(2, "crash:rank=0,step=10", "crash", {("rank", 0)}),
    Case(4, "slowlink:src=1,dst=2,ms=20", "slow_link", {("link", 1, 2)}),
    Case(4, "hang:rank=0,step=10", "hang_noncomm", {("rank", 0)}, quick=False),
    Case(2, "commhang:rank=1,step=10", "hang_comm", {("group", 0, 1)}, quick=False),
    Case(4, "slow:rank=2,pct=20,from=12", "straggler", {("rank", 2)}, quick=False),
    Case(2, "slow:rank=0,pct=20,from=12", "straggler", {("rank", 0)}, quick=False),
    Case(4, "slow:rank=3,pct=50,from=12", "straggler", {("rank", 3)}, quick=False),
    Case(3, "crash:rank=2,step=10", "crash", {("rank", 2)}, quick=False),
    Case(3, "slowlink:src=0,dst=*,ms=20", "slow_link", {("rank", 0)}, quick=False),
    Case(3, "slowcomm:rank=1,ms=20,from=12", "slow_comm", {("group", 0, 1, 2)}, quick=False),
    Case(4, "crash:rank=3,step=12", "crash", {("rank", 3)}, quick=False),
    Case(3, "hang:rank=1,step=12", "hang_noncomm", {("rank", 1)}, quick=False),
]


@dataclass
class Outcome:
    verdicts: list
    run_dir: Path
    detail: dict = field(default_factory=dict)


class DrillHarness:
    """Phase 1: the drill, faults injected into real gloo processes, watched live."""

    name = "drill (gloo, injected faults)"

    def run(self, case: Case, run_dir: Path) -> Outcome:
        # 50 ms of emulated compute per step: up to 4 ranks on a 2-core machine stay off the
        # CPU's limit, where a rank sleeping longer only frees the CPU for the others.
        verdicts, _ = run_local(case.world, run_dir, inject=[case.fault], steps=45, compute_ms=50, watch_s=60, stop_on=HANGS)
        return Outcome(verdicts, run_dir)

    def clean(self, i: int, run_dir: Path) -> Outcome:
        world = (2, 3, 4)[i % 3]
        verdicts, _ = run_local(world, run_dir, steps=40, compute_ms=10)
        return Outcome(verdicts, run_dir, {"world": world})


def _suspects(v) -> set:
    out = set()
    for s in v.suspects:
        out.add(("link", *s["link"]) if "link" in s else ("group", *s["group"]) if "group" in s else ("rank", s["rank"]))
    return out


def detection(harness, cases: list[Case], tmp: Path) -> dict:
    rows, hang_s, hang_mult, straggler_steps, correct, links = [], [], [], [], 0, []
    for i, case in enumerate(cases):
        out = harness.run(case, tmp / f"fault{i}")
        ok = [(v.kind, _suspects(v)) for v in out.verdicts] == [(case.kind, case.suspects)]
        correct += ok
        detail = ""
        if case.kind == "slow_link":
            links.append(ok)
        if ok and case.kind in HANGS:  # from the hung rank's last finished step to the verdict
            gen = Generation(generations(out.run_dir)[-1])
            gen.update()
            hung = min(r for _k, r, *_ in case.suspects) if case.kind == "hang_noncomm" else 0
            onset = max(x.end for x in gen.steps[hung].values())
            typical = out.verdicts[0].evidence["typical_step_s"]
            hang_s.append(out.verdicts[0].time - onset)
            hang_mult.append(hang_s[-1] / typical if typical else float("nan"))
            detail = f"{hang_s[-1]:.1f} s after the hang ({hang_mult[-1]:.0f} steps of {1e3 * typical:.0f} ms)"
        elif ok and case.kind == "straggler":
            straggler_steps.append(out.verdicts[0].evidence["steps"][1] - case.onset + 1)
            detail = f"{straggler_steps[-1]} steps after it slowed"
        rows.append({"fault": case.fault, "world": case.world, "expected": case.kind, "named": ok, "detail": detail,
                     "verdicts": [v.line() for v in out.verdicts]})
        print(f"  {case.fault:<32} world {case.world}  {'named' if ok else 'MISSED'}  {detail}"
              + ("" if ok else "  got: " + "; ".join(v.line() for v in out.verdicts)), flush=True)
    return {"rows": rows, "hang_detect_s": statistics.median(hang_s) if hang_s else None,
            "hang_detect_step_multiple": round(statistics.median(hang_mult), 1) if hang_mult else None,
            "straggler_detect_steps": statistics.median(straggler_steps) if straggler_steps else None,
            "accuracy": correct / len(cases), "faults": len(cases), "slow_link_named": bool(links) and all(links)}


def clean(harness, n: int, tmp: Path) -> tuple[int, list]:
    fp, rows = 0, []
    for i in range(n):
        out = harness.clean(i, tmp / f"clean{i}")
        fp += len(out.verdicts)
        rows.append({"run": f"drill world {out.detail.get('world')}", "verdicts": [v.line() for v in out.verdicts]})
        for v in out.verdicts:
            print(f"  clean drill run {i}: FALSE POSITIVE {v.line()}", flush=True)
    return fp, rows


# ---- the default job: trace overhead, and clean runs -----------------------------------
def default_job(run_dir: Path, steps: int, trace: bool) -> dict:
    """One run of `kintsugi launch --nproc-per-node 2 --config configs/tiny.toml` without the
    crash drill; its median step time (steps after the 3rd) and the verdicts on it (the
    launcher's monitor's and a report's)."""
    cmd = [sys.executable, "-m", "launch", "launch", "--nproc-per-node", "2", "--config", str(ROOT / "configs" / "tiny.toml"),
           f"--train.run_dir={run_dir}", f"--train.steps={steps}", "--diagnostics.inject=[]", "--train.progress=false",
           f"--diagnostics.trace={'true' if trace else 'false'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the default job failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {"step_s": statistics.median(r["step_time_s"] for r in recs[3:]), "verdicts": []}
    if trace:
        live = [json.loads(x) for x in (run_dir / "diagnostics" / "verdicts.jsonl").read_text().splitlines()] \
            if (run_dir / "diagnostics" / "verdicts.jsonl").exists() else []
        offline = Detector(run_dir, live=False, dump_stacks=False).poll()
        out["verdicts"] = [f"{v['kind']} (monitor)" for v in live] + [v.line() for v in offline]
    return out


def overhead(pairs: int, steps: int, tmp: Path) -> dict:
    ratios, on_s, off_s, fp, rows = [], [], [], 0, []
    for i in range(pairs):
        runs = {}
        for trace in ((False, True) if i % 2 == 0 else (True, False)):
            runs[trace] = default_job(tmp / f"default{i}-{'on' if trace else 'off'}", steps, trace)
        ratios.append(runs[True]["step_s"] / runs[False]["step_s"])
        on_s.append(runs[True]["step_s"])
        off_s.append(runs[False]["step_s"])
        fp += len(runs[True]["verdicts"])
        rows.append({"run": f"default job {i}", "verdicts": runs[True]["verdicts"]})
        print(f"  pair {i}: step {1e3 * off_s[-1]:.1f} ms off, {1e3 * on_s[-1]:.1f} ms on ({100 * (ratios[-1] - 1):+.1f}%)"
              + "".join(f"; FALSE POSITIVE {v}" for v in runs[True]["verdicts"]), flush=True)
    return {"trace_overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
            "trace_overhead_pairs": [round(100 * (r - 1), 2) for r in ratios],
            "step_ms_off": round(1e3 * statistics.median(off_s), 2), "step_ms_on": round(1e3 * statistics.median(on_s), 2),
            "default_job_false_positives": fp, "default_job_runs": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="a few runs of each (smoke test)")
    ap.add_argument("--clean-runs", type=int, default=None, help="clean drill runs (default 21, quick 2)")
    ap.add_argument("--pairs", type=int, default=None, help="on/off pairs of the default job (default 5, quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="steps per default-job run (default 60, quick 20)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kintsugi-detect-bench-"))
    t0 = time.time()
    harness = DrillHarness()
    cases = [c for c in CASES if c.quick or not a.quick]
    print(f"injected faults ({harness.name}):", flush=True)
    det = detection(harness, cases, tmp)
    n_clean = a.clean_runs if a.clean_runs is not None else (2 if a.quick else 21)
    print(f"{n_clean} clean drill runs:", flush=True)
    fp, clean_rows = clean(harness, n_clean, tmp)
    pairs = a.pairs or (1 if a.quick else 5)
    print(f"trace overhead and clean runs of the default job (kintsugi launch, configs/tiny.toml, FSDP2 on 2 ranks), "
          f"{pairs} interleaved on/off pair(s):", flush=True)
    ov = overhead(pairs, a.steps or (20 if a.quick else 60), tmp)
    res = {"hang_detect_s": det["hang_detect_s"], "hang_detect_step_multiple": det["hang_detect_step_multiple"],
           "baseline_hang_s": dist.constants.default_pg_timeout.total_seconds(),
           "straggler_detect_steps": det["straggler_detect_steps"], "accuracy": det["accuracy"],
           "slow_link_named": det["slow_link_named"], "false_positives": fp + ov["default_job_false_positives"],
           "faults": det["faults"], "clean_runs": n_clean + pairs, "trace_overhead_pct": ov["trace_overhead_pct"],
           "trace_overhead_pairs": ov["trace_overhead_pairs"], "step_ms_off": ov["step_ms_off"], "step_ms_on": ov["step_ms_on"],
           "harness": harness.name, "quick": a.quick, "wall_s": round(time.time() - t0, 1),
           "fault_rows": det["rows"], "clean_rows": clean_rows + ov["default_job_runs"]}
    hang = f"{res['hang_detect_s']:.1f} s ({res['hang_detect_step_multiple']} steps)" if res["hang_detect_s"] else "-"
    table = [("hang named after (median)", hang, "<= 10 s"),
             ("baseline: process-group timeout", f"{res['baseline_hang_s']:.0f} s, names nobody", ""),
             ("20% straggler named after (median)", f"{res['straggler_detect_steps']} steps", "<= 20 steps"),
             ("accuracy (right kind and suspect)", f"{res['accuracy']:.2f} of {res['faults']} faults", "1.0"),
             ("slow link named", str(res["slow_link_named"]), "yes"),
             ("false positives", f"{res['false_positives']} over {res['clean_runs']} clean runs", "0"),
             ("trace overhead (default job, on/off)", f"{res['trace_overhead_pct']:+.2f}% (step {ov['step_ms_off']} ms off)", "<= 2%")]
    print(f"\n| {'metric':<38} | {'measured':<36} | target |\n|{'-' * 40}|{'-' * 38}|--------|")
    for name, val, target in table:
        print(f"| {name:<38} | {val:<36} | {target:<6} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
