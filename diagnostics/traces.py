"""Reading the per-rank traces that comms.trace writes, incrementally and tolerantly.

A run directory holds ``diagnostics/gen-<G>/`` per process-group lifetime (one per torchrun
restart). A ``Generation`` tails its ``trace-r<R>.jsonl`` files (only whole lines; a line
cut by a crash is skipped and counted), decodes them into ``comms.trace`` records and joins
the ranks' records of the same op: collectives by (group, sequence number), point-to-point
by (direction, sequence number). The same joins serve records from other sources (torch's
Flight Recorder, ``diagnostics.flight``) through ``add``.
"""
from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

from comms import UserError
from comms.records import TRACE_FORMAT, OpRecord, StepRecord, decode

# Completed collectives kept for the report's wait timeline (about 50 steps of a
# 100-collective-per-step job).
TIMELINE = 5000
# Phases that make a step rank-asymmetric by design (one rank commits a checkpoint while the
# others wait; the probe's pairs): such steps say nothing about stragglers.
ASYMMETRIC = ("checkpoint", "probe")


def generations(run_dir: Path) -> list[Path]:
    """The run's generation directories, oldest first."""
    d = Path(run_dir) / "diagnostics"
    gens = [p for p in d.glob("gen-*") if p.is_dir() and p.name[4:].isdigit()] if d.is_dir() else []
    return sorted(gens, key=lambda p: int(p.name[4:]))


class Generation:
    """One process-group lifetime: its ranks' metadata, state, steps and joined ops.

    ``source`` says where the records come from: ``trace`` (comms.trace's files, with
    heartbeats and steps) or ``flight-recorder`` (torch's dumps: ops only, no heartbeat).
    """

    def __init__(self, path: Path, gid: int | None = None, source: str = "trace"):
        self.path = Path(path)
        self.id = int(self.path.name[4:]) if gid is None else gid
        self.source = source
        self.meta: dict[int, dict] = {}
        self.state: dict[int, dict] = {}
        self.world = 0
        self.damaged = 0  # lines that were not valid records
        self._offset: dict[int, int] = {}
        self._meta_mtime: dict[int, int] = {}
        self._colls: dict[tuple, dict] = {}  # (chan, seq) -> rank -> OpRecord, until every member's is in
        self._p2p: dict[tuple, dict] = {}  # (chan, seq) -> {"send": OpRecord, "recv": OpRecord}
        self._p2p_end: dict[str, float] = {}  # p2p channel -> when its latest transfer ended
        self.steps: dict[int, dict[int, StepRecord]] = collections.defaultdict(dict)  # rank -> step -> record
        self._step_time: dict[int, float] = {}
        self._finished: dict[int, int] = collections.defaultdict(int)  # step -> ranks that finished it
        self._asymmetric: set[int] = set()  # steps some rank spent partly in an ASYMMETRIC phase
        self._first: int | None = None  # the generation's first complete step (start-up skew)
        # rank -> step -> seconds the others waited for this rank (clock-free, see _add_op)
        self.lateness: dict[int, dict[int, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        # channel -> step -> seconds its collectives took once every member was in (p2p: its transfers)
        self.comm: dict[str, dict[int, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        self.comm_bytes: dict[str, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=256))
        self.timeline: collections.deque = collections.deque(maxlen=TIMELINE)  # (chan, seq, op, step, {rank: (arrived, ended)})
        self.links: dict[tuple[int, int], list[tuple[int, float]]] = collections.defaultdict(list)  # (src, dst) -> (step, ms)
        self.errors: dict[int, str] = {}

    def members(self, chan: str) -> list[int]:
        if "|" in chan:  # p2p direction "group|src>dst"
            src, dst = chan.split("|")[1].split(">")
            return [int(src), int(dst)]
        for st in self.state.values():
            if chan in st.get("groups", {}):
                return st["groups"][chan]
        return [int(r) for r in chan.split(",")] if chan[:1].isdigit() else []

    def update(self):
        """Read what the ranks wrote since the last call."""
        if self.source != "trace":
            return
        for p in self.path.glob("meta-r*.json"):
            r = int(p.stem[6:])
            mtime = p.stat().st_mtime_ns
            if self._meta_mtime.get(r) != mtime:  # new, or annotated by its rank (comms.trace.Tracer.annotate)
                self._meta_mtime[r] = mtime
                meta = _read_json(p)
                if meta.get("trace_format") != TRACE_FORMAT:
                    raise UserError(f"{p} was written by another version of Kintsugi (trace format "
                                    f"{meta.get('trace_format', 1)}, this one reads {TRACE_FORMAT}); read it with that version")
                self.meta[r] = meta
                self.world = max(self.world, meta.get("world", 0))
        for r in self.meta:
            p = self.path / f"state-r{r}.json"
            if p.exists():
                try:
                    self.state[r] = json.loads(p.read_text())
                except (OSError, ValueError):  # replaced atomically, so only a foreign edit gets here
                    self.damaged += 1
            self._tail(r)

    def _tail(self, r: int):
        p = self.path / f"trace-r{r}.jsonl"
        try:
            with open(p, "rb") as f:
                f.seek(self._offset.get(r, 0))
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        self._offset[r] = self._offset.get(r, 0) + end
        for line in data[:end].splitlines():
            try:
                rec = decode(line)
            except ValueError:
                self.damaged += 1
                continue
            self.add(r, rec)

    def add(self, r: int, rec: OpRecord | StepRecord):
        """One record of rank ``r``, from any source."""
        if isinstance(rec, StepRecord):
            if rec.step not in self.steps[r]:
                self._finished[rec.step] += 1
            self.steps[r][rec.step] = rec
            if any(p in rec.phases for p in ASYMMETRIC):
                self._asymmetric.add(rec.step)
            return
        if rec.error:
            self.errors[r] = rec.error
        if rec.ended is None:
            return
        if "|" in rec.channel:
            pair = self._p2p.setdefault((rec.channel, rec.seq), {})
            pair["recv" if "recv" in rec.op else "send"] = rec
            if len(pair) == 2:
                del self._p2p[(rec.channel, rec.seq)]
                send, recv = pair["send"], pair["recv"]
                src, dst = self.members(rec.channel)
                # A transfer begins once both ends are in and the one before it on the same
                # connection is through (back-to-back sends queue behind each other).
                took = recv.ended - max(send.arrived, recv.arrived, self._p2p_end.get(rec.channel, 0.0))
                self._p2p_end[rec.channel] = max(recv.ended, self._p2p_end.get(rec.channel, 0.0))
                self.links[(src, dst)].append((recv.step, took * 1e3))
                # Per step too, like a collective's time once every member is in (slow_comm).
                self.comm[rec.channel][recv.step] += took
                self.comm_bytes[rec.channel].append(max(send.nbytes, recv.nbytes))
            return
        ranks = self._colls.setdefault((rec.channel, rec.seq), {})
        ranks[r] = rec
        members = self.members(rec.channel)
        if members and len(ranks) == len(members):
            del self._colls[(rec.channel, rec.seq)]
            self._join(rec.channel, rec.op, rec.seq, ranks)

    def _join(self, chan: str, op: str, seq: int, ranks: dict[int, OpRecord]):
        # Clock-free lateness: all ranks leave together, so the one that waited least
        # arrived last, by (longest wait - its wait); minus what its own extra time blocked
        # in other ops since the last one here explains (not compute).
        waits = {q: x.ended - x.arrived for q, x in ranks.items()}
        longest, shortest = max(waits.values()), min(waits.values())
        least_blocked = min(x.blocked for x in ranks.values())
        for q, w in waits.items():
            late = (longest - w) - (ranks[q].blocked - least_blocked)
            self.lateness[q][ranks[q].step] += max(late, 0.0)
        # Once the last member is in, the op takes what the network (and the reduction) need:
        # the shortest wait. It grows with a slow link even when nobody arrives late.
        step = min(x.step for x in ranks.values())
        self.comm[chan][step] += shortest
        self.comm_bytes[chan].append(max(x.nbytes for x in ranks.values()))
        self.timeline.append((chan, seq, op, step, {q: (x.arrived, x.ended) for q, x in ranks.items()}))

    def inflight(self, r: int) -> list[OpRecord]:
        """Rank ``r``'s ops in flight at its last heartbeat."""
        out = []
        for d in self.state.get(r, {}).get("inflight", []):
            try:
                out.append(decode(d))
            except ValueError:
                self.damaged += 1
        return out

    def forget(self, before: int):
        """Drop per-step data of steps before ``before`` (a live watcher of a long job needs
        only its recent history; reports keep everything)."""
        for per in (*self.steps.values(), *self.lateness.values(), *self.comm.values()):
            for s in [s for s in per if s < before]:
                del per[s]
        for s in [s for s in self._finished if s < before]:
            del self._finished[s]
            self._step_time.pop(s, None)
            self._asymmetric.discard(s)
        for cell, v in self.links.items():
            self.links[cell] = [x for x in v if x[0] >= before]

    # ---- derived views -------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps every rank has finished, in order."""
        if not self.meta:
            return []
        done = sorted(s for s, n in self._finished.items() if n >= len(self.meta))
        if done and self._first is None:
            self._first = done[0]
        return done

    def training_steps(self) -> list[int]:
        """Complete steps that say something about stragglers: not the generation's first
        (start-up skew), none with a rank-asymmetric phase (``ASYMMETRIC``)."""
        return [s for s in self.complete_steps() if s != self._first and s not in self._asymmetric]

    def step_time(self, step: int) -> float:
        t = self._step_time.get(step)
        if t is None:
            t = statistics.median(self.steps[r][step].end - self.steps[r][step].start for r in self.steps)
            if len(self.steps) == len(self.meta):  # complete: it will not change
                self._step_time[step] = t
        return t

    def step_end(self, step: int) -> float:
        return max(self.steps[r][step].end for r in self.steps if step in self.steps[r])

    def late_fraction(self, rank: int, step: int) -> float:
        """Share of step ``step`` the others spent waiting for ``rank`` to arrive."""
        t = self.step_time(step)
        return self.lateness[rank].get(step, 0.0) / t if t > 0 else 0.0

    def own_time(self, rank: int, step: int) -> float | None:
        """Seconds of step ``step`` rank ``rank`` spent outside traced ops (its own work: compute,
        data, Python), or None where its trace does not say how long it was blocked."""
        rec = self.steps[rank].get(step)
        if rec is None or rec.blocked is None:
            return None
        return max(rec.end - rec.start - rec.blocked, 0.0)

    def cpu_wait(self, rank: int, step: int) -> float | None:
        """Seconds of step ``step`` rank ``rank``'s training thread waited for a CPU, or None
        where its trace does not say."""
        rec = self.steps[rank].get(step)
        return None if rec is None else rec.cpu_wait

    def heartbeat(self) -> float:
        return max((s.get("time", 0.0) for s in self.state.values()), default=0.0)

    def node_of(self, rank: int) -> dict:
        m = self.meta.get(rank, {})
        return {"rank": rank, "node": m.get("node"), "host": m.get("host")}

    def hosts(self, ranks) -> dict[str, list[int]]:
        """host -> its ranks among ``ranks``."""
        out: dict[str, list[int]] = {}
        for r in sorted(ranks):
            out.setdefault(self.meta.get(r, {}).get("host") or f"rank {r}", []).append(r)
        return out

    def probes(self) -> dict[str, dict]:
        """Link probes of this generation: id -> {"request", "results": {rank: dict}}."""
        out: dict[str, dict] = {}
        if self.source != "trace":
            return out
        # Each request is in the history (probe-request-<id>.json) and, the newest, also in the
        # live file: the history's copy is read, whatever order the directory lists them in.
        for p in sorted(self.path.glob("probe-request*.json"), key=lambda p: p.name != "probe-request.json"):
            req = _read_json(p, missing_ok=True)
            if req.get("id"):
                out[req["id"]] = {"request": req, "results": {}}
        for p in self.path.glob("probe-*-r*.json"):
            res = _read_json(p, missing_ok=True)
            if res.get("id") in out:
                out[res["id"]]["results"][int(res["rank"])] = res
        return out


def _read_json(p: Path, missing_ok: bool = False) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        if missing_ok:  # a file being replaced as we read, or one not written yet
            return {}
        raise UserError(f"{p} is damaged ({e}); delete that generation directory or point at another run") from None
