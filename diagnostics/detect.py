"""Classifying a job's traces into verdicts (C4D's rules, MegaScale-style scores).

Training is periodic and homogeneous: every rank issues the same collectives in the same
order, each step looks like the last. So, per generation of the job:

- crash: a rank's heartbeat stopped (its writer thread is gone) and it left no sign of
  being stopped by someone else (no SIGTERM stack, no collective error), while others did;
- hang, non-communication: ranks have waited in collective (group, #s) longer than
  ``hang_s`` while others never issued #s: those others (and their nodes) are the suspects;
- hang, communication: every member issued #s and it never completes: the group is suspect;
- compute straggler: a rank the others keep waiting for. Per complete collective, the rank
  that waited least arrived last, by (longest wait - its wait) (no cross-node clocks
  needed); per step that lateness is a share of the step time. A rank is flagged when, over
  the last ``straggler_window`` steps, it was the latest in at least ``straggler_persistence``
  of them and its median share is at least ``straggler_threshold``;
- slow link: per point-to-point pair, transfer time = receiver's completion - the later of
  the two arrivals (wall clocks: same host exact, across hosts as good as NTP). A cell is
  slow when its median exceeds ``link_factor`` x the typical cell + ``link_min_ms`` in most
  recent samples; a whole slow row is a bad sender, a whole column a bad receiver.

``Detector.poll()`` reads what is new and returns verdicts not reported before. It never
touches the job except to ask local ranks for their stacks on a hang (SIGUSR1, py-spy).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diagnostics.config import DiagnosticsConfig
from diagnostics.traces import Generation, generations


@dataclass
class Verdict:
    kind: str  # crash | hang_noncomm | hang_comm | straggler | slow_link
    suspects: list  # [{"rank", "node", "host"}] or [{"link": [src, dst]}] or [{"group": [...]}]
    evidence: dict
    confidence: float
    time: float
    generation: int = 0
    key: str = field(default="", repr=False)  # what makes two polls' verdicts the same

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("key")
        return d

    def line(self) -> str:
        who = ", ".join(_suspect_str(s) for s in self.suspects)
        return f"{self.kind}: {who} (confidence {self.confidence:.2f}) {self.evidence.get('summary', '')}".rstrip()


def _suspect_str(s: dict) -> str:
    if "link" in s:
        return f"link {s['link'][0]}->{s['link'][1]}"
    if "group" in s:
        return f"group [{','.join(map(str, s['group']))}]"
    role = f" ({s['role']})" if s.get("role") else ""
    return f"rank {s['rank']}{role} on node {s.get('node')} ({s.get('host')})"


class Detector:
    """Watches a run directory. ``live=True``: ``now`` is the wall clock and generations
    older than the detector are ignored; ``live=False`` (reports): each generation is judged
    at its own last heartbeat, so finished, crashed and running jobs all read the same."""

    def __init__(self, run_dir, cfg: DiagnosticsConfig | None = None, *, live: bool = True,
                 dump_stacks: bool = True):
        self.run_dir = Path(run_dir)
        self.cfg = cfg or DiagnosticsConfig()
        self.live = live
        self.dump = dump_stacks
        self.started = time.time()
        self.gens: dict[int, Generation] = {}
        self._seen: set[str] = set()
        self.verdicts: list[Verdict] = []

    def poll(self, now: float | None = None) -> list[Verdict]:
        for p in generations(self.run_dir):
            gid = int(p.name[4:])
            if gid not in self.gens and (not self.live or gid / 1e9 >= self.started - 30):
                self.gens[gid] = Generation(p)
        new = []
        for gen in self.gens.values():
            gen.update()
            if not gen.meta:
                continue
            t = now if now is not None else (time.time() if self.live else gen.heartbeat())
            hung = any(v.generation == gen.id and v.kind.startswith("hang") for v in self.verdicts)
            crashed = any(v.generation == gen.id and v.kind == "crash" for v in self.verdicts)
            # After a crash the survivors sit in their next collective until torchrun stops
            # them: that is the crash's fallout, not a second fault.
            found = [] if crashed else self._hang(gen, t)
            # Once a generation hangs, ranks dying later are someone ending it (an operator,
            # the launcher), not a crash.
            found += [] if hung or found else self._crash(gen, t)
            for v in found + self._straggler(gen, t) + self._links(gen, t):
                if v.key not in self._seen:
                    self._seen.add(v.key)
                    v.generation = gen.id
                    if v.kind.startswith("hang") and self.dump:
                        v.evidence["stacks"] = dump_stacks(gen)
                    new.append(v)
        self.verdicts += new
        return new

    # ---- rules ------------------------------------------------------------------------
    def _crash(self, gen: Generation, now: float) -> list[Verdict]:
        victims: dict[int, float] = {}  # rank -> when it was seen failing (collective error or SIGTERM)
        still = []
        for r, st in gen.state.items():
            term = gen.path / f"term-r{r}.txt"
            if term.exists() and term.stat().st_size > 0:
                victims[r] = term.stat().st_mtime
            elif st.get("error"):
                victims[r] = st.get("time", now)
            elif not st.get("closed"):
                still.append(r)
        # Gone: no heartbeat for stale_s, or none since the first failure (a live rank writes
        # one every 0.5 s; live, a second of grace lets it), so a crash is named as soon as the ranks
        # it took down are seen, not stale_s later.
        first_fail = min(victims.values(), default=None)
        dead = [r for r in still if now - gen.state[r].get("time", 0) > self.cfg.stale_s
                or (first_fail is not None and now - first_fail >= (1.0 if self.live else 0.0) and gen.state[r].get("time", 0) < first_fail)]
        alive = [r for r in gen.state if r not in dead and r not in victims]
        if not dead or not (victims or alive):  # everyone killed without a trace: nothing to say
            return []
        faults = {r: _head(gen.path / f"fault-r{r}.txt") for r in dead}
        ev = {"summary": f"rank(s) {dead} stopped without a stack or error; {len(victims)} rank(s) failed after them",
              "last_heartbeat": {r: gen.state[r].get("time") for r in dead},
              "last_step": {r: gen.state[r].get("step") for r in dead},
              "victims": {r: gen.state[r].get("error") or "terminated (SIGTERM)" for r in victims},
              "fatal_signal": {r: f for r, f in faults.items() if f}}
        return [Verdict("crash", [gen.node_of(r) for r in dead], ev, 0.9 if victims else 0.7, now,
                        key=f"{gen.id}:crash:{dead}")]

    def _hang(self, gen: Generation, now: float) -> list[Verdict]:
        steps = gen.complete_steps()
        typical = statistics.median(gen.step_time(s) for s in steps[-20:]) if steps else 0.0
        out = []
        stuck: dict[tuple, dict] = {}  # (chan, seq) -> rank -> arrival
        for r, st in gen.state.items():
            for chan, op, seq, _peer, arr in st.get("inflight", []):
                stuck.setdefault((chan, seq), {})[r] = (arr, op)
        for (chan, seq), waiting in sorted(stuck.items(), key=lambda kv: min(a for a, _ in kv[1].values())):
            members = gen.members(chan)
            missing = [m for m in members if m not in waiting and gen.state.get(m, {}).get("seq", {}).get(chan, -1) < seq]
            oldest = min(a for a, _ in waiting.values())
            limit = self._hang_limit(gen, missing, typical, bool(steps))
            if now - oldest < limit or any(_stale(gen, m, now, self.cfg.stale_s) for m in missing):
                continue  # a dead rank is the crash rule's, not a hang
            op = next(iter(waiting.values()))[1]
            ev = {"group": members, "channel": chan, "op": op, "seq": seq, "waited_s": round(now - oldest, 2),
                  "limit_s": round(limit, 2), "arrived": {r: a for r, (a, _o) in waiting.items()},
                  "typical_step_s": round(typical, 4)}
            if missing:
                ev["summary"] = f"ranks {sorted(waiting)} wait in {op} #{seq} for {now - oldest:.1f}s; {missing} never arrived"
                ev["missing_state"] = {m: {k: gen.state.get(m, {}).get(k) for k in ("step", "phase")} for m in missing}
                out.append(Verdict("hang_noncomm", [gen.node_of(m) for m in missing], ev, 0.9, now,
                                   key=f"{gen.id}:hang_noncomm:{missing}"))
            else:
                ev["summary"] = f"all of group {members} entered {op} #{seq} {now - oldest:.1f}s ago; it never completed"
                out.append(Verdict("hang_comm", [{"group": members, "nodes": sorted({gen.node_of(m)["node"] for m in members})}],
                                   ev, 0.6, now, key=f"{gen.id}:hang_comm:{chan}"))
            break  # the oldest stuck op explains the rest
        return out

    def _hang_limit(self, gen: Generation, missing: list, typical: float, started: bool) -> float:
        c = self.cfg
        if not started or any(gen.state.get(m, {}).get("phase") == "checkpoint" for m in missing):
            return c.hang_slow_phase_s  # loading or saving a checkpoint may legitimately take long
        return max(c.hang_min_s, c.hang_factor * typical)

    def _straggler(self, gen: Generation, now: float) -> list[Verdict]:
        c = self.cfg
        steps = gen.training_steps()[1:]  # the first carries start-up skew
        window = steps[-c.straggler_window:]
        if len(window) < c.straggler_window or len(gen.meta) < 2:
            return []
        ranks = sorted(gen.meta)
        fracs = {r: [gen.late_fraction(r, s) for s in window] for r in ranks}
        latest = [max(ranks, key=lambda r: fracs[r][i]) for i in range(len(window))]
        out = []
        for r in ranks:
            share = latest.count(r) / len(window)
            med = statistics.median(fracs[r])
            if share >= c.straggler_persistence and med >= c.straggler_threshold:
                before = [gen.late_fraction(r, s) for s in steps[:-c.straggler_window]]
                ev = {"summary": f"others waited a median {med:.0%} of each step for it; latest in {share:.0%} of steps {window[0]}-{window[-1]}",
                      "score": round(1 - med, 3), "best_score": round(1 - min(statistics.median(f) for f in fracs.values()), 3),
                      "median_late_share": round(med, 4), "latest_share": share, "steps": [window[0], window[-1]],
                      "history_late_share": round(statistics.median(before), 4) if before else None,
                      "step_time_s": round(gen.step_time(window[-1]), 4)}
                out.append(Verdict("straggler", [gen.node_of(r)], ev, round(share, 2), now,
                                   key=f"{gen.id}:straggler:{r}"))
        return out

    def _links(self, gen: Generation, now: float) -> list[Verdict]:
        c = self.cfg
        recent = {cell: [ms for _s, ms in v[-c.link_window:]] for cell, v in gen.links.items() if len(v) >= c.link_window}
        if len(recent) < 2:
            return []
        meds = sorted(statistics.median(v) for v in recent.values())
        typical = meds[(len(meds) - 1) // 2]  # the lower median: robust when half the cells are slow
        limit = c.link_factor * typical + c.link_min_ms
        slow = {cell for cell, v in recent.items() if sum(ms > limit for ms in v) >= c.straggler_persistence * len(v)}
        if not slow:
            return []
        suspects, covered = [], set()
        for axis, role in ((0, "sender"), (1, "receiver")):
            for r in sorted({cell[axis] for cell in slow}):
                line = [cell for cell in recent if cell[axis] == r]
                if len(line) >= 2 and all(cell in slow for cell in line):
                    suspects.append({**gen.node_of(r), "role": role})
                    covered |= set(line)
        suspects += [{"link": list(cell), "nodes": [gen.node_of(cell[0])["node"], gen.node_of(cell[1])["node"]]}
                     for cell in sorted(slow - covered)]
        ev = {"summary": f"{len(slow)} of {len(recent)} src->dst pairs slower than {limit:.1f} ms (typical {typical:.2f} ms)",
              "median_ms": {f"{s}->{d}": round(statistics.median(v), 3) for (s, d), v in recent.items()},
              "limit_ms": round(limit, 3)}
        key = f"{gen.id}:slow_link:{sorted(slow)}"
        return [Verdict("slow_link", suspects, ev, 0.8, now, key=key)]


def _stale(gen: Generation, rank: int, now: float, stale_s: float) -> bool:
    st = gen.state.get(rank)
    return st is None or (now - st.get("time", 0) > stale_s and not st.get("closed"))


def _head(p: Path, n: int = 400) -> str:
    try:
        return p.read_text()[:n].strip()
    except OSError:
        return ""


def dump_stacks(gen: Generation) -> list[str]:
    """Ask every rank of ``gen`` running on this host for its Python stacks (faulthandler on
    SIGUSR1, py-spy too when installed); returns the files, relative to the run directory."""
    host, files = socket.gethostname(), []
    pyspy = shutil.which("py-spy")
    for r, m in sorted(gen.meta.items()):
        if m.get("host") != host:
            continue
        try:
            os.kill(m["pid"], signal.SIGUSR1)
        except (ProcessLookupError, PermissionError):
            continue
        stacks = gen.path / f"stacks-r{r}.txt"
        files.append(str(stacks))
        for _ in range(40):  # the rank writes on delivery; give it up to 2 s
            if stacks.stat().st_size > 0:
                break
            time.sleep(0.05)
        if pyspy:
            out = gen.path / f"pyspy-r{r}.txt"
            with open(out, "w") as f:
                subprocess.run([pyspy, "dump", "--pid", str(m["pid"])], stdout=f, stderr=subprocess.STDOUT, timeout=30)
            files.append(str(out))
    return [os.path.relpath(f, gen.path.parent.parent) for f in files]


def stop_all(pids: list[int]):
    """SIGSTOP every process, then SIGKILL: none of them sees the others go first (which
    would read as a crash followed by its victims)."""
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def write_verdicts(run_dir, verdicts: list[Verdict]):
    """Append verdicts to RUN_DIR/diagnostics/verdicts.jsonl."""
    if not verdicts:
        return
    p = Path(run_dir) / "diagnostics" / "verdicts.jsonl"
    with open(p, "a") as f:
        for v in verdicts:
            f.write(json.dumps({**v.to_json(), "by": f"{socket.gethostname()}:{os.getpid()}"}) + "\n")
