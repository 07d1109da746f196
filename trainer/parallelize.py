"""Splitting the model over the device mesh, apart from the model code.

Two engines give the training loop (train.py) the same small interface:

    engine.forward_backward(inputs, targets) -> loss          # all micro-steps of one step
    engine.optimizer_step() -> grad_norm                      # clip, step, zero grads
    engine.optimizer                                          # the torch optimizer: lr schedule, checkpoint hooks
    engine.holds_loss                                         # this rank computes the loss (last pipeline stage)
    engine.state() -> flat state (name -> Chunk)              # model + optimizer, this rank's part
    engine.load_state()                                       # push a state filled in place back in

``TorchEngine`` applies, in this order, on one device mesh: ``apply_pp`` (keep this pipeline
stage's blocks), ``apply_tp`` (DTensor column/row sharding), ``apply_fsdp`` (FSDP2
``fully_shard``, HSDP with replicas), ``apply_ep`` (experts split over ranks), ``apply_ddp``
(plain replicas), then ``build_pipeline``. ``DeepSpeedEngine`` wraps a ZeRO stage 0-3 engine. Both name
state the same way (``model.<fqn>``, ``optim.state.<fqn>.<exp_avg|exp_avg_sq|step>``), so a
checkpoint from one layout or engine restores into any other.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from checkpoint import flatten, init_optimizer_state
from comms import UserError, dist_utils
from comms.mesh import coordinate
from comms.placement import stage_to_group_rank
from trainer.config import JobConfig
from trainer.model import Transformer, lm_loss
from trainer.parallel_dims import ParallelDims


def apply_pp(model: Transformer, stage: int, layers: tuple[int, ...]) -> Transformer:
    """Drop what pipeline stage ``stage`` does not own; names of what stays are unchanged."""
    start = sum(layers[:stage])
    for key in list(model.layers.keys()):
        if not start <= int(key) < start + layers[stage]:
            del model.layers[key]
    if stage > 0:
        model.tok_embeddings = None
    if stage < len(layers) - 1:
        model.norm = None
        model.output = None
    return model


def apply_tp(model: Transformer, tp_mesh):
    """Megatron-style TP: q/k/v and w1/w3 column-parallel, wo and w2 row-parallel, so each
    block needs one all-reduce after attention and one after the MLP. Embeddings, norms and
    the output head stay replicated (small at these sizes)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.layers.values():
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        if not block.is_moe:
            plan.update({"feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
                         "feed_forward.w2": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)


def uses_fsdp(cfg: JobConfig, dims: ParallelDims) -> bool:
    """Does the torch engine wrap this job's blocks in FSDP2 (the overlapped optimizer keeps
    replicas as plain modules: it reduces and steps them itself)?"""
    return dims.fsdp_enabled and not cfg.parallel.overlap_optimizer


def apply_fsdp(model: Transformer, mesh, dims: ParallelDims):
    """FSDP2: every block, then the rest, sharded over dp_shard (replicated over
    dp_replicate: HSDP)."""
    dp_mesh = mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]
    shard_blocks(model, model.layers.values(), dp_mesh, dims)


def shard_blocks(root: nn.Module, blocks, dp_mesh, dims: ParallelDims):
    """``fully_shard`` every block, then ``root`` (the rest of the parameters) over ``dp_mesh``."""
    from torch.distributed.fsdp import fully_shard

    # Under PP each microbatch would re-gather the parameters; keep them gathered.
    reshard = not dims.pp_enabled
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard)
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=reshard)


def apply_ep(model: Transformer, cfg: JobConfig, device: str):
    """Split the MoE experts over ``parallel.ep`` ranks; returns (EP groups, the gradient
    reducer that replaces DDP when moe.grad_overlap, the expert parameters' names)."""
    from comms.moe import build_ep_groups
    from trainer.moe import apply_expert_parallel, attach_grad_reducer

    groups = build_ep_groups(cfg.parallel.ep, device, hierarchical=cfg.moe.hierarchical)
    expert_names = apply_expert_parallel(model, groups.mesh, groups)
    # The MoE backward issues gradient partitions into the gaps of its own all-to-all
    # traffic (FSMoE), instead of DDP's buckets.
    reducer = attach_grad_reducer(model, groups, expert_names) if cfg.moe.grad_overlap else None
    return groups, reducer, expert_names


def apply_ddp(model: Transformer, mesh, expert_names: set[str], traced: bool):
    """Plain DDP over dp_replicate; returns the wrapper forward is called on."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Experts are sharded over EP, not replicated: DDP must leave their grads alone.
    DDP._set_params_and_buffers_to_ignore_for_model(model, list(expert_names))
    ddp = DDP(model, process_group=mesh["dp_replicate"].get_group())
    if traced:
        # DDP's reducer calls the process group from C++, unseen by the collective trace;
        # the stock all-reduce hook (same averaging) goes through Python.
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    return ddp


def build_pipeline(model: Transformer, cfg: JobConfig, mesh, stage: int, n_stages: int, device: str, group):
    """The pipeline schedule that runs this stage's microbatches."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from trainer.schedule import Eager1F1B

    pipe = PipelineStage(model, stage, n_stages, torch.device(device), group=group)
    # Stage i is not group rank i when a placement plan reorders the pipeline.
    pipe.stage_index_to_group_rank = stage_to_group_rank(mesh)
    schedule = {"eager-1F1B": Eager1F1B, "1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[cfg.parallel.pp_schedule]
    # scale_grads: each microbatch's loss is a mean, so the summed grads are divided by the
    # microbatch count to equal the full batch's mean-loss gradient.
    return schedule(pipe, n_microbatches=cfg.parallel.pp_microbatches, loss_fn=lm_loss, scale_grads=True)


def make_optimizer(model: nn.Module, cfg: JobConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norm scales do not."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    # foreach=False: the per-parameter loop handles any mix of DTensor meshes and plain tensors.
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, foreach=False)


def clip_grad_norm(params, max_norm: float, pp_group=None) -> float:
    """Global gradient norm over every shard, stage and mesh; clips when max_norm > 0.

    Grads of different layouts (plain, DTensor on the TP mesh, DTensor on the FSDP mesh)
    are normed per group, so one foreach kernel per layout and one collective per group.
    """
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = {}
    for g in grads:
        key = (id(g.device_mesh), tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    sq = torch.zeros((), dtype=torch.float64)
    for key, gs in groups.items():
        n = torch.nn.utils.get_total_norm(gs, 2.0)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        sq += n.double() ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    total = float(sq.sqrt())
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(coef)
    return total


def autocast(cfg: JobConfig, device: str):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TorchEngine:
    def __init__(self, cfg: JobConfig, dims: ParallelDims, model: Transformer, mesh, device: str):
        self.cfg, self.device = cfg, device
        self.pp_rank, self.pp_size = coordinate(mesh, "pp")
        self.pp_group = mesh["pp"].get_group() if dims.pp_enabled else None
        if dims.pp_enabled:
            model = apply_pp(model, self.pp_rank, dims.pp_layers)
        model.to(device)
        if dims.tp_enabled:
            apply_tp(model, mesh["tp"])
        overlapped = cfg.parallel.overlap_optimizer  # replicas as plain modules: it reduces and steps (Holmes)
        if uses_fsdp(cfg, dims):
            apply_fsdp(model, mesh, dims)
        self.reducer = self.ep_groups = None
        expert_names: set[str] = set()
        if cfg.moe.every and dims.ep_enabled:
            self.ep_groups, self.reducer, expert_names = apply_ep(model, cfg, device)
        self.module = model  # what forward is called on
        self.ddp = dims.ddp_enabled and self.reducer is None and not overlapped
        if self.ddp:
            self.module = apply_ddp(model, mesh, expert_names, cfg.diagnostics.trace)
        self.model = model
        self.optimizer = make_optimizer(model, cfg)
        init_optimizer_state(self.optimizer)
        self.dp_optim = None
        if overlapped:
            from trainer.overlap_optim import OverlappedOptimizer

            self.dp_optim = OverlappedOptimizer(model, self.optimizer, mesh["dp_replicate"].get_group(), cfg.parallel.bucket_mb,
                                                 overlap=cfg.parallel.optimizer_overlap)
        if dims.pp_enabled:
            self.schedule = build_pipeline(model, cfg, mesh, self.pp_rank, self.pp_size, device, self.pp_group)
        self._sd = None

    @property
    def holds_loss(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor) -> float:
        cfg = self.cfg
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        total = 0.0
        if self.pp_size > 1:
            losses = []
            with autocast(cfg, self.device):
                if self.pp_rank == 0:
                    self.schedule.step(inputs)
                elif self.holds_loss:
                    self.schedule.step(target=targets, losses=losses)
                else:
                    self.schedule.step()
            total = float(torch.stack(losses).mean()) if losses else 0.0
        else:
            accum = cfg.train.grad_accum
            for i, (x, y) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum))):
                last = i == accum - 1
                sync = self.module.no_sync() if self.ddp and not last else contextlib.nullcontext()
                if hasattr(self.model, "set_requires_gradient_sync"):
                    self.model.set_requires_gradient_sync(last)
                if self.reducer is not None and last:
                    self.reducer.arm()
                with sync, autocast(cfg, self.device):
                    loss = lm_loss(self.module(x), y)
                    aux = self.model.aux_loss()
                    ((loss + aux) / accum).backward()
                total += loss.item() / accum
            if self.reducer is not None:
                self.reducer.finish()
            elif self.ep_groups is not None:
                from trainer.moe import sync_expert_grads

                sync_expert_grads(self.model, self.ep_groups.expert_dp, self.ep_groups.dp_size)
        return total

    def optimizer_step(self) -> float:
        if self.dp_optim is not None:
            squares = self.dp_optim.step()
            if self.pp_group is not None:
                dist.all_reduce(squares, group=self.pp_group)
            norm = float(squares.sqrt())
        else:
            norm = clip_grad_norm(self.model.parameters(), self.cfg.optim.grad_clip, self.pp_group)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state(self) -> dict:
        # References to the live tensors (no copy): a checkpointer copies them before the
        # next optimizer step, and a restore fills them in place.
        self._sd = get_state_dict(self.model, self.optimizer)
        model_sd, optim_sd = self._sd
        return flatten({"model": model_sd, "optim": {"state": optim_sd["state"]}})

    def load_state(self):
        model_sd, optim_sd = self._sd
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine with the same interface; the optimizer is torch's AdamW
    (``self.optimizer``; DeepSpeed's ZeRO wrapper around it is ``self.engine.optimizer``), so
    runs match the torch engine step for step. Its state is ``checkpoint.deepspeed_engine
    .ZeroState``'s: full fp32 masters and moments by parameter name, layout-free."""

    def __init__(self, cfg: JobConfig, model: Transformer, device: str):
        import deepspeed

        from checkpoint.deepspeed_engine import ZeroState

        self.cfg, self.device = cfg, device
        self.holds_loss = True
        model.to(device)
        self.model = model
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg), config=self.ds_config(cfg))
        self.zero_state = ZeroState(self.engine)  # also creates the optimizer's (zero) state to restore into
        self.optimizer = self.zero_state.optimizer
        self._sd = None

    @staticmethod
    def ds_config(cfg: JobConfig) -> dict:
        d, world = cfg.deepspeed, dist_utils.world_size()
        micro = cfg.data.batch_size // world // cfg.train.grad_accum
        ds = {"train_batch_size": cfg.data.batch_size, "train_micro_batch_size_per_gpu": micro,
              "gradient_accumulation_steps": cfg.train.grad_accum, "gradient_clipping": cfg.optim.grad_clip,
              "zero_optimization": {"stage": d.zero_stage}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": cfg.train.dtype == "bf16"}, "steps_per_print": 10**9, "wall_clock_breakdown": False}
        if d.config_file:
            try:
                ds.update(json.loads(Path(d.config_file).read_text()))
            except json.JSONDecodeError as e:
                raise UserError(f"deepspeed.config_file {d.config_file!r} is not valid JSON ({e}); fix it") from None
        ds.update(d.ds_config)
        return ds

    def forward_backward(self, inputs, targets) -> float:
        accum, total = self.cfg.train.grad_accum, 0.0
        for i, (x, y) in enumerate(zip(inputs.chunk(accum), targets.chunk(accum))):
            loss = lm_loss(self.engine(x.to(self.device)), y.to(self.device))
            self.engine.backward(loss + self.model.aux_loss())
            if i < accum - 1:
                self.engine.step()  # DeepSpeed counts micro-steps; it steps at the boundary
            total += loss.item() / accum
        return total

    def optimizer_step(self) -> float:
        self.engine.step()  # the accumulation boundary: clip, optimizer step, zero grads
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def state(self) -> dict:
        self._sd = self.zero_state.state_dict()  # gathered: collective for ZeRO-3
        return flatten(self._sd)

    def load_state(self):
        self.zero_state.load_state_dict(self._sd)


def build_engine(cfg: JobConfig, dims: ParallelDims, mesh, device: str):
    """The model, initialized identically on every rank, then split over the mesh."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, cfg.moe)
    model.init_weights(cfg.train.seed)
    if dims.engine == "deepspeed":
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
        return DeepSpeedEngine(cfg, model, device)
    return TorchEngine(cfg, dims, model, mesh, device)
