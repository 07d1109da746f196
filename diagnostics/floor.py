"""The noise floor: how much a series of per-step numbers must move before it means anything.

Training repeats itself, so a job's own recent steps are the reference for its next ones:
a window of the latest steps is compared with the steps just before it (its history). A
shift counts only when it beats both a relative minimum (a share of the history's level,
e.g. 5% of the step time) and the history's own noise: ``z`` standard errors of the
difference of two medians, with the standard deviation estimated robustly (1.4826 x the
median absolute deviation) so a few outlier steps do not widen it. The thresholds thereby
scale with the job: a 20 ms step and a 2 s step are judged alike, and a machine whose step
times wander needs a larger shift than a quiet one.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass
class Shift:
    window: float  # the window's median
    history: float  # the history's median
    floor: float  # the smallest rise that counts
    noise: float  # robust standard deviation of the history

    @property
    def rise(self) -> float:
        return self.window - self.history

    @property
    def significant(self) -> bool:
        return self.rise > self.floor

    def to_json(self) -> dict:
        return {k: round(v, 6) for k, v in (("window", self.window), ("history", self.history),
                                            ("floor", self.floor), ("noise", self.noise))}


def sigma(xs: list[float]) -> float:
    """Robust standard deviation: 1.4826 x median absolute deviation."""
    m = statistics.median(xs)
    return 1.4826 * statistics.median(abs(x - m) for x in xs)


def shift(window: list[float], history: list[float], *, z: float, rel_min: float, abs_min: float = 0.0) -> Shift:
    """The window's median against the history's, with the floor the rise must beat."""
    h = statistics.median(history)
    s = sigma(history)
    # Standard error of a median: sqrt(pi/2) x sigma / sqrt(n); of the difference of two: combined.
    se = math.sqrt(math.pi / 2) * s * math.sqrt(1 / len(window) + 1 / len(history))
    return Shift(statistics.median(window), h, max(rel_min * abs(h), z * se, abs_min), s)


def mean_shift(window: list[float], history: list[float], *, z: float, abs_min: float = 0.0) -> Shift:
    """The window's mean against the history's, for series that are zero much of the time,
    such as a rank's lateness (it is late only when it is the last to arrive), whose median
    jumps between 0 and its typical value. The standard error takes the larger of the two
    sides' variances for the window (Welch's, unless the window is the calmer side): a window
    caught mid-change mixes two levels, and that spread is the change, not noise."""
    mw, mh = statistics.fmean(window), statistics.fmean(history)
    vh = statistics.pvariance(history, mh)
    vw = min(statistics.pvariance(window, mw), max(vh, 1e-12) * 4)
    se = math.sqrt(max(vw, vh) / len(window) + vh / len(history))
    return Shift(mw, mh, max(z * se, abs_min), statistics.pstdev(history, mh))
