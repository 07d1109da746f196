"""The model: a decoder-only transformer (RMSNorm, rotary positions, SwiGLU, GQA) with an
optional mixture-of-experts feed-forward every N blocks.

Only the model lives here; how it is split over ranks is trainer/parallelize.py. Blocks sit
in a ModuleDict keyed by their index so that a pipeline stage that drops the blocks it does
not own keeps the same parameter names (``layers.7.attention.wq.weight``) as the full model:
checkpoints are layout-independent because names are.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import ModelConfig
from trainer.moe_config import MoEConfig


def ffn_hidden(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden:
        return cfg.ffn_hidden
    return 32 * math.ceil(8 * cfg.dim / 3 / 32)


def rotary_table(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """cos/sin of the rotary angles, shape (max_seq_len, head_dim // 2, 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of channels of x (batch, seq, heads, head_dim) by position."""
    seq = x.shape[1]
    xr = x.float().unflatten(-1, (-1, 2))
    cos, sin = table[:seq, None, :, 0], table[:seq, None, :, 1]
    out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 0] * sin + xr[..., 1] * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        n_kv = cfg.n_kv_heads or cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig, moe: MoEConfig):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_moe = bool(moe.every) and (layer_id + 1) % moe.every == 0
        if self.is_moe:
            from trainer.moe import MoE  # only MoE configs need the expert machinery

            self.feed_forward = MoE(cfg.dim, ffn_hidden(cfg), moe)
        else:
            self.feed_forward = FeedForward(cfg.dim, ffn_hidden(cfg))

    def forward(self, x, rope):
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig | None = None):
        super().__init__()
        self.cfg = cfg
        moe = moe or MoEConfig()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg, moe) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Not a parameter and not saved: derived from the config on every start.
        self.register_buffer("rope", rotary_table(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta), persistent=False)

    def init_weights(self, seed: int):
        """Deterministic init, identical on every rank and every layout for the same seed."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm scales
            else:
                # Residual projections scaled by 1/sqrt(2 * layers), as in GPT-2.
                std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("wo.weight", "w2.weight")) else self.cfg.init_std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Pipeline stages drop the modules they do not own (set to None); a middle stage
        # receives hidden states instead of tokens.
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for block in self.layers.values():
            h = block(h, self.rope)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the MoE load-balancing losses of the last forward (0 for dense models)."""
        losses = [b.feed_forward.aux_loss for b in self.layers.values() if b.is_moe and b.feed_forward.aux_loss is not None]
        return sum(losses) if losses else 0.0


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1))


def model_parameters(job) -> int:
    """Parameter count of a job's model, without allocating it (meta device)."""
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(job.model, job.moe).parameters())
