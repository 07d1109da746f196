"""The universal format, the pattern language, loading at any layout, and the CLI's contract
(dry run, atomic and resumable convert after a real kill -9, one-line errors with exit 2)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from checkpoint.cli import main
from checkpoint.convert import load_any
from checkpoint.patterns import Patterns, assemble
from checkpoint.state import Chunk
from checkpoint.store import save_state
from checkpoint.universal import Universal, load_universal
from comms import UserError

ROOT = Path(__file__).resolve().parents[1]


# -- the pattern language ---------------------------------------------------------------------

def tp_split(full, world, dim):
    return list(full.chunk(world, dim=dim))


def test_column_row_replicated_average_roundtrip():
    info = {"parameter_with_row_parallelism_patterns": [r".*\.wo\.weight$"],
            "tp_replicated_parameter_patterns": [r".*norm\.weight$"],
            "parameter_to_average_patterns": [r".*\.bias$"]}
    p = Patterns.from_deepspeed(info)
    w = torch.arange(24.0).reshape(4, 6)
    for name, dim in (("l.wq.weight", 0), ("l.wo.weight", 1)):
        full, extras = p.merge(name, tp_split(w, 2, dim))
        assert torch.equal(full, w) and extras["cat_dim"] == dim
        assert torch.equal(p.split(name, w, 1, 2), tp_split(w, 2, dim)[1])
    n = torch.ones(4)
    assert torch.equal(p.merge("l.norm.weight", [n, n])[0], n)
    with pytest.raises(UserError, match="TP-replicated"):
        p.merge("l.norm.weight", [n, n + 1])
    assert torch.equal(p.merge("l.bias", [n, n + 1])[0], n + 0.5)
    assert p.unused() == []


def test_gqa_qkv_uneven_sub_params_and_swiglu():
    # fused QKV: 4 query rows, 2 key rows, 2 value rows, over 2 tensor-parallel ranks
    q, k, v = torch.arange(4.0)[:, None], 10 + torch.arange(2.0)[:, None], 20 + torch.arange(2.0)[:, None]
    full = torch.cat([q, k, v])
    slices = [torch.cat([q[:2], k[:1], v[:1]]), torch.cat([q[2:], k[1:], v[1:]])]  # what each rank holds
    info = {"parameter_with_sub_params": [{"patterns": [r".*qkv"], "shape": [[4, 2, 2], 1], "partition_dim": 0}],
            "sub_param_shard_widths": {r".*qkv": [[2, 2], [1, 1], [1, 1]]},
            "parameter_with_2_sub_params_cat_dim_0": [r".*gate_up"]}
    p = Patterns.from_deepspeed(info)
    merged, extras = p.merge("l.qkv", slices)
    assert torch.equal(merged, full) and extras["sub_param_shape"]["partition_dim"] == 0
    assert all(torch.equal(p.split("l.qkv", full, r, 2), slices[r]) for r in range(2))
    gate, up = torch.arange(4.0), 10 + torch.arange(4.0)
    gu_slices = [torch.cat([gate[:2], up[:2]]), torch.cat([gate[2:], up[2:]])]
    assert torch.equal(p.merge("l.gate_up", gu_slices)[0], torch.cat([gate, up]))
    assert torch.equal(p.split("l.gate_up", torch.cat([gate, up]), 1, 2), gu_slices[1])
    bad = Patterns.from_deepspeed({**info, "sub_param_shard_widths": {r".*qkv": [[3, 2], [1, 1], [1, 1]]}})
    with pytest.raises(UserError, match="sub_param_shard_widths"):
        bad.merge("l.qkv", slices)


def test_vocabulary_padding_expert_and_unmatched_patterns():
    p = Patterns.from_deepspeed({"vocabulary_parameter_patterns": [r"embed"], "original_vocab_size": 5,
                                 "expert_parameter_patterns": [r".*experts"], "tp_replicated_parameter_patterns": ["nothing"]})
    emb = torch.arange(12.0).reshape(6, 2)  # 5 real rows padded to 6 for tp=2
    full, extras = p.merge("embed", tp_split(emb, 2, 0))
    assert torch.equal(full, emb[:5]) and extras["vocab_tensor"]
    assert p.split("embed", full, 1, 2).shape == (3, 2)  # re-padded for the target degree
    assert p.is_expert("moe.experts") and not p.is_expert("attn")
    assert p.unused() == ["nothing"]


def test_assemble_detects_missing_piece():
    a = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(assemble("t", (3, 2), [((0, 0), a[:2]), ((2, 0), a[2:])]), a)
    with pytest.raises(UserError, match="cover only 4 of 6"):
        assemble("t", (3, 2), [((0, 0), a[:2])])


# -- native -> universal -> any layout --------------------------------------------------------

@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    g = torch.Generator().manual_seed(0)
    full = {"model.w": torch.randn(7, 5, generator=g), "model.b": torch.randn(5, generator=g),
            "optim.state.w.exp_avg": torch.randn(7, 5, generator=g), "optim.state.w.step": torch.tensor(4.0)}
    state = {n: Chunk(t, tuple(t.shape), (0,) * t.dim(), True) for n, t in full.items()}
    state.update(step=4, rng={"seed": 1}, data={"position": 96})
    save_state(root / "ckpt", 4, state)
    return root, full


def layouts(full, world, dim):
    """Each rank's chunks when every 2-d tensor is split over ``world`` ranks on ``dim``."""
    for rank in range(world):
        state = {}
        for n, t in full.items():
            if t.dim() == 2:
                piece = torch.tensor_split(t, world, dim=dim)[rank]
                off = [0, 0]
                off[dim] = sum(p.shape[dim] for p in torch.tensor_split(t, world, dim=dim)[:rank])
                state[n] = Chunk(torch.zeros_like(piece), tuple(t.shape), tuple(off))
            else:
                state[n] = Chunk(torch.zeros_like(t), tuple(t.shape), (0,) * t.dim(), True)
        yield state


def test_native_to_universal_loads_at_any_layout(native):
    root, full = native
    assert main(["convert", str(root / "ckpt"), str(root / "uni"), "--to", "universal", "--quiet"]) == 0
    u = Universal(root / "uni")
    assert u.step == 4 and u.meta["objects"]["data"] == {"position": 96} and u.meta["source"]["format"] == "kintsugi"
    for world, dim in ((3, 0), (2, 1), (4, 0)):
        for state in layouts(full, world, dim):
            step, objects, missing = load_universal(root / "uni", state)
            assert step == 4 and objects["rng"] == {"seed": 1} and not missing
            for n, c in state.items():
                idx = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.shape))
                assert torch.equal(c.tensor, full[n][idx]), (n, world, dim)
    for src in ("ckpt", "uni"):  # load_any: native root through store.load_state, universal directly
        state = next(layouts(full, 2, 0))
        state["model.extra"] = Chunk(torch.zeros(2), (2,), (0,))
        step, _, missing = load_any(root / src, state, optional=lambda n: n == "model.extra")
        assert step == 4 and missing == {"model.extra"} and torch.equal(state["model.b"].tensor, full["model.b"])
    with pytest.raises(UserError, match="no tensor 'model.extra'"):
        load_universal(root / "uni", {"model.extra": Chunk(torch.zeros(2), (2,), (0,))})


def test_dry_run_prints_plan_and_writes_nothing(native, capsys):
    root, _ = native
    assert main(["convert", str(root / "ckpt"), str(root / "dry"), "--to", "dcp", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan: 4 tensors -> dcp" in out and "model.w" in out and "peak memory" in out and "output size: 304 B" in out
    assert not (root / "dry").exists() and not (root / "dry.partial").exists()


@pytest.mark.parametrize("argv, message", [
    (["convert", "{root}/nothing", "{root}/x", "--to", "universal"], "does not exist"),
    (["convert", "{root}", "{root}/y", "--to", "universal"], "not a checkpoint this tool knows"),
    (["convert", "{root}/ckpt", "{root}/ckpt", "--to", "universal"], "already exists"),
    (["convert", "{root}/ckpt", "{root}/z", "--to", "deepspeed-universal"], "needs the DeepSpeed engine"),
    (["convert", "{root}/ckpt", "{root}/z", "--to", "universal", "--max-memory", "lots"], "not a size"),
    (["inspect", "{root}/empty"], "not a checkpoint"),
])
def test_bad_input_is_one_line_exit_2(native, capsys, argv, message):
    root, _ = native
    (root / "empty").mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as e:
        main([a.format(root=root) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(root.glob("*.partial"))


def test_verify_finds_a_changed_value(native, capsys):
    root, full = native
    assert main(["convert", str(root / "ckpt"), str(root / "v"), "--to", "dcp", "--quiet"]) == 0
    assert main(["verify", str(root / "ckpt"), str(root / "v")]) == 0
    state = {n: Chunk(t.clone(), tuple(t.shape), (0,) * t.dim(), True) for n, t in full.items()}
    state["model.b"].tensor[3] += 1e-3
    save_state(root / "changed", 4, state)
    assert main(["verify", str(root / "changed"), str(root / "v")]) == 1
    assert "model.b: values differ" in capsys.readouterr().out


def test_killed_convert_resumes_and_finishes(tmp_path):
    """A real kill -9 in the middle of a conversion; the rerun writes only what is left."""
    g = torch.Generator().manual_seed(0)
    full = {f"model.layer{i:02d}": torch.randn(512, 1024, generator=g) for i in range(48)}  # 96 MiB
    save_state(tmp_path / "big", 1, {n: Chunk(t, tuple(t.shape), (0, 0), True) for n, t in full.items()})
    dst, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = [sys.executable, "-m", "checkpoint", "convert", str(tmp_path / "big"), str(dst), "--to", "universal",
           "--workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    while proc.poll() is None and len(list((partial / "atoms").glob("*.safetensors"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists() and partial.is_dir()
    before = {p.name: p.stat().st_ino for p in (partial / "atoms").glob("*.safetensors")}
    assert 3 <= len(before) < 48
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    assert dst.is_dir() and not partial.exists() and not list(dst.rglob("*.tmp"))
    after = {p.name: p.stat().st_ino for p in (dst / "atoms").glob("*.safetensors")}
    assert len(after) == 48 and all(after[n] == ino for n, ino in before.items())  # kept, not rewritten
    u = Universal(dst)
    assert all(torch.equal(u.read(n), t) for n, t in full.items())
