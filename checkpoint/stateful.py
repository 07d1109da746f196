"""Lazy asynchronous multi-level checkpoints for your own training loop, in the shape of
``torch.distributed.checkpoint``: hand it a dict of your state (modules, optimizers,
schedulers, anything with ``state_dict()``/``load_state_dict()``, tensors, plain values).

    from checkpoint import AsyncCheckpointer

    ckpt = AsyncCheckpointer()                    # run dir from `kintsugi launch` ($KINTSUGI_RUN_DIR)
    state = {"model": model, "optim": optimizer, "sched": scheduler}
    start = ckpt.load(state) or 0                 # in place, from the newest good step: keeper memory, L1, L2
    for step in range(start + 1, steps + 1):
        train_step()                              # optimizer.step() waits only for copies not yet done
        stop = ckpt.check()                       # every step, on every rank: True once SIGTERM/SIGINT came
        if step % 50 == 0 or stop or step == steps:
            handle = ckpt.save(step, state, final=stop or step == steps)   # returns at once
        if stop:
            break
    ckpt.close()                                  # waits until durable; raises unless the final save is

Names are those of ``torch.distributed.checkpoint.state_dict``: a module's parameters as
``<key>.<fqn>``, an optimizer's state by parameter name (``optim.state.<fqn>.exp_avg``,
gathered with ``get_optimizer_state_dict`` against the module in the same dict that owns
its parameters), so FSDP2, DDP and TP models save their own shards with global geometry
and load onto another layout, and the built-in trainer reads the same checkpoint. Objects
that are not tensors are stored from rank 0 as JSON (keep them equal on every rank).

``save``, ``load``, ``check``, ``close`` and a handle's ``wait`` are collective: call them on
every rank in the same order.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from checkpoint.checkpointer import Checkpointer, SaveTiming
from checkpoint.config import CheckpointConfig
from checkpoint.snapshot_config import SnapshotConfig
from checkpoint.state import flatten, is_chunk
from comms import UserError, default_run_dir, dist_utils
from comms.configlib import read_toml

# `kintsugi launch` writes the job's resolved config here and names it in the workers'
# environment, so that --checkpoint.* and --snapshot.* flags reach a user's script.
CONFIG_ENV = "KINTSUGI_CONFIG"


class SaveHandle:
    """What ``AsyncCheckpointer.save`` returns: where one save stands."""

    def __init__(self, ckpt: Checkpointer, timing: SaveTiming):
        self._ckpt, self.timing = ckpt, timing

    @property
    def step(self) -> int:
        return self.timing.step

    def done(self) -> bool:
        """Committed at every level it goes to (or given up at one), as of the last ``check()``.
        Local and cheap: it only reads what the last step boundary agreed on."""
        return not self._ckpt.in_flight(self.step)

    def wait(self):
        """Block until the save is committed at every level it goes to; raise RuntimeError
        naming the levels that failed. Collective, like ``check()``: every rank calls it for
        the same save (each rank's keeper reports, and all ranks decide together)."""
        while self._ckpt.in_flight(self.step):
            self._ckpt.check()
            if self._ckpt.in_flight(self.step):
                time.sleep(0.02)
        if self.timing.failed:
            raise RuntimeError(f"checkpoint step {self.step} was not stored everywhere: {'; '.join(self.timing.failed)}")

    @property
    def stall_s(self) -> float:
        """How long ``save`` held the training loop."""
        return self.timing.stall_s

    @property
    def durable_s(self) -> float | None:
        """``save`` to committed at every level; None while in flight."""
        return self.timing.durable_s


def init_optimizer_state(optimizer: torch.optim.Optimizer):
    """Create the optimizer's state tensors now, equal to a fresh optimizer's (AdamW: zero
    moments, step 0; made by one step with zero gradients and learning rate), so a restore
    has tensors to fill before the first step (torch optimizers make them lazily)."""
    if optimizer.state:
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    for p in params:
        p.grad = None
        step = optimizer.state[p].get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            optimizer.state[p]["step"] = 0


def launch_config() -> tuple[CheckpointConfig, SnapshotConfig | None]:
    """The [checkpoint] and [snapshot] sections ``kintsugi launch`` resolved for this job
    (defaults when run without it)."""
    path = os.environ.get(CONFIG_ENV)
    data = read_toml(Path(path), "job config", "run the script under kintsugi launch again") if path else {}
    try:
        cfg = CheckpointConfig(**data.get("checkpoint", {}))
        snap = SnapshotConfig(**data["snapshot"]) if data.get("snapshot", {}).get("interval") else None
    except TypeError as e:
        raise UserError(f"job config {path}: {e}") from None
    return cfg, snap


def _rebuild(tree: dict, flat: dict, prefix: str = "") -> dict:
    """``tree`` with its plain values replaced by ``flat[full name]`` from the checkpoint;
    tensors stay the same objects (DTensors too), their data restored in place."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out[key] = _rebuild(value, flat, name + ".")
        else:
            v = flat.get(name, value)
            out[key] = value if is_chunk(v) else v
    return out


class AsyncCheckpointer:
    """Asynchronous multi-level checkpoints of a dict of state (see the module doc).

    ``run_dir``: where checkpoints (``RUN_DIR/checkpoints`` unless ``config.dir``) and the
    keeper's files go; default ``$KINTSUGI_RUN_DIR`` (set by ``kintsugi launch``), else
    ``runs/job``. ``config``: levels, intervals, memory (default: what ``kintsugi launch``
    was given, else ``CheckpointConfig()``). ``snapshots=True`` (or a ``SnapshotConfig``)
    erasure-codes every save across the node keepers, so a lost node's part is rebuilt
    from the others' memory. ``handle_signals``: SIGTERM/SIGINT make ``check()`` return True
    instead of killing the process.
    """

    def __init__(self, run_dir: str | Path | None = None, config: CheckpointConfig | None = None,
                 snapshots: bool | SnapshotConfig = False, handle_signals: bool = True):
        launched, launched_snap = launch_config()
        self.run_dir = Path(run_dir) if run_dir else default_run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt = Checkpointer(config or launched, self.run_dir)
        if handle_signals:
            self.ckpt.handle_sigterm()
        snap = snapshots if isinstance(snapshots, SnapshotConfig) else (SnapshotConfig() if snapshots else launched_snap)
        self.snapshots = None
        if snap is not None and dist_utils.initialized():
            from checkpoint.keeper import job_id
            from checkpoint.snapshot import EcSnapshots

            self.snapshots = EcSnapshots(snap, self.ckpt.keeper, torch.distributed.distributed_c10d._get_default_store(),
                                         job_id())
        self.recovery: dict | None = None  # how the last load went: {"step", "level", "seconds"}

    # ---- state <-> the flat state model ----------------------------------------------
    def _owner(self, name: str, optim: torch.optim.Optimizer, state: dict) -> nn.Module:
        params = {id(p) for g in optim.param_groups for p in g["params"]}
        for obj in state.values():
            if isinstance(obj, nn.Module) and params <= {id(p) for p in obj.parameters()}:
                return obj
        raise UserError(f"checkpoint state {name!r}: an optimizer's state is saved by parameter name, but no module "
                        "in the same dict holds all its parameters; add the model next to it (e.g. {'model': model, "
                        f"'{name}': optimizer}})")

    def _trees(self, state: dict) -> dict:
        """Every entry as a state-dict tree of live tensors (references, no copies)."""
        trees = {}
        for name, obj in state.items():
            if isinstance(obj, nn.Module):
                trees[name] = get_model_state_dict(obj)
            elif isinstance(obj, torch.optim.Optimizer):
                init_optimizer_state(obj)  # a fresh optimizer: state to save or to restore into
                self.ckpt.attach(obj)  # its state may then be copied lazily, during the next forward
                trees[name] = get_optimizer_state_dict(self._owner(name, obj, state), obj)
            elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):  # DCP's Stateful
                trees[name] = obj.state_dict()
            else:
                trees[name] = obj
        return trees

    def _apply(self, state: dict, trees: dict, flat: dict):
        """Push restored values back into ``state``'s objects (tensors were filled in place)."""
        for name, obj in state.items():
            tree = _rebuild({name: trees[name]}, flat)[name]
            if isinstance(obj, nn.Module):
                set_model_state_dict(obj, tree)
            elif isinstance(obj, torch.optim.Optimizer):
                set_optimizer_state_dict(self._owner(name, obj, state), obj, tree)
            elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
                obj.load_state_dict(tree)
            elif not isinstance(obj, torch.Tensor):
                state[name] = tree

    # ---- the training loop's calls -----------------------------------------------------
    def save(self, step: int, state: dict, final: bool = False) -> SaveHandle:
        """Snapshot every entry of ``state`` as ``step``; returns at once (collective). The
        tensors are copied into the node keeper during your next forward/backward; the keeper
        writes the disk levels. ``final``: to every level regardless of intervals, and
        ``close()`` fails unless it is committed there."""
        return SaveHandle(self.ckpt, self.ckpt.save(step, flatten(self._trees(state)), final=final))

    def load(self, state: dict, allow_missing: bool = False) -> int | None:
        """Restore ``state`` in place from the newest step complete at any level (keeper memory
        first, rebuilt from erasure-coded shares when a node was lost, then L1, L2, else
        ``config.load_from``), resharded onto this layout; returns the step, or None when
        there is nothing to restore (a fresh optimizer then holds zero state, which its
        first step treats as a fresh one's). Collective."""
        trees = self._trees(state)
        flat = flatten(trees)
        optional = (lambda name: True) if allow_missing else (lambda name: False)
        t0 = time.perf_counter()
        if self.snapshots is not None:
            got = self.snapshots.restore(self.ckpt, flat, optional)
        else:
            got = self.ckpt.restore(flat, optional)
        if got is None:
            return None
        step, objects, _ = got
        flat.update(objects)
        self._apply(state, trees, flat)
        self.recovery = {"step": step, "level": self.ckpt.restored_from or "load_from",
                         "seconds": time.perf_counter() - t0}
        return step

    def check(self) -> bool:
        """Step boundary (collective; every rank, every step): commits what became durable,
        raises a keeper's or writer's error on every rank, and returns True once any rank
        was asked to stop (SIGTERM/SIGINT): then save with ``final=True`` and leave the loop."""
        stop = self.ckpt.check()
        self.ckpt.finished_saves()  # their handles keep their records; the checkpointer forgets them
        return stop

    def close(self):
        """Wait (at most ``close_timeout_s``) until every save is committed at its levels;
        raise unless the final one is. Collective."""
        self.ckpt.close()
