"""The asynchronous multi-level checkpointer in one process (the node keeper is a real
separate process): lazy capture never tears, restore order and fallback, a full L2 disk,
the memory budget, and the keeper's privacy and lease."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointConfig, Checkpointer, flatten, load_state
from checkpoint.format import committed_steps, step_dirname
from checkpoint.keeper import KeeperAddress, KeeperClient, job_id
from comms import UserError

import conftest


def ckpt(tmp_path, **kw) -> Checkpointer:
    cfg = dict(interval=1, l1_dir=str(tmp_path / "l1"), keeper_timeout_s=20, host_memory_mb=512, capture="lazy")
    cfg.update(kw)
    return Checkpointer(CheckpointConfig(**cfg), tmp_path)


def settle(c: Checkpointer):
    """Step boundaries until every save is committed at its levels (what a loop's check() does)."""
    while c.pending:
        c.check()
        time.sleep(0.01)


def crash(c: Checkpointer):
    """Drop the keeper connection without a goodbye, as a killed trainer does."""
    c.keeper.close()
    c.keeper = None


def stop_keeper(run_dir):
    conftest.stop_keeper(run_dir, job_id())


@pytest.fixture
def run_dir(tmp_path):
    yield tmp_path
    stop_keeper(tmp_path)


def digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        v = state[name]
        h.update(name.encode())
        h.update(v.tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if hasattr(v, "tensor")
                 else json.dumps(v).encode())
    return h.hexdigest()


def test_lazy_capture_is_never_torn_while_the_optimizer_keeps_stepping(run_dir):
    """The save returns before the copy; the optimizer steps right away and many times; the
    committed bytes are exactly those at the save (the pre-step hook held the step back)."""
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(4_000_000))  # 16 MB: the copy is still running at the first step
    opt = torch.optim.SGD([big], lr=1.0)
    c = ckpt(run_dir)
    c.attach(opt)
    state = flatten({"w": big})
    at_save = big.detach().clone()
    c.save(1, state, final=True)
    for _ in range(5):
        big.grad = torch.ones_like(big)
        opt.step()
    assert not torch.equal(big.detach(), at_save)
    c.close()
    target = flatten({"w": torch.zeros_like(at_save)})
    step, _, _ = load_state(run_dir / "checkpoints", target)
    assert step == 1 and torch.equal(target["w"].tensor, at_save)


def test_copies_checksum_in_the_same_pass_whichever_thread_copies(run_dir):
    """The copy's CRC32 of each tensor equals zlib's of its bytes, whether the copier alone
    took the pieces, the training thread helped it (as the step hook does), or three threads
    copied at once (eager capture): each piece's CRC is combined in order. A save bound for
    disk then needs no CRC pass in the keeper, and its manifest's CRCs verify on load."""
    import zlib

    import numpy as np

    from checkpoint.keeper import messages
    from checkpoint.lazy import LazyCopy

    torch.manual_seed(0)
    srcs = [torch.randn(5_000_000), torch.randn(3), torch.randn(0), torch.randn(2_100_000)]  # 20 MB: 3 pieces; 8.4 MB: 2
    expected = [zlib.crc32(np.ascontiguousarray(t.numpy()).tobytes()) for t in srcs]
    for how in ("alone", "helped", "now"):
        dsts = [torch.empty(t.numel() * 4, dtype=torch.uint8) for t in srcs]
        got = []
        copy = LazyCopy(list(zip(srcs, dsts)), got.append, crc=True, now=3 if how == "now" else 0)
        if how == "alone":
            copy.done.wait()  # join() would help
        assert copy.done.is_set() or how == "helped"  # copied before returning, "now"
        copy.join()
        assert all(torch.equal(d, t.view(torch.uint8)) for d, t in zip(dsts, srcs))
        assert got == [expected], how

    big = torch.nn.Parameter(torch.randn(3_000_000))
    opt = torch.optim.SGD([big], lr=1.0)
    c = ckpt(run_dir)
    c.attach(opt)
    at_save = big.detach().clone()
    c.save(1, flatten({"w": big}), final=True)
    settle(c)
    assert "crc" not in c.keeper.call(messages.Status(c.gen)).written  # the keeper made no CRC pass
    c.close()
    manifest = json.loads(next((run_dir / "checkpoints").glob("step_*/manifest.json")).read_text())
    crcs = [chunk["crc32"] for t in manifest["tensors"].values() for chunk in t["chunks"]]
    assert crcs == [zlib.crc32(at_save.numpy().tobytes())]
    target = flatten({"w": torch.zeros_like(at_save)})
    assert load_state(run_dir / "checkpoints", target)[0] == 1 and torch.equal(target["w"].tensor, at_save)


def test_auto_capture_copies_at_the_save_when_the_step_fills_every_core(run_dir):
    """``capture = "auto"``: the first two saves map fresh keeper slots and copy lazily;
    then, with torch's threads on every core, a save copies before it returns (on those
    threads), and with a core left idle it copies lazily. Every save commits the bytes as
    they were at the save while the optimizer steps on."""
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(4_000_000))
    opt = torch.optim.SGD([big], lr=1.0)
    c = ckpt(run_dir, capture="auto", l1_keep_last=4)
    c.attach(opt)
    at_save = {}
    expected = {1: "lazy", 2: "lazy", 3: f"eager, {cores} threads", 4: "lazy"}
    try:
        for step, n in ((1, cores), (2, cores), (3, cores), (4, 1)):
            if step == 4 and cores == 1:
                break  # no core to leave idle
            torch.set_num_threads(n)
            at_save[step] = big.detach().clone()
            timing = c.save(step, flatten({"w": big}))
            assert timing.capture == expected[step], step
            if step == 3:
                assert c.capture.done.is_set()  # copied before save returned
            big.grad = torch.ones_like(big)
            opt.step()
            settle(c)
    finally:
        torch.set_num_threads(threads)
    c.close()
    for step, want in at_save.items():
        target = flatten({"w": torch.zeros_like(want)})
        assert load_state(run_dir / "l1", target, step=step)[0] == step and torch.equal(target["w"].tensor, want)


def test_buffers_changed_by_forward_are_copied_at_save(run_dir):
    bn = torch.nn.BatchNorm1d(8)
    c = ckpt(run_dir)
    bn(torch.randn(16, 8))
    state = flatten(bn.state_dict())
    at_save = bn.running_mean.clone()
    c.save(1, state, final=True)
    bn(torch.randn(16, 8) + 5)  # the next forward moves the running statistics
    c.close()
    target = flatten({k: torch.zeros_like(v) for k, v in bn.state_dict().items()})
    load_state(run_dir / "checkpoints", target)
    assert torch.equal(target["running_mean"].tensor, at_save)


def test_levels_commit_native_format_with_intervals_and_retention(run_dir):
    c = ckpt(run_dir, interval=2, l1_interval=2, l2_interval=4, keep_last=1, keep_every=8, l1_keep_last=2)
    w = torch.zeros(1000)
    for step in range(2, 17, 2):
        w += 1
        c.save(step, {"w": flatten({"w": w})["w"], "step": step}, extra={"note": "x"})
        settle(c)
    c.close()
    assert committed_steps(run_dir / "l1") == [16, 14]
    assert committed_steps(run_dir / "checkpoints") == [16, 8]  # keep_last=1 plus every 8th
    manifest = json.loads((run_dir / "checkpoints" / step_dirname(16) / "manifest.json").read_text())
    assert manifest["objects"] == {"step": 16} and manifest["note"] == "x"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == step_dirname(16)
    target = {"w": flatten({"w": torch.zeros(1000)})["w"]}
    assert load_state(run_dir / "l1", target)[0] == 16 and torch.equal(target["w"].tensor, torch.full((1000,), 8.0))


def test_restore_prefers_memory_and_falls_back_on_damage(run_dir, capsys):
    w = torch.zeros(50_000)
    c = ckpt(run_dir, l1_dir="")
    for step in (1, 2, 3):
        w.fill_(step)
        c.save(step, {"w": flatten({"w": w})["w"], "step": step})
        settle(c)
    crash(c)  # the trainer dies; the keeper keeps step 3 in memory
    target = {"w": flatten({"w": torch.zeros(50_000)})["w"]}
    c2 = ckpt(run_dir, l1_dir="")
    assert c2.restore(target)[0] == 3 and target["w"].tensor[0] == 3
    assert "restored step 3 from L0" in capsys.readouterr().out  # rank 0 says where it came from
    c2.close()  # a clean end: the keeper goes, and memory with it
    stop_keeper(run_dir)

    root = run_dir / "checkpoints"
    assert committed_steps(root) == [3, 2]
    shard = root / step_dirname(3) / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the newest step
    shard.write_bytes(bytes(data))
    c3 = ckpt(run_dir, l1_dir="")
    assert c3.restore(target)[0] == 2 and target["w"].tensor[0] == 2
    out = capsys.readouterr().out
    assert "step 3 at L2 is damaged" in out and "checksum mismatch" in out
    c3.close()
    stop_keeper(run_dir)

    manifest = root / step_dirname(2) / "manifest.json"
    manifest.write_text(manifest.read_text()[:40])  # a truncated manifest
    # Step 3's damage was found while its bytes were being copied into ``w``: with no good
    # copy left the job must not "start fresh" from a half-restored model.
    c4 = ckpt(run_dir, l1_dir="")
    try:
        with pytest.raises(UserError, match=r"damaged while it was being loaded \(step 3 at L2: .*checkpoint.resume=false"):
            c4.restore(target)
    finally:
        c4.close()
    assert "step 2 at L2 is damaged" in capsys.readouterr().out


def test_full_l2_disk_is_reported_and_training_goes_on(run_dir, capsys):
    small = run_dir / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root and mount permission)")
    try:
        c = ckpt(run_dir, dir=str(small), keep_last=2)
        w = torch.zeros(100_000)  # 400 kB: two steps fit into 1 MiB, a third does not
        for step in (1, 2, 3, 4):
            w.fill_(step)
            c.save(step, {"w": flatten({"w": w})["w"]}, final=step == 4)
            settle(c)
        out = capsys.readouterr().out
        assert "not stored at l2" in out and "No space left" in out
        assert committed_steps(small) == [2, 1]  # nothing committed was lost
        assert committed_steps(run_dir / "l1")[0] == 4  # L1 went on
        target = {"w": flatten({"w": torch.zeros(100_000)})["w"]}
        assert load_state(small, target)[0] == 2 and target["w"].tensor[0] == 2
        with pytest.raises(UserError, match="final checkpoint \\(step 4\\) was not saved"):
            c.close()
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_memory_budget_too_small_saves_to_disk_directly(run_dir, capsys):
    """Snapshots that do not fit into the keeper's memory go to L2 synchronously, said once."""
    c = ckpt(run_dir, host_memory_mb=1)  # a 1.2 MB snapshot in 1 MiB
    for step in (1, 2):
        c.save(step, {"w": flatten({"w": torch.full((300_000,), float(step))})["w"]}, final=step == 2)
        c.check()
    c.close()
    out = capsys.readouterr().out
    assert out.count("host_memory_mb") == 1 and "directly (synchronously)" in out
    target = {"w": flatten({"w": torch.zeros(300_000)})["w"]}
    assert load_state(run_dir / "checkpoints", target)[0] == 2 and target["w"].tensor[0] == 2


def test_memory_for_one_snapshot_reuses_it_once_the_previous_is_on_disk(run_dir):
    """host_memory_mb holds one snapshot per rank, not two: every save also goes to L1 (whose
    and L2 intervals would skip most), each waits until the previous one is committed there, and the
    keeper holds one slot. A trainer killed (kill -9) halfway through copying into that slot
    (the older step's bytes half overwritten) resumes from the previous step on L1."""
    l1 = run_dir / "l1"
    script = f"""if True:
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
        from checkpoint import CheckpointConfig, Checkpointer, flatten
        c = Checkpointer(CheckpointConfig(interval=1, l1_dir={str(l1)!r}, l1_interval=3, l2_interval=3,
                                          host_memory_mb=20, capture="lazy", keeper_timeout_s=20), {str(run_dir)!r})
        w = torch.nn.Parameter(torch.ones(3_000_000))
        opt = torch.optim.SGD([w], lr=1.0)
        c.attach(opt)  # the optimizer's tensors are copied lazily
        for step in range(1, 6):
            c.save(step, flatten({{"w": w}}))
            c.check()
            w.grad = torch.full_like(w, -1.0)
            opt.step()  # w = step + 1
        c.close()"""
    # 12 MB snapshots (two 8 MiB copy pieces each) in 20 MiB; killed at the second piece of save 5
    trainer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**os.environ, "KINTSUGI_FAULT": "copy:kill:10"})
    assert trainer.returncode == -signal.SIGKILL, trainer.stderr[-2000:]
    assert trainer.stdout.count("room for one snapshot per rank") == 1, trainer.stdout
    assert committed_steps(l1) == [4, 3]  # step 4 went to L1 though neither level was due
    c = ckpt(run_dir, host_memory_mb=20, l1_interval=3, l2_interval=3)
    assert len(keeper_segments(c.keeper.pid)) == 1
    target = {"w": flatten({"w": torch.zeros(3_000_000)})["w"]}
    assert c.restore(target)[0] == 4 and c.restored_from == "l1"
    assert torch.equal(target["w"].tensor, torch.full((3_000_000,), 4.0))
    c.close()



def one_copy_rank(rank: int, port: int, run_dir: str):
    """One of 2 ranks on one node, 20 MiB of keeper memory each: rank 0's 12 MB shard fits
    once, rank 1's 0.4 MB twice; they agree on one copy (every save to L1)."""
    from comms import dist_utils

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist_utils.init_process_group("gloo")
    c = ckpt(Path(run_dir), host_memory_mb=40, l1_interval=4, l2_interval=4)
    w = torch.nn.Parameter(torch.ones(3_000_000 if rank == 0 else 100_000))
    opt = torch.optim.SGD([w], lr=1.0)
    c.attach(opt)
    for step in range(1, 6):
        timing = c.save(step, flatten({f"w{rank}": w}), final=step == 5)
        assert "l1" in timing.levels, (step, timing.levels)
        c.check()
        w.grad = torch.full_like(w, -1.0)
        opt.step()  # w = step + 1
    if rank == 0:  # one slot of rank 0's (rank 1's shard leaves room for more within its share)
        assert len([p for p in keeper_segments(c.keeper.pid) if "-r0-" in p.name]) == 1
    c.close()
    dist_utils.shutdown()


def test_ranks_agree_on_one_copy_and_every_save_commits_on_disk(run_dir):
    import torch.multiprocessing as mp

    from diagnostics.drill import free_port

    mp.start_processes(one_copy_rank, args=(free_port(), str(run_dir)), nprocs=2, start_method="spawn")
    assert committed_steps(run_dir / "l1") == [5, 4]
    target = flatten({"w0": torch.zeros(3_000_000), "w1": torch.zeros(100_000)})
    assert load_state(run_dir / "l1", target)[0] == 5
    assert all(torch.equal(t.tensor, torch.full_like(t.tensor, 5.0)) for t in target.values())

def keeper_segments(pid: int) -> list[Path]:
    """The shared-memory files a keeper process has mapped."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return sorted({Path(line.split()[-1]) for line in maps if "/dev/shm/kintsugi-" in line})


def test_snapshots_stay_within_the_memory_budget(run_dir):
    c = ckpt(run_dir, host_memory_mb=3, l1_dir="")  # 1 MB state: room for 3 snapshots, 8 saves
    for step in range(1, 9):
        c.save(step, {"w": flatten({"w": torch.full((250_000,), float(step))})["w"]})
        used = sum(p.stat().st_size for p in keeper_segments(c.keeper.pid))
        assert used <= 3 << 20
    c.close()
    assert committed_steps(run_dir / "checkpoints")[0] == 8


def test_keeper_is_private_and_dies_with_its_job(run_dir):
    script = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent.parent)!r});"
              "from checkpoint import CheckpointConfig, Checkpointer, flatten; import torch;"
              f"c = Checkpointer(CheckpointConfig(keeper_timeout_s=1), {str(run_dir)!r});"
              "c.save(1, flatten({'w': torch.ones(1000)})); c.check(); print('saved', flush=True); time.sleep(600)")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert trainer.stdout.readline().strip() == "saved"
    addr = KeeperAddress.of(run_dir, job_id())
    token = addr.token_file.read_text().strip()
    pid = KeeperClient(addr.sock, token, rank=-1).pid
    shm = keeper_segments(pid)
    assert shm
    for p in [Path(addr.sock), addr.token_file, *shm]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(Path(addr.sock).parent.stat().st_mode) == 0o700
    with pytest.raises(ConnectionError, match="refused our job token"):
        KeeperClient(addr.sock, "0" * 64, rank=-1)
    trainer.kill()  # kill -9: no goodbye; the keeper's lease runs out one second later
    trainer.wait()
    conftest.wait_dead(pid)
    assert not any(p.exists() for p in shm) and not Path(addr.sock).exists()


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_level_writes_are_byte_exact_direct_or_buffered(tmp_path, where):
    """Shards go to disk with O_DIRECT where the memory and filesystem allow (the aligned
    body) and buffered otherwise (the tail; unaligned memory; tmpfs refuses O_DIRECT)."""
    import mmap

    from checkpoint.levels import LevelSpec, make_storage
    root = tmp_path if where == "disk" else Path("/dev/shm") / f"kintsugi-test-{os.getpid()}"
    storage = make_storage(LevelSpec("l1", str(root), keep_last=1))
    try:
        sizes = [10, 4096, 3 * (1 << 20) + 17, 40 << 20]
        for n in sizes:
            mm = mmap.mmap(-1, n + 1)
            data = os.urandom(n + 1)
            mm.write(data)
            storage.write_part("", 7, f"a{n}", memoryview(mm)[:n])  # page-aligned memory
            storage.write_part("", 7, f"u{n}", memoryview(mm)[1:])  # unaligned memory
            assert (root / "step_00000007.tmp" / f"a{n}").read_bytes() == data[:n]
            assert (root / "step_00000007.tmp" / f"u{n}").read_bytes() == data[1:]
    finally:
        if where == "tmpfs":
            import shutil
            shutil.rmtree(root, ignore_errors=True)


def test_a_new_attempt_sees_none_of_the_old_attempts_reports(run_dir):
    """After a restart redoes step S, no report of the earlier attempt counts: the keeper keys
    durable/committed/failed by (attempt, step), and each attempt writes its own tmp dir."""
    from checkpoint.keeper import messages

    old = ckpt(run_dir, l1_dir="")
    old.save(2, {"w": flatten({"w": torch.ones(1000)})["w"]})
    settle(old)
    assert 2 in old.keeper.call(messages.Status(old.gen)).committed["l2"]
    crash(old)
    new = ckpt(run_dir, l1_dir="")
    assert new.gen != old.gen
    st = new.keeper.call(messages.Status(new.gen))
    assert st.ready == {} and st.durable == {"l2": []} and st.committed == {"l2": []}
    new.save(2, {"w": flatten({"w": torch.full((1000,), 2.0)})["w"]})
    settle(new)  # committed anew by this attempt, replacing the old copy
    target = {"w": flatten({"w": torch.zeros(1000)})["w"]}
    assert load_state(run_dir / "checkpoints", target)[0] == 2 and target["w"].tensor[0] == 2
    new.close()


def test_snapshots_after_a_restore_to_an_older_step_are_protected(run_dir):
    """An attempt that restored an older step than the keeper's newest: its new snapshots
    stay in memory from their first level-0 commit on (the L0 timeline follows the attempt)."""
    from checkpoint.keeper import messages

    old = ckpt(run_dir, l1_dir="", l2_interval=1000)
    for step in (10, 20):
        old.save(step, {"w": flatten({"w": torch.full((1000,), float(step))})["w"]})
        settle(old)
    crash(old)
    new = ckpt(run_dir, l1_dir="", l2_interval=1000)  # as if it restored step 10 from disk
    new.save(11, {"w": flatten({"w": torch.full((1000,), 11.0)})["w"]})
    settle(new)
    held = {x["step"] for x in new.keeper.call(messages.Snapshots()).snapshots}
    assert held == {11}  # the new attempt's step is kept; the abandoned timeline (10, 20) freed
    new.close()


def test_optimizer_storages_forget_freed_optimizers():
    """Storage addresses come from live optimizers only: a freed tensor's address, reused by
    an unrelated buffer, must not make that buffer copied lazily (it could be torn)."""
    import gc

    from checkpoint.lazy import optimizer_storages, protect

    p = torch.nn.Parameter(torch.ones(10_000))
    opt = torch.optim.SGD([p], lr=0.1)
    protect(opt)
    ptr = p.untyped_storage().data_ptr()
    assert ptr in optimizer_storages()
    del opt, p
    gc.collect()
    assert ptr not in optimizer_storages()


def test_a_stuck_level_write_fails_the_save_instead_of_hanging(run_dir, monkeypatch):
    """A level write that does not come back (a hung NFS): the next save waits for memory at
    most checkpoint.close_timeout_s, then every rank hears why; nothing hangs."""
    monkeypatch.setenv("KINTSUGI_FAULT", "write:sleep:8")  # the keeper's first shard write hangs 8 s
    c = ckpt(run_dir, host_memory_mb=1, l1_dir="", close_timeout_s=1)  # room for 2 snapshots of ~400 kB
    with pytest.raises(RuntimeError, match="no snapshot memory was freed within 1 s"):
        for step in range(1, 6):
            c.save(step, {"w": flatten({"w": torch.full((100_000,), float(step))})["w"]})
            c.check()
    os.kill(c.keeper.pid, signal.SIGKILL)  # its write still hangs: the teardown need not wait for it
    conftest.wait_dead(c.keeper.pid)
    c.keeper.close()
    c.keeper = None


def test_a_save_must_come_after_the_last_one(run_dir):
    # The keeper keys its reports by (attempt, step): a step saved again in the same attempt
    # would wait for a commit that its earlier report already stands for. A clear error instead.
    c = ckpt(run_dir)
    w = flatten({"w": torch.zeros(100)})["w"]
    c.save(3, {"w": w})
    settle(c)
    for step in (3, 2):
        with pytest.raises(UserError, match=f"save of step {step} after a save of step 3"):
            c.save(step, {"w": w})
    c.save(4, {"w": w})
    settle(c)
    c.close()
    assert committed_steps(run_dir / "l1") == [4, 3]
