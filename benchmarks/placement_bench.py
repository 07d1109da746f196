"""Simulated iteration time of Holmes' kinds of heterogeneous-NIC clusters (cost model, no GPUs).

For each scenario (a GPT on 8 nodes x 8 GPUs spread over fabrics), four layouts:

- unaware_s: the job without Kintsugi: torch's contiguous rank order, even split, torch's
  Schedule1F1B; unaware_same_schedule_s: the same order and split under Kintsugi's schedule
  (the share of placement and partition alone);
- placed_s: Kintsugi's fabric placement, even split;
- adaptive_s: Kintsugi's fabric placement and adaptive partition (what `kintsugi plan` writes);
- homogeneous_s: the same nodes all on the best fabric's RDMA NICs, adaptive split.

Node ranks are numbered as a rendezvous hands them out: a seeded random shuffle of the
nodes; every column is the median over --orders shuffles (the same ones for all columns).

    python benchmarks/placement_bench.py --json runs/bench/placement.json [--quick]

All numbers are predictions of comms/costmodel.py; see docs/placement.md for its formulas.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comms.costmodel import PRESETS  # noqa: E402
from comms.placement import make_plan  # noqa: E402
from comms.topology import Node, Topology  # noqa: E402

GPUS, TFLOPS = 8, 150.0  # per node: A100s at ~50% MFU
ETH = 25.0  # each node's Ethernet between fabrics (Gbit/s); --eth-gbps changes it


def nodes(fabric: str, kind: str, count: int, nics: int, gbps: float) -> list[Node]:
    return [Node(f"{fabric}-{i}", GPUS, fabric, kind, nics, gbps, ETH, TFLOPS) for i in range(count)]


# name -> (nodes, model preset, sizes, mixed NIC kinds?)
SCENARIOS = {
    "ib+roce": (nodes("ib", "ib", 4, 4, 200) + nodes("roce", "roce", 4, 4, 100), "gpt-7.5b",
                {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8}, True),
    "ib+eth": (nodes("ib", "ib", 4, 4, 200) + nodes("eth", "eth", 4, 2, 25), "gpt-7.5b",
               {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8}, True),
    "ib+roce+ib": (nodes("ib-a", "ib", 4, 4, 200) + nodes("roce", "roce", 2, 4, 100) + nodes("ib-b", "ib", 2, 4, 200),
                   "gpt-7.5b", {"pp": 4, "dp_replicate": 1, "dp_shard": 2, "tp": 8}, True),
    "2 IB clusters (pipeline-only crossing)": (nodes("ib-a", "ib", 4, 4, 200) + nodes("ib-b", "ib", 4, 4, 200), "gpt-7.5b",
                                       {"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 8}, False),
    "ib+roce gpt-18b pp4": (nodes("ib", "ib", 4, 4, 200) + nodes("roce", "roce", 4, 4, 100), "gpt-18b",
                            {"pp": 4, "dp_replicate": 1, "dp_shard": 2, "tp": 8}, True),
}
QUICK = ("ib+roce", "2 IB clusters (pipeline-only crossing)")


def run(names, orders: int, microbatch: int, eth_gbps: float, schedule: str = "eager-1F1B") -> dict:
    """Per scenario, the median of each layout's time over seeded node orders."""
    out = {}
    for name in names:
        all_nodes, model_name, sizes, mixed = SCENARIOS[name]
        if eth_gbps != ETH:
            all_nodes = Topology(all_nodes).with_bandwidth({"eth": eth_gbps}).nodes
        dp = sizes["dp_replicate"] * sizes["dp_shard"]
        model = PRESETS[model_name]
        model = replace(model, microbatches=model.global_batch // (dp * microbatch), schedule=schedule)
        rng = random.Random(0)
        plans = [make_plan(Topology(rng.sample(all_nodes, len(all_nodes))), model, sizes) for _ in range(orders)]
        row = {k: statistics.median(p.predicted[k] for p in plans) for k in ("unaware_s", "unaware_same_schedule_s", "placed_s", "adaptive_s", "homogeneous_s")}
        row.update(model=model_name, sizes=sizes, mixed=mixed, node_orders=orders,
                   layers_per_stage=statistics.mode(tuple(p.layers_per_stage) for p in plans),
                   speedup_vs_unaware=row["unaware_s"] / row["adaptive_s"],
                   speedup_same_schedule=row["unaware_same_schedule_s"] / row["adaptive_s"],
                   slowdown_vs_homogeneous=row["adaptive_s"] / row["homogeneous_s"])
        out[name] = row
    return out


def table(results: dict) -> str:
    head = ("| scenario (simulation) | model, pp x dp x tp | unaware s | unaware, same schedule s | placed s | adaptive s "
            "| homogeneous s | adaptive vs unaware | (same schedule) | adaptive / homogeneous | layers per stage |")
    lines = [head, "|" + "---|" * 11]
    for name, r in results.items():
        s = r["sizes"]
        lines.append(f"| {name} | {r['model']}, {s['pp']}x{s['dp_replicate'] * s['dp_shard']}x{s['tp']} "
                     f"| {r['unaware_s']:.2f} | {r['unaware_same_schedule_s']:.2f} | {r['placed_s']:.2f} | {r['adaptive_s']:.2f} "
                     f"| {r['homogeneous_s']:.2f} | {r['speedup_vs_unaware']:.2f}x | {r['speedup_same_schedule']:.2f}x "
                     f"| {r['slowdown_vs_homogeneous']:.3f} | {r['layers_per_stage']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="two scenarios, 3 node orders")
    ap.add_argument("--orders", type=int, default=21, help="node orders drawn for the unaware baseline (median)")
    ap.add_argument("--microbatch", type=int, default=2, help="samples per microbatch")
    ap.add_argument("--eth-gbps", type=float, default=ETH, help="every node's Ethernet, the path between fabrics")
    ap.add_argument("--schedule", choices=["eager-1F1B", "1F1B"], default="eager-1F1B",
                    help="the trainer's pipeline schedule: eager 1F1B (its default) or torch's 1F1B")
    args = ap.parse_args(argv)
    names = QUICK if args.quick else list(SCENARIOS)
    results = run(names, 3 if args.quick else args.orders, args.microbatch, args.eth_gbps, args.schedule)
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
