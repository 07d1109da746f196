"""Reading PyTorch's Flight Recorder dumps into the detector.

With ``TORCH_NCCL_TRACE_BUFFER_SIZE`` (or ``TORCH_FR_BUFFER_SIZE``) > 0, torch keeps a ring
of each process's last collectives, and with ``TORCH_NCCL_DUMP_ON_TIMEOUT=1`` NCCL's watchdog
writes it per rank to ``${TORCH_NCCL_DEBUG_INFO_TEMP_FILE}<rank>`` when a collective times
out (``comms.trace.flight_recorder_env`` points it into RUN_DIR/diagnostics/flight-recorder/).
The tracer also writes one, ``gen-<G>/fr-r<R>.pkl``, when the monitor dumps stacks on a hang.

A dump is torch's pickle of plain values (FlightRecorder.hpp, version 2.x): ``version``,
``pg_config`` {pg name: {name, desc, ranks: "[0, 1]"}}, ``pg_status`` {pg id:
{last_enqueued_collective, last_started_collective, last_completed_collective}}, and
``entries``, one dict per op: record_id, pg_id, process_group (name, desc),
collective_seq_id, p2p_seq_id, op_id, profiling_name ("nccl:all_reduce", "nccl:send 0->1"),
time_created_ns, duration_ms (with timing on), input/output sizes and dtypes, state
(scheduled | started | completed), time_discovered_started_ns / _completed_ns, retired,
timeout_ms, is_p2p. Point-to-point entries are left out: their p2p_seq_id counts a rank's
p2p ops with every peer, so there is nothing to match them by across ranks. ``load`` unpickles it with an Unpickler that refuses every class (a dump
needs none; anything else in such a file is not a dump and is not run).

Each entry becomes a ``comms.records.OpRecord``: channel = the group's global ranks (or
``pg<name>`` beyond 16 ranks), members from ``pg_config`` (gloo's dumps leave them out:
the default pg is every rank, another the ranks whose dumps use it), seq =
collective_seq_id, arrived = created, started/ended = discovered started/completed
(or created + duration). Ops neither completed nor retired are in flight (``pg_status``
is not used: its counters number ops differently across backends). One set of dumps is one ``Generation`` with
``source = "flight-recorder"``: the hang rules and the clock-free lateness apply; there are
no heartbeats (no crash rule) and no steps (no step-windowed rules).
"""
from __future__ import annotations

import io
import json
import math
import pickle
import re
from pathlib import Path

from comms import UserError
from comms.records import OpRecord, encode
from diagnostics.traces import Generation, generations as trace_generations

DTYPE_BYTES = {"Float": 4, "Half": 2, "BFloat16": 2, "Double": 8, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
               "Byte": 1, "Bool": 1, "Float8_e4m3fn": 1, "Float8_e5m2": 1, "ComplexFloat": 8}
_RANK_FILE = re.compile(r"^(.*?)(\d+)(\.pkl)?$")


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing {module}.{name}: a Flight Recorder dump holds plain values only")


def load(path) -> dict:
    """One rank's dump, unpickled without running anything in it."""
    path = Path(path)
    try:
        data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not a Flight Recorder dump ({e}); point at the files torch wrote "
                        "(TORCH_NCCL_DEBUG_INFO_TEMP_FILE<rank>)") from None
    if not isinstance(data, dict) or "version" not in data or not isinstance(data.get("entries", []), list):
        raise UserError(f"{path} is not a Flight Recorder dump (no version/entries); point at the files torch wrote")
    return data


def dump_sets(run_dir, extra: list | None = None) -> list[tuple[Path, dict[int, Path]]]:
    """(directory, {rank: file}) for every set of dumps: RUN_DIR/diagnostics/flight-recorder/,
    each gen-<G>/fr-r<R>.pkl, and the files or prefixes in ``extra``."""
    places = [Path(run_dir) / "diagnostics" / "flight-recorder"] + [Path(p) for p in extra or []]
    out = []
    for place in places:
        if place.is_dir():
            files = [p for p in place.iterdir() if p.is_file()]
        else:  # a prefix such as /tmp/nccl_trace_rank_
            files = [p for p in place.parent.glob(place.name + "*") if p.is_file()] if place.parent.is_dir() else []
        by_prefix: dict[str, dict[int, Path]] = {}
        for p in files:
            m = _RANK_FILE.match(p.name)
            if m and not p.name.startswith("."):
                by_prefix.setdefault(m.group(1), {})[int(m.group(2))] = p
        out += [(place if place.is_dir() else place.parent, ranks) for _, ranks in sorted(by_prefix.items())]
    for g in trace_generations(run_dir):
        ranks = {int(p.stem[4:]): p for p in g.glob("fr-r*.pkl") if p.stem[4:].isdigit()}
        if ranks:
            out.append((g, ranks))
    return out


def read_set(d: Path, files: dict[int, Path]) -> Generation:
    """One set of dumps as a Generation; its id is the newest file's mtime in ns."""
    return to_generation({r: load(p) for r, p in files.items()}, d, max(p.stat().st_mtime_ns for p in files.values()),
                         {r: p.stat().st_mtime for r, p in files.items()})


def _ranks(text) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", str(text))]


def to_generation(dumps: dict[int, dict], path: Path, gid: int, taken: dict[int, float]) -> Generation:
    """One Generation from one set of dumps (rank -> dump); ``taken``: rank -> dump time."""
    gen = Generation(path, gid, source="flight-recorder")
    members: dict[str, list[int]] = {}  # pg name -> global ranks
    for d in dumps.values():
        for name, info in (d.get("pg_config") or {}).items():
            if _ranks(info.get("ranks")):
                members[str(name)] = _ranks(info["ranks"])
    users: dict[str, set[int]] = {}  # pg name -> ranks whose dumps use it (when the dump names no ranks)
    for r, d in dumps.items():
        for e in d.get("entries", []):
            users.setdefault(str(e["process_group"][0]), set()).add(r)
    world = max([len(dumps), max(dumps, default=-1) + 1] + [max(m) + 1 for m in members.values()])
    for name, rs in users.items():
        if name not in members:
            default = any(str(e["process_group"][1]) == "default_pg" for d in dumps.values() for e in d.get("entries", [])
                          if str(e["process_group"][0]) == name)
            members[name] = list(range(world)) if default else sorted(rs)
    chan = {name: ",".join(map(str, m)) if len(m) <= 16 else f"pg{name}" for name, m in members.items()}
    for r, d in sorted(dumps.items()):
        inflight, seq = [], {}
        for e in d.get("entries", []):
            rec = _record(e, chan)
            if rec is None:
                continue
            seq[rec.channel] = max(seq.get(rec.channel, -1), rec.seq)
            if rec.ended is None:
                inflight.append(json.loads(encode(rec)))
            else:
                gen.add(r, rec)
        gen.meta[r] = {"rank": r, "world": world, "host": None, "source": "flight-recorder",
                       "version": d.get("version"), "file": str(path)}
        gen.state[r] = {"time": taken.get(r, 0.0), "step": 0, "phase": "", "inflight": inflight, "seq": seq,
                        "groups": {chan[n]: m for n, m in members.items()}, "closed": False, "error": ""}
    gen.world = world
    return gen


def _record(e: dict, chan: dict) -> OpRecord | None:
    name = str(e["process_group"][0])
    key = chan.get(name)
    if key is None:
        return None
    backend_op = str(e.get("profiling_name", ""))
    op = backend_op.split(":", 1)[-1]
    created = e["time_created_ns"] / 1e9
    started = e.get("time_discovered_started_ns")
    completed = e.get("time_discovered_completed_ns")
    if e.get("is_p2p") or op.startswith(("send", "recv")):
        return None  # its p2p_seq_id counts a rank's p2p ops with every peer: nothing to match across ranks
    seq = int(e.get("collective_seq_id", 0))
    # gloo's entries stay "scheduled" without times; it marks them retired when they complete.
    finished = e.get("state") == "completed" or bool(e.get("retired"))
    if completed is not None:
        ended = completed / 1e9
    elif finished:  # its time only if torch timed it
        ended = (started / 1e9 if started else created) + (e.get("duration_ms") or 0.0) / 1e3
    else:
        ended = None
    nbytes = sum(math.prod(s) for s in e.get("input_sizes", [])) * DTYPE_BYTES.get((e.get("input_dtypes") or ["Float"])[0], 4)
    return OpRecord(key, op, seq, -1, int(nbytes), str((e.get("input_dtypes") or [""])[0]), created,
                    started / 1e9 if started else created, ended, 0)
