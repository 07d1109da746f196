"""Real faults on real trainer jobs on the emulated cluster (tests/cluster.py), watched live.

A job is `kintsugi launch` on every host (one rank per host, c10d rendezvous on the head,
tests/job.toml in a layout of ``LAYOUTS``); each host's launcher runs its monitor as it
always does. Once every rank has finished ``Fault.step`` the fault is done to the job from
outside, as it happens on a cluster:

| kind        | what is done                                              | named as                         |
|-------------|-----------------------------------------------------------|----------------------------------|
| `stop`      | SIGSTOP the host's rank (a hang in compute)               | hang_noncomm: that host          |
| `kill`      | SIGKILL the host's rank (a crash)                         | crash: that host                 |
| `partition` | drop all the host's traffic (a hang in communication)     | hang_comm: that host             |
| `cpu`       | cgroup cpu.max: the host gets 1/(1 + slower) of the CPU    | straggler: that host             |
|             | it used over the last steps (per 10 ms), then the quota   |                                  |
|             | is corrected every 5 steps so its compute takes           |                                  |
|             | (1 + slower) x as long                                    |                                  |
| `link`      | tc: the link host-peer at `rate_mbit` both ways           | slow_link: host->peer, peer->host|
| `port`      | tc: the host's own port at `rate_mbit` (a slow NIC)       | slow_link: that host             |

Link faults start from every link shaped at ``BASE_MBIT`` (a uniform fabric) and halve one.
A ``Detector`` in this process (the same class the launchers' monitors run) watches the run
directory live; when the job has ended, judging the finished directory adds what only shows
then (as ``kintsugi diagnose report`` would). The monitors' own verdicts are returned too.
Used by tests/test_diag_testbed.py and benchmarks/detect_bench.py.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import cluster
from conftest import JOB, env, records

from diagnostics import Detector
from diagnostics.traces import Generation, generations

BASE_MBIT = 200  # every link of a link-fault job: 24 MB/s (measured, docs/testbed.md)
POLL_S = 0.5  # as the launcher's monitor
HOLD_STEPS = 5  # cpu: steps between corrections of the quota (see _hold)
# cpu: the quota's period. At the kernel's 100 ms, a compute burst shorter than the quota
# ran unslowed: the first quota slowed the host -6% to +9% (detect_bench, 2026-12-07 20:26) and
# the correction took 10-15 steps to reach 20%, counted as detection time. A short period cuts
# every burst alike, as a slower CPU does.
QUOTA_PERIOD_MS = 10
GRACE_S = 3.0  # after the expected verdict: long enough for a wrong second one (a crash after a hang)

# Per layout: the overrides for a job on n hosts (one rank each). tests/job.toml's model is
# small; the global batch of 12 divides by 1-4 data-parallel ranks and 4 microbatches.
LAYOUTS = {
    "fsdp2": lambda n: [],
    "ddp": lambda n: [f"--parallel.dp_replicate={n}", "--parallel.dp_shard=1"],
    "tp": lambda n: [f"--parallel.tp={n}"],
    "pp": lambda n: [f"--parallel.pp={n}"],
    "deepspeed": lambda n: ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=2"],
}
COMMON = ["--data.batch_size=12", "--checkpoint.interval=0", "--snapshot.interval=0", "--train.log_every=1000",
          "--max-restarts=0"]
EXPECTED = {"stop": "hang_noncomm", "kill": "crash", "partition": "hang_comm", "cpu": "straggler",
            "link": "slow_link", "port": "slow_link"}
# Verdicts that may come before the one expected, naming the same fault from less evidence:
# a slow link first shows as slow collectives of the group that crosses it.
PRECURSORS = {"link": ("slow_comm",), "port": ("slow_comm",)}
COMPUTE = ("data", "forward_backward", "optimizer")  # a step's phases (comms.trace) spent computing


@dataclass
class Fault:
    kind: str | None  # a key of EXPECTED, or None: a clean run
    host: int = 1
    peer: int = 2  # link: the other end
    step: int = 10  # done once every rank has finished this step
    rate_mbit: float = BASE_MBIT / 2  # link, port
    slower: float = 0.2  # cpu
    # Done while every rank is inside a link probe this harness asks for (its transfers are
    # untraced: no op in flight for the hang rules to see), on links shaped at BASE_MBIT so
    # that the probe's transfers (its largest, diagnostics.probe.MAX_BYTES) last seconds.
    in_probe: bool = False

    def expected(self, tb: cluster.Testbed) -> tuple[str, set] | None:
        if self.kind is None:
            return None
        name = tb.host(self.host).name
        if self.kind == "link":
            other = tb.host(self.peer).name
            return "slow_link", {("link", name, other), ("link", other, name)}
        return EXPECTED[self.kind], {("host", name)}

    def __str__(self):
        if self.kind is None:
            return "clean"
        what = {"link": f"link {self.host}-{self.peer} at {self.rate_mbit:g} Mbit", "port": f"port at {self.rate_mbit:g} Mbit",
                "cpu": f"{self.slower:.0%} less CPU"}.get(self.kind, "")
        return (f"{self.kind} node{self.host}" + (f" ({what})" if what else "") + f" after step {self.step}"
                + (" inside a link probe" if self.in_probe else ""))


@dataclass
class Outcome:
    verdicts: list  # the Detector's, in order
    monitors: list  # the launchers' monitors' records (verdicts.jsonl)
    run_dir: Path
    fault_time: float | None = None  # when the fault was done
    fault_step: int | None = None  # the last step every rank finished before it
    detail: dict = field(default_factory=dict)

    def named(self) -> list[tuple[str, set]]:
        return [(v.kind, suspects(v.suspects)) for v in self.verdicts]

    def correct(self, want: tuple[str, set] | None, fault: Fault) -> bool:
        """Exactly the expected verdict (after allowed precursors); a clean run: none."""
        got = self.named()
        if want is None:
            return not got
        allowed = PRECURSORS.get(fault.kind, ())
        return [x for x in got if x[0] not in allowed] == [want]

    @functools.cached_property
    def gen(self) -> Generation:
        """The first generation's traces, read once the job is over (for the measures below)."""
        return _generation(self.run_dir)

    def step_s(self) -> float | None:
        """The job's median step time before the fault (from the first generation's traces)."""
        gen = self.gen
        steps = [s for s in gen.training_steps() if self.fault_step is None or s <= self.fault_step]
        return statistics.median(gen.step_time(s) for s in steps) if steps else None


def suspects(raw: list) -> set:
    """A verdict's suspects as comparable tuples: ("host", name), ("link", a, b), ("group", *hosts)."""
    out = set()
    for s in raw:
        if "link" in s:
            out.add(("link", *s["hosts"]))
        elif "group" in s:
            out.add(("group", *s["hosts"]))
        else:
            out.add(("host", s["host"]))
    return out


def run(tb: cluster.Testbed, layout: str, fault: Fault, *, steps: int, watch_s: float = 90.0,
        rdzv: str = "job", extra: tuple = ()) -> Outcome:
    """One job of ``layout`` on every host of ``tb`` with ``fault`` done to it; returns when the
    expected verdict came (and a grace period showed nothing else), when the job ended, or
    ``watch_s`` after the fault. The caller tears the testbed down (that ends the job)."""
    run_dir = tb.shared / "run"
    n = len(tb.hosts)
    if fault.kind in ("link", "port") or fault.in_probe:
        tb.link(list(range(n)), list(range(n)), rate_mbit=BASE_MBIT)
    args = ["--config", str(JOB), f"--train.run_dir={run_dir}", f"--train.steps={steps}", *COMMON, *LAYOUTS[layout](n), *extra]
    procs = tb.launch_job(rdzv, *args, env=env())
    det = Detector(run_dir, live=True, dump_stacks=False)
    out = Outcome(det.verdicts, [], run_dir)
    want = fault.expected(tb)
    deadline = None
    settled = None  # when the expected verdict came: watch a grace period more for others
    usage = []  # (time, the fault host's cgroup CPU seconds, its step) while waiting to slow it
    started = time.time()
    while True:
        time.sleep(POLL_S)
        det.poll()
        done = all(p.poll() is not None for p in procs)
        if out.fault_time is None and fault.kind is not None:
            step = _finished(run_dir, n)
            if fault.kind == "cpu" and step is not None:
                usage.append((time.time(), _cpu_seconds(tb, fault.host), step))
            if step is not None and step >= fault.step and (not fault.in_probe or _in_probe(run_dir)):
                out.fault_step = step
                out.detail.update(_inject(tb, fault, run_dir, usage))
                out.fault_time = time.time()
                deadline = out.fault_time + watch_s
        elif fault.kind == "cpu" and not done:
            _hold(tb, fault, out, _finished(run_dir, n))
        if want and settled is None and any(v.kind == want[0] for v in det.verdicts):
            settled = time.time()
        if fault.kind is not None and out.fault_time is None and (done or time.time() - started > 600):
            raise RuntimeError(f"the job never reached step {fault.step}: {_tail(tb)}")  # a guard, not a limit
        if done or (settled and time.time() - settled > GRACE_S) or (deadline and time.time() > deadline):
            break
    if done:  # what only judging the ended job shows (a crash whose ranks all exit in its grace)
        seen = {v.key for v in det.verdicts}
        det.verdicts += [v for v in Detector(run_dir, live=False, dump_stacks=False).poll() if v.key not in seen]
    out.detail["rcs"] = [p.poll() for p in procs]
    if fault.kind is None and any(rc != 0 for rc in out.detail["rcs"]):
        raise RuntimeError(f"a clean job failed ({out.detail['rcs']}): {_tail(tb)}")
    out.monitors = records(run_dir / "diagnostics" / "verdicts.jsonl")
    return out


def _finished(run_dir: Path, n: int) -> int | None:
    """The last step every rank of the newest generation has finished (None before all write)."""
    gens = generations(run_dir)
    if not gens:
        return None
    steps = []
    for r in range(n):
        try:
            steps.append(json.loads((gens[-1] / f"state-r{r}.json").read_text())["step"] - 1)
        except (OSError, ValueError, KeyError):
            return None
    return min(steps)


def _in_probe(run_dir: Path) -> bool:
    """Ask the job (once) for a link probe among all its hosts; True once every rank is inside it."""
    from diagnostics import DiagnosticsConfig, probe

    gen = _generation(run_dir)
    if not gen.probes():
        step_s = statistics.median(gen.step_time(s) for s in gen.training_steps())
        probe.request(gen, sorted(gen.meta), probe.MAX_BYTES, step_s, DiagnosticsConfig(), reason="test: a fault inside a probe",
                      links_only=True)
        return False
    return all(st.get("phase") == "probe" for st in gen.state.values())


def _rank_on(run_dir: Path, host: str) -> dict:
    gens = generations(run_dir)
    for p in sorted(gens[-1].glob("meta-r*.json")):
        meta = json.loads(p.read_text())
        if meta["host"] == host:
            return meta
    raise RuntimeError(f"no rank on {host}")


def _cpu_seconds(tb: cluster.Testbed, h: int) -> float:
    """CPU seconds used so far by everything host ``h`` runs (its cgroup)."""
    stat = (cluster._cgroup2() / tb.host(h).ns / "cpu.stat").read_text()
    return int(next(x.split()[1] for x in stat.splitlines() if x.startswith("usage_usec"))) / 1e6


def _inject(tb: cluster.Testbed, fault: Fault, run_dir: Path, usage: list) -> dict:
    """Do the fault; returns what was done (the host's rank, the CPU quota)."""
    h = tb.host(fault.host)
    meta = _rank_on(run_dir, h.name)
    if fault.kind in ("stop", "kill"):
        os.kill(meta["pid"], signal.SIGSTOP if fault.kind == "stop" else signal.SIGKILL)
    elif fault.kind == "partition":
        tb.partition(h)
    elif fault.kind == "link":
        tb.link(fault.host, fault.peer, rate_mbit=fault.rate_mbit)
    elif fault.kind == "port":
        tb.port(fault.host, rate_mbit=fault.rate_mbit)
    if fault.kind != "cpu":
        return {"rank": meta["rank"]}
    # cpu: the CPU the host got while its rank computed over its last steps (at least 5), cut
    # to 1/(1 + slower) of it: its compute then takes (1 + slower) as long. (Its average use
    # would not do: the rank computes in bursts between collectives, and a quota of its
    # average throttles each burst far more.)
    t1, c1, s1 = usage[-1]
    t0, c0, s0 = next((u for u in reversed(usage) if s1 - u[2] >= 5), usage[0])
    # Per second of its compute phases, waits included: its collectives take CPU too (gloo
    # reduces and copies on the host), which a quota per second of its own work alone leaves
    # out (tried: a tensor-parallel host then ran unslowed until the hold caught up).
    per = compute_s(run_dir, meta["rank"], own=False)
    computing = sum(per.get(s, 0.0) for s in range(s0 + 1, s1 + 1))
    rate = (c1 - c0) / max(computing, 1e-3)
    cores = rate / (1 + fault.slower)
    tb.slow_cpu(h, cores, QUOTA_PERIOD_MS)
    return {"rank": meta["rank"], "computing_cores": round(rate, 3), "quota_cores": round(cores, 3)}


def _hold(tb: cluster.Testbed, fault: Fault, out: Outcome, step: int | None):
    """cpu: hold the host's compute at (1 + slower) x its time before the fault. A quota
    slows a rank by how much of each compute burst it cuts, which varies with the bursts'
    lengths against the quota's period and with the other hosts' load on the shared cores
    (3-33% for the same cut, measured); so, like a thermostat, every ``HOLD_STEPS`` steps
    the quota is corrected by the slowdown measured over them."""
    held = out.detail.setdefault("held_to_step", out.fault_step)
    if step is None or step - held < HOLD_STEPS:
        return
    per = compute_s(out.run_dir, out.detail["rank"])
    before = [t for s, t in per.items() if 1 < s <= out.fault_step]
    new = [t for s, t in per.items() if held < s <= step]
    if not before or len(new) < HOLD_STEPS:
        return
    ratio = statistics.median(new) / statistics.median(before)
    # Half the correction (the square root), at most 25% at a time: a few steps' compute is
    # noisy, and a quota that swings would make the slowdown come and go.
    cores = out.detail["quota_cores"] * min(1.25, max(0.8, (ratio / (1 + fault.slower)) ** 0.5))
    tb.slow_cpu(tb.host(fault.host), max(0.1, cores), QUOTA_PERIOD_MS)
    out.detail.update(held_to_step=step, quota_cores=round(cores, 3))
    out.detail.setdefault("quota_log", []).append([step, round(ratio, 3), round(cores, 3)])


def compute_s(run_dir: Path, rank: int, *, own: bool = True) -> dict[int, float]:
    """Step -> seconds rank ``rank`` spent in its data, forward/backward and optimizer phases,
    from its trace; ``own``: less the time it was blocked in traced ops (waiting for the
    others: its own work, what a CPU quota slows)."""
    gen = _generation(run_dir)
    return {s: max(sum(v for k, v in rec.phases.items() if k in COMPUTE) - ((rec.blocked or 0.0) if own else 0.0), 0.0)
            for s, rec in gen.steps.get(rank, {}).items()}


def host_slowdown(out: "Outcome") -> float | None:
    """The faulty host's rank's median compute time per step after the fault over before it,
    minus 1 (measured)."""
    per = compute_s(out.run_dir, out.detail.get("rank"))
    before = [t for s, t in per.items() if 1 < s <= out.fault_step]
    after = [t for s, t in per.items() if s > out.fault_step]
    return statistics.median(after) / statistics.median(before) - 1 if before and after else None


def _generation(run_dir: Path) -> Generation:
    gen = Generation(generations(run_dir)[0])
    gen.update()
    return gen


def job_slowdown(out: Outcome) -> float | None:
    """The job's median step time after the fault over before it, minus 1 (measured)."""
    gen = out.gen
    steps = gen.training_steps()
    before = [gen.step_time(s) for s in steps if s <= out.fault_step]
    after = [gen.step_time(s) for s in steps if s > out.fault_step]
    return statistics.median(after) / statistics.median(before) - 1 if before and after else None


def probe_share(out: Outcome) -> float | None:
    """Share of rank 0's training time spent in link probes (the ``probe`` phase), measured."""
    gen = out.gen
    recs = sorted(gen.steps.get(0, {}).values(), key=lambda r: r.step)
    if len(recs) < 2:
        return None
    return sum(r.phases.get("probe", 0.0) for r in recs) / (recs[-1].end - recs[0].start)


def _tail(tb: cluster.Testbed) -> str:
    return "\n".join(f"--- {h.name}\n" + tb.log(h).read_text()[-2000:] for h in tb.hosts if tb.log(h).exists())
