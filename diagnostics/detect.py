"""Classifying a job's traces into verdicts (C4D's rules, MegaScale-style scores, a noise
floor learned from the job's own steps).

Training is periodic and homogeneous: every rank issues the same collectives in the same
order, each step looks like the last. ``RULES`` below is the detector: one row per rule,
its handler, the verdict kinds it emits, and the kinds that silence it in a generation once
found there (rows run in this order, so a kind found earlier in the same poll silences the
later rows too). In short:

- hang: ranks have waited in collective (group, #s) longer than the hang limit while others
  never issued #s (non-communication: those others are the suspects), or every member
  issued it and it never completes (communication: the group). A member whose whole process
  froze (heartbeat stopped, process still there, e.g. SIGSTOP) is the suspect whether or not
  it had entered the op. When the ranks' stalled TCP connections (``comms.sockets``:
  unacknowledged data, retransmission timeouts) all lead to or from one host, that host is
  cut off the network and is the suspect (hang_comm); between just two hosts, their link.
  Limit: max(``hang_min_s``, ``hang_factor`` x the median step, 2 x the longest recent step).
  Ranks stuck inside a link probe (untraced transfers: no op in flight, their state's phase
  says where they are) past the limit: a frozen rank, or where their stalled connections lead;
- crash: a rank's heartbeat stopped, its process is gone (or not visible from here) and it
  left no sign of being stopped by someone else (no SIGTERM stack, no collective error);
- straggler: a rank the others keep waiting for. Per complete collective the rank that
  waited least arrived last, by (longest wait - its wait), no cross-node clocks needed, less
  its extra time blocked waiting on other ops; per step that lateness is a share of the
  step time. Named when, over the last ``straggler_window`` steps against the
  ``history_steps`` before them (``diagnostics.floor``), over windows in a row spanning
  ``confirm_s`` and at ``CONFIRM`` of their ends: its lateness rose beyond its own noise (and
  by ``straggler_threshold``; in every window of the run), it was the latest rank in
  ``straggler_persistence`` of the window, and the job's step time rose with it (else the
  wait only moved between ranks) by
  at most 3 times its extra lateness (else the job slowed for another reason), and its
  extra lateness exceeds any channel's rise in collective time (a slow link also makes the
  ranks at its ends late: the larger rise is the cause). Or, where the others do not wait
  for it inside collectives (a pipeline's stages), its own work (step time less its time
  blocked in traced ops) rose like that, by ``OWN_LEAD`` x any other rank's rise or while
  only its thread waits longer for a CPU (schedstat's run-queue delay). From the
  first window that shows the rise, later windows keep the history from before it. A rank
  that is always a little late (rank 0 logging) has no rise and is not named; one that costs
  the job ``straggler_sustained`` of every step over a window and its history is (no onset
  to see), unless it is a pipeline stage (they differ by design). A rank late only by
  lateness (not its own work) at an end of a link a probe found slow is that link's echo:
  the link is named, not the rank;
- slow_comm: the job slowed, a group's collectives (or a point-to-point direction's
  transfers) take ``comm_factor`` x longer once every member is in (beyond the floor,
  explaining a third of the slowdown and more than any late rank, held like a straggler's
  onset): the network or the collective itself is slow. Live, the monitor then asks for a
  link probe; when the job slowed and neither explains it, it asks for one among all the
  job's hosts (once per generation; no verdict unless the probe names a link);
- periodic probe: live, with ``probe_every_s`` set, a link probe among all the job's hosts
  that often, with no slowdown to explain (C4P's periodic probing), links only;
- probe: a finished link probe (``diagnostics.probe``) names a prober short of CPU
  (straggler), or finds slow directions: then a second probe repeats it (with a payload
  scaled so that a typical transfer takes ``probe.REPEAT_MS``: milliseconds of waiting for a
  CPU do not pass for a link there), and the directions slow in both are named (slow_link);
- p2p links: per point-to-point pair (pipeline sends), transfer time = receiver's completion
  - the latest of the two arrivals and the previous transfer's end; slow cells as in
  ``diagnostics.links``.

``Detector.poll()`` reads what is new and returns verdicts not reported before. Windowed
rules judge every step once, in order, so a report written after the job reads the same
verdicts as the monitor that watched it. The detector never touches the job except to ask
local ranks for their stacks on a hang (SIGUSR1, py-spy), to note processes it found frozen,
and, live, to request a link probe.
"""
from __future__ import annotations

import bisect
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from comms.records import hostname

from diagnostics import probe
from diagnostics.config import DiagnosticsConfig
from diagnostics.floor import mean_shift, shift
from diagnostics.links import name_cells, slow_cells
from diagnostics.traces import Generation, generations

HANGS = ("hang_noncomm", "hang_comm")
# Steps of recent history that set the hang limit.
HANG_HISTORY = 20
# Window ends in a row a slowdown's onset must hold at (and over confirm_s): a chance run of
# late steps regresses within a few steps, a slower rank does not.
CONFIRM = 5
# A rank's own work is the straggler's evidence only when it slowed this many times more than
# any other rank's: a busy machine slows every rank's work a little at once.
OWN_LEAD = 2.0


@dataclass
class Verdict:
    kind: str  # crash | hang_noncomm | hang_comm | straggler | slow_comm | slow_link
    suspects: list  # [{"rank", "node", "host"[, "role"]}] or [{"link": [src, dst]}] or [{"group": [...]}]
    evidence: dict
    confidence: float
    time: float  # when it was found (live) or could have been (reports: the evidence's last step)
    generation: int = 0
    since: float = 0.0  # wall clock of the fault's onset, as far as the evidence shows
    key: str = field(default="", repr=False)  # what makes two polls' verdicts the same

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("key")
        return d

    def line(self) -> str:
        who = ", ".join(suspect_str(s) for s in self.suspects)
        return f"{self.kind}: {who} (confidence {self.confidence:.2f}) {self.evidence.get('summary', '')}".rstrip()


def suspect_str(s: dict) -> str:
    if "link" in s:
        return f"link {s['link'][0]}->{s['link'][1]}" + (f" ({s['hosts'][0]} -> {s['hosts'][1]})" if s.get("hosts") else "")
    if "group" in s:
        return f"group [{','.join(map(str, s['group']))}]"
    role = f" ({s['role']})" if s.get("role") else ""
    where = f" on node {s.get('node')} ({s.get('host')})" if s.get("host") else ""  # Flight Recorder dumps name no host
    return f"rank {s['rank']}{role}{where}"


@dataclass(frozen=True)
class Rule:
    name: str
    handler: str  # Detector method: (gen, now) -> [Verdict]
    emits: tuple[str, ...]
    silenced_by: tuple[str, ...]  # kinds that, once found in the generation, stop this rule there
    why: str


RULES = (
    Rule("hang", "_hang", HANGS, ("crash",),
         "after a crash the survivors sit in their next collective until torchrun stops them: fallout, not a second fault"),
    Rule("crash", "_crash", ("crash",), HANGS,
         "ranks that die once a hang is named are someone ending it (an operator, the launcher)"),
    Rule("periodic probe", "_periodic_probe", (), (), "asks for a probe only: the probe rule names what it finds"),
    Rule("probe", "_probe", ("slow_link", "straggler"), (),
         "a prober short of CPU is named as a straggler and its transfers are not judged"),
    Rule("p2p links", "_links", ("slow_link",), (), ""),
    Rule("straggler", "_straggler", ("straggler",), (),
         "runs after the link rules: a rank late at an end of a link found slow in the same poll is its echo"),
    Rule("slow_comm", "_slow_comm", ("slow_comm",), (),
         "needs no late rank in the same window: a straggler makes the others wait inside collectives"),
)


class Detector:
    """Watches a run directory. ``live=True``: ``now`` is the wall clock and generations
    older than the detector are ignored; ``live=False`` (reports): each generation is judged
    at its own last heartbeat, so finished, crashed and running jobs all read the same.
    ``flight_recorder``: more places to look for torch Flight Recorder dumps (see
    ``diagnostics.flight``)."""

    def __init__(self, run_dir, cfg: DiagnosticsConfig | None = None, *, live: bool = True,
                 dump_stacks: bool = True, flight_recorder: list | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg or DiagnosticsConfig()
        self.live = live
        self.dump = dump_stacks
        self.flight_recorder = list(flight_recorder or [])
        self.started = time.time()
        self.gens: dict[int, Generation] = {}
        self._seen: set[str] = set()
        self._fr_sets: dict[tuple, int] = {}  # (directory, ranks) of Flight Recorder dumps read -> generation
        self._judged: dict[tuple[int, str], int] = {}  # (generation, rule) -> the last window end judged
        self._windows: dict[tuple[int, int], dict] = {}  # (generation, window end) -> window statistics
        # (generation, "late" | "comm", rank | channel) -> (window ends in a row with an onset,
        # the first one's end time, the first step of the window that pins the history (None:
        # no pin), the last window end that showed it)
        self._streak: dict[tuple, tuple] = {}
        self.probes: dict[int, dict[str, dict]] = {}  # generation -> probe id -> analysis
        self._probe_due: dict[int, float] = {}  # generation -> when its next periodic probe may be asked for
        # generation -> source (a probe id, "p2p") -> the (src, dst) cells it found slow (named,
        # or found once and being repeated)
        self._slow_cells: dict[int, dict[str, set]] = {}
        self.verdicts: list[Verdict] = []

    def poll(self, now: float | None = None) -> list[Verdict]:
        self._discover()
        new = []
        for gen in self.gens.values():
            gen.update()
            if not gen.meta:
                continue
            t = now if now is not None else (time.time() if self.live else gen.heartbeat())
            found = {v.kind for v in self.verdicts if v.generation == gen.id}
            for rule in RULES:
                if found & set(rule.silenced_by):
                    continue
                for v in getattr(self, rule.handler)(gen, t):
                    if v.key in self._seen:
                        continue
                    self._seen.add(v.key)
                    v.generation = gen.id
                    found.add(v.kind)
                    if v.kind in HANGS and self.dump:
                        v.evidence["stacks"] = dump_stacks(gen)
                    new.append(v)
            self._windows.clear()
            if self.live:  # keep what the windows and the hang limit still look at
                steps = gen.training_steps()
                keep = self.cfg.straggler_window + self.cfg.history_steps + HANG_HISTORY
                pin = self._pinned(gen)
                if pin is not None:  # an onset being confirmed keeps its history
                    keep = max(keep, len(steps) - bisect.bisect_left(steps, pin) + self.cfg.straggler_window
                               + self.cfg.history_steps)
                if len(steps) > 2 * keep:
                    gen.forget(steps[-keep])
        self.verdicts += new
        return new

    def _discover(self):
        from diagnostics import flight

        for p in generations(self.run_dir):
            gid = int(p.name[4:])
            # Live: the generations of the job being watched: begun or still beating since.
            if gid not in self.gens and (not self.live or gid / 1e9 >= self.started - 30 or _beating(p, self.started - 30)):
                self.gens[gid] = Generation(p)
        for d, files in flight.dump_sets(self.run_dir, self.flight_recorder):
            key = (str(d), tuple(sorted(files)))
            newest = max(p.stat().st_mtime for p in files.values())
            # Live: only dumps written since the watch began, once their writers are done.
            if key in self._fr_sets or (self.live and not self.started - 30 <= newest <= time.time() - 2):
                continue
            gen = flight.read_set(d, files)
            self._fr_sets[key] = gen.id
            self.gens[gen.id] = gen

    # ---- crash and hang -------------------------------------------------------------
    def _crash(self, gen: Generation, now: float) -> list[Verdict]:
        if gen.source != "trace":  # no heartbeats to tell a dead rank by
            return []
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
        # one every 0.5 s; live, a second of grace lets it), so a crash is named as soon as the
        # ranks it took down are seen, not stale_s later; and its process is not there.
        first_fail = min(victims.values(), default=None)
        dead = [r for r in still if (now - gen.state[r].get("time", 0) > self.cfg.stale_s
                or (first_fail is not None and now - first_fail >= (1.0 if self.live else 0.0)
                    and gen.state[r].get("time", 0) < first_fail)) and self._process(gen, r, now) == "gone"]
        alive = [r for r in gen.state if r not in dead and r not in victims]
        if not dead or not (victims or alive):  # everyone killed without a trace: nothing to say
            return []
        faults = {r: _head(gen.path / f"fault-r{r}.txt") for r in dead}
        ev = {"summary": f"rank(s) {dead} stopped without a stack or error; {len(victims)} rank(s) failed after them",
              "since_step": min(gen.state[r].get("step", 0) for r in dead),
              "last_heartbeat": {r: gen.state[r].get("time") for r in dead},
              "last_step": {r: gen.state[r].get("step") for r in dead},
              "victims": {r: gen.state[r].get("error") or "terminated (SIGTERM)" for r in victims},
              "fatal_signal": {r: f for r, f in faults.items() if f}}
        return [Verdict("crash", [gen.node_of(r) for r in dead], ev, 0.9 if victims else 0.7, now,
                        since=min(gen.state[r].get("time", now) for r in dead), key=f"{gen.id}:crash:{dead}")]

    def _process(self, gen: Generation, r: int, now: float) -> str:
        """For a rank whose heartbeat is late: ``frozen`` (its process is still there:
        stopped, or stuck so hard its writer thread cannot run) or ``gone`` (its process is
        not there, or not visible from this host)."""
        st = gen.state.get(r)
        if st is None or gen.source != "trace":
            return "gone"
        noted = gen.path / f"frozen-r{r}.json"
        seen = proc_state(gen.meta.get(r, {})) if self.live else None
        if seen in ("stopped", "running"):
            if not noted.exists() and now - st.get("time", 0) > self.cfg.stale_s:
                # So that a report written after the job reads the same.
                _write_json(noted, {"state": seen, "time": time.time(), "heartbeat": st.get("time")})
            return "frozen"
        return "frozen" if noted.exists() else "gone"

    def _hang(self, gen: Generation, now: float) -> list[Verdict]:
        recent = [gen.step_time(s) for s in gen.training_steps()[-HANG_HISTORY:]]
        typical = statistics.median(recent) if recent else 0.0
        stale = {r for r, st in gen.state.items() if now - st.get("time", 0) > self.cfg.stale_s and not st.get("closed")}
        frozen = {r for r in stale if self._process(gen, r, now) == "frozen"}
        stuck: dict[tuple, dict] = {}  # (chan, seq) -> rank -> OpRecord
        for r in gen.state:
            for rec in gen.inflight(r):
                stuck.setdefault((rec.channel, rec.seq), {})[r] = rec
        for (chan, seq), waiting in sorted(stuck.items(), key=lambda kv: min(x.arrived for x in kv[1].values())):
            members = gen.members(chan) or sorted(waiting)
            missing = [m for m in members if m not in waiting and gen.state.get(m, {}).get("seq", {}).get(chan, -1) < seq]
            # A member whose whole process froze is the cause even if it had entered the op.
            culprits = missing + sorted(m for m in members if m in frozen and m not in missing)
            oldest = min(x.arrived for x in waiting.values())
            limit = self._hang_limit(gen, culprits, typical, max(recent, default=0.0), bool(recent))
            if now - oldest < limit or any(m in stale and m not in frozen for m in missing):
                continue  # a dead rank is the crash rule's, not a hang
            op = next(iter(waiting.values())).op
            ev = {"group": members, "channel": chan, "op": op, "seq": seq,
                  "arrived": {r: x.arrived for r, x in waiting.items()}, **_waited(now - oldest, limit, typical)}
            cut = None if any(m in frozen for m in culprits) else _cut_off(gen)
            if cut:  # the network stopped carrying data: the ranks missing here wait on it too
                suspects, ev["connections"] = cut
                ev["summary"] = (f"ranks {sorted(waiting)} wait in {op} #{seq} for {now - oldest:.1f}s (limit {limit:.1f}s); "
                                 f"{_cut_summary(suspects, ev['connections'])}")
                return [Verdict("hang_comm", suspects, ev, 0.85, now, since=oldest, key=f"{gen.id}:hang_comm:{chan}")]
            if culprits:
                states = {m: {"step": gen.state.get(m, {}).get("step"), "phase": gen.state.get(m, {}).get("phase"),
                              "process": _frozen_detail(gen, m) if m in frozen else "running"} for m in culprits}
                why = "; ".join(f"rank {m} {d['process']}" for m, d in states.items() if m in frozen)
                others = sorted(set(waiting) - set(culprits))
                ev["summary"] = ((f"ranks {others} wait in {op} #{seq} for {now - oldest:.1f}s (limit {limit:.1f}s); "
                                  f"{culprits} never arrived" if others else
                                  f"rank(s) {culprits} stopped inside {op} #{seq} {now - oldest:.1f}s ago (limit {limit:.1f}s)")
                                 + (f" ({why})" if why else ""))
                ev["missing_state"] = states
                return [Verdict("hang_noncomm", [gen.node_of(m) for m in culprits], ev, 0.9, now, since=oldest,
                                key=f"{gen.id}:hang_noncomm:{culprits}")]
            ev["summary"] = f"all of group {members} entered {op} #{seq} {now - oldest:.1f}s ago; it never completed"
            return [Verdict("hang_comm", [{"group": members, "nodes": sorted({gen.node_of(m)["node"] for m in members}),
                                           "hosts": sorted({gen.node_of(m)["host"] for m in members})}],
                            ev, 0.6, now, since=oldest, key=f"{gen.id}:hang_comm:{chan}")]
        return self._probe_hang(gen, now, typical, recent, stale, frozen)

    def _probe_hang(self, gen: Generation, now: float, typical: float, recent: list, stale: set, frozen: set) -> list[Verdict]:
        """Ranks stuck inside a link probe (its transfers are untraced, so no op is in flight):
        past the hang limit, a frozen rank is the cause, or the host (or link) the ranks'
        stalled connections lead to. A probe that is only slow (a slow link delivers late but
        delivers) is left to finish: its join and leave have their own timeouts."""
        since = [st["phase_since"] for st in gen.state.values()
                 if st.get("phase") == "probe" and st.get("phase_since") and not st.get("closed")]
        if not since or any(r in stale and r not in frozen for r in gen.state):
            return []  # a dead rank is the crash rule's
        limit = self._hang_limit(gen, [], typical, max(recent, default=0.0), bool(recent))
        oldest = min(since)
        if now - oldest < limit:
            return []
        step = max(st.get("step", 0) for st in gen.state.values())
        ev = {"phase": "probe", "step": step, **_waited(now - oldest, limit, typical)}
        head = f"the ranks have been inside a link probe at step {step} for {now - oldest:.1f}s (limit {limit:.1f}s); "
        if frozen:
            ev["missing_state"] = {m: {"step": gen.state[m].get("step"), "phase": "probe", "process": _frozen_detail(gen, m)}
                                   for m in sorted(frozen)}
            ev["summary"] = head + "; ".join(f"rank {m} {d['process']}" for m, d in ev["missing_state"].items())
            return [Verdict("hang_noncomm", [gen.node_of(m) for m in sorted(frozen)], ev, 0.9, now, since=oldest,
                            key=f"{gen.id}:hang_noncomm:{sorted(frozen)}")]
        cut = _cut_off(gen)
        if not cut:
            return []
        suspects, ev["connections"] = cut
        ev["summary"] = head + _cut_summary(suspects, ev["connections"])
        return [Verdict("hang_comm", suspects, ev, 0.85, now, since=oldest, key=f"{gen.id}:hang_comm:probe")]

    def _hang_limit(self, gen: Generation, missing: list, typical: float, longest: float, started: bool) -> float:
        c = self.cfg
        if gen.source != "trace":  # Flight Recorder dumps: no steps to scale by
            return c.hang_min_s
        if not started or any(gen.state.get(m, {}).get("phase") == "checkpoint" for m in missing):
            return c.hang_slow_phase_s  # loading or saving a checkpoint may legitimately take long
        return max(c.hang_min_s, c.hang_factor * typical, 2 * longest)

    # ---- stragglers and slow collectives: windows against the job's own history ------
    def _new_windows(self, gen: Generation, rule: str):
        """(index, window steps, history steps) of every window end not judged by ``rule`` yet."""
        c = self.cfg
        steps = gen.training_steps()
        w = c.straggler_window
        start = bisect.bisect_right(steps, self._judged.get((gen.id, rule), -1))
        if steps:
            self._judged[(gen.id, rule)] = steps[-1]
        for i in range(max(start, w - 1), len(steps)):
            lo = i - w + 1
            # While an onset is being confirmed, later windows are judged against the history
            # from before it (else, in a job of short steps, the history fills with the slow
            # steps before confirm_s has passed).
            pin = self._pinned(gen)
            if pin is None:
                stop = lo
            else:  # the history ends a window before it (the change may have begun there), if that leaves one
                p = bisect.bisect_left(steps, pin)
                stop = min(lo, p - w if p - w >= w else p)
            hist = steps[max(0, stop - c.history_steps):stop]
            if len(hist) >= w:  # a shorter history under-states the noise
                yield i, steps[lo:i + 1], hist

    def _pinned(self, gen: Generation) -> int | None:
        """The first step of the earliest onset still being confirmed in ``gen``, if any."""
        return min((v[2] for k, v in self._streak.items() if k[0] == gen.id and v[2] is not None), default=None)

    def _window(self, gen: Generation, i: int, win: list[int], hist: list[int]) -> dict:
        """Statistics of one window, shared by the straggler and slow_comm rules."""
        key = (gen.id, win[-1])
        if key in self._windows:
            return self._windows[key]
        c = self.cfg
        T = {s: gen.step_time(s) for s in hist + win}
        job = shift([T[s] for s in win], [T[s] for s in hist], z=c.noise_z, rel_min=c.straggler_threshold)
        ranks = sorted(gen.meta)
        comm = {}  # channel -> the shift of its time per step, once every member is in
        for chan, per_step in list(gen.comm.items()):
            if len(gen.members(chan)) >= 2:
                sh = shift([per_step.get(s, 0.0) for s in win], [per_step.get(s, 0.0) for s in hist], z=c.noise_z,
                           rel_min=c.comm_factor - 1)
                above = sum(per_step.get(s, 0.0) > sh.history + sh.floor for s in win) / len(win)
                comm[chan] = {"shift": sh, "candidate": sh.significant and above >= c.straggler_persistence}
        # When the job's own step time rose beyond its floor, that is independent evidence of a
        # slowdown, and a rank's evidence needs only 2/3 of noise_z more: two tests at z = 2
        # agreeing by chance are rarer than one at 3.
        z = c.noise_z * (2 / 3 if job.significant else 1)
        own = self._own(gen, ranks, win, hist, z)
        # A rank that waits for a CPU moves its share of every collective it is in slower too
        # (gloo reduces on the calling thread): those groups' rise is its echo, not the network's,
        # as long as the rank's extra wait could account for it (a slow port can also leave its
        # rank waiting for a CPU a little more, while its collectives slow by several times that).
        echo = {chan for chan, x in comm.items()
                if any(own.get(r, {}).get("starved") and x["shift"].rise <= OWN_LEAD * own[r]["wait"].rise
                       for r in gen.members(chan))}
        # A slowdown has one place: ranks arriving late, or collectives slower once all are in
        # (a slow link also makes the ranks at its ends late in the next ones). The larger rise,
        # in seconds per step, is the cause; the other is its echo.
        comm_rise = max((x["shift"].rise for chan, x in comm.items() if x["candidate"] and chan not in echo), default=0.0)
        fr = {r: {s: gen.late_fraction(r, s) for s in hist + win} for r in ranks}
        latest = {s: max(ranks, key=lambda r: fr[r][s]) for s in hist + win}
        late = {}
        for r in ranks:
            sh = mean_shift([fr[r][s] for s in win], [fr[r][s] for s in hist], z=z, abs_min=c.straggler_threshold)
            share = sum(latest[s] == r for s in win) / len(win)
            # Its extra lateness, in seconds per step, must show in the job's step time (else
            # the wait only moved between ranks: the job is no slower) and explain at least a
            # third of the job's rise (else the job slowed for another reason; a rank short of
            # CPU also moves its share of each collective slower, which shows as collective
            # time, not lateness). The lateness is the sharper measure (differential: no common
            # noise), so it carries the significance; the step time, noisier, only has to agree.
            extra = sh.window * job.window - sh.history * job.history
            candidate = sh.significant and share >= c.straggler_persistence
            late[r] = {"shift": sh, "latest": share, "candidate": candidate, "extra": extra,
                       "onset": candidate and self._agrees(job, extra) and extra > comm_rise, "by": "late"}
            # Or its own work between ops (compute, not waiting) slowed, and nobody else's did as
            # much. Where the others do not wait for it inside collectives (a pipeline's last
            # stage: its neighbour waits in a receive, which looks like a slower transfer; many
            # small tensor-parallel collectives each hiding a sliver of lateness), this is the
            # evidence. Its rise must beat any channel's: a slower collective is the cause then.
            o = own.get(r)
            if o is not None and o["candidate"] and not late[r]["onset"]:
                late[r].update(candidate=True, extra=max(extra, o["shift"].rise), by="own",
                               onset=self._agrees(job, o["shift"].rise) and o["shift"].rise > comm_rise)
        stats = {"job": job, "late": late, "own": own, "comm": comm, "echo": echo, "fr": fr, "latest": latest, "T": T}
        self._windows[key] = stats
        return stats

    def _agrees(self, job, extra: float) -> bool:
        """A rank's extra time per step (seconds) shows in the job's step time (else the wait
        only moved between ranks: the job is no slower) and explains at least a third of the
        job's rise (else the job slowed for another reason)."""
        c = self.cfg
        return job.rise >= max(c.straggler_threshold * job.history, 0.25 * extra) and extra >= job.rise / 3

    def _own(self, gen: Generation, ranks: list[int], win: list[int], hist: list[int], z: float) -> dict:
        """rank -> {"shift" of its own time per step (outside traced ops), "wait": the shift of
        its thread's wait for a CPU (None where not traced), "starved", "candidate"}; empty where the
        traces do not say how long each rank was blocked. A candidate's own time rose beyond
        the floor, and the rise is its own: at least OWN_LEAD x any other rank's, or at least
        any other rank's while it waits for a CPU by half that rise more and the others do not
        (OWN_LEAD x theirs): starved. Where another rank's own work rose as much, the machine
        slowed everyone and this rank's longer wait for a CPU is its share of that."""
        c = self.cfg
        span, n = hist + win, len(hist)
        t = {r: [gen.own_time(r, s) for s in span] for r in ranks}
        if any(x is None for v in t.values() for x in v):
            return {}
        sh = {r: shift(v[n:], v[:n], z=z, rel_min=c.straggler_threshold) for r, v in t.items()}
        w = {r: [gen.cpu_wait(r, s) for s in span] for r in ranks}
        wait = ({r: shift(v[n:], v[:n], z=z, rel_min=0.0, abs_min=c.straggler_threshold * sh[r].history)
                 for r, v in w.items()} if all(x is not None for v in w.values() for x in v) else {})
        out = {}
        for r, x in sh.items():
            others = max((y.rise for q, y in sh.items() if q != r), default=0.0)
            starved = x.significant and x.rise >= others and r in wait and wait[r].significant and wait[r].rise >= 0.5 * x.rise and (
                wait[r].rise >= OWN_LEAD * max((y.rise for q, y in wait.items() if q != r), default=0.0))
            out[r] = {"shift": x, "wait": wait.get(r), "starved": starved,
                      "candidate": starved or (x.significant and x.rise >= OWN_LEAD * max(others, 0.0))}
        return out

    def _held(self, key: tuple, gen: Generation, win: list[int], onset: bool, candidate: bool | None = None) -> bool:
        """Whether an onset seen in window ``win`` has held at ``CONFIRM`` window ends spanning
        at least ``confirm_s``: noise regresses within a few steps, and a busy machine's
        scheduling hiccups pass within a second or two, whatever the step time; a slow host or
        link stays. ``candidate`` is the specific sign (a rank's lateness or own work rose),
        ``onset`` that sign with the job's step time agreeing (default: the onset is its own
        sign). The span is timed from the first window of an unbroken run of candidates: it
        is how long the sign has lasted. A window where the step time (noisier) does not agree
        pauses the count, one where the sign is gone restarts it. From the first candidate,
        later windows are judged against the history before it, for up to history_steps."""
        c = self.cfg
        n, t0, first, seen = self._streak.get(key, (0, None, None, None))
        if not (onset if candidate is None else candidate):
            # A window that misses keeps the pin (noise), until a window's worth of them did.
            if first is None or win[-1] - seen >= c.straggler_window or win[-1] - first > c.history_steps:
                self._streak.pop(key, None)
            else:
                self._streak[key] = (0, None, first, seen)
            return False
        first = win[0] if first is None and n == 0 else first
        t0 = gen.step_end(win[-1]) if t0 is None else t0
        if not onset:
            if first is not None and win[-1] - first > c.history_steps:  # a pin is not forever
                self._streak.pop(key, None)
            else:
                self._streak[key] = (n, t0, first, win[-1])
            return False
        held = n + 1 >= CONFIRM and gen.step_end(win[-1]) - t0 >= c.confirm_s
        self._streak[key] = (n + 1, t0, None if held else first, win[-1])  # once named, its history may move on
        return held

    def _straggler(self, gen: Generation, now: float) -> list[Verdict]:
        if len(gen.meta) < 2:
            return []
        out = []
        # Pipeline stages do different work (the first finishes the step last, by its last
        # backward): lateness from the start says nothing about them, only its onset does.
        stages = {r for r, m in gen.meta.items() if m.get("pipeline_stage") is not None}
        for i, win, hist in self._new_windows(gen, "straggler"):
            st = self._window(gen, i, win, hist)
            t = now if self.live else gen.step_end(win[-1])
            for r, lr in st["late"].items():
                if self._held((gen.id, "late", r), gen, win, lr["onset"], lr["candidate"]):
                    found = self._own_evidence(gen, r, st, win) if lr["by"] == "own" else self._late_evidence(r, st, win)
                else:
                    found = None if r in stages else self._sustained_evidence(gen, r, st, hist + win)
                if found is None or self._link_echo(gen, r, st, found[0]):
                    continue
                ev, conf = found
                since = min(gen.steps[q][ev["since_step"]].start for q in gen.steps)
                out.append(Verdict("straggler", [gen.node_of(r)], ev, round(min(conf, 0.95), 2), t, since=since,
                                   key=f"{gen.id}:straggler:{r}"))
        return out

    def _link_echo(self, gen: Generation, r: int, st: dict, ev: dict) -> bool:
        """Rank ``r`` is late only by lateness, and its host is at an end of a link a probe
        (or the job's own transfers) found slow: a ring that crosses a slow link finishes
        last at its ends, so their ranks come late to the next collectives, by more than the
        collectives themselves slowed where the link is a small part of each. That lateness
        is the link's echo. Its own work slowing, or its thread waiting longer for a CPU, is
        its own fault still."""
        if ev["pattern"] == "own_work" or st["own"].get(r, {}).get("starved"):
            return False
        host = lambda q: gen.node_of(q)["host"] or q  # noqa: E731
        return host(r) in {host(q) for cells in self._slow_cells.get(gen.id, {}).values() for cell in cells for q in cell}

    @staticmethod
    def _late_evidence(r: int, st: dict, win: list[int]) -> tuple[dict, float]:
        """The others wait for rank ``r`` inside collectives, more than they used to."""
        job, lr = st["job"], st["late"][r]
        sh = lr["shift"]
        onset = next(s for s in win if st["fr"][r][s] > sh.history + sh.floor)
        ev = {"summary": (f"the job's step time rose from {1e3 * job.history:.1f} to {1e3 * job.window:.1f} ms "
                          f"and the others now wait a median "
                          f"{sh.window:.0%} of each step for this rank (was {sh.history:.0%}); it was the latest "
                          f"in {lr['latest']:.0%} of steps {win[0]}-{win[-1]}"),
              "pattern": "onset", "steps": [win[0], win[-1]], "since_step": onset,
              "step_time_s": job.to_json(), "late_share": sh.to_json(), "latest_share": lr["latest"],
              "score": round(1 - sh.window, 3)}
        return ev, lr["latest"] * min(1.0, 0.5 + sh.rise / (4 * sh.floor))

    @staticmethod
    def _own_evidence(gen: Generation, r: int, st: dict, win: list[int]) -> tuple[dict, float]:
        """Rank ``r``'s own work (outside traced ops) slowed, and nobody else's as much."""
        job, own = st["job"], st["own"]
        sh = own[r]["shift"]
        onset = next(s for s in win if gen.own_time(r, s) > sh.history + sh.floor)
        others = max((o["shift"].rise for q, o in own.items() if q != r), default=0.0)
        wait = own[r]["wait"]
        starved = (f"; its thread now waits {1e3 * wait.window:.1f} ms per step for a CPU (was {1e3 * wait.history:.1f})"
                   if wait is not None and wait.significant else "")
        ev = {"summary": (f"the job's step time rose from {1e3 * job.history:.1f} to {1e3 * job.window:.1f} ms "
                          f"and this rank's own work (outside communication) now takes {1e3 * sh.window:.1f} ms per "
                          f"step (was {1e3 * sh.history:.1f}; no other rank's rose by more than "
                          f"{1e3 * max(others, 0.0):.1f} ms) over steps {win[0]}-{win[-1]}{starved}: "
                          + ("it is short of CPU" if starved else "it is slower")),
              "pattern": "own_work", "steps": [win[0], win[-1]], "since_step": onset,
              "step_time_s": job.to_json(), "own_s": sh.to_json(), "score": round(sh.history / sh.window, 3)}
        if wait is not None:
            ev["cpu_wait_s"] = wait.to_json()
        return ev, min(0.9, 0.5 + sh.rise / (4 * sh.floor))

    def _sustained_evidence(self, gen: Generation, r: int, st: dict, span: list[int]) -> tuple[dict, float] | None:
        """The others have waited for rank ``r`` a large share of every step, with no onset."""
        c = self.cfg
        if not c.straggler_sustained or len(span) < c.straggler_window + c.history_steps:
            return None
        med = statistics.median(st["fr"][r][s] for s in span)
        share = sum(st["latest"][s] == r for s in span) / len(span)
        if med < c.straggler_sustained or share < 0.9:
            return None
        first = span[0] == gen.training_steps()[0]
        ev = {"summary": (f"the others waited a median {med:.0%} of every step for this rank over steps "
                          f"{span[0]}-{span[-1]} (latest in {share:.0%})"
                          + (": slow since the job started" if first else "")),
              "pattern": "sustained", "steps": [span[0], span[-1]], "since_step": span[0],
              "median_late_share": round(med, 4), "latest_share": round(share, 3), "score": round(1 - med, 3)}
        return ev, 0.8 * share

    def _slow_comm(self, gen: Generation, now: float) -> list[Verdict]:
        c = self.cfg
        out = []
        for i, win, hist in self._new_windows(gen, "slow_comm"):
            st = self._window(gen, i, win, hist)
            job = st["job"]
            late_rise = max((lr["extra"] for lr in st["late"].values() if lr["candidate"]), default=0.0)
            comm_rise = max((x["shift"].rise for x in st["comm"].values() if x["candidate"]), default=0.0)
            # The job slowed and neither a late rank nor a group's collectives explain a third
            # of it (a slow link inside a ring shows only partly in the clock-free collective
            # time): live, ask the job for a link probe among all its hosts, once per generation.
            # No verdict unless the probe names a link: the probe is the evidence.
            unexplained = job.significant and max(late_rise, comm_rise) < job.rise / 3
            key = f"{gen.id}:probe:unexplained"
            if (self._held((gen.id, "job", ""), gen, win, unexplained) and self.live and c.probe
                    and gen.source == "trace" and key not in self._seen):
                members = sorted(gen.meta)
                reason = (f"the job's step time rose from {1e3 * job.history:.1f} to {1e3 * job.window:.1f} ms "
                          f"(steps {win[0]}-{win[-1]}) with no rank late and no group's collectives clearly slower")
                nbytes = max((int(statistics.median(v)) for v in gen.comm_bytes.values() if v), default=0)
                if probe.request(gen, members, nbytes, job.window, c, reason=reason, links_only=True):
                    self._seen.add(key)
            for chan, x in st["comm"].items():
                members = gen.members(chan)
                key = f"{gen.id}:slow_comm:{chan}"
                if key in self._seen:
                    continue
                sh, candidate = x["shift"], x["candidate"]
                # It must explain a third of the job's rise (its time is clock-free: from the last
                # arrival to that rank's completion, so a ring that finishes later past a slow
                # link shows only part of it) and more than any late rank does.
                onset = candidate and job.significant and sh.rise >= max(job.rise / 3, late_rise) and chan not in st["echo"]
                if not self._held((gen.id, "comm", chan), gen, win, onset, candidate):
                    continue
                t = now if self.live else gen.step_end(win[-1])
                what = (f"transfers {members[0]}->{members[1]}" if "|" in chan
                        else f"once every member is in, group {members}'s collectives")
                ev = {"summary": (f"the job's step time rose from {1e3 * job.history:.1f} to {1e3 * job.window:.1f} ms; "
                                  f"{what} now take {1e3 * sh.window:.1f} ms per step (was {1e3 * sh.history:.1f}) and "
                                  "no rank arrives late: a slow link or network"),
                      "channel": chan, "group": members, "steps": [win[0], win[-1]], "step_time_s": job.to_json(),
                      "comm_s": sh.to_json(), "hosts": gen.hosts(members)}
                if self.live and c.probe and gen.source == "trace":
                    nbytes = int(statistics.median(gen.comm_bytes[chan])) if gen.comm_bytes[chan] else 0
                    req = probe.request(gen, members, nbytes, job.window, c, reason=f"slow collectives of group {members}")
                    if req:
                        ev["probe"] = {"id": req["id"], "step": req["step"], "ranks": req["ranks"]}
                        ev["summary"] += f"; probing the links between ranks {req['ranks']} at step {req['step']}"
                out.append(Verdict("slow_comm", [{"group": members, "hosts": sorted(gen.hosts(members))}], ev,
                                   round(min(0.9, 0.5 + sh.rise / (4 * sh.floor)), 2), t,
                                   since=min(gen.steps[q][win[0]].start for q in gen.steps),
                                   key=key))
        return out

    # ---- links ------------------------------------------------------------------------
    def _periodic_probe(self, gen: Generation, now: float) -> list[Verdict]:
        """Live, every ``probe_every_s`` since the generation's newest probe (any monitor's) or
        since this detector first judged it: a probe among all the job's hosts, links only.
        Reads the generation's probe files only when a period may have passed."""
        c = self.cfg
        if not (c.probe_every_s and self.live and c.probe and gen.source == "trace"):
            return []
        if now < self._probe_due.setdefault(gen.id, now + c.probe_every_s):
            return []
        last = max((p["request"]["requested"] for p in gen.probes().values()), default=0.0)
        steps = gen.training_steps()[-c.straggler_window:]
        if now - last < c.probe_every_s or not steps:
            self._probe_due[gen.id] = last + c.probe_every_s if steps else now + 1.0  # no step yet: look again soon
            return []
        step_s = statistics.median(gen.step_time(s) for s in steps)
        nbytes = max((int(statistics.median(v)) for v in gen.comm_bytes.values() if v), default=0)
        probe.request(gen, sorted(gen.meta), nbytes, step_s, c, reason=f"periodic, every {c.probe_every_s:g} s",
                      links_only=True)
        self._probe_due[gen.id] = now + c.probe_every_s
        return []

    def _probe(self, gen: Generation, now: float) -> list[Verdict]:
        out = []
        done = self.probes.setdefault(gen.id, {})
        probes = gen.probes()
        for pid, p in sorted(probes.items()):
            if pid in done or not probe.finished(gen, p):
                continue
            a = done[pid] = probe.analyse(p, self.cfg)
            t = now if self.live else max((r.get("ended", 0) for r in p["results"].values()), default=now)
            since = p["request"]["requested"]
            # A probe asked for by an unexplained slowdown names links only: on a busy machine
            # some prober is short of CPU at any moment, which explains nothing by itself.
            # A repeat (``confirms``) only checks the links of the probe before it, which named
            # its starved probers already.
            starved = {} if p["request"].get("links_only") or p["request"].get("confirms") else a.get("starved", {})
            for r, s in sorted(starved.items()):
                ev = {"summary": (f"during the link probe at step {a['step']} this rank's fixed CPU work took "
                                  f"{s['cpu_ratio']}x the typical prober's" + (f", its cgroup was throttled {s['throttled_s']:.2f} s"
                                                                               if s.get("throttled_s") else "")
                                  + ": its process is short of CPU (its transfers were not judged as links)"),
                      "pattern": "cpu", "probe": a}
                out.append(Verdict("straggler", [gen.node_of(r)], ev, 0.7, t, since=since, key=f"{gen.id}:probe:{pid}:cpu:{r}"))
            first = p["request"].get("confirms")
            slow_found = self._slow_cells.setdefault(gen.id, {})
            slow_found.pop(first, None)  # a repeat settles what its first probe found
            if a.get("slow"):
                cells = [tuple(c) for c in a["cells"]]
                slow = {tuple(c) for c in a["slow"]}
                # On a busy machine one probe can catch a prober's transfers in a scheduling
                # hiccup: a second probe repeats it, and a link is named only if slow in both.
                if first is None:
                    slow_found[pid] = slow
                    self._confirm_probe(gen, p, a)
                    continue
                slow &= {tuple(c) for c in done.get(first, {}).get("slow", [])}
                if not slow:
                    continue
                slow_found[pid] = slow
                a["confirms"] = first
                since = probes[first]["request"]["requested"] if first in probes else since
                worst = max(slow, key=lambda c: a["matrix_ms"][f"{c[0]}->{c[1]}"])
                ev = {"summary": (f"link probe at step {a['step']} ({a['bytes'] >> 10} KiB per transfer"
                                  + (f", repeating probe {a['confirms']}" if a.get("confirms") else "") + "): "
                                  f"{len(slow)} of {len(cells)} directions slower than {a['limit_ms']:.2f} ms, worst "
                                  f"{worst[0]}->{worst[1]} {a['matrix_ms'][f'{worst[0]}->{worst[1]}']:.2f} ms "
                                  f"(typical {a['typical_ms']:.2f} ms)"), "probe": a}
                out.append(Verdict("slow_link", name_cells(slow, cells, gen.node_of), ev, 0.85, t, since=since,
                                   key=f"{gen.id}:probe:{pid}:link"))
        # A repeat refused (another probe was pending, another monitor's claim) is asked for
        # again: until it runs, the link is neither named nor cleared.
        for pid in list(self._slow_cells.get(gen.id, {})):
            p = probes.get(pid)
            if p and p["request"].get("confirms") is None and not any(q["request"].get("confirms") == pid for q in probes.values()):
                self._confirm_probe(gen, p, done[pid])
        return out

    def _confirm_probe(self, gen: Generation, first: dict, a: dict):
        """Live: ask for the probe that repeats ``first`` (once)."""
        key = f"{gen.id}:probe:confirm:{a['id']}"
        if not (self.live and self.cfg.probe and gen.source == "trace") or key in self._seen:
            return
        steps = gen.training_steps()[-self.cfg.straggler_window:]
        step_s = statistics.median(gen.step_time(s) for s in steps) if steps else 1.0
        req = first["request"]
        reason = f"repeating probe {a['id']}, which found {len(a['slow'])} slow direction(s)"
        if probe.request(gen, req.get("group") or req["ranks"], probe.repeat_bytes(a), step_s, self.cfg, reason=reason,
                         links_only=req.get("links_only", False), confirms=a["id"]):
            self._seen.add(key)

    def _links(self, gen: Generation, now: float) -> list[Verdict]:
        c = self.cfg
        # Cells are compared with each other, which holds for alike transfers (a ring
        # exchange); a pipeline's differ by design (activations, gradients, when each stage
        # posts its receives): its links are judged against their own history (slow_comm).
        if any(m.get("pipeline_stage") is not None for m in gen.meta.values()):
            return []
        if any(len(v) < c.link_window for v in gen.links.values()):
            return []  # judge the matrix whole: a partial one misnames a bad sender as its first link
        recent = {cell: [ms for _s, ms in v[-c.link_window:]] for cell, v in gen.links.items()}
        slow, typical, limit = slow_cells(recent, factor=c.link_factor, min_ms=c.link_min_ms,
                                          persistence=c.straggler_persistence)
        self._slow_cells.setdefault(gen.id, {})["p2p"] = slow
        if not slow:
            return []
        ev = {"summary": f"{len(slow)} of {len(recent)} src->dst pairs slower than {limit:.1f} ms (typical {typical:.2f} ms)",
              "median_ms": {f"{s}->{d}": round(statistics.median(v), 3) for (s, d), v in recent.items()},
              "limit_ms": round(limit, 3)}
        first = min(s for cell in slow for s, ms in gen.links[cell][-c.link_window:] if ms > limit)
        since = min((gen.steps[q][first].start for q in gen.steps if first in gen.steps[q]), default=now)
        return [Verdict("slow_link", name_cells(slow, recent, gen.node_of), ev, 0.8, now, since=since,
                        key=f"{gen.id}:slow_link:{sorted(slow)}")]


def _cut_off(gen: Generation) -> tuple[list, list] | None:
    """Suspects named by the ranks' stalled connections (``comms.sockets``: unacknowledged
    data, retransmission timeouts expiring): the one host that every stalled connection
    leads to or from (cut off the network: its NIC, cable or switch port), or the one pair
    of hosts they join (the link between them); None when there is no such evidence or it
    names neither. Returns (suspects, the stalled connections host -> host)."""
    host_of = {a: m.get("host") for m in gen.meta.values() for a in m.get("addrs", [])}
    first = {}  # host -> its lowest rank (a link between hosts is named by one rank of each)
    for r in sorted(gen.meta):
        first.setdefault(gen.meta[r].get("host"), r)
    edges: dict[tuple[str, str], dict] = {}
    down: dict[str, dict] = {}  # host -> its interfaces without a link
    for r, st in gen.state.items():
        me = gen.meta.get(r, {}).get("host")
        for peer, s in (st.get("stalled") or {}).items():
            other = host_of.get(peer)
            if other and other != me:
                edges[(me, other)] = {**s, "rank": r}
        if st.get("nics_down"):
            down[me] = st["nics_down"]
    if not edges and not down:
        return None
    pairs = {frozenset(e) for e in edges}
    conns = [{"from": a, "to": b, **s} for (a, b), s in sorted(edges.items())]
    conns += [{"from": h, "nics_down": nics} for h, nics in sorted(down.items())]
    if len(down) == 1 and all(next(iter(down)) in p for p in pairs):  # its own link is down
        host = next(iter(down))
        return [{**gen.node_of(r), "role": "cut off"} for r in sorted(gen.meta) if gen.meta[r].get("host") == host], conns
    if not edges:
        return None
    if len(pairs) == 1:
        a, b = sorted(next(iter(pairs)))
        ra, rb = first[a], first[b]
        return [{"link": [ra, rb], "nodes": [gen.node_of(ra)["node"], gen.node_of(rb)["node"]], "hosts": [a, b]}], conns
    common = set.intersection(*(set(p) for p in pairs))
    if len(common) != 1:
        return None
    host = common.pop()
    return [{**gen.node_of(r), "role": "cut off"} for r in sorted(gen.meta) if gen.meta[r].get("host") == host], conns


def _cut_summary(suspects: list, conns: list) -> str:
    nics = [f"{c['from']}'s {', '.join(f'{n} ({st})' for n, st in c['nics_down'].items())}" for c in conns if "nics_down" in c]
    conns = [c for c in conns if "nics_down" not in c]
    worst = max((c["retransmits"] for c in conns), default=0)
    if nics and "link" not in suspects[0]:
        host = suspects[0]["host"]
        return (f"{'; '.join(nics)} lost its link" + (f", and {len(conns)} connection(s) to or from {host} carry nothing "
                f"(up to {worst} retransmission timeouts)" if conns else "") + f": {host} is cut off the network")
    if "link" in suspects[0]:
        a, b = suspects[0]["hosts"]
        return (f"the connections between {a} and {b} carry nothing (unacknowledged data, {worst} retransmission "
                "timeouts): the link between them")
    host = suspects[0]["host"]
    peers = sorted({c["to"] if c["from"] == host else c["from"] for c in conns})
    return (f"every stalled connection (unacknowledged data, up to {worst} retransmission timeouts) leads to or from "
            f"{host} (with {', '.join(peers)}): {host} is cut off the network (its NIC, cable or switch port)")


def proc_state(meta: dict) -> str | None:
    """``running``, ``stopped`` or ``gone`` for the process a rank's metadata names, when it
    is visible from here (same pid, parent and start time), else None."""
    try:
        p = psutil.Process(meta["pid"])
        if p.ppid() != meta.get("ppid") or p.create_time() > meta.get("started", 0) + 1:
            return "gone" if meta.get("host") == hostname() else None  # the pid was reused
        status = p.status()
    except (psutil.NoSuchProcess, KeyError):
        return "gone" if meta.get("host") == hostname() else None
    except psutil.Error:
        return None
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        return "gone"
    return "stopped" if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP) else "running"


def _beating(gen_dir: Path, since: float) -> bool:
    """Whether any rank of a generation wrote its state file since ``since``."""
    for p in gen_dir.glob("state-r*.json"):
        try:
            if p.stat().st_mtime >= since:
                return True
        except OSError:
            continue
    return False


def _waited(waited: float, limit: float, typical: float) -> dict:
    """A hang's wait, its limit and the wait in typical steps (evidence keys)."""
    return {"waited_s": round(waited, 2), "limit_s": round(limit, 2), "typical_step_s": round(typical, 4),
            "step_multiple": round(waited / typical, 1) if typical else None}


def _frozen_detail(gen: Generation, r: int) -> str:
    noted = _read_json(gen.path / f"frozen-r{r}.json")
    hb = gen.state.get(r, {}).get("time")
    state = noted.get("state", "unresponsive")
    what = "is stopped (SIGSTOP or a debugger)" if state == "stopped" else "is alive but its trace heartbeat stopped"
    return what + (f", last heartbeat {time.strftime('%H:%M:%S', time.localtime(hb))}" if hb else "")


def _head(p: Path, n: int = 400) -> str:
    try:
        return p.read_text()[:n].strip()
    except OSError:
        return ""


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(p: Path, obj):
    tmp = p.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, p)


def dump_stacks(gen: Generation) -> list[str]:
    """Ask every rank of ``gen`` running on this host for its Python stacks (faulthandler on
    SIGUSR1, py-spy too when installed), and every rank for a Flight Recorder dump when torch
    keeps one; returns the stack files, relative to the run directory."""
    if gen.source != "trace":
        return []
    (gen.path / "fr-request").touch()
    host, files = hostname(), []
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
    # The writer threads dump the Flight Recorder on their next tick (0.5 s): wait for them, so
    # that a launcher stopping the job right after this still has the dumps.
    fr = [gen.path / f"fr-r{r}.pkl" for r, m in sorted(gen.meta.items()) if m.get("host") == host and m.get("flight_recorder")]
    deadline = time.time() + 3
    while fr and not all(p.exists() for p in fr) and time.time() < deadline:
        time.sleep(0.1)
    files += [str(p) for p in fr if p.exists()]
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
            f.write(json.dumps({**v.to_json(), "by": f"{hostname()}:{os.getpid()}"}) + "\n")
