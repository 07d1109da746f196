"""Mixture-of-experts feed-forward layer, built from swappable parts:

    router -> order -> [dispatch -> experts -> combine] (co-scheduled, comms.moe) -> inverse order

- router: scores experts per token, picks assignments and drops what exceeds capacity.
  Capacity is per sequence (GShard's "groups"), so dropping, and hence the model's output,
  does not depend on how the batch is split over ranks or chunks.
- order: permutes tokens into a buffer of (experts, rows, dim), each expert's kept tokens
  packed in (sequence, position) order. ``rows`` is the fullest expert's count on any EP
  rank, not the capacity: the padding the capacity factor leaves (up to 1 - 1/factor of
  the slots when routing is balanced) is neither exchanged nor computed beyond what the
  fullest expert needs. Unused rows are 0.
- dispatch / combine: all-to-all over the EP group (comms.moe), chunked and overlapped with
  the expert compute.
- experts: SwiGLU experts stored as stacked tensors (n_experts, ...), one batched matmul each.
- inverse order: weights each expert output by its gate and sums it back onto its token.

After each forward ``aux_loss`` holds the weighted load-balancing + z-loss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from comms.moe import EPGroups, GradReducer, MoEScheduler
from trainer.model import FeedForward
from trainer.moe_config import MoEConfig


@dataclass
class Routing:
    """Kept token->expert assignments of one forward, as flat index tensors."""

    tok: torch.Tensor  # (A,) token index in batch x seq
    expert: torch.Tensor  # (A,) expert of the assignment
    row: torch.Tensor  # (A,) its row among the expert's kept tokens, in (sequence, position) order
    gate: torch.Tensor  # (A,) weight of the expert's output for that token
    counts: torch.Tensor  # (E,) kept tokens per expert (<= sequences x capacity)
    fixed: bool  # every expert always keeps the same count (expert choice): no need to agree
    aux_loss: torch.Tensor

    def slot(self, rows: int) -> torch.Tensor:
        """Row of each assignment in the (experts x rows) buffer."""
        return self.expert * rows + self.row


def capacity(cfg: MoEConfig, seq: int) -> int:
    return min(seq, max(1, math.ceil(cfg.capacity_factor * seq * cfg.top_k / cfg.n_experts)))


class Router(nn.Module):
    """Base: a linear gate over experts, the z-loss, and token-choice slot assignment."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.n_experts, bias=False)

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.gate(x).float()  # routing decisions in fp32 even under bf16 autocast
        return self.route(logits)

    def losses(self, logits, probs, choices) -> torch.Tensor:
        """aux_loss_coef x load balance + z_loss_coef x z-loss.

        Load balance (Switch/GShard) per sequence, then averaged over sequences, so the loss
        is the same whether the batch sits on one rank or is split over several:
        E x sum_e f_e P_e with f_e the share of top-k choices and P_e the mean probability.
        """
        cfg = self.cfg
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        loss = cfg.z_loss_coef * z
        if choices is not None:
            seq, k = choices.shape[1], choices.shape[2]
            f = F.one_hot(choices, cfg.n_experts).sum(dim=(1, 2)).float() / (seq * k)  # (B, E)
            lb = (cfg.n_experts * (f * probs.mean(dim=1)).sum(-1)).mean()
            loss = loss + cfg.aux_loss_coef * lb
        return loss

    def token_choice(self, experts: torch.Tensor, gates: torch.Tensor, aux: torch.Tensor) -> Routing:
        """Keep each (token, choice) while its expert has room in this sequence.

        Priority: all first choices before second ones, earlier positions first (Switch,
        GShard); a pure function of the routing, so identical for any chunking.
        """
        bsz, seq, k = experts.shape
        n_exp = self.cfg.n_experts
        cap = capacity(self.cfg, seq)
        order = experts.transpose(1, 2).reshape(bsz, k * seq)  # choice-major
        onehot = F.one_hot(order, n_exp)
        pos = ((onehot.cumsum(dim=1) - 1) * onehot).sum(-1).view(bsz, k, seq).transpose(1, 2)  # (B, S, k)
        keep = pos < cap
        # Pack each expert's kept tokens: sequence b starts after the kept tokens of b' < b.
        kept = onehot.sum(dim=1).clamp(max=cap)  # (B, E)
        start = kept.cumsum(dim=0) - kept
        row = start.gather(1, experts.reshape(bsz, -1)).view_as(experts) + pos
        b = torch.arange(bsz).view(-1, 1, 1).expand_as(experts)
        s = torch.arange(seq).view(1, -1, 1).expand_as(experts)
        return Routing(tok=(b * seq + s)[keep], expert=experts[keep], row=row[keep], gate=gates[keep],
                       counts=kept.sum(dim=0), fixed=False, aux_loss=aux)


class SwitchRouter(Router):
    """Softmax, top-1; the gate is the chosen expert's probability (Switch Transformer)."""

    def route(self, logits):
        probs = logits.softmax(-1)
        gate, expert = probs.max(dim=-1, keepdim=True)
        return self.token_choice(expert, gate, self.losses(logits, probs, expert))


class GShardRouter(Router):
    """Softmax, top-k, gates renormalized over the chosen experts (GShard; k=2 by default)."""

    def route(self, logits):
        probs = logits.softmax(-1)
        gate, expert = probs.topk(self.cfg.top_k, dim=-1)
        gate = gate / gate.sum(-1, keepdim=True)
        return self.token_choice(expert, gate, self.losses(logits, probs, expert))


class SigmoidRouter(Router):
    """Independent sigmoid scores, top-k, gates normalized over the chosen (DeepSeek-V3)."""

    def route(self, logits):
        scores = torch.sigmoid(logits)
        gate, expert = scores.topk(self.cfg.top_k, dim=-1)
        gate = gate / gate.sum(-1, keepdim=True)
        probs = scores / scores.sum(-1, keepdim=True)
        return self.token_choice(expert, gate, self.losses(logits, probs, expert))


class ExpertChoiceRouter(Router):
    """Each expert takes its top-`capacity` tokens of each sequence (Zhou et al. 2022);
    balanced by construction, so only the z-loss applies."""

    def route(self, logits):
        bsz, seq, n_exp = logits.shape
        cap = capacity(self.cfg, seq)
        probs = logits.softmax(-1)
        # Stable sort: ties go to the earlier position, deterministically.
        idx = probs.transpose(1, 2).sort(dim=-1, descending=True, stable=True).indices[..., :cap]  # (B, E, C)
        gate = probs.transpose(1, 2).gather(-1, idx)
        b = torch.arange(bsz).view(-1, 1, 1)
        e = torch.arange(n_exp).view(1, -1, 1).expand_as(idx)
        c = torch.arange(cap).view(1, 1, -1)
        return Routing(tok=(b * seq + idx).reshape(-1), expert=e.reshape(-1), row=(b * cap + c).expand_as(idx).reshape(-1),
                       gate=gate.reshape(-1), counts=torch.full((n_exp,), bsz * cap, device=logits.device), fixed=True,
                       aux_loss=self.losses(logits, probs, None))


ROUTERS = {"switch": SwitchRouter, "gshard": GShardRouter, "expert_choice": ExpertChoiceRouter, "sigmoid": SigmoidRouter}


class Order(nn.Module):
    """Tokens -> (experts, rows, dim) buffer, grouped by expert; unused rows are zeros."""

    def forward(self, x: torch.Tensor, r: Routing, slot: torch.Tensor, n_experts: int, rows: int) -> torch.Tensor:
        # In place on a fresh buffer: the out-of-place index_copy would clone it first.
        buf = x.new_zeros(n_experts * rows, x.shape[-1])
        return buf.index_copy_(0, slot, x[r.tok]).view(n_experts, rows, -1)


class InverseOrder(nn.Module):
    """(experts, rows, dim) outputs -> tokens, each weighted by its gate and summed."""

    def forward(self, out: torch.Tensor, r: Routing, slot: torch.Tensor, n_tokens: int) -> torch.Tensor:
        picked = out.reshape(-1, out.shape[-1])[slot] * r.gate.to(out.dtype).unsqueeze(-1)
        return picked.new_zeros(n_tokens, out.shape[-1]).index_add_(0, r.tok, picked)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class GroupedExperts(nn.Module):
    """n SwiGLU experts as stacked tensors, w1/w3: (n, hidden, dim), w2: (n, dim, hidden)
    (each slice is an nn.Linear weight). Under expert parallelism they are DTensors sharded
    on dim 0 over the EP mesh and each rank computes its local experts."""

    def __init__(self, n: int, dim: int, hidden: int, init_std: float = 0.02):
        super().__init__()
        self.hidden = hidden
        self.w1 = nn.Parameter(torch.randn(n, hidden, dim) * init_std)
        self.w3 = nn.Parameter(torch.randn(n, hidden, dim) * init_std)
        self.w2 = nn.Parameter(torch.randn(n, dim, hidden) * init_std)

    def local_weights(self):
        return [_local(self.w1), _local(self.w3), _local(self.w2)]

    @staticmethod
    def fwd(x, w1, w3, w2):
        """x: (local experts, rows, dim) -> (y, what the backward needs)."""
        h1, h3 = torch.bmm(x, w1.mT), torch.bmm(x, w3.mT)
        act = F.silu(h1)
        p = act * h3
        # Keeps what autograd would (x, h1, silu(h1), h3, their product): recomputing the
        # last two in backward costs 2 more passes over (rows x hidden).
        return torch.bmm(p, w2.mT), (x, h1, h3, act, p)

    @staticmethod
    def bwd(gy, saved, w1, w3, w2):
        """Hand-written SwiGLU backward (the pipeline runs it chunk by chunk between exchanges):
        3 elementwise passes, in place on buffers it no longer needs (it consumes ``saved``),
        so it allocates no (rows x hidden) tensor of its own."""
        x, h1, h3, act, p = saved
        ga = torch.bmm(gy, w2)
        gw2 = torch.bmm(gy.mT, p)
        gh3 = act.mul_(ga)
        gh1 = torch.ops.aten.silu_backward.grad_input(ga.mul_(h3), h1, grad_input=h1)
        gx = torch.baddbmm(torch.bmm(gh3, w3), gh1, w1)
        return gx, (torch.bmm(gh1.mT, x), torch.bmm(gh3.mT, x), gw2)


class MoE(nn.Module):
    def __init__(self, dim: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = ROUTERS[cfg.router](dim, cfg)
        self.order = Order()
        self.experts = GroupedExperts(cfg.n_experts, dim, hidden)
        self.inverse_order = InverseOrder()
        # Shared experts (DeepSeek-style): one always-active SwiGLU of shared_experts x hidden.
        self.shared = FeedForward(dim, hidden * cfg.shared_experts) if cfg.shared_experts else None
        # Replaced by one shared scheduler (with the EP groups) in apply_expert_parallel.
        self.scheduler = MoEScheduler(None, cfg.chunks, cfg.reprofile_every, cfg.tune_calls)
        self.name = "moe"
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bsz, seq, dim = x.shape
        r = self.router(x)
        self.aux_loss = r.aux_loss
        flat = x.reshape(-1, dim)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # Every EP rank sends blocks of one size, the fullest expert's count on any rank; the
        # counts of all ranks (one small all-gather) also let receivers skip the padding.
        counts = None if r.fixed else self.scheduler.agree_counts(r.counts)
        rows = int(r.counts.max() if counts is None else counts.max())
        slot = r.slot(rows)
        buf = self.order(flat, r, slot, self.cfg.n_experts, rows).to(dtype)
        # The pipeline runs its own matmuls in `dtype` (its backward is hand-written).
        with torch.autocast(x.device.type, enabled=False):
            out = self.scheduler.run(self.name, buf, self.experts.local_weights(), GroupedExperts.fwd,
                                     GroupedExperts.bwd, self.experts.hidden, counts)
        y = self.inverse_order(out, r, slot, bsz * seq).to(x.dtype)
        if self.shared is not None:
            y = y + self.shared(x).reshape(-1, dim)
        return y.view(bsz, seq, dim)


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh, groups: EPGroups | None = None) -> set[str]:
    """Shard every MoE layer's experts over ``ep_mesh`` (DTensor, Shard(0)); collective-free.

    Call after the model's weights are initialized (identically on every rank). ``groups``
    (comms.moe.build_ep_groups) adds hierarchical exchanges and the gradient lane; without it
    the flat all-to-all runs on the mesh's group. Returns the FQNs of the expert parameters,
    which data parallelism must leave alone (sync_expert_grads or a GradReducer does them).
    """
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    if groups is None:
        groups = EPGroups(ep=ep, mesh=ep_mesh, group=ep_mesh.get_group(), expert_dp=None, dp=None, dp_size=dist.get_world_size())
    layers = moe_layers(model)
    names = set()
    if not layers:
        return names
    cfg = next(iter(layers.values())).cfg
    scheduler = MoEScheduler(groups, cfg.chunks, cfg.reprofile_every, cfg.tune_calls)
    for mod_name, m in layers.items():
        m.scheduler.close()
        m.scheduler, m.name = scheduler, mod_name
        for pname in ("w1", "w3", "w2"):
            p = getattr(m.experts, pname)
            piece = p.detach().chunk(ep, dim=0)[rank].clone()
            setattr(m.experts, pname, nn.Parameter(DTensor.from_local(piece, ep_mesh, [Shard(0)], run_check=False)))
            names.add(f"{mod_name}.experts.{pname}")
    return names


def sync_expert_grads(model: nn.Module, expert_dp_group, dp_size: int):
    """After backward (DDP path): expert grads := SUM over the ranks holding the same experts
    / dp_size, i.e. the gradient of the global-mean loss (see comms/moe/reducer.py)."""
    for m in moe_layers(model).values():
        for p in (m.experts.w1, m.experts.w3, m.experts.w2):
            if p.grad is None:
                continue
            g = _local(p.grad)
            if expert_dp_group is not None and dist.get_world_size(expert_dp_group) > 1:
                dist.all_reduce(g, group=expert_dp_group)
            g.div_(dp_size)


def attach_grad_reducer(model: nn.Module, groups: EPGroups, expert_names: set[str]) -> GradReducer:
    """Replace DDP for this model: all data-parallel gradient reduction goes through one
    reducer whose partitions the MoE backward issues into its communication gaps.

    Per step: ``reducer.arm()`` before the last micro-step's backward, ``reducer.finish()``
    after it (then clip and step)."""
    layers = moe_layers(model)
    reducer = GradReducer(model.named_parameters(), groups.dp, groups.expert_dp, groups.dp_size, expert_names)
    # What the lanes must carry: experts held by one rank only (EP over all ranks) need none.
    alone = groups.expert_dp is not None and dist.get_world_size(groups.expert_dp) == 1
    total = sum(_local(p).numel() * p.element_size() for n, p in model.named_parameters()
                if p.requires_grad and not (alone and n in expert_names))
    for m in layers.values():
        m.scheduler.reducer = reducer
        m.scheduler.grad_bytes_per_layer = total // max(1, len(layers))
    return reducer


def moe_report(model: nn.Module) -> dict:
    """Chosen d and predicted vs measured fwd+bwd ms per MoE layer (for the metrics log)."""
    out = {}
    for m in moe_layers(model).values():
        out.update(m.scheduler.report())
    return out
