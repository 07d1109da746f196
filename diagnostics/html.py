"""The HTML report for a person: RUN_DIR/diagnostics/report.html and its figures.

At the top one paragraph of what happened (``report.what_happened``), then a timeline of
every rank's steps and phases across the job's generations with the faults marked, each
verdict with the plot of its evidence, the per-phase and per-rank tables, and links to the
raw JSON (report.json, verdicts.jsonl, actions.jsonl) rather than a dump of it. Figures
are PNG files in ``report-files/`` beside the page (matplotlib, Agg).
"""
from __future__ import annotations

import html
import statistics
import time
from pathlib import Path

from comms import UserError
from diagnostics.detect import Detector, suspect_str
from diagnostics.report import PHASES
from diagnostics.traces import Generation

COLORS = {"data": "#8dd3c7", "forward_backward": "#80b1d3", "optimizer": "#fdb462", "checkpoint": "#bebada",
          "probe": "#fb8072", "other": "#d9d9d9"}
FAULT = {"crash": "black", "hang_noncomm": "red", "hang_comm": "darkred", "straggler": "darkorange",
         "slow_link": "purple", "slow_comm": "magenta"}
FILES = "report-files"


def write_html(rep: dict, det: Detector, out_dir: Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("matplotlib is not installed, so report.html cannot be drawn; pip install 'kintsugi[report]' "
                        "(report.json was written)") from None
    out_dir = Path(out_dir)
    figs = out_dir / FILES
    figs.mkdir(parents=True, exist_ok=True)
    for old in figs.glob("*.png"):
        old.unlink()

    def img(name: str, fig, alt: str) -> str:
        fig.savefig(figs / name, format="png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        return (f"<img src='{FILES}/{name}' alt='{html.escape(alt)}' onload='this.dataset.loaded=1' "
                f"onerror=\"this.replaceWith('[figure {name} is missing]')\">")

    t0 = min((g["start"] for g in rep["generations"] if g["start"]), default=0.0)
    gens = [det.gens[g["id"]] for g in rep["generations"] if g["id"] in det.gens]
    body = [f"<h1>Kintsugi diagnosis of {html.escape(rep['run_dir'])}</h1>",
            f"<p class='what'>{html.escape(rep['what_happened'])}</p>",
            "<p class='raw'>Raw data: " + ", ".join(f"<a href='{n}'>{n}</a>" for n in ("report.json", "verdicts.jsonl", "actions.jsonl")
                                                   if n == "report.json" or (out_dir / n).exists())
            + f" &middot; written {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(rep['generated']))}</p>"]
    trace_gens = [g for g in gens if g.source == "trace" and g.steps]
    if trace_gens:
        body.append("<h2>Timeline</h2><p>Each rank's steps (top: step time; bottom: its phases) over the job's "
                    "generations; faults marked where they began (dashed) and where they were named (solid).</p>")
        body.append(img("timeline.png", _timeline(plt, trace_gens, rep["verdicts"], t0), "timeline of steps and phases"))
    body.append(f"<h2>Verdicts ({len(rep['verdicts'])})</h2>")
    if not rep["verdicts"]:
        body.append("<p>None: no crash, hang, straggler or slow link beyond the job's own noise.</p>")
    number = {g["id"]: i + 1 for i, g in enumerate(rep["generations"])}
    for i, v in enumerate(rep["verdicts"]):
        who = ", ".join(suspect_str(s) for s in v["suspects"])
        since = v.get("since") or v["time"]
        body.append(f"<h3 class='verdict'>{html.escape(v['kind'])}: {html.escape(who)}</h3>"
                    f"<p>{html.escape(v['evidence'].get('summary', ''))}<br>confidence {v['confidence']:.2f}; since "
                    f"{time.strftime('%H:%M:%S', time.localtime(since))} ({since - t0:+.1f} s), named "
                    f"{time.strftime('%H:%M:%S', time.localtime(v['time']))} ({v['time'] - t0:+.1f} s); generation "
                    f"{number.get(v['generation'], '?')} of {len(rep['generations'])}</p>")
        gen = det.gens.get(v["generation"])
        fig = _evidence(plt, gen, v, t0) if gen is not None else None
        if fig is not None:
            body.append(img(f"verdict-{i}.png", fig, f"evidence of the {v['kind']} verdict"))
    body.append("<h2>Steps, phases and ranks</h2>" + _tables(rep))
    main = det.gens.get(rep["analysed_generation"])
    if main is not None and main.links:
        body.append("<h2>Point-to-point links</h2>" + img("links.png", _matrix(plt, {c: statistics.median(ms for _, ms in v)
                                                                                  for c, v in main.links.items()}, set(),
                                                                                 "median transfer ms"), "link matrix"))
    for p in rep["probes"]:
        body.append(f"<h2>Link probe at step {p['step']}</h2><p>{html.escape(p['status'])}: ranks {p['ranks']}, "
                    f"{p['bytes'] >> 10} KiB per transfer" + (f"; {html.escape(p.get('detail', ''))}" if p.get("detail") else "") + "</p>")
    page = out_dir / "report.html"
    page.write_text("<!doctype html><html lang='en'><meta charset='utf-8'><title>Kintsugi diagnosis</title>"
                    "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 1em}img{max-width:100%}"
                    ".what{font-size:1.15em;background:#f4f4f4;padding:.8em;border-left:4px solid #c33}"
                    "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>"
                    "<body>" + "\n".join(body) + "</body></html>")
    return page


def _marks(ax, verdicts: list, t0: float, label: bool = True):
    for v in verdicts:
        color = FAULT.get(v["kind"], "grey")
        if v.get("since"):
            ax.axvline(v["since"] - t0, color=color, ls="--", lw=1)
        ax.axvline(v["time"] - t0, color=color, lw=1.5, label=f"{v['kind']} named" if label else None)


def _timeline(plt, gens: list[Generation], verdicts: list, t0: float):
    ranks = sorted({r for g in gens for r in g.steps})
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 3 + 0.3 * len(ranks)), sharex=True,
                                      gridspec_kw={"height_ratios": [2, max(1, len(ranks) // 3 + 1)]})
    colors = {}
    for g in gens:  # one line per rank and generation: a restart is a gap, not a slope
        for r in ranks:
            recs = sorted(g.steps.get(r, {}).values(), key=lambda x: x.step)
            line, = top.plot([x.end - t0 for x in recs], [1e3 * (x.end - x.start) for x in recs], ".-", ms=3, lw=0.7,
                             color=colors.get(r), label=None if r in colors else f"rank {r}")
            colors[r] = line.get_color()
    top.set_ylabel("step ms")
    top.set_yscale("log")
    for g in gens:
        top.axvline(min(m.get("started", 0) for m in g.meta.values()) - t0, color="grey", lw=0.8, ls=":")
    for r in ranks:
        spans: dict[str, list] = {}
        for g in gens:
            for rec in g.steps.get(r, {}).values():
                x = rec.start
                for name in PHASES:  # in the order the loop runs them
                    d = rec.phases.get(name, 0.0)
                    if d:
                        spans.setdefault(name, []).append((x - t0, d))
                        x += d
                if rec.end > x:
                    spans.setdefault("other", []).append((x - t0, rec.end - x))
        for name, segs in spans.items():
            bottom.broken_barh(segs, (r - 0.4, 0.8), facecolors=COLORS[name], label=name if r == ranks[0] else None)
    bottom.set_yticks(ranks, [f"rank {r}" for r in ranks])
    bottom.invert_yaxis()
    bottom.set_xlabel("seconds since the job started (dotted: a generation starts)")
    _marks(top, verdicts, t0)
    _marks(bottom, verdicts, t0, label=False)
    top.legend(fontsize=7, ncol=6, loc="upper left")
    bottom.legend(fontsize=7, ncol=6, loc="upper right")
    return fig


def _evidence(plt, g: Generation, v: dict, t0: float):
    ev = v["evidence"]
    if "probe" in ev and isinstance(ev["probe"], dict) and ev["probe"].get("matrix_ms"):
        p = ev["probe"]
        cells = {tuple(int(x) for x in k.split("->")): ms for k, ms in p["matrix_ms"].items()}
        return _matrix(plt, cells, {tuple(c) for c in p.get("slow", [])},
                       f"probe: ms per {p['bytes'] >> 10} KiB round trip", starved=set(map(int, p.get("starved", {}))))
    if v["kind"] == "straggler" and ev.get("pattern") == "own_work" and g.steps:
        return _own_work(plt, g, v)
    if v["kind"] == "straggler" and "steps" in ev and g.steps:
        return _shares(plt, g, v)
    if v["kind"] == "slow_comm":
        return _comm(plt, g, v)
    if v["kind"] == "slow_link" and "median_ms" in ev:
        cells = {tuple(int(x) for x in k.split("->")): ms for k, ms in ev["median_ms"].items()}
        slow = {tuple(s["link"]) for s in v["suspects"] if "link" in s}
        return _matrix(plt, cells, slow, "median transfer ms (recent)")
    return _waits(plt, g, v, t0)


def _shares(plt, g: Generation, v: dict):
    """Share of each step the others waited for each rank, with the judged window."""
    steps = g.training_steps()
    fig, ax = plt.subplots(figsize=(10, 3))
    for r in sorted(g.meta):
        ax.plot(steps, [g.late_fraction(r, s) for s in steps], ".-", ms=3, lw=0.8, label=f"rank {r}")
    lo, hi = v["evidence"]["steps"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="orange", alpha=0.15, label="judged window")
    if v["evidence"].get("since_step") is not None:
        ax.axvline(v["evidence"]["since_step"], color="darkorange", ls="--", label="onset")
    ax2 = ax.twinx()
    ax2.plot(steps, [1e3 * g.step_time(s) for s in steps], color="grey", lw=0.8)
    ax2.set_ylabel("step ms (grey)")
    ax.set_xlabel("step")
    ax.set_ylabel("share of the step others waited")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def _own_work(plt, g: Generation, v: dict):
    """Each rank's own work per step (outside communication) and its thread's wait for a CPU,
    with the judged window."""
    steps = g.training_steps()
    to_ms = lambda xs: [float("nan") if x is None else 1e3 * x for x in xs]  # noqa: E731 (None: not traced)
    fig, ax = plt.subplots(figsize=(10, 3))
    for r in sorted(g.meta):
        line, = ax.plot(steps, to_ms(g.own_time(r, s) for s in steps), ".-", ms=3, lw=0.8, label=f"rank {r} own work")
        wait = [g.cpu_wait(r, s) for s in steps]
        if any(x is not None for x in wait):
            ax.plot(steps, to_ms(wait), ":", lw=0.8, color=line.get_color(), label=f"rank {r} waiting for a CPU")
    lo, hi = v["evidence"]["steps"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="orange", alpha=0.15, label="judged window")
    if v["evidence"].get("since_step") is not None:
        ax.axvline(v["evidence"]["since_step"], color="darkorange", ls="--", label="onset")
    ax.set_xlabel("step")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=7, loc="upper left")
    return fig


def _comm(plt, g: Generation, v: dict):
    ev = v["evidence"]
    steps = g.training_steps()
    per = g.comm.get(ev["channel"], {})
    fig, ax = plt.subplots(figsize=(10, 3))
    ax.plot(steps, [1e3 * per.get(s, 0.0) for s in steps], ".-", label=f"group {ev['group']}: collectives once all are in")
    ax.plot(steps, [1e3 * g.step_time(s) for s in steps], color="grey", lw=0.8, label="step time")
    lo, hi = ev["steps"]
    ax.axvspan(lo - 0.5, hi + 0.5, color="magenta", alpha=0.1, label="judged window")
    ax.set_xlabel("step")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=7)
    return fig


def _waits(plt, g: Generation, v: dict, t0: float):
    """Each rank's collectives in the 10 s before the verdict: a bar from arrival to
    completion (the wait), ops still in flight in red, the last heartbeat as a dot."""
    t_end = v["time"]
    ranks = sorted(g.meta)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.4 * max(1, len(ranks))))
    for _chan, _seq, _op, _step, per_rank in g.timeline:
        for r, (a, e) in per_rank.items():
            if e > t_end - 10 and a < t_end:
                ax.barh(r, e - a, left=a - t_end, color="tab:blue", height=0.6)
    for r in g.state:
        for rec in g.inflight(r):
            ax.barh(r, t_end - rec.arrived, left=rec.arrived - t_end, color="tab:red", height=0.6)
        hb = g.state[r].get("time")
        if hb:
            ax.plot([hb - t_end], [r], "k.", ms=8)
    ax.set_xlim(-10, 0.5)
    ax.set_xlabel("seconds before the verdict (blue: waited in a collective, red: still waiting, dot: last heartbeat)")
    ax.set_yticks(ranks, [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    return fig


def _matrix(plt, cells: dict, slow: set, label: str, starved: set = frozenset()):
    n = max(max(c) for c in cells) + 1
    grid = [[float("nan")] * n for _ in range(n)]
    for (s, d), ms in cells.items():
        grid[s][d] = ms
    fig, ax = plt.subplots(figsize=(4 + 0.4 * n, 3 + 0.4 * n))
    im = ax.imshow(grid, cmap="magma_r")
    for s, d in slow:
        ax.add_patch(plt.Rectangle((d - 0.5, s - 0.5), 1, 1, fill=False, ec="cyan", lw=2.5))
    for r in starved:
        ax.axhline(r, color="grey", lw=6, alpha=0.4)
        ax.axvline(r, color="grey", lw=6, alpha=0.4)
    ax.set_xlabel("dst rank")
    ax.set_ylabel("src rank")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_title("slow cells outlined" + ("; grey: short of CPU" if starved else ""), fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    return fig


def _tables(rep: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(n)}</th><td>{m['min_ms']:.2f} (rank {m['min_rank']})</td>"
                   f"<td>{m['max_ms']:.2f} (rank {m['max_rank']})</td></tr>" for n, m in rep["phases"].items())
    out = f"<table><tr><th>mean ms per step</th><th>min</th><th>max</th></tr>{rows}</table>" if rows else ""
    sc = rep["scores"]
    if sc:
        out += ("<p>Straggler score per rank (1.0 = the others never waited for it):</p><table><tr>"
                + "".join(f"<th>rank {r}</th>" for r in sc) + "</tr><tr>" + "".join(f"<td>{s:.3f}</td>" for s in sc.values())
                + "</tr></table>")
    return out
