"""MoE with expert parallelism on real gloo process groups (2 and 4 ranks).

Each spawn runs several checks in one process group, because starting processes is the
expensive part on a 2-core machine.
"""
import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import flatten, load_state, save_state
from comms import dist_utils
from comms.moe import build_ep_groups, measure
from trainer.config import ModelConfig
from trainer.model import Transformer, lm_loss
from trainer.moe import MoE, apply_expert_parallel, attach_grad_reducer, moe_layers, sync_expert_grads
from trainer.parallelize import clip_grad_norm
from trainer.moe_config import MoEConfig

ROUTERS = ["switch", "gshard", "expert_choice", "sigmoid"]
TOL = dict(rtol=1e-5, atol=1e-6)


def layer_cfg(router, **kw):
    base = dict(every=1, n_experts=4, top_k=1 if router == "switch" else 2, router=router,
                shared_experts=1 if router == "sigmoid" else 0, capacity_factor=1.0)
    return MoEConfig(**{**base, **kw})


def init(rank, world, tmp):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)


def fwd_bwd(model, x):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = model(x)
    (y.square().sum() + model.aux_loss).backward()
    return y.detach(), x.grad


def check_layer(groups, router, dp_size, expert_dp=None, chunks=("1", "2", "4")):
    """EP layer == unchunked EP layer == one process running the same experts on my tokens."""
    rank_in_ep = groups.mesh.get_local_rank()
    torch.manual_seed(0)
    ref = MoE(16, 24, layer_cfg(router))
    holder = nn.ModuleDict({"moe": copy.deepcopy(ref)})
    apply_expert_parallel(holder, groups.mesh, groups)
    ep = holder["moe"]
    torch.manual_seed(100 + dist.get_rank())
    x = torch.randn(3, 12, 16)
    y_ref, gx_ref = fwd_bwd(ref, x)
    full = {n: ref.experts.get_parameter(n).grad.clone() for n in ("w1", "w3", "w2")}
    for g in full.values():  # experts see every rank's tokens: the reference sums over ranks
        dist.all_reduce(g)
    if expert_dp is not None:
        for g in full.values():
            g.div_(dp_size)
    local = groups.ep and ref.cfg.n_experts // groups.ep
    # The setup must exercise packing: some expert's rows over all sources fall short of
    # ep x the fullest block, so receivers skip padding.
    counts = ep.scheduler.agree_counts(ep.router(x).counts)
    assert ref.cfg.router == "expert_choice" or (counts.sum(0) < groups.ep * counts.max()).any()
    for d in chunks:
        ep.scheduler.chunks = d
        y, gx = fwd_bwd(ep, x)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(gx, gx_ref, **TOL)
        torch.testing.assert_close(ep.router.gate.weight.grad, ref.router.gate.weight.grad, **TOL)
        if expert_dp is not None:
            sync_expert_grads(holder, expert_dp, dp_size)
        for n, g in full.items():
            mine = ep.experts.get_parameter(n).grad.to_local()
            torch.testing.assert_close(mine, g[rank_in_ep * local:(rank_in_ep + 1) * local], **TOL)


def tiny_model(seed=42, chunks="2"):
    mcfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, max_seq_len=16)
    model = Transformer(mcfg, MoEConfig(every=2, n_experts=4, top_k=2, router="gshard", chunks=chunks))
    model.init_weights(seed)
    return model


def check_transformer(groups, rank, world, use_reducer):
    """MoE Transformer, EP x2 inside DP x4: same loss, gradients, clipped norm and AdamW
    step as one process; optimizer state carries the experts' global geometry."""
    torch.manual_seed(7)
    tokens = torch.randint(0, 64, (2 * world, 17))
    ref = tiny_model()
    ref_loss = lm_loss(ref(tokens[:, :-1]), tokens[:, 1:]) + ref.aux_loss()
    ref_loss.backward()
    model = tiny_model()
    names = apply_expert_parallel(model, groups.mesh, groups)
    assert names == {f"layers.1.feed_forward.experts.{w}" for w in ("w1", "w3", "w2")}
    mine = tokens[2 * rank:2 * rank + 2]
    if use_reducer:
        reducer = attach_grad_reducer(model, groups, names)
        reducer.arm()
        loss = lm_loss(model(mine[:, :-1]), mine[:, 1:]) + model.aux_loss()
        loss.backward()
        reducer.finish()
    else:
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(names))
        ddp = DDP(model)
        loss = lm_loss(ddp(mine[:, :-1]), mine[:, 1:]) + model.aux_loss()
        loss.backward()
        sync_expert_grads(model, groups.expert_dp, world)
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, ref_loss.detach(), rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    rank_in_ep, ep = groups.mesh.get_local_rank(), groups.ep
    for name, p in model.named_parameters():
        want = ref_params[name].grad
        if name in names:
            n = want.shape[0] // ep
            got, want = p.grad.to_local(), want[rank_in_ep * n:(rank_in_ep + 1) * n]
        else:
            got = p.grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item()
    assert abs(clip_grad_norm(model.parameters(), 0.5) - ref_norm) <= 1e-5 * ref_norm
    # eps=1e-3: Adam's first step is lr g/(|g|+eps), which for eps << |g| turns fp noise on
    # near-zero gradients into whole sign flips; a large eps keeps the comparison well-posed.
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, eps=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)
    ref_opt.step()
    opt.step()
    for name, p in model.named_parameters():
        want = ref_params[name].detach()
        if name in names:
            n = want.shape[0] // ep
            got, want = p.detach().to_local(), want[rank_in_ep * n:(rank_in_ep + 1) * n]
        else:
            got = p.detach()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"after step {name}: {m}")
    osd = flatten(get_optimizer_state_dict(model, opt))
    avg = osd["state.layers.1.feed_forward.experts.w1.exp_avg"]
    assert avg.global_shape[0] == 4 and avg.offsets[0] == 2 * rank_in_ep and not avg.replica
    for m in moe_layers(model).values():
        m.scheduler.close()


def worker2(rank, world, tmp):
    init(rank, world, tmp)
    groups = build_ep_groups(2, "cpu", ranks_per_node=2)
    assert not groups.hierarchical
    for router in ROUTERS:
        check_layer(groups, router, world)
    # Online profile: every rank gets the same numbers (else they would pick different d).
    prof = measure(groups, 16, 24, 2)
    profiles = dist_utils.all_gather_object(prof.to_dict())
    assert profiles[0] == profiles[1] and prof.a2a.alpha >= 0 and prof.a2a.beta >= 0 and 0 <= prof.overlap <= 1
    check_layer(groups, "gshard", world, chunks=("auto",))
    # Checkpoints: load the ep=1 save into ep=2, then save ep=2 for the parent to load at ep=1.
    model = tiny_model(seed=1)
    apply_expert_parallel(model, groups.mesh, groups)
    load_state(Path(tmp) / "ep1", flatten(get_model_state_dict(model)))
    full = dict(tiny_model(seed=7).named_parameters())
    for name, p in model.named_parameters():
        if hasattr(p, "to_local"):
            n = full[name].shape[0] // 2
            assert torch.equal(p.to_local(), full[name][rank * n:(rank + 1) * n].detach()), name
        else:
            assert torch.equal(p.detach(), full[name].detach()), name
    model = tiny_model(seed=42)
    apply_expert_parallel(model, groups.mesh, groups)
    sd = flatten(get_model_state_dict(model))
    chunk = sd["layers.1.feed_forward.experts.w1"]
    assert chunk.global_shape[0] == 4 and chunk.offsets[0] == 2 * rank and not chunk.replica
    save_state(Path(tmp) / "ep2", 3, sd)
    dist_utils.exit_process()


def worker4(rank, world, tmp):
    init(rank, world, tmp)
    # EP over all 4 ranks, pretending 2 ranks per node: the hierarchical exchange.
    hier = build_ep_groups(4, "cpu", ranks_per_node=2)
    assert hier.hierarchical
    for router in ROUTERS:
        check_layer(hier, router, world)
    # Two EP groups of 2 (ranks {0,1}, {2,3}): expert grads summed over the expert-DP group.
    groups = build_ep_groups(2, "cpu", ranks_per_node=4)
    for router in ("gshard", "expert_choice"):
        check_layer(groups, router, world, expert_dp=groups.expert_dp)
    check_transformer(groups, rank, world, use_reducer=False)
    check_transformer(groups, rank, world, use_reducer=True)
    dist_utils.exit_process()


def test_expert_parallel_x2_layers_and_checkpoint_resharding(tmp_path):
    src = tiny_model(seed=7)
    save_state(tmp_path / "ep1", 1, flatten(get_model_state_dict(src)))
    mp.spawn(worker2, args=(2, str(tmp_path)), nprocs=2)
    # ep=2 -> ep=1 (this process, no process group).
    model = tiny_model(seed=1)
    step, _, _ = load_state(tmp_path / "ep2", flatten(get_model_state_dict(model)))
    assert step == 3
    want = dict(tiny_model(seed=42).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), want[name].detach()), name


def test_expert_parallel_x4_hierarchical_and_transformer_matches_one_process(tmp_path):
    mp.spawn(worker4, args=(4, str(tmp_path)), nprocs=4)
