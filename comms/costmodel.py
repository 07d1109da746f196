"""Predicted iteration time of a dense transformer on a placement (the Holmes cost model).

Per pipeline stage s with L_s blocks, for one microbatch of ``tokens`` tokens:

- compute: forward 2 x params x tokens flops (+ attention scores 4 x seq x dim per token
  and block, no causal discount), backward twice that, split over ``tp`` GPUs, at the
  slowest GPU's achieved TFLOP/s; the last stage also runs the output head (2 x vocab x dim
  per token, about one block of a 7B model);
- tensor parallel: 2 all-reduces of the activations (tokens x dim values) per block
  forward and 2 backward, on the TP group's link;
- pipeline send: one activation to the next stage forward and one gradient back, on the
  slowest pair's link; each TP rank sends 1/tp of it and the next stage all-gathers over
  its TP link (Megatron's scatter-gather);
- data parallel: one all-reduce of the stage's gradients (params / tp values) after its
  last backward, on the DP group's slowest link.

The trainer's default schedule is eager 1F1B (trainer/schedule.py): sends fired after the
compute and waited at the end of the step, receives posted a microbatch ahead, and stage s
warming up with w_s = min(m, 2 (p - s) - 1) forwards. A microbatch's round trip from stage
s to s + 1 and back then spans w_s - w_{s+1} + 1 = 3 of its cycles, so with m microbatches
(t = fwd + bwd, c = send):

    cycle = max_s max(t_s, c_s, (t_s + t_{s+1} + 2 c_s) / (w_s - w_{s+1} + 1))
    T_pipe = (m - 1) x cycle + sum_s t_s + 2 x sum_s c_s

(uniform stages without sends: (m + p - 1) x t, the textbook bubble). torch's Schedule1F1B
(``parallel.pp_schedule = "1F1B"``, ``eager=False``) waits for every send with the next
receive: its stage cycle is t_s + c_{s-1} + c_s, in the same T_pipe. Either way stage s is
done with the pipeline when its last gradient has reached stage s - 1 (the schedule waits
for its sends), the time ``drain_s = sum_{j<s} bwd_j + sum_{j<s-1} c_j`` before stage 0 is;
its gradient all-reduce (FSDP2's, after the schedule: perform_reduce_grad) overlaps that
drain, and the trainer's global grad-norm all-reduce waits for all:

    T_iter = max_s (T_pipe - drain_s + allreduce_s)

tests/test_costmodel.py replays both schedules action by action (a link carries one transfer
at a time each way): on the benchmark's plans the formula is within 0.3% of torch's 1F1B and
within 1.1% of eager 1F1B (above it: the formula charges the whole fill and drain); on
random clusters it never promises less than the replay as long as sends stay below compute.

A ring all-reduce of N bytes over k ranks takes 2 (k-1)/k x N / bw + 2 (k-1) x latency,
an all-gather half of that.
The optimizer step and MoE all-to-all are not modelled (EP groups are placed like DP).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from comms.errors import UserError
from comms.topology import DEFAULT_ADAM_GPS, Link, Topology


@dataclass(frozen=True)
class ModelSpec:
    """The transformer and batch the cost model times (same fields as trainer's ModelConfig)."""

    n_layers: int
    dim: int
    n_heads: int
    vocab_size: int
    seq_len: int
    global_batch: int  # samples per optimizer step
    microbatches: int = 8
    n_kv_heads: int = 0
    ffn_hidden: int = 0  # 0 = 8/3 x dim rounded up to 32 (SwiGLU with GPT's 8 dim^2 MLP params)
    bytes_per_value: int = 2  # bf16 activations and gradients
    schedule: str = "eager-1F1B"  # the trainer's parallel.pp_schedule: "eager-1F1B" or torch's "1F1B"
    dp_shard: int = 0  # data-parallel ranks that shard the optimizer state (FSDP2's dp_shard); 0 = all of dp
    bucket_mb: float = 0.0  # > 0: the overlapped optimizer (each bucket stepped once reduced); 0: step after all

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 32 * -(-8 * self.dim // 3 // 32)

    @property
    def layer_params(self) -> int:
        head_dim = self.dim // self.n_heads
        kv = (self.n_kv_heads or self.n_heads) * head_dim
        return 2 * self.dim * self.dim + 2 * self.dim * kv + 3 * self.dim * self.ffn + 2 * self.dim

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + 2 * self.vocab_size * self.dim + self.dim

    def layer_flops(self) -> float:
        """Forward flops of one block per token."""
        return 2 * (self.layer_params - 2 * self.dim) + 4 * self.seq_len * self.dim

    def head_flops(self) -> float:
        return 2 * self.vocab_size * self.dim


# GPT shapes of the Megatron-LM scaling table (Narayanan et al. 2021) that Holmes trains;
# vocab 51200, sequence 2048. Batch sizes keep ~1M tokens per step.
PRESETS = {
    "gpt-1.3b": ModelSpec(n_layers=24, dim=2048, n_heads=16, vocab_size=51200, seq_len=2048, global_batch=512, microbatches=16),
    "gpt-3.6b": ModelSpec(n_layers=30, dim=3072, n_heads=32, vocab_size=51200, seq_len=2048, global_batch=512, microbatches=16),
    "gpt-7.5b": ModelSpec(n_layers=36, dim=4096, n_heads=32, vocab_size=51200, seq_len=2048, global_batch=512, microbatches=16),
    "gpt-18b": ModelSpec(n_layers=40, dim=6144, n_heads=48, vocab_size=51200, seq_len=2048, global_batch=512, microbatches=16),
    "gpt-39b": ModelSpec(n_layers=48, dim=8192, n_heads=64, vocab_size=51200, seq_len=2048, global_batch=512, microbatches=32),
}


def preset(name: str) -> ModelSpec:
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; use a job config TOML or one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class Stage:
    """What a placement gives one pipeline stage: its ranks, its speed and its links."""

    ranks: list[int]
    fabrics: list[str]
    tflops: float
    tp: Link | None
    dp: Link | None
    send: Link | None  # to the next stage; None for the last
    adam_gps: float = DEFAULT_ADAM_GPS  # optimizer updates per second (billions of parameters) of its slowest GPU


def stages_of(topology: Topology, rank_grid) -> list[Stage]:
    """Stages of a rank grid of shape (pp, dp_replicate, dp_shard, tp)."""
    out = []
    pp = len(rank_grid)
    for s in range(pp):
        block = [[r for shard in rep for r in shard] for rep in rank_grid[s]]  # (dp_replicate, dp_shard*tp)
        tp_groups = [shard for rep in rank_grid[s] for shard in rep]
        dp_groups = [[shard[t] for rep in rank_grid[s] for shard in rep] for t in range(len(tp_groups[0]))]
        ranks = [r for row in block for r in row]
        send = None
        if s + 1 < pp:
            nxt = [r for rep in rank_grid[s + 1] for shard in rep for r in shard]
            send = _slowest(topology.group_link([a, b]) for a, b in zip(ranks, nxt))
        out.append(Stage(
            ranks=ranks,
            fabrics=sorted({topology.fabric_of(r) for r in ranks}),
            tflops=min(topology.nodes[topology.node_of(r)].tflops for r in ranks),
            tp=_slowest(topology.group_link(g) for g in tp_groups),
            dp=_slowest(topology.group_link(g) for g in dp_groups),
            send=send,
            adam_gps=min(topology.nodes[topology.node_of(r)].adam_gps for r in ranks),
        ))
    return out


def _slowest(links) -> Link | None:
    links = [link for link in links if link is not None]
    return min(links, key=lambda link: (link.gbps, -link.latency_us)) if links else None


def allreduce_s(nbytes: float, k: int, link: Link | None) -> float:
    if k < 2 or link is None:
        return 0.0
    return 2 * (k - 1) / k * nbytes / link.bytes_per_s + 2 * (k - 1) * link.latency_us * 1e-6


def allgather_s(nbytes: float, k: int, link: Link | None) -> float:
    """Ring all-gather of ``nbytes`` in total (each rank contributes 1/k)."""
    return allreduce_s(nbytes, k, link) / 2


def send_s(nbytes: float, link: Link | None) -> float:
    return 0.0 if link is None else nbytes / link.bytes_per_s + link.latency_us * 1e-6


@dataclass
class Estimate:
    """Predicted seconds of one optimizer step, and where they go."""

    iteration_s: float
    pipeline_s: float  # forward/backward of all microbatches incl. sends and bubble
    stage_s: list[float] = field(default_factory=list)  # fwd+bwd of one microbatch per stage
    send_s: list[float] = field(default_factory=list)  # one activation to the next stage
    allreduce_s: list[float] = field(default_factory=list)  # each stage's gradient all-reduce
    optim_s: list[float] = field(default_factory=list)  # each stage's optimizer step


@dataclass(frozen=True)
class StageCost:
    """What one stage holding some number of blocks costs: one microbatch's forward and
    backward (compute + TP all-reduces), its gradient all-reduce after the last backward,
    and its optimizer step (``buckets`` > 0: stepped bucket by bucket as each is reduced)."""

    fwd: float
    bwd: float
    grads: float
    optim: float = 0.0
    buckets: int = 0

    @property
    def tail(self) -> float:
        """Reduction and, when overlapped, the optimizer: bucket i is stepped while bucket
        i + 1 is reduced, so the link and the optimizer take turns on equal buckets."""
        if not self.buckets:
            return self.grads
        b, r, o = self.buckets, self.grads / self.buckets, self.optim / self.buckets
        return r + (b - 1) * max(r, o) + o


def microbatch_tokens(model: ModelSpec, dp: int) -> float:
    return model.global_batch * model.seq_len / (dp * model.microbatches)


def stage_cost(model: ModelSpec, stages: list[Stage], s: int, n: int, dp: int, tp: int) -> StageCost:
    """Stage s of ``stages`` holding ``n`` blocks (the last stage also runs the output head,
    the first and last hold the embedding's and the head's gradients)."""
    p, stage = len(stages), stages[s]
    tokens = microbatch_tokens(model, dp)
    act = tokens * model.dim * model.bytes_per_value
    flops = tokens * (n * model.layer_flops() + (model.head_flops() if s == p - 1 else 0)) / tp
    compute = flops / (stage.tflops * 1e12)
    tp_comm = 2 * n * allreduce_s(act, tp, stage.tp)
    params = n * model.layer_params + model.vocab_size * model.dim * ((s == 0) + (s == p - 1))
    grad_bytes = params / tp * model.bytes_per_value
    optim = params / tp / (model.dp_shard or dp) / (stage.adam_gps * 1e9)
    buckets = max(1, round(grad_bytes / (model.bucket_mb * 1e6))) if model.bucket_mb > 0 else 0
    return StageCost(compute + tp_comm, 2 * compute + tp_comm, allreduce_s(grad_bytes, dp, stage.dp), optim, buckets)


def send_times(model: ModelSpec, stages: list[Stage], dp: int, tp: int) -> list[float]:
    """c_s: one activation from stage s to s + 1 (scatter over TP ranks, all-gather after); 0 for the last."""
    act = microbatch_tokens(model, dp) * model.dim * model.bytes_per_value
    return [send_s(act / tp, stages[s].send) + allgather_s(act, tp, stages[s + 1].tp) if s + 1 < len(stages) else 0.0
            for s in range(len(stages))]


def eager_warmup(p: int, m: int) -> list[int]:
    """Forwards before the first backward per stage under eager 1F1B: 2 (p - s) - 1, two
    more than the next stage, so a microbatch's round trip to the next stage and back (its
    compute and both sends) spans three cycles of the stage, not two as in 1F1B."""
    return [min(m, 2 * (p - s) - 1) for s in range(p)]


def own_cycle(t: float, c_in: float, c_out: float, eager: bool) -> float:
    """A stage's cycle from its own compute and links alone: the whole cycle under torch's
    1F1B (it waits for its sends), a lower bound under eager 1F1B (the round trip through
    the next stage adds to it: ``cycles``)."""
    return max(t, c_in, c_out) if eager else t + c_in + c_out


def cycles(t: list[float], c: list[float], m: int, eager: bool) -> list[float]:
    """Per stage, the least steady-state time between its microbatches (module doc)."""
    p, w = len(t), eager_warmup(len(t), m) + [0]
    return [max(own_cycle(t[s], c[s - 1] if s else 0.0, c[s], eager),
                (t[s] + t[s + 1] + 2 * c[s]) / (w[s] - w[s + 1] + 1) if eager and s + 1 < p else 0.0)
            for s in range(p)]


def one_f_one_b(microbatches: int, costs: list[StageCost], c: list[float], eager: bool = True) -> Estimate:
    """The step time of stages with these costs and sends under eager 1F1B (or torch's
    1F1B: ``eager=False``); formulas in the module doc."""
    p, m = len(costs), microbatches
    t = [k.fwd + k.bwd for k in costs]
    pipeline = (m - 1) * max(cycles(t, c, m, eager)) + sum(t) + 2 * sum(c)
    drain = [sum(costs[j].bwd for j in range(s)) + sum(c[j] for j in range(s - 1)) for s in range(p)]
    iteration = max(pipeline - drain[s] + costs[s].tail for s in range(p))
    # Stepped after every reduction: the grad-norm all-reduce over the pipeline comes first.
    iteration += max(0.0 if k.buckets else k.optim for k in costs)
    return Estimate(iteration, pipeline, t, c, [k.grads for k in costs], [k.optim for k in costs])


def simulate(model: ModelSpec, stages: list[Stage], layers: list[int], dp: int, tp: int) -> Estimate:
    """Iteration time for ``layers[s]`` blocks on stage s (formulas in the module doc)."""
    p = len(stages)
    if len(layers) != p or sum(layers) != model.n_layers or min(layers) < 1:
        raise UserError(f"layers per stage {layers} must be {p} positive counts summing to {model.n_layers}")
    costs = [stage_cost(model, stages, s, n, dp, tp) for s, n in enumerate(layers)]
    return one_f_one_b(model.microbatches, costs, send_times(model, stages, dp, tp), model.schedule == "eager-1F1B")
