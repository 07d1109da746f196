"""Erasure-coded snapshots: zfec coding speed per core and survival probability.

    python benchmarks/snapshot_bench.py [--quick] [--json PATH]

Measures, in one run on one core: encoding a node's parity and rebuilding a lost node's
snapshot (GB/s of snapshot bytes, median of --repeats runs, with plain memcpy of the
same bytes as the baseline), for a group of n = k + m nodes held in this process; and the
probability that every node's snapshot survives, for (n, k) settings, computed
analytically and confirmed by the fault-injection loop (real decoding).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

from checkpoint.erasure import GroupCode, NodeShares, inject_faults, plan_groups, rebuild_snapshot, survival


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def coding_speed(k: int, m: int, nbytes: int, repeats: int) -> dict:
    """GB/s of one node's snapshot bytes: encoding its m parity shares, rebuilding it."""
    code = GroupCode(k, m)
    rng = np.random.default_rng(0)
    snaps = [rng.integers(0, 256, nbytes, dtype=np.uint8) for _ in range(code.n)]
    nodes = [NodeShares("bench", 0, 0, pos, pos, code, snaps[pos]) for pos in range(code.n)]
    readers = dict(enumerate(nodes))
    for node in nodes[1:]:
        node.encode(readers)
    encode_s = median_time(lambda: nodes[0].encode(readers), repeats)
    out = bytearray(nbytes)
    lost = set(range(m))  # node 0 and m - 1 others: decoding needs parity
    alive = {pos: r for pos, r in readers.items() if pos not in lost}
    decode_s = median_time(lambda: rebuild_snapshot(code, 0, 0, alive, out=out), repeats)
    assert out == snaps[0].tobytes()
    dst = np.empty_like(snaps[0])
    memcpy_s = median_time(lambda: np.copyto(dst, snaps[0]), repeats)
    return {"k": k, "m": m, "encode_gbps": nbytes / encode_s / 1e9, "decode_gbps": nbytes / decode_s / 1e9,
            "memcpy_gbps": nbytes / memcpy_s / 1e9}


def survival_table(num_nodes: int, p_fail: float, trials: int) -> list[dict]:
    rows = []
    for n, k in [(2, 1), (3, 2), (4, 3), (4, 2), (6, 4), (8, 6), (8, 5)]:
        groups = plan_groups(num_nodes, k, n - k)
        analytic = survival(groups, p_fail)
        injected = inject_faults(groups, p_fail, trials, seed=n * 31 + k)
        rows.append({"nodes": num_nodes, "n": n, "k": k, "m": n - k, "parity_overhead": (n - k) / k,
                     "p_node_fail": p_fail, "analytic": analytic, "injected": injected,
                     "stderr": math.sqrt(analytic * (1 - analytic) / trials), "trials": trials})
    none = (1 - p_fail) ** num_nodes  # no coding: every node must survive
    rows.append({"nodes": num_nodes, "n": 1, "k": 1, "m": 0, "parity_overhead": 0.0, "p_node_fail": p_fail,
                 "analytic": none, "injected": None, "stderr": None, "trials": 0})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, few trials (smoke run)")
    p.add_argument("--snapshot-mb", type=int, default=256, help="bytes per node snapshot for the coding speed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--p-fail", type=float, default=0.05, help="per-node loss probability per snapshot interval")
    p.add_argument("--trials", type=int, default=20000)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.quick:
        a.snapshot_mb, a.repeats, a.trials = 8, 3, 2000

    speeds = [coding_speed(k, m, a.snapshot_mb << 20, a.repeats) for k, m in [(3, 1), (6, 2)]]
    print(f"zfec coding, one core, {a.snapshot_mb} MiB snapshot per node (GB/s of snapshot bytes, median of {a.repeats})")
    print(f"{'k':>3} {'m':>3} {'encode':>8} {'rebuild':>8} {'memcpy':>8}")
    for s in speeds:
        print(f"{s['k']:>3} {s['m']:>3} {s['encode_gbps']:>8.3f} {s['decode_gbps']:>8.3f} {s['memcpy_gbps']:>8.2f}")

    table = survival_table(a.nodes, a.p_fail, a.trials)
    print(f"\nsurvival of all snapshots, {a.nodes} nodes, each lost with p={a.p_fail}")
    print(f"{'n':>3} {'k':>3} {'m':>3} {'parity':>7} {'analytic':>9} {'injected':>9} {'+-1sd':>7}")
    for r in table:
        inj = "-" if r["injected"] is None else f"{r['injected']:.4f}"
        sd = "-" if r["stderr"] is None else f"{r['stderr']:.4f}"
        print(f"{r['n']:>3} {r['k']:>3} {r['m']:>3} {r['parity_overhead']:>7.2f} {r['analytic']:>9.4f} {inj:>9} {sd:>7}")

    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        main_speed = speeds[0]
        a.json.write_text(json.dumps({"encode_gbps": main_speed["encode_gbps"], "decode_gbps": main_speed["decode_gbps"],
                                      "coding": speeds, "survival": table}, indent=1))


if __name__ == "__main__":
    main()
