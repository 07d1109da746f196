"""Detection on the trainer itself, through the real launcher, on the emulated cluster: one
rank per host, and a real fault done to a host from outside (tests/faults.py): a link shaped
slower with tc, a rank stopped with SIGSTOP, a host's traffic dropped, a rank killed. Each is
named with the right kind and the right host or link, by a live Detector and by every host's
own launcher monitor. The whole matrix (every layout x every fault, DeepSpeed included, with
timings) is benchmarks/detect_bench.py's."""
from __future__ import annotations

import pytest

import faults
from diagnostics import probe
from diagnostics.config import DiagnosticsConfig

pytestmark = pytest.mark.slow  # each a real multi-host job (~30-60 s here)


def _check(tb, out, fault, *more):
    want = fault.expected(tb)
    assert out.correct(want, fault), (want, [v.line() for v in out.verdicts], out.detail, *more)
    # Every host's monitor (the launcher's) that saw it named the same.
    by_monitor = {}
    for m in out.monitors:
        if m["kind"] == want[0]:
            by_monitor.setdefault(m["by"], faults.suspects(m["suspects"]))
    assert by_monitor and all(s == want[1] for s in by_monitor.values()), out.monitors
    return next(v for v in out.verdicts if v.kind == want[0])


def test_half_bandwidth_link_inside_fsdp2_collectives_is_named_by_the_probe(testbed):
    """No rank is late when a link inside the all-gathers slows: the group's collectives (or
    the job) slow down, the monitors ask the job for a link probe, and the probe names the pair."""
    tb = testbed(3)
    fault = faults.Fault("link", host=1, peer=2, step=20)  # 200 -> 100 Mbit between node1 and node2
    out = faults.run(tb, "fsdp2", fault, steps=400)  # it ends once the probe named the link; steps to spare under load
    v = _check(tb, out, fault)
    # The slow collectives are named first, or the job's unexplained slowdown asked for the probe.
    assert [x.kind for x in out.verdicts] in (["slow_comm", "slow_link"], ["slow_link"])
    probe = v.evidence["probe"]
    assert probe["step"] > out.fault_step and sorted(probe["ranks"]) == [0, 1, 2]  # one prober per host
    # Every pair was measured, and the slow pair moved the payload about half as fast.
    assert len(probe["matrix_ms"]) == 6 and probe["matrix_ms"]["1->2"] > 1.5 * probe["typical_ms"]


def test_half_bandwidth_link_under_a_pipeline_is_named_by_a_periodic_probe(testbed):
    """A pipeline's stages wait on a link for part of each step only, so a link at half speed
    need not slow the job beyond its noise, and nothing asks for a probe: with
    probe_every_s, the monitors probe every link anyway and name it (two probes agree)."""
    tb = testbed(3)
    fault = faults.Fault("link", host=1, peer=2, step=20)  # 200 -> 100 Mbit between node1 and node2
    out = faults.run(tb, "pp", fault, steps=1000, extra=("--diagnostics.probe_every_s=5",))
    probes = {i: (p["request"]["reason"], p["request"]["step"], probe.analyse(p, DiagnosticsConfig()).get("slow"))
              for i, p in faults._generation(out.run_dir).probes().items()}
    v = _check(tb, out, fault, probes)
    assert [x.kind for x in out.verdicts] == ["slow_link"]
    assert any(reason.startswith("periodic") for reason, _, _ in probes.values()), probes
    assert v.evidence["probe"]["step"] > out.fault_step


def test_stopped_rank_is_a_hang_in_compute(testbed):
    """SIGSTOP under tensor parallelism: the other rank waits inside a traced collective and the
    stopped process is named."""
    tb = testbed(2)
    fault = faults.Fault("stop", host=1, step=8)
    out = faults.run(tb, "tp", fault, steps=1000)
    v = _check(tb, out, fault)
    # (the op the other rank waits in is DTensor's functional collective or, stopped between
    # them, the step's own all-reduce)
    assert "is stopped (SIGSTOP" in v.evidence["summary"] and v.evidence["op"]


def test_partitioned_host_is_a_hang_in_communication(testbed):
    """All its traffic dropped: every rank waits inside an op that never completes; node1's
    interface lost its link and the stalled connections (unacknowledged data, retransmission
    timeouts) all lead to or from it."""
    tb = testbed(3)
    fault = faults.Fault("partition", host=1, step=8)
    out = faults.run(tb, "pp", fault, steps=1000)
    v = _check(tb, out, fault)
    conns = v.evidence["connections"]
    assert conns and all("node1" in (c["from"], c.get("to")) for c in conns) and v.suspects[0]["role"] == "cut off"
    assert any(c.get("nics_down") == {"eth0": "down"} for c in conns), conns


def test_host_cut_off_inside_a_link_probe_is_a_hang_in_communication(testbed):
    """The partition the detection benchmark missed on 2026-12-07 (21:35): node1's traffic
    dropped while every rank is inside a link probe, whose transfers are untraced, so no rank
    has an op in flight. The probers' stalled connections lead to node1: named once the
    ranks have been in the probe past the hang limit (before, nothing was named in 115 s)."""
    tb = testbed(3)
    fault = faults.Fault("partition", host=1, step=8, in_probe=True)
    out = faults.run(tb, "fsdp2", fault, steps=1000)
    v = _check(tb, out, fault)
    assert v.evidence["phase"] == "probe" and "inside a link probe" in v.evidence["summary"], v.evidence


def test_killed_rank_is_a_crash(testbed):
    """Under DDP the survivor's collective fails inside the reducer, where no traced call
    sees it: the trainer records the failure on its way out, so it reads as a victim."""
    tb = testbed(2)
    fault = faults.Fault("kill", host=1, step=8)
    out = faults.run(tb, "ddp", fault, steps=1000)
    v = _check(tb, out, fault)
    assert v.evidence["victims"]  # the survivor's collective failed after it


def test_host_short_of_cpu_is_a_straggler(testbed):
    """A host's cgroup quota (cpu.max) cut so that its rank computes 20% slower, held there
    (tests/faults.py): under DDP the other rank waits for it in every gradient all-reduce,
    and the host is named, not the links or the collectives."""
    tb = testbed(2)
    fault = faults.Fault("cpu", host=1, step=25)  # after a history for the detector to judge against
    # detect_bench's model: steps of ~0.2 s, compute long against a quota period (100 ms)
    out = faults.run(tb, "ddp", fault, steps=150, extra=("--model.dim=128", "--model.max_seq_len=128", "--data.seq_len=128"))
    v = _check(tb, out, fault)
    assert [x.kind for x in out.verdicts] == ["straggler"]
    assert faults.host_slowdown(out) > 0.1  # the quota did slow its compute (measured from its trace)
