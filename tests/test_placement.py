"""Placement, partition and cost model (pure Python): properties over random topologies,
hand-computed iteration times, topology files, /sys detection, plan files, `kintsugi plan`."""
from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from comms import UserError
from comms.costmodel import PRESETS, ModelSpec, Stage, simulate, stages_of
from comms.mesh import MESH_DIMS
from comms.placement import (Plan, adaptive_layers, contiguous_grid, even_layers, group_net, load_plan, make_plan, place)
from comms.topology import Link, LinkProbe, Node, Topology, _round_robin, detect_local_node, load_topology, with_probe
from launch.plan import main as plan_main

ROOT = Path(__file__).resolve().parent.parent


def random_topology(rng: random.Random, max_fabrics=4, max_nodes=4, gpu_choices=(1, 2, 4, 8)) -> Topology:
    nodes = []
    for f in range(rng.randint(1, max_fabrics)):
        kind = rng.choice(["ib", "roce", "eth"])
        for i in range(rng.randint(1, max_nodes)):
            nodes.append(Node(f"f{f}-n{i}", rng.choice(gpu_choices), f"f{f}", kind, rng.randint(1, 8),
                              rng.choice([25.0, 100.0, 200.0]), rng.choice([10.0, 25.0, 100.0]), rng.choice([50.0, 150.0])))
    rng.shuffle(nodes)  # node ranks as a rendezvous hands them out
    return Topology(nodes)


def random_sizes(rng: random.Random, world: int) -> dict:
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    tp = rng.choice(divisors)
    pp = rng.choice([d for d in divisors if (world // tp) % d == 0])
    dp = world // tp // pp
    dpr = rng.choice([d for d in range(1, dp + 1) if dp % d == 0])
    return {"pp": pp, "dp_replicate": dpr, "dp_shard": dp // dpr, "tp": tp}


def groups(grid, dim: str) -> list[list[int]]:
    a = np.moveaxis(np.array(grid), MESH_DIMS.index(dim), -1)
    return a.reshape(-1, a.shape[-1]).tolist()


def valid(topo: Topology, grid) -> bool:
    """TP groups inside a node, every stage (so every DP/EP group) inside one fabric."""
    if any(len({topo.node_of(r) for r in g}) > 1 for g in groups(grid, "tp")):
        return False
    return all(len({topo.fabric_of(r) for r in np.array(stage).ravel()}) == 1 for stage in grid)


def test_placement_properties_over_random_topologies():
    rng = random.Random(1)
    placed = failed = 0
    for _ in range(400):
        topo = random_topology(rng)
        sizes = random_sizes(rng, topo.world_size)
        try:
            grid = place(topo, sizes)
        except UserError as e:
            failed += 1
            msg = str(e)
            assert "\n" not in msg and msg.startswith("no placement keeps")
            # The reason is a checkable certificate: the named node or fabric really breaks it.
            dp_tp = sizes["dp_replicate"] * sizes["dp_shard"] * sizes["tp"]
            if m := re.search(r"node '([^']+)' has (\d+) GPUs", msg):
                node = next(n for n in topo.nodes if n.name == m[1])
                assert node.gpus == int(m[2]) and node.gpus % sizes["tp"]
            else:
                m = re.search(r"fabric '([^']+)' has (\d+)", msg)
                fab = sum(n.gpus for n in topo.nodes if n.fabric == m[1])
                assert fab == int(m[2]) and fab % dp_tp
            continue
        placed += 1
        # Any node order inside the fabrics (here: reversed) keeps every property below.
        reordered = place(topo, sizes, node_order={f: idx[::-1] for f, idx in topo.fabrics().items()})
        for g in (grid, reordered):
            assert np.array(g).shape == tuple(sizes[d] for d in MESH_DIMS)
            assert sorted(np.array(g).ravel().tolist()) == list(range(topo.world_size))
            assert valid(topo, g)
            # tp and dp groups list ranks in increasing order: group rank = mesh coordinate,
            # so DTensor's shards line up with the group's collectives.
            for dim in ("dp_replicate", "dp_shard", "tp"):
                assert all(x == sorted(x) for x in groups(g, dim))
        # Only the pipeline crosses fabrics, at the fewest possible stage boundaries.
        stage_fabrics = [topo.fabric_of(stage_ranks[0]) for stage_ranks in (np.array(s).ravel() for s in grid)]
        assert sum(a != b for a, b in zip(stage_fabrics, stage_fabrics[1:])) == len(topo.fabrics()) - 1
        # EP groups (blocks of ep data-parallel ranks) stay inside a fabric too.
        dp = sizes["dp_replicate"] * sizes["dp_shard"]
        ep = max(d for d in (1, 2, 4) if dp % d == 0)
        for g in groups(place(topo, sizes, ep=ep), "dp_shard"):
            assert len({topo.fabric_of(r) for r in g}) == 1
    assert placed > 100 and failed > 50  # both branches really exercised


def test_placement_exists_exactly_when_brute_force_finds_one():
    """On small clusters, search every rank order: place() fails only when none is valid."""
    rng = random.Random(7)
    cases = 0
    while cases < 40:
        topo = random_topology(rng, max_fabrics=3, max_nodes=3, gpu_choices=(1, 2))
        if topo.world_size > 6:
            continue
        cases += 1
        sizes = random_sizes(rng, topo.world_size)
        shape = tuple(sizes[d] for d in MESH_DIMS)
        exists = any(valid(topo, np.array(p).reshape(shape).tolist()) for p in itertools.permutations(range(topo.world_size)))
        try:
            place(topo, sizes)
            assert exists
        except UserError:
            assert not exists


def test_unaware_order_spans_fabrics_and_placement_does_not():
    topo = load_topology(ROOT / "configs/topology-ib-roce.toml")
    sizes = {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8}
    assert not valid(topo, contiguous_grid(sizes))
    grid = place(topo, sizes)
    assert valid(topo, grid)
    assert [topo.fabric_of(np.array(s).ravel()[0]) for s in grid] == ["ib", "roce"]


def test_size_mismatch_and_bad_ep_are_one_line_errors():
    topo = load_topology(ROOT / "configs/topology-ib-roce.toml")
    with pytest.raises(UserError, match=r"= 32 ranks but the topology has 64 GPUs"):
        place(topo, {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 8})
    with pytest.raises(UserError, match="ep=3 must divide"):
        place(topo, {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8}, ep=3)


# --- cost model: hand-computed cases -------------------------------------------------------

TINY = ModelSpec(n_layers=2, dim=64, n_heads=4, vocab_size=128, seq_len=16, global_batch=4, microbatches=2, ffn_hidden=128)


def test_model_counts_by_hand():
    # wq, wo: 64x64 each; wk, wv: 64x64 each (no GQA); w1, w2, w3: 64x128; two norms of 64.
    assert TINY.layer_params == 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64 == 41088
    assert TINY.layer_flops() == 2 * 40960 + 4 * 16 * 64 == 86016
    assert TINY.head_flops() == 2 * 128 * 64
    assert PRESETS["gpt-7.5b"].params == pytest.approx(7.5e9, rel=0.03)  # Megatron's table names it 7.5B


def test_simulator_two_stage_pipeline_by_hand():
    # 1 MFLOP/s GPUs, a link that moves one activation (32 tokens x 64 x 2 bytes = 4096 B) per second.
    link = Link("eth", gbps=4096 * 8 / 1e9, latency_us=0.0)
    stages = [Stage([0], ["a"], 1e-6, None, None, link), Stage([1], ["b"], 1e-6, None, None, None)]
    torch_1f1b = simulate(replace(TINY, schedule="1F1B"), stages, [1, 1], dp=1, tp=1)
    eager = simulate(TINY, stages, [1, 1], dp=1, tp=1)
    fwd0 = 32 * 86016 / 1e6  # 2.752512 s: one block on 32 tokens
    fwd1 = 32 * (86016 + 16384) / 1e6  # 3.2768 s: one block + the output head
    t0, t1, c = 3 * fwd0, 3 * fwd1, 1.0
    for est in (torch_1f1b, eager):
        assert est.stage_s == pytest.approx([t0, t1]) and est.send_s == pytest.approx([c, 0.0])
    # (m-1) x slowest cycle + one microbatch through every stage and link, both ways; torch's
    # 1F1B waits for the send every cycle, eager 1F1B (2 warm-up forwards of m = 2 on stage 0,
    # 1 on stage 1) only for the round trip over its two cycles: (t0 + t1 + 2c) / 2 = 10.04 s.
    assert torch_1f1b.pipeline_s == pytest.approx((2 - 1) * (t1 + c) + (t0 + t1) + 2 * c)
    assert torch_1f1b.iteration_s == pytest.approx(30.918336)
    assert eager.pipeline_s == pytest.approx((2 - 1) * (t0 + t1 + 2 * c) / 2 + (t0 + t1) + 2 * c)
    assert eager.iteration_s == pytest.approx(30.131904)


def test_simulator_data_parallel_tail_by_hand():
    # One stage, 2 data-parallel ranks: compute, then a ring all-reduce of the gradients.
    link = Link("ib", gbps=8e-9 * 1000, latency_us=1e6)  # 1000 B/s, 1 s per hop
    model = replace(TINY, microbatches=1)
    est = simulate(model, [Stage([0, 1], ["a"], 1e-6, None, link, None)], [2], dp=2, tp=1)
    tokens = 4 * 16 / 2
    compute = 3 * tokens * (2 * 86016 + 16384) / 1e6
    grad_bytes = (2 * 41088 + 2 * 128 * 64) * 2  # blocks + embedding + head, bf16
    allreduce = 2 * (1 / 2) * grad_bytes / 1000 + 2 * 1 * 1.0
    assert est.iteration_s == pytest.approx(compute + allreduce)


def test_uniform_stages_give_the_textbook_bubble():
    model = replace(TINY, n_layers=4, vocab_size=0, microbatches=6)
    stages = [Stage([s], ["a"], 1e-6, None, None, None) for s in range(4)]
    est = simulate(model, stages, [1, 1, 1, 1], dp=1, tp=1)
    assert est.iteration_s == pytest.approx((6 + 4 - 1) * est.stage_s[0])


def test_adaptive_partition_gives_slow_stages_fewer_layers_and_never_loses():
    model = replace(TINY, n_layers=12, vocab_size=0, microbatches=8)
    speeds = [1e-6, 1e-6, 0.5e-6]  # the last stage's GPUs are half as fast
    stages = [Stage([s], ["a"], speeds[s], None, None, None) for s in range(3)]
    layers = adaptive_layers(model, stages, dp=1, tp=1)
    assert layers == [5, 5, 2]  # proportional to speed 1 : 1 : 0.5
    assert sum(layers) == 12
    assert simulate(model, stages, layers, 1, 1).iteration_s < simulate(model, stages, even_layers(12, 3), 1, 1).iteration_s
    rng = random.Random(3)
    for _ in range(30):
        topo = random_topology(rng, gpu_choices=(8,))
        sizes = random_sizes(rng, topo.world_size)
        m = replace(PRESETS["gpt-1.3b"], global_batch=topo.world_size * 4, microbatches=4)
        if sizes["pp"] > 8:  # the exact search grows steeply past 8 stages (docs/placement.md)
            continue
        st = stages_of(topo, contiguous_grid(sizes))
        dp = sizes["dp_replicate"] * sizes["dp_shard"]
        ada = adaptive_layers(m, st, dp, sizes["tp"])
        assert sum(ada) == m.n_layers and min(ada) >= 1
        assert simulate(m, st, ada, dp, sizes["tp"]).iteration_s <= simulate(m, st, even_layers(m.n_layers, sizes["pp"]), dp, sizes["tp"]).iteration_s


def compositions(n: int, p: int):
    """Every split of n blocks onto p stages, each at least one."""
    for cuts in itertools.combinations(range(1, n), p - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


def test_adaptive_partition_is_the_exhaustive_optimum():
    # 300 random clusters (contiguous ranks: stages span fabrics and node speeds), up to 16
    # blocks on 2-4 stages, 1-16 microbatches: the branch and bound finds the best split of
    # all. In 2 of them a greedy of one-block moves (the planner's previous search) stops in
    # a local minimum (over 3000 such clusters: 33 times, up to 19% slower), when several
    # stages' gradient all-reduces dominate.
    rng = random.Random(2)
    cases = 0
    while cases < 300:
        topo = random_topology(rng, gpu_choices=(4, 8))
        sizes = random_sizes(rng, topo.world_size)
        if not 2 <= sizes["pp"] <= 4:
            continue
        cases += 1
        model = replace(PRESETS["gpt-3.6b"], n_layers=rng.randint(sizes["pp"], 16), global_batch=topo.world_size * 4,
                        microbatches=rng.choice([1, 4, 16]))
        st = stages_of(topo, contiguous_grid(sizes))
        dp, tp = sizes["dp_replicate"] * sizes["dp_shard"], sizes["tp"]
        best = min(simulate(model, st, split, dp, tp).iteration_s for split in compositions(model.n_layers, sizes["pp"]))
        layers = adaptive_layers(model, st, dp, tp)
        assert sum(layers) == model.n_layers and min(layers) >= 1
        assert simulate(model, st, layers, dp, tp).iteration_s == pytest.approx(best, rel=1e-9)


def test_make_plan_beats_unaware_on_mixed_cluster():
    topo = load_topology(ROOT / "configs/topology-ib-roce.toml")
    plan = make_plan(topo, PRESETS["gpt-7.5b"], {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8})
    p = plan.predicted
    assert p["homogeneous_s"] <= p["adaptive_s"] <= p["placed_s"] < p["unaware_s"]
    assert [s["fabrics"] for s in plan.stages] == [["ib"], ["roce"]]
    nets = {dim: {g["net"] for g in plan.nccl[dim]} for dim in MESH_DIMS}
    assert nets["pp"] == {"Socket"} and nets["dp_shard"] == {"IB"} and nets["tp"] == {None}
    assert plan.nccl_net(0) == {"pp": "Socket", "dp_replicate": None, "dp_shard": "IB", "tp": None}


def test_plan_puts_fast_cross_links_on_the_boundary_and_like_nodes_together():
    def ib(i, eth=25.0, tflops=150.0):
        return Node(f"ib-{i}", 8, "ib", "ib", 4, 200.0, eth, tflops)

    roce = [Node(f"roce-{i}", 8, "roce", "roce", 4, 100.0, 100.0, 150.0) for i in range(2)]
    # torch's 1F1B: the boundary's sends cost every cycle (eager 1F1B hides most of them).
    model = replace(PRESETS["gpt-7.5b"], microbatches=16, global_batch=128, schedule="1F1B")

    def numbered_order_s(topo, sizes):
        """The best fabric order with each fabric's nodes as numbered (the previous planner)."""
        dp, tp = sizes["dp_shard"], sizes["tp"]
        return min(simulate(model, st, adaptive_layers(model, st, dp, tp), dp, tp).iteration_s
                   for st in (stages_of(topo, place(topo, sizes, 1, order)) for order in (["ib", "roce"], ["roce", "ib"])))

    # ib-2 and ib-3 have 100 GbE, the other IB nodes 25 GbE. Numbered in the middle, they sit
    # at the boundary with RoCE in neither fabric order; the plan moves them there.
    topo = Topology([ib(0), ib(1), ib(2, eth=100.0), ib(3, eth=100.0), ib(4), ib(5)] + roce)
    sizes = {"pp": 4, "dp_replicate": 1, "dp_shard": 2, "tp": 8}
    plan = make_plan(topo, model, sizes)
    fabrics = [st["fabrics"] for st in plan.stages]
    boundary = next(s for s in range(3) if fabrics[s] != fabrics[s + 1])
    ib_side = boundary if fabrics[boundary] == ["ib"] else boundary + 1
    assert plan.stages[ib_side]["nodes"] == ["ib-2", "ib-3"]
    assert plan.predicted["adaptive_s"] < 0.95 * numbered_order_s(topo, sizes)  # 2.07 s vs 2.22 s
    for g in plan.groups("tp") + plan.groups("dp_shard"):  # still in rank order, inside a fabric
        assert g == sorted(g) and len({topo.fabric_of(r) for r in g}) == 1

    # Fast (300 TFLOP/s) and slow IB nodes alternate: as numbered, both IB stages run at the
    # slow speed; grouped, one stage is fast and takes twice the blocks.
    topo = Topology([ib(0, tflops=300.0), ib(1), ib(2, tflops=300.0), ib(3)] + roce)
    sizes = {"pp": 3, "dp_replicate": 1, "dp_shard": 2, "tp": 8}
    plan = make_plan(topo, model, sizes)
    fast = next(st for st in plan.stages if st["nodes"] == ["ib-0", "ib-2"])
    assert fast["layers"] == max(plan.layers_per_stage) >= 2 * min(plan.layers_per_stage)
    assert plan.predicted["adaptive_s"] < 0.85 * numbered_order_s(topo, sizes)  # 2.22 s vs 2.75 s


def test_nccl_network_of_every_group():
    """What the plan tells NCCL per group (net_name of ncclConfig_t via nccl_backend_override;
    that call needs a CUDA build of torch and is not run here)."""
    topo = load_topology(ROOT / "configs/topology-ib-eth.toml")  # ib-0, eth-0, ib-1, ... 8 GPUs each
    assert group_net(topo, [0, 1]) is None  # one node: NVLink, NCCL's own choice
    assert group_net(topo, [0, 16]) == "IB"  # ib-0 and ib-1: one InfiniBand fabric
    assert group_net(topo, [8, 24]) == "Socket"  # eth-0 and eth-1: an Ethernet-only fabric
    assert group_net(topo, [0, 8]) == "Socket"  # ib-0 and eth-0: across fabrics
    roce = load_topology(ROOT / "configs/topology-ib-roce.toml")
    assert group_net(roce, [8, 24]) == "IB"  # RoCE runs on NCCL's IB verbs transport too
    plan = make_plan(topo, PRESETS["gpt-7.5b"], {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8})
    ib_stage = next(s for s, st in enumerate(plan.stages) if st["fabrics"] == ["ib"])
    for rank in range(topo.world_size):
        on_ib = topo.fabric_of(rank) == "ib"
        assert plan.nccl_net(rank) == {"pp": "Socket", "dp_replicate": None, "dp_shard": "IB" if on_ib else "Socket", "tp": None}
        assert (rank in plan.stages[ib_stage]["ranks"]) == on_ib
    # Every group of the plan file carries its network, in the order of its ranks.
    for dim in MESH_DIMS:
        assert [g["ranks"] for g in plan.nccl[dim]] == plan.groups(dim)
        assert all(g["net"] == group_net(topo, g["ranks"]) for g in plan.nccl[dim])


# --- topology files and detection ----------------------------------------------------------

def test_topology_file_order_and_links():
    topo = load_topology(ROOT / "configs/topology-three-fabrics.toml")
    assert topo.world_size == 64 and list(topo.fabrics()) == ["ib-a", "roce", "ib-b"]
    assert topo.nodes[1].name == "roce-0" and topo.ranks_of_node(1) == list(range(8, 16))
    assert topo.group_link(range(8)).kind == "nvlink"
    assert topo.group_link([0, 24]) == Link("ib", 4 * 200 / 8, 5.0)  # ib-a-0, ib-a-1: 4 HDR NICs for 8 GPUs
    assert topo.group_link([0, 16]) == Link("eth", 25 / 8, 40.0)  # ib-a to ib-b: no RDMA path
    assert topo.with_bandwidth({"eth": 100}).group_link([0, 16]).gbps == 100 / 8


@pytest.mark.parametrize("text, needle", [
    ("[[fabric]]\nname='a'\nkind='opa'\nnodes=1\n", "kind 'opa' is unknown"),
    ("[[fabric]]\nname='a'\nkind='ib'\n", "needs name, kind, nodes"),
    ("[cluster]\norder=['x']\n[[fabric]]\nname='a'\nkind='ib'\nnodes=['y']\n", "order must list every node"),
    ("[bandwidth]\nib=-1\n[[fabric]]\nname='a'\nkind='ib'\nnodes=1\n", "values positive"),
    ("[[fabric]]\nname='a'\nkind='ib'\nnodes=['n']\n[[fabric]]\nname='b'\nkind='ib'\nnodes=['n']\n", "appears twice"),
    ("[[fabric]]\nname='a'\nkind='ib'\nnodes=1\ngpus_per_node=0\n", "gpus must be positive"),
    ("[cluster\n", "not valid TOML"),
])
def test_bad_topology_files_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "topo.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        load_topology(path)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not found"):
        load_topology(tmp_path / "missing.toml")


def write_sysfs(root: Path):
    """A /sys tree of a node with two active HDR InfiniBand ports, one down port, a 25 GbE
    NIC, an IPoIB interface and loopback."""
    for dev, state in (("mlx5_0", "4: ACTIVE"), ("mlx5_1", "4: ACTIVE"), ("mlx5_2", "1: DOWN")):
        port = root / "class/infiniband" / dev / "ports/1"
        (port / "gids").mkdir(parents=True)
        (port / "state").write_text(state + "\n")
        (port / "link_layer").write_text("InfiniBand\n")
        (port / "rate").write_text("200 Gb/sec (4X HDR)\n")
        (port / "gids/0").write_text("fe80:0000:0000:0000:0c42:a103:00b0:1234\n")
    for name, typ, speed, physical in (("eth0", "1", "25000", True), ("ib0", "32", "200000", True), ("lo", "772", "", False)):
        d = root / "class/net" / name
        d.mkdir(parents=True)
        (d / "type").write_text(typ + "\n")
        (d / "operstate").write_text("up\n")
        (d / "speed").write_text(speed + "\n")
        if physical:
            (d / "device").mkdir()


def test_detect_reads_nics_from_sysfs(tmp_path, monkeypatch):
    monkeypatch.delenv("KINTSUGI_FABRIC", raising=False)
    write_sysfs(tmp_path)
    node = detect_local_node("n0", sysfs=tmp_path, gpus=8)
    assert (node.kind, node.nics, node.gbps, node.eth_gbps, node.fabric) == ("ib", 2, 200.0, 25.0, "ib")
    (tmp_path / "class/infiniband/mlx5_0/ports/1/link_layer").write_text("Ethernet\n")
    (tmp_path / "class/infiniband/mlx5_1/ports/1/link_layer").write_text("Ethernet\n")
    monkeypatch.setenv("KINTSUGI_FABRIC", "roce-east")
    node = detect_local_node("n0", sysfs=tmp_path, gpus=8)
    assert (node.kind, node.nics, node.fabric) == ("roce", 2, "roce-east")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert detect_local_node("n1", sysfs=bare, gpus=1).kind == "eth"


def test_detect_reads_the_fabric_from_an_interface_alias_and_the_pinned_interface(tmp_path, monkeypatch):
    # An Ethernet-only node whose job traffic goes over a virtual interface (a bridge port,
    # a veth: no `device` link) that the admin named with its fabric.
    monkeypatch.delenv("KINTSUGI_FABRIC", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    d = tmp_path / "class/net/veth0"
    d.mkdir(parents=True)
    for name, text in (("type", "1"), ("operstate", "up"), ("speed", "10000"), ("ifalias", "rack 7 fabric=east")):
        (d / name).write_text(text + "\n")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    node = detect_local_node("n0", sysfs=tmp_path, gpus=1)
    assert (node.kind, node.fabric, node.gbps) == ("eth", "east", 25.0)  # not a NIC: its speed says nothing
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "veth0")
    assert detect_local_node("n0", sysfs=tmp_path, gpus=1).gbps == 10.0  # the job's own path counts
    monkeypatch.setenv("KINTSUGI_FABRIC", "west")
    assert detect_local_node("n0", sysfs=tmp_path, gpus=1).fabric == "west"


def test_round_robin_pairs_every_node_once_per_round():
    for n in range(2, 10):
        rounds = _round_robin(n)
        pairs = [p for r in rounds for p in r]
        assert sorted(pairs) == [(i, j) for i in range(n) for j in range(i + 1, n)]
        assert all(len({x for p in r for x in p}) == 2 * len(r) for r in rounds)  # a node talks to one peer at a time
        assert len(rounds) == n - 1 + n % 2


def test_measured_links_replace_the_nominal_tcp_speeds():
    # Two Ethernet nodes and two RoCE nodes; measured MB/s between them.
    nodes = [Node("e0", 1, "east", "eth", 1, 25.0, 25.0), Node("e1", 1, "east", "eth", 1, 25.0, 25.0),
             Node("r0", 1, "west", "roce", 2, 100.0, 25.0), Node("r1", 1, "west", "roce", 2, 100.0, 25.0)]
    mb = [[0, 120, 24, 25], [120, 0, 26, 24], [24, 26, 0, 500], [25, 24, 500, 0]]
    rtt = [[0, 2e-4, 4e-4, 4e-4], [2e-4, 0, 4e-4, 4e-4], [4e-4, 4e-4, 0, 2e-4], [4e-4, 4e-4, 2e-4, 0]]
    topo = with_probe(Topology(nodes), LinkProbe(mb, rtt))
    e0, _, r0, _ = topo.nodes
    assert (e0.nics, e0.gbps, e0.eth_gbps) == (1, 120 * 8 / 1000, 24 * 8 / 1000)
    assert (r0.nics, r0.gbps, r0.eth_gbps) == (2, 100.0, 24 * 8 / 1000)  # RDMA inside a fabric: not what TCP sees
    assert topo.latency_us["eth"] == pytest.approx(400 / 2)
    assert topo.group_link([0, 1]) == Link("eth", 0.96, topo.latency_us["eth"])
    assert topo.group_link([0, 2]).gbps == pytest.approx(0.192)  # the slower link between the fabrics


def test_a_slow_link_between_two_ethernet_fabrics_limits_groups_across():
    east = [Node(f"e{i}", 1, "east", "eth", 1, 10.0, 1.0) for i in range(2)]
    west = [Node(f"w{i}", 1, "west", "eth", 1, 10.0, 1.0) for i in range(2)]
    topo = Topology(east + west)
    assert topo.group_link([0, 1]).gbps == 10.0 and topo.group_link([0, 2]).gbps == 1.0


# --- plan files and the CLI ----------------------------------------------------------------

def test_plan_round_trip_and_bad_plan_files(tmp_path):
    topo = load_topology(ROOT / "configs/topology-cpu4.toml")
    plan = make_plan(topo, replace(TINY, n_layers=4), {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 1})
    plan.save(tmp_path / "plan.json")
    back = load_plan(tmp_path / "plan.json")
    assert (back.rank_grid, back.layers_per_stage, back.sizes) == (plan.rank_grid, plan.layers_per_stage, plan.sizes)
    assert back.rank_grid == [[[[0], [2]]], [[[1], [3]]]]
    assert back.groups("pp") == [[0, 1], [2, 3]] and back.groups("dp_shard") == [[0, 2], [1, 3]]
    back.check(4, 4)
    with pytest.raises(UserError, match="is for 4 ranks but the job has 8"):
        back.check(8, 4)
    data = json.loads((tmp_path / "plan.json").read_text())
    for name, text in [("missing.json", None), ("garbage.json", "{not json"), ("other.json", '{"a": 1}'),
                       ("dup.json", json.dumps({**data, "rank_grid": [[[[0], [0]]], [[[1], [3]]]]})),
                       ("layers.json", json.dumps({**data, "layers_per_stage": [4]})),
                       ("nogrid.json", json.dumps({k: v for k, v in data.items() if k != "rank_grid"}))]:
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UserError) as e:
            load_plan(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_plan_cli_writes_plan_and_prints_comparison(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = plan_main(["--topology", str(ROOT / "configs/topology-ib-roce.toml"), "--model", "gpt-7.5b",
                    "--tp", "8", "--pp", "2", "--dp", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "topology-unaware" in text and "all nodes on one RDMA fabric" in text
    assert re.search(r"0\s+ib\s+\d+\s+ib-0,ib-1,ib-2,ib-3\s+0-7,16-23,32-39,48-55", text)
    plan = load_plan(out)
    assert isinstance(plan, Plan) and plan.predicted["adaptive_s"] < plan.predicted["unaware_s"]
    # The trainer's job config works as --model too.
    rc = plan_main(["--topology", str(ROOT / "configs/topology-cpu4.toml"), "--model", str(ROOT / "configs/tiny.toml"),
                    "--pp", "2", "--dp", "2", "--microbatches", "2", "--out", str(out)])
    assert rc == 0 and sum(load_plan(out).layers_per_stage) == 4


def test_plan_cli_user_errors_exit_2(tmp_path, capsys):
    for argv, needle in [
        (["--topology", str(tmp_path / "none.toml"), "--model", "gpt-7.5b"], "not found"),
        (["--topology", str(ROOT / "configs/topology-ib-roce.toml"), "--model", "gpt-9t"], "unknown model preset"),
        (["--topology", str(ROOT / "configs/topology-ib-roce.toml"), "--model", "gpt-7.5b", "--tp", "8", "--pp", "1",
          "--dp", "8", "--dp-replicate", "1"], "no placement keeps DP/EP groups inside one fabric"),
        (["--topology", str(ROOT / "configs/topology-ib-roce.toml"), "--model", "gpt-7.5b", "--bandwidth", "ib=fast"], "KIND=GBPS"),
    ]:
        with pytest.raises(SystemExit) as e:
            plan_main(argv + ["--out", str(tmp_path / "p.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1
    for argv, needle in [
        (["--model", "gpt-7.5b"], "give --topology FILE or --detect"),
        (["--detect", "--topology", str(ROOT / "configs/topology-ib-roce.toml"), "--model", "gpt-7.5b"], "one of them"),
        (["--detect", "--model", "gpt-7.5b"], "--detect needs --nnodes N and --rdzv-endpoint"),
    ]:
        with pytest.raises(SystemExit) as e:
            plan_main(argv + ["--out", str(tmp_path / "p.json")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and needle in err and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def _profile_worker(rank: int, world: int, tmp: str):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from comms import dist_utils
    from conftest import JOB
    from trainer.config import load_config
    from trainer.parallel_dims import ParallelDims
    from trainer.placement import profile_speed, profiled_blocks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    # Rank 0 profiles a job whose replicas are FSDP2 modules (pp 2 x 2 replicas: HSDP), rank 1
    # the same job with the overlapped optimizer's plain replicas; as in detection, only the
    # profiling ranks make the one-rank group (the other does not wait for it).
    overrides = ["--parallel.pp=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--optim.grad_clip=0"]
    if rank == 1:
        overrides.append("--parallel.overlap_optimizer=true")
    cfg = load_config(str(JOB), overrides)
    dims = ParallelDims.resolve(cfg, 4)
    blocks, fsdp = profiled_blocks(cfg, "cpu", dims)
    assert fsdp == (rank == 0)
    assert all(isinstance(p, DTensor) == (rank == 0) for p in blocks.parameters())
    tflops, adam_gps = profile_speed(cfg, "cpu", dims)
    assert tflops > 0 and adam_gps > 0
    dist.barrier()
    dist_utils.exit_process()


def test_speeds_are_profiled_on_blocks_wrapped_as_the_job_runs_them(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_profile_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
