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
The unaware layouts are also given for nodes numbered fabric by fabric (a hostfile or a tidy
scheduler), where contiguous ranks already keep each stage in one fabric.

    python benchmarks/placement_bench.py --json runs/bench/placement.json [--quick]

All numbers of this mode are predictions of comms/costmodel.py (docs/placement.md); the
cost model is checked against measured runs with --testbed:

    python benchmarks/placement_bench.py --testbed --json runs/bench/placement-testbed.json

MEASURED on 4 emulated hosts (tests/cluster.py): two fabrics (a fast one and an Ethernet
one, a slower link between them), each host's CPU capped (a "GPU" of its own), the real
trainer through `kintsugi launch` for each layout: (a) unaware_s: contiguous ranks in the
scheduler's node order, even split, torch's 1F1B; (b) same_schedule_s: the same with the
trainer's eager 1F1B; (c) placed_s: the plan's placement, even split; (d) adaptive_s: the
plan (placement and split), which runs FSDP2 replicas (HSDP, the trainer's engine for
replicas under a pipeline); (e) bucketed_s: the plan with plain replicas reducing in buckets
and stepping after every reduction; (f) overlapped_s: the same stepping each bucket as soon
as it is reduced (Holmes' overlapped optimizer): (d)/(e) is the engine's share, (e)/(f) the
overlap's own. The plan comes from `kintsugi plan --detect` on the hosts (fabrics from the
interfaces' aliases, links measured, speeds profiled on the job's blocks as its engine wraps
them; a second detection with the plain-replica job profiles (e) and (f)), and the cost
model's prediction stands beside every measured case. Jobs run round by round in a rotating
order; each job's step time is the median of its steps after --skip; each case's the median
over rounds (min-max beside it).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from comms.costmodel import PRESETS  # noqa: E402
from comms.placement import even_layers, make_plan  # noqa: E402
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
        tidy = make_plan(Topology(all_nodes), model, sizes).predicted  # numbered fabric by fabric
        row.update(sorted_unaware_s=tidy["unaware_s"], sorted_same_schedule_s=tidy["unaware_same_schedule_s"])
        row.update(model=model_name, sizes=sizes, mixed=mixed, node_orders=orders,
                   layers_per_stage=statistics.mode(tuple(p.layers_per_stage) for p in plans),
                   speedup_vs_unaware=row["unaware_s"] / row["adaptive_s"],
                   speedup_same_schedule=row["unaware_same_schedule_s"] / row["adaptive_s"],
                   slowdown_vs_homogeneous=row["adaptive_s"] / row["homogeneous_s"])
        out[name] = row
    return out


def table(results: dict) -> str:
    head = ("| scenario (simulation) | model, pp x dp x tp | unaware s | unaware, same schedule s | placed s | adaptive s "
            "| homogeneous s | adaptive vs unaware | (same schedule) | adaptive / homogeneous | layers per stage "
            "| fabric-sorted order: unaware s | (same schedule) s |")
    lines = [head, "|" + "---|" * 13]
    for name, r in results.items():
        s = r["sizes"]
        lines.append(f"| {name} | {r['model']}, {s['pp']}x{s['dp_replicate'] * s['dp_shard']}x{s['tp']} "
                     f"| {r['unaware_s']:.2f} | {r['unaware_same_schedule_s']:.2f} | {r['placed_s']:.2f} | {r['adaptive_s']:.2f} "
                     f"| {r['homogeneous_s']:.2f} | {r['speedup_vs_unaware']:.2f}x | {r['speedup_same_schedule']:.2f}x "
                     f"| {r['slowdown_vs_homogeneous']:.3f} | {r['layers_per_stage']} "
                     f"| {r['sorted_unaware_s']:.2f} | {r['sorted_same_schedule_s']:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ measured (testbed)

# The testbed's job: a GPT-like model whose stage gradients (~13 MB fp32 per stage) take
# about as long over the Ethernet link as a step's compute takes on a host's half core.
TESTBED_JOB = """
[model]
dim = 256
n_layers = 8
n_heads = 4
max_seq_len = 64
vocab_size = 256

[data]
seq_len = 64
batch_size = 16
max_corpus_mb = 1.0

[optim]
lr = 3e-3
warmup_steps = 0
schedule = "constant"
grad_clip = 0.0

[train]
steps = {steps}
log_every = 1000
progress = false

[parallel]
pp = 2
dp_replicate = 2
dp_shard = 1
pp_microbatches = 4
timeout_s = 600.0

[checkpoint]
interval = 0
"""
# Node order as torchrun's c10d rendezvous numbers hosts (by name): a scheduler handing out
# node0..node3 across two fabrics interleaves them; a tidy one (or a file) sorts them.
ORDERS = {"interleaved": ([0, 2], [1, 3]), "fabric-sorted": ([0, 1], [2, 3])}
KEYS = ("unaware_s", "same_schedule_s", "placed_s", "adaptive_s")
# (d) with plain replicas (the overlapped optimizer's bucketed reduction, stepped after it), and
# with the overlap: apart, they show the overlap's own share and the engine's.
REPLICA_KEYS = ("bucketed_s", "overlapped_s")


def _shape(tb, fast: list[int], slow: list[int], args):
    """Two fabrics: `fast` and `slow` (Ethernet) hosts, a slower link between them; each
    host's interface alias names its fabric (what detection reads)."""
    for hosts, name in ((fast, "fast"), (slow, "ethernet")):
        for h in hosts:
            tb.run(h, ["ip", "link", "set", "eth0", "alias", f"fabric={name}"], check=True)
    tb.link(fast, fast, rate_mbit=args.fast_mbit)
    tb.link(slow, slow, rate_mbit=args.eth_mbit)
    tb.link(fast, slow, rate_mbit=args.cross_mbit)


def _env(cluster):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import env

    return env(GLOO_SOCKET_IFNAME=cluster.IFACE)


def _wait(tb, procs, what: str):
    rcs = [p.wait(timeout=1800) for p in procs]
    if any(rcs):
        logs = "\n".join(tb.log(h, what).read_text()[-2500:] for h in range(len(tb.hosts)))
        raise RuntimeError(f"{what} exited {rcs}:\n{logs}")


def _detect(tb, cluster, job: Path, out: Path):
    """`kintsugi plan --detect` on every host: the plan and what the cost model predicts."""
    from comms.placement import load_plan

    argv = ["plan", "--detect", "--nnodes", str(len(tb.hosts)), "--rdzv-endpoint", tb.rdzv_endpoint(29400),
            "--model", str(job), "--pp", "2", "--dp", "2", "--dp-replicate", "2", "--out", str(out)]
    _wait(tb, [tb.popen(h, [sys.executable, "-m", "launch", *argv], env=_env(cluster), log=tb.log(h, "plan"))
               for h in range(len(tb.hosts))], "plan")
    return load_plan(out)


def _job(tb, cluster, name: str, job: Path, *overrides: str) -> list[float]:
    """One training job through `kintsugi launch` on every host; its step times."""
    run = tb.shared / name
    procs = tb.launch_job(name, "--config", str(job), f"--train.run_dir={run}", "--skip-preflight", *overrides, env=_env(cluster))
    _wait(tb, procs, "launch")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["step_time_s"] for r in records if "step_time_s" in r]  # not the checkpoint events


def _replica_predictions(plan, plain_plan, job: Path, bucket_mb: float) -> dict:
    """The cost model on ``plan``'s placement and split for the plain-replica cases, with the
    speeds ``plain_plan`` profiled on plain blocks (as those jobs run them): ``bucketed_s``
    reduces in buckets and steps after them, ``overlapped_s`` steps each bucket once reduced."""
    from comms.costmodel import simulate, stages_of
    from trainer.config import load_config
    from trainer.parallel_dims import ParallelDims
    from trainer.placement import model_spec

    topo = Topology([Node(**n) for n in plain_plan.topology["nodes"]], dict(plain_plan.topology["latency_us"]))
    cfg = load_config(str(job), ["--parallel.overlap_optimizer=true", f"--parallel.bucket_mb={bucket_mb}"])
    dims = ParallelDims.resolve(cfg, topo.world_size)
    spec = model_spec(cfg, dims)
    stages = stages_of(topo, plan.rank_grid)
    return {key: simulate(replace(spec, bucket_mb=mb), stages, plan.layers_per_stage, dims.dp_size, dims.tp).iteration_s
            for key, mb in (("bucketed_s", 0.0), ("overlapped_s", bucket_mb))}


def testbed(args) -> dict:
    """Each node order's layouts as real training jobs on 4 emulated hosts, rounds
    interleaved; medians over rounds of each job's median step."""
    sys.path.insert(0, str(ROOT / "tests"))
    import cluster

    out = {}
    with cluster.Testbed(4) as tb:
        job = tb.shared / "job.toml"
        job.write_text(TESTBED_JOB.format(steps=args.steps))
        # The same job with plain replicas (the overlapped optimizer's): its own profile.
        plain_job = tb.shared / "job-plain.toml"
        plain_job.write_text(TESTBED_JOB.format(steps=args.steps).replace(
            "[parallel]\n", f"[parallel]\noverlap_optimizer = true\nbucket_mb = {args.bucket_mb}\n"))
        if args.cpu_per_host:
            for h in range(4):
                tb.slow_cpu(h, args.cpu_per_host, period_ms=args.cpu_period_ms)
        plans = {}
        for order, (fast, slow) in ORDERS.items():
            _shape(tb, fast, slow, args)
            plan = _detect(tb, cluster, job, tb.shared / f"plan-{order}.json")
            even = replace(plan, layers_per_stage=even_layers(sum(plan.layers_per_stage), len(plan.layers_per_stage)))
            even.save(tb.shared / f"plan-{order}-even.json")
            plans[order] = plan, _detect(tb, cluster, plain_job, tb.shared / f"plan-{order}-plain.json")
        replicas = [f"--plan={tb.shared}/plan-{{order}}.json", "--parallel.overlap_optimizer=true",
                    f"--parallel.bucket_mb={args.bucket_mb}"]
        cases = {"unaware_s": ["--parallel.pp_schedule=1F1B"], "same_schedule_s": [],
                 "placed_s": [f"--plan={tb.shared}/plan-{{order}}-even.json"],
                 "adaptive_s": [f"--plan={tb.shared}/plan-{{order}}.json"],
                 "bucketed_s": [*replicas, "--parallel.optimizer_overlap=false"],
                 "overlapped_s": replicas}
        times = {order: {case: [] for case in cases} for order in ORDERS}
        runs = [(order, case) for order in ORDERS for case in cases]
        for r in range(args.rounds):
            for order, case in runs[r % len(runs):] + runs[:r % len(runs)]:  # rotate: no case always first
                _shape(tb, *ORDERS[order], args)
                steps = _job(tb, cluster, f"{order}-{case}-{r}", job, *(o.format(order=order) for o in cases[case]))
                times[order][case].append(statistics.median(steps[args.skip:]))
                print(f"round {r} {order:<13} {case:<16} {times[order][case][-1]:.3f} s/step", flush=True)
        for order, (plan, plain) in plans.items():
            modelled = {"unaware_s": plan.predicted["unaware_s"], "same_schedule_s": plan.predicted["unaware_same_schedule_s"],
                        "placed_s": plan.predicted["placed_s"], "adaptive_s": plan.predicted["adaptive_s"]}
            measured = {case: statistics.median(ts) for case, ts in times[order].items()}
            replica_model = _replica_predictions(plan, plain, job, args.bucket_mb)
            out[order] = {"measured": {k: measured[k] for k in KEYS}, "modelled": modelled,
                          "details": {"rounds": times[order],
                                      **{k: measured[k] for k in REPLICA_KEYS},
                                      **{f"modelled_{k}": replica_model[k] for k in REPLICA_KEYS},
                                      "layers_per_stage": plan.layers_per_stage, "stages": plan.stages,
                                      "topology": plan.topology, "topology_plain": plain.topology,
                                      "rates_mbit": {"fast": args.fast_mbit, "ethernet": args.eth_mbit,
                                                     "between": args.cross_mbit},
                                      "cpu_per_host": args.cpu_per_host, "cpu_period_ms": args.cpu_period_ms}}
    return out


def testbed_table(results: dict) -> str:
    cols = (*KEYS, *REPLICA_KEYS)
    lines = ["| node order (testbed) | | (a) unaware s (torch 1F1B) | (b) same schedule s (eager) | (c) placed s | "
             "(d) adaptive s | (e) the plan, plain replicas s | (f) (e) + overlapped optimizer s | (d) vs (a) | "
             "schedule's share (a)/(b) | placement's (b)/(c) | split's (c)/(d) | plain replicas' (d)/(e) | overlap's (e)/(f) |",
             "|" + "---|" * 14]
    for order, r in results.items():
        d = r["details"]
        m = {**r["measured"], **{k: d[k] for k in REPLICA_KEYS}}
        p = {**r["modelled"], **{k: d[f"modelled_{k}"] for k in REPLICA_KEYS}}
        spread = {k: (min(v), max(v)) for k, v in d["rounds"].items()}

        def shares(t):
            return (f"{t['unaware_s'] / t['adaptive_s']:.2f}x | {t['unaware_s'] / t['same_schedule_s']:.2f}x | "
                    f"{t['same_schedule_s'] / t['placed_s']:.2f}x | {t['placed_s'] / t['adaptive_s']:.2f}x | "
                    f"{t['adaptive_s'] / t['bucketed_s']:.2f}x | {t['bucketed_s'] / t['overlapped_s']:.2f}x |")
        lines.append(f"| {order} | measured | " + " | ".join(f"{m[k]:.3f} ({spread[k][0]:.3f}-{spread[k][1]:.3f})" for k in cols)
                     + " | " + shares(m))
        lines.append("| | modelled (error) | " + " | ".join(f"{p[k]:.3f} ({100 * (p[k] / m[k] - 1):+.0f}%)" for k in cols)
                     + " | " + shares(p))
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
    ap.add_argument("--testbed", action="store_true", help="measure on 4 emulated hosts (tests/cluster.py) through the trainer")
    ap.add_argument("--rounds", type=int, default=3, help="testbed: rounds of every job (interleaved)")
    ap.add_argument("--steps", type=int, default=10, help="testbed: steps per job")
    ap.add_argument("--skip", type=int, default=2, help="testbed: first steps left out of a job's median (warm-up)")
    ap.add_argument("--fast-mbit", type=float, default=2000.0, help="testbed: links inside the fast fabric")
    ap.add_argument("--eth-mbit", type=float, default=1000.0, help="testbed: links inside the Ethernet fabric")
    ap.add_argument("--cross-mbit", type=float, default=200.0, help="testbed: links between the fabrics")
    ap.add_argument("--cpu-per-host", type=float, default=0.5, help="testbed: CPU cores per host (cgroup quota; 0 = none)")
    ap.add_argument("--cpu-period-ms", type=float, default=2.0,
                    help="testbed: the quota's period (short: a host computes at one speed, as a GPU does, whether or not "
                         "it waited for the network before; at the kernel's 100 ms a burst after a wait runs unslowed)")
    ap.add_argument("--bucket-mb", type=float, default=2.0, help="testbed: the overlapped optimizer's bucket size")
    args = ap.parse_args(argv)
    if args.testbed:
        results = testbed(args)
        print(testbed_table(results))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
        return 0
    names = QUICK if args.quick else list(SCENARIOS)
    results = run(names, 3 if args.quick else args.orders, args.microbatch, args.eth_gbps, args.schedule)
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
