"""Holmes' overlapped optimizer: data-parallel replicas reduce their gradients bucket by
bucket, and each bucket's parameters are stepped as soon as its reduction is done, while the
next buckets are still on the wire.

Without it, every replica all-reduces all of its gradients and only then steps the
optimizer: the link idles during the step and the optimizer idles during the reduction.
Here the reductions go onto a lane (comms/lanes.py) in one FIFO, last layers first (their
gradients are ready first), and the main thread waits for bucket i, averages it, steps its
parameters, then waits for bucket i + 1: a step of 1/b of the work follows the last
reduction instead of the whole step. Each parameter's update is the same computation as
in one step() after all reductions (AdamW updates every parameter on its own), so losses
are identical. Clipping by the global norm would need every bucket first: the config
requires ``optim.grad_clip = 0``.

The optimizer states stay replicated, one per parameter, so checkpoints keep the layout of
every other engine (Holmes shards them as Megatron's distributed optimizer does; that is
the ZeRO-1 part, not the overlap).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from comms.lanes import Lane


def buckets(params: list[torch.nn.Parameter], bucket_bytes: float) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters in buckets of about ``bucket_bytes`` (at least one each)."""
    out, size = [[]], 0
    for p in params:
        if out[-1] and size + p.numel() * p.element_size() > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += p.numel() * p.element_size()
    return [b for b in out if b]


def step_only(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]):
    """One optimizer step of ``params`` alone: torch's optimizers skip parameters without a
    gradient, so the others' gradients are set aside for the call."""
    mine = {id(p) for p in params}
    aside = [(p, p.grad) for g in optimizer.param_groups for p in g["params"] if id(p) not in mine and p.grad is not None]
    for p, _ in aside:
        p.grad = None
    try:
        optimizer.step()
    finally:
        for p, grad in aside:
            p.grad = grad


class OverlappedOptimizer:
    """Reduce the gradients of ``model`` over the data-parallel ``group`` and step
    ``optimizer``; ``overlap=False`` steps once after every reduction (the same updates)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group, bucket_mb: float,
                 overlap: bool = True):
        self.optimizer, self.group, self.overlap = optimizer, group, overlap
        self.size = dist.get_world_size(group)
        params = [p for p in model.parameters() if p.requires_grad]
        self.buckets = buckets(params[::-1], bucket_mb * 1e6)
        self.lane = Lane("dp-optim")
        self.events: list[tuple[str, int]] = []  # ("reduced" | "stepped", bucket) in order, for the record

    def step(self) -> torch.Tensor:
        """Reduce, average and step every bucket; returns this replica's sum of squared
        averaged gradients (for the gradient norm)."""
        self.events = []
        flights = []
        for bucket in self.buckets:
            grads = [p.grad for p in bucket if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)
            flights.append((bucket, grads, flat, self.lane.submit(dist.all_reduce, flat, dist.ReduceOp.SUM, self.group)))
        squares = torch.zeros((), dtype=torch.float64)
        for i, (bucket, grads, flat, flight) in enumerate(flights):
            flight.result()
            self.events.append(("reduced", i))
            flat.div_(self.size)
            squares += flat.double().square().sum()
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            if self.overlap:
                step_only(self.optimizer, bucket)
                self.events.append(("stepped", i))
        if not self.overlap:
            self.optimizer.step()
            self.events.append(("stepped", -1))
        return squares

    def close(self):
        self.lane.close()
