"""Fault injection for tests, demos and drills (``diagnostics.inject``; off unless asked).

Each spec is ``kind:key=value,...``; ranks are global ranks, steps are optimizer steps:

    crash:rank=1,step=30          the rank kills itself (SIGKILL) before step 30
    hang:rank=1,step=30           the rank stops before step 30 (sleeps forever)
    slow:rank=1,ms=50             the rank sleeps 50 ms before every step
    slow:rank=1,pct=20            ... 20% of its own step time (a 20% slower rank)
    slow:rank=1,ms=5,per=op       ... 5 ms before each collective it enters
    slowlink:src=0,dst=1,ms=20    sends from rank 0 to rank 1 take 20 ms longer (dst=* : all)
    slowcomm:rank=1,ms=20         every collective rank 1 enters takes 20 ms longer for all
                                  members, with nobody arriving late (the signature of a slow
                                  link inside collectives; the link probe finds no slow pair,
                                  since the network is not slowed: phase 2 shapes real links)
    commhang:rank=1,step=30       the rank enters its first collective at step >= 30 and never
                                  leaves it: every rank has arrived, the op never completes

Every kind takes ``from=S`` (default 0) for the first step it applies to; ``step=`` is
the one step of crash/hang/commhang. Those three fire in one attempt of the job only,
``attempt=N`` (torchrun's restart count, default 0): the workers torchrun restarts after
the fault run clean, as after a real one-off failure.
"""
from __future__ import annotations

import os
import signal
import statistics
import time
from dataclasses import dataclass, field

from comms import UserError

_KINDS = {
    "crash": {"rank", "step"}, "hang": {"rank", "step"}, "commhang": {"rank", "step"},
    "slow": {"rank"}, "slowlink": {"src", "dst", "ms"}, "slowcomm": {"rank", "ms"},
}
_OPTIONAL = {"from", "ms", "pct", "per", "attempt"}
_P2P_SENDS = {"send", "isend", "send_object_list"}


@dataclass
class Fault:
    kind: str
    args: dict = field(default_factory=dict)

    def __str__(self):
        return self.kind + ":" + ",".join(f"{k}={v}" for k, v in self.args.items())


def describe(f: Fault) -> str:
    """A fault in words, for the job's announcement of its drill."""
    a = f.args
    when = f" of attempt {a['attempt']}" if a.get("attempt") else ""
    amount = f"{a['pct']:g}%" if "pct" in a else f"{a.get('ms', 0):g} ms"
    return {
        "crash": lambda: f"rank {a['rank']} is killed (SIGKILL) before step {a['step']}{when}",
        "hang": lambda: f"rank {a['rank']} stops before step {a['step']}{when}",
        "commhang": lambda: f"rank {a['rank']} stops inside a collective at step {a['step']}{when}",
        "slow": lambda: f"rank {a['rank']} is slowed by {amount} per step from step {a.get('from', 0)}",
        "slowlink": lambda: f"sends from rank {a['src']} to rank {a['dst']} take {a['ms']:g} ms longer",
        "slowcomm": lambda: f"rank {a['rank']}'s collectives take {a['ms']:g} ms longer",
    }[f.kind]()


def parse(spec: str) -> Fault:
    """``slow:rank=1,pct=20`` -> Fault; a malformed spec is a UserError naming it."""
    usage = f"diagnostics.inject: {spec!r} is not a fault; write e.g. 'slow:rank=1,pct=20' (kinds: {', '.join(_KINDS)})"
    kind, _, rest = str(spec).partition(":")
    if kind not in _KINDS:
        raise UserError(usage)
    args: dict = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq or k not in _KINDS[kind] | _OPTIONAL:
            raise UserError(usage)
        if k == "per":
            if v not in ("step", "op"):
                raise UserError(f"diagnostics.inject: {spec!r}: per must be 'step' or 'op'")
            args[k] = v
        elif k == "dst" and v == "*":
            args[k] = "*"
        else:
            try:
                args[k] = float(v) if k in ("ms", "pct") else int(v)
            except ValueError:
                raise UserError(f"diagnostics.inject: {spec!r}: {k} must be a number") from None
    missing = _KINDS[kind] - set(args)
    if missing:
        raise UserError(f"diagnostics.inject: {spec!r} needs {', '.join(sorted(missing))}")
    if kind == "slow" and ("ms" in args) == ("pct" in args):
        raise UserError(f"diagnostics.inject: {spec!r} needs exactly one of ms= or pct=")
    return Fault(kind, args)


class Injector:
    """Applies this rank's faults: ``before_step(step)`` each step, collective-level ones
    through the tracer's hooks (so ``slowlink``/``commhang``/``per=op`` need tracing on)."""

    def __init__(self, specs: list, rank: int, tracer=None):
        self.rank = rank
        self.tracer = tracer
        attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        faults = [parse(s) for s in specs or []]
        self.planned = [describe(f) for f in faults]  # every rank's, for rank 0 to announce
        self.faults = [f for f in faults if f.args.get("rank", f.args.get("src")) == rank
                       and (f.kind not in ("crash", "hang", "commhang") or f.args.get("attempt", 0) == attempt)]
        self._slept: list[float] = []  # injected sleep per step, to keep it out of "own step time"
        self._own: list[float] = []
        self._hung = False
        if any(_needs_hooks(f) for f in self.faults):
            if tracer is None or not tracer.enabled:
                raise UserError("diagnostics.inject: link, per-op and commhang faults need diagnostics.trace = true")
            tracer.hooks.append(self._op_hook)

    def before_step(self, step: int):
        if not self.faults:
            return
        if self.tracer is not None and self._slept:  # the step that just ended, without our sleep
            self._own.append(max(self.tracer.last_step_s - self._slept[-1], 0.0))
        slept = 0.0
        for f in self.faults:
            a = f.args
            if f.kind == "crash" and step == a["step"]:
                os.kill(os.getpid(), signal.SIGKILL)
            elif f.kind == "hang" and step == a["step"]:
                _sleep_forever()
            elif f.kind == "slow" and a.get("per", "step") == "step" and step >= a.get("from", 0):
                if "ms" in a:
                    slept += a["ms"] / 1e3
                elif self._own:  # pct of the median of its own last 5 steps
                    slept += a["pct"] / 100 * statistics.median(self._own[-5:])
        if slept:
            time.sleep(slept)
        self._slept.append(slept)

    def _op_hook(self, op: str, group: str, peer, arrived: bool):
        step = self.tracer.step
        for f in self.faults:
            a = f.args
            if f.kind == "slow" and a.get("per") == "op" and not arrived and step >= a.get("from", 0):
                time.sleep(a["ms"] / 1e3)
            elif (f.kind == "slowlink" and arrived and op in _P2P_SENDS and step >= a.get("from", 0)
                  and (a["dst"] == "*" or a["dst"] == peer)):
                time.sleep(a["ms"] / 1e3)
            elif f.kind == "slowcomm" and arrived and peer is None and step >= a.get("from", 0):
                time.sleep(a["ms"] / 1e3)  # after its arrival is recorded: inside the op, not late to it
            elif f.kind == "commhang" and arrived and peer is None and step >= a["step"] and not self._hung:
                self._hung = True
                _sleep_forever()


def _needs_hooks(f: Fault) -> bool:
    return f.kind in ("slowlink", "slowcomm", "commhang") or f.args.get("per") == "op"


def _sleep_forever():
    while True:
        time.sleep(3600)
