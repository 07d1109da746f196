"""DeepSpeed source layouts beyond plain ZeRO: MoE expert files, pipeline stages, AutoTP shards.

One 2-rank job (CPU accelerator, gloo) trains three tiny models a few steps and saves each with
DeepSpeed's own save_checkpoint:
  moe  deepspeed.moe.layer.MoE, 4 experts, ep_size 2, ZeRO-2: layer_0_expert_{0..3}_mp_rank_00
       files, each rank's two experts named locally (deepspeed_experts.0/1) in its zero file
  pp   deepspeed.pipe.PipelineModule over 2 stages, ZeRO-1: layer_XX-model_states.pt files and
       one zero file per stage (mp_rank_00, mp_rank_01); a TiedLayerSpec on both stages
  tp   AutoTP (``"tensor_parallel": {"autotp_size": 2}``), ZeRO-1: mp_rank_00/01 shards with
       the affine_map AutoTP records in universal_checkpoint_info
Each is converted to universal and deepspeed-universal, compared with DeepSpeed's own
ds_to_universal where DeepSpeed can convert the layout, and inspected. The MoE job then
continues from the deepspeed-universal conversion on an ep_size 1 engine.
"""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from checkpoint.cli import main
from checkpoint.convert import detect
from checkpoint.convert.deepspeed import load_pt
from checkpoint.patterns import Patterns
from comms import UserError
from diagnostics.drill import free_port
from tests.test_ucp_deepspeed import ds_init, ds_reference, same

os.environ.setdefault("DS_ACCELERATOR", "cpu")
slow = pytest.mark.slow  # two launches of 2 ranks, four DeepSpeed engines (~12 s per start)
EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"


def moe_net(ep_size: int) -> nn.Module:
    from deepspeed.moe.layer import MoE

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 8)
            self.moe = MoE(hidden_size=8, expert=nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)),
                           num_experts=4, ep_size=ep_size, k=1, min_capacity=8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            h, aux, _ = self.moe(torch.relu(self.inp(x)))
            return self.out(h), aux

    torch.manual_seed(0)
    return Net()


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc = nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.relu(self.fc(x))


class TPNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(6, 16)  # column-parallel under AutoTP
        self.down = nn.Linear(16, 6)  # row-parallel
        self.norm = nn.LayerNorm(6)  # replicated
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(self.down(torch.relu(self.up(x)))))


ADAM = {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}}
TP_SPECS = {"use_default_specs": False, "layer_specs": [
    {"patterns": [r".*up\.weight$", r".*up\.bias$"], "partition_type": "column"},
    {"patterns": [r".*down\.weight$"], "partition_type": "row"}]}


def moe_engine(world: int, ep_size: int, load_universal: bool):
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    net = moe_net(ep_size)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(net.parameters()), "name": "params"})
    cfg = {"train_batch_size": 8 * world, "train_micro_batch_size_per_gpu": 8, "optimizer": ADAM,
           "zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": load_universal}}
    return deepspeed.initialize(model=net, model_parameters=groups, config=cfg)[0]


def moe_step(engine, batch) -> float:
    x, y = batch
    out, aux = engine(x)
    loss = ((out - y) ** 2).mean() + 0.01 * aux
    engine.backward(loss)
    engine.step()
    return loss.item()


def ds_job(rank: int, world: int, port: int, root: str, mode: str):
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

    ds_init(rank, world, port)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(6)]
    if mode == "load":  # every rank holds all 4 experts: the universal atoms carry the global names
        engine = moe_engine(world, ep_size=1, load_universal=True)
        engine.load_checkpoint(f"{root}/moe_ds_universal")
        losses = [moe_step(engine, batches[i]) for i in (3, 4)]
        if rank == 0:
            Path(f"{root}/moe_losses_load.json").write_text(json.dumps(losses))
        return

    engine = moe_engine(world, ep_size=2, load_universal=False)
    for i in range(3):
        moe_step(engine, batches[i])
    engine.save_checkpoint(f"{root}/moe")
    losses = [moe_step(engine, batches[i]) for i in (3, 4)]
    if rank == 0:
        Path(f"{root}/moe_losses_save.json").write_text(json.dumps(losses))
    engine.destroy()

    torch.manual_seed(0)
    tied = TiedLayerSpec("mix", nn.Linear, 6, 6, tied_weight_attr=["weight", "bias"])  # in stage 0 and stage 1
    net = PipelineModule([tied, LayerSpec(Block, 6, 10), LayerSpec(Block, 10, 6), tied, LayerSpec(nn.Linear, 6, 3)],
                         num_stages=2, loss_fn=nn.MSELoss(), partition_method="uniform")
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2,
           "optimizer": ADAM, "zero_optimization": {"stage": 1}}
    engine = deepspeed.initialize(model=net, model_parameters=list(net.parameters()), config=cfg)[0]
    for i in range(3):
        engine.train_batch(iter([batches[i], batches[i + 1]]))
    engine.save_checkpoint(f"{root}/pp")
    engine.destroy()

    torch.manual_seed(0)
    net = TPNet()
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "optimizer": ADAM,
           "zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 2, "partition_config": TP_SPECS}}
    engine = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)[0]
    for i in range(3):
        x, y = batches[i]
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(f"{root}/tp")
    engine.destroy()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dslayouts")
    mp.start_processes(ds_job, args=(2, free_port(), str(root), "save"), nprocs=2, start_method="spawn")
    for key in ("moe", "pp", "tp"):
        for to, out in (("universal", f"{key}_universal"), ("deepspeed-universal", f"{key}_ds_universal")):
            assert main(["convert", str(root / key), str(root / out), "--to", to, "--quiet", "--workers", "2"]) == 0
    return root


def tag_dir(root: Path, latest: str = "latest") -> Path:
    return root / (root / latest).read_text().strip()


def plain(obj):
    """DeepSpeed's LossScaler compares by identity: compare its fields."""
    return {k: vars(v) if hasattr(v, "__dict__") else v for k, v in obj.items()} if isinstance(obj, dict) else obj


def atoms_equal_reference(layouts: Path, key: str, min_files: int):
    """Every file ds_to_universal --inject_missing_state writes, written the same by us."""
    ref = ds_reference(layouts / key, layouts / f"{key}_ref")
    ours = layouts / f"{key}_ds_universal" / ref.name
    files = sorted(p.relative_to(ref) for p in (ref / "zero").rglob("*.pt"))
    assert files == sorted(p.relative_to(ours) for p in (ours / "zero").rglob("*.pt"))
    assert len(files) >= min_files
    for f in files:
        assert same(plain(load_pt(ref / f)), plain(load_pt(ours / f))), f
    assert main(["verify", str(layouts / f"{key}_ref"), str(layouts / f"{key}_universal")]) == 0


@slow
def test_pipeline_stages_equal_ds_to_universal(layouts, capsys):
    atoms_equal_reference(layouts, "pp", min_files=33)
    # the stages' layer files hold the module weights: the fp32 atoms are them (fp32 training)
    src = detect(layouts / "pp")
    layers = {idx: load_pt(tag_dir(layouts / "pp") / f"layer_{idx:02d}-model_states.pt") for idx in range(5)}
    for idx, key in ((1, "fc.weight"), (2, "fc.bias"), (4, "weight")):
        assert torch.equal(src.read(f"model.{idx}.{key}"), layers[idx][key])
    # the tied layer is read once, from the first stage; the last stage's copy is the same
    assert torch.equal(src.read("model.tied_modules.mix.weight"), layers[3]["weight"])
    assert src.layout["pp"] == 2 and len(src.copies) == 2
    capsys.readouterr()
    assert main(["inspect", str(layouts / "pp")]) == 0
    out = capsys.readouterr().out
    assert "dp=1, tp=1, pp=2" in out and "model.tied_modules.mix.bias" in out and "missing: nothing" in out


@slow
def test_autotp_shards_equal_ds_to_universal(layouts, capsys):
    atoms_equal_reference(layouts, "tp", min_files=33)
    src = detect(layouts / "tp")
    assert src.tensors["model.up.weight"].shape == (16, 6) and src.tensors["model.down.weight"].shape == (6, 16)
    # the affine map's inverse gives back each rank's own shard
    up = src.read("model.up.weight")
    for r in range(2):
        shard = load_pt(tag_dir(layouts / "tp") / f"mp_rank_{r:02d}_model_states.pt")["module"]["up.weight"]
        assert torch.equal(src.patterns.split("up.weight", up, r, 2), shard)
    capsys.readouterr()
    assert main(["inspect", str(layouts / "tp_universal")]) == 0
    assert "tp=2" in capsys.readouterr().out


@slow
def test_moe_experts_under_global_names(layouts, capsys):
    tag = tag_dir(layouts / "moe")
    # DeepSpeed's converter concatenates the two ranks' different local experts and fails
    with pytest.raises(RuntimeError, match="is invalid for input of size"):
        ds_reference(layouts / "moe", layouts / "moe_ref")
    src = detect(layouts / "moe")
    assert src.layout["ep"] == 2 and src.layout["experts"] == [4]
    for e in range(4):
        weights = load_pt(tag / f"layer_0_expert_{e}_mp_rank_00_model_states.pt")
        for key, w in weights.items():
            assert key.startswith(f"{EXPERTS}.{e}.")
            assert torch.equal(src.read(f"model.{key}"), w), key
    # global expert 3 is rank 1's local expert 1: its Adam moments come from rank 1's zero file
    osd = load_pt(tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
    frag = osd["param_slice_mappings"][1][f"{EXPERTS}.1.0.weight"]
    moment = osd["base_optimizer_state"]["state"][1]["exp_avg"][frag.start:frag.start + frag.numel]
    assert torch.equal(src.read(f"optim.state.{EXPERTS}.3.0.weight.exp_avg").reshape(-1), moment)
    assert main(["verify", str(layouts / "moe"), str(layouts / "moe_universal")]) == 0
    assert main(["verify", str(layouts / "moe_universal"), str(layouts / "moe_ds_universal")]) == 0
    zero = tag_dir(layouts / "moe_ds_universal", "latest_universal") / "zero"
    assert sorted(p.name for p in zero.glob(f"{EXPERTS}.*.0.weight")) == [f"{EXPERTS}.{e}.0.weight" for e in range(4)]
    capsys.readouterr()
    assert main(["inspect", str(layouts / "moe")]) == 0
    out = capsys.readouterr().out
    assert "experts=[4], ep=2" in out and f"optim.state.{EXPERTS}.3.2.bias.exp_avg_sq" in out


@slow
def test_deepspeed_continues_moe_from_kintsugi_universal_at_ep1(layouts):
    mp.start_processes(ds_job, args=(2, free_port(), str(layouts), "load"), nprocs=2, start_method="spawn")
    original = json.loads((layouts / "moe_losses_save.json").read_text())
    resumed = json.loads((layouts / "moe_losses_load.json").read_text())
    assert resumed == pytest.approx(original, rel=1e-5, abs=1e-6)


def convert_fails(src: Path, dst: Path, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["convert", str(src), str(dst), "--to", "universal"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()
    return err


@slow
def test_missing_expert_and_layer_files_and_mismatched_counts(layouts, tmp_path, capsys):
    bad = tmp_path / "moe"
    shutil.copytree(layouts / "moe", bad)
    tag = tag_dir(bad)
    extra = tag / "layer_0_expert_4_mp_rank_00_model_states.pt"
    shutil.copyfile(tag / "layer_0_expert_3_mp_rank_00_model_states.pt", extra)
    assert "mismatched expert counts" in convert_fails(bad, tmp_path / "out", capsys)
    extra.unlink()
    (tag / "layer_0_expert_2_mp_rank_00_model_states.pt").unlink()
    err = convert_fails(bad, tmp_path / "out", capsys)
    assert "layer_0_expert_2_mp_rank_00_model_states.pt is missing" in err and "3 of the 4 expert files" in err

    bad = tmp_path / "pp"
    shutil.copytree(layouts / "pp", bad)
    layer_file = tag_dir(bad) / "layer_02-model_states.pt"
    layer_file.rename(layer_file.with_suffix(".moved"))
    assert "layer_02-model_states.pt is missing" in convert_fails(bad, tmp_path / "out", capsys)
    layer_file.with_suffix(".moved").rename(layer_file)
    # a "tied" weight whose stage copies differ (TiedLayerSpec ties only tied_weight_attr) has no one value
    last = tag_dir(bad) / "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    sd = load_pt(last, mmap=False)
    frag = sd["optimizer_state_dict"]["param_slice_mappings"][0]["tied_modules.mix.bias"]
    sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][0].data[frag.start] += 1
    torch.save(sd, last)
    assert "pipeline stages 0 and 1 with different values" in convert_fails(bad, tmp_path / "out", capsys)

    bad = tmp_path / "tp"
    shutil.copytree(layouts / "tp", bad)
    (tag_dir(bad) / "zero_pp_rank_0_mp_rank_01_optim_states.pt").unlink()
    assert "shard" in convert_fails(bad, tmp_path / "out", capsys)


def test_affine_map_rebuilds_and_splits_with_scale_and_replicas():
    """AutoTP's affine_map: a row-split weight and a replicated bias pre-divided by the TP degree."""
    split_rows = {"logical_shape": [4, 2], "ranks": {
        r: {"shard_shape": [2, 2], "pieces": [{"shape": [2, 2], "source": [4 * r, [2, 1]], "dest": [0, [2, 1]],
                                               "locations": [r]}]} for r in (0, 1)}}
    halved = {"logical_shape": [3], "ranks": {
        r: {"shard_shape": [3], "pieces": [{"shape": [3], "source": [0, [1]], "dest": [0, [1]], "locations": [0, 1],
                                            "scale": 0.5}]} for r in (0, 1)}}
    p = Patterns.from_deepspeed({"parameter_with_row_parallelism_patterns": [r"^w$"],  # superseded by the map
                                 "affine_map": {"version": 1, "params": {r"^w$": split_rows, r"^b$": halved}}})
    w, b = torch.arange(8.0).view(4, 2), torch.tensor([1.0, 2.0, 3.0])
    merged, extras = p.merge("w", [w[:2], w[2:]])
    assert torch.equal(merged, w) and extras == {} and p.unused() == []
    assert torch.equal(p.split("w", w, 1, 2), w[2:])
    assert torch.equal(p.merge("b", [b / 2, b / 2])[0], b) and torch.equal(p.split("b", b, 0, 2), b / 2)
    with pytest.raises(UserError, match="different values"):
        p.merge("b", [b / 2, b])
    with pytest.raises(UserError, match="stored scaled"):  # Adam's moments would need lr and eps rescaled too
        p.merge("b", [b / 2, b / 2], "exp_avg")
    with pytest.raises(UserError, match="newer"):
        Patterns.from_deepspeed({"affine_map": {"version": 2, "params": {}}})
