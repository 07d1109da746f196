"""MoE layer benchmark: DeepSpeed-MoE vs Kintsugi (d = 1, d = 2, 4, auto), measured on the
emulated cluster (--testbed) or on loopback, and the model's prediction beside each.

--testbed (MEASURED, tests/cluster.py): 2-4 hosts, each a network namespace with its own
address, ranks per host 1 (or 2, for the hierarchical all-to-all), links between hosts shaped
to --rate-mbit with HTB, so that an exchange takes real time on the wire while the CPU is
free, as on a GPU cluster's NICs; each host's CPU capped at --cpu-per-rank cores per rank
over a short quota period (--cpu-period-ms), so that a rank computes at one speed and its
core idles while it waits for the wire, as a GPU does. Loopback (no --testbed): every rank
on 127.0.0.1 and the same cores, where communication is CPU copies (the earlier
measurements; kept for reference).

Each step is one MoE layer's forward + backward on the same tokens and configuration for
every variant, plus the data-parallel all-reduce of ``later_mb`` of gradients of the layers
after it (ready before this layer's backward starts, as in a real model):

- deepspeed: DeepSpeed-MoE's layer (capacity-padded dispatch), gradients all-reduced after
  the backward (what DeepSpeed's engine does at ZeRO stage 0-2 without overlap_comm);
- d1 / d2 / d4: Kintsugi's layer with that many chunks, gradients after the backward;
- auto: the chunk count the profile + model choose, settled on the layer's own timed calls
  (comms/moe/tuner.py, ``moe.tune_calls`` per candidate, the trainer's default, after the
  warm-up rounds and before the timed ones), and the gradient partition of the model
  calibrated by those calls, gradients reduced in the backward's link gaps; auto_after: d
  settled the same way, gradients after the backward (the chunking's share alone).

Variants run round by round in an order that rotates every round; a step's time is the
slowest rank's. Reported: median and interquartile range over the timed rounds; the model's
predicted time (perfmodel.simulate) beside it, with the profile as measured on the job's
groups and with its overlap calibrated by auto's timed calls.

Modelled (no GPUs here): the same model with an assumed GPU cluster's costs
(gpu_cluster_profile) for layer shapes of the FSMoE paper's range.

    DS_ACCELERATOR=cpu python benchmarks/moe_bench.py --testbed --json runs/bench/moe.json
    DS_ACCELERATOR=cpu python benchmarks/moe_bench.py --testbed --quick
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from comms.moe import LayerShape, Profile, choose, gpu_cluster_profile, sequential, simulate  # noqa: E402
from diagnostics.drill import free_port  # noqa: E402
from trainer.model import FeedForward  # noqa: E402  (DeepSpeed's expert: the same SwiGLU math)
from trainer.moe_config import MoEConfig  # noqa: E402

VARIANTS = ("deepspeed", "d1", "d2", "d4", "auto", "auto_after")
CHUNKS = {"d1": "1", "d2": "2", "d4": "4", "auto": "auto", "auto_after": "auto"}


class LaterLayers(torch.autograd.Function):
    """Identity on the layer's output whose backward hands ``grad`` to ``param``: the layers
    after this one, whose gradients are ready for data-parallel reduction before this layer's
    backward starts (their compute is not what is measured here)."""

    @staticmethod
    def forward(ctx, y, param, grad):
        ctx.grad = grad
        return y.view_as(y)

    @staticmethod
    def backward(ctx, gy):
        return gy, ctx.grad, None


def worker(cfg: dict, out_path: str):
    """One rank (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_WORLD_SIZE in the environment)."""
    import logging

    import torch.distributed as dist

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    import deepspeed
    from deepspeed.moe.layer import MoE as DSMoE

    from comms import dist_utils
    from comms.moe import build_ep_groups
    from trainer.moe import MoE, apply_expert_parallel, attach_grad_reducer, capacity

    deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=datetime.timedelta(seconds=600))
    world, rank = dist.get_world_size(), dist.get_rank()
    dim, hidden, n_exp, k, cf = cfg["dim"], cfg["hidden"], cfg["experts_per_rank"] * world, cfg["k"], cfg["capacity_factor"]
    torch.manual_seed(0)
    ds = DSMoE(dim, FeedForward(dim, hidden), num_experts=n_exp, ep_size=world, k=k, capacity_factor=cf,
               min_capacity=0, use_rts=False, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    groups = build_ep_groups(world, "cpu", hierarchical=cfg.get("hierarchical", "auto"))
    later_n = int(cfg["later_mb"] * 1e6 / 4)
    later_grad = torch.randn(later_n)
    reduced_bytes = 4 * (later_n + dim * n_exp)  # the later layers' gradients and the gate's
    holders = {"deepspeed": nn.ModuleDict({"moe": ds})}
    reducers = {}
    for name in VARIANTS[1:]:
        mcfg = MoEConfig(every=1, n_experts=n_exp, top_k=k, capacity_factor=cf, router="gshard", chunks=CHUNKS[name],
                         tune_calls=cfg["tune_calls"])
        holder = nn.ModuleDict({"moe": MoE(dim, hidden, mcfg)})
        expert_names = apply_expert_parallel(holder, groups.mesh, groups)
        holder.later = nn.Parameter(torch.zeros(later_n))
        if name == "auto":
            reducers[name] = attach_grad_reducer(holder, groups, expert_names)
        else:  # the model must choose d knowing what gradient there is to reduce
            holder["moe"].scheduler.grad_bytes_per_layer = reduced_bytes
        holders[name] = holder
    holders["deepspeed"].later = nn.Parameter(torch.zeros(later_n))
    dp = groups.dp

    def step(name, x):
        holder = holders[name]
        holder.zero_grad(set_to_none=True)
        reducer = reducers.get(name)
        if reducer is not None:
            reducer.arm()
        x = x.detach().requires_grad_()
        if name == "deepspeed":
            y, aux, _ = holder["moe"](x)
        else:
            y, aux = holder["moe"](x), holder["moe"].aux_loss
        y = LaterLayers.apply(y, holder.later, later_grad)
        (y.float().square().mean() + aux).backward()
        t0 = time.perf_counter()
        if reducer is not None:
            reducer.finish()
            return time.perf_counter() - t0
        # After the backward: one flat all-reduce of the non-expert gradients (the gate's and
        # the later layers'); experts need none (EP over every rank: one holder per expert).
        grads = [p.grad for n, p in holder.named_parameters() if p.grad is not None and "experts" not in n]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=dp)
        return time.perf_counter() - t0

    torch.manual_seed(1 + rank)
    x = torch.randn(cfg["batch"], cfg["seq"], dim)
    times = {v: [] for v in VARIANTS}
    core = {v: [] for v in VARIANTS[1:]}  # what the model times: exchanges, experts, gradient reduction

    def call(name, timed: bool):
        dist.barrier()
        t0 = time.perf_counter()
        reduce_s = step(name, x)
        dt = torch.tensor([time.perf_counter() - t0, 0.0])
        if name != "deepspeed":
            dt[1] = holders[name]["moe"].scheduler.last_call_s("moe") + reduce_s
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        if timed:
            times[name].append(dt[0].item())
            if name != "deepspeed":
                core[name].append(dt[1].item())

    n = len(VARIANTS)
    for r in range(cfg["warmup"]):
        for name in VARIANTS:
            call(name, timed=False)
    # auto's timed calls (tune_calls per candidate) happen here, one layer call per step as
    # in a model with one MoE layer; the other variants have nothing left to warm up.
    while names := [v for v in ("auto", "auto_after") if holders[v]["moe"].scheduler.tuning()]:
        for name in names:
            call(name, timed=False)
    for r in range(cfg["rounds"]):
        # Rotate the order every round so no variant always runs right after another.
        for name in VARIANTS[r % n:] + VARIANTS[:r % n]:
            call(name, timed=True)
    # The d that auto chose, and the model's prediction of every variant from the profile
    # measured on these groups (the same numbers for every d).
    sched = holders["auto"]["moe"].scheduler
    rep = sched.report()["moe"]
    (trial,) = sched.trials.values()
    if rank == 0:
        capacity_rows = cfg["batch"] * capacity(holders["auto"]["moe"].cfg, cfg["seq"])
        Path(out_path).write_text(json.dumps({
            "times": times, "auto_d": rep["d"], "rows": rep["rows"], "fill": rep["rows"] / capacity_rows,
            "auto_after_d": holders["auto_after"]["moe"].scheduler.report()["moe"]["d"],
            "tuned_ms": trial.measured_ms, "profile": dataclasses.replace(sched.profile, overlap=sched.measured_overlap).to_dict(),
            "calibrated_overlap": sched.profile.overlap, "hierarchical": groups.hierarchical, "core": core,
            "shape": {"n_experts": n_exp, "slots": rep["rows"], "dim": dim, "hidden": hidden, "ep": world,
                      "elt_bytes": 4, "grad_bytes": reduced_bytes}}))
    for name, h in holders.items():
        if name != "deepspeed":
            h["moe"].scheduler.close()
    dist_utils.shutdown()


def _spawned(rank: int, world: int, port: int, cfg: dict, out_path: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    worker(cfg, out_path)


def run_loopback(world: int, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(_spawned, args=(world, free_port(), cfg, str(out)), nprocs=world)
        return json.loads(out.read_text())


def run_testbed(cfg: dict, hosts: int, per_host: int, rate_mbit: float, cpu_per_rank: float = 0.0,
                period_ms: float = 2.0) -> dict:
    """The variants on ``hosts`` emulated hosts, ``per_host`` ranks each, every pair of hosts
    linked at ``rate_mbit``; ranks numbered host by host; each host capped at ``cpu_per_rank``
    cores per rank over a ``period_ms`` quota period (0 = uncapped)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import cluster

    with cluster.Testbed(hosts) as tb:
        if cpu_per_rank:
            for h in range(hosts):
                tb.slow_cpu(h, cpu_per_rank * per_host, period_ms=period_ms)
        if hosts > 1:
            tb.link(list(range(hosts)), list(range(hosts)), rate_mbit=rate_mbit)
        link_mb_s = tb.measure(0, hosts - 1, 8) if hosts > 1 else None
        out = tb.shared / "result.json"
        world, procs = hosts * per_host, []
        for h in range(hosts):
            for local in range(per_host):
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                           RANK=str(h * per_host + local), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                           LOCAL_WORLD_SIZE=str(per_host), MASTER_ADDR=tb.head.name, MASTER_PORT="29511",
                           GLOO_SOCKET_IFNAME=cluster.IFACE)
                procs.append(tb.popen(h, [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg), str(out)],
                                      env=env, log=tb.log(h, f"moe-rank{h * per_host + local}")))
        rcs = [p.wait(timeout=3600) for p in procs]
        if any(rcs):
            logs = "\n".join(tb.log(h, f"moe-rank{h * per_host}").read_text()[-3000:] for h in range(hosts))
            raise RuntimeError(f"benchmark ranks exited {rcs}:\n{logs}")
        raw = json.loads(out.read_text())
        raw["link_mb_s"] = link_mb_s
        return raw


def spread(ts: list[float]) -> dict:
    ms = [1e3 * t for t in ts]
    q = statistics.quantiles(ms, n=4)
    return {"median": statistics.median(ms), "iqr": q[2] - q[0], "min": min(ms)}


def summarize(raw: dict) -> dict:
    """Measured medians and spreads; the model's prediction of each Kintsugi variant, from the
    profile the job measured and from that profile with the overlap auto's timed calls
    calibrated (fixed d: that d; auto: the d it settled on).

    The model times what the schedule changes: exchanges, expert compute and the gradient
    reduction (``core``, measured by the scheduler around that part, plus the reduction).
    The layer's routing and ordering (and their backward) are the same for every d; they are
    measured once, at d = 1, as the median of step - core, and added to every prediction
    (``modelled_ms``), so that it compares with the measured step."""
    prof, shape = Profile.from_dict(raw["profile"]), LayerShape(**raw["shape"])
    calibrated = dataclasses.replace(prof, overlap=raw["calibrated_overlap"])
    outside = statistics.median(1e3 * (t - c) for t, c in zip(raw["times"]["d1"], raw["core"]["d1"]))

    def predictions(p: Profile) -> dict:
        out = {f"d{d}": simulate(shape, p, d, partition=False) for d in (1, 2, 4)}
        out["auto"] = simulate(shape, p, raw["auto_d"])
        out["auto_after"] = simulate(shape, p, raw["auto_after_d"], partition=False)
        return out

    pick = choose(shape, prof)  # the model alone, before auto's timed calls
    row = {"auto_d": raw["auto_d"], "auto_after_d": raw["auto_after_d"], "modelled_auto_d": pick.d,
           "modelled_auto_ms": 1e3 * pick.predicted_s + outside,
           "tuned_ms": raw["tuned_ms"], "calibrated_overlap": raw["calibrated_overlap"], "fill": raw["fill"],
           "hierarchical": raw["hierarchical"], "link_mb_s": raw.get("link_mb_s"), "profile": raw["profile"],
           "outside_ms": outside}
    for v in VARIANTS:
        row[v] = spread(raw["times"][v])
    for suffix, p in (("", prof), ("_calibrated", calibrated)):
        for v, sched in predictions(p).items():
            row[v]["core_ms"] = spread(raw["core"][v])["median"]
            row[v][f"modelled_core_ms{suffix}"] = 1e3 * sched.predicted_s
            row[v][f"modelled_ms{suffix}"] = row[v][f"modelled_core_ms{suffix}"] + outside
            row[v][f"model_error{suffix}"] = row[v][f"modelled_ms{suffix}"] / row[v]["median"] - 1
    return row


# Layer configurations for the model: hidden size M, FFN size 4M, tokens per GPU T, experts
# per GPU, top-2, capacity factor 1.2 (the ranges of FSMoE's layer sweep and GPT/Mixtral-like
# layers), on 4 nodes x 8 GPUs with EP over all 32 GPUs.
MODEL_CONFIGS = [
    {"dim": m, "tokens": t, "experts_per_gpu": e}
    for m in (1024, 2048, 4096) for t in (2048, 4096, 8192) for e in (1, 2)
]


def modelled(gpus_per_node=8, nodes=4) -> tuple[list, float, float]:
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


def print_measured(title: str, row: dict):
    print(f"\n{title}")
    print(f"{'variant':>11} | {'median ms':>9} | {'IQR ms':>7} | {'min ms':>7} | vs DeepSpeed | {'core ms':>7} | "
          f"{'model ms':>8} | model error | calibrated ms | calibrated error")
    for v in VARIANTS:
        r = row[v]
        model = (f"{r['core_ms']:7.1f} | {r['modelled_ms']:8.1f} | {100 * r['model_error']:+10.0f}% | "
                 f"{r['modelled_ms_calibrated']:13.1f} | {100 * r['model_error_calibrated']:+.0f}%" if "modelled_ms" in r else "")
        print(f"{v:>11} | {r['median']:9.1f} | {r['iqr']:7.1f} | {r['min']:7.1f} | "
              f"{row['deepspeed']['median'] / r['median']:11.2f}x | {model}")
    tuned = ", ".join(f"d={d}: {ms:.1f}" for d, ms in row["tuned_ms"].items())
    print(f"auto settled on d={row['auto_d']} from its timed calls ({tuned} ms; auto_after: d={row['auto_after_d']}); "
          f"the model alone on the measured profile: d={row['modelled_auto_d']}; overlap measured "
          f"{row['profile']['overlap']:.2f}, calibrated {row['calibrated_overlap']:.2f}; routing and ordering outside the "
          f"model {row['outside_ms']:.1f} ms (measured at d=1); exchanged rows / capacity {row['fill']:.2f}"
          + (f"; link {row['link_mb_s']:.1f} MB/s (measured)" if row.get("link_mb_s") else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--testbed", action="store_true", help="measure on emulated hosts with shaped links (tests/cluster.py)")
    ap.add_argument("--hosts", type=int, nargs="+", default=[2, 4], help="testbed: host counts to measure (1 rank each)")
    ap.add_argument("--rate-mbit", type=float, default=500.0, help="testbed: every link between hosts (Mbit/s)")
    ap.add_argument("--cpu-per-rank", type=float, default=0.4,
                    help="testbed: each host's CPU quota in cores per rank (a device of its own that computes at one "
                         "speed, as a GPU does, and idles while its rank waits for the wire; 0 = uncapped). "
                         "4 ranks x 0.4 leave the box's 2 cores room for the links' shaping and the rest, which run "
                         "outside the quotas; at 0.5 they took all of it and a rank got less than its quota")
    ap.add_argument("--cpu-period-ms", type=float, default=2.0,
                    help="testbed: the quota's period (short: a burst after a wait is slowed alike)")
    ap.add_argument("--hierarchical", action="store_true", help="testbed: also 2 hosts x 2 ranks, flat vs hierarchical")
    ap.add_argument("--quick", action="store_true", help="small layer, few rounds (smoke run)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="loopback: rank counts")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--worker", nargs=2, metavar=("CFG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return None
    cfg = {"dim": 256, "hidden": 512, "experts_per_rank": 2, "k": 2, "capacity_factor": 1.25, "batch": 8, "seq": 128,
           "later_mb": 2.0, "tune_calls": MoEConfig.tune_calls, "rounds": args.rounds or 15, "warmup": 2}
    if args.quick:
        cfg.update(dim=64, hidden=128, batch=2, seq=64, later_mb=0.25, tune_calls=1, rounds=args.rounds or 4)
    shape_line = (f"dim={cfg['dim']} hidden={cfg['hidden']} experts={cfg['experts_per_rank']}/rank k={cfg['k']} "
                  f"cf={cfg['capacity_factor']} tokens/rank={cfg['batch'] * cfg['seq']} later gradients {cfg['later_mb']} MB; "
                  f"{cfg['rounds']} interleaved rounds")
    measured = {}
    if args.testbed:
        cap = (args.cpu_per_rank, args.cpu_period_ms)
        cpu_line = (f"{args.cpu_per_rank:g} core per rank over a {args.cpu_period_ms:g} ms quota period"
                    if args.cpu_per_rank else "CPU uncapped")
        for hosts in args.hosts:
            measured[f"{hosts}x1"] = summarize(run_testbed(cfg, hosts, 1, args.rate_mbit, *cap))
            print_measured(f"MEASURED on the testbed: {hosts} hosts x 1 rank, links {args.rate_mbit:g} Mbit/s, {cpu_line}; "
                           f"{shape_line}", measured[f"{hosts}x1"])
        if args.hierarchical:
            for mode in ("off", "on"):
                key = f"2x2 hierarchical={mode}"
                measured[key] = summarize(run_testbed({**cfg, "hierarchical": mode}, 2, 2, args.rate_mbit, *cap))
                print_measured(f"MEASURED on the testbed: 2 hosts x 2 ranks, hierarchical {mode}, links {args.rate_mbit:g} "
                               f"Mbit/s, {cpu_line}; {shape_line}", measured[key])
    else:
        for w in args.ranks:
            measured[f"loopback {w}"] = summarize(run_loopback(w, cfg))
            print_measured(f"MEASURED on loopback (one host, {w} ranks on the same cores); {shape_line}", measured[f"loopback {w}"])
    rows, geo, geo_chunking = modelled()
    print("\nMODELLED (performance model, assumed 4 nodes x 8 GPUs, NVLink intra, 200 Gb/s inter; not measured): "
          "sequential (d=1, gradients after backward) vs chosen schedule")
    print(f"{'M':>5} {'tokens/GPU':>10} {'experts/GPU':>11} | {'sequential ms':>13} | {'auto ms':>8} | {'d':>3} | "
          f"speedup | chunking only")
    for r in rows:
        print(f"{r['dim']:>5} {r['tokens']:>10} {r['experts_per_gpu']:>11} | {r['sequential_ms']:13.2f} | "
              f"{r['auto_ms']:8.2f} | {r['d']:>3} | {r['speedup']:7.2f} | {r['speedup_chunking_only']:.2f}")
    print(f"geometric-mean modelled speedup: {geo:.2f} (chunking alone, gradients still after the backward: {geo_chunking:.2f})")
    head = measured[next(iter(measured))]
    result = {"measured": {"deepspeed_ms": head["deepspeed"]["median"], "d1_ms": head["d1"]["median"],
                           "auto_ms": head["auto"]["median"], "auto_d": head["auto_d"]},
              "modelled": {"auto_ms": head["modelled_auto_ms"], "auto_d": head["modelled_auto_d"],
                           "auto_ms_calibrated": head["auto"]["modelled_ms_calibrated"]},
              "details": {"config": cfg, "rate_mbit": args.rate_mbit if args.testbed else None,
                          "cpu_per_rank": args.cpu_per_rank if args.testbed else None,
                          "cpu_period_ms": args.cpu_period_ms if args.testbed else None, "runs": measured,
                          "gpu_cluster": {"rows": rows, "speedup": geo, "speedup_chunking_only": geo_chunking,
                                          "profile": gpu_cluster_profile().to_dict()}}}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
