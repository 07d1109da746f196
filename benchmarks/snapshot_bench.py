"""In-memory erasure-coded snapshots: stall, copy speed, coding speed, recovery, survival.

    python benchmarks/snapshot_bench.py [--quick] [--params-m 100 500] [--json PATH]
    python benchmarks/snapshot_bench.py --testbed [--quick] [--json PATH]   # across emulated hosts

One run, side by side, for a model of --params-m million parameters with AdamW state:
- the training loop's stall per step when snapshotting every step into the node keeper
  (median step time with snapshots minus without), with the default capture (``auto``) and
  with ``capture = "lazy"``, vs a synchronous disk checkpoint's;
- the lazy-copy path's throughput into the keeper's shared memory vs plain memcpy of the
  same bytes;
- zfec encoding / rebuilding speed on one core (GB/s of snapshot bytes) for (k, m) groups;
- recovery time: from the keeper's memory, from L1 and from L2 (native format), and after a
  node loss (rebuild of the node's snapshot over TCP from two peers, then the memory path);
- survival probability of all snapshots for (n, k) settings, analytic and by fault
  injection (real decoding).
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from checkpoint import CheckpointConfig, Checkpointer, flatten, load_state, save_state
from checkpoint.erasure import GroupCode, NodeShares, inject_faults, plan_groups, rebuild_snapshot, survival
from checkpoint.lazy import LazyCopy, host_view
from checkpoint.keeper.peers import PeerClient, PeerServer


def add_testbed_args(p: argparse.ArgumentParser):
    """The testbed mode's flags (benchmarks/snapshot_testbed.py)."""
    t = p.add_argument_group("testbed mode: recovery and steady-state cost across emulated hosts (needs root)")
    t.add_argument("--testbed", action="store_true", help="run on the emulated cluster (tests/cluster.py) instead")
    t.add_argument("--nic-mbit", type=float, default=2000, help="the compute hosts' NICs, Mbit/s")
    t.add_argument("--filer-mbit", type=float, default=2000, help="the L2 file server's NIC, Mbit/s")
    t.add_argument("--dim", type=int, default=384, help="the steady-state job's model width")
    t.add_argument("--layers", type=int, default=6, help="the steady-state job's layers")
    t.add_argument("--job-steps", type=int, default=30, help="the steady-state job's steps (the first 5 not timed)")


def testbed_run(a) -> dict:
    import snapshot_testbed  # benchmarks/ is on sys.path when this file runs as a script

    return snapshot_testbed.run(a)


def write_json(path: Path | None, out: dict):
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1))


def median_time(fn, repeats: int, setup=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        setup()  # untimed
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


def training_state(params_m: float):
    """A stack of 1024x1024 linear layers with AdamW state (3 x 4 bytes per parameter)."""
    torch.manual_seed(0)
    width = 1024
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(max(1, round(params_m * 1e6 / width ** 2)))])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    names = {p: n for n, p in model.named_parameters()}
    state = flatten({"model": dict(model.named_parameters()), "optim": {names[p]: s for p, s in opt.state.items()}})

    def step():
        model(torch.randn(16, width)).square().mean().backward()
        opt.step()
        opt.zero_grad()

    return model, opt, state, step


def tensors(state: dict) -> list[torch.Tensor]:
    return [c.tensor for c in state.values() if hasattr(c, "tensor") and c.tensor.numel()]


def copy_speed(state: dict, repeats: int) -> tuple[float, float]:
    """GB/s of the lazy-copy path into shared memory, and of plain memcpy of the same bytes."""
    ts = tensors(state)
    nbytes = sum(t.numel() * t.element_size() for t in ts)
    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="kintsugi-bench-")
    try:
        os.ftruncate(fd, nbytes)
        shm = host_view(mmap.mmap(fd, nbytes))
        pairs, off = [], 0
        for t in ts:
            n = t.numel() * t.element_size()
            pairs.append((t, shm[off:off + n]))
            off += n
        lazy_s = median_time(lambda: LazyCopy(pairs, lambda crcs: None).join(), repeats)
    finally:
        os.close(fd)
        os.unlink(path)
    src = np.concatenate([t.detach().reshape(-1).view(torch.uint8).numpy() for t in ts])
    dst = np.empty_like(src)
    memcpy_s = median_time(lambda: np.copyto(dst, src), repeats)
    return nbytes / lazy_s / 1e9, nbytes / memcpy_s / 1e9


def peak_pss_mb(pids: list[int]) -> float:
    """PSS of these processes (shared memory mapped by several counts once), MB."""
    total = 0
    for pid in pids:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        total += sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))
    return total / 1024


def evict(root: Path):
    """Drop a level's files from the page cache, as after a node restart: a disk level is
    then read from the disk, not from memory."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def snapshot_stalls(ckpt: Checkpointer, step, state: dict, steps: int) -> tuple[list[float], list[dict]]:
    """Per round, the extra seconds per step of snapshotting every step; each snapshot's parts.

    Interleaved rounds: ``block`` steps snapshotting every step (the last snapshot's copy
    runs in the step after the block, which counts to it), then as many steps without.
    This machine's step time jumps between two levels ~1.7x apart every few steps, with
    nothing else running: a baseline taken once, before, would drift."""
    block, extra, parts, i = 3, [], [], 0
    for _ in range(2):  # the first two snapshots map fresh keeper memory: not timed
        step()
        i += 1
        ckpt.save(i, state)
        ckpt.check()
    for _ in range(max(1, steps // block)):
        t = time.perf_counter()
        for _ in range(block):
            step()
            i += 1
            parts.append(ckpt.save(i, state).parts)
            ckpt.check()
        step()
        snap = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(block + 1):
            step()
        extra.append((snap - (time.perf_counter() - t)) / block)
    return extra, parts


def checkpoint_bench(params_m: float, steps: int, work: Path) -> tuple[dict, np.ndarray]:
    """Stalls and recovery times for one model, every level side by side, and the snapshot bytes."""
    model, opt, state, step = training_state(params_m)
    nbytes = sum(t.numel() * t.element_size() for t in tensors(state))
    for _ in range(2):
        step()  # warm up
    base = median_time(step, steps)
    disk = median_time(lambda: save_state(work / "sync", 0, state, keep_last=1), 3)
    copy_gbps, memcpy_gbps = copy_speed(state, 5)  # medians of 3 swung 0.67-1.33x

    def snapshotting(capture: str, run_dir: Path, keeper_timeout_s: float) -> Checkpointer:
        cfg = CheckpointConfig(interval=1, dir=str(run_dir / "l2"), l2_interval=1 << 30, l1_dir=str(run_dir / "l1"),
                               l1_interval=1 << 30, host_memory_mb=2 * (nbytes >> 20) + 64,
                               keeper_timeout_s=keeper_timeout_s, capture=capture)
        ckpt = Checkpointer(cfg, run_dir)
        ckpt.attach(opt)
        return ckpt

    # The default capture (``auto``) and the lazy one, one after the other in the same run;
    # the lazy one's keeper exits soon after it closes.
    lazy = snapshotting("lazy", work / "lazy", 2)
    extra_lazy, _ = snapshot_stalls(lazy, step, state, steps)
    lazy.close()
    ckpt = snapshotting("auto", work, 30)
    extra, parts = snapshot_stalls(ckpt, step, state, steps)
    pss = peak_pss_mb([os.getpid(), ckpt.keeper.pid])  # both snapshot slots are mapped and touched by now
    ckpt.save(ckpt.last_save + 1, state, final=True)  # to L1 and L2 as well
    while ckpt.pending:
        ckpt.check()
        time.sleep(0.01)
    expected = [t.clone() for t in tensors(state)]
    for t in tensors(state):
        t.data.zero_()
    recover_memory = median_time(lambda: ckpt.restore(state), 3)
    assert ckpt.restored_from == "l0" and all(torch.equal(a, b) for a, b in zip(tensors(state), expected))
    recover_l1 = median_time(lambda: load_state(work / "l1", state), 3, setup=lambda: evict(work / "l1"))
    recover_l2 = median_time(lambda: load_state(work / "l2", state), 3, setup=lambda: evict(work / "l2"))
    ckpt.close()
    snap = np.concatenate([t.detach().reshape(-1).view(torch.uint8).numpy() for t in expected])
    breakdown = {k[:-2]: 1e3 * statistics.median(p[k] for p in parts) for k in parts[0] if k.endswith("_s")}
    breakdown["faults"] = statistics.median(p["faults"] for p in parts)
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "state_mb": nbytes / 2 ** 20,
            "step_ms": base * 1e3, "snapshot_stall_ms": statistics.median(extra) * 1e3,
            "snapshot_stall_ms_rounds": [1e3 * e for e in extra],
            "snapshot_stall_ms_lazy": statistics.median(extra_lazy) * 1e3,
            "snapshot_stall_ms_lazy_rounds": [1e3 * e for e in extra_lazy],
            "breakdown_ms": breakdown, "peak_pss_mb": pss, "memcpy_ms": nbytes / memcpy_gbps / 1e6,
            "disk_stall_ms": disk * 1e3, "copy_gbps": copy_gbps, "memcpy_gbps": memcpy_gbps,
            "recover_memory_s": recover_memory, "recover_l1_s": recover_l1, "recover_l2_s": recover_l2}, snap


def ec_rebuild_time(snap: np.ndarray) -> float:
    """Seconds to rebuild a node's snapshot from two peers over TCP (k=2, m=1)."""
    code, token = GroupCode(2, 1), secrets.token_hex(16)
    rng = np.random.default_rng(1)
    nodes = [NodeShares("bench", 1, 0, 0, 0, code, snap)] + \
        [NodeShares("bench", 1, 0, p, p, code, rng.integers(0, 256, len(snap), dtype=np.uint8)) for p in (1, 2)]
    for node in nodes:
        node.encode(dict(enumerate(nodes)))
    servers = [PeerServer(n, token, host="127.0.0.1") for n in nodes[1:]]
    try:
        peers = {p: PeerClient(srv.address, token) for p, srv in zip((1, 2), servers)}
        out = bytearray(len(snap))
        rebuild = median_time(lambda: rebuild_snapshot(code, 1, 0, peers, out=out), 3)
        assert np.array_equal(np.frombuffer(out, dtype=np.uint8), snap)
    finally:
        for srv in servers:
            srv.close()
    return rebuild


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
    p.add_argument("--params-m", type=float, nargs="+", default=[100],
                   help="model sizes, millions of parameters (500 needs more than this 24 GiB machine)")
    p.add_argument("--steps", type=int, default=15,
                   help="timed snapshot steps, in rounds of 3 (each round against 3 steps without)")
    p.add_argument("--snapshot-mb", type=int, default=256, help="bytes per node snapshot for the coding speed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--p-fail", type=float, default=0.05, help="per-node loss probability per snapshot interval")
    p.add_argument("--trials", type=int, default=20000)
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads of the training loop (default: every core; 1 leaves a core to the "
                        "snapshot copy, as a GPU node's idle host cores are)")
    p.add_argument("--json", type=Path)
    add_testbed_args(p)
    a = p.parse_args(argv)
    if a.testbed:
        return write_json(a.json, testbed_run(a))
    torch.set_num_threads(a.threads)
    if a.quick:
        a.snapshot_mb, a.repeats, a.trials, a.params_m, a.steps = 8, 3, 2000, [4], 6

    runs = []
    for params_m in a.params_m:
        work = Path(tempfile.mkdtemp(prefix="kintsugi-snapshot-bench-"))
        try:
            run, snap = checkpoint_bench(params_m, a.steps, work)  # the model is freed here: the rebuild
            run["recover_ec_s"] = ec_rebuild_time(snap) + run["recover_memory_s"]  # holds 3 nodes' data
            del snap
            runs.append(run)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"snapshot every step vs disk checkpoint (median of {max(1, a.steps // 3)} interleaved rounds; recovery median of 3)")
    print(f"{'params':>7} {'state':>8} {'step':>8} {'snap stall':>10} {'disk stall':>10} {'copy':>6} {'memcpy':>6} "
          f"{'memory':>7} {'EC':>7} {'L1':>7} {'L2':>7}")
    for r in runs:
        print(f"{r['params_m']:>6.0f}M {r['state_mb']:>6.0f}MB {r['step_ms']:>6.0f}ms {r['snapshot_stall_ms']:>8.1f}ms "
              f"{r['disk_stall_ms']:>8.0f}ms {r['copy_gbps']:>6.2f} {r['memcpy_gbps']:>6.2f} {r['recover_memory_s']:>6.3f}s "
              f"{r['recover_ec_s']:>6.3f}s {r['recover_l1_s']:>6.3f}s {r['recover_l2_s']:>6.3f}s")
    for r in runs:
        print(f"{r['params_m']:>6.0f}M: stall {100 * r['snapshot_stall_ms'] / r['step_ms']:.0f}% of the step, "
              f"{r['snapshot_stall_ms'] / r['memcpy_ms']:.2f}x memcpy ({r['memcpy_ms']:.0f} ms), rounds "
              f"{' '.join(f'{v:.0f}' for v in r['snapshot_stall_ms_rounds'])} ms (capture lazy: "
              f"{100 * r['snapshot_stall_ms_lazy'] / r['step_ms']:.0f}%, rounds "
              f"{' '.join(f'{v:.0f}' for v in r['snapshot_stall_ms_lazy_rounds'])} ms); peak PSS "
              f"{r['peak_pss_mb']:.0f} MB = {r['peak_pss_mb'] / r['state_mb']:.2f}x the state; breakdown ms per snapshot: "
              + ", ".join(f"{k} {v:.0f}" for k, v in r["breakdown_ms"].items()) + f"; load {os.getloadavg()[0]:.1f}")

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
        main_run = {k: v for k, v in runs[0].items() if k not in ("params_m", "state_mb", "step_ms")}
        a.json.write_text(json.dumps({**main_run, "encode_gbps": speeds[0]["encode_gbps"],
                                      "decode_gbps": speeds[0]["decode_gbps"], "runs": runs, "coding": speeds,
                                      "survival": table}, indent=1))


if __name__ == "__main__":
    main()
