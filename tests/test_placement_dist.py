"""Placement with real processes: topology gathered through a real TCPStore, and 4 gloo
ranks whose device mesh, built from a plan file, has exactly the plan's groups."""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from comms import dist_utils
from comms.costmodel import ModelSpec
from comms.mesh import MESH_DIMS
from comms.placement import load_plan, make_plan, stage_to_group_rank
from comms.topology import Node, gather_topology, load_topology

ROOT = Path(__file__).resolve().parent.parent


def _node(i: int) -> Node:
    return Node(f"host-{i}", gpus=8, fabric="ib" if i < 2 else "roce", kind="ib" if i < 2 else "roce",
                nics=4, gbps=200.0 - 100 * (i >= 2), eth_gbps=25.0)


def _gather_worker(node_rank: int, port: int, nnodes: int, out_dir: str):
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    time.sleep(0.3 * (nnodes - node_rank))  # publish in reverse order: get() must wait for later nodes
    topo = gather_topology(store, node_rank, nnodes, _node(node_rank))
    Path(out_dir, f"{node_rank}.json").write_text(json.dumps([asdict(n) for n in topo.nodes]))


def test_gather_topology_through_tcpstore(tmp_path):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    nnodes = 3
    # spawn, not fork: forking the multi-threaded pytest process (this store's server thread,
    # other tests' threads) once left a child stuck on a lock copied held (CI: node 2 never
    # published); a fresh interpreter costs a few seconds of torch import.
    mp.start_processes(_gather_worker, args=(server.port, nnodes, str(tmp_path)), nprocs=nnodes, start_method="spawn")
    expected = [asdict(_node(i)) for i in range(nnodes)]
    for i in range(nnodes):
        assert json.loads((tmp_path / f"{i}.json").read_text()) == expected
    # A reader that publishes nothing (a node's other local ranks) sees the same cluster.
    assert [n.name for n in gather_topology(server, 0, nnodes, None).nodes] == ["host-0", "host-1", "host-2"]


def _mesh_worker(rank: int, plan_path: str, out_dir: str):
    import torch

    from comms.mesh import build_mesh

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=4)
    plan = load_plan(plan_path)
    mesh = build_mesh("cpu", plan.sizes, plan.rank_grid)
    seen = {}
    for i, dim in enumerate(MESH_DIMS):
        group = mesh.get_group(dim)
        # Traffic really flows inside that group: the sum of its members' ranks.
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=group)
        seen[dim] = {"ranks": dist.get_process_group_ranks(group), "sum": t.item(),
                     "local_rank": mesh.get_local_rank(dim), "coord": mesh.get_coordinate()[i]}
    # The slow fabric first: stage 0 on ranks 1 and 3. A send addressed by stage index
    # through stage_to_group_rank reaches the next stage.
    mesh = build_mesh("cpu", plan.sizes, [[[[1], [3]]], [[[0], [2]]]])
    pp_group, stage = mesh.get_group("pp"), mesh.get_coordinate()[0]
    to_group = stage_to_group_rank(mesh)
    t = torch.tensor([float(rank)])
    if stage == 0:
        dist.send(t, dist.get_global_rank(pp_group, to_group[1]), group=pp_group)
    else:
        dist.recv(t, dist.get_global_rank(pp_group, to_group[0]), group=pp_group)
    seen["reversed"] = {"stage": stage, "to_group": to_group, "received": t.item(), "local_rank": mesh.get_local_rank("pp")}
    Path(out_dir, f"{rank}.json").write_text(json.dumps(seen))
    dist_utils.exit_process()  # leave without tearing gloo down (see dist_utils)


def test_four_gloo_ranks_build_the_planned_groups(tmp_path):
    topo = load_topology(ROOT / "configs/topology-cpu4.toml")
    model = ModelSpec(n_layers=4, dim=128, n_heads=4, vocab_size=256, seq_len=128, global_batch=8, microbatches=2, bytes_per_value=4)
    plan = make_plan(topo, model, {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 1})
    plan.save(tmp_path / "plan.json")
    # Two fabrics interleaved in node order: each stage takes one fabric, not ranks 0-1 / 2-3;
    # the slower fabric (b) gets fewer blocks and goes first (its all-reduce then overlaps
    # the fast stage's longer backward: 3.306 ms vs 3.327 ms predicted the other way round),
    # so stage 0 is on the higher global ranks of each pipeline group.
    assert plan.rank_grid == [[[[1], [3]]], [[[0], [2]]]] and plan.layers_per_stage == [1, 3]
    mp.start_processes(_mesh_worker, args=(str(tmp_path / "plan.json"), str(tmp_path)), nprocs=4, start_method="spawn")
    for rank in range(4):
        seen = json.loads((tmp_path / f"{rank}.json").read_text())
        for dim in MESH_DIMS:
            group = next(g for g in plan.groups(dim) if rank in g)  # in mesh (stage) order
            # Process groups list members by global rank, and so does get_local_rank.
            assert seen[dim]["ranks"] == sorted(group), (rank, dim)
            assert seen[dim]["sum"] == sum(group)
            assert seen[dim]["coord"] == group.index(rank) and seen[dim]["local_rank"] == sorted(group).index(rank)
        # Every data-parallel group stays in one fabric; the pipeline group crosses.
        assert len({topo.fabric_of(r) for r in seen["dp_shard"]["ranks"]}) == 1
        assert len({topo.fabric_of(r) for r in seen["pp"]["ranks"]}) == 2
        rev = seen["reversed"]
        assert rev["stage"] == (0 if rank in (1, 3) else 1)
        assert rev["to_group"] == {"0": 1, "1": 0}  # stage 0 is group rank 1
        assert rev["local_rank"] == 1 - rev["stage"]  # get_local_rank is the group rank, not the stage
        if rev["stage"] == 1:
            assert rev["received"] == rank + 1  # from the stage-0 rank of its pipeline


def _probe_worker(rank: int, out_dir: str):
    from comms.topology import probe_links

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/probe", rank=rank, world_size=3)
    probe = probe_links([0, 1, 2], mbytes=1.0)
    Path(out_dir, f"probe{rank}.json").write_text(json.dumps(asdict(probe)))
    dist_utils.exit_process()  # leave without tearing gloo down (see dist_utils)


def test_probe_links_measures_every_pair_and_every_rank_gets_it(tmp_path):
    # Three gloo ranks on loopback (the testbed test shapes real links): every pair measured
    # once, in both halves of the matrix, and every rank holds the same result.
    mp.start_processes(_probe_worker, args=(str(tmp_path),), nprocs=3, start_method="spawn")
    got = [json.loads((tmp_path / f"probe{r}.json").read_text()) for r in range(3)]
    assert got[0] == got[1] == got[2]
    mb, rtt = got[0]["mb_s"], got[0]["rtt_s"]
    for i in range(3):
        assert mb[i][i] == 0 and rtt[i][i] == 0
        for j in range(3):
            if i != j:
                assert mb[i][j] == mb[j][i] > 0 and rtt[i][j] == rtt[j][i] > 0
