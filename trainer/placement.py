"""Placement at start: the plan file of `kintsugi plan`, or one made now from the cluster the
job detects (``parallel.placement = "auto"``, `kintsugi launch --placement auto`).

Detecting is collective and takes a few seconds:

1. each node's first rank reads its NICs and fabric (comms.topology.detect_local_node) and
   times this job's own blocks: one microbatch forward + backward through two of them, and
   their optimizer step, which give the node's achieved TFLOP/s and optimizer rate for the
   cost model; every node publishes its description through the rendezvous store
   (gather_topology);
2. the first ranks measure every pair of nodes with gloo transfers (probe_links): the real
   TCP paths between fabrics and on Ethernet fabrics, which no NIC's nominal speed tells;
3. rank 0 plans (comms.placement.make_plan) and hands the plan to every rank, and writes it
   (with the detected cluster) to RUN_DIR/plan.json.

Nodes are numbered as torchrun numbers them (node rank = global rank // ranks per node), so
the plan's rank grid is this job's.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from comms import UserError, dist_utils
from comms.costmodel import ModelSpec
from comms.placement import Plan, load_plan, make_plan
from comms.topology import LinkProbe, Topology, detect_local_node, gather_topology, interfaces, probe_links, with_probe
from trainer.config import JobConfig
from trainer.parallel_dims import ParallelDims

log = logging.getLogger(__name__)

PROFILE_BLOCKS = 2  # blocks timed per node: enough to average out one block's fixed costs
PROFILE_S = 1.0  # seconds each speed is timed over: ten periods of a CFS CPU quota (100 ms)


def model_spec(cfg: JobConfig, dims: ParallelDims | None = None) -> ModelSpec:
    """What the cost model needs to know of this job: its model, batch, schedule and how its
    data parallelism steps the optimizer (``dims``: the resolved degrees; without, the
    optimizer counts as sharded over all data-parallel ranks)."""
    if cfg.parallel.pp_schedule == "GPipe":
        raise UserError("the cost model times 1F1B schedules; set parallel.pp_schedule to eager-1F1B or 1F1B")
    m, p = cfg.model, cfg.parallel
    return ModelSpec(n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_hidden=m.ffn_hidden,
                     vocab_size=m.vocab_size, seq_len=cfg.data.seq_len, global_batch=cfg.data.batch_size,
                     microbatches=p.pp_microbatches, bytes_per_value=2 if cfg.train.dtype == "bf16" else 4,
                     schedule=p.pp_schedule, dp_shard=dims.dp_shard if dims else 0,
                     bucket_mb=p.bucket_mb if p.overlap_optimizer else 0.0)


def _rate_s(fn, sync, min_s: float = PROFILE_S, min_reps: int = 5) -> float:
    """Seconds per call of ``fn`` sustained over at least ``min_s``: a CPU quota (a cgroup's
    cpu.max) lets a short burst run at full speed and then stalls it, so a median of short
    calls reads a speed the job never keeps up."""
    fn()  # the first call allocates
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - t0 < min_s:
        fn()
        sync()
        reps += 1
    return (time.perf_counter() - t0) / reps


class ProfiledBlocks(torch.nn.Module):
    """The blocks a node's speed is timed on, under one root as the job's model holds them."""

    def __init__(self, blocks, rope):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.rope = rope

    def forward(self, h):
        for b in self.blocks:
            h = b(h, self.rope)
        return h


def profiled_blocks(cfg: JobConfig, device: str, dims: ParallelDims) -> tuple[ProfiledBlocks, bool]:
    """PROFILE_BLOCKS of this job's blocks, wrapped as its engine wraps them: in FSDP2 (on a
    group of this rank alone) where the job runs FSDP2, whose hooks and optimizer step over
    DTensors cost the job CPU time that plain blocks would not show; and whether they are."""
    from trainer.model import Transformer
    from trainer.parallelize import shard_blocks, uses_fsdp

    model = Transformer(replace(cfg.model, n_layers=PROFILE_BLOCKS), cfg.moe).to(device)
    blocks = ProfiledBlocks(model.layers.values(), model.rope[:cfg.data.seq_len])
    fsdp = uses_fsdp(cfg, dims)
    if fsdp:
        alone = dist.new_group([dist.get_rank()], use_local_synchronization=True,
                               backend="nccl" if device == "cuda" else "gloo")
        shard_blocks(blocks, blocks.blocks, DeviceMesh.from_group(alone, device), dims)
    return blocks, fsdp


def profile_speed(cfg: JobConfig, device: str, dims: ParallelDims) -> tuple[float, float]:
    """(achieved TFLOP/s, optimizer updates per second in billions) of this device on this
    job's blocks, as the cost model counts them and as the job's engine runs them
    (``profiled_blocks``): one microbatch through them, forward and backward, then their
    optimizer step, each timed over PROFILE_S."""
    from trainer.parallelize import autocast, make_optimizer

    spec = model_spec(cfg)
    blocks, fsdp = profiled_blocks(cfg, device, dims)
    tokens = max(1, round(spec.global_batch * spec.seq_len / (dims.dp_size * spec.microbatches)))
    x = torch.randn(max(1, tokens // spec.seq_len), spec.seq_len, cfg.model.dim, device=device)
    if fsdp:  # a pipeline reduces the gradients once per step, after its microbatches (modelled apart)
        blocks.set_requires_gradient_sync(not dims.pp_enabled)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def fwd_bwd():
        with autocast(cfg, device):
            h = blocks(x.requires_grad_())
        h.float().square().mean().backward()

    compute = _rate_s(fwd_bwd, sync)
    if fsdp:  # the optimizer steps the sharded gradients a synchronised backward leaves
        blocks.set_requires_gradient_sync(True)
        fwd_bwd()
    optimizer = make_optimizer(blocks, cfg)
    params = sum(p.numel() for p in blocks.parameters())
    flops = 3 * x.shape[0] * spec.seq_len * PROFILE_BLOCKS * spec.layer_flops()
    return flops / compute / 1e12, params / _rate_s(optimizer.step, sync) / 1e9


@dataclass
class Detected:
    """The cluster as the job found it: the topology (speeds measured), the link probe, and
    each node's interfaces (name, address, /sys speed, alias) for the record."""

    topology: Topology
    probe: LinkProbe
    interfaces: list[list[dict]]


def detect_cluster(cfg: JobConfig | None, device: str, dims: ParallelDims | None = None, gpus: int | None = None,
                   probe_mb: float = 8.0) -> Detected:
    """Collective over the default group (module doc). ``cfg`` None: no compute profile (the
    nodes keep the default speeds: a plan by network only); ``dims``: the job's degrees (its
    data-parallel size sets the profile's microbatch, its engine the profile's wrapping)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nnodes, node_rank, first = world // per_node, rank // per_node, rank % per_node == 0
    node = None
    if first:
        kw = {}
        if cfg is not None:
            tflops, adam = profile_speed(cfg, device, dims)
            kw = {"tflops": tflops, "adam_gps": adam}
        node = detect_local_node(gpus=gpus or per_node, **kw)
    topology = gather_topology(dist.distributed_c10d._get_default_store(), node_rank, nnodes, node)
    probe = probe_links([i * per_node for i in range(nnodes)], probe_mb)
    nets = dist_utils.all_gather_object([asdict(i) for i in interfaces()] if first else None)
    return Detected(with_probe(topology, probe), probe, [n for n in nets if n is not None])


def auto_plan(cfg: JobConfig, dims: ParallelDims, device: str, run_dir: Path) -> Plan:
    """Detect the cluster and plan this job's placement on it (module doc); collective."""
    t0 = time.perf_counter()
    found = detect_cluster(cfg, device, dims)
    plan = None
    if dist.get_rank() == 0:
        plan = make_plan(found.topology, model_spec(cfg, dims), dims.mesh_sizes(), ep=dims.ep)
        plan.topology = {"nodes": [asdict(n) for n in found.topology.nodes], "latency_us": found.topology.latency_us,
                         "link_mb_s": found.probe.mb_s, "interfaces": found.interfaces}
        plan.save(run_dir / "plan.json")
    plan = Plan(**dist_utils.broadcast_object(asdict(plan) if plan else None))
    line = f"placement auto in {time.perf_counter() - t0:.1f} s: {describe_choice(plan)}"
    log.info(line)
    if dist.get_rank() == 0:
        print(f"kintsugi: {line}; plan in {run_dir / 'plan.json'}", flush=True)
    return plan


def describe_choice(plan: Plan) -> str:
    stages = "; ".join(f"stage {st['stage']}: {','.join(st['nodes'])} ({st['layers']} blocks)" for st in plan.stages)
    p = plan.predicted
    return (f"{stages}; predicted {p['adaptive_s']:.3g} s/step (contiguous ranks, even split, torch's 1F1B: "
            f"{p['unaware_s']:.3g} s)")


def resolve_plan(cfg: JobConfig, dims: ParallelDims, device: str, run_dir: Path) -> tuple[Plan | None, ParallelDims]:
    """The placement this job runs: ``parallel.plan`` (a file; ``dims`` already has its
    sizes and split), one made now (``parallel.placement = "auto"``: its split goes into the
    returned degrees), or none (ranks in order)."""
    p = cfg.parallel
    if p.plan:
        return load_plan(p.plan), dims
    if p.placement != "auto":
        return None, dims
    plan = auto_plan(cfg, dims, device, run_dir)
    plan.check(dims.world, cfg.model.n_layers, "the detected plan")
    return plan, replace(dims, pp_layers=tuple(plan.layers_per_stage))
