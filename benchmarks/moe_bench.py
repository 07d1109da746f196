"""MoE layer benchmark: DeepSpeed-MoE vs Kintsugi (d = 1 and auto), measured here, then the
same schedules evaluated by the performance model on an assumed GPU cluster.

Measured (gloo, CPU, 2 and 4 ranks): forward+backward time of one MoE layer per step, the
three variants interleaved round by round on the same tokens and config (hidden size,
experts, k, capacity factor, tokens per rank); a step's time is the slowest rank's.
Reported as median and interquartile range over the timed rounds.

Modelled: comms.moe.perfmodel with gpu_cluster_profile (8 GPUs per node, NVLink-class
intra-node, 200 Gb/s inter-node), sequential schedule (d = 1, gradients reduced after the
backward, what DeepSpeed-MoE runs) vs the model's chosen schedule, for a grid of layer
configurations in the range the FSMoE paper sweeps.

    DS_ACCELERATOR=cpu python benchmarks/moe_bench.py --json runs/bench/moe.json
    DS_ACCELERATOR=cpu python benchmarks/moe_bench.py --quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from comms.moe import LayerShape, choose, gpu_cluster_profile, sequential  # noqa: E402
from trainer.model import FeedForward  # noqa: E402  (DeepSpeed's expert: the same SwiGLU math)

VARIANTS = ("deepspeed", "kintsugi_d1", "kintsugi_auto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, cfg, out_path):
    import logging

    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE

    from comms import dist_utils
    from comms.moe import build_ep_groups
    from trainer.moe import MoE, apply_expert_parallel, capacity
    from trainer.moe_config import MoEConfig

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    dim, hidden, n_exp, k, cf = cfg["dim"], cfg["hidden"], cfg["experts_per_rank"] * world, cfg["k"], cfg["capacity_factor"]
    torch.manual_seed(0)
    ds = DSMoE(dim, FeedForward(dim, hidden), num_experts=n_exp, ep_size=world, k=k, capacity_factor=cf,
               min_capacity=0, use_rts=False, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    groups = build_ep_groups(world, "cpu")
    layers = {}
    for name, chunks in (("kintsugi_d1", "1"), ("kintsugi_auto", "auto")):
        mcfg = MoEConfig(every=1, n_experts=n_exp, top_k=k, capacity_factor=cf, router="gshard", chunks=chunks)
        holder = nn.ModuleDict({"moe": MoE(dim, hidden, mcfg)})
        apply_expert_parallel(holder, groups.mesh, groups)
        layers[name] = holder["moe"]

    def step(name, x):
        x = x.detach().requires_grad_()
        if name == "deepspeed":
            y, aux, _ = ds(x)
        else:
            y, aux = layers[name](x), layers[name].aux_loss
        (y.float().square().mean() + aux).backward()

    torch.manual_seed(1 + rank)
    x = torch.randn(cfg["batch"], cfg["seq"], dim)
    times = {v: [] for v in VARIANTS}
    for r in range(cfg["warmup"] + cfg["rounds"]):
        # Rotate the order every round so no variant always runs right after another.
        for name in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            dist.barrier()
            t0 = time.perf_counter()
            step(name, x)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if r >= cfg["warmup"]:
                times[name].append(dt.item())
    if rank == 0:
        sched = layers["kintsugi_auto"].scheduler
        report = sched.report()["moe"]
        capacity_rows = cfg["batch"] * capacity(layers["kintsugi_auto"].cfg, cfg["seq"])
        Path(out_path).write_text(json.dumps({"times": times, "auto_d": report["d"], "fill": report["rows"] / capacity_rows,
                                              "auto_predicted_ms": report["predicted_ms"],
                                              "profile": sched.profile.to_dict()}))
    for m in layers.values():
        m.scheduler.close()
    dist_utils.shutdown()


def measure(world: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(worker, args=(world, free_port(), cfg, str(out)), nprocs=world)
        raw = json.loads(out.read_text())
    row = {"ranks": world, "auto_d": raw["auto_d"], "fill": raw["fill"], "auto_predicted_ms": raw["auto_predicted_ms"], "profile": raw["profile"]}
    for name, ts in raw["times"].items():
        q = statistics.quantiles([1e3 * t for t in ts], n=4)
        row[f"{name}_ms"] = statistics.median(1e3 * t for t in ts)
        row[f"{name}_iqr_ms"] = q[2] - q[0]
        row[f"{name}_min_ms"] = 1e3 * min(ts)  # best of N: the cost without other jobs' interference
    return row


# Layer configurations for the model: hidden size M, FFN size 4M, tokens per GPU T, experts
# per GPU, top-2, capacity factor 1.2 (the ranges of FSMoE's layer sweep and GPT/Mixtral-like
# layers), on 4 nodes x 8 GPUs with EP over all 32 GPUs.
MODEL_CONFIGS = [
    {"dim": m, "tokens": t, "experts_per_gpu": e}
    for m in (1024, 2048, 4096) for t in (2048, 4096, 8192) for e in (1, 2)
]


def modelled(gpus_per_node=8, nodes=4) -> tuple[list, float]:
    prof = gpu_cluster_profile(gpus_per_node, nodes)
    ep = gpus_per_node * nodes
    rows = []
    for c in MODEL_CONFIGS:
        m, n_exp = c["dim"], c["experts_per_gpu"] * ep
        hidden, k, cf = 4 * m, 2, 1.2
        slots = math.ceil(cf * c["tokens"] * k / n_exp)  # capacity slots per expert on one GPU
        local_expert_params = c["experts_per_gpu"] * 3 * m * hidden
        grad_bytes = 2 * (local_expert_params + 4 * m * m)  # bf16 grads of the experts + attention
        shape = LayerShape(n_experts=n_exp, slots=slots, dim=m, hidden=hidden, ep=ep, elt_bytes=2, grad_bytes=grad_bytes)
        seq, best, chunked = sequential(shape, prof), choose(shape, prof), choose(shape, prof, partition=False)
        rows.append({**c, "sequential_ms": 1e3 * seq.predicted_s, "auto_ms": 1e3 * best.predicted_s, "d": best.d,
                     "speedup": seq.predicted_s / best.predicted_s,
                     "speedup_chunking_only": seq.predicted_s / chunked.predicted_s})
    def geo(key):
        return math.exp(statistics.fmean(math.log(r[key]) for r in rows))

    return rows, geo("speedup"), geo("speedup_chunking_only")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small layer, few rounds (smoke run)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = {"dim": 256, "hidden": 512, "experts_per_rank": 2, "k": 2, "capacity_factor": 1.25, "batch": 8, "seq": 128,
           "warmup": 3, "rounds": args.rounds or 15}
    if args.quick:
        cfg.update(dim=64, hidden=128, batch=2, seq=64, warmup=1, rounds=args.rounds or 4)
    measured = [measure(w, cfg) for w in args.ranks]
    rows, geo, geo_chunking = modelled()

    print(f"\nMEASURED on this machine (gloo, CPU, 1 thread per rank): one MoE layer forward+backward, "
          f"dim={cfg['dim']} hidden={cfg['hidden']} experts={cfg['experts_per_rank']}/rank k={cfg['k']} "
          f"cf={cfg['capacity_factor']} tokens/rank={cfg['batch'] * cfg['seq']}; {cfg['rounds']} interleaved rounds")
    print(f"{'ranks':>5} | {'DeepSpeed-MoE ms':>24} | {'Kintsugi d=1 ms':>24} | {'Kintsugi auto ms':>24} | auto d | auto/DS "
          f"| Kintsugi rows")
    print(f"{'':>5} | {'median [IQR] min':>24} | {'median [IQR] min':>24} | {'median [IQR] min':>24} |        | (median) "
          f"| / capacity")
    for r in measured:
        cells = [f"{r[f'{v}_ms']:7.1f} [{r[f'{v}_iqr_ms']:5.1f}] {r[f'{v}_min_ms']:6.1f}" for v in VARIANTS]
        print(f"{r['ranks']:>5} | {cells[0]:>24} | {cells[1]:>24} | {cells[2]:>24} | {r['auto_d']:>6} | "
              f"{r['kintsugi_auto_ms'] / r['deepspeed_ms']:8.2f} | {r['fill']:.2f}")
    print("\nMODELLED (performance model, assumed 4 nodes x 8 GPUs, NVLink intra, 200 Gb/s inter; not measured): "
          "sequential (d=1, gradients after backward) vs chosen schedule")
    print(f"{'M':>5} {'tokens/GPU':>10} {'experts/GPU':>11} | {'sequential ms':>13} | {'auto ms':>8} | {'d':>3} | "
          f"speedup | chunking only")
    for r in rows:
        print(f"{r['dim']:>5} {r['tokens']:>10} {r['experts_per_gpu']:>11} | {r['sequential_ms']:13.2f} | "
              f"{r['auto_ms']:8.2f} | {r['d']:>3} | {r['speedup']:7.2f} | {r['speedup_chunking_only']:.2f}")
    print(f"geometric-mean modelled speedup: {geo:.2f} (chunking alone, gradients still after the backward: {geo_chunking:.2f})")
    main_row = measured[0]
    result = {"deepspeed_ms": main_row["deepspeed_ms"], "kintsugi_d1_ms": main_row["kintsugi_d1_ms"],
              "kintsugi_auto_ms": main_row["kintsugi_auto_ms"], "model_speedup": geo, "model_speedup_chunking_only": geo_chunking,
              "config": cfg, "measured": measured, "modelled": rows, "modelled_profile": gpu_cluster_profile().to_dict()}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
