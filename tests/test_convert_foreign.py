"""Checkpoints Kintsugi did not write: a torchtitan-style DCP checkpoint (weights at the top
level, `optimizer.state.*`, the step in `train_state.step`, a pickled data-loader state),
renamed with --map/--prefix, exported as Hugging Face safetensors shards with their index,
and `verify`'s answers (nothing compared, tolerances, the first difference, JSON)."""
from __future__ import annotations

import io
import json
import pickle
from collections import OrderedDict

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from checkpoint.cli import main

WEIGHTS = {"tok_embeddings.weight": (64, 16), "layers.0.attention.wq.weight": (16, 16), "norm.weight": (16,),
           "output.weight": (64, 16)}


@pytest.fixture(scope="module")
def titan(tmp_path_factory):
    """What torchtitan's CheckpointManager saves (one process: dcp.save needs no group)."""
    root = tmp_path_factory.mktemp("titan")
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(*shape, generator=g) for n, shape in WEIGHTS.items()}
    log_steps = io.BytesIO()
    torch.save([10, 20, 30], log_steps)
    state = {**weights,
             "optimizer": {"state": {n: {"exp_avg": torch.randn(*s, generator=g), "step": torch.tensor(37.0)}
                                     for n, s in WEIGHTS.items()}},
             "train_state": {"step": torch.tensor(37, dtype=torch.int32), "log_steps": log_steps},
             "dataloader": {"dp_rank_0": io.BytesIO(pickle.dumps(OrderedDict(position=1184)))}}
    dcp.save(state, checkpoint_id=str(root / "step-37"))
    rules = root / "titan.map"
    rules.write_text("# torchtitan -> Kintsugi names\n^optimizer\\.state\\. optim.state.\n^train_state\\. -\n")
    return root, weights


def test_inspect_reads_the_train_state_step_and_skips_pickles(titan, capsys):
    root, _ = titan
    assert main(["inspect", str(root / "step-37"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["format"] == "dcp" and got["step"] == 37
    assert "tok_embeddings.weight" in got["tensors"] and got["tensors"]["norm.weight"]["shape"] == [16]
    assert "train_state.log_steps" in got["objects"] and "dataloader.dp_rank_0" not in got["objects"]


def test_nothing_to_write_is_exit_2(titan, capsys):
    root, _ = titan
    with pytest.raises(SystemExit) as e:
        main(["convert", str(root / "step-37"), str(root / "none"), "--to", "safetensors", "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "nothing to write" in err and "--prefix model." in err and err.count("\n") == 1
    assert not (root / "none").exists() and not (root / "none.partial").exists()


def test_renamed_export_to_hugging_face_shards(titan, capsys):
    root, weights = titan
    names = ["--map", str(root / "titan.map"), "--prefix", "model."]
    assert main(["convert", str(root / "step-37"), str(root / "hf"), "--to", "safetensors", "--max-shard-size", "5K",
                 "--quiet", *names]) == 0
    index = json.loads((root / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in weights.values())
    loaded = {k: v for f in files for k, v in load_file(root / "hf" / f).items()}
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[n], t) for n, t in weights.items())
    # read back through the index: equal to the source, seen through the same names
    assert main(["verify", str(root / "step-37"), str(root / "hf"), *names]) == 0
    assert main(["convert", str(root / "step-37"), str(root / "uni"), "--to", "universal", "--quiet", *names]) == 0
    capsys.readouterr()
    assert main(["inspect", str(root / "uni"), "--json"]) == 0
    uni = json.loads(capsys.readouterr().out)
    assert uni["step"] == 37 and sorted(uni["tensors"]) == sorted(
        [f"model.{n}" for n in WEIGHTS] + [f"optim.state.{n}.{k}" for n in WEIGHTS for k in ("exp_avg", "step")])


def test_verify_answers(titan, tmp_path, capsys):
    root, weights = titan
    # disjoint names: nothing compared is a failure, not "equal"
    other = {f"model.{n}": t for n, t in weights.items()}
    dcp.save(other, checkpoint_id=str(tmp_path / "other"))
    assert main(["verify", str(root / "step-37"), str(tmp_path / "other")]) == 1
    assert "compared nothing" in capsys.readouterr().out
    # a nudged weight: named as the first difference; tolerances decide
    nudged = {n: t.clone() for n, t in other.items()}
    nudged["model.norm.weight"][3] += 1e-4
    dcp.save(nudged, checkpoint_id=str(tmp_path / "nudged"))
    assert main(["verify", str(tmp_path / "other"), str(tmp_path / "nudged")]) == 1
    assert "the first: model.norm.weight: values differ" in capsys.readouterr().out.splitlines()[-1]
    assert main(["verify", str(tmp_path / "other"), str(tmp_path / "nudged"), "--atol", "1e-3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["compared"] == len(WEIGHTS)
    # a subset: different unless --allow-subset
    dcp.save({k: v for k, v in other.items() if "norm" not in k}, checkpoint_id=str(tmp_path / "subset"))
    assert main(["verify", str(tmp_path / "other"), str(tmp_path / "subset")]) == 1
    assert main(["verify", str(tmp_path / "other"), str(tmp_path / "subset"), "--allow-subset"]) == 0
