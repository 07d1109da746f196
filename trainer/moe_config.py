"""Configuration of the mixture-of-experts feed-forward layers (the [moe] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import check, doc


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers (trainer/moe.py)."""

    every: int = doc("Make every Nth block's feed-forward a mixture of experts; 0 = dense only.", 0)
    n_experts: int = doc("Experts per MoE layer.", 4)
    top_k: int = doc("Experts each token is routed to.", 2)
    capacity_factor: float = doc("Expert capacity = factor x tokens x k / experts; overflow tokens are dropped.", 1.25)
    aux_loss_coef: float = doc("Weight of the load-balancing loss added to the LM loss.", 0.01)

    def validate(self):
        check(self.every >= 0, "moe.every", "must be >= 0")
        if self.every:
            check(1 <= self.top_k <= self.n_experts, "moe.top_k", f"must be in 1..n_experts={self.n_experts}")
            check(self.capacity_factor > 0, "moe.capacity_factor", "must be > 0")
