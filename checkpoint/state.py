"""The one state model every save and restore speaks.

A training state is a flat map from a fully-qualified name to either a ``Chunk`` (this
rank's piece of a logical tensor, with the tensor's global shape and the piece's global
offsets) or a small JSON-able object (step, data position, config, ...). Because every chunk
knows its global geometry, restoring onto another layout is reading the overlapping slices.

Chunks come from DTensor placements (FSDP2, TP), from plain tensors (replicated: DDP, or a
pipeline stage's own layers), or are built directly by an engine (DeepSpeed).
"""
from __future__ import annotations

from dataclasses import dataclass

import sys

import torch


@dataclass
class Chunk:
    """This rank's piece of a logical tensor."""

    tensor: torch.Tensor  # the local data (any device); shape is the chunk's shape
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]  # where the chunk starts in the global tensor, per dim
    replica: bool = False  # other ranks hold identical copies; exactly one of them writes it

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def is_dtensor(value) -> bool:
    """A DTensor? (without importing torch.distributed.tensor, which a process that has no
    DTensor need not pay for: a DTensor's module is loaded by whoever made it)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(value, dtensor.DTensor)


def chunk_of(value: torch.Tensor) -> Chunk:
    """The chunk of a tensor that this rank holds (a DTensor's local shard, or all of it)."""
    if is_dtensor(value):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        replica = any(isinstance(p, Replicate) for p in value.placements)
        return Chunk(value.to_local(), tuple(value.shape), tuple(offsets), replica)
    return Chunk(value, tuple(value.shape), (0,) * value.dim(), replica=True)


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; tensors become Chunks, everything else stays as is."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = chunk_of(value)
        else:
            out[name] = value
    return out


def is_chunk(value) -> bool:
    return isinstance(value, Chunk)


def overlap(a_off, a_shape, b_off, b_shape):
    """The intersection of two boxes as (offsets, shape), or None when they do not meet."""
    lo = [max(x, y) for x, y in zip(a_off, b_off)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(a_off, a_shape, b_off, b_shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))
