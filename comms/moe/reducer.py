"""Data-parallel gradient reduction issued in partitions into the gaps of MoE backward.

DDP reduces buckets when they fill; FSMoE instead sizes the partitions so each fits in a
window where the link would otherwise idle (while experts compute their backward). This
reducer collects gradients as autograd finishes them (post-accumulate hooks), the MoE
backward calls ``fill_gap(budget)`` between its chunked exchanges, and ``finish()`` after
the backward reduces what is left and writes the averages back.

Averages: each rank's loss is the mean over its own batch slice, so the gradient of the
global-mean loss is the SUM over ranks divided by the data-parallel size, for expert
parameters (summed over the ranks holding the same experts; the all-to-all already brought
the other EP ranks' tokens) as for the rest (summed over all data-parallel ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from comms.lanes import Done, Lane


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class GradReducer:
    def __init__(self, named_params, dp_group, expert_dp_group, dp_size: int, expert_names: set[str]):
        self.dp_size = dp_size
        self.lane = Lane("grad")
        self._group = {}
        self._pending: list[torch.nn.Parameter] = []
        self._inflight = []
        self._armed = False
        for name, p in named_params:
            if p.requires_grad:
                self._group[p] = expert_dp_group if name in expert_names else dp_group
                p.register_post_accumulate_grad_hook(self._ready)

    def arm(self):
        """Call before the backward of the last micro-step (earlier ones only accumulate)."""
        self._armed = True

    def _ready(self, p):
        if self._armed:
            self._pending.append(p)

    def fill_gap(self, budget_bytes: int | None):
        """Launch the oldest ready gradients up to ``budget_bytes`` (None: all ready ones)."""
        if not self._armed or not self._pending:
            return
        take, size = [], 0
        while self._pending:
            nbytes = local(self._pending[0].grad).numel() * self._pending[0].grad.element_size()
            if budget_bytes is not None and take and size + nbytes > budget_bytes:
                break
            if budget_bytes is not None and not take and nbytes > budget_bytes:
                break
            take.append(self._pending.pop(0))
            size += nbytes
        self._launch(take)

    def _launch(self, params):
        by_group = {}
        for p in params:
            by_group.setdefault(self._group[p], []).append(p)
        for group, ps in by_group.items():
            flat = torch.cat([local(p.grad).reshape(-1) for p in ps])
            # One rank holds these (experts under EP over every rank): averaging is all.
            alone = group is not None and dist.get_world_size(group) == 1
            self._inflight.append((ps, flat, Done(flat) if alone else
                                   self.lane.submit(dist.all_reduce, flat, dist.ReduceOp.SUM, group)))

    def finish(self):
        """Reduce what is left, wait for every partition, write averaged gradients back."""
        if self._pending:
            self._launch(self._pending)
            self._pending = []
        for ps, flat, pending in self._inflight:
            pending.result()
            flat.div_(self.dp_size)
            offset = 0
            for p in ps:
                g = local(p.grad)
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        self._inflight = []
        self._armed = False

    def close(self):
        self.lane.close()
