"""Units under the trainer: config parsing, the data loader's determinism, the commit and
fallback rules of the native store."""
from __future__ import annotations

import json
import tomllib

import pytest
import torch

from checkpoint import Chunk, CorruptCheckpoint, committed_steps, load_state, save_state
from checkpoint.store import plan_writes
from comms import UserError
from trainer.config import DataConfig, load_config, reference_markdown, to_toml
from trainer.data import Batches
from trainer.parallel_dims import ParallelDims


def test_toml_roundtrip_and_overrides(tmp_path):
    cfg = load_config(None, ["--train.steps=7", "--parallel.pp_layers=[1,3]", "--optim.lr=1e-4", "--train.progress=false"])
    assert (cfg.train.steps, cfg.parallel.pp_layers, cfg.optim.lr, cfg.train.progress) == (7, [1, 3], 1e-4, False)
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path).to_dict() == cfg.to_dict()
    assert tomllib.loads(to_toml(cfg))["train"]["steps"] == 7


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from trainer.train import lr_at

    cfg = load_config(None, ["--train.steps=100", "--optim.warmup_steps=10", "--optim.lr=1.0", "--optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)
    cfg.optim.schedule = "linear"
    assert lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * (1 - 45 / 90))


def test_world_size_must_fill_the_mesh():
    cfg = load_config(None, ["--parallel.tp=2"])
    with pytest.raises(UserError, match="world size 3"):
        cfg.validate(world_size=3)
    cfg = load_config(None, ["--parallel.tp=2"]).validate(world_size=4)
    assert cfg.parallel.dp_shard == -1  # the config says what was asked, ParallelDims what runs
    dims = ParallelDims.resolve(cfg, 4)
    assert (dims.dp_shard, dims.tp, dims.dp_size, dims.fsdp_enabled, dims.ddp_enabled) == (2, 2, 2, True, False)
    ddp = ParallelDims.resolve(load_config(None, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]), 2)
    assert ddp.ddp_enabled and not ddp.fsdp_enabled and ddp.describe() == "pp=1 dp_replicate=2 dp_shard=1 tp=1 engine=torch"


def test_reference_lists_every_field():
    ref = reference_markdown()
    for key in ("`dp_shard`", "`zero_stage`", "`keep_last`", "`capacity_factor`"):
        assert key in ref


def test_batches_are_deterministic_and_split_over_ranks():
    cfg = DataConfig(seq_len=16, batch_size=8, max_corpus_mb=0.5)
    one = Batches(cfg)
    halves = [Batches(cfg, r, 2, corpus=one.corpus) for r in range(2)]
    for _ in range(3):
        x, y = one.next()
        parts = [b.next() for b in halves]
        assert torch.equal(x, torch.cat([p[0] for p in parts]))
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    resumed = Batches(cfg, corpus=one.corpus)
    resumed.load_state_dict(one.state_dict())
    assert torch.equal(resumed.next()[0], one.next()[0])


def test_replicated_chunks_are_written_once_and_spread():
    owner = plan_writes([[("a@0", 100), ("b@0", 100)], [("a@0", 100), ("b@0", 100)]])
    assert sorted(owner.values()) == [0, 1]


def state(value: float):
    return {"w": Chunk(torch.full((4, 3), value), (4, 3), (0, 0), replica=True), "step": int(value)}


def test_flipped_byte_falls_back_to_previous_step(tmp_path, capsys):
    for s in (1, 2):
        save_state(tmp_path, s, state(float(s)), keep_last=3)
    assert committed_steps(tmp_path) == [2, 1]
    shard = tmp_path / "step_00000002" / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    target = state(0.0)
    step, objects, _ = load_state(tmp_path, target)
    assert step == 1 and objects["step"] == 1 and torch.equal(target["w"].tensor, torch.full((4, 3), 1.0))
    assert "step 2 is damaged" in capsys.readouterr().out


def test_truncated_manifest_falls_back(tmp_path):
    for s in (1, 2):
        save_state(tmp_path, s, state(float(s)), keep_last=3)
    m = tmp_path / "step_00000002" / "manifest.json"
    m.write_text(m.read_text()[:50])
    assert load_state(tmp_path, state(0.0))[0] == 1


def test_all_steps_damaged_is_a_user_error(tmp_path):
    save_state(tmp_path, 1, state(1.0))
    (tmp_path / "step_00000001" / "shard_00000.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="every committed step is damaged"):
        load_state(tmp_path, state(0.0))


def test_a_step_that_cannot_be_read_leaves_the_state_untouched(tmp_path):
    """Everything is checked before the first byte is copied: a restore that falls back to
    another copy, or starts fresh, never starts from a half-filled model."""
    from checkpoint.format import MissingShard, PartlyFilled, read_manifest
    from checkpoint.store import fill_all

    ones = {n: Chunk(torch.ones(4, 3), (4, 3), (0, 0)) for n in ("a", "b")}
    step_dir = save_state(tmp_path, 1, ones)
    manifest = read_manifest(step_dir)
    target = {n: Chunk(torch.zeros(4, 3), (4, 3), (0, 0)) for n in ("a", "b")}
    elsewhere = json.loads(json.dumps(manifest))
    elsewhere["tensors"]["b"]["chunks"][0]["file"] = "shard_00001.safetensors"  # on another node
    with pytest.raises(MissingShard):
        fill_all(target, elsewhere, step_dir, {}, lambda name: False)
    other = json.loads(json.dumps(manifest))
    other["tensors"]["b"]["shape"] = [4, 4]  # another model
    with pytest.raises(UserError, match="model config differs"):
        fill_all(target, other, step_dir, {}, lambda name: False)
    assert not any(t.tensor.any() for t in target.values())
    damaged = json.loads(json.dumps(manifest))
    damaged["tensors"]["b"]["chunks"][0]["crc32"] ^= 1  # found only while b is copied, after a
    with pytest.raises(PartlyFilled, match="checksum mismatch"):
        fill_all(target, damaged, step_dir, {}, lambda name: False)
    assert target["a"].tensor.eq(1).all()


def test_resharding_reads_overlapping_slices(tmp_path):
    full = torch.arange(24.0).reshape(6, 4)
    # saved as two row halves (like FSDP2 x2) ...
    save_state(tmp_path, 1, {"w": Chunk(full[:3].clone(), (6, 4), (0, 0))}, keep_last=2)
    manifest_dir = tmp_path / "step_00000001"
    # ... and read back as column halves (like TP x2 on dim 1): needs a second writer first
    save_state(tmp_path, 2, {"w": Chunk(full.clone(), (6, 4), (0, 0))}, keep_last=2)
    target = Chunk(torch.zeros(6, 2), (6, 4), (0, 2))
    load_state(tmp_path, {"w": target})
    assert torch.equal(target.tensor, full[:, 2:])
    with pytest.raises(CorruptCheckpoint):
        # step 1 only covers rows 0-2: a chunk that needs rows 3-5 is not fully covered
        from checkpoint.store import fill
        from checkpoint.format import read_manifest
        fill(Chunk(torch.zeros(6, 4), (6, 4), (0, 0)), read_manifest(manifest_dir)["tensors"]["w"], manifest_dir, {})


def test_readme_config_reference_is_current():
    """The README's config reference is generated from the field docs; regenerate it with
    `python -c "from trainer.config import reference_markdown; print(reference_markdown())"`."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert reference_markdown().strip() in readme
