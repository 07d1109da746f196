"""Kintsugi trainer round trip: a native checkpoint saved under tensor parallelism ->
``kintsugi ckpt convert --to universal`` -> resume under FSDP2 with
``--checkpoint.load_from=UNIVERSAL_DIR``. The continued run must be bit-identical to resuming
from the native checkpoint itself on the same target layout: the universal checkpoint
carries the same weights, optimizer state, data position and RNG."""
import pytest

import checkpoint
from checkpoint.cli import main
from conftest import losses, train

pytestmark = pytest.mark.skipif(not hasattr(checkpoint, "load_any"),
                                reason="needs checkpoint.load_any exported and called by Checkpointer.restore")


def test_native_to_universal_resumes_on_another_layout(tmp_path):
    train(2, tmp_path / "a", "--train.steps=4", "--checkpoint.interval=2", "--parallel.tp=2")
    uni = tmp_path / "universal"
    assert main(["convert", str(tmp_path / "a" / "checkpoints"), str(uni), "--to", "universal", "--quiet"]) == 0
    assert main(["verify", str(tmp_path / "a" / "checkpoints"), str(uni)]) == 0
    for name, src in (("from_universal", uni), ("from_native", tmp_path / "a" / "checkpoints")):
        out = train(2, tmp_path / name, "--train.steps=6", f"--checkpoint.load_from={src}", "--parallel.dp_shard=2")
        assert "resumed from step 4" in out.stdout
    got, want = losses(tmp_path / "from_universal"), losses(tmp_path / "from_native")
    assert sorted(got) == [5, 6] and got == want
    assert main(["verify", str(tmp_path / "from_universal" / "checkpoints"), str(tmp_path / "from_native" / "checkpoints")]) == 0
