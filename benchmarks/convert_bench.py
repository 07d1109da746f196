"""DeepSpeed's ds_to_universal vs ``kintsugi ckpt convert --to deepspeed-universal``, side by side.

Both convert the same DeepSpeed ZeRO-2 checkpoint, saved by a real 4-rank DeepSpeed job
(CPU accelerator, gloo), to a DeepSpeed universal checkpoint. Each converter runs as its own
process tree; we sample it every 20 ms for wall time, peak RSS (summed over the tree, psutil)
and peak disk use of what it writes (``peak_extra_disk_mb``: the peak beyond the final
output, i.e. temporary files). Medians over ``--repeats`` runs, alternating the order.

``floor_s`` (same run, beside each repeat): reading the checkpoint's files once and writing
the same number of bytes once (16 MiB pieces, direct I/O where the filesystem allows, as
the converter writes; then fsync): what any conversion costs at least. ``breakdown_s``:
where Kintsugi's conversion spends its time: ``startup`` (a process that only starts the
interpreter and imports the CLI, torch included), then from one more run ``convert()``'s
parts (seconds summed over the workers: read, serialize, checksum, write_fsync, finish;
``convert`` is its wall time).

    python benchmarks/convert_bench.py --json runs/bench/convert.json      # ~1.1 GB checkpoint
    python benchmarks/convert_bench.py --quick                             # ~100 MB smoke run
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_job(rank: int, world: int, port: int, out: str, width: int, depth: int):
    """One optimizer step of a ``depth`` x Linear(width, width) model under ZeRO-2, then save."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
    cfg = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    loss = engine(torch.randn(1, width)).square().mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(out)


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def measure(cmd: list[str], out: Path, env: dict) -> dict:
    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_rss = peak_disk = 0
    while proc.poll() is None:
        peak_rss = max(peak_rss, tree_rss(proc))
        peak_disk = max(peak_disk, du(out))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2]} failed: {proc.stderr.read().decode()[-2000:]}")
    final = du(out)
    return {"wall_s": wall, "peak_rss_mb": peak_rss / 2**20, "peak_disk_mb": max(peak_disk, final) / 2**20,
            "peak_extra_disk_mb": max(0, peak_disk - final) / 2**20, "output_mb": final / 2**20}


def floor_s(src: Path, out: Path) -> float:
    """Read every file under ``src`` once, then write as many bytes to one file under ``out``
    once (16 MiB pieces from one page-aligned buffer; direct I/O where the filesystem allows,
    the tail buffered; fsync): seconds."""
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    buf = mmap.mmap(-1, 16 << 20)
    view = memoryview(buf)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "floor.bin"
    t = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    body = total - total % 4096
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:  # no direct I/O here (tmpfs): all buffered
            direct, body = fd, 0
        for lo in range(0, body, len(view)):
            os.pwrite(direct, view[:min(len(view), body - lo)], lo)
        if direct != fd:
            os.close(direct)
        for lo in range(body, total, len(view)):
            os.pwrite(fd, view[:min(len(view), total - lo)], lo)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    view.release()
    buf.close()
    return dt


def profile(ckpt: Path, dst: Path, workers: int):
    """--profile-worker: one conversion in this process, its parts timed (JSON)."""
    from checkpoint.convert.stream import convert
    plan = convert(ckpt, dst, "deepspeed-universal", workers=workers, progress=False)
    print(json.dumps(plan.seconds))


def startup_s(env: dict) -> float:
    """Seconds for a process that starts the interpreter and imports the CLI, then exits:
    what every ``kintsugi ckpt convert`` costs before converting (median of 3)."""
    times = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import checkpoint.cli"], env=env, cwd=ROOT, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~100 MB checkpoint, one run each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4, help="workers for both converters")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", type=Path, help="reuse/keep the DeepSpeed checkpoint here")
    ap.add_argument("--profile-worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.profile_worker:
        return profile(*a.profile_worker, a.workers)
    width, depth, repeats = (1024, 8, 1) if a.quick else (2048, 19, a.repeats)  # 8.4M / 79.7M parameters
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    work = Path(tempfile.mkdtemp(prefix="convert_bench_"))
    ckpt = a.keep or work / "ds"
    if not (ckpt / "latest").is_file():
        os.environ["DS_ACCELERATOR"] = "cpu"
        mp.start_processes(save_job, args=(4, free_port(), str(ckpt), width, depth), nprocs=4, start_method="spawn")
    tag = (ckpt / "latest").read_text().strip()
    size_mb = du(ckpt / tag) / 2**20
    runs = {"deepspeed": [], "kintsugi": []}
    floors = []
    for r in range(repeats):
        floors.append(floor_s(ckpt / tag, work / "floor"))
        for tool in (("deepspeed", "kintsugi") if r % 2 == 0 else ("kintsugi", "deepspeed")):
            box = work / f"{tool}_{r}"  # everything the converter writes lands in here
            box.mkdir()
            if tool == "deepspeed":
                cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt / tag),
                       "--output_folder", str(box / tag), "--inject_missing_state",
                       "--num_extract_workers", str(a.workers), "--num_merge_workers", str(max(1, a.workers // 2))]
            else:  # writes box/dst.partial/, renamed to box/dst/ when complete
                cmd = [sys.executable, "-m", "checkpoint", "convert", str(ckpt), str(box / "dst"),
                       "--to", "deepspeed-universal", "--workers", str(a.workers), "--quiet"]
            res = measure(cmd, box, env)
            shutil.rmtree(box, ignore_errors=True)
            runs[tool].append(res)
    result = {tool: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tool, rs in runs.items()}
    for tool, rs in runs.items():
        result[tool]["wall_s_range"] = [min(r["wall_s"] for r in rs), max(r["wall_s"] for r in rs)]
    result["floor_s"] = statistics.median(floors)
    result["floor_s_range"] = [min(floors), max(floors)]
    p = subprocess.run([sys.executable, __file__, "--profile-worker", str(ckpt), str(work / "profile"),
                        "--workers", str(a.workers)], env=env, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"the profiling run failed: {p.stderr[-2000:]}")
    result["kintsugi"]["breakdown_s"] = {"startup": startup_s(env), **json.loads(p.stdout.strip().splitlines()[-1])}
    shutil.rmtree(work / "profile", ignore_errors=True)
    result["load"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    result["checkpoint_mb"] = size_mb
    result["params"] = width * (width + 1) * depth
    result["repeats"] = repeats
    ds, ks = result["deepspeed"], result["kintsugi"]
    print(f"DeepSpeed ZeRO-2 checkpoint, 4 ranks, {result['params'] / 1e6:.1f}M parameters, {size_mb:.0f} MB; "
          f"median of {repeats}")
    print(f"{'converter':12s} {'wall s':>8s} {'peak RSS MB':>12s} {'peak disk MB':>13s} {'extra disk MB':>14s}")
    for name, r in (("deepspeed", ds), ("kintsugi", ks)):
        print(f"{name:12s} {r['wall_s']:8.1f} {r['peak_rss_mb']:12.0f} {r['peak_disk_mb']:13.0f} {r['peak_extra_disk_mb']:14.0f}")
    print(f"{'ratio':12s} {ks['wall_s'] / ds['wall_s']:8.2f} {ks['peak_rss_mb'] / ds['peak_rss_mb']:12.2f}")
    print(f"floor (read + write the same bytes once) {result['floor_s']:.2f} s: kintsugi {ks['wall_s'] / result['floor_s']:.2f}x, "
          f"deepspeed {ds['wall_s'] / result['floor_s']:.2f}x; spread of {repeats}: kintsugi "
          f"{ks['wall_s_range'][0]:.1f}-{ks['wall_s_range'][1]:.1f} s, deepspeed {ds['wall_s_range'][0]:.1f}-"
          f"{ds['wall_s_range'][1]:.1f} s; load {result['load']}")
    print("kintsugi breakdown (s; parts summed over workers): " +
          ", ".join(f"{k} {v:.2f}" for k, v in ks["breakdown_s"].items()))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
