"""`kintsugi plan`: place ranks by fabric, split the pipeline by speed, predict the step time.

    kintsugi plan --topology configs/topology-ib-roce.toml --model gpt-7.5b --tp 8 --pp 2 --dp 4

prints the placement (ranks and fabric of each stage, the network of each group), the
layers per stage and the predicted iteration time next to the topology-unaware rank order
and an all-RDMA cluster, and writes the plan file that `kintsugi launch --plan FILE` uses
(``--json``: the same as one JSON object on stdout).

    kintsugi plan --detect --nnodes 4 --rdzv-endpoint node0:29400 --model job.toml --pp 2 --dp 2   # on every node

detects the cluster instead of reading a file: the nodes meet in a torchrun c10d rendezvous
(numbered as a job's rendezvous numbers them: by host name), read their NICs and fabrics,
time the job's blocks and measure every pair of nodes' links (trainer/placement.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from comms import UserError, exits_on_user_error
from comms.costmodel import PRESETS, ModelSpec, preset
from comms.mesh import MESH_DIMS
from comms.placement import Plan, make_plan
from comms.topology import Topology, load_topology


def job_config(name: str):
    """A Kintsugi job config TOML, or None for a preset name."""
    if not name.endswith(".toml"):
        return None
    from trainer.config import load_config  # only for job configs: presets need no trainer

    return load_config(name)


def model_spec(name: str) -> ModelSpec:
    """A preset name (gpt-7.5b, ...) or a Kintsugi job config TOML."""
    cfg = job_config(name)
    if cfg is None:
        return preset(name)
    from trainer.placement import model_spec as job_spec

    try:
        return job_spec(cfg)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None


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
    ap.add_argument("--topology", help="topology TOML (see configs/topology-*.toml); or --detect")
    ap.add_argument("--detect", action="store_true", help="detect the cluster: run on every node with --nnodes and --rdzv-endpoint")
    ap.add_argument("--nnodes", type=int, help="--detect: nodes that meet at the rendezvous")
    ap.add_argument("--rdzv-endpoint", help="--detect: HOST:PORT of the rendezvous (the same on every node)")
    ap.add_argument("--rdzv-id", default="kintsugi-plan", help="--detect: rendezvous id")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="--detect: GPUs per node (default: this node's CUDA devices, else 1)")
    ap.add_argument("--probe-mb", type=float, default=8.0, help="--detect: MB sent over each pair of nodes to measure its link")
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
    if args.detect == bool(args.topology):
        raise UserError("give --topology FILE or --detect (with --nnodes and --rdzv-endpoint), one of them")
    if args.detect and not os.environ.get("TORCHELASTIC_RUN_ID"):
        return rendezvous(args, argv)
    model = model_spec(args.model)
    model = replace(model, microbatches=args.microbatches or model.microbatches, global_batch=args.batch or model.global_batch,
                    schedule=args.schedule or model.schedule)
    dp = args.dp
    if model.global_batch % (dp * model.microbatches):
        raise UserError(f"global batch {model.global_batch} is not divisible by dp {dp} x microbatches {model.microbatches}; "
                        "change --batch or --microbatches")
    sizes = {"pp": args.pp, "dp_replicate": args.dp_replicate, "dp_shard": dp // args.dp_replicate, "tp": args.tp}
    model = replace(model, dp_shard=sizes["dp_shard"])
    if not args.detect:
        return write_plan(args, model, sizes, load_topology(args.topology), None)
    from comms import dist_utils

    found = detected(args, sizes)
    # Each node leaves without tearing gloo down (dist_utils.exit_process): its teardown
    # can abort the process ("terminate called without an active exception").
    dist_utils.exit_process(write_plan(args, model, sizes, found.topology, found) if found is not None else 0,
                            barrier=False)


def write_plan(args, model: ModelSpec, sizes: dict, topology, found) -> int:
    """Plan ``model`` on ``topology`` (``found``: what --detect measured, for the record),
    write the plan file, print the report."""
    if args.bandwidth:
        topology = topology.with_bandwidth(args.bandwidth)
    plan = make_plan(topology, model, sizes, ep=args.ep)
    if args.detect:
        plan.topology = {"nodes": [asdict(n) for n in topology.nodes], "latency_us": topology.latency_us,
                         "link_mb_s": found.probe.mb_s, "interfaces": found.interfaces}
    plan.save(args.out)
    if args.json:
        print(json.dumps({"plan_file": str(Path(args.out)), **asdict(plan)}))
        return 0
    if args.detect:
        print(cluster_report(found))
    print(report(topology, plan, model))
    print(f"\nwrote {Path(args.out)}; use it with: kintsugi launch --plan {args.out} ... "
          f"(its sizes and layers per stage, {plan.layers_per_stage}, replace the config's)")
    return 0


def rendezvous(args, argv: list[str]) -> int:
    """--detect on one node: meet the others in a torchrun c10d rendezvous (one process per
    node) and run this command again inside it."""
    if not args.nnodes or not args.rdzv_endpoint:
        raise UserError("--detect needs --nnodes N and --rdzv-endpoint HOST:PORT (the same on every node)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(args.nnodes), "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id, "--max-restarts", "0",
           "-m", "launch", "plan", *argv]
    env = dict(os.environ, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")  # see launch/launcher.py
    env.setdefault("OMP_NUM_THREADS", "1")
    # torchrun's agents report the rendezvous host leaving first as errors on stderr, also
    # when all went well: show its stderr only when it failed.
    done = subprocess.run(cmd, env=env, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
    return done.returncode


def detected(args, sizes: dict):
    """Inside the rendezvous: every node detects itself and the links (its speed profiled as
    the job of ``sizes`` runs); node 0 gets the cluster (the others None)."""
    import torch
    import torch.distributed as dist

    from trainer.parallel_dims import ParallelDims
    from trainer.placement import detect_cluster

    dist.init_process_group("gloo")
    gpus = args.gpus_per_node or max(torch.cuda.device_count(), 1)
    cfg = job_config(args.model)
    dims = ParallelDims(sizes["pp"], sizes["dp_replicate"], sizes["dp_shard"], sizes["tp"], args.ep,
                        dist.get_world_size() * gpus, (), cfg.parallel.engine if cfg else "torch")
    # The speeds are the job's devices': its GPUs where the node has them.
    found = detect_cluster(cfg, "cuda" if torch.cuda.is_available() else "cpu", dims, gpus=gpus, probe_mb=args.probe_mb)
    dist.barrier()  # the last collective: node 0 then plans alone, and every node exits
    return found if dist.get_rank() == 0 else None


def interface_line(x: dict) -> str:
    speed = f"{x['mbit']:g} Mb/s" if x["mbit"] else "no speed"
    alias = f" alias {x['alias']!r}" if x["alias"] else ""
    return f"{x['name']} {x['addr'] or '-'} {speed}{alias}"


def cluster_report(found) -> str:
    """The detected nodes, their interfaces and the measured links."""
    topo, probe = found.topology, found.probe
    lines = [f"detected {len(topo.nodes)} nodes (measured: links by gloo transfers, speeds on this job's blocks):"]
    for i, (n, nets) in enumerate(zip(topo.nodes, found.interfaces)):
        lines.append(f"  {i}: {n.name:<12} fabric {n.fabric:<8} {n.kind:<4} {n.tflops:8.4g} TFLOP/s  {n.adam_gps:7.3g} G updates/s  "
                     f"[{', '.join(interface_line(x) for x in nets)}]")
    lines.append("  link MB/s (measured): " + "; ".join(
        f"{topo.nodes[i].name}-{topo.nodes[j].name} {probe.mb_s[i][j]:.1f}"
        for i in range(len(topo.nodes)) for j in range(i + 1, len(topo.nodes))))
    return "\n".join(lines) + "\n"
