"""Interop with torch DCP: an FSDP2 job's dcp.save converts to universal and to safetensors
equal to torch's own dcp_to_torch_save, and Kintsugi's --to dcp loads with dcp.load into an
FSDP2 model on another world size. Real gloo process groups, real files."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from checkpoint.cli import main
from checkpoint.universal import Universal
from comms import dist_utils
from diagnostics.drill import free_port


def make_model() -> nn.Module:
    torch.manual_seed(0)
    # 7 and 5 rows do not split evenly over 2 or 3 ranks: uneven FSDP shards
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5))


def fsdp_job(rank: int, world: int, port: int, ckpt: str, mode: str, out: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()  # creates the Adam state (overwritten when loading)
    opt.step()
    opt.zero_grad()
    if mode == "save":
        for _ in range(2):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    else:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        msd, osd = get_state_dict(model, opt)
        full = {f"model.{k}": v.full_tensor() for k, v in msd.items()}
        full.update({f"optim.state.{k}.{s}": (v.full_tensor() if hasattr(v, "full_tensor") else v)
                     for k, st in osd["state"].items() for s, v in st.items()})
        if rank == 0:
            torch.save(full, out)
    dist_utils.exit_process()


@pytest.fixture(scope="module")
def fsdp_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp")
    mp.start_processes(fsdp_job, args=(2, free_port(), str(root / "fsdp"), "save", ""), nprocs=2, start_method="spawn")
    dcp_to_torch_save(root / "fsdp", root / "torch.pt")
    ref = torch.load(root / "torch.pt", weights_only=True)
    return root, ref


def flat_ref(ref: dict) -> dict:
    out = {f"model.{k}": v for k, v in ref["model"].items()}
    out.update({f"optim.state.{k}.{s}": v for k, st in ref["optim"]["state"].items() for s, v in st.items()})
    return out


def test_dcp_to_universal_equals_dcp_to_torch_save(fsdp_ckpt):
    root, ref = fsdp_ckpt
    assert main(["convert", str(root / "fsdp"), str(root / "uni"), "--to", "universal", "--quiet"]) == 0
    u = Universal(root / "uni")
    expected = flat_ref(ref)
    assert sorted(u.tensors) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(u.read(name), t), name
    meta = json.loads((root / "uni" / "universal.json").read_text())
    assert meta["source"]["format"] == "dcp"
    assert meta["objects"]["optim.param_groups.0.lr"] == 1e-2


def test_dcp_to_safetensors_equals_dcp_to_torch_save(fsdp_ckpt):
    root, ref = fsdp_ckpt
    assert main(["convert", str(root / "fsdp"), str(root / "st"), "--to", "safetensors", "--quiet"]) == 0
    weights = load_file(root / "st" / "model.safetensors")
    assert weights.keys() == ref["model"].keys()
    for k, v in ref["model"].items():
        assert torch.equal(weights[k], v), k
    assert main(["convert", str(root / "fsdp"), str(root / "st16"), "--to", "safetensors", "--dtype", "bfloat16", "--quiet"]) == 0
    w16 = load_file(root / "st16" / "model.safetensors")
    assert all(w16[k].dtype == torch.bfloat16 and torch.equal(w16[k], v.bfloat16()) for k, v in ref["model"].items())
    assert main(["verify", str(root / "fsdp"), str(root / "st16")]) == 0


def test_kintsugi_dcp_loads_into_fsdp2_on_another_world_size(fsdp_ckpt):
    root, ref = fsdp_ckpt
    assert main(["convert", str(root / "fsdp"), str(root / "uni3"), "--to", "universal", "--quiet"]) == 0
    assert main(["convert", str(root / "uni3"), str(root / "back"), "--to", "dcp", "--quiet"]) == 0
    out = root / "loaded.pt"
    mp.start_processes(fsdp_job, args=(3, free_port(), str(root / "back"), "load", str(out)), nprocs=3, start_method="spawn")
    loaded = torch.load(out, weights_only=True)
    for name, t in flat_ref(ref).items():
        assert torch.equal(loaded[name], t), name
    assert main(["verify", str(root / "fsdp"), str(root / "back")]) == 0
