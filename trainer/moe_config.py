"""Configuration of the mixture-of-experts feed-forward layers (the [moe] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import check, doc

ROUTERS = ("switch", "gshard", "expert_choice", "sigmoid")


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers (trainer/moe.py); expert parallelism is `parallel.ep`."""

    every: int = doc("Make every Nth block's feed-forward a mixture of experts; 0 = dense only.", 0)
    n_experts: int = doc("Experts per MoE layer.", 4)
    top_k: int = doc("Experts each token is routed to (expert_choice: average experts per token).", 2)
    capacity_factor: float = doc("Expert capacity per sequence = ceil(factor x seq_len x top_k / n_experts); overflow tokens are dropped (first choices and earlier positions first).", 1.25)
    aux_loss_coef: float = doc("Weight of the load-balancing loss added to the LM loss.", 0.01)
    router: str = doc("`switch` (softmax top-1), `gshard` (softmax top-k, gates renormalized), `expert_choice` (each expert picks its top tokens), or `sigmoid` (sigmoid top-k, DeepSeek-style; pair with shared_experts).", "gshard")
    z_loss_coef: float = doc("Weight of the router z-loss (mean squared logsumexp of the router logits).", 0.001)
    shared_experts: int = doc("Always-active shared experts (one SwiGLU of shared_experts x the expert hidden size) added to the routed output.", 0)
    chunks: str = doc("Co-scheduling chunks d: \"1\" (sequential), \"2\", \"4\", ... or \"auto\" (profile the groups, pick d with the performance model, settle it on measured calls: tune_calls). Write it as a string in TOML.", "1")
    hierarchical: str = doc("Two-phase (intra-node, then inter-node) all-to-all: `auto` (when the EP group spans nodes), `on` or `off`.", "auto")
    tune_calls: int = doc("With chunks=\"auto\": timed layer calls per candidate d (1, 2, 4, the model's pick and its double) before d settles on the fastest measured (the model's pick unless another is over 5% faster); 0 = the model alone. Few calls pick by chance where calls' times swing.", 10)
    reprofile_every: int = doc("With chunks=\"auto\": re-measure the groups every N forward calls of a layer; 0 = only at start.", 0)
    grad_overlap: bool = doc("Reduce data-parallel gradients in partitions inside the MoE backward's communication gaps (comms.moe.GradReducer) instead of DDP's buckets.", True)

    def validate(self):
        check(self.every >= 0, "moe.every", "must be >= 0")
        if not self.every:
            return
        check(self.n_experts >= 1, "moe.n_experts", "must be >= 1")
        check(1 <= self.top_k <= self.n_experts, "moe.top_k", f"must be in 1..n_experts={self.n_experts}")
        check(self.router in ROUTERS, "moe.router", f"must be one of {', '.join(ROUTERS)}")
        check(self.router != "switch" or self.top_k == 1, "moe.top_k", "the switch router sends each token to 1 expert; set top_k=1")
        check(self.capacity_factor > 0, "moe.capacity_factor", "must be > 0")
        check(self.aux_loss_coef >= 0, "moe.aux_loss_coef", "must be >= 0")
        check(self.z_loss_coef >= 0, "moe.z_loss_coef", "must be >= 0")
        check(self.shared_experts >= 0, "moe.shared_experts", "must be >= 0")
        check(self.chunks == "auto" or (self.chunks.isdigit() and int(self.chunks) >= 1), "moe.chunks",
              f"must be \"auto\" or a positive integer, got {self.chunks!r}")
        check(self.hierarchical in ("auto", "on", "off"), "moe.hierarchical", "must be auto, on or off")
        check(self.reprofile_every >= 0, "moe.reprofile_every", "must be >= 0")
        check(self.tune_calls >= 0, "moe.tune_calls", "must be >= 0")
