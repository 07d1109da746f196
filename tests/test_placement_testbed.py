"""Topology detection in use, on the emulated cluster (tests/cluster.py): four hosts on two
fabrics whose interfaces carry the fabric's name (ifalias) and whose links are shaped.
`kintsugi plan --detect` meets at a c10d rendezvous, reads the fabrics, measures the links
and plans; `kintsugi launch --placement auto` does the same at start and trains on it."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import cluster
from comms.placement import load_plan
from conftest import JOB, TORCH_ABORT, env, losses

FAST, SLOW = [0, 2], [1, 3]  # node ranks interleave the fabrics, as a scheduler hands them out


def two_fabrics(tb):
    for hosts, name in ((FAST, "fast"), (SLOW, "ethernet")):
        for h in hosts:
            tb.run(h, ["ip", "link", "set", cluster.IFACE, "alias", f"fabric={name}"], check=True)
    tb.link(FAST, FAST, rate_mbit=1000)
    tb.link(SLOW, SLOW, rate_mbit=400)
    tb.link(FAST, SLOW, rate_mbit=100)


def wait(tb, procs, what):
    rcs = [p.wait(timeout=900) for p in procs]  # a hang guard
    assert rcs == [0] * len(procs), "\n".join(tb.log(h, what).read_text()[-3000:] for h in range(len(tb.hosts)))


def by_fabric(plan) -> list[set]:
    names = {n["name"]: n["fabric"] for n in plan.topology["nodes"]}
    return [{names[n] for n in st["nodes"]} for st in plan.stages]


def test_plan_detect_reads_fabrics_measures_links_and_places_by_fabric(testbed):
    tb = testbed(4)
    two_fabrics(tb)
    out = tb.shared / "plan.json"
    argv = [sys.executable, "-m", "launch", "plan", "--detect", "--nnodes", "4", "--rdzv-endpoint", tb.rdzv_endpoint(29400),
            "--model", str(JOB), "--pp", "2", "--dp", "2", "--microbatches", "2", "--probe-mb", "2", "--out", str(out)]
    for attempt in range(2):  # a second try only after torch's rare abort (conftest.TORCH_ABORT)
        procs = [tb.popen(h, argv, env=env(GLOO_SOCKET_IFNAME=cluster.IFACE), log=tb.log(h, f"plan{attempt}"))
                 for h in range(4)]
        rcs = [p.wait(timeout=900) for p in procs]  # a hang guard
        logs = "\n".join(tb.log(h, f"plan{attempt}").read_text()[-3000:] for h in range(4))
        if rcs == [0] * 4 or attempt or TORCH_ABORT not in logs:
            break
    assert rcs == [0] * 4, logs
    plan = load_plan(out)
    topo = plan.topology
    # Nodes in the rendezvous' order (by host name), fabrics from the interfaces' aliases.
    assert [n["name"] for n in topo["nodes"]] == ["node0", "node1", "node2", "node3"]
    assert [n["fabric"] for n in topo["nodes"]] == ["fast", "ethernet", "fast", "ethernet"]
    assert [i["alias"] for nets in topo["interfaces"] for i in nets] == ["fabric=fast", "fabric=ethernet"] * 2
    assert [i["addr"] for nets in topo["interfaces"] for i in nets] == [h.addr for h in tb.hosts]
    # Links as shaped (MB/s never above the shaper's rate; the fast pair well above the slow).
    mb = np.array(topo["link_mb_s"])
    assert mb[0][2] < 1.1 * 1000 / 8 and mb[1][3] < 1.1 * 400 / 8 and mb[0][1] < 1.1 * 100 / 8
    assert mb[0][2] > 2 * mb[1][3] > 4 * mb[0][1]
    # Each stage on one fabric (contiguous ranks would put both fabrics in every stage).
    assert by_fabric(plan) in ([{"fast"}, {"ethernet"}], [{"ethernet"}, {"fast"}])
    assert plan.predicted["adaptive_s"] < plan.predicted["unaware_same_schedule_s"]
    report = tb.log(0, f"plan{attempt}").read_text()
    assert "link MB/s (measured)" in report and "fabric fast" in report and "stage" in report


@pytest.mark.slow
def test_launch_placement_auto_plans_at_start_and_trains_like_one_process(testbed, reference):
    tb = testbed(4)
    two_fabrics(tb)
    run = tb.shared / "run"
    overrides = ["--train.steps=4", "--checkpoint.interval=0", "--parallel.pp=2", "--parallel.dp_shard=2",
                 "--parallel.pp_microbatches=2"]
    procs = tb.launch_job("auto", "--config", str(JOB), f"--train.run_dir={run}", "--placement", "auto", "--skip-preflight",
                          *overrides, env=env(GLOO_SOCKET_IFNAME=cluster.IFACE))
    wait(tb, procs, "launch")
    plan = load_plan(run / "plan.json")
    assert by_fabric(plan) in ([{"fast"}, {"ethernet"}], [{"ethernet"}, {"fast"}])
    assert sum(plan.layers_per_stage) == 4 and "placement auto in" in (run / "logs" / "rank0.log").read_text()
    got, want = losses(run), losses(reference)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
