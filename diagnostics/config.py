"""Configuration of collective tracing, detection and fault injection (the [diagnostics] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import check, doc

POLICIES = ("warn", "restart", "exclude")


@dataclass
class DiagnosticsConfig:
    """Collective tracing, hang/straggler/link detection, and fault injection (for tests and drills)."""

    trace: bool = doc("Record every collective in a per-rank ring buffer flushed to RUN_DIR/diagnostics/.", True)
    inject: list = doc("Faults to inject, e.g. `crash:rank=1,step=30`, `slow:rank=1,pct=20`, `slowlink:src=0,dst=1,ms=20` (syntax in diagnostics/inject.py); empty = none.", [])
    policy: str = doc("What the launcher does on a hang or persistent straggler: `warn`, `restart` (kill the workers; torchrun restarts them from the newest checkpoint) or `exclude` (drop the suspect node when `--nnodes min:max` allows, else restart).", "warn")
    hang_min_s: float = doc("A collective some ranks wait in for longer than max(this, hang_factor x median step time) is a hang.", 5.0)
    hang_factor: float = doc("Hang limit in median step times (see hang_min_s).", 10.0)
    hang_slow_phase_s: float = doc("Hang limit before the first step completes and while the missing rank is in its checkpoint phase.", 120.0)
    stale_s: float = doc("A rank whose trace heartbeat (every 0.5 s) is older than this is gone.", 3.0)
    straggler_window: int = doc("Steps a straggler must be judged over (a 20% slower rank is flagged about this many steps after it slows).", 10)
    straggler_persistence: float = doc("Share of the window's steps a rank (or link sample) must be the slowest in.", 0.7)
    straggler_threshold: float = doc("Median share of step time the others wait for a straggler (0.05 = 5%).", 0.05)
    link_window: int = doc("Recent transfers per src->dst pair judged for a slow link.", 10)
    link_factor: float = doc("A pair is slow above link_factor x the typical pair's median + link_min_ms.", 3.0)
    link_min_ms: float = doc("Absolute slack of the slow-link limit, in ms (ignores jitter of tiny transfers).", 5.0)

    def validate(self):
        from diagnostics.inject import parse

        check(self.policy in POLICIES, "diagnostics.policy", "must be warn, restart or exclude")
        for name in ("hang_min_s", "hang_factor", "hang_slow_phase_s", "stale_s", "link_factor", "link_min_ms"):
            check(getattr(self, name) > 0, f"diagnostics.{name}", "must be positive")
        check(self.straggler_window >= 3, "diagnostics.straggler_window", "must be >= 3")
        check(self.link_window >= 3, "diagnostics.link_window", "must be >= 3")
        check(0 < self.straggler_persistence <= 1, "diagnostics.straggler_persistence", "must be in (0, 1]")
        check(0 < self.straggler_threshold < 1, "diagnostics.straggler_threshold", "must be in (0, 1)")
        check(isinstance(self.inject, list), "diagnostics.inject", "must be a list of strings")
        for spec in self.inject:
            parse(spec)
