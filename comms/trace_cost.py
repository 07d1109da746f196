"""What the collective trace costs a job, measured inside the job (``diagnostics.trace_cost_steps``).

Two runs of the same job differ by more than tracing costs (on a shared machine their step
times wander by several percent from run to run), so a job that asks alternates instead:
blocks of ``k`` steps traced, then ``k`` steps with the tracer paused (``Tracer.pause``: ops
and steps go unrecorded; the wrappers, the heartbeat thread and the probes stay), and each
block's median step time is compared with the mean of its two neighbours' (A-B-A: adjacent
blocks see the same machine, and a slow drift cancels). The first two blocks (start-up) are left out, and so are the steps right after a save
(a lazy save's copy lands in them, whichever block they fall in).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

# Blocks at the start left out: the first steps allocate and warm caches.
WARMUP_BLOCKS = 2


def traced(done: int, k: int) -> bool:
    """Whether the step after ``done`` completed steps runs traced (blocks of ``k``, traced first)."""
    return (done // k) % 2 == 0


@dataclass
class TraceCost:
    block_steps: int  # k
    pairs: int  # blocks compared with both neighbours
    pct: float  # median over them of 100 x (traced / untraced - 1)
    low_pct: float  # their lowest and highest
    high_pct: float
    traced_ms: float  # median step time of the traced and of the untraced steps compared
    untraced_ms: float

    def line(self) -> str:
        return (f"tracing cost {self.pct:+.1f}% of the step time (median of {self.pairs} {self.block_steps}-step blocks, "
                f"each against its two neighbours, traced vs paused; {self.low_pct:+.1f}% to {self.high_pct:+.1f}%; "
                f"{self.traced_ms:.1f} ms traced, {self.untraced_ms:.1f} ms untraced)")


def measure(step_times: dict[int, float], k: int, skip: set[int] = frozenset()) -> TraceCost | None:
    """``step_times``: step number (1-based, as the trainer counts) -> seconds; ``skip``: steps
    to leave out. None when fewer than two blocks have both neighbours."""
    blocks: dict[int, list[float]] = {}
    for s, dt in step_times.items():
        b = (s - 1) // k
        if b >= WARMUP_BLOCKS and s not in skip:
            blocks.setdefault(b, []).append(dt)
    med = {b: statistics.median(v) for b, v in blocks.items() if len(v) >= 2}
    ratios = []
    for b in sorted(med):
        if b - 1 in med and b + 1 in med:
            around = (med[b - 1] + med[b + 1]) / 2
            ratios.append(med[b] / around if traced(b * k, k) else around / med[b])
    if len(ratios) < 2:
        return None
    used = [b for b in med if b - 1 in med or b + 1 in med]
    on = [dt for b in used if traced(b * k, k) for dt in blocks[b]]
    off = [dt for b in used if not traced(b * k, k) for dt in blocks[b]]
    pct = [100 * (r - 1) for r in ratios]
    return TraceCost(k, len(ratios), round(statistics.median(pct), 2), round(min(pct), 2), round(max(pct), 2),
                     round(1e3 * statistics.median(on), 2), round(1e3 * statistics.median(off), 2))
