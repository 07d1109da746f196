"""Lazy asynchronous multi-level saves for any torch trainer, in the shape of
``torch.distributed.checkpoint``: hand it a dict of Stateful objects (anything with
``state_dict()``/``load_state_dict()``: modules, optimizers, schedulers, your own).

    ckpt = AsyncCheckpointer(CheckpointConfig(interval=50, l1_dir="/local/ckpt"), run_dir)
    app = {"model": model, "optim": optimizer}
    start = ckpt.load(app) or 0                   # in place, from the newest good step at any level
    for step in range(start + 1, steps + 1):
        train_step()                              # optimizer.step() waits for pending copies
        ckpt.check()                              # every step, on every rank
        if step % 50 == 0:
            ckpt.save(step, app)                  # returns at once
    ckpt.save(steps, app, final=True)
    ckpt.close()                                  # waits until durable

DTensor state (FSDP2, TP) is saved as this rank's shards with their global geometry, so a
checkpoint loads onto another layout as with DCP.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

from checkpoint.checkpointer import Checkpointer
from checkpoint.config import CheckpointConfig
from checkpoint.state import flatten, is_chunk


def _rebuild(tree: dict, flat: dict, prefix: str = "") -> dict:
    """``tree`` with every leaf replaced by ``flat[full name]`` (restored tensors stay the
    same objects; plain values come back from the checkpoint)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out[key] = _rebuild(value, flat, name + ".")
        else:
            v = flat.get(name, value)
            out[key] = v.tensor if is_chunk(v) else v
    return out


class AsyncCheckpointer:
    """A ``Checkpointer`` for a dict of Stateful objects."""

    def __init__(self, cfg: CheckpointConfig | None = None, run_dir: str | Path = "runs/checkpoint"):
        self.ckpt = Checkpointer(cfg or CheckpointConfig(), Path(run_dir))

    def _state_dicts(self, app: dict) -> dict:
        for obj in app.values():
            if isinstance(obj, torch.optim.Optimizer):
                _init_optim_state(obj)  # a fresh optimizer has no moments to load into yet
                self.ckpt.attach(obj)
        return {name: obj.state_dict() for name, obj in app.items()}

    def save(self, step: int, app: dict, final: bool = False):
        """Snapshot every object's state as ``step``; returns at once (collective)."""
        self.ckpt.save(step, flatten(self._state_dicts(app)), final=final)

    def load(self, app: dict) -> int | None:
        """Restore every object in place from the newest good step; returns it, or None."""
        trees = self._state_dicts(app)
        flat = flatten(trees)
        got = self.ckpt.restore(flat)
        if got is None:
            return None
        step, objects, _ = got
        flat.update(objects)
        for name, obj in app.items():
            obj.load_state_dict(_rebuild(trees[name], flat, name + "."))
        return step

    def check(self) -> bool:
        return self.ckpt.check()

    def close(self):
        self.ckpt.close()
