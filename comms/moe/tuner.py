"""Measured choice of the chunk count d for chunks="auto" (FSMoE's model, checked in use).

The model picks d from a profile taken once, in isolation (perfmodel.py). Where the
exchanges and the experts' matmuls share CPU cores, the overlap that profile reads swings
with load, and its pick can be wrong either way. So "auto" settles d on the layer's own
calls: a family of layers (same experts, dim, hidden and dtype) cycles through a few
candidate d, interleaved call by call so a load burst hits every candidate alike, until
each has ``calls`` timed calls (forward + backward of the co-scheduled part). Every rank
then takes the slowest rank's median per candidate (a layer call waits for the slowest
rank) and the fastest wins; a candidate within MIN_GAIN of the model's pick loses to it.

The same measurements calibrate the model: the profile's overlap is refitted so the
predicted ratios t(d) / t(1) match the measured ones, and the gradient partition and
predicted times of every later schedule come from the calibrated profile.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field

from comms import dist_utils
from comms.moe.perfmodel import MIN_GAIN, LayerShape, Profile, simulate


def candidates(model_d: int, slots: int, max_chunks: int = 16) -> list[int]:
    """d = 1, 2, 4 and the model's pick and its double, as far as the rows allow."""
    return sorted(d for d in {1, 2, 4, model_d, 2 * model_d} if d <= min(max_chunks, max(1, slots)))


@dataclass
class Trial:
    """One layer family's tuning state; identical on every rank (program order decides it)."""

    candidates: list[int]
    calls: int  # timed calls per candidate before settling
    model_d: int
    issued: int = 0
    samples: dict = field(default_factory=dict)  # d -> [seconds of forward + backward]
    chosen: int | None = None
    measured_ms: dict = field(default_factory=dict)  # d -> the slowest rank's median, ms

    def ready(self) -> bool:
        return all(len(self.samples.get(d, ())) >= self.calls for d in self.candidates)

    def next_d(self) -> int:
        d = self.candidates[self.issued % len(self.candidates)]
        self.issued += 1
        return d

    def add(self, d: int, seconds: float):
        if self.chosen is None:
            self.samples.setdefault(d, []).append(seconds)

    def settle(self, group=None) -> int:
        """Collective over ``group`` (every rank of the job): the fastest measured d."""
        agreed = dist_utils.all_reduce_max_each([statistics.median(self.samples[d]) for d in self.candidates], group)
        self.measured_ms = {d: 1e3 * t for d, t in zip(self.candidates, agreed)}
        best = min(self.candidates, key=self.measured_ms.get)
        keep = self.model_d in self.measured_ms and \
            self.measured_ms[self.model_d] * (1 - MIN_GAIN) <= self.measured_ms[best]
        self.chosen = self.model_d if keep else best
        return self.chosen


def calibrate_overlap(shape: LayerShape, prof: Profile, measured_ms: dict, steps: int = 20) -> float:
    """The overlap (0..1, in 1/steps) whose predicted t(d) / t(1) best match the measured
    ratios (least squares of their logs); the profile's own value where d = 1 was not timed."""
    if 1 not in measured_ms or len(measured_ms) < 2:
        return prof.overlap
    bare = dataclasses.replace(shape, grad_bytes=0)  # the timed part: exchanges and experts

    def error(overlap: float) -> float:
        p = dataclasses.replace(prof, overlap=overlap)
        t1 = simulate(bare, p, 1).predicted_s
        return sum((math.log(simulate(bare, p, d).predicted_s / t1) - math.log(ms / measured_ms[1])) ** 2
                   for d, ms in measured_ms.items() if d != 1)

    return min((i / steps for i in range(steps + 1)), key=error)
