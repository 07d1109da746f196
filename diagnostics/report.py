"""`kintsugi diagnose report RUN_DIR`: what the traces say, for a person and for a program.

Reads a finished, crashed or still-running run directory (each generation judged at its
own last heartbeat, as the monitor would have judged it live), plus any Flight Recorder
dumps, and returns ``report.json``'s content: one paragraph of what happened
(``what_happened``), the verdicts (with the live monitor's, if it saw more), the launcher's
actions, link probes, straggler scores and Megatron-style min/max per phase naming the
rank. ``summary`` is the terminal text; ``diagnostics.html`` draws the page.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from comms import UserError
from diagnostics.detect import Detector, suspect_str
from diagnostics.floor import sigma
from diagnostics.traces import ASYMMETRIC, Generation, generations

PHASES = ("data", "forward_backward", "optimizer") + ASYMMETRIC
# Most telling first: the verdict the paragraph leads with.
SEVERITY = ("crash", "hang_noncomm", "hang_comm", "slow_link", "straggler", "slow_comm")
WHAT = {"crash": "crashed at {when}", "hang_noncomm": "has hung the job since {when} (the others wait for it)",
        "hang_comm": "has hung since {when}, inside a collective every member entered",
        "straggler": "has slowed the job down since {when}", "slow_link": "has been slow since {when}",
        "slow_comm": "has had slow collectives since {when}"}
ADVICE = {
    "crash": "check that host's kernel log (dmesg: the OOM killer, segfaults) and the rank's log in RUN_DIR/logs; "
             "torchrun restarts crashed workers, and --diagnostics.policy=exclude drops a node that keeps failing",
    "hang_noncomm": "read the suspects' stacks (listed with the verdict) to see where they stopped; a process stopped "
                    "on purpose (SIGSTOP, a debugger) goes on with SIGCONT; --diagnostics.policy=restart or exclude "
                    "makes the launcher end the hang",
    "hang_comm": "every member entered the collective: suspect the network between the group's hosts (a NIC, a "
                 "switch port, a firewall dropping traffic); for NCCL jobs keep the Flight Recorder on "
                 "(comms.trace.flight_recorder_env)",
    "straggler": "look at that host's CPU (cgroup throttling, competing processes: top, cpu.stat), memory pressure, "
                 "GPU clocks and temperature; --diagnostics.policy=exclude drops the node if it persists",
    "slow_link": "measure that link (iperf3 between the two hosts), check its NIC speed and error counters (ethtool -S) "
                 "and any traffic shaping (tc qdisc show)",
    "slow_comm": "the monitor probes the group's links when it watches live; otherwise measure the links between "
                 "the group's hosts pairwise (iperf3)",
}


def build(run_dir, flight_recorder: list | None = None) -> tuple[dict, Detector]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; pass the train.run_dir of a job")
    det = Detector(run_dir, live=False, dump_stacks=False, flight_recorder=flight_recorder)
    det.poll()
    gens = [g for g in det.gens.values() if g.meta]
    if not gens:
        if not generations(run_dir):
            raise UserError(f"{str(run_dir)!r} has no traces under diagnostics/ and no Flight Recorder dumps; "
                            "run the job with diagnostics.trace = true")
        raise UserError(f"{str(run_dir)!r}: the trace directories hold no rank metadata (damaged); delete diagnostics/gen-* and rerun")
    verdicts = [v.to_json() for v in det.verdicts]
    known = {(v["generation"], v["kind"], json.dumps(v["suspects"], sort_keys=True)) for v in verdicts}
    for v in _jsonl(run_dir / "diagnostics" / "verdicts.jsonl"):  # the live monitor's, if it saw more
        k = (v.get("generation"), v.get("kind"), json.dumps(v.get("suspects"), sort_keys=True))
        if k not in known:
            known.add(k)
            verdicts.append(v)
    verdicts.sort(key=lambda v: (v.get("since") or v["time"], v["time"]))
    main = max(gens, key=lambda g: (len(g.complete_steps()), g.id))  # the generation with most steps
    rep = {
        "run_dir": str(run_dir),
        "generated": time.time(),
        "generations": [_gen_summary(g) for g in sorted(gens, key=lambda g: g.id)],
        "verdicts": verdicts,
        "actions": list(_jsonl(run_dir / "diagnostics" / "actions.jsonl")),
        "analysed_generation": main.id,
        "step_time_ms": _step_noise(main),
        "scores": scores(main),
        "phases": phase_minmax(main),
        "links_ms": {f"{s}->{d}": round(statistics.median(ms for _, ms in v), 3) for (s, d), v in sorted(main.links.items())},
        "probes": [a for per_gen in det.probes.values() for a in per_gen.values()],
    }
    rep["what_happened"] = what_happened(rep)
    return rep, det


def _gen_summary(g: Generation) -> dict:
    states = g.state.values()
    status = ("finished" if states and all(s.get("closed") and not s.get("error") for s in states)
              else "failed" if any(s.get("error") for s in states) else "running or killed")
    if g.source != "trace":
        status = "flight recorder dump"
    steps = g.complete_steps()
    return {"id": g.id, "source": g.source, "world": g.world, "ranks": len(g.meta),
            "hosts": sorted({str(m.get("host")) for m in g.meta.values()}), "complete_steps": len(steps),
            "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None,
            "start": min((m.get("started", 0) for m in g.meta.values()), default=0), "end": g.heartbeat(),
            "status": status, "damaged_lines": g.damaged, "dropped_records": sum(s.get("dropped", 0) for s in states)}


def _step_noise(g: Generation) -> dict:
    times = [g.step_time(s) for s in g.training_steps()]
    if len(times) < 3:
        return {}
    return {"median": round(1e3 * statistics.median(times), 3), "noise": round(1e3 * sigma(times), 3), "steps": len(times)}


def scores(g: Generation) -> dict:
    """Per rank: 1 - median share of the step the others waited for it (1.0 = never last)."""
    steps = g.complete_steps()[1:]
    if not steps:
        return {}
    return {r: round(1 - statistics.median(g.late_fraction(r, s) for s in steps), 4) for r in sorted(g.meta)}


def phase_minmax(g: Generation) -> dict:
    """Per phase (and the whole step): mean ms per rank, then min and max with their rank."""
    out = {}
    for name in ("step",) + PHASES:
        per_rank = {}
        for r, steps in g.steps.items():
            vals = [(x.end - x.start) if name == "step" else x.phases.get(name) for x in steps.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                per_rank[r] = 1e3 * statistics.mean(vals)
        if per_rank:
            lo, hi = min(per_rank, key=per_rank.get), max(per_rank, key=per_rank.get)
            out[name] = {"min_ms": round(per_rank[lo], 3), "min_rank": lo, "max_ms": round(per_rank[hi], 3), "max_rank": hi}
    return out


def what_happened(rep: dict) -> str:
    """One paragraph for a person: who, since when, how sure, what to do."""
    gens = rep["generations"]
    steps = sum(g["complete_steps"] for g in gens)
    noise = rep.get("step_time_ms") or {}
    pace = f" at a median {noise['median']:.1f} ms per step (step-to-step noise {noise['noise']:.1f} ms)" if noise else ""
    restarts = len([g for g in gens if g["source"] == "trace"]) - 1
    run = f"{len(gens)} generation(s) ({restarts} restart(s)), {steps} complete steps{pace}" if restarts > 0 \
        else f"{steps} complete steps{pace}"
    if not rep["verdicts"]:
        sc = rep["scores"]
        worst = f" The rank the others waited for most was rank {min(sc, key=sc.get)} (score {min(sc.values()):.3f}), within the job's own noise." if sc else ""
        return f"No fault found: {run}.{worst}"
    first = min(rep["verdicts"], key=lambda v: (SEVERITY.index(v["kind"]) if v["kind"] in SEVERITY else 99, v["time"]))
    who = ", ".join(suspect_str(s) for s in first["suspects"])
    since = first.get("since") or first["time"]
    ev = first["evidence"]
    step = ev.get("since_step") or ev.get("seq") and f"collective #{ev['seq']}"
    when = time.strftime("%H:%M:%S", time.localtime(since)) + (f" ({'step ' + str(step) if isinstance(step, int) else step})" if step else "")
    text = (f"{who[:1].upper() + who[1:]} {WHAT.get(first['kind'], first['kind'] + ' since {when}').format(when=when)}: "
            f"{ev.get('summary', '')}. "
            f"Confidence {first['confidence']:.2f}.")
    acted = [a for a in rep["actions"] if a["verdict"].get("kind") == first["kind"] and a["action"] != "warn"]
    if acted:
        text += f" The launcher acted: {acted[0]['action']} ({acted[0]['detail']})."
    later = [g for g in gens if g["source"] == "trace" and g["id"] > first["generation"]]
    if later:
        text += (f" The job restarted {len(later)} time(s) and reached step {later[-1]['last_step']} "
                 f"({later[-1]['status']}).")
    text += f" What to do: {ADVICE.get(first['kind'], 'see the evidence below')}."
    others = len(rep["verdicts"]) - 1
    return text + (f" {others} more verdict(s) below." if others else "")


def summary(rep: dict) -> str:
    lines = [rep["what_happened"], "", f"run {rep['run_dir']}: {len(rep['generations'])} generation(s)"]
    for g in rep["generations"]:
        lines.append(f"  gen {g['id']}: {g['ranks']}/{g['world']} ranks, {g['complete_steps']} steps, {g['status']}"
                     + (f", {g['damaged_lines']} damaged lines" if g["damaged_lines"] else ""))
    lines.append(f"verdicts: {len(rep['verdicts']) or 'none'}")
    for v in rep["verdicts"]:
        who = ", ".join(suspect_str(s) for s in v["suspects"])
        lines.append(f"  {v['kind']}: {who} (confidence {v['confidence']}) {v['evidence'].get('summary', '')}")
    for a in rep["actions"]:
        lines.append(f"  action {a['action']} on node {a['node']}: {a['detail']}")
    for p in rep["probes"]:
        lines.append(f"  link probe {p['id']} at step {p['step']} among ranks {p['ranks']}: {p['status']}"
                     + (f", slow {p['slow']}" if p.get("slow") else "") + (f", short of CPU {sorted(p['starved'])}" if p.get("starved") else ""))
    sc = rep["scores"]
    if sc:
        order = sorted(sc, key=sc.get)
        lines.append("straggler scores (1.0 = never waited for): worst " + ", ".join(f"rank {r} {sc[r]:.3f}" for r in order[:3])
                     + "; best " + ", ".join(f"rank {r} {sc[r]:.3f}" for r in order[::-1][:3]))
    for name, m in rep["phases"].items():
        lines.append(f"  {name:<17} min {m['min_ms']:9.2f} ms (rank {m['min_rank']})  max {m['max_ms']:9.2f} ms (rank {m['max_rank']})")
    return "\n".join(lines)


def _jsonl(p: Path):
    if not p.exists():
        return
    for line in p.read_text().splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue
