"""Restore from damaged disk checkpoints with the real trainer (2 ranks under torchrun): a
corrupt shard header, corrupt data (CRC), a truncated shard, a missing manifest and ``latest``
naming a missing step, all in one run directory. The relaunched job skips each damaged step
with one line, resumes from the newest good one and reproduces the uninterrupted losses;
the same through ``load_from`` (``checkpoint.store.load_state``)."""
from __future__ import annotations

import shutil
import struct

import pytest

from checkpoint.convert import detect
from checkpoint.format import LATEST, check_latest, committed_steps, step_dirname
from conftest import losses, train

pytestmark = pytest.mark.slow

ARGS = ["--train.steps=6", "--checkpoint.interval=1", "--checkpoint.keep_last=10", "--checkpoint.keeper_timeout_s=5"]


def damage(root):
    """Steps 1..6 on disk, newest first: 6 gone (``latest`` still names it), 5 with a
    damaged header length, 4 with a flipped data byte, 3 truncated, 2 without its manifest."""
    shard = "shard_00000.safetensors"
    shutil.rmtree(root / step_dirname(6))
    with open(root / step_dirname(5) / shard, "r+b") as f:
        f.write(struct.pack("<Q", 2 ** 62))
    path = root / step_dirname(4) / shard
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x10
    path.write_bytes(bytes(data))
    path = root / step_dirname(3) / "shard_00001.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    (root / step_dirname(2) / "manifest.json").unlink()


def test_resume_skips_each_damaged_step_with_one_line(tmp_path):
    run = tmp_path / "run"
    train(2, run, *ARGS)
    want = losses(run)
    root = run / "checkpoints"
    assert committed_steps(root) == [6, 5, 4, 3, 2, 1]
    damage(root)
    shutil.copytree(root, tmp_path / "copy")

    out = train(2, run, *ARGS).stdout  # resume: L0 is gone with the first job's keeper; disk only
    for step, why in ((5, "damaged header"), (4, "checksum mismatch"), (3, "truncated"), (2, "has no manifest.json")):
        lines = [ln for ln in out.splitlines() if f"checkpoint step {step} at L2 is damaged" in ln]
        assert len(lines) == 1 and why in lines[0], out
    assert "resumed from step 1" in out and "Traceback" not in out
    assert losses(run) == want
    # The redone steps replaced the damaged copies; every step is whole and `latest` resolves.
    assert committed_steps(root) == [6, 5, 4, 3, 2, 1] and check_latest(root) is None
    assert (root / LATEST).read_text().strip() == step_dirname(6)
    for step in committed_steps(root):
        src = detect(root / step_dirname(step))
        for name in src.tensors:
            src.read(name)  # CRC-checked

    # The same damage through load_from (the synchronous load_state), `latest` warned about too.
    out = train(2, tmp_path / "other", *ARGS[1:], "--train.steps=2", f"--checkpoint.load_from={tmp_path / 'copy'}").stdout
    assert sum("names 'step_00000006', which is missing" in ln for ln in out.splitlines()) == 1, out
    for step in (5, 4, 3, 2):
        assert sum(f"checkpoint step {step} is damaged" in ln for ln in out.splitlines()) == 1, out
    assert "resumed from step 1" in out
    assert losses(tmp_path / "other") == {2: want[2]}
