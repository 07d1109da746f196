"""The launcher's watch: reads the job's traces beside it and acts on the verdicts.

``start_monitor(run_dir, policy, agent, node_rank)`` starts a thread in the launcher that
polls ``diagnostics.Detector`` every half second. On a hang or a persistent straggler,
per ``policy``:

- ``warn``: say so;
- ``restart``: kill this node's worker processes (the agent's children); torchrun's elastic
  agent restarts the whole job from its newest checkpoint, up to ``--max-restarts``;
- ``exclude``: if a suspect runs on this node, terminate this node's agent and kill its
  workers so the rendezvous goes on without it (``--nnodes min:max`` must allow one node
  fewer); the other nodes' workers fail on their collective and their agents restart them
  on the rest.
  With a single node there is nothing to exclude to: it restarts instead, and says so.

A crash is torchrun's to restart; ``exclude`` still drops the crashed rank's node. Slow
links and slow collectives are only reported (the detector asks the job for a link probe on
its own). Every action is one log line and a JSON record in
RUN_DIR/diagnostics/actions.jsonl; verdicts go to RUN_DIR/diagnostics/verdicts.jsonl.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from comms.records import hostname
from diagnostics import DiagnosticsConfig, Detector, stop_all, write_verdicts
from diagnostics.config import POLICIES

log = logging.getLogger("kintsugi.monitor")
_ACTED_ON = ("hang_noncomm", "hang_comm", "straggler", "crash")


def start_monitor(run_dir: Path, policy: str, agent: subprocess.Popen, node_rank: int,
                  cfg: DiagnosticsConfig | None = None, interval_s: float = 0.5) -> "Monitor":
    """Start watching ``run_dir`` for the job that ``agent`` (torchrun's agent) runs."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    m = Monitor(Path(run_dir), policy, agent, node_rank, cfg, interval_s)
    m.start()
    return m


class Monitor(threading.Thread):
    def __init__(self, run_dir: Path, policy: str, agent: subprocess.Popen, node_rank: int,
                 cfg: DiagnosticsConfig | None, interval_s: float):
        super().__init__(name="kintsugi-monitor", daemon=True)
        self.run_dir, self.policy, self.agent, self.node_rank = run_dir, policy, agent, node_rank
        self.interval_s = interval_s
        self.detector = Detector(run_dir, cfg, live=True)
        self.actions: list[dict] = []
        self._handled: set[int] = set()  # generations already acted on: later verdicts are fallout
        self._halt = threading.Event()
        self._until = 0.0  # after a stop, poll until then

    def run(self):
        while True:
            if self._halt.wait(self.interval_s):
                if time.time() >= self._until:
                    return
                time.sleep(self.interval_s)
            try:
                verdicts = self.detector.poll()
            except Exception as e:  # a half-written run dir must never take the launcher down
                log.debug("monitor poll failed: %s", e)
                continue
            write_verdicts(self.run_dir, verdicts)
            for v in verdicts:
                self._act(v)

    def stop(self, linger_s: float = 0.0):
        """Stop watching, after ``linger_s`` more of polls: when the job failed, its survivors
        exit within the second of grace the crash rule gives them to show they failed after
        the crashed rank, and only polls after they left can name it."""
        self._until = time.time() + linger_s
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=linger_s + 5)

    # ---- actions --------------------------------------------------------------------
    def _act(self, v):
        if v.kind not in _ACTED_ON or v.generation in self._handled or self.policy == "warn":
            self._record("warn", v, "reported only" if v.kind not in _ACTED_ON or self.policy == "warn"
                         else "this generation was already acted on")
            return
        gen = self.detector.gens[v.generation]
        suspects = {s["rank"] for s in v.suspects if "rank" in s}
        here = sorted(suspects & self._local_ranks(gen))
        local_world = max((m.get("local_world", 1) for m in gen.meta.values()), default=1)
        several_nodes = gen.world > local_world
        exclude = self.policy == "exclude" and several_nodes
        if v.kind == "crash" and not (exclude and here):
            self._record("warn", v, "torchrun restarts crashed workers itself")
            return
        self._handled.add(v.generation)
        if exclude and here:
            # The agent, then its workers: a hung worker never acts on the agent's SIGTERM, and
            # the agent would wait for it (the launcher gives workers minutes to save) while the
            # other nodes stay blocked in their collective; killed, they fail at once and regroup.
            _terminate_agent(self.agent)
            pids = self._kill_workers()
            self._record("exclude", v, f"suspect rank(s) {here} run here: stopped this node's agent (pid "
                                       f"{self.agent.pid}) and killed its worker pid(s) {pids}")
        elif exclude and suspects:
            self._record("wait", v, "the suspects run on another node; its launcher excludes it")
        else:
            why = "cannot exclude the only node; " if self.policy == "exclude" else ""
            pids = self._kill_workers()
            self._record("restart", v, f"{why}killed worker pid(s) {pids}; torchrun restarts them from the newest checkpoint")

    def _local_ranks(self, gen) -> set[int]:
        try:
            pids = {p.pid for p in psutil.Process(self.agent.pid).children(recursive=True)}
        except psutil.Error:
            pids = set()
        host = hostname()
        return {r for r, m in gen.meta.items()
                if m.get("pid") in pids or (not pids and m.get("host") == host and m.get("node") == self.node_rank)}

    def _kill_workers(self) -> list[int]:
        try:
            procs = psutil.Process(self.agent.pid).children(recursive=True)
        except psutil.Error:
            return []
        stop_all([p.pid for p in procs])
        return [p.pid for p in procs]

    def _record(self, action: str, v, detail: str):
        rec = {"time": time.time(), "action": action, "policy": self.policy, "node": self.node_rank,
               "host": hostname(), "detail": detail, "verdict": v.to_json()}
        self.actions.append(rec)
        log.warning("monitor: %s: %s (%s)", action, v.line(), detail)
        with open(self.run_dir / "diagnostics" / "actions.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def _terminate_agent(agent: subprocess.Popen):
    """SIGTERM the agent's process group when it leads one (the launcher starts it so), else
    the agent alone; the agent stops its workers on SIGTERM."""
    try:
        if os.getpgid(agent.pid) == agent.pid:
            os.killpg(agent.pid, signal.SIGTERM)
        else:
            agent.terminate()
    except ProcessLookupError:
        pass
