"""`kintsugi diagnose report RUN_DIR`: what the traces say, for a person.

Reads a finished, crashed or still-running run directory (each generation judged at its
own last heartbeat), then writes ``report.json`` and a self-contained ``report.html``
(matplotlib figures embedded as base64 PNG) into RUN_DIR/diagnostics/ and returns the
terminal summary: verdicts, the worst and best ranks by straggler score, and Megatron-style
min/max lines per phase naming the rank.
"""
from __future__ import annotations

import base64
import html
import io
import json
import statistics
from pathlib import Path

from comms import UserError
from diagnostics.detect import Detector
from diagnostics.traces import Generation, generations

PHASES = ("data", "forward_backward", "optimizer", "checkpoint")


def build(run_dir) -> tuple[dict, Detector]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {str(run_dir)!r} does not exist; pass the train.run_dir of a job")
    if not generations(run_dir):
        raise UserError(f"{str(run_dir)!r} has no traces under diagnostics/; run the job with diagnostics.trace = true")
    det = Detector(run_dir, live=False, dump_stacks=False)
    det.poll()
    gens = [g for g in det.gens.values() if g.meta]
    if not gens:
        raise UserError(f"{str(run_dir)!r}: the trace directories hold no rank metadata (damaged); delete diagnostics/gen-* and rerun")
    verdicts = [v.to_json() for v in det.verdicts]
    known = {(v["generation"], v["kind"], json.dumps(v["suspects"], sort_keys=True)) for v in verdicts}
    for v in _jsonl(run_dir / "diagnostics" / "verdicts.jsonl"):  # the live monitor's, if it saw more
        k = (v.get("generation"), v.get("kind"), json.dumps(v.get("suspects"), sort_keys=True))
        if k not in known:
            known.add(k)
            verdicts.append(v)
    main = max(gens, key=lambda g: (len(g.complete_steps()), g.id))  # the generation with most steps
    return {
        "run_dir": str(run_dir),
        "generations": [_gen_summary(g) for g in gens],
        "verdicts": verdicts,
        "actions": list(_jsonl(run_dir / "diagnostics" / "actions.jsonl")),
        "analysed_generation": main.id,
        "scores": scores(main),
        "phases": phase_minmax(main),
        "links_ms": {f"{s}->{d}": round(statistics.median(ms for _, ms in v), 3) for (s, d), v in sorted(main.links.items())},
    }, det


def _gen_summary(g: Generation) -> dict:
    states = g.state.values()
    status = ("finished" if states and all(s.get("closed") and not s.get("error") for s in states)
              else "failed" if any(s.get("error") for s in states) else "running or killed")
    return {"id": g.id, "world": g.world, "ranks": len(g.meta), "hosts": sorted({m.get("host") for m in g.meta.values()}),
            "complete_steps": len(g.complete_steps()), "status": status, "damaged_lines": g.damaged,
            "dropped_records": sum(s.get("dropped", 0) for s in states)}


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
            vals = [(e - s) if name == "step" else ph.get(name) for s, e, ph in steps.values()]
            vals = [v for v in vals if v is not None]
            if vals:
                per_rank[r] = 1e3 * statistics.mean(vals)
        if per_rank:
            lo, hi = min(per_rank, key=per_rank.get), max(per_rank, key=per_rank.get)
            out[name] = {"min_ms": round(per_rank[lo], 3), "min_rank": lo, "max_ms": round(per_rank[hi], 3), "max_rank": hi}
    return out


def summary(rep: dict) -> str:
    lines = [f"run {rep['run_dir']}: {len(rep['generations'])} generation(s)"]
    for g in rep["generations"]:
        lines.append(f"  gen {g['id']}: {g['ranks']}/{g['world']} ranks, {g['complete_steps']} steps, {g['status']}"
                     + (f", {g['damaged_lines']} damaged lines" if g["damaged_lines"] else ""))
    lines.append(f"verdicts: {len(rep['verdicts']) or 'none'}")
    for v in rep["verdicts"]:
        who = ", ".join(_who(s) for s in v["suspects"])
        lines.append(f"  {v['kind']}: {who} (confidence {v['confidence']}) {v['evidence'].get('summary', '')}")
    for a in rep["actions"]:
        lines.append(f"  action {a['action']} on node {a['node']}: {a['detail']}")
    sc = rep["scores"]
    if sc:
        order = sorted(sc, key=sc.get)
        lines.append("straggler scores (1.0 = never waited for): worst " + ", ".join(f"rank {r} {sc[r]:.3f}" for r in order[:3])
                     + "; best " + ", ".join(f"rank {r} {sc[r]:.3f}" for r in order[::-1][:3]))
    for name, m in rep["phases"].items():
        lines.append(f"  {name:<17} min {m['min_ms']:9.2f} ms (rank {m['min_rank']})  max {m['max_ms']:9.2f} ms (rank {m['max_rank']})")
    return "\n".join(lines)


def _who(s: dict) -> str:
    if "link" in s:
        return f"link {s['link'][0]}->{s['link'][1]}"
    if "group" in s:
        return f"group {s['group']}"
    return f"rank {s['rank']}" + (f" ({s['role']})" if s.get("role") else "") + f" node {s.get('node')}"


def _jsonl(p: Path):
    if not p.exists():
        return
    for line in p.read_text().splitlines():
        try:
            yield json.loads(line)
        except ValueError:
            continue


# ---- HTML --------------------------------------------------------------------------
def write_html(rep: dict, det: Detector, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed, so report.html cannot be drawn; pip install 'kintsugi[report]' (report.json was written)") from None
    g = det.gens[rep["analysed_generation"]]
    figs = [("Step time per rank (ms)", _heatmap(plt, g)), ("Phase time per rank", _phases(plt, g)),
            ("Link matrix: median transfer ms, src x dst", _links(plt, g))]
    for v in rep["verdicts"][:6]:
        gen = det.gens.get(v.get("generation"))
        if gen is not None:
            figs.append((f"Collective waits before the {v['kind']} verdict", _timeline(plt, gen, v)))
    body = [f"<h1>Kintsugi diagnostics: {html.escape(rep['run_dir'])}</h1>",
            f"<pre>{html.escape(summary(rep))}</pre>"]
    for title, png in figs:
        if png:
            body.append(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'>")
    body.append(f"<h2>report.json</h2><pre>{html.escape(json.dumps(rep, indent=1, default=str)[:200000])}</pre>")
    path.write_text("<!doctype html><meta charset='utf-8'><title>Kintsugi diagnostics</title>"
                    "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}</style>"
                    + "\n".join(body))


def _png(plt, fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _heatmap(plt, g: Generation) -> str:
    steps = sorted({s for st in g.steps.values() for s in st})
    ranks = sorted(g.meta)
    if not steps:
        return ""
    grid = [[1e3 * (g.steps[r][s][1] - g.steps[r][s][0]) if s in g.steps.get(r, {}) else float("nan") for s in steps] for r in ranks]
    fig, ax = plt.subplots(figsize=(10, 1 + 0.35 * len(ranks)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(ranks) - 0.5, -0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("rank")
    ax.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    fig.colorbar(im, ax=ax, label="ms")
    return _png(plt, fig)


def _phases(plt, g: Generation) -> str:
    ranks = sorted(g.steps)
    if not ranks:
        return ""
    fig, ax = plt.subplots(figsize=(8, 3))
    bottom = [0.0] * len(ranks)
    for name in PHASES:
        vals = [1e3 * statistics.mean([ph.get(name, 0.0) for _s, _e, ph in g.steps[r].values()]) for r in ranks]
        ax.bar([str(r) for r in ranks], vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("rank")
    ax.set_ylabel("mean ms per step")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def _links(plt, g: Generation) -> str:
    if not g.links:
        return ""
    n = max(max(c) for c in g.links) + 1
    grid = [[float("nan")] * n for _ in range(n)]
    for (s, d), v in g.links.items():
        grid[s][d] = statistics.median(ms for _, ms in v)
    fig, ax = plt.subplots(figsize=(4 + 0.3 * n, 3 + 0.3 * n))
    im = ax.imshow(grid, cmap="magma_r")
    ax.set_xlabel("dst rank")
    ax.set_ylabel("src rank")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fig.colorbar(im, ax=ax, label="median ms")
    return _png(plt, fig)


def _timeline(plt, g: Generation, v: dict) -> str:
    """Each rank's collectives in the 5 s before the verdict: a bar from arrival to
    completion (the wait), ops still in flight in red up to the verdict."""
    t_end = v["time"]
    fig, ax = plt.subplots(figsize=(10, 1 + 0.35 * max(1, len(g.meta))))
    for _chan, _seq, _op, _step, per_rank in g.timeline:
        for r, (a, e) in per_rank.items():
            if e > t_end - 5 and a < t_end:
                ax.barh(r, e - a, left=a - t_end, color="tab:blue", height=0.6)
    for r, st in g.state.items():
        for _chan, _op, _seq, _peer, a in st.get("inflight", []):
            ax.barh(r, t_end - a, left=a - t_end, color="tab:red", height=0.6)
    ax.set_xlabel("seconds before the verdict (blue: waited in a collective, red: still waiting)")
    ax.set_ylabel("rank")
    ax.set_yticks(sorted(g.meta))
    return _png(plt, fig)
