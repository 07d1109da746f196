"""Reading the per-rank traces that comms.trace writes, incrementally and tolerantly.

A run directory holds ``diagnostics/gen-<G>/`` per process-group lifetime (one per torchrun
restart). A ``Generation`` tails its ``trace-r<R>.jsonl`` files (only whole lines; a line
cut by a crash is skipped and counted) and joins the ranks' records of the same op:
collectives by (group, sequence number), point-to-point by (direction, sequence number).
"""
from __future__ import annotations

import collections
import json
import statistics
from pathlib import Path

from comms import UserError

# Completed collectives kept for the report's wait timeline (about 50 steps of a
# 100-collective-per-step job).
TIMELINE = 5000


def generations(run_dir: Path) -> list[Path]:
    """The run's generation directories, oldest first."""
    d = Path(run_dir) / "diagnostics"
    gens = [p for p in d.glob("gen-*") if p.is_dir() and p.name[4:].isdigit()] if d.is_dir() else []
    return sorted(gens, key=lambda p: int(p.name[4:]))


class Generation:
    def __init__(self, path: Path):
        self.path = path
        self.id = int(path.name[4:])
        self.meta: dict[int, dict] = {}
        self.state: dict[int, dict] = {}
        self.world = 0
        self.damaged = 0  # lines that were not valid JSON records
        self._offset: dict[int, int] = {}
        self._colls: dict[tuple, dict] = {}  # (chan, seq) -> rank -> (arrived, ended, step, op, error)
        self._p2p: dict[tuple, dict] = {}  # (chan, seq) -> {"send": rec, "recv": rec}
        self.steps: dict[int, dict[int, tuple]] = collections.defaultdict(dict)  # rank -> step -> (start, end, phases)
        self.lateness: dict[int, dict[int, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        self.timeline: collections.deque = collections.deque(maxlen=TIMELINE)
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
        for p in self.path.glob("meta-r*.json"):
            r = int(p.stem[6:])
            if r not in self.meta:
                self.meta[r] = _read_json(p)
                self.world = max(self.world, self.meta[r].get("world", 0))
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
                rec = json.loads(line)
                kind = rec[0]
            except (ValueError, IndexError, TypeError):
                self.damaged += 1
                continue
            if kind == "s" and len(rec) == 5:
                self.steps[r][rec[1]] = (rec[2], rec[3], rec[4])
            elif kind == "c" and len(rec) == 13:
                self._add_op(r, rec)
            else:
                self.damaged += 1

    def _add_op(self, r: int, rec: list):
        _, chan, op, seq, peer, _n, _dt, arr, _st, end, step, err, blk = rec
        if err:
            self.errors[r] = err
        if end is None:
            return
        if "|" in chan:
            pair = self._p2p.setdefault((chan, seq), {})
            pair["recv" if "recv" in op else "send"] = (arr, end)
            if len(pair) == 2:
                del self._p2p[(chan, seq)]
                (s_arr, _), (r_arr, r_end) = pair["send"], pair["recv"]
                src, dst = self.members(chan)
                self.links[(src, dst)].append((step, (r_end - max(s_arr, r_arr)) * 1e3))
            return
        ranks = self._colls.setdefault((chan, seq), {})
        ranks[r] = (arr, end, step, blk)
        members = self.members(chan)
        if members and len(ranks) == len(members):
            del self._colls[(chan, seq)]
            # Clock-free lateness: all ranks leave together, so the one that waited least
            # arrived last, by (longest wait - its wait); minus what its own extra time blocked
            # in other ops since the last one here explains (not compute).
            waits = {q: e - a for q, (a, e, _s, _b) in ranks.items()}
            longest, least_blocked = max(waits.values()), min(b for *_x, b in ranks.values())
            for q, w in waits.items():
                late = (longest - w) - (ranks[q][3] - least_blocked)
                self.lateness[q][ranks[q][2]] += max(late, 0.0)
            self.timeline.append((chan, seq, op, step, {q: (a, e) for q, (a, e, _s, _b) in ranks.items()}))

    # ---- derived views -------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps every rank has finished, in order."""
        if not self.meta or len(self.steps) < len(self.meta):
            return []
        common = set.intersection(*(set(s) for s in self.steps.values()))
        return sorted(common)

    def training_steps(self) -> list[int]:
        """Complete steps without a checkpoint save: saving is rank-asymmetric by design
        (one rank commits the manifest while the others wait), so those steps say nothing
        about stragglers."""
        return [s for s in self.complete_steps() if not any("checkpoint" in self.steps[r][s][2] for r in self.steps)]

    def step_time(self, step: int) -> float:
        return statistics.median(self.steps[r][step][1] - self.steps[r][step][0] for r in self.steps)

    def late_fraction(self, rank: int, step: int) -> float:
        """Share of step ``step`` the others spent waiting for ``rank`` to arrive."""
        t = self.step_time(step)
        return self.lateness[rank].get(step, 0.0) / t if t > 0 else 0.0

    def heartbeat(self) -> float:
        return max((s.get("time", 0.0) for s in self.state.values()), default=0.0)

    def node_of(self, rank: int) -> dict:
        m = self.meta.get(rank, {})
        return {"rank": rank, "node": m.get("node"), "host": m.get("host")}


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{p} is damaged ({e}); delete that generation directory or point at another run") from None
