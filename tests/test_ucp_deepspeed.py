"""Interop with real DeepSpeed engines (CPU accelerator, gloo).

One 2-rank job trains a small model a few steps under ZeRO-1 (bf16), ZeRO-2 and ZeRO-3 and
saves each with DeepSpeed's own save_checkpoint, then records the next two losses. Each is
converted with ``kintsugi ckpt convert --to deepspeed-universal``; every atom must equal what
DeepSpeed's ``ds_to_universal --inject_missing_state`` writes for the same checkpoint, and
engines with ``load_universal`` on 1 and on 3 ranks must continue with the same losses.
Three process launches in all: DeepSpeed engines are slow to start.
"""
import json
import os
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from checkpoint.cli import main
from checkpoint.convert.deepspeed import load_pt
from comms import dist_utils
from diagnostics.drill import free_port

os.environ.setdefault("DS_ACCELERATOR", "cpu")
pytestmark = pytest.mark.slow  # three DeepSpeed launches (~12 s per engine start on 2 cores)
STAGES = {"zero1_bf16": (1, True), "zero2": (2, False), "zero3": (3, False)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(10, 24)
        self.mid = nn.Linear(24, 7)  # 477 parameters in all: uneven partitions over 2 and 3 ranks
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3)

    def forward(self, x):
        return self.out(self.norm(torch.relu(self.mid(torch.relu(self.emb(x))))))


def ds_init(rank: int, world: int, port: int):
    """One rank of a DeepSpeed job on this machine: its environment, then DeepSpeed's gloo group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed

    deepspeed.init_distributed("gloo", verbose=False)


def ds_job(rank: int, world: int, port: int, root: str, mode: str):
    import deepspeed

    ds_init(rank, world, port)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 10, generator=g), torch.randn(4, 3, generator=g)) for _ in range(5)]
    losses = {}
    for key, (stage, bf16) in STAGES.items():
        torch.manual_seed(0)
        net = Net()
        # every rank sees the same batch, so the averaged gradient does not depend on the world size
        cfg = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
               "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
               "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
               "checkpoint": {"load_universal": mode == "load"}}
        engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)

        def step(i):
            x, y = batches[i]
            loss = ((engine(x.to(torch.bfloat16 if bf16 else torch.float32)).float() - y) ** 2).mean()
            engine.backward(loss)
            engine.step()
            return loss.item()

        if mode == "save":
            for i in range(3):
                step(i)
            engine.save_checkpoint(f"{root}/{key}")
        else:
            engine.load_checkpoint(f"{root}/{key}_kintsugi")
        losses[key] = [step(3), step(4)]
        engine.destroy()
    if rank == 0:
        Path(f"{root}/losses_{mode}_{world}.json").write_text(json.dumps(losses))
    dist_utils.exit_process()  # leave without tearing gloo down (see dist_utils)


@pytest.fixture(scope="module")
def ds_root(tmp_path_factory):
    for attempt in range(2):  # once more only after torch's rare abort of a rank (SIGABRT: conftest.TORCH_ABORT)
        root = tmp_path_factory.mktemp("ds")
        try:
            mp.start_processes(ds_job, args=(2, free_port(), str(root), "save"), nprocs=2, start_method="spawn")
            return root
        except mp.ProcessExitedException as e:
            if attempt or e.signal_name != "SIGABRT":
                raise


def ds_reference(src: Path, out: Path):
    """DeepSpeed's own converter on the same checkpoint (in this process, no workers)."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_main

    tag = (src / "latest").read_text().strip()
    ds_main(Namespace(input_folder=str(src / tag), output_folder=str(out / tag), num_extract_workers=1,
                      num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
    return out / tag


def same(x, y) -> bool:
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
    return x == y


@pytest.fixture(scope="module")
def converted(ds_root):
    for key in STAGES:
        assert main(["convert", str(ds_root / key), str(ds_root / f"{key}_kintsugi"), "--to", "deepspeed-universal",
                     "--quiet", "--workers", "2"]) == 0
    return ds_root


@pytest.mark.parametrize("key", list(STAGES))
def test_atoms_equal_ds_to_universal(converted, key):
    ref = ds_reference(converted / key, converted / f"{key}_ref")
    ours = converted / f"{key}_kintsugi" / ref.name
    files = sorted(p.relative_to(ref) for p in (ref / "zero").rglob("*.pt") if p.name != "optimizer_state.pt")
    assert files == sorted(p.relative_to(ours) for p in (ours / "zero").rglob("*.pt") if p.name != "optimizer_state.pt")
    assert len(files) >= 24
    for f in files:
        assert same(load_pt(ref / f), load_pt(ours / f)), f
    assert (converted / f"{key}_kintsugi" / "latest_universal").read_text() == ref.name
    assert not list((converted / f"{key}_kintsugi").rglob("*.tmp"))


@pytest.mark.parametrize("world", [1, 3])
def test_deepspeed_resumes_from_kintsugi_universal_on_other_world_size(converted, world):
    mp.start_processes(ds_job, args=(world, free_port(), str(converted), "load"), nprocs=world, start_method="spawn")
    original = json.loads((converted / "losses_save_2.json").read_text())
    resumed = json.loads((converted / f"losses_load_{world}.json").read_text())
    for key in STAGES:
        assert resumed[key] == pytest.approx(original[key], rel=1e-6, abs=1e-7), key


def test_inspect_and_verify_deepspeed(converted, capsys):
    assert main(["inspect", str(converted / "zero3")]) == 0
    out = capsys.readouterr().out
    assert "format:  deepspeed" in out and "zero_stage=3, dp=2" in out and "step:    3" in out
    assert main(["verify", str(converted / "zero2"), str(converted / "zero2_kintsugi")]) == 0
    # ZeRO-1 and ZeRO-2 trained the same model in different precisions: verify must tell them apart
    assert main(["verify", str(converted / "zero1_bf16"), str(converted / "zero2")]) == 1


def test_truncated_and_missing_shards_are_user_errors(converted, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(converted / "zero2", bad)
    tag = bad / (bad / "latest").read_text().strip()
    victim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:300])
    with pytest.raises(SystemExit) as e:
        main(["convert", str(bad), str(tmp_path / "out"), "--to", "universal"])
    assert e.value.code == 2 and "truncated or corrupt" in capsys.readouterr().err
    victim.unlink()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(bad), str(tmp_path / "out"), "--to", "universal"])
    assert e.value.code == 2 and "shard" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
