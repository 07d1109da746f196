"""Process groups and device meshes, collective tracing, topology and placement, MoE
communication scheduling. Imports nothing else of Kintsugi.

Tracing a training loop of your own takes three calls (after ``init_process_group``); the
records go to RUN_DIR/diagnostics/, where ``kintsugi launch``'s monitor and
``kintsugi diagnose report RUN_DIR`` read them:

    import comms
    comms.install()                           # every torch.distributed collective is recorded
    for step in ...:
        with comms.phase("forward_backward"):  # optional: time the parts of a step
            ...
        comms.end_step(step)                   # one record per step (stragglers, hangs)
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

from comms.errors import UserError, exits_on_user_error

# ``comms.dist_utils`` and ``comms.trace`` (torch.distributed) load on first use: processes
# that only need UserError, such as the node keeper, start without importing torch.
_LAZY = ("dist_utils", "trace")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"comms.{name}")
    raise AttributeError(f"module 'comms' has no attribute {name!r}")


# `kintsugi launch` tells the workers where the run directory is.
RUN_DIR_ENV = "KINTSUGI_RUN_DIR"


def default_run_dir() -> Path:
    """This job's run directory: ``$KINTSUGI_RUN_DIR`` (set by ``kintsugi launch``), else runs/job."""
    return Path(os.environ.get(RUN_DIR_ENV) or "runs/job")


def install(run_dir: str | os.PathLike | None = None, *, enabled: bool = True) -> trace.Tracer:
    """Record this process's collectives into RUN_DIR/diagnostics/ (``comms.trace.install``);
    call it on every rank right after ``init_process_group``."""
    from comms import trace

    return trace.install(run_dir or default_run_dir(), enabled=enabled)


def phase(name: str):
    """``with comms.phase("optimizer"): ...`` times one part of the current step (a no-op
    before ``install``)."""
    active = _active_tracer()
    return active.phase(name) if active is not None else contextlib.nullcontext()


def end_step(step: int):
    """Close step ``step`` (its duration and phases become one record)."""
    active = _active_tracer()
    if active is not None:
        active.end_step(step)


def _active_tracer():
    """The installed tracer, None before ``install`` (which loads comms.trace)."""
    trace = sys.modules.get("comms.trace")
    return trace._active if trace is not None else None


__all__ = ["UserError", "exits_on_user_error", "dist_utils", "trace", "install", "phase", "end_step",
           "default_run_dir", "RUN_DIR_ENV"]
