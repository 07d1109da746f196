"""The collective trace's records: what ``comms.trace`` writes per op and per step, one
JSON object a line, and what ``diagnostics`` reads back. No torch here: the readers (the
launcher's monitor, ``kintsugi diagnose``) start without it."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, fields

# The on-disk format of trace-r<R>.jsonl, named in meta-r<R>.json; readers refuse others.
TRACE_FORMAT = 2


@dataclass(slots=True)
class OpRecord:
    """One op of one rank: a line ``{"t": "op", ...}`` of trace-r<R>.jsonl, and an entry of
    the state file's ``inflight`` list while it runs (``ended`` None)."""

    channel: str  # the group's global ranks ("0,1,2,3"; "h<sha1>" above 16); p2p "0,1,2,3|src>dst"
    op: str  # the torch.distributed function ("all_reduce", "isend", "funcol.all_gather_tensor")
    seq: int  # per channel from 0: collective #n is the same op on every member, send #n meets recv #n
    peer: int  # p2p: the other rank; -1 for collectives
    nbytes: int
    dtype: str
    arrived: float  # wall clock when the rank entered the call
    started: float  # when the op started (on a GPU: its start event), else = arrived
    ended: float | None  # when it completed; None while in flight
    step: int
    error: str = ""
    blocked: float = 0.0  # seconds spent in other blocking traced ops since this rank's last op on this channel


@dataclass(slots=True)
class StepRecord:
    """One finished step of one rank: a line ``{"t": "step", ...}``."""

    step: int
    start: float
    end: float
    phases: dict  # phase name -> seconds (data, forward_backward, optimizer, checkpoint, probe)
    # Seconds of the step spent blocked in traced ops (waiting for other ranks or the
    # network); the rest is the rank's own work. None in traces written before it was kept.
    blocked: float | None = None
    # Seconds the training thread was ready to run but waited for a CPU (its run-queue delay,
    # Linux schedstat; a CPU quota's throttling counts): a rank short of CPU. None where the
    # kernel does not say.
    cpu_wait: float | None = None


_KINDS = {"op": OpRecord, "step": StepRecord}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()}
_TAG = {cls: t for t, cls in _KINDS.items()}


def encode(rec: OpRecord | StepRecord) -> str:
    d = {"t": _TAG[type(rec)]}
    for name in _FIELDS[type(rec)]:
        d[name] = getattr(rec, name)
    return json.dumps(d, separators=(",", ":"))


def decode(line: str | bytes | dict) -> OpRecord | StepRecord:
    """A line of a trace file (or a parsed one) as its record; ValueError if it is not one."""
    try:
        d = dict(json.loads(line) if isinstance(line, (str, bytes)) else line)
        return _KINDS[d.pop("t", "op")](**d)
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"not a trace record: {e}") from None


def hostname() -> str:
    """This host's name in traces and verdicts: ``KINTSUGI_HOST`` when set (hosts that share
    a kernel's hostname, such as network namespaces of an emulated cluster), else the
    system's."""
    return os.environ.get("KINTSUGI_HOST") or socket.gethostname()
