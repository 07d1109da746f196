"""The pairwise link probe: its analysis on recorded probe matrices (slow pair, slow sender,
slow host, a prober short of CPU), and its mechanics on a real 4-rank gloo job (request at a
step boundary, every ordered pair measured, a rank whose process is really CPU-throttled
named as short of CPU and none of its links blamed). Loopback links cannot be slowed here:
a real slow link is phase 2's (tc on the emulated cluster)."""
import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from comms.probe import rounds
from diagnostics import DiagnosticsConfig, Detector
from diagnostics.drill import _entry, free_port
from diagnostics.probe import MAX_REPEAT_BYTES, analyse, request, repeat_bytes
from diagnostics.traces import Generation, generations

CFG = DiagnosticsConfig()


def recorded(matrix_ms: dict, cpu_ms: dict | None = None, throttled: dict | None = None, world=4) -> dict:
    """A finished probe as the probers write it: per prober its round trips to each peer."""
    req = {"id": "1", "step": 40, "ranks": list(range(world)), "bytes": 1 << 20, "requested": 0.0}
    results = {}
    for r in range(world):
        sends = {str(d): [matrix_ms.get((r, d), 2.0) / 1e3 * f for f in (0.98, 1.0, 1.03)] for d in range(world) if d != r}
        results[r] = {"id": "1", "rank": r, "status": "go", "send_s": sends, "started": 0.0, "ended": 1.0,
                      "cpu_s": [(cpu_ms or {}).get(r, 20.0) / 1e3] * 4, "throttled_s": (throttled or {}).get(r)}
    return {"request": req, "results": results}


def named(a: dict) -> list:
    from diagnostics.links import name_cells

    node = lambda r: {"rank": r, "node": 0, "host": f"h{r}"}  # noqa: E731
    return [s.get("link") or (s["rank"], s["role"]) for s in name_cells({tuple(c) for c in a["slow"]},
                                                                        [tuple(c) for c in a["cells"]], node)]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_rounds_pair_everyone_once(n):
    rs = rounds(list(range(n)))
    pairs = [frozenset(p) for rnd in rs for p in rnd]
    assert len(pairs) == len(set(pairs)) == n * (n - 1) // 2
    assert all(len({r for p in rnd for r in p}) == 2 * len(rnd) for rnd in rs)  # nobody twice in a round


def test_analysis_names_the_slow_pair_sender_and_host():
    assert analyse(recorded({}), CFG)["slow"] == []  # all at 2 ms
    a = analyse(recorded({(1, 2): 4.0}), CFG)  # one direction at half bandwidth
    assert a["status"] == "done" and named(a) == [[1, 2]] and a["matrix_ms"]["1->2"] == pytest.approx(4.0 * 0.98)
    a = analyse(recorded({(2, d): 5.0 for d in (0, 1, 3)}), CFG)  # host 2's egress
    assert named(a) == [(2, "sender")]
    both = {**{(2, d): 5.0 for d in (0, 1, 3)}, **{(s, 2): 5.0 for s in (0, 1, 3)}}
    assert named(analyse(recorded(both), CFG)) == [(2, "sender and receiver")]


def test_a_prober_short_of_cpu_is_not_a_slow_link():
    # Rank 3's transfers are slow both ways, and so is its fixed CPU work: its process, not its link.
    slow = {**{(3, d): 9.0 for d in range(3)}, **{(s, 3): 9.0 for s in range(3)}}
    a = analyse(recorded(slow, cpu_ms={3: 90.0}), CFG)
    assert a["slow"] == [] and set(a["starved"]) == {3} and a["starved"][3]["cpu_ratio"] == pytest.approx(4.5)
    a = analyse(recorded(slow, throttled={3: 0.4}), CFG)  # its cgroup says so
    assert a["slow"] == [] and set(a["starved"]) == {3}


def test_incomplete_and_abandoned_probes_say_so():
    p = recorded({})
    del p["results"][2]
    assert analyse(p, CFG)["status"] == "incomplete"
    p = recorded({})
    p["results"][1] = {"id": "1", "rank": 1, "status": "abandoned"}
    assert analyse(p, CFG)["status"] == "abandoned"


@pytest.mark.parametrize("links_only", [True, False])
@pytest.mark.parametrize("again", [None, (1, 2), (0, 3)])
def test_a_link_is_named_only_when_a_second_probe_repeats_it(tmp_path, again, links_only):
    """One probe on a busy machine can catch a prober in a hiccup (seen in a clean 4-host
    testbed run: one direction at 12x the typical for all 5 repetitions; and on loopback
    beside other jobs: 1.8x). A link is named when a second probe finds it slow too, whether
    the probe was asked for by slow collectives or by an unexplained slowdown (``links_only``);
    ``again``: the direction the second probe finds slow (None: none ran)."""
    from test_diag_rules import write_run

    gen = write_run(tmp_path, world=4)
    probes = [("1", None, (1, 2))] + ([("2", "1", again)] if again else [])
    for pid, confirms, slow in probes:
        p = recorded({slow: 8.0})
        req = {**p["request"], "id": pid, "links_only": links_only, "confirms": confirms}
        (gen / f"probe-request-{pid}.json").write_text(json.dumps(req))
        for r, res in p["results"].items():
            (gen / f"probe-{pid}-r{r}.json").write_text(json.dumps({**res, "id": pid}))
    links = [v for v in Detector(tmp_path, live=False, dump_stacks=False).poll() if v.kind == "slow_link"]
    if again == (1, 2):
        assert [s["link"] for s in links[0].suspects] == [[1, 2]] and len(links) == 1
        assert "repeating probe 1" in links[0].evidence["summary"] and links[0].since == 0.0
    else:
        assert links == []


def write_probes(gen, probes, world):
    """Finished probes in ``gen``: (id, the probe it repeats, the direction it found slow or None)."""
    for pid, confirms, slow in probes:
        p = recorded({slow: 8.0} if slow else {}, world=world)
        (gen / f"probe-request-{pid}.json").write_text(json.dumps({**p["request"], "id": pid, "confirms": confirms}))
        for r, res in p["results"].items():
            (gen / f"probe-{pid}-r{r}.json").write_text(json.dumps({**res, "id": pid}))


@pytest.mark.parametrize("probes, echo", [
    ([], False),
    ([("1", None, (1, 2)), ("2", "1", (1, 2))], True),  # the link 1-2 named
    ([("1", None, (2, 1))], True),  # found once, being repeated
    ([("1", None, (1, 2)), ("2", "1", None)], False),  # the repeat cleared it
    ([("1", None, (0, 1)), ("2", "1", (0, 1))], False),  # a slow link elsewhere
])
@pytest.mark.parametrize("starved", [False, True])
def test_a_rank_late_at_the_end_of_a_slow_link_is_its_echo_not_a_straggler(tmp_path, probes, echo, starved):
    """DeepSpeed on three testbed hosts, the link node1-node2 at half bandwidth: rank 2, at its
    end, came to the next collectives 178 ms a step later while they slowed by 100 ms, and was
    named a straggler beside the link (run E of 2026-12-07). Once a probe found the link slow,
    lateness at its ends is its echo; a rank whose thread waits longer for a CPU is still named."""
    from test_diag_rules import write_run

    gen = write_run(tmp_path, world=3, compute=lambda r, s: 0.16 + (0.05 if r == 2 and s >= 30 else 0.0),
                    comm=(lambda s: 0.02 if s < 30 else 0.065) if starved else None,
                    cpu_wait=(lambda r, s: 0.01 + (0.06 if r == 2 and s >= 30 else 0.0)) if starved else None)
    for r in range(3):
        meta = gen / f"meta-r{r}.json"
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "host": f"h{r}", "node": r}))
    write_probes(gen, probes, world=3)
    vs = Detector(tmp_path, live=False, dump_stacks=False).poll()
    stragglers = [v.suspects[0]["rank"] for v in vs if v.kind == "straggler"]
    assert stragglers == ([] if echo and not starved else [2]), [v.line() for v in vs]


def test_a_repeat_refused_while_another_probe_is_pending_is_asked_for_again(tmp_path):
    """A first probe found link 1-2 slow while another probe was pending: the job gets one
    request at a time, so the repeat was refused. Until it runs the link is neither named
    nor cleared (and lateness at its ends is held back), so the live monitor asks again
    once the other probe is done."""
    import time

    from test_diag_rules import write_run

    gen = write_run(tmp_path, world=3, now=time.time())
    for r in range(3):
        path = gen / f"state-r{r}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "closed": False}))
    write_probes(gen, [("1", None, (1, 2))], world=3)
    pending = {"id": "9", "step": 10_000, "ranks": [0, 1, 2], "bytes": 1 << 20, "requested": time.time()}
    (gen / "probe-request.json").write_text(json.dumps(pending))
    (gen / "probe-request-9.json").write_text(json.dumps(pending))
    det = Detector(tmp_path, live=True, dump_stacks=False)
    repeats = lambda: [q for q in Generation(gen).probes().values() if q["request"].get("confirms") == "1"]  # noqa: E731
    det.poll()
    assert repeats() == []  # refused: probe 9 is pending
    (gen / "probe-request-9.json").write_text(json.dumps({**pending, "step": 0}))  # the job went past it
    det.poll()
    assert len(repeats()) == 1 and repeats()[0]["request"]["ranks"] == [0, 1, 2]


# ---- on real ranks ------------------------------------------------------------------------
@contextlib.contextmanager
def cpu_throttled(pid: int, share: float):
    """Really hold a process to ``share`` of one CPU: a cgroup CPU quota (v2 cpu.max, v1
    cfs_quota_us) when this machine lets us make one, else a SIGSTOP/SIGCONT duty cycle."""
    period = 100_000
    for root, v2 in ((Path("/sys/fs/cgroup"), True), (Path("/sys/fs/cgroup/cpu"), False)):
        quota_file = "cpu.max" if v2 else "cpu.cfs_quota_us"
        if not (root / "cgroup.procs").exists() or (v2 and not (root / "cgroup.subtree_control").exists()):
            continue
        cg = root / f"kintsugi-test-{os.getpid()}-{pid}"
        try:
            cg.mkdir()
            (cg / quota_file).write_text(f"{int(share * period)} {period}" if v2 else str(int(share * period)))
            (cg / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                cg.rmdir()
            continue
        try:
            yield "cgroup"
        finally:
            with contextlib.suppress(OSError):
                (root / "cgroup.procs").write_text(str(pid))
            for _ in range(50):
                with contextlib.suppress(OSError):
                    cg.rmdir()
                    break
                time.sleep(0.1)
        return
    stop = threading.Event()

    def duty():
        while not stop.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.02 * (1 - share))
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.02 * share)

    t = threading.Thread(target=duty, daemon=True)
    t.start()
    try:
        yield "sigstop"
    finally:
        stop.set()
        t.join()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _job(tmp_path, world, steps):
    import torch.multiprocessing as mp

    ctx = mp.start_processes(_entry, args=(world, free_port(), {"run_dir": str(tmp_path), "steps": steps, "p2p": False}),
                             nprocs=world, join=False, start_method="fork")
    deadline = time.time() + 120
    while True:
        gens = generations(tmp_path)
        if gens and len(list(gens[-1].glob("state-r*.json"))) == world:
            gen = Generation(gens[-1])
            gen.update()
            if min(st.get("step", 0) for st in gen.state.values()) >= 2:
                return ctx, gen
        assert time.time() < deadline, "the job never started"
        time.sleep(0.2)


def _wait_results(gen, req, world, ctx):
    deadline = time.time() + 180
    while len(gen.probes()[req["id"]]["results"]) < len(req["ranks"]):
        assert time.time() < deadline and all(p.is_alive() for p in ctx.processes), "the probe never finished"
        time.sleep(0.2)
        gen.update()
    return gen.probes()[req["id"]]


def _finish(ctx):
    for p in ctx.processes:
        p.join(120)
        assert p.exitcode == 0


def test_probe_at_a_step_boundary_measures_every_pair(tmp_path):
    ctx, gen = _job(tmp_path, 4, steps=250)
    req = request(gen, [0, 1, 2, 3], 1 << 20, step_s=0.03, cfg=CFG, reason="test")
    assert req["ranks"] == [0, 1, 2, 3] and req["bytes"] == 1 << 20  # one host: every rank probes
    assert request(gen, [0, 1, 2, 3], 1 << 20, step_s=0.03, cfg=CFG) is None  # one at a time
    probe = _wait_results(gen, req, 4, ctx)
    _finish(ctx)
    gen.update()
    a = analyse(probe, CFG)
    assert a["status"] == "done" and len(a["matrix_ms"]) == 12 and all(ms > 0 for ms in a["matrix_ms"].values())
    assert all(res["status"] == "go" and res["left"] == "go" for res in probe["results"].values())
    # every rank spent the probe inside the requested step, recorded as its phase and left out of the statistics
    assert all("probe" in gen.steps[r][req["step"]].phases for r in range(4))
    assert req["step"] in gen.complete_steps() and req["step"] not in gen.training_steps()
    det = Detector(tmp_path, live=False, dump_stacks=False)
    det.poll()
    assert list(det.probes[gen.id]) == [req["id"]]


def test_cpu_throttled_rank_during_the_probe_is_not_a_link_fault(tmp_path):
    ctx, gen = _job(tmp_path, 3, steps=250)
    req = request(gen, [0, 1, 2], 1 << 20, step_s=0.03, cfg=CFG, reason="test")
    with cpu_throttled(ctx.processes[2].pid, 0.15) as how:
        probe = _wait_results(gen, req, 3, ctx)
    _finish(ctx)
    a = analyse(probe, CFG)
    assert a["status"] == "done" and set(a["starved"]) == {2}, (how, a)
    assert not any(2 in cell for cell in a["slow"])
    vs = Detector(tmp_path, live=False, dump_stacks=False).poll()
    cpu = [v for v in vs if v.evidence.get("pattern") == "cpu"]
    assert [(v.kind, v.suspects[0]["rank"]) for v in cpu] == [("straggler", 2)]
    assert not any(v.kind == "slow_link" and any(2 in s.get("link", []) or s.get("rank") == 2 for s in v.suspects) for v in vs)
    if how == "cgroup":  # its cgroup's own account; without one, its fixed CPU work gave it away
        assert probe["results"][2]["throttled_s"] > 0
    else:
        assert a["starved"][2]["cpu_ratio"] >= CFG.probe_cpu_factor
    # Asked for by an unexplained slowdown (links only), the same probe names nobody.
    path = gen.path / f"probe-request-{req['id']}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "links_only": True}))
    assert not [v for v in Detector(tmp_path, live=False, dump_stacks=False).poll() if v.evidence.get("pattern") == "cpu"]


def test_slow_collectives_make_the_monitor_probe_the_links(tmp_path):
    """End to end on the drill: rank 1 holds every collective 30 ms once inside it (nobody is
    late); the live detector names slow_comm, asks for a probe, the ranks run it at the step
    it names, and the probe's answer is analysed (on loopback the links are fine)."""
    from diagnostics.drill import run_local

    verdicts, _ = run_local(3, tmp_path, inject=["slowcomm:rank=1,ms=30,from=12"], steps=90, watch_s=120)
    slow = [v for v in verdicts if v.kind == "slow_comm"]
    assert len(slow) == 1 and slow[0].suspects[0]["group"] == [0, 1, 2], [v.line() for v in verdicts]
    asked = slow[0].evidence["probe"]
    assert asked["ranks"] == [0, 1, 2] and "probing the links" in slow[0].evidence["summary"]
    det = Detector(tmp_path, live=False, dump_stacks=False)
    det.poll()
    probes = det.probes[next(iter(det.probes))]
    a = probes[asked["id"]]
    assert a["status"] == "done" and len(a["matrix_ms"]) == 6
    # A second probe ran only if the first found a slow direction (a loopback hiccup), to repeat it.
    assert len(probes) == (2 if a["slow"] else 1), probes


def test_a_repeat_probe_carries_enough_bytes_to_outweigh_waiting_for_a_cpu():
    # The first probe's typical transfer took 1 ms (a fast link): waiting for a CPU on a busy
    # host is of that order, so the repeat moves 20x the bytes (REPEAT_MS = 20 ms); a slow
    # link's transfers (40 ms) are long enough as they are; a very fast one stops at the cap.
    first = {"bytes": 1 << 20, "typical_ms": 1.0}
    assert repeat_bytes(first) == 20 << 20
    assert repeat_bytes({**first, "typical_ms": 40.0}) == 1 << 20
    assert repeat_bytes({**first, "typical_ms": 0.01}) == MAX_REPEAT_BYTES


def test_a_rank_inside_a_probe_says_since_when(tmp_path):
    # The probe's transfers are untraced: the state's phase and its start are what the hang
    # rule has to go on (diagnostics.detect._probe_hang).
    from comms.trace import Tracer

    tracer = Tracer(tmp_path, 0, 1, flush_s=0.05)
    try:
        t0 = time.time()
        with tracer.phase("probe"):
            time.sleep(0.5)
            state = json.loads(next((tmp_path / "diagnostics").glob("gen-*/state-r0.json")).read_text())
        assert state["phase"] == "probe" and t0 <= state["phase_since"] <= t0 + 0.1
        time.sleep(0.2)
        state = json.loads(next((tmp_path / "diagnostics").glob("gen-*/state-r0.json")).read_text())
        assert state["phase"] == "" and state["phase_since"] is None
    finally:
        tracer.close()
