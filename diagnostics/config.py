"""Configuration of collective tracing, detection and fault injection (the [diagnostics] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import check, doc

POLICIES = ("warn", "restart", "exclude")


@dataclass
class DiagnosticsConfig:
    """Collective tracing, hang/straggler/link detection, and fault injection (for tests and drills)."""

    trace: bool = doc("Record every collective in a per-rank ring buffer flushed to RUN_DIR/diagnostics/.", True)
    trace_cost_steps: int = doc("Measure what tracing costs this job: tracing pauses for every other block of this many steps, and at the end rank 0 prints the step time of traced against paused blocks (each block against the mean of its two neighbours, the median over blocks; metrics.jsonl `event: \"trace_cost\"`, and each step record says `traced`). The monitor sees nothing of the paused steps. 0 = off.", 0)
    inject: list = doc("Faults to inject, e.g. `crash:rank=1,step=30`, `slow:rank=1,pct=20,from=20`, `slowlink:src=0,dst=1,ms=20`, `slowcomm:rank=1,ms=20` (syntax in diagnostics/inject.py); empty = none.", [])
    policy: str = doc("What the launcher does on a hang or persistent straggler: `warn`, `restart` (kill the workers; torchrun restarts them from the newest checkpoint) or `exclude` (drop the suspect node when `--nnodes min:max` allows, else restart).", "warn")
    hang_min_s: float = doc("A collective some ranks wait in for longer than max(this, hang_factor x median step time, 2 x the longest recent step) is a hang.", 5.0)
    hang_factor: float = doc("Hang limit in median step times (see hang_min_s).", 5.0)
    hang_slow_phase_s: float = doc("Hang limit before the first step completes and while the missing rank is in its checkpoint phase.", 120.0)
    stale_s: float = doc("A rank whose trace heartbeat (every 0.5 s) is older than this is gone, or stopped when its process is still there.", 3.0)
    straggler_window: int = doc("Steps a slowdown is judged over (a 20% slower rank is named about this many steps after it slows, and no sooner than confirm_s).", 10)
    history_steps: int = doc("Steps before the window that are its reference, the job's own noise floor (judging starts once a window's worth is there).", 30)
    noise_z: float = doc("A rise counts only above this many standard errors of the history's noise (step times: robust, from their median absolute deviation; a rank's lateness: of the means, and 2/3 of this when the job's step time itself rose beyond its floor).", 3.0)
    straggler_persistence: float = doc("Share of the window's steps a rank (or link sample) must be the slowest in.", 0.7)
    straggler_threshold: float = doc("Least rise over the history, as a share of the step time, of the wait the others spend on a straggler and of the job's step time (0.05 = 5%).", 0.05)
    straggler_sustained: float = doc("A rank the others wait for this share of every step (median, latest in 90% of them) over a full window and history (slow from its first step, no onset to see) is a straggler too; 0 = off.", 0.25)
    confirm_s: float = doc("A slowdown (straggler, slow collectives) is named once its sign (a rank late, collectives slower) lasted this many seconds, over windows in a row, and the job's step time agreed at 5 of their ends: a busy machine's scheduling hiccups pass within a second or two whatever the step time, a slow host or link stays.", 1.5)
    comm_factor: float = doc("A group's collectives are slow when, with every member in, they take this many times as long as in the history (and the job slowed).", 1.3)
    probe: bool = doc("When a group's collectives slow down and no rank is late, the monitor asks the job for a pairwise link probe at a step boundary (C4P-style) to name the slow link.", True)
    probe_every_s: float = doc("Also ask for a link probe among all the job's hosts this often, with no slowdown to explain (C4P probes periodically): a link that slows without slowing the job beyond its noise (one a pipeline's stages wait on for part of each step) is found too. Each probe holds the job at one step for its transfers. 0 = only when a slowdown asks.", 0.0)
    probe_bytes: int = doc("Payload of each probe transfer in bytes; 0 = the group's median collective size, clamped to 1..4 MiB.", 0)
    probe_factor: float = doc("In a link probe, a pair whose payload round trip takes this many times the typical pair's (the lower quartile) + 0.1 ms is slow.", 1.5)
    probe_cpu_factor: float = doc("A prober whose fixed CPU work takes this many times the typical prober's is short of CPU: its slow transfers are not blamed on a link.", 2.0)
    link_window: int = doc("Recent transfers per src->dst pair judged for a slow link.", 10)
    link_factor: float = doc("A pair is slow above link_factor x the typical pair's median + link_min_ms.", 3.0)
    link_min_ms: float = doc("Absolute slack of the slow-link limit, in ms (ignores jitter of tiny transfers).", 5.0)

    def validate(self):
        from diagnostics.inject import parse

        check(self.policy in POLICIES, "diagnostics.policy", "must be warn, restart or exclude")
        check(self.confirm_s >= 0, "diagnostics.confirm_s", "must be >= 0")
        for name in ("hang_min_s", "hang_factor", "hang_slow_phase_s", "stale_s", "link_factor", "link_min_ms", "noise_z",
                     "probe_cpu_factor"):
            check(getattr(self, name) > 0, f"diagnostics.{name}", "must be positive")
        check(self.comm_factor > 1, "diagnostics.comm_factor", "must be > 1")
        check(self.probe_factor > 1, "diagnostics.probe_factor", "must be > 1")
        check(self.straggler_window >= 3, "diagnostics.straggler_window", "must be >= 3")
        check(self.history_steps >= self.straggler_window, "diagnostics.history_steps", "must be >= straggler_window")
        check(0 <= self.straggler_sustained < 1, "diagnostics.straggler_sustained", "must be in [0, 1)")
        check(self.trace_cost_steps >= 0, "diagnostics.trace_cost_steps", "must be >= 0 (0 = off)")
        check(self.trace or not self.trace_cost_steps, "diagnostics.trace_cost_steps",
              "needs diagnostics.trace = true (it compares traced steps with paused ones)")
        check(self.probe_bytes >= 0, "diagnostics.probe_bytes", "must be >= 0")
        check(self.probe_every_s >= 0, "diagnostics.probe_every_s", "must be >= 0 (0 = off)")
        check(self.link_window >= 3, "diagnostics.link_window", "must be >= 3")
        check(0 < self.straggler_persistence <= 1, "diagnostics.straggler_persistence", "must be in (0, 1]")
        check(0 < self.straggler_threshold < 1, "diagnostics.straggler_threshold", "must be in (0, 1)")
        check(isinstance(self.inject, list), "diagnostics.inject", "must be a list of strings")
        for spec in self.inject:
            parse(spec)
