"""Kintsugi trainer round trip: a native checkpoint saved under one layout ->
``kintsugi ckpt convert --to universal`` -> resume under another layout with
``--checkpoint.load_from=UNIVERSAL_DIR``. The continued run must be bit-identical to resuming
from the native checkpoint itself on the same target layout: the universal checkpoint
carries the same weights, optimizer state, data position and RNG; without MoE, both equal
the single-process run's."""
import pytest

from checkpoint.cli import main
from conftest import losses, train

MOE = ["--moe.every=2", "--moe.n_experts=4"]
CASES = {
    "tp2->fsdp2": ((2, ["--parallel.tp=2"]), (2, ["--parallel.dp_shard=2"])),
    "pp2->zero2": ((2, ["--parallel.pp=2"]), (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=2"])),
    "moe-ep2->ep1": ((2, ["--parallel.ep=2", *MOE]), (1, MOE)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_to_universal_resumes_on_another_layout(case, reference, tmp_path):
    (n_src, src), (n_dst, dst) = CASES[case]
    train(n_src, tmp_path / "a", "--train.steps=4", "--checkpoint.interval=2", *src)
    uni = tmp_path / "universal"
    assert main(["convert", str(tmp_path / "a" / "checkpoints"), str(uni), "--to", "universal", "--quiet"]) == 0
    assert main(["verify", str(tmp_path / "a" / "checkpoints"), str(uni)]) == 0
    for name, path in (("from_universal", uni), ("from_native", tmp_path / "a" / "checkpoints")):
        out = train(n_dst, tmp_path / name, "--train.steps=6", f"--checkpoint.load_from={path}", *dst)
        assert "resumed from step 4" in out.stdout
    got, want = losses(tmp_path / "from_universal"), losses(tmp_path / "from_native")
    assert sorted(got) == [5, 6] and got == want
    if "moe" not in case:  # the source's steps and the continued ones are the single-process run's
        for step, loss in {**losses(tmp_path / "a"), **got}.items():
            assert loss == pytest.approx(losses(reference)[step], rel=1e-5), (step, loss)
    assert main(["verify", str(tmp_path / "from_universal" / "checkpoints"), str(tmp_path / "from_native" / "checkpoints")]) == 0
