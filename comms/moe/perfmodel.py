"""Online profiling and the makespan model that picks the chunk count d and the gradient
partition of a co-scheduled MoE layer (FSMoE, sections 3 and 5).

Every cost is linear: ``alpha + beta * n`` (n = bytes for communication, flops for expert
compute). The profiler measures them on the job's real groups at start and on request; the
model replays the exact order in which ``pipeline.run`` issues work (main thread computes,
FIFO lanes communicate) and returns the makespan, so the chosen d is the one the real
schedule would run fastest, not a closed formula's guess.

Gradient partition: during the MoE backward, the link carrying the all-to-all is idle while
experts compute. The model measures those idle intervals and sizes gradient all-reduce
partitions to fit them (``bytes = (gap - alpha) / beta``); what does not fit is reduced
after the backward and counts as exposed time. A partition in a gap slows the compute beside
it by the share of its time that does not overlap (``reduce_overlap``), as an exchange does.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from comms import dist_utils


@dataclass
class Cost:
    alpha: float  # seconds per operation
    beta: float  # seconds per byte (communication) or per flop (compute)

    def __call__(self, n: float) -> float:
        return self.alpha + self.beta * n

    @classmethod
    def fit(cls, n1: float, t1: float, n2: float, t2: float) -> "Cost":
        """Two-point fit; never negative (noise on a shared machine can invert small timings)."""
        beta = max((t2 - t1) / (n2 - n1), 0.0)
        return cls(max(t1 - beta * n1, 0.0), beta)


@dataclass
class Profile:
    """Measured (or assumed, for a cluster that is not here) costs of one job's groups."""

    a2a: Cost  # the whole EP exchange, n = bytes this rank sends
    allreduce: Cost  # gradient reduction, n = bytes
    allgather: Cost  # n = bytes this rank contributes
    expert: Cost  # expert forward, n = flops
    a2a_intra: Cost | None = None  # hierarchical phases (replace `a2a` when set)
    a2a_inter: Cost | None = None
    # Share of communication time that really runs alongside expert compute. 1 = separate
    # engines (GPU copy engines / NICs); near 0 when gloo's copies and the matmuls fight
    # for the same CPU cores: then a compute stretches by (1 - overlap) x the comm it meets.
    overlap: float = 1.0
    reduce_overlap: float = 1.0  # the same for a gradient all-reduce run beside expert compute
    source: str = "measured"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        costs = {k: Cost(**v) if isinstance(v, dict) else v for k, v in d.items()}
        return cls(**costs)


@dataclass
class LayerShape:
    """What one rank's MoE layer moves and computes per step."""

    n_experts: int
    slots: int  # rows per expert this rank sends (the layer packs kept tokens; at most sequences x capacity)
    dim: int
    hidden: int
    ep: int
    elt_bytes: int = 4
    grad_bytes: int = 0  # data-parallel gradient bytes ready when this layer's backward runs

    @property
    def a2a_bytes(self) -> int:
        return self.n_experts * self.slots * self.dim * self.elt_bytes

    @property
    def expert_flops(self) -> int:
        # SwiGLU: three (dim x hidden) matmuls per slot; each rank runs E/ep experts over
        # ep x slots tokens, i.e. E x slots token-expert rows.
        return 6 * self.n_experts * self.slots * self.dim * self.hidden


@dataclass
class Schedule:
    d: int
    gap_bytes: list = field(default_factory=list)  # gradient partition per backward gap
    predicted_fwd_s: float = 0.0
    predicted_bwd_s: float = 0.0  # includes the exposed part of the gradient reduction

    @property
    def predicted_s(self) -> float:
        return self.predicted_fwd_s + self.predicted_bwd_s


def _pipeline(d: int, comm_phases: list[float], compute: float, overlap: float = 1.0):
    """Replay the issue order of pipeline.run: D0, D1, wait D0, E0, C0, D2, wait D1, E1, C1, ...

    ``comm_phases`` are the per-chunk durations of an exchange's phases, each phase on its
    own FIFO lane (one phase: flat all-to-all; two: intra-node then inter-node lanes).
    Returns (makespan, busy intervals of the last lane, compute intervals).
    """
    free = [0.0] * len(comm_phases)
    busy_all, busy_last = [], []

    def exchange(ready: float) -> float:
        t = ready
        for i, dur in enumerate(comm_phases):
            start = max(free[i], t)
            free[i] = t = start + dur
            busy_all.append((start, t))
            if i == len(comm_phases) - 1:
                busy_last.append((start, t))
        return t

    now, computes = 0.0, []
    arrived = [exchange(0.0)]
    done = []
    for i in range(d):
        if i + 1 < d:
            arrived.append(exchange(now))
        start = max(now, arrived[i])
        # Communication in flight during this compute slows it by the part that does not
        # overlap; the stretched window meets more of it, so iterate to the fixed point.
        end = start + compute
        for _ in range(32):
            met = sum(max(0.0, min(b, end) - max(a, start)) for a, b in busy_all)
            stretched = start + compute + (1.0 - overlap) * met
            if stretched - end < 1e-12:
                break
            end = stretched
        now = end
        computes.append((start, now))
        done.append(exchange(now))
    return max(now, done[-1]), busy_last, computes


def _idle_within(busy: list, window: tuple) -> float:
    """Total time inside ``window`` that no busy interval covers."""
    lo, hi = window
    covered = 0.0
    for a, b in busy:
        covered += max(0.0, min(b, hi) - max(a, lo))
    return max(0.0, (hi - lo) - covered)


def simulate(shape: LayerShape, prof: Profile, d: int, partition: bool = True) -> Schedule:
    """Predicted forward and backward time of the layer with d chunks."""
    def phases(nbytes):
        if prof.a2a_intra is not None and prof.a2a_inter is not None:
            return [prof.a2a_intra(nbytes), prof.a2a_inter(nbytes)]
        return [prof.a2a(nbytes)]

    per_chunk = shape.a2a_bytes / d
    fwd, _, _ = _pipeline(d, phases(per_chunk), prof.expert(shape.expert_flops / d), prof.overlap)
    # Backward: the same exchanges in reverse, twice the expert flops (input and weight grads).
    bwd, busy, computes = _pipeline(d, phases(per_chunk), prof.expert(2 * shape.expert_flops / d), prof.overlap)
    left, gaps = float(shape.grad_bytes), []
    for window in computes:
        idle = _idle_within(busy, window)
        fit = max(0.0, (idle - prof.allreduce.alpha) / prof.allreduce.beta) if partition and prof.allreduce.beta > 0 else 0.0
        take = min(left, math.floor(fit))
        gaps.append(int(take))
        left -= take
    exposed = prof.allreduce(left) if left > 0 else 0.0
    # A partition reduced in a gap runs beside that chunk's compute: it slows the compute by
    # the part that does not overlap, as an exchange does.
    stretch = (1.0 - prof.reduce_overlap) * sum(prof.allreduce(g) for g in gaps if g)
    return Schedule(d=d, gap_bytes=gaps, predicted_fwd_s=fwd, predicted_bwd_s=bwd + stretch + exposed)


def sequential(shape: LayerShape, prof: Profile) -> Schedule:
    """The baseline every other system runs: one chunk, gradients reduced after the backward."""
    return simulate(shape, prof, 1, partition=False)


MIN_GAIN = 0.05  # more chunks only for a predicted gain above profiling noise (~5% here)


def choose(shape: LayerShape, prof: Profile, max_chunks: int = 16, partition: bool = True,
           min_gain: float = MIN_GAIN) -> Schedule:
    """The fastest schedule among d = 1, 2, 4, ... (d <= slots); more chunks must beat the
    best so far by ``min_gain``. ``partition=False``: chunking alone, gradients reduced
    after the backward."""
    best = None
    d = 1
    while d <= min(max_chunks, shape.slots):
        s = simulate(shape, prof, d, partition)
        if best is None or s.predicted_s < best.predicted_s * (1 - min_gain):
            best = s
        d *= 2
    return best


# ---- measuring on the real groups -------------------------------------------------------

REPS = 5  # median of 5 per measured point: other jobs' bursts on a shared host hit single samples


def _timed(fn, reps: int) -> float:
    fn()  # warm-up: first calls pay for connection set-up and allocation
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _agreed(t: float, group=None) -> float:
    """The slowest rank's time: every rank must pick the same d, or the exchanges mismatch."""
    return dist_utils.all_reduce_max(t, group)


def _comm_cost(make_op, sizes, group) -> Cost:
    (n1, t1), (n2, t2) = [(n, _agreed(_timed(make_op(n), REPS), group)) for n in sizes]
    return Cost.fit(n1, t1, n2, t2)


def measure(groups, dim: int, hidden: int, local_experts: int, dtype=torch.float32,
            sizes=(1 << 14, 1 << 20)) -> Profile:
    """Measure alpha/beta of all-to-all, all-reduce and all-gather on the real groups and the
    expert compute rate; collective over the whole job (every rank gets the same numbers)."""
    # Measured through a lane, as the pipeline runs it, so alpha includes the thread hand-off.
    from comms.lanes import Lane
    from comms.moe.a2a import _a2a, all_to_all  # keeps perfmodel importable offline

    elt = torch.tensor([], dtype=dtype).element_size()
    world_group = groups.dp if groups is not None else None
    lane = Lane("profile")

    def a2a_op(ep, fn):
        return lambda n: (lambda x=torch.ones(ep, max(1, n // elt // ep), dtype=dtype): lane.submit(fn, x).result())

    def exchange_of(nbytes):  # a lane op that does not wait on itself
        x = torch.ones(groups.ep, max(1, nbytes // elt // groups.ep), dtype=dtype)
        return lambda: all_to_all(x, groups)

    a2a, intra, inter = Cost(0.0, 0.0), None, None
    if groups is not None and groups.ep > 1:
        a2a = _comm_cost(a2a_op(groups.ep, lambda x: all_to_all(x, groups)), sizes, world_group)
        if groups.hierarchical:
            nodes = groups.ep // groups.ranks_per_node
            intra = _comm_cost(a2a_op(groups.ranks_per_node, lambda x: _a2a(x, groups.intra)), sizes, world_group)
            inter = _comm_cost(a2a_op(nodes, lambda x: _a2a(x, groups.inter)), sizes, world_group)
    allreduce = allgather = Cost(0.0, 0.0)
    if groups is not None and dist_utils.world_size() > 1:
        def reduce_op(n):
            x = torch.ones(max(1, n // elt), dtype=dtype)
            return lambda: lane.submit(dist.all_reduce, x, dist.ReduceOp.SUM, groups.dp).result()

        def gather_op(n):
            x = torch.ones(max(1, n // elt), dtype=dtype)
            out = [torch.empty_like(x) for _ in range(dist.get_world_size(groups.dp))]
            return lambda: lane.submit(dist.all_gather, out, x, groups.dp).result()

        allreduce = _comm_cost(reduce_op, sizes, world_group)
        allgather = _comm_cost(gather_op, sizes, world_group)

    w1 = torch.randn(local_experts, hidden, dim, dtype=dtype)
    w2 = torch.randn(local_experts, dim, hidden, dtype=dtype)

    def expert_op(rows):
        x = torch.randn(local_experts, rows, dim, dtype=dtype)
        return lambda: torch.bmm(torch.nn.functional.silu(torch.bmm(x, w1.mT)) * torch.bmm(x, w1.mT), w2.mT)

    r1, r2 = 8, 256
    flops = lambda rows: 6 * local_experts * rows * dim * hidden
    t_compute = _agreed(_timed(expert_op(r2), REPS), world_group)
    expert = Cost.fit(flops(r1), _agreed(_timed(expert_op(r1), REPS), world_group), flops(r2), t_compute)
    overlap = reduce_overlap = 1.0
    if groups is not None and groups.ep > 1:
        def as_long_as_compute(cost: Cost) -> int:  # bytes
            return int(min(max((t_compute - cost.alpha) / cost.beta, sizes[0]), 16 * sizes[1])) if cost.beta > 0 else sizes[1]

        # An exchange about as long as the compute, run alongside it: how much is hidden?
        overlap = _hidden_share(lane, exchange_of(as_long_as_compute(a2a)), expert_op(r2), world_group)
        # And a gradient all-reduce, as a partition in a backward gap runs.
        grad = torch.ones(max(1, as_long_as_compute(allreduce) // elt), dtype=dtype)
        reduce_overlap = _hidden_share(lane, lambda: dist.all_reduce(grad, group=groups.dp), expert_op(r2), world_group)
    lane.close()
    return Profile(a2a=a2a, allreduce=allreduce, allgather=allgather, expert=expert, a2a_intra=intra, a2a_inter=inter,
                   overlap=overlap, reduce_overlap=reduce_overlap)


def _hidden_share(lane, comm, compute, group, rounds: int = 9) -> float:
    """Share (0..1) of the shorter of ``comm`` (run on ``lane``) and ``compute`` that is
    hidden when both run together; collective over ``group``.

    Paired rounds: the three runs of a round happen back to back, all ranks starting
    together, so a load burst hits a round's runs alike; the median over rounds of each
    round's hidden share, the least any rank saw. (Minimums taken separately undercount
    overlap: "both" needs both parts lucky at once.)"""
    def both():
        pending = lane.submit(comm)
        compute()
        pending.result()

    shares = []
    for _ in range(rounds):
        took = {}
        for key, fn in (("comm", lambda: lane.submit(comm).result()), ("compute", compute), ("both", both)):
            dist.barrier(group=group)
            t0 = time.perf_counter()
            fn()
            took[key] = time.perf_counter() - t0
        hidden = took["compute"] + took["comm"] - took["both"]
        shares.append(hidden / min(took["compute"], took["comm"]))
    return min(1.0, max(0.0, -_agreed(-statistics.median(shares), group)))


def gpu_cluster_profile(gpus_per_node: int = 8, nodes: int = 4) -> Profile:
    """Assumed costs of a GPU cluster (for the modelled part of the benchmark, not measured):
    NVLink-class intra-node all-to-all ~150 GB/s per GPU, 200 Gb/s (25 GB/s) inter-node per
    GPU, ~150 TFLOP/s sustained bf16 matmul, launch/latency alphas of 10-30 us."""
    nvlink, ib = 150e9, 25e9
    ranks = gpus_per_node * nodes
    # Intra phase: (L-1)/L of the bytes leave the GPU over NVLink; inter phase: (N-1)/N over IB.
    intra = Cost(10e-6, (gpus_per_node - 1) / gpus_per_node / nvlink)
    inter = Cost(25e-6, (nodes - 1) / nodes / ib)
    # Ring all-reduce across nodes: 2 (n-1)/n of the bytes over the slowest link.
    allreduce = Cost(30e-6, 2 * (ranks - 1) / ranks / ib)
    allgather = Cost(25e-6, (ranks - 1) / ranks / ib)
    flat = Cost(5e-6 * ranks, inter.beta + intra.beta)
    # NCCL kernels take some SMs from the experts' matmuls: assume 90% of comm is hidden.
    return Profile(a2a=flat, allreduce=allreduce, allgather=allgather, expert=Cost(20e-6, 1 / 150e12),
                   a2a_intra=intra, a2a_inter=inter, overlap=0.9, reduce_overlap=0.9,
                   source=f"assumed {nodes}x{gpus_per_node} GPU cluster")
