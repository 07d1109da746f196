"""How fast and how well diagnostics names real faults on real trainer jobs, how often it
cries wolf, and what tracing costs.

Three parts, each a list of real runs:

- faults: ``--faults`` of every fault kind, the layouts (FSDP2, DDP, TP, PP, DeepSpeed
  ZeRO-2) in turn, each a trainer job through `kintsugi launch` on the emulated cluster
  (tests/cluster.py), one rank per host, with the fault done from outside
  (tests/faults.py): a link halved with tc
  (200 -> 100 Mbit), a host's own port halved (a slow NIC), a host's CPU quota cut so it
  computes 20% slower (cgroup cpu.max), its rank stopped (SIGSTOP) or killed (SIGKILL), its
  traffic dropped (partition). A live Detector (the launcher monitor's class) watches; a
  case counts when its verdicts are exactly the expected kind naming the right host or
  link (a slow link may be preceded by the slow collectives it causes). The hosts' own
  monitors' verdicts are recorded beside it. The baseline for hangs is the process group's
  own timeout, the only thing that ends a hung job without Kintsugi, and it names nobody.
- clean runs: trainer jobs of mixed layouts on 2-4 hosts with no fault, and the default job
  (below); any verdict is a false positive.
- trace overhead, measured: the default job (``kintsugi launch --nproc-per-node 2 --config
  configs/tiny.toml``, FSDP2 on 2 ranks, no injected fault), two ways. In the job itself
  (``--cost-runs`` runs with ``--diagnostics.trace_cost_steps=5``: blocks of 5 steps traced
  and paused in turn, each block against its two neighbours, ``comms.trace_cost``):
  ``trace_overhead_pct`` = the median over those runs of each run's median. And as whole
  runs, ``--diagnostics.trace`` on and off, interleaved (off/on, on/off, ...), the median
  step time of each run from its metrics.jsonl: ``trace_overhead_run_pairs_pct`` = 100 x
  (median over pairs of on/off - 1); separate runs differ by more than tracing costs, which
  is why the in-job figure leads. The traced runs of the pairs are clean runs of the default
  job too.

Testbed jobs use the default job's model (configs/tiny.toml) with tests/job.toml's
settings (constant learning rate, a global batch of 12 for 2-4 data-parallel ranks), no
checkpoints until the end, no snapshots. Needs root (network namespaces, tc, cgroups).

    python benchmarks/detect_bench.py --json runs/bench/detect.json [--quick]
    # or in parts, merged: --faults 3 --clean 0 --pairs 0 --json a.json; --faults 3 --first 3 ...;
    # --faults 0 --clean 20 --pairs 5 --json c.json; then --merge a.json b.json c.json --json detect.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch.distributed as dist  # noqa: E402

import cluster  # noqa: E402
import faults  # noqa: E402
from diagnostics import Detector  # noqa: E402

# The default job's model on the testbed: steps of a few hundred ms, as in `make run`.
MODEL = ("--model.dim=128", "--model.max_seq_len=128", "--data.seq_len=128")
KINDS = ("link", "port", "cpu", "stop", "partition", "kill")
LAYOUTS = tuple(faults.LAYOUTS)
HANGS = ("stop", "partition")
# Steps per block of the in-job trace cost: the default job saves a snapshot every 5 steps,
# so each block holds one step after a save (left out) whichever block it is.
COST_BLOCK = 5


@dataclass
class Case:
    layout: str
    kind: str | None  # None: a clean run
    hosts: int

    def fault(self) -> faults.Fault:
        if self.kind is None:
            return faults.Fault(None)
        # Slowdowns after a history of 25 steps (the detector judges a window against the steps
        # before it); hangs and crashes once the job runs.
        step = 25 if self.kind in ("link", "port", "cpu") else 10
        return faults.Fault(self.kind, host=1, peer=2, step=step)

    def steps(self) -> int:
        return 60 if self.kind is None else 150 if self.kind in ("link", "port", "cpu") else 1000

    def __str__(self):
        return f"{self.layout} on {self.hosts} hosts: {self.fault()}"


def hosts_for(layout: str, kind: str | None) -> int:
    """A link or a host cut off needs 3 hosts to be told apart (tensor parallel: 4, a divisor
    of the 4 heads); the others 2."""
    if kind in ("link", "port", "partition"):
        return 4 if layout == "tp" else 3
    return 2


# Where a kind can be done: a slow NIC on FSDP2 and DeepSpeed (one per collective style).
KIND_LAYOUTS = {k: ("fsdp2", "deepspeed") if k == "port" else LAYOUTS for k in KINDS}
# Mixed layouts and sizes; the default job's clean runs come from the overhead part.
CLEAN_MIX = [("fsdp2", 2), ("ddp", 3), ("tp", 2), ("pp", 3), ("deepspeed", 2), ("fsdp2", 4), ("ddp", 2), ("tp", 4),
             ("pp", 2), ("deepspeed", 3)]


def fault_cases(per_kind: int, kinds: tuple, first: int = 0) -> list[Case]:
    """``per_kind`` faults of each kind, the layouts in turn (each kind starting at another
    one; ``first``: the round to start at, for a run split in parts), the kinds interleaved
    so that a run cut short has as many of each."""
    out = []
    for i in range(first, first + per_kind):
        for j, kind in enumerate(kinds):
            layouts = KIND_LAYOUTS[kind]
            layout = layouts[(i + j) % len(layouts)]
            out.append(Case(layout, kind, hosts_for(layout, kind)))
    return out


def clean_cases(n: int) -> list[Case]:
    return [Case(layout, None, hosts) for layout, hosts in (CLEAN_MIX * (n // len(CLEAN_MIX) + 1))[:n]]


@dataclass
class Row:
    case: str
    layout: str
    kind: str | None
    hosts: int
    named: bool
    verdicts: list
    monitors_agree: bool | None = None
    detail: dict = field(default_factory=dict)


class TestbedHarness:
    """A trainer job on a fresh emulated cluster per case, the fault done from outside."""

    name = "trainer on the emulated cluster (kintsugi launch per host, real faults)"

    def __init__(self, probe_every_s: float = 0.0, keep: Path | None = None):
        # Every job's settings beyond the model: periodic link probes when asked for (the
        # clean runs get them too, so their false positives count).
        self.extra = MODEL + ((f"--diagnostics.probe_every_s={probe_every_s}",) if probe_every_s else ())
        self.keep = keep  # where each job's run directory (its traces) is kept, for replaying rules

    def _done(self, root: Path):
        if self.keep and (root / "shared" / "run").is_dir():
            shutil.copytree(root / "shared" / "run", self.keep / root.name, ignore=shutil.ignore_patterns("checkpoints"))
        shutil.rmtree(root, ignore_errors=True)

    def run(self, case: Case, root: Path) -> Row:
        fault = case.fault()
        try:
            with cluster.Testbed(case.hosts, root=root) as tb:
                out = faults.run(tb, case.layout, fault, steps=case.steps(), extra=self.extra, rdzv=f"bench{os.getpid()}")
                want = fault.expected(tb)
        except RuntimeError as e:  # the job itself failed (counted as a miss, not a false positive)
            self._done(root)
            return Row(str(case), case.layout, case.kind, case.hosts, False, [], detail={"error": str(e)[-2000:]})
        row = Row(str(case), case.layout, case.kind, case.hosts, out.correct(want, fault), [v.line() for v in out.verdicts])
        step_s = out.step_s()
        row.detail = {"step_ms": round(1e3 * step_s, 1) if step_s else None, "fault_step": out.fault_step, **out.detail}
        share = faults.probe_share(out)
        if share:  # what the probes cost the job: rank 0's time in them
            row.detail["probe_pct"] = round(100 * share, 2)
        if want:
            seen = {}
            for m in out.monitors:
                if m["kind"] == want[0]:
                    seen.setdefault(m["by"], faults.suspects(m["suspects"]))
            row.monitors_agree = bool(seen) and all(s == want[1] for s in seen.values())
        if row.named and case.kind in HANGS:  # from the fault to the verdict
            v = next(v for v in out.verdicts if v.kind == want[0])
            row.detail["detect_s"] = round(v.time - out.fault_time, 2)
            row.detail["step_multiple"] = round((v.time - out.fault_time) / step_s, 1) if step_s else None
        elif case.kind == "cpu":  # from the first slowed step to the window that named it; what the quota did
            if row.named:
                v = next(v for v in out.verdicts if v.kind == "straggler")
                row.detail["detect_steps"] = v.evidence["steps"][1] - out.fault_step
            row.detail["job_slowdown_pct"] = round(100 * (faults.job_slowdown(out) or 0), 1)
            row.detail["host_slowdown_pct"] = round(100 * (faults.host_slowdown(out) or 0), 1)
        elif case.kind in ("link", "port"):
            slow = faults.job_slowdown(out)
            row.detail["job_slowdown_pct"] = round(100 * slow, 1) if slow is not None else None
        if case.kind == "kill" and row.named:
            row.detail["detect_s"] = round(next(v for v in out.verdicts if v.kind == "crash").time - out.fault_time, 2)
        self._done(root)
        return row


def run_cases(harness, cases: list[Case], tmp: Path, what: str) -> list[Row]:
    rows = []
    for i, case in enumerate(cases):
        t0 = time.time()
        row = harness.run(case, tmp / f"{what}{i}")
        rows.append(row)
        d = row.detail
        note = (f"{d['detect_s']:.1f} s" + (f" ({d['step_multiple']} steps of {d['step_ms']:.0f} ms)" if d.get("step_multiple") else "")
                if "detect_s" in d
                else f"{d['detect_steps']} steps (host compute {d['host_slowdown_pct']:+.0f}%, job {d['job_slowdown_pct']:+.0f}%)"
                if "detect_steps" in d
                else f"job {d['job_slowdown_pct']:+.0f}%" if d.get("job_slowdown_pct") is not None else "")
        if d.get("probe_pct"):
            note += f" (probes {d['probe_pct']:.1f}% of the job's time)"
        status = ("JOB FAILED" if "error" in d else ("named" if row.named else "MISSED") if case.kind
                  else ("clean" if row.named else "FALSE POSITIVE"))
        print(f"  {str(case):<62} {status:<14} {note}  [{time.time() - t0:.0f} s]"
              + ("" if row.named else "  got: " + "; ".join(row.verdicts)), flush=True)
    return rows


def summarize(rows: list[Row]) -> dict:
    faults_ = [r for r in rows if r.kind]
    hang = [r.detail["detect_s"] for r in faults_ if r.kind in HANGS and "detect_s" in r.detail]
    mult = [r.detail["step_multiple"] for r in faults_ if r.kind in HANGS and r.detail.get("step_multiple")]
    strag = [r.detail["detect_steps"] for r in faults_ if "detect_steps" in r.detail]
    links = [r.named for r in faults_ if r.kind in ("link", "port")]
    by_kind = {k: f"{sum(r.named for r in faults_ if r.kind == k)}/{sum(r.kind == k for r in faults_)}" for k in KINDS
               if any(r.kind == k for r in faults_)}
    return {"hang_detect_s": statistics.median(hang) if hang else None,
            "hang_detect_s_max": max(hang) if hang else None,
            "hang_detect_step_multiple": statistics.median(mult) if mult else None,
            "straggler_detect_steps": statistics.median(strag) if strag else None,
            "straggler_detect_steps_max": max(strag) if strag else None,
            "accuracy": round(sum(r.named for r in faults_) / len(faults_), 3) if faults_ else None,
            "accuracy_by_kind": by_kind, "slow_link_named": all(links) if links else None, "faults": len(faults_),
            "monitors_agree": sum(bool(r.monitors_agree) for r in faults_)}


# ---- the default job: trace overhead, and clean runs -----------------------------------
def default_job(run_dir: Path, steps: int, trace: bool, cost_k: int = 0) -> dict:
    """One run of `kintsugi launch --nproc-per-node 2 --config configs/tiny.toml` without the
    crash drill; its median step time (steps after the 3rd), the verdicts on it (the
    launcher's monitor's and a report's) and, with ``cost_k``, the trace's cost measured in
    the job (blocks of ``cost_k`` steps)."""
    cmd = [sys.executable, "-m", "launch", "launch", "--nproc-per-node", "2", "--config", str(ROOT / "configs" / "tiny.toml"),
           f"--train.run_dir={run_dir}", f"--train.steps={steps}", "--diagnostics.inject=[]", "--train.progress=false",
           f"--diagnostics.trace={'true' if trace else 'false'}", f"--diagnostics.trace_cost_steps={cost_k}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the default job failed ({' '.join(cmd)}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_time_s"] for r in recs if "step_time_s" in r]  # step records (checkpoint events are there too)
    out = {"step_s": statistics.median(steps[3:]), "verdicts": []}
    if cost_k:
        out["cost"] = next((r for r in recs if r.get("event") == "trace_cost"), None)
        return out
    if trace:
        live = [json.loads(x) for x in (run_dir / "diagnostics" / "verdicts.jsonl").read_text().splitlines()] \
            if (run_dir / "diagnostics" / "verdicts.jsonl").exists() else []
        offline = Detector(run_dir, live=False, dump_stacks=False).poll()
        out["verdicts"] = [f"{v['kind']} (monitor)" for v in live] + [v.line() for v in offline]
    return out


def overhead(pairs: int, steps: int, tmp: Path) -> dict:
    """``pairs`` interleaved on/off pairs of the default job: per pair its step times and the
    traced run's verdicts (false positives)."""
    out = []
    for i in range(pairs):
        runs = {}
        for trace in ((False, True) if i % 2 == 0 else (True, False)):
            runs[trace] = default_job(tmp / f"default{i}-{'on' if trace else 'off'}", steps, trace)
        out.append({"run": f"default job {i}", "step_ms_off": round(1e3 * runs[False]["step_s"], 2),
                    "step_ms_on": round(1e3 * runs[True]["step_s"], 2), "verdicts": runs[True]["verdicts"]})
        p = out[-1]
        print(f"  pair {i}: step {p['step_ms_off']:.1f} ms off, {p['step_ms_on']:.1f} ms on "
              f"({100 * (p['step_ms_on'] / p['step_ms_off'] - 1):+.1f}%)" + "".join(f"; FALSE POSITIVE {v}" for v in p["verdicts"]),
              flush=True)
    return out


def in_job_cost(runs: int, steps: int, tmp: Path) -> list[dict]:
    """``runs`` runs of the default job, each weighing its trace against its own paused steps."""
    out = []
    for i in range(runs):
        cost = default_job(tmp / f"cost{i}", steps, True, cost_k=COST_BLOCK)["cost"]
        if cost is None:
            raise SystemExit(f"detect_bench: the default job's {steps} steps gave no trace_cost record; raise --cost-steps")
        out.append(cost)
        print(f"  run {i}: {cost['pct']:+.2f}% ({cost['pairs']} blocks, {cost['low_pct']:+.1f}% to {cost['high_pct']:+.1f}%; "
              f"{cost['traced_ms']:.1f} ms traced, {cost['untraced_ms']:.1f} ms paused)", flush=True)
    return out


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def results(fault_rows: list[Row], clean_rows: list[Row], pairs: list[dict], costs: list[dict]) -> dict:
    """The headline figures from every row (of one run or of several merged)."""
    ratios = [p["step_ms_on"] / p["step_ms_off"] for p in pairs]
    failed = [r.case for r in clean_rows if "error" in r.detail]
    probes = [r.detail["probe_pct"] for r in clean_rows if "probe_pct" in r.detail]
    return {**summarize(fault_rows), "baseline_hang_s": dist.constants.default_pg_timeout.total_seconds(),
            "false_positives": sum(len(r.verdicts) for r in clean_rows) + sum(len(p["verdicts"]) for p in pairs),
            "clean_runs": len(clean_rows) - len(failed) + len(pairs),
            "failed_jobs": failed + [r.case for r in fault_rows if "error" in r.detail],
            "probe_pct_clean": statistics.median(probes) if probes else None,
            "trace_overhead_pct": statistics.median(c["pct"] for c in costs) if costs else None,
            "trace_overhead_runs": [c["pct"] for c in costs],
            "trace_overhead_run_pairs_pct": round(100 * (statistics.median(ratios) - 1), 2) if ratios else None,
            "trace_overhead_pairs": [round(100 * (r - 1), 2) for r in ratios],
            "step_ms_off": statistics.median(p["step_ms_off"] for p in pairs) if pairs else None,
            "step_ms_on": statistics.median(p["step_ms_on"] for p in pairs) if pairs else None}


def print_table(res: dict):
    hang = (f"{res['hang_detect_s']:.1f} s ({res['hang_detect_step_multiple']} steps), max {res['hang_detect_s_max']:.1f} s"
            if res["hang_detect_s"] is not None else "-")
    strag = (f"{res['straggler_detect_steps']} steps, max {res['straggler_detect_steps_max']}"
             if res["straggler_detect_steps"] is not None else "-")
    over = (f"{res['trace_overhead_pct']:+.2f}% (median of {len(res['trace_overhead_runs'])} runs; each "
            f"{', '.join(f'{x:+.2f}' for x in res['trace_overhead_runs'])}%)" if res["trace_overhead_pct"] is not None else "-")
    pairs = (f"{res['trace_overhead_run_pairs_pct']:+.2f}% (median of {len(res['trace_overhead_pairs'])} pairs, "
             f"{min(res['trace_overhead_pairs']):+.1f}% to {max(res['trace_overhead_pairs']):+.1f}%; step {res['step_ms_off']} ms off)"
             if res["trace_overhead_run_pairs_pct"] is not None else "-")
    table = [("hang named after (median)", hang, "<= 10 s"),
             ("baseline: process-group timeout", f"{res['baseline_hang_s']:.0f} s, names nobody", ""),
             ("20% slower host named after (median)", strag, "<= 20 steps"),
             ("accuracy (right kind and host/link)", f"{res['accuracy']} of {res['faults']} faults", "1.0"),
             ("  per kind", " ".join(f"{k} {v}" for k, v in res["accuracy_by_kind"].items()), ""),
             ("slow link (half bandwidth) named", "-" if res["slow_link_named"] is None else str(res["slow_link_named"]), "yes"),
             ("false positives", f"{res['false_positives']} over {res['clean_runs']} clean runs", "0"),
             ("trace overhead (default job, in-job)", over, "<= 2%"),
             ("  whole runs on/off, interleaved", pairs, "")]
    if res.get("probe_every_s"):
        price = (f"; they took a median {res['probe_pct_clean']:.1f}% of a clean job's time"
                 if res.get("probe_pct_clean") is not None else "")
        table.insert(0, ("periodic link probes (probe_every_s)", f"every {res['probe_every_s']} s{price}", ""))
    w = max(len(v) for _n, v, _t in table)
    print(f"\n| {'metric':<38} | {'measured':<{w}} | target |\n|{'-' * 40}|{'-' * (w + 2)}|--------|")
    for name, val, target in table:
        print(f"| {name:<38} | {val:<{w}} | {target:<6} |")
    print("load (uptime) around each part:\n  " + "\n  ".join(res["load"]))


def merge(paths: list[Path]) -> dict:
    """One result from the JSONs of several invocations (every row of each, nothing chosen)."""
    parts = [json.loads(p.read_text()) for p in paths]
    probe = {part.get("probe_every_s", 0.0) for part in parts}
    fault_rows = [Row(**r) for part in parts for r in part["fault_rows"]]
    clean_rows = [Row(**r) for part in parts for r in part["clean_rows"]]
    pairs = [p for part in parts for p in part["default_job_pairs"]]
    costs = [c for part in parts for c in part.get("trace_cost_runs", [])]
    return {**results(fault_rows, clean_rows, pairs, costs), "harness": parts[0]["harness"],
            "probe_every_s": probe.pop() if len(probe) == 1 else sorted(probe),
            "quick": any(part["quick"] for part in parts), "wall_s": round(sum(part["wall_s"] for part in parts), 1),
            "load": [x for part in parts for x in part["load"]], "parts": [str(p) for p in paths],
            "fault_rows": [vars(r) for r in fault_rows], "clean_rows": [vars(r) for r in clean_rows], "default_job_pairs": pairs,
            "trace_cost_runs": costs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--faults", type=int, default=15, help="injected faults of each kind (default 15)")
    ap.add_argument("--first", type=int, default=0, help="the round of faults to start at (a run split in parts: the sum of the earlier parts' --faults)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"fault kinds, comma-separated (default {','.join(KINDS)}; '' for none)")
    ap.add_argument("--clean", type=int, default=20, help="clean runs of mixed layouts on the testbed (default 20)")
    ap.add_argument("--pairs", type=int, default=5, help="on/off pairs of the default job (default 5)")
    ap.add_argument("--steps", type=int, default=60, help="steps per default-job run of the pairs (default 60)")
    ap.add_argument("--cost-runs", type=int, default=3, help="default-job runs that weigh the trace in the job (default 3)")
    ap.add_argument("--cost-steps", type=int, default=600, help="steps per such run (default 600: 120 blocks of 5)")
    ap.add_argument("--probe-every", type=float, default=0.0, metavar="S",
                    help="diagnostics.probe_every_s for every testbed job, faults and clean runs (default 0: off, the default)")
    ap.add_argument("--keep", type=Path, metavar="DIR",
                    help="keep each testbed job's run directory (traces, metrics; no checkpoints) under DIR, to replay the rules on")
    ap.add_argument("--quick", action="store_true", help="one fault per kind, 2 clean runs, 1 on/off pair of 20 steps, 1 in-job cost run of 40 (smoke test)")
    ap.add_argument("--merge", type=Path, nargs="+", help="merge the --json files of earlier invocations (a run split in parts)")
    a = ap.parse_args()
    if a.merge:
        res = merge(a.merge)
        print_table(res)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=str))
        return
    kinds = tuple(k for k in a.kinds.split(",") if k)
    if set(kinds) - set(KINDS):
        raise SystemExit(f"detect_bench: --kinds: unknown {sorted(set(kinds) - set(KINDS))}; choose from {','.join(KINDS)}")
    if a.quick:
        a.faults, a.clean, a.pairs, a.steps, a.cost_runs, a.cost_steps = 1, 2, 1, 20, 1, 40
    reason = cluster.unavailable()
    if reason:
        raise SystemExit(f"detect_bench: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="kintsugi-detect-bench-"))
    t0 = time.time()
    loads = [load()]
    harness = TestbedHarness(a.probe_every, a.keep)
    fault_rows = clean_rows = pairs = costs = []
    if a.faults and kinds:
        cases = fault_cases(a.faults, kinds, a.first)
        print(f"{len(cases)} injected faults ({harness.name}):", flush=True)
        fault_rows = run_cases(harness, cases, tmp, "fault")
        loads.append(load())
    if a.clean:
        print(f"{a.clean} clean runs on the testbed:", flush=True)
        clean_rows = run_cases(harness, clean_cases(a.clean), tmp, "clean")
        loads.append(load())
    if a.pairs:
        print(f"trace overhead and clean runs of the default job (kintsugi launch, configs/tiny.toml, FSDP2 on 2 ranks), "
              f"{a.pairs} interleaved on/off pair(s):", flush=True)
        pairs = overhead(a.pairs, a.steps, tmp)
        loads.append(load())
    if a.cost_runs:
        print(f"trace overhead in the default job itself ({a.cost_runs} run(s) of {a.cost_steps} steps, blocks of "
              f"{COST_BLOCK} traced and paused in turn):", flush=True)
        costs = in_job_cost(a.cost_runs, a.cost_steps, tmp)
        loads.append(load())
    shutil.rmtree(tmp, ignore_errors=True)
    res = {**results(fault_rows, clean_rows, pairs, costs), "harness": harness.name, "quick": a.quick, "probe_every_s": a.probe_every,
           "wall_s": round(time.time() - t0, 1), "load": loads,
           "fault_rows": [vars(r) for r in fault_rows], "clean_rows": [vars(r) for r in clean_rows], "default_job_pairs": pairs,
            "trace_cost_runs": costs}
    print_table(res)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
