"""`kintsugi plan`: place ranks by fabric, split the pipeline by speed, predict the step time.

    kintsugi plan --topology configs/topology-ib-roce.toml --model gpt-7.5b --tp 8 --pp 2 --dp 4

prints the placement (ranks and fabric of each stage, the network of each group), the
layers per stage and the predicted iteration time next to the topology-unaware rank order
and an all-RDMA cluster, and writes the plan file that `kintsugi launch --parallel.plan=FILE` uses
(``--json``: the same as one JSON object on stdout).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from comms import UserError, exits_on_user_error
from comms.costmodel import PRESETS, ModelSpec, preset
from comms.mesh import MESH_DIMS
from comms.placement import Plan, make_plan
from comms.topology import Topology, load_topology


def model_spec(name: str) -> ModelSpec:
    """A preset name (gpt-7.5b, ...) or a Kintsugi job config TOML."""
    if not name.endswith(".toml"):
        return preset(name)
    from trainer.config import load_config  # only for job configs: presets need no trainer

    cfg = load_config(name)
    if cfg.parallel.pp_schedule == "GPipe":
        raise UserError(f"{name}: the cost model times 1F1B schedules; set parallel.pp_schedule to eager-1F1B or 1F1B")
    m = cfg.model
    return ModelSpec(n_layers=m.n_layers, dim=m.dim, n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, ffn_hidden=m.ffn_hidden,
                     vocab_size=m.vocab_size, seq_len=cfg.data.seq_len, global_batch=cfg.data.batch_size,
                     microbatches=cfg.parallel.pp_microbatches, bytes_per_value=2 if cfg.train.dtype == "bf16" else 4,
                     schedule=cfg.parallel.pp_schedule)


def _bandwidth(text: str) -> dict[str, float]:
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    except ValueError:
        raise UserError(f"--bandwidth {text!r}: write KIND=GBPS[,KIND=GBPS] (e.g. eth=50,roce=200)") from None


def ranges(ranks: list[int]) -> str:
    """[0,1,2,3,8,9] -> '0-3,8-9'."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}-{r}" if r != start else f"{r}")
            start = None
    return ",".join(out)


def report(topology: Topology, plan: Plan, model: ModelSpec) -> str:
    fabrics = topology.fabrics()
    desc = ", ".join(f"{f} ({len(idx)} nodes, {topology.nodes[idx[0]].kind} {topology.nodes[idx[0]].nics}x"
                     f"{topology.nodes[idx[0]].gbps:g} Gb/s)" for f, idx in fabrics.items())
    sizes = " ".join(f"{d}={plan.sizes[d]}" for d in MESH_DIMS)
    lines = [f"placement of {sizes} on {len(topology.nodes)} nodes ({topology.world_size} GPUs); fabrics: {desc}",
             f"model: {model.n_layers} blocks, dim {model.dim}, {model.params / 1e9:.2f}B params, "
             f"batch {model.global_batch} x {model.seq_len} tokens, {model.microbatches} microbatches, {model.schedule}",
             "", f"{'stage':>5}  {'fabric':<12} {'layers':>6}  {'nodes':<28} ranks"]
    for st in plan.stages:
        nodes = ",".join(st["nodes"])
        lines.append(f"{st['stage']:>5}  {'+'.join(st['fabrics']):<12} {st['layers']:>6}  {nodes:<28} {ranges(sorted(st['ranks']))}")
    lines.append("")
    for dim in MESH_DIMS:
        groups = plan.nccl[dim]
        if len(groups[0]["ranks"]) < 2:
            continue
        crossing = sum(len(g["fabrics"]) > 1 for g in groups)
        nets = sorted({g["net"] or "in-node" for g in groups})
        lines.append(f"{dim:>12}: {len(groups)} groups of {len(groups[0]['ranks'])}, {crossing} span fabrics; NCCL net: {', '.join(nets)}")
    p = plan.predicted
    lines += ["", "predicted iteration time (cost-model simulation):",
              f"  topology-unaware (contiguous ranks, even split)  {p['unaware_s']:9.4g} s   torch's 1F1B",
              f"    the same with {model.schedule:<10}                 {p['unaware_same_schedule_s']:9.4g} s",
              f"  fabric placement, even split                     {p['placed_s']:9.4g} s",
              f"  fabric placement, adaptive split (this plan)     {p['adaptive_s']:9.4g} s"
              f"   {p['unaware_s'] / p['adaptive_s']:.2f}x vs unaware",
              f"  all nodes on one RDMA fabric                     {p['homogeneous_s']:9.4g} s"]
    return "\n".join(lines)


@exits_on_user_error
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="kintsugi plan", description=__doc__.split("\n")[0],
                                 epilog="exit codes: 0 plan written; 2 bad input (one line on stderr)")
    ap.add_argument("--topology", required=True, help="topology TOML (see configs/topology-*.toml)")
    ap.add_argument("--model", required=True, help=f"a job config TOML or a preset: {', '.join(PRESETS)}")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (inside a node)")
    ap.add_argument("--pp", type=int, default=1, help="pipeline stages")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel size (dp_replicate x dp_shard)")
    ap.add_argument("--dp-replicate", type=int, default=1, help="of --dp, how many are DDP replicas (the rest FSDP shards)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel degree (divides --dp)")
    ap.add_argument("--microbatches", type=int, help="override the model's microbatches per step")
    ap.add_argument("--batch", type=int, help="override the global batch (samples per step)")
    ap.add_argument("--schedule", choices=["eager-1F1B", "1F1B"], help="override the pipeline schedule "
                    "(parallel.pp_schedule; presets: eager-1F1B, the trainer's default)")
    ap.add_argument("--bandwidth", type=_bandwidth, default={}, help="override Gbit/s, e.g. eth=50,roce=200 (ib, roce per NIC; eth per node; nvlink per GPU)")
    ap.add_argument("--out", default="plan.json", help="where to write the plan file")
    ap.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of the report")
    args = ap.parse_args(argv)

    for name in ("tp", "pp", "dp", "dp_replicate", "ep"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.dp % args.dp_replicate:
        raise UserError(f"--dp-replicate {args.dp_replicate} must divide --dp {args.dp}")
    topology = load_topology(args.topology)
    if args.bandwidth:
        topology = topology.with_bandwidth(args.bandwidth)
    model = model_spec(args.model)
    model = replace(model, microbatches=args.microbatches or model.microbatches, global_batch=args.batch or model.global_batch,
                    schedule=args.schedule or model.schedule)
    dp = args.dp
    if model.global_batch % (dp * model.microbatches):
        raise UserError(f"global batch {model.global_batch} is not divisible by dp {dp} x microbatches {model.microbatches}; "
                        "change --batch or --microbatches")
    sizes = {"pp": args.pp, "dp_replicate": args.dp_replicate, "dp_shard": dp // args.dp_replicate, "tp": args.tp}
    plan = make_plan(topology, model, sizes, ep=args.ep)
    plan.save(args.out)
    if args.json:
        print(json.dumps({"plan_file": str(Path(args.out)), **asdict(plan)}))
        return 0
    print(report(topology, plan, model))
    print(f"\nwrote {Path(args.out)}; use it with: kintsugi launch --parallel.plan={args.out} ... "
          f"(its sizes and layers per stage, {plan.layers_per_stage}, replace the config's)")
    return 0
