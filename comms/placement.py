"""Rank placement by fabric and a self-adapting pipeline partition (Holmes).

Placement. A pipeline stage holds dp x tp ranks: its DP groups (and EP groups, which are
subsets of DP) stay inside one fabric exactly when the whole stage does, given that every
TP group stays inside a node. So ranks are ordered fabric by fabric, node by node, and cut
into the mesh (pp, dp_replicate, dp_shard, tp) with tp innermost: TP groups are GPUs of
one node, a stage is a run of whole TP groups inside one fabric, and only the pipeline's
point-to-point sends cross between fabrics (#fabrics - 1 boundaries, the fewest possible).
That exists iff every node's GPU count is a multiple of tp and every fabric's GPU count a
multiple of dp x tp; otherwise ``place`` says which node or fabric breaks it. ``make_plan``
chooses, with the cost model, the fabric order along the pipeline and which nodes of a
fabric form which stage (``node_orders``: like nodes together, fast Ethernet at boundaries).

Partition. Stages on a slower fabric spend longer in their gradient all-reduce, the last
stage also runs the output head, and stages next to a fabric boundary wait on slow sends;
``adaptive_layers`` searches for the split with the least predicted iteration time
(exact branch and bound), so that stages finish together (uneven splits).

The plan file (JSON, written by ``kintsugi plan``) carries the rank grid the trainer passes
to ``comms.mesh.build_mesh``, the layers per stage (``parallel.pp_layers``) and the NCCL
network module each group should use (``nccl_backend_override``).
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from comms.costmodel import ModelSpec, Stage, one_f_one_b, own_cycle, send_times, simulate, stage_cost, stages_of
from comms.errors import UserError
from comms.mesh import MESH_DIMS
from comms.topology import Topology

PLAN_VERSION = 1
# Fabric orders tried for the pipeline (all permutations up to this many fabrics: 4! = 24).
MAX_PERMUTED_FABRICS = 4


def _shape(sizes: dict) -> tuple[int, ...]:
    return tuple(int(sizes[d]) for d in MESH_DIMS)


def contiguous_grid(sizes: dict) -> list:
    """The topology-unaware order: ranks fill the mesh in order (torch's default)."""
    return np.arange(int(np.prod(_shape(sizes)))).reshape(_shape(sizes)).tolist()


def place(topology: Topology, sizes: dict, ep: int = 1, fabric_order: list[str] | None = None,
          node_order: dict[str, list[int]] | None = None) -> list:
    """A rank grid (pp, dp_replicate, dp_shard, tp) with TP inside nodes and DP/EP inside fabrics.

    Stages fill the fabrics in ``fabric_order`` (default: order of first appearance), each
    fabric's nodes in ``node_order[fabric]`` (node indices; default: as numbered). Every stage
    lists its ranks in increasing order. Raises UserError with a one-line reason when no such
    placement exists.
    """
    pp, dpr, dps, tp = _shape(sizes)
    dp, world = dpr * dps, pp * dpr * dps * tp
    if world != topology.world_size:
        raise UserError(f"pp x dp_replicate x dp_shard x tp = {pp}x{dpr}x{dps}x{tp} = {world} ranks but the topology has "
                        f"{topology.world_size} GPUs; change the parallel sizes or the topology")
    if ep < 1 or dp % ep:
        raise UserError(f"ep={ep} must divide the data-parallel size {dp}")
    for node in topology.nodes:
        if node.gpus % tp:
            raise UserError(f"no placement keeps TP groups inside a node: node {node.name!r} has {node.gpus} GPUs, "
                            f"not a multiple of tp={tp}; use a tp that divides every node's GPU count")
    fabrics = topology.fabrics()
    gpus = {f: sum(topology.nodes[i].gpus for i in idx) for f, idx in fabrics.items()}
    for f, n in gpus.items():
        if n % (dp * tp):
            counts = ", ".join(f"{k}={v}" for k, v in gpus.items())
            raise UserError(f"no placement keeps DP/EP groups inside one fabric: a pipeline stage needs dp x tp = {dp * tp} "
                            f"GPUs but fabric {f!r} has {n} (fabrics: {counts}); choose dp x tp dividing every fabric's GPU count")
    order = list(fabric_order) if fabric_order is not None else list(fabrics)
    if sorted(order) != sorted(fabrics):
        raise UserError(f"fabric order {order} must name each fabric {sorted(fabrics)} once")
    nodes = {**fabrics, **(node_order or {})}
    for f in order:
        if sorted(nodes[f]) != fabrics[f]:
            raise UserError(f"node order {nodes[f]} of fabric {f!r} must list its nodes {fabrics[f]} once")
    ranks = [r for f in order for i in nodes[f] for r in topology.ranks_of_node(i)]
    # Sorting a stage keeps its TP groups whole: each is an aligned run of tp ranks of one node.
    stages = np.sort(np.array(ranks).reshape(pp, dp * tp), axis=1)
    return stages.reshape(pp, dpr, dps, tp).tolist()


def node_orders(topology: Topology, nodes: list[int]) -> list[list[int]]:
    """Orders of one fabric's nodes worth trying (distinct ones): as numbered, then sorted by
    GPU speed, by RDMA bandwidth per GPU and by Ethernet per GPU, each way round.

    A stage runs at its slowest GPU and its DP group at its slowest node's link, so a sort
    puts like nodes into one stage; and a fabric's first and last stages carry the pipeline's
    cross-fabric sends, so the Ethernet sorts put the fastest cross links on the boundary at
    either end. Uniform fabrics give only the numbered order.
    """
    keys = (lambda n: n.tflops, lambda n: n.nics * n.gbps / n.gpus, lambda n: topology.cross_gbps(n) / n.gpus)
    out = [list(nodes)]
    for key in keys:
        for reverse in (False, True):
            cand = sorted(nodes, key=lambda i: key(topology.nodes[i]), reverse=reverse)
            if cand not in out:
                out.append(cand)
    return out


def pp_in_rank_order(grid) -> bool:
    """Whether every pipeline group lists its ranks in increasing global rank.

    Process groups number members by global rank, and ``DeviceMesh.get_local_rank`` returns
    that group rank, not the mesh coordinate. ``place`` keeps the tp and dp dims in rank
    order always (a stage is an ascending run of ranks), so DTensor shards line up; the pp
    dim may not be when a slow fabric's higher ranks go first. Then the trainer must take
    the stage from ``mesh.get_coordinate()`` and use ``stage_to_group_rank``.
    """
    a = np.array(grid)
    return bool((np.diff(a, axis=0) > 0).all())


def even_layers(n_layers: int, pp: int) -> list[int]:
    """As even as possible, the extra blocks on the first stages."""
    return [n_layers // pp + (s < n_layers % pp) for s in range(pp)]


def adaptive_layers(model: ModelSpec, stages: list[Stage], dp: int, tp: int) -> list[int]:
    """Blocks per stage that minimize the predicted iteration time, exactly.

    Branch and bound over the stages in order. A stage's costs depend only on its own block
    count, so they are tabulated once. A partial split is dropped when a lower bound on its
    iteration time already reaches the best full split. T_iter >= T_pipe - drain_j +
    allreduce_j for every stage j, which gives two bounds: (m - 1) x max cycle + sum t +
    2 sum c + the largest all-reduce tail of the stages placed so far; and, for the stages
    still open, (m - 1) x max cycle + sum c + the forwards before j + t of j and after +
    allreduce_j. Open stages count with the least value any split of the remaining blocks
    can give each term (small dynamic programs over stages x blocks). A greedy of one-block
    moves stops in local minima when gradient all-reduces dominate (1% of random clusters,
    up to 19% slower).
    """
    p, n, m = len(stages), model.n_layers, model.microbatches
    c = send_times(model, stages, dp, tp)
    most = n - p + 1  # the most blocks one stage can hold
    cost = [[None] + [stage_cost(model, stages, s, k, dp, tp) for k in range(1, most + 1)] for s in range(p)]
    t = [[0.0] + [k.fwd + k.bwd for k in row[1:]] for row in cost]
    eager = model.schedule == "eager-1F1B"
    # Each stage's own cycle: exact under torch's 1F1B; under eager 1F1B a lower bound (the
    # round-trip term spans the next stage; time_of has it).
    cycle = [[0.0] + [own_cycle(t[s][k], c[s - 1] if s else 0.0, c[s], eager) for k in range(1, most + 1)]
             for s in range(p)]
    # Over every split of b blocks onto stages s.. (inf: b blocks cannot fill them): the
    # least sum of t, the least max cycle, and the least max_{j>=s} (forwards of s..j-1 +
    # t of j.. + allreduce_j).
    inf = float("inf")
    least_t = [[inf] * (n + 1) for _ in range(p + 1)]
    least_cycle = [[inf] * (n + 1) for _ in range(p + 1)]
    least_tail = [[inf] * (n + 1) for _ in range(p + 1)]
    least_t[p][0], least_cycle[p][0], least_tail[p][0] = 0.0, 0.0, -inf
    for s in range(p - 1, -1, -1):
        for b in range(p - s, n - s + 1):
            ks = range(1, min(most, b - (p - s - 1)) + 1)
            least_t[s][b] = min(t[s][k] + least_t[s + 1][b - k] for k in ks)
            least_cycle[s][b] = min(max(cycle[s][k], least_cycle[s + 1][b - k]) for k in ks)
            least_tail[s][b] = min(max(t[s][k] + least_t[s + 1][b - k] + cost[s][k].grads,
                                       cost[s][k].fwd + least_tail[s + 1][b - k]) for k in ks)

    def time_of(layers):
        return one_f_one_b(m, [cost[s][k] for s, k in enumerate(layers)], c, eager).iteration_s

    # Start from the even split and try each stage's counts nearest to it first: good splits
    # found early prune most of the tree (half the time on random clusters).
    even, sum_c = even_layers(n, p), sum(c)
    best_layers, best = even, time_of(even)

    def search(s: int, left: int, layers: list[int], max_cycle: float, sum_t: float, sum_fwd: float,
               drain: float, tail: float):
        nonlocal best, best_layers
        if s == p:
            est = time_of(layers)
            if est < best * (1 - 1e-12):
                best, best_layers = est, list(layers)
            return
        ks = sorted(range(1, left - (p - s - 1) + 1), key=lambda k: abs(k - even[s])) if s < p - 1 else [left]
        for k in ks:
            rest = left - k
            bottleneck = (m - 1) * max(max_cycle, cycle[s][k], least_cycle[s + 1][rest])
            tl = max(tail, cost[s][k].grads - drain)
            placed = bottleneck + sum_t + t[s][k] + least_t[s + 1][rest] + 2 * sum_c + tl
            still_open = bottleneck + sum_c + sum_fwd + cost[s][k].fwd + least_tail[s + 1][rest]
            if max(placed, still_open) < best * (1 - 1e-12):
                search(s + 1, rest, layers + [k], max(max_cycle, cycle[s][k]), sum_t + t[s][k], sum_fwd + cost[s][k].fwd,
                       drain + cost[s][k].bwd + (c[s - 1] if s else 0.0), tl)

    search(0, n, [], 0.0, 0.0, 0.0, 0.0, 0.0)
    return best_layers


@dataclass
class Plan:
    """What ``kintsugi plan`` decides and the trainer uses."""

    sizes: dict  # pp, dp_replicate, dp_shard, tp
    rank_grid: list  # nested, shape (pp, dp_replicate, dp_shard, tp): global ranks
    layers_per_stage: list[int]  # parallel.pp_layers
    ep: int = 1
    stages: list[dict] = field(default_factory=list)  # per stage: fabrics, nodes, ranks
    nccl: dict = field(default_factory=dict)  # dim -> [{"ranks": [...], "net": "IB" | "Socket" | None}]
    predicted: dict = field(default_factory=dict)  # seconds per step: unaware_s, placed_s, adaptive_s, ... (make_plan)
    topology: dict = field(default_factory=dict)  # the cluster it was made for, when detected (for the record)

    @property
    def world_size(self) -> int:
        return int(np.prod(_shape(self.sizes)))

    def groups(self, dim: str) -> list[list[int]]:
        """All groups along one mesh dim, as lists of global ranks."""
        k = MESH_DIMS.index(dim)
        grid = np.moveaxis(np.array(self.rank_grid), k, -1)
        return grid.reshape(-1, grid.shape[-1]).tolist()

    def nccl_net(self, rank: int) -> dict[str, str | None]:
        """Per mesh dim, the NCCL network module of this rank's group (None: inside a node)."""
        return {dim: next(g["net"] for g in self.nccl[dim] if rank in g["ranks"]) for dim in MESH_DIMS}

    def check(self, world_size: int, n_layers: int, path: str = "plan"):
        """Raise UserError when this plan does not fit the job about to run."""
        if world_size != self.world_size:
            raise UserError(f"{path} is for {self.world_size} ranks but the job has {world_size}; re-run `kintsugi plan` for this cluster")
        if sum(self.layers_per_stage) != n_layers:
            raise UserError(f"{path} splits {sum(self.layers_per_stage)} blocks but model.n_layers={n_layers}; re-run `kintsugi plan` with this model")

    def save(self, path: str | os.PathLike):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"kintsugi_plan": PLAN_VERSION, **asdict(self)}, indent=1))
        os.replace(tmp, path)


def group_net(topology: Topology, ranks: list[int]) -> str | None:
    """NCCL's network module for a group: none inside a node, IB verbs (InfiniBand and RoCE)
    inside an RDMA fabric, TCP sockets across fabrics or on Ethernet."""
    link = topology.group_link(ranks)
    if link is None or link.kind == "nvlink":
        return None
    return "Socket" if link.kind == "eth" else "IB"


def describe(topology: Topology, plan: Plan) -> None:
    """Fill the plan's per-stage and per-group descriptions from the topology."""
    plan.stages = []
    for s, block in enumerate(plan.rank_grid):
        ranks = np.array(block).ravel().tolist()
        nodes = sorted({topology.node_of(r) for r in ranks})
        plan.stages.append({"stage": s, "ranks": ranks, "layers": plan.layers_per_stage[s],
                            "fabrics": sorted({topology.nodes[i].fabric for i in nodes}),
                            "nodes": [topology.nodes[i].name for i in nodes]})
    plan.nccl = {dim: [{"ranks": g, "net": group_net(topology, g),
                        "fabrics": sorted({topology.fabric_of(r) for r in g})} for g in plan.groups(dim)]
                 for dim in MESH_DIMS}


def make_plan(topology: Topology, model: ModelSpec, sizes: dict, ep: int = 1) -> Plan:
    """Place, partition and predict; ``plan.predicted`` compares with the alternatives.

    unaware_s: the job without Kintsugi: contiguous ranks, even split, torch's Schedule1F1B.
    unaware_same_schedule_s: contiguous ranks, even split, this plan's schedule (the share of
    placement and partition alone). placed_s: fabric placement, even split.
    adaptive_s: fabric placement, adaptive split (the plan). homogeneous_s: the same nodes
    all on the best fabric's RDMA, adaptive split.
    """
    sizes = {d: int(sizes[d]) for d in MESH_DIMS}
    pp, dp, tp = sizes["pp"], sizes["dp_replicate"] * sizes["dp_shard"], sizes["tp"]
    if model.n_layers < pp:
        raise UserError(f"{pp} pipeline stages need at least {pp} blocks, the model has {model.n_layers}")
    even = even_layers(model.n_layers, pp)

    def timed(topo, grid, layers, spec=model):
        return simulate(spec, stages_of(topo, grid), layers, dp, tp).iteration_s

    def candidate(order, nodes):
        grid = place(topology, sizes, ep, list(order), nodes)
        stages = stages_of(topology, grid)
        layers = adaptive_layers(model, stages, dp, tp)
        # Fastest first (to the ns); among equals, prefer pipeline groups in global-rank order
        # (the trainer routes others through stage_to_group_rank), then the better even split.
        t = simulate(model, stages, layers, dp, tp).iteration_s
        return (round(t, 9), not pp_in_rank_order(grid), timed(topology, grid, even), grid, layers, t)

    # Every fabric order (up to MAX_PERMUTED_FABRICS fabrics); for each, one pass over the
    # fabrics trying their node orders while the others stay fixed.
    fabrics = topology.fabrics()
    orders = itertools.permutations(fabrics) if len(fabrics) <= MAX_PERMUTED_FABRICS else [list(fabrics)]
    best = None
    for order in orders:
        nodes = dict(fabrics)
        here = candidate(order, nodes)
        for f in order:
            for cand in node_orders(topology, fabrics[f])[1:]:
                trial = candidate(order, {**nodes, f: cand})
                if trial[:3] < here[:3]:
                    here, nodes = trial, {**nodes, f: cand}
        if best is None or here[:3] < best[:3]:
            best = here
    _, _, placed_s, grid, layers, adaptive_s = best
    # The baseline keeps the better of both orders: GPUs of one former fabric may differ in speed.
    homo = topology.homogeneous()
    homogeneous_s = min(simulate(model, st, adaptive_layers(model, st, dp, tp), dp, tp).iteration_s
                        for st in (stages_of(homo, g) for g in (grid, contiguous_grid(sizes))))
    plan = Plan(sizes=sizes, rank_grid=grid, layers_per_stage=layers, ep=ep, predicted={
        "unaware_s": timed(topology, contiguous_grid(sizes), even, replace(model, schedule="1F1B")),
        "unaware_same_schedule_s": timed(topology, contiguous_grid(sizes), even),
        "placed_s": placed_s,
        "adaptive_s": adaptive_s,
        "homogeneous_s": homogeneous_s,
    })
    describe(topology, plan)
    return plan


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan file written by ``kintsugi plan``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan file {str(path)!r} not found; write one with `kintsugi plan --topology FILE ... --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"plan file {str(path)!r} is not valid JSON ({e}); write it again with `kintsugi plan`") from None
    if not isinstance(data, dict) or data.get("kintsugi_plan") != PLAN_VERSION:
        raise UserError(f"plan file {str(path)!r} is not a version-{PLAN_VERSION} Kintsugi plan; write it again with `kintsugi plan`")
    try:
        sizes = {d: int(data["sizes"][d]) for d in MESH_DIMS}
        grid = np.array(data["rank_grid"], dtype=np.int64)
        layers = [int(n) for n in data["layers_per_stage"]]
        plan = Plan(sizes=sizes, rank_grid=grid.tolist(), layers_per_stage=layers, ep=int(data.get("ep", 1)),
                    stages=data.get("stages", []), nccl=data.get("nccl", {}), predicted=data.get("predicted", {}),
                    topology=data.get("topology", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"plan file {str(path)!r} lacks or garbles {e}; write it again with `kintsugi plan`") from None
    world = plan.world_size
    if grid.shape != _shape(sizes) or sorted(grid.ravel().tolist()) != list(range(world)):
        raise UserError(f"plan file {str(path)!r}: rank_grid must hold each of the {world} ranks once in shape {_shape(sizes)}; write it again with `kintsugi plan`")
    if len(layers) != sizes["pp"] or min(layers) < 1:
        raise UserError(f"plan file {str(path)!r}: layers_per_stage must list {sizes['pp']} positive counts; write it again with `kintsugi plan`")
    return plan


def stage_to_group_rank(mesh) -> dict[int, int]:
    """Pipeline stage index -> rank inside this rank's ``pp`` process group.

    Process groups number their members in global-rank order, but a plan may put stage 0 on
    a higher global rank than stage 1 (the slow fabric's nodes first). torch.distributed.
    pipelining assumes stage i sits at group rank i; set the result as the
    ``PipelineStage.stage_index_to_group_rank`` so that sends reach the right stage.
    """
    import torch.distributed as dist

    stage_ranks = mesh["pp"].mesh.tolist()  # global ranks of this rank's pipeline, in stage order
    group_ranks = dist.get_process_group_ranks(mesh.get_group("pp"))
    return {s: group_ranks.index(r) for s, r in enumerate(stage_ranks)}


def nccl_backend_override(plan: Plan, rank: int) -> tuple:
    """DeviceMesh ``backend_override`` (one (backend, options) per dim) that pins each NCCL
    communicator of this rank to its group's network: ``Socket`` for groups that span
    fabrics, ``IB`` inside an RDMA fabric, NCCL's own choice inside a node.

    Uses ``ncclConfig_t.netName`` (ProcessGroupNCCL.Options().config.net_name), so DP groups
    keep RDMA while the pipeline's cross-fabric groups use TCP, which one process-wide
    NCCL_NET / NCCL_IB_DISABLE cannot express. Needs a CUDA build of torch.
    """
    from torch.distributed import ProcessGroupNCCL

    out = []
    for dim, net in plan.nccl_net(rank).items():
        if net is None:
            out.append((None, None))
            continue
        opts = ProcessGroupNCCL.Options()
        opts.config.net_name = net
        out.append(("nccl", opts))
    return tuple(out)
