"""An independent, loop-by-loop MoE reference for the tests: same weights, its own routing,
capacity and combine, written for clarity instead of speed."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def reference_moe(x, gate_w, w1, w3, w2, cfg, shared=None):
    """x (B, S, dim); expert weights full (E, ...). Returns (y, kept) with kept a set of
    (sequence, position, expert) assignments that passed capacity."""
    bsz, seq, dim = x.shape
    n_exp, k = cfg.n_experts, cfg.top_k
    cap = min(seq, max(1, math.ceil(cfg.capacity_factor * seq * k / n_exp)))
    logits = (x @ gate_w.T).float()
    y = torch.zeros_like(x)
    kept = set()
    for b in range(bsz):
        picks = []  # (position, expert, gate) in priority order
        if cfg.router == "expert_choice":
            probs = logits[b].softmax(-1)
            for e in range(n_exp):
                col = probs[:, e].tolist()
                order = sorted(range(seq), key=lambda s: (-col[s], s))[:cap]
                picks += [(s, e, probs[s, e]) for s in order]
        else:
            if cfg.router == "sigmoid":
                scores = torch.sigmoid(logits[b])
            else:
                scores = logits[b].softmax(-1)
            kk = 1 if cfg.router == "switch" else k
            top = scores.topk(kk, dim=-1)
            gates = top.values if cfg.router == "switch" else top.values / top.values.sum(-1, keepdim=True)
            load = [0] * n_exp
            for r in range(kk):  # first choices of every position before second choices
                for s in range(seq):
                    e = int(top.indices[s, r])
                    if load[e] < cap:
                        load[e] += 1
                        picks.append((s, e, gates[s, r]))
        for s, e, g in picks:
            kept.add((b, s, e))
            y[b, s] = y[b, s] + g * swiglu(x[b, s], w1[e], w3[e], w2[e])
    if shared is not None:
        y = y + shared(x)
    return y, kept
