"""How much does a checkpoint cost the training loop? Six ways of saving the same model and
AdamW state, side by side on this machine, each in its own process (so peak RSS is its own):

  torch_save        torch.save of the state dict (synchronous)
  dcp_save          torch.distributed.checkpoint.save (synchronous)
  dcp_async         dcp.async_save with its defaults
  dcp_async_pinned  dcp.async_save with a reused DefaultStager (pinned host buffers on CUDA;
                    on CPU pinned memory does not exist, so the stager reuses plain buffers)
  deepspeed         DeepSpeed ZeRO-2 engine.save_checkpoint
  kintsugi          checkpoint.Checkpointer with its defaults (``capture = "auto"``: on a CPU whose
                    cores the step fills, the copy into the node keeper at the save, on the
                    step's threads), L1 write by the keeper
  kintsugi_lazy     the same with ``capture = "lazy"``: the copy beside the next step
  kintsugi_one_copy the same as kintsugi with ``host_memory_mb`` for one snapshot, not two: each
                    save waits until the previous one is on L1, then overwrites it in memory

Per method: the stall of the training loop per save (median of the saves: the time inside
the save call plus what the next step took beyond the step right before the save: this
machine's step time jumps between two levels ~1.7x apart every few steps, with nothing else
running, so a baseline taken once drifts), step-time overhead when saving every step and
every 10 steps (median of interleaved rounds: a block of steps without saving, then the
same steps saving), seconds until the save is durable on
disk (L1 for Kintsugi), checkpoint bytes per second until durable, peak RSS and peak PSS
(proportional set size, sampled every second and around each wait for a save: shared
memory mapped by the trainer and the keeper counts once) of the process tree, Kintsugi's
keeper included, and ``breakdown_ms``: where one save's time goes (medians, ms per save;
see ``BREAKDOWN``).

References measured in the same run: the raw write+fsync bandwidth of the same directory
(the same number of bytes, buffered and with O_DIRECT; the faster counts), and ``memcpy_ms``:
one thread copying the checkpoint's bytes into a pre-faulted buffer (the floor of a host
copy), beside ``memcpy_fresh_ms`` into freshly mapped shared memory (the difference is the
cost of first-touch page faults, ``fault_us`` per 4 KiB page).

    python benchmarks/checkpoint_bench.py --json runs/bench/checkpoint.json            # ~100M params, torch.save and Kintsugi (minutes)
    python benchmarks/checkpoint_bench.py --methods torch_save dcp_async kintsugi --params 100e6 300e6   # more (half an hour)
    python benchmarks/checkpoint_bench.py --quick --json runs/bench/checkpoint.json    # ~10M, a smoke run
"""
from __future__ import annotations

import argparse
import itertools
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ["torch_save", "dcp_save", "dcp_async", "dcp_async_pinned", "deepspeed", "kintsugi", "kintsugi_lazy",
           "kintsugi_one_copy"]
# The default run (one size, these four) stays under 10 minutes; further methods and sizes
# take minutes each (times in docs/async.md), so they run on request (--methods, --params).
DEFAULT = ["torch_save", "kintsugi", "kintsugi_lazy", "kintsugi_one_copy"]
WIDTH = 2048  # Linear(2048, 2048) layers: 4.2M parameters each
# ms per save, medians over the saves. Every method: save_call (inside save), step_extra (the
# next step beyond the step before the save). Kintsugi also: sync (keeper status + gather at
# save), disk_wait (one copy: the previous save's L1 commit), alloc (the keeper's slot), eager (tensors copied at save), copy (CPU time of the lazy
# copy, all threads; copy_wall: its wall time, longer when the cores are busy with the step),
# copy_crc (CPU time of the CRC32 taken piece by piece during the copy), page_faults (first
# touches of shared memory: faults x fault_us, modelled), gil (the copier waiting between
# pieces), hook_wait (optimizer.step waiting for the copy), report (the keeper round trip at
# the copy's end), boundary (check() in the next step), keeper_crc (the keeper's CRC pass, for
# the tensors the copy could not checksum; 0 when it had none) and l1_write (the keeper's:
# off the training process, on the same cores here).
BREAKDOWN = ("save_call", "step_extra", "sync", "disk_wait", "alloc", "eager", "copy", "copy_wall", "copy_crc",
             "page_faults", "gil", "hook_wait", "report", "boundary", "keeper_crc", "l1_write")


def pss_kb(pid: int) -> int:
    """Proportional set size of a process (kB): shared pages count 1/n in each of n mappers."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:  # gone
        return 0
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Pss:"))


class PeakPss(threading.Thread):
    """Samples the PSS of a set of processes every ``period`` s and whenever ``sample()`` is
    called (before and after each wait for a save); ``peak_mb`` is the largest sum.

    Reading a process's PSS walks its page tables: ~14 ms of CPU for a 4 GB process here,
    so sampling the trainer and its keeper every 50 ms took half a core from the loop being
    measured (and the lazy copy beside it) on this 2-core box. Every second, plus the samples
    around each wait for a save (when the snapshot memory is full), cost ~3% of a core; the
    memory a save holds stays held for seconds (a slot until the next save, a staged copy
    until its upload ends), so it is not missed."""

    def __init__(self, pids, period: float = 1.0):
        super().__init__(daemon=True)
        self.pids, self.period, self.peak_kb = pids, period, 0
        self.stop = threading.Event()
        self.start()

    def run(self):
        while not self.stop.wait(self.period):
            self.sample()

    def sample(self):
        self.peak_kb = max(self.peak_kb, self.now_kb())

    def now_kb(self) -> int:
        return sum(map(pss_kb, set(self.pids())))  # a set: the keeper is a child of the trainer, and named too

    def peak_mb(self) -> float:
        self.stop.set()
        self.join()
        return max(self.peak_kb, self.now_kb()) / 1024


# ----------------------------------------------------------------------------- one method, in its own process

def build(n_params: int, width: int, batch: int):
    import torch
    torch.manual_seed(0)
    layers = max(1, round(n_params / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    return model, torch.randn(batch, width)


def measure(method: str, n_params: int, width: int, batch: int, saves: int, out_dir: Path, threads: int,
            rounds: int) -> dict:
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

    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())  # weights + AdamW's two moments
    ck = None
    if method.startswith("kintsugi"):
        from checkpoint import CheckpointConfig, Checkpointer, flatten
        from checkpoint.keeper import messages
        copies = 1 if method == "kintsugi_one_copy" else 2  # snapshots the keeper's memory holds
        cfg = CheckpointConfig(interval=1, dir=str(out_dir / "l2"), l2_interval=10**6, l1_dir=str(out_dir / "l1"),
                               l1_keep_last=1, host_memory_mb=copies * (nbytes >> 20) + 64,
                               capture="lazy" if method == "kintsugi_lazy" else "auto")
        ck = Checkpointer(cfg, out_dir)
        ck.attach(opt)
        train_step, boundary = step, []

        def step():  # a training loop's step: the optimizer step, then the boundary (collective)
            train_step()
            t = time.perf_counter()
            ck.check()
            boundary.append(time.perf_counter() - t)

    import psutil
    me = psutil.Process()
    sampler = PeakPss(lambda: [me.pid, *(c.pid for c in me.children(recursive=True)),
                               *([ck.keeper.pid] if ck is not None and ck.keeper is not None else [])])

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

    pending = []  # what an async method still owes (waited for before its next save)

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
            timings.append(ck.save(i, flatten({"model": model.state_dict(), "optim": opt.state_dict()["state"]})))

    def wait_durable():
        sampler.sample()  # what a save holds while it is on its way
        if ck is not None:
            while ck.pending:
                ck.check()
                time.sleep(0.002)
        while pending:
            f = pending.pop()
            (f.upload_completion if hasattr(f, "upload_completion") else f).result()
        sampler.sample()

    def clean():
        for p in out_dir.glob("s*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()

    stalls, durables, timings, parts = [], [], [], {k: [] for k in BREAKDOWN}
    last_crc_pass = None
    for i in range(1, saves + 1):
        t = time.perf_counter()
        step()
        t0 = time.perf_counter()
        save(i)
        t1 = time.perf_counter()
        boundary_before = len(boundary) if ck is not None else 0
        step()
        t2 = time.perf_counter()
        wait_durable()
        durables.append(time.perf_counter() - t0)
        extra = (t2 - t1) - (t0 - t)  # the step after the save beyond the step before it
        stalls.append((t1 - t0) + extra)
        parts["save_call"].append(t1 - t0)
        parts["step_extra"].append(extra)
        if ck is not None:
            p = timings[-1].parts
            for key in ("sync", "disk_wait", "alloc", "eager", "copy", "copy_wall", "gil", "hook_wait", "report"):
                parts[key].append(p[key + "_s"])
            parts["copy_crc"].append(p["crc_s"])
            parts["page_faults"].append(p["faults"])  # a count here: the driver makes it ms
            parts["boundary"].append(sum(boundary[boundary_before:]))
            written = ck.keeper.call(messages.Status(ck.gen)).written
            crc_pass = written.get("crc")  # the keeper's last CRC pass: this save's if it changed
            parts["keeper_crc"].append(crc_pass[1] if crc_pass is not None and crc_pass != last_crc_pass else 0.0)
            last_crc_pass = crc_pass
            parts["l1_write"].append(written["l1"][1])
        clean()
    numbers = itertools.count(saves + 1)  # a run's save steps only increase, as a training loop's do

    def overhead(every: int, steps: int, rounds: int) -> list[float]:
        """Per round: the time of ``steps`` steps saving every ``every`` (until the last save
        is durable) over the same number of steps right before without saving, in %. The
        saves come after the first step of each ``every``, so each save's background work
        meets the steps after it, as in a loop that goes on (a save after a round's last step
        would add its whole write to the round, which no loop that keeps training waits for)."""
        out = []
        for r in range(rounds):
            t = time.perf_counter()
            for _ in range(steps):
                step()
            plain = time.perf_counter() - t
            t = time.perf_counter()
            for i in range(1, steps + 1):
                step()
                if (i - 1) % every == 0:
                    save(next(numbers))
            wait_durable()
            out.append(100 * ((time.perf_counter() - t) / plain - 1))
            clean()
        return out

    every_step = overhead(1, 5, rounds)
    every_10 = overhead(10, 10, rounds)
    # The first saves map fresh keeper memory (allocated, then faulted in page by page):
    # every save's stall is kept (``stalls_ms``), the first apart, the median over all.
    result = {"stall_ms": 1e3 * statistics.median(stalls), "stall_ms_range": [1e3 * min(stalls), 1e3 * max(stalls)],
              "stalls_ms": [1e3 * v for v in stalls], "save_call_ms": [1e3 * v for v in parts["save_call"]],
              "first_stall_ms": 1e3 * stalls[0],
              "overhead_pct_every_step": statistics.median(every_step), "overhead_pct_every_step_rounds": every_step,
              "overhead_pct_every_10": statistics.median(every_10), "overhead_pct_every_10_rounds": every_10,
              "durable_s": statistics.median(durables),
              "write_gbps": nbytes / statistics.median(durables) / 1e9, "step_s": base, "bytes": nbytes,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_pss_mb": sampler.peak_mb(),
              "breakdown_ms": {k: (1 if k == "page_faults" else 1e3) * statistics.median(v)
                               for k, v in parts.items() if v}}
    if ck is not None:
        result["capture"] = timings[-1].capture
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


def memcpy_ms(nbytes: int, repeats: int = 5) -> tuple[float, float]:
    """One thread copying ``nbytes`` (8 MiB pieces, as the lazy copy does) into a pre-faulted
    buffer, and into freshly mapped shared memory (every 4 KiB page faulted on first touch):
    medians, ms."""
    import numpy as np
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    piece = 8 << 20

    def copy(dst) -> float:
        t = time.perf_counter()
        for lo in range(0, nbytes, piece):
            np.copyto(dst[lo:lo + piece], src[lo:lo + piece])
        return 1e3 * (time.perf_counter() - t)

    warm = np.ones(nbytes, dtype=np.uint8)
    hot = statistics.median(copy(warm) for _ in range(repeats))
    del warm
    fresh = []
    for _ in range(3):
        path = f"/dev/shm/kintsugi-bench-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, nbytes)  # as the keeper reserves its slots
            mm = mmap.mmap(fd, nbytes)
            dst = np.frombuffer(mm, dtype=np.uint8)
            fresh.append(copy(dst))
            del dst
            mm.close()
        finally:
            os.close(fd)
            os.unlink(path)
    return hot, statistics.median(fresh)


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (~10M params), for a smoke run")
    ap.add_argument("--params", type=float, nargs="*", help="model sizes in parameters (default 100e6)")
    ap.add_argument("--batch", type=int, default=64, help="rows per step: the forward/backward the lazy copy hides behind")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="torch threads of the training loop (default: every core; 1 leaves a core to the saver, "
                         "as a GPU node's idle host cores are)")
    ap.add_argument("--saves", type=int, default=9,
                    help="saves per method for the stall's median (the step after a save is compared with the one "
                         "before it, and this machine's step time alone swings by a few hundred ms)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method for the overheads' medians")
    ap.add_argument("--methods", nargs="*", choices=METHODS,
                    help="methods to run (default: torch_save and the three kintsugi ones, so that the default run stays under "
                         "10 minutes here)")
    ap.add_argument("--dir", default="runs/bench/ckpt", help="where checkpoints are written (the disk under test)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    width = 1024 if a.quick else WIDTH
    sizes = a.params or ([10e6] if a.quick else [100e6])
    if a.worker:
        print(json.dumps(measure(a.worker, int(sizes[0]), width, a.batch, a.saves, Path(a.dir), a.threads, a.rounds)))
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
        hot, fresh = memcpy_ms(nbytes)
        res = {"params": layers * (width * width + width), "raw_write_gbps": raw,
               "raw_buffered_gbps": raws["buffered"], "raw_direct_gbps": raws["direct"], "memcpy_ms": hot,
               "memcpy_fresh_ms": fresh, "fault_us": max(0.0, fresh - hot) * 1e3 / (nbytes / 4096),
               "load_before": load()}
        print(f"\n{res['params'] / 1e6:.0f}M params, {nbytes / 1e9:.2f} GB per checkpoint, raw write+fsync "
              f"{raw:.2f} GB/s (buffered {raws['buffered']:.2f}, O_DIRECT {raws['direct']:.2f}); memcpy {hot:.0f} ms "
              f"(into fresh shared memory {fresh:.0f} ms: {res['fault_us']:.2f} us per page fault); load {load()}")
        print(f"{'method':18}{'stall ms':>10}{'x memcpy':>9}{'ovh/step %':>12}{'ovh/10 %':>10}{'durable s':>11}"
              f"{'GB/s':>7}{'peak RSS MB':>13}{'peak PSS MB':>13}{'x ckpt':>8}")
        methods = a.methods or DEFAULT
        for i, m in enumerate(methods):
            d = out / m
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
                   "BENCH_PORT": str(29533 + i)}
            began = time.perf_counter()
            p = subprocess.run([sys.executable, __file__, "--worker", m, "--params", str(n), "--saves", str(a.saves),
                                "--rounds", str(a.rounds),
                                "--batch", str(a.batch), "--threads", str(a.threads), "--dir", str(d)] + (["--quick"] if a.quick else []),
                               env=env, capture_output=True, text=True, cwd=ROOT)
            shutil.rmtree(d, ignore_errors=True)
            if p.returncode != 0:
                print(f"{m:18} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
                res[m] = {"error": p.stderr[-2000:]}
                continue
            r = res[m] = json.loads(p.stdout.strip().splitlines()[-1])
            r["elapsed_s"] = time.perf_counter() - began
            b = r["breakdown_ms"]
            if "page_faults" in b:  # a count from the worker: ms at this run's cost per fault (modelled)
                b["page_faults"] *= res["fault_us"] / 1e3
            print(f"{m:18}{r['stall_ms']:10.1f}{r['stall_ms'] / hot:9.2f}{r['overhead_pct_every_step']:12.1f}"
                  f"{r['overhead_pct_every_10']:10.1f}{r['durable_s']:11.2f}{r['write_gbps']:7.2f}"
                  f"{r['peak_rss_mb']:13.0f}{r['peak_pss_mb']:13.0f}{r['peak_pss_mb'] * 2**20 / nbytes:8.2f}", flush=True)
            print(f"{'':18}breakdown ms: " + ", ".join(f"{k} {b[k]:.0f}" for k in BREAKDOWN if k in b), flush=True)
            print(f"{'':18}spread: stall per save {' '.join(f'{v:.0f}' for v in r['stalls_ms'])} ms (save call "
                  f"{' '.join(f'{v:.0f}' for v in r['save_call_ms'])}), overhead % per "
                  f"round every step {' '.join(f'{v:.0f}' for v in r['overhead_pct_every_step_rounds'])}, every 10 "
                  f"{' '.join(f'{v:.0f}' for v in r['overhead_pct_every_10_rounds'])}", flush=True)
        res["load_after"] = load()
        print(f"load (1, 5, 15 min) before {res['load_before']}, after {res['load_after']}")
        k = res.get("kintsugi", {})
        if "stall_ms" in k:
            for other in ("torch_save", "dcp_async"):
                if "stall_ms" in res.get(other, {}):
                    print(f"kintsugi stall = 1/{res[other]['stall_ms'] / max(k['stall_ms'], 1e-9):.0f} of {other}")
            print(f"kintsugi keeper L1 write {k['keeper_write_gbps']:.2f} GB/s = "
                  f"{k['keeper_write_gbps'] / raw:.2f} x raw")
            lazy = res.get("kintsugi_lazy", {})
            if "stall_ms" in lazy:
                print(f"kintsugi capture {k['capture']}: stall {k['stall_ms']:.0f} ms, lazy {lazy['stall_ms']:.0f} ms "
                      f"({lazy['stall_ms'] / max(k['stall_ms'], 1e-9):.2f}x)")
            one = res.get("kintsugi_one_copy", {})
            if "stall_ms" in one:
                print(f"kintsugi peak PSS {k['peak_pss_mb'] * 2**20 / nbytes:.2f}x the checkpoint; with memory for one "
                      f"snapshot {one['peak_pss_mb'] * 2**20 / nbytes:.2f}x, stall {one['stall_ms']:.0f} ms, every step "
                      f"{one['overhead_pct_every_step']:.0f}%, every 10 {one['overhead_pct_every_10']:.1f}%")
        results[f"{res['params'] / 1e6:.0f}M"] = res
        if a.json:  # after every size: a run stopped midway keeps the sizes it finished
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            # one object per method at the top level for the first (or only) size, all sizes under "sizes"
            first = next(iter(results.values()))
            Path(a.json).write_text(json.dumps({**first, "sizes": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
