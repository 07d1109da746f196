"""Per-model MoE scheduling state: the EP groups and lanes, the measured profile, the
schedule each layer shape runs (chosen by the model, then settled on measured calls:
tuner.py), and predicted-vs-measured times for the log."""
from __future__ import annotations

import dataclasses
import logging
import math
import statistics

import torch.distributed as dist

from comms import dist_utils
from comms.moe.a2a import EPGroups, Exchanger
from comms.moe.perfmodel import LayerShape, Profile, Schedule, choose, measure, simulate
from comms.moe.pipeline import Plan, run
from comms.moe.tuner import Trial, calibrate_overlap, candidates

log = logging.getLogger(__name__)

REPORT_EVERY = 20  # log predicted vs measured after this many timed layer calls


class MoEScheduler:
    """Shared by every MoE layer of a model (one set of lanes, one profile)."""

    def __init__(self, groups: EPGroups | None, chunks: str = "1", reprofile_every: int = 0, tune_calls: int = 0):
        self.groups = groups
        self.ep = groups.ep if groups is not None else 1
        self.exchanger = Exchanger(groups)
        self.chunks, self.reprofile_every, self.tune_calls = chunks, reprofile_every, tune_calls
        self.profile: Profile | None = None
        self.measured_overlap: float | None = None  # the profile's own, before calibration
        self.reducer = None
        self.grad_bytes_per_layer = 0
        self._schedules: dict[tuple, Schedule] = {}  # the model's pick per rows bucket
        self._tuned: dict[tuple, Schedule] = {}  # the settled d's schedule per rows bucket
        self.trials: dict[tuple, Trial] = {}  # per layer family: (experts, dim, hidden, dtype bytes)
        self._times: dict[str, dict[str, list]] = {}
        self._calls = 0

    def request_profile(self):
        """Re-measure the groups at the next layer call (every rank must request it together)."""
        self.profile = None

    def agree_counts(self, counts):
        """Every EP rank's kept tokens per expert, (ep, E), from each rank's (E,) ``counts``.
        One small all-gather per layer call; the EP lanes are idle between layer calls, so
        it cannot interleave with an exchange on the same group."""
        if self.ep == 1:
            return counts.view(1, -1)
        out = counts.new_empty(self.ep, counts.numel())
        dist.all_gather(list(out.unbind(0)), counts, group=self.groups.group)
        return out

    def schedule(self, shape: LayerShape) -> Schedule:
        if self.chunks != "auto":
            return Schedule(d=max(1, min(int(self.chunks), shape.slots)))
        if self.reprofile_every and self._calls and self._calls % self.reprofile_every == 0:
            self.profile = None
        if self.profile is None:
            self.profile = measure(self.groups, shape.dim, shape.hidden, shape.n_experts // shape.ep)
            self.measured_overlap = self.profile.overlap
            self._schedules.clear()
            self._tuned.clear()
            self.trials.clear()
            log.info("moe profile: %s", self.profile.to_dict())
        # Packed rows change every step: plan for the top of the rows' bucket (4 per octave),
        # so the ~1 ms model runs once per bucket, not per call. All EP ranks agreed on the
        # rows, so they pick the same bucket and the same d.
        shape = dataclasses.replace(shape, slots=math.ceil(2 ** (math.ceil(4 * math.log2(shape.slots)) / 4)))
        key = (shape.n_experts, shape.slots, shape.dim, shape.hidden, shape.elt_bytes)
        if key not in self._schedules:
            s = self._schedules[key] = choose(shape, self.profile)
            log.info("moe schedule for %s: d=%d, gradient partition %s bytes, predicted fwd %.2f ms + bwd %.2f ms",
                     key, s.d, s.gap_bytes, 1e3 * s.predicted_fwd_s, 1e3 * s.predicted_bwd_s)
        if not self.tune_calls:
            return self._schedules[key]
        family = (shape.n_experts, shape.dim, shape.hidden, shape.elt_bytes)
        trial = self.trials.setdefault(family, Trial(candidates(self._schedules[key].d, shape.slots),
                                                     self.tune_calls, self._schedules[key].d))
        if trial.chosen is None:
            if not trial.ready():
                return simulate(shape, self.profile, trial.next_d())
            self._settle(trial, shape)
        if key not in self._tuned:
            self._tuned[key] = simulate(shape, self.profile, trial.chosen)
        return self._tuned[key]

    def _settle(self, trial: Trial, shape: LayerShape):
        """Every rank at the same call (the trial's state follows program order)."""
        d = trial.settle(self.groups.dp if self.groups is not None else None)
        overlap = calibrate_overlap(shape, self.profile, trial.measured_ms)
        self.profile = dataclasses.replace(self.profile, overlap=overlap)
        self._tuned.clear()  # planned with the overlap before calibration
        log.info("moe d settled on measured calls: %s ms per forward+backward -> d=%d (the model alone: d=%d); "
                 "overlap calibrated %.2f -> %.2f",
                 {c: round(ms, 2) for c, ms in trial.measured_ms.items()}, d, trial.model_d, self.measured_overlap, overlap)

    def run(self, name: str, buf, weights, fwd, bwd, hidden: int, counts=None):
        """Co-scheduled dispatch -> experts -> combine of ``buf`` (E, slots, dim); ``counts``
        (ep, E): used rows of each rank's blocks (None: all of them)."""
        n_exp, slots, dim = buf.shape
        shape = LayerShape(n_exp, slots, dim, hidden, self.ep, buf.element_size(), self.grad_bytes_per_layer)
        sched = self.schedule(shape)
        trial = self.trials.get((n_exp, dim, hidden, buf.element_size()))
        self._calls += 1
        times = self._times.setdefault(name, {"fwd": [], "bwd": [], "schedule": sched})
        times["schedule"], times["rows"] = sched, slots
        fwd_s = []

        def record(phase, seconds):
            times[phase].append(seconds)
            if phase == "fwd":
                fwd_s.append(seconds)
            elif trial is not None:
                trial.add(sched.d, fwd_s[0] + seconds)
            if phase == "bwd" and len(times["bwd"]) % REPORT_EVERY == 0 and dist_utils.rank() == 0:
                r = self.report()[name]
                predicted = "n/a (fixed d)" if r["predicted_ms"] is None else f"{r['predicted_ms']:.2f} ms"
                log.info("moe %s: d=%d predicted %s, measured %.2f ms (median of %d fwd+bwd)",
                         name, r["d"], predicted, r["measured_ms"], REPORT_EVERY)

        mine = None
        if counts is not None and self.ep > 1:
            local = n_exp // self.ep
            first = dist.get_rank(self.groups.group) * local
            mine = counts[:, first:first + local]
        plan = Plan(self.exchanger, self.ep, min(sched.d, slots), fwd, bwd, self.reducer,
                    sched.gap_bytes if self.chunks == "auto" else None, record, mine)
        return run(buf, weights, plan)

    def tuning(self) -> bool:
        """Whether a layer family's d is still being settled on its timed calls (the same on
        every rank: the trials follow program order)."""
        return any(t.chosen is None for t in self.trials.values())

    def last_call_s(self, name: str) -> float:
        """Seconds of the co-scheduled part (forward + backward) of layer ``name``'s last call."""
        t = self._times[name]
        return t["fwd"][-1] + t["bwd"][-1]

    def report(self) -> dict:
        """Per layer: chosen d, predicted and measured (median of the last calls) fwd+bwd ms,
        and the rows per expert the last call exchanged (receivers compute only the used ones)."""
        out = {}
        for name, t in self._times.items():
            fwd, bwd = t["fwd"][-REPORT_EVERY:], t["bwd"][-REPORT_EVERY:]
            measured = 1e3 * (statistics.median(fwd) + statistics.median(bwd)) if fwd and bwd else None
            s = t["schedule"]
            out[name] = {"d": s.d, "predicted_ms": 1e3 * s.predicted_s if self.chunks == "auto" else None,
                         "measured_ms": measured, "rows": t["rows"]}
        return out

    def close(self):
        self.exchanger.close()
        if self.reducer is not None:
            self.reducer.close()
