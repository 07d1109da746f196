"""The CUDA paths of the checkpoint hot path, end to end, on one GPU (a check, not a test:
the test suite runs on CPU machines).

    python benchmarks/gpu_check.py [--params 100e6] [--saves 5] [--json PATH]

What it runs, with a real node keeper and a one-rank NCCL process group:
1. lazy capture on a side CUDA stream into the keeper's shared memory registered as pinned
   memory (``cudaHostRegister``); the optimizer's stream waits on the copy's event (the
   pre-step hook), so the optimizer keeps stepping while the snapshot must stay untorn:
   every snapshot is checked byte for byte against a clone taken at the save;
2. collective tracing with CUDA events (``comms.install`` on NCCL): every all-reduce gets a
   record whose end was resolved from its event;
3. restore from keeper memory (L0) into the CUDA tensors, compared with the saved values;
4. the training loop's stall per save (save call + the next step beyond a plain step,
   medians) against ``torch.save`` of the same state (to the same disk, fsynced).

It exits 2 with one line when no GPU is present, 1 when a check fails. ``--cpu`` runs the
same checks on the CPU paths (gloo, a copier thread) to check the script where no GPU is.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fail(msg: str):
    print(f"gpu_check: FAILED: {msg}", flush=True)
    sys.exit(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6, help="model size in parameters (Linear(4096, 4096) layers)")
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary directory)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cpu", action="store_true", help="the same checks on the CPU paths (no GPU needed)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2

    import torch.distributed as dist

    import comms
    from checkpoint import CheckpointConfig, Checkpointer, flatten
    from checkpoint.shards import ShardReader
    from checkpoint.keeper import messages

    work = Path(a.dir or tempfile.mkdtemp(prefix="kintsugi-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29577"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dev = "cpu" if a.cpu else "cuda"
    dist.init_process_group("gloo" if a.cpu else "nccl")
    sync = (lambda: None) if a.cpu else torch.cuda.synchronize
    tracer = comms.install(work)
    width = 1024 if a.cpu else 4096
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(max(1, round(a.params / width ** 2)))]).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(a.batch, width, device=dev)

    def step(i: int):
        loss = model(x).pow(2).mean()
        loss.backward()
        for p in model.parameters():  # a data-parallel gradient all-reduce (traced, CUDA events)
            dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
        comms.end_step(i)

    def timed_step(i: int) -> float:
        sync()
        t = time.perf_counter()
        step(i)
        sync()
        return time.perf_counter() - t

    def state() -> dict:
        return flatten({"model": model.state_dict(), "optim": opt.state_dict()["state"]})

    for i in range(3):
        step(i)
    base = statistics.median(timed_step(i) for i in range(3, 8))
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    device = "CPU" if a.cpu else torch.cuda.get_device_name()
    print(f"gpu_check: {device}, {nbytes / 1e9:.2f} GB of state, plain step {base * 1e3:.1f} ms",
          flush=True)

    # -- torch.save: the synchronous baseline (device-to-host copy, serialization, write, fsync)
    torch_stalls = []
    for i in range(a.saves):
        sync()
        t = time.perf_counter()
        path = work / "torch_save.pt"
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        torch_stalls.append(time.perf_counter() - t)
        path.unlink()
        step(100 + i)

    # -- Kintsugi: lazy capture on the side stream into registered keeper memory
    cfg = CheckpointConfig(interval=1, dir=str(work / "l2"), l2_interval=10 ** 6, l1_dir=str(work / "l1"),
                           l1_keep_last=1, host_memory_mb=2 * (nbytes >> 20) + 256)
    ckpt = Checkpointer(cfg, work)
    ckpt.attach(opt)
    stalls, parts = [], []
    for i in range(1, a.saves + 1):
        step(200 + i)
        ckpt.check()
        expected = {k: c.tensor.detach().clone() for k, c in state().items() if hasattr(c, "tensor")}
        sync()
        t0 = time.perf_counter()
        timing = ckpt.save(1000 + i, state())
        t1 = time.perf_counter()
        step(300 + i)  # the optimizer step must wait (on the GPU) for the side stream's copy
        ckpt.check()
        sync()
        t2 = time.perf_counter()
        stalls.append((t1 - t0) + max(0.0, (t2 - t1) - base))
        while ckpt.pending:
            ckpt.check()
            time.sleep(0.005)
        parts.append(timing.parts)
        # The snapshot in keeper memory must hold the values of the save, not of the step after it.
        snap = next(x for x in ckpt.keeper.call(messages.Snapshots()).snapshots if x["step"] == 1000 + i)
        reader = ShardReader(Path(snap["path"]), memory=True)
        torn = [r[0] for r in snap["records"] if not torch.equal(reader.read(r[1]).to(dev), expected[r[0]])]
        if torn:
            fail(f"save {i}: {len(torn)} tensors in keeper memory differ from the saved values (e.g. {torn[0]}): "
                 "the optimizer did not wait for the side stream's copy")
    # Restore from keeper memory (L0) after zeroing the live state.
    live = state()
    saved = {k: c.tensor.detach().clone() for k, c in live.items() if hasattr(c, "tensor")}
    ckpt.save(5000, live)
    while ckpt.pending:
        ckpt.check()
        time.sleep(0.005)
    sync()
    with torch.no_grad():
        for c in live.values():
            if hasattr(c, "tensor"):
                c.tensor.zero_()
    t = time.perf_counter()
    got = ckpt.restore(live)
    sync()
    restore_s = time.perf_counter() - t
    if got is None or got[0] != 5000 or ckpt.restored_from != "l0":
        fail(f"restore did not come from keeper memory (got {got and got[0]}, level {ckpt.restored_from})")
    bad = [k for k, c in live.items() if hasattr(c, "tensor") and not torch.equal(c.tensor, saved[k])]
    if bad:
        fail(f"{len(bad)} tensors differ after restoring from keeper memory (e.g. {bad[0]})")
    ckpt.close()

    # -- the collectives' records: CUDA events resolved into start/end times
    tracer.close()
    records = [json.loads(line) for f in (work / "diagnostics").rglob("trace-r*.jsonl") for line in open(f)]
    ops = [r for r in records if r.get("t") == "op" and r.get("op") == "all_reduce"]
    if not ops or any(r.get("ended") is None or r["ended"] < r["started"] for r in ops):
        fail(f"all-reduce records missing or unresolved ({len(ops)} records)")

    dist.destroy_process_group()
    result = {"device": device, "bytes": nbytes, "step_ms": base * 1e3,
              "kintsugi_stall_ms": 1e3 * statistics.median(stalls), "torch_save_stall_ms": 1e3 * statistics.median(torch_stalls),
              "restore_l0_s": restore_s, "traced_all_reduces": len(ops),
              "parts_ms": {k: 1e3 * statistics.median(p[k] for p in parts) for k in parts[0] if k.endswith("_s")}}
    print(f"gpu_check: stall per save {result['kintsugi_stall_ms']:.1f} ms (Kintsugi, lazy copy {'by a thread' if a.cpu else 'on a side stream'}) "
          f"vs {result['torch_save_stall_ms']:.1f} ms (torch.save + fsync); restore from keeper memory "
          f"{restore_s:.2f} s; {len(ops)} all-reduces traced{'' if a.cpu else ' with CUDA events'}; parts "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["parts_ms"].items()), flush=True)
    print("gpu_check: OK")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    if a.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
