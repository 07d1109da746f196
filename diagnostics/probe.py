"""Asking a running job for a pairwise link probe, and reading its answer.

``request`` writes ``probe-request.json`` into a generation's trace directory; the ranks'
tracers read it and run ``comms.probe`` at the step it names (see there for the protocol).
``analyse`` turns the probers' measurements into a src x dst matrix of payload round trips
(each pair's fastest repetition: its capacity) and says which link is slow, after setting
aside every prober that was short of CPU during
the probe (its fixed CPU work took ``probe_cpu_factor`` x the typical prober's, or its cgroup
was throttled): a starved process makes its transfers slow both ways without any link
being at fault.
"""
from __future__ import annotations

import json
import math
import os
import time

from diagnostics.config import DiagnosticsConfig
from diagnostics.links import slow_cells
from diagnostics.traces import Generation

LEAD_S = 3.0  # how far ahead the probe step lies: several of every rank's 0.5 s reads of the request
MIN_HOSTS = 3
MIN_CELLS = MIN_HOSTS * (MIN_HOSTS - 1)  # directions a cell is compared with
PROBE_SLACK_MS = 0.1  # below this a difference is timer and scheduling resolution, not a link
MIN_BYTES, MAX_BYTES = 1 << 20, 4 << 20  # a transfer, not a latency, on fast links; seconds on a slow one
# A repeat carries enough bytes that the first probe's typical transfer would take REPEAT_MS:
# on a busy host a process waits milliseconds for a CPU, which a 1 MiB transfer on a fast
# link (~1 ms) cannot tell from a slow link twice in a row; a link's lost bandwidth slows a
# transfer of any size alike.
REPEAT_MS, MAX_REPEAT_BYTES = 20.0, 64 << 20


def request(gen: Generation, ranks: list[int], nbytes: int, step_s: float, cfg: DiagnosticsConfig,
            reason: str = "", links_only: bool = False, confirms: str | None = None) -> dict | None:
    """Ask for a probe among the hosts of ``ranks``; None while an earlier one is pending.
    ``links_only``: only a slow link it finds is a verdict (a prober short of CPU is set
    aside, not named). ``confirms``: the id of an earlier probe whose slow links this one
    repeats the measurement of; its ``nbytes`` is taken as given (``repeat_bytes`` sized it)."""
    current = gen.probes().get(_read(gen.path / "probe-request.json").get("id", ""))
    if current and not finished(gen, current):
        return None
    # One claim per request, made exclusively: every node's monitor (and any watcher) sees the
    # same slowdown at about the same moment, and the job must get one request, not several.
    try:
        os.close(os.open(gen.path / f"probe-claim-{len(list(gen.path.glob('probe-request-*.json')))}",
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return None
    step_now = max((st.get("step", 0) for st in gen.state.values()), default=0)
    probers = [rs[0] for rs in gen.hosts(ranks).values()]
    if len(probers) < MIN_HOSTS:  # a pair alone has nothing to compare with: probe the job's hosts
        probers = [rs[0] for rs in gen.hosts(sorted(gen.meta)).values()]
    if len(probers) < 2:  # all on one host: probe the ranks' own connections (loopback, one machine)
        probers = sorted(ranks)
    req = {"id": str(time.time_ns()), "step": step_now + math.ceil(LEAD_S / max(step_s, 1e-3)) + 2,
           "ranks": probers, "group": sorted(ranks), "reps": 5, "join_s": max(10.0, 3 * step_s),
           "bytes": int(nbytes if confirms else min(max(cfg.probe_bytes or nbytes, MIN_BYTES), MAX_BYTES)),
           "requested": time.time(), "reason": reason, "links_only": links_only, "confirms": confirms}
    for name in (f"probe-request-{req['id']}.json", "probe-request.json"):  # the history, then the live one
        tmp = gen.path / f".{name}.tmp{os.getpid()}"
        tmp.write_text(json.dumps(req))
        os.replace(tmp, gen.path / name)
    return req


def repeat_bytes(first: dict) -> int:
    """The payload of the probe that repeats ``first`` (its analysis): scaled up so that its
    typical transfer takes REPEAT_MS at least."""
    scale = max(1.0, REPEAT_MS / max(first["typical_ms"], 1e-3))
    return int(min(first["bytes"] * scale, MAX_REPEAT_BYTES))


def finished(gen: Generation, probe: dict) -> bool:
    """Every prober answered, or none will: the job is past the probe step (each prober writes
    its answer before leaving the step) or has ended."""
    req = probe["request"]
    latest = max((st.get("step", 0) for st in gen.state.values()), default=0)
    ended = all(st.get("closed") for st in gen.state.values())
    return len(probe["results"]) == len(req["ranks"]) or ended or latest > req["step"] + 1


def analyse(probe: dict, cfg: DiagnosticsConfig) -> dict:
    """The probe's matrix and what it says: ``status`` done | incomplete | abandoned,
    ``starved`` probers, ``slow`` cells, the typical cell and the limit."""
    req, results = probe["request"], probe["results"]
    out = {"id": req["id"], "step": req["step"], "ranks": req["ranks"], "bytes": req["bytes"], "reason": req.get("reason", "")}
    statuses = {r: res.get("status") for r, res in results.items()}
    if any(s == "abandoned" for s in statuses.values()):
        return {**out, "status": "abandoned", "detail": "not every rank reached the probe step in time"}
    done = {r: res for r, res in results.items() if res.get("send_s")}
    if len(done) < len(req["ranks"]):
        missing = sorted(set(req["ranks"]) - set(done))
        return {**out, "status": "incomplete", "detail": f"no measurements from rank(s) {missing}",
                "errors": {r: s for r, s in statuses.items() if s not in ("go", None)}}
    # A pair's capacity is its fastest repetition: scheduling hiccups only ever add time,
    # a slow link slows every repetition.
    samples = {(r, int(p)): [1e3 * min(v)] for r, res in done.items() for p, v in res["send_s"].items()}
    cpu = {r: min(res["cpu_s"]) for r, res in done.items()}
    typical_cpu = sorted(cpu.values())[(len(cpu) - 1) // 2]
    starved = {}
    for r, res in done.items():
        span = max(res.get("ended", 0) - res.get("started", 0), 1e-9)
        throttled = res.get("throttled_s") or 0.0
        if cpu[r] > cfg.probe_cpu_factor * typical_cpu or throttled > 0.1 * span:
            starved[r] = {"cpu_ratio": round(cpu[r] / typical_cpu, 2), "throttled_s": res.get("throttled_s")}
    judged = {c: v for c, v in samples.items() if c[0] not in starved and c[1] not in starved}
    # Every pair moved the same payload, so a link at half bandwidth (2x) stands out from its
    # peers: limit = probe_factor x the lower quartile of the pairs + PROBE_SLACK_MS. The
    # quartile holds while up to 2/3 of the pairs are slow (one host slow both ways among 3).
    slow, typical, limit = slow_cells(judged, factor=cfg.probe_factor, min_ms=PROBE_SLACK_MS, persistence=1.0,
                                      quantile=0.25)
    if len(judged) < MIN_CELLS:  # two hosts (or two left): nothing to compare a direction with
        slow, out["detail"] = set(), f"{len(judged)} directions left to compare (need {MIN_CELLS})"
    return {**out, "status": "done",
            "matrix_ms": {f"{s}->{d}": round(v[0], 3) for (s, d), v in sorted(samples.items())},
            "cpu_ms": {r: round(1e3 * c, 2) for r, c in sorted(cpu.items())},
            "starved": starved, "slow": sorted(slow), "typical_ms": round(typical, 3), "limit_ms": round(limit, 3),
            "cells": sorted(judged)}


def _read(p) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
