"""Every parallel layout reproduces the single-process run: same seed, same data, same
losses (fp32 on CPU; reductions differ in order, so to 1e-5 relative). FSDP2 x2, TP x2 and
ZeRO-3 are checked where they are the source of a resume (tests/test_resume.py,
tests/test_ucp_trainer.py), with the same tolerance."""
from __future__ import annotations

import pytest

from conftest import losses, train

LAYOUTS = {
    "ddp2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"]),
    "pp2-1f1b": (2, ["--parallel.pp=2", "--parallel.pp_schedule=1F1B"]),
    "pp4-eager-1f1b": (4, ["--parallel.pp=4", "--parallel.pp_microbatches=8"]),  # warm-ups 5,4,3,1 of 8
    "pp2-gpipe-uneven": (2, ["--parallel.pp=2", "--parallel.pp_schedule=GPipe", "--parallel.pp_layers=[1,3]"]),
    "fsdp2xtp2": (4, ["--parallel.dp_shard=2", "--parallel.tp=2"]),
    "ddp2-accum2": (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--train.grad_accum=2"]),
    "zero1": (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=1"]),
    "zero2": (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=2"]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, reference, tmp_path):
    nproc, flags = LAYOUTS[name]
    train(nproc, tmp_path, "--train.steps=4", *flags)
    got, want = losses(tmp_path), losses(reference)
    assert sorted(got) == [1, 2, 3, 4]
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"{name} step {step}: {got[step]} vs {want[step]}"
    # the loss really moves: the runs are training, not comparing constants
    assert got[4] < got[1] - 0.3


MOE = ["--moe.every=2", "--moe.n_experts=4", "--moe.top_k=2"]


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("moe_reference")
    train(1, run_dir, "--train.steps=6", *MOE)
    return run_dir


@pytest.mark.parametrize("overlap", ["true", "false"])
def test_moe_expert_parallel_matches_single_process(overlap, moe_reference, tmp_path):
    """EP x2: experts split over 2 ranks, all-to-all dispatch; gradients reduced either in
    the gaps of the MoE backward (grad_overlap) or by DDP plus an expert-grad sync."""
    train(2, tmp_path, "--train.steps=4", "--parallel.ep=2", f"--moe.grad_overlap={overlap}", *MOE)
    got, want = losses(tmp_path), losses(moe_reference)
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=1e-5)


def test_bf16_autocast_trains(reference, tmp_path):
    """bf16 autocast on FSDP2 x2: close to the fp32 run (bf16 has 8 mantissa bits), and learning."""
    train(2, tmp_path, "--train.steps=4", "--train.dtype=bf16")
    got, want = losses(tmp_path), losses(reference)
    for step in got:
        assert got[step] == pytest.approx(want[step], rel=2e-2)
    assert got[4] < got[1] - 0.3
