"""How much does a checkpoint cost the training loop? Six ways of saving the same model and
AdamW state, side by side on this machine, each in its own process (so peak RSS is its own):

  torch_save        torch.save of the state dict (synchronous)
  dcp_save          torch.distributed.checkpoint.save (synchronous)
  dcp_async         dcp.async_save with its defaults
  dcp_async_pinned  dcp.async_save with a reused DefaultStager (pinned host buffers on CUDA;
                    on CPU pinned memory does not exist, so the stager reuses plain buffers)
  deepspeed         DeepSpeed ZeRO-2 engine.save_checkpoint
  kintsugi          checkpoint.Checkpointer: lazy copy into the node keeper, L1 write by the keeper

Per method: the stall of the training loop per save (median of >= 10 saves: the time inside
the save call plus what the next step took beyond the median step without saving), step-time
overhead when saving every step and every 10 steps, seconds until the save is durable on
disk (L1 for Kintsugi), checkpoint bytes per second until durable, and peak RSS (for
Kintsugi plus the keeper's). The raw write+fsync bandwidth of the same directory is measured
first, with the same number of bytes, buffered and with O_DIRECT; the faster is the
reference.

    python benchmarks/checkpoint_bench.py --json runs/bench/checkpoint.json            # ~100M and ~500M params
    python benchmarks/checkpoint_bench.py --quick --json runs/bench/checkpoint.json    # ~10M, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["torch_save", "dcp_save", "dcp_async", "dcp_async_pinned", "deepspeed", "kintsugi"]
WIDTH = 2048  # Linear(2048, 2048) layers: 4.2M parameters each


# ----------------------------------------------------------------------------- one method, in its own process

def build(n_params: int, width: int, batch: int):
    import torch
    torch.manual_seed(0)
    layers = max(1, round(n_params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model, torch.randn(batch, width)


def measure(method: str, n_params: int, width: int, batch: int, saves: int, out_dir: Path, threads: int) -> dict:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo")
    model, x = build(n_params, width, batch)
    if method == "deepspeed":
        import deepspeed
        cfg = {"train_batch_size": batch, "zero_optimization": {"stage": 2}, "steps_per_print": 10**9}
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                                 config=cfg)

        def step():
            engine.backward(engine(x).pow(2).mean())
            engine.step()
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    for _ in range(2):
        step()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    base = statistics.median(times)

    def state_dict():
        return {"model": model.state_dict(), "optim": opt.state_dict()}

    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # weights + AdamW's two moments
    pending = []  # what an async method still owes (waited for before its next save)
    ck = None
    if method == "kintsugi":
        from checkpoint import CheckpointConfig, Checkpointer, flatten
        from checkpoint.keeper import messages
        cfg = CheckpointConfig(interval=1, dir=str(out_dir / "l2"), l2_interval=10**6, l1_dir=str(out_dir / "l1"),
                               l1_keep_last=1, host_memory_mb=3 * (nbytes >> 20) + 256)
        ck = Checkpointer(cfg, out_dir)
        ck.attach(opt)

    stager = None
    if method == "dcp_async_pinned":
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        stager = DefaultStager(StagingOptions(use_pinned_memory=torch.cuda.is_available(), use_shared_memory=False,
                                              use_async_staging=True, use_non_blocking_copy=torch.cuda.is_available()))

    def save(i: int):
        import torch.distributed.checkpoint as dcp
        path = out_dir / f"s{i}"
        if method == "torch_save":
            torch.save(state_dict(), path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        elif method == "dcp_save":
            dcp.save(state_dict(), checkpoint_id=str(path))
        elif method in ("dcp_async", "dcp_async_pinned"):
            wait_durable()
            kw = {"async_stager": stager} if stager else {}
            pending.append(dcp.async_save(state_dict(), checkpoint_id=str(path), **kw))
        elif method == "deepspeed":
            engine.save_checkpoint(str(out_dir), tag=f"s{i}")
        else:
            ck.save(i, flatten({"model": model.state_dict(), "optim": opt.state_dict()["state"]}))

    def wait_durable():
        if ck is not None:
            while ck.pending:
                ck.check()
                time.sleep(0.002)
        while pending:
            f = pending.pop()
            (f.upload_completion if hasattr(f, "upload_completion") else f).result()

    def clean():
        for p in out_dir.glob("s*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    stalls, durables = [], []
    for i in range(1, saves + 1):
        step()
        t0 = time.perf_counter()
        save(i)
        t1 = time.perf_counter()
        step()
        t2 = time.perf_counter()
        wait_durable()
        durables.append(time.perf_counter() - t0)
        stalls.append((t1 - t0) + max(0.0, (t2 - t1) - base))
        clean()

    def overhead(every: int, steps: int) -> float:
        """Time of ``steps`` steps saving every ``every`` (until the last is durable) over
        the same number of steps right before without saving (the machine may be shared)."""
        t = time.perf_counter()
        for _ in range(steps):
            step()
        plain = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(1, steps + 1):
            step()
            if i % every == 0:
                save(1000 + i)
        wait_durable()
        clean()
        return 100 * ((time.perf_counter() - t) / plain - 1)

    every_step = overhead(1, 5)
    every_10 = overhead(10, 10)
    result = {"stall_ms": 1e3 * statistics.median(stalls), "overhead_pct_every_step": every_step,
              "overhead_pct_every_10": every_10, "durable_s": statistics.median(durables),
              "write_gbps": nbytes / statistics.median(durables) / 1e9, "step_s": base, "bytes": nbytes,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if ck is not None:
        wrote, secs = ck.keeper.call(messages.Status(ck.gen)).written["l1"]
        result["keeper_write_gbps"] = wrote / secs / 1e9  # the keeper's own L1 write rate
        keeper_hwm = [line for line in Path(f"/proc/{ck.keeper.pid}/status").read_text().splitlines()
                      if line.startswith("VmHWM")]
        result["peak_rss_mb"] += int(keeper_hwm[0].split()[1]) / 1024
        ck.close()
    dist.destroy_process_group()
    return result


# ----------------------------------------------------------------------------- the driver

def raw_write_gbps(directory: Path, nbytes: int, direct: bool) -> float:
    """Large sequential writes of ``nbytes`` from page-aligned memory, then fsync: buffered, or
    with O_DIRECT (the keeper writes that way where the filesystem allows)."""
    import mmap
    directory.mkdir(parents=True, exist_ok=True)
    buf = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(16 << 20))
    view = memoryview(buf)
    path = directory / "raw.bin"
    t = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    left = nbytes - nbytes % 4096
    while left > 0:
        left -= os.write(fd, view[:min(left, len(view))])
    os.fsync(fd)
    os.close(fd)
    dt = time.perf_counter() - t
    path.unlink()
    return (nbytes - nbytes % 4096) / dt / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~10M params), for a smoke run")
    ap.add_argument("--params", type=float, nargs="*", help="model sizes in parameters (default 100e6 500e6)")
    ap.add_argument("--batch", type=int, default=64, help="rows per step: the forward/backward the lazy copy hides behind")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads of the training loop (default: every core; 1 leaves a core to the saver, "
                         "as a GPU node's idle host cores are)")
    ap.add_argument("--saves", type=int, default=10, help="saves per method for the medians (>= 10)")
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--dir", default="runs/bench/ckpt", help="where checkpoints are written (the disk under test)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    width = 1024 if a.quick else WIDTH
    sizes = a.params or ([10e6] if a.quick else [100e6, 500e6])
    if a.worker:
        print(json.dumps(measure(a.worker, int(sizes[0]), width, a.batch, a.saves, Path(a.dir), a.threads)))
        return 0
    out = Path(a.dir)
    results = {}
    for n in sizes:
        layers = max(1, round(n / (width * width)))
        nbytes = layers * (width * width + width) * 12
        # The disk's best: the faster of buffered and direct writes (medians of 3 each).
        raws = {mode: statistics.median(raw_write_gbps(out, nbytes, mode == "direct") for _ in range(3))
                for mode in ("buffered", "direct")}
        raw = max(raws.values())
        res = {"params": layers * (width * width + width), "raw_write_gbps": raw,
               "raw_buffered_gbps": raws["buffered"], "raw_direct_gbps": raws["direct"]}
        print(f"\n{res['params'] / 1e6:.0f}M params, {nbytes / 1e9:.2f} GB per checkpoint, raw write+fsync "
              f"{raw:.2f} GB/s (buffered {raws['buffered']:.2f}, O_DIRECT {raws['direct']:.2f})")
        print(f"{'method':18}{'stall ms':>10}{'ovh/step %':>12}{'ovh/10 %':>10}{'durable s':>11}{'GB/s':>7}"
              f"{'peak RSS MB':>13}")
        for i, m in enumerate(a.methods):
            d = out / m
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                   "BENCH_PORT": str(29533 + i)}
            p = subprocess.run([sys.executable, __file__, "--worker", m, "--params", str(n), "--saves", str(a.saves),
                                "--batch", str(a.batch), "--threads", str(a.threads), "--dir", str(d)] + (["--quick"] if a.quick else []),
                               env=env, capture_output=True, text=True, cwd=ROOT)
            shutil.rmtree(d, ignore_errors=True)
            if p.returncode != 0:
                print(f"{m:18} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
                res[m] = {"error": p.stderr[-2000:]}
                continue
            r = res[m] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"{m:18}{r['stall_ms']:10.1f}{r['overhead_pct_every_step']:12.1f}{r['overhead_pct_every_10']:10.1f}"
                  f"{r['durable_s']:11.2f}{r['write_gbps']:7.2f}{r['peak_rss_mb']:13.0f}", flush=True)
        k = res.get("kintsugi", {})
        if "stall_ms" in k:
            for other in ("torch_save", "dcp_async"):
                if "stall_ms" in res.get(other, {}):
                    print(f"kintsugi stall = 1/{res[other]['stall_ms'] / max(k['stall_ms'], 1e-9):.0f} of {other}")
            print(f"kintsugi keeper L1 write {k['keeper_write_gbps']:.2f} GB/s = "
                  f"{k['keeper_write_gbps'] / raw:.2f} x raw")
        results[f"{res['params'] / 1e6:.0f}M"] = res
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        # one object per method at the top level for the first (or only) size, all sizes under "sizes"
        first = next(iter(results.values()))
        Path(a.json).write_text(json.dumps({**first, "sizes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
