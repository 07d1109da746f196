"""Kintsugi as a DeepSpeed checkpoint engine: ``engine.save_checkpoint`` returns at once, the
tensors are copied lazily into the node keeper and written to L1/L2 by it.

DeepSpeed picks its engine in ``create_checkpoint_engine`` from two built-in switches only
(``checkpoint.writer`` for its fast/decoupled writers, ``datastates`` for the external
``datastates`` package); it has no entry for a third-party engine. So enabling takes one
line after ``deepspeed.initialize`` — options come from a ``"kintsugi"`` section of the
ds_config (the fields of ``checkpoint.CheckpointConfig``), which DeepSpeed ignores::

    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    checkpoint.deepspeed_engine.enable(engine)        # the one line
    ...
    engine.save_checkpoint(save_dir)                  # unchanged; returns at once
    engine.load_checkpoint(save_dir)                  # unchanged; reads Kintsugi's copy
    engine.checkpoint_engine.close()                  # at the end: wait until durable

Each file DeepSpeed saves becomes a few-byte marker (its loader globs for the names) and tensors ``<file>::<key path>`` (this rank's own, no
replicas) plus the file's structure as JSON in a small uint8 tensor, all in one native
Kintsugi step under ``<save_dir>/kintsugi`` whose manifest names the DeepSpeed tag. Objects
in DeepSpeed's state that are not plain data (its loss scaler, fragment addresses) are
stored as their attributes and rebuilt only if their class lives in ``deepspeed.``: nothing
is unpickled.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import re
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointCommitInfo, CheckpointEngine

from checkpoint.checkpointer import Checkpointer
from checkpoint.config import CheckpointConfig
from checkpoint.shards import ShardReader
from checkpoint.state import Chunk
from comms import UserError

log = logging.getLogger(__name__)

SKELETON = "::skeleton"


def _encode(value, prefix: str, tensors: dict):
    """JSON-able structure of ``value`` with tensors replaced by references into ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
        return {"__tensor": prefix}
    if isinstance(value, torch.Size):
        return {"__size": list(value)}
    if isinstance(value, dict):
        return {"__dict": [[_encode(k, f"{prefix}.k{i}", tensors), _encode(v, f"{prefix}.{k}", tensors)]
                           for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
        return items if isinstance(value, list) else {"__tuple": items}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    cls = type(value)
    if cls.__module__.startswith("deepspeed.") and hasattr(value, "__dict__"):
        return {"__object": f"{cls.__module__}:{cls.__qualname__}", "attrs": _encode(vars(value), prefix, tensors)}
    raise UserError(f"DeepSpeed checkpoint entry {prefix!r} is a {cls.__name__}, which Kintsugi cannot store "
                    "without pickle; keep client_state to tensors and plain data")


def _decode(value, tensors: dict):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor" in value:
        return tensors[value["__tensor"]]
    if "__size" in value:
        return torch.Size(value["__size"])
    if "__tuple" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple"])
    if "__dict" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__dict"]}
    module, name = value["__object"].split(":")
    if not module.startswith("deepspeed."):
        raise UserError(f"checkpoint names a class outside deepspeed ({value['__object']}); it was not written by Kintsugi")
    obj = getattr(importlib.import_module(module), name).__new__(getattr(importlib.import_module(module), name))
    obj.__dict__.update(_decode(value["attrs"], tensors))
    return obj


class ZeroState:
    """A DeepSpeed ZeRO engine's training state as a Stateful for ``AsyncCheckpointer``
    (``{"zero": ZeroState(engine)}``): full fp32 masters and Adam moments by parameter name
    (``model.<name>``, ``optim.state.<name>.exp_avg``), the names FSDP jobs and the built-in
    trainer use. ZeRO's flat partitions do not align with tensor boundaries; gathering makes
    the checkpoint layout-free (any world size, any engine). ``state_dict`` is collective for
    ZeRO-3. Creating it gives the optimizer its (zero) state, to restore into."""

    def __init__(self, engine):
        self.engine, self.zero = engine, engine.optimizer
        self.optimizer = getattr(self.zero, "optimizer", self.zero)  # ZeRO-1/2/3 wrap a torch optimizer
        self.stage = engine.zero_optimization_stage()
        from checkpoint.stateful import init_optimizer_state

        if self.stage == 3:
            # ZeRO-3 hands its torch optimizer one fp32 sub-group at a time; give it all of
            # them for the initialization, then restore its (empty) groups.
            saved = [list(g["params"]) for g in self.optimizer.param_groups]
            for sub, fp32 in enumerate(self.zero.fp32_partitioned_groups_flat):
                self.optimizer.param_groups[self.zero.sub_group_to_group_id[sub]]["params"].append(fp32)
            init_optimizer_state(self.optimizer)
            for g, params in zip(self.optimizer.param_groups, saved):
                g["params"] = params
        else:
            init_optimizer_state(self.optimizer)
        if self.stage in (1, 2):
            self.zero._lazy_init_hp_params_optimizer_state()  # ZeRO-1/2 map params to state fragments once

    def _adam_states(self) -> list[dict]:
        return [s for s in self.optimizer.state.values() if "step" in s]

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        adam = self._adam_states()
        step = (adam[0]["step"].detach().clone() if torch.is_tensor(adam[0]["step"]) else torch.tensor(adam[0]["step"])) \
            if adam else torch.zeros(())
        host = lambda t: t.detach().cpu().float().contiguous()
        model, optim = {}, {}
        for name, p in self.engine.module.named_parameters():
            model[name] = host(safe_get_full_fp32_param(p))
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            optim[name] = {k: host(t) for k, t in moments.items() if t is not None}
            optim[name]["step"] = host(step).reshape(())
        return {"model": model, "optim": {"state": optim}}

    def load_state_dict(self, sd: dict):
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        device = next(self.engine.module.parameters()).device
        for name, p in self.engine.module.named_parameters():
            value = sd["model"][name]
            if self.stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if torch.distributed.get_rank() == 0:
                        p.data.copy_(value)
            else:
                p.data.copy_(value)
        self.zero.refresh_fp32_params()
        state = sd["optim"]["state"]
        for name, p in self.engine.module.named_parameters():
            safe_set_full_fp32_param(p, sd["model"][name].to(device))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state.get(name, {}):
                    safe_set_full_optimizer_state(p, state[name][key].to(device), key)
        step = next((s["step"] for s in state.values() if "step" in s), None)
        for s in self._adam_states():
            s["step"].copy_(step) if torch.is_tensor(s["step"]) else s.__setitem__("step", float(step))


class KintsugiCheckpointEngine(CheckpointEngine):
    """DeepSpeed's CheckpointEngine interface on top of ``checkpoint.Checkpointer``."""

    def __init__(self, config_params=None, cfg: CheckpointConfig | None = None):
        super().__init__(config_params)
        self.name = "kintsugi"
        self.cfg = cfg or CheckpointConfig()
        self.ckpt: Checkpointer | None = None
        self.files: dict[str, dict] = {}
        self.step = 0

    def _checkpointer(self, save_dir: str) -> Checkpointer:
        if self.ckpt is None:
            if not self.cfg.dir:
                self.cfg.dir = str(Path(save_dir) / "kintsugi")
            self.ckpt = Checkpointer(self.cfg, Path(self.cfg.dir).parent)
        return self.ckpt

    def create(self, info: CheckpointCommitInfo):
        self.files = {}
        self._checkpointer(info.save_dir)

    def makedirs(self, path, exist_ok=False):
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str):
        """Remember the file's tensors (no copy yet: they are captured at commit, lazily).
        DeepSpeed's loader globs the tag directory for file names, so a few-byte marker
        file stands where the data would be."""
        self.files[Path(path).name] = state_dict
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text('{"stored_by": "kintsugi"}\n')

    def commit(self, info: CheckpointCommitInfo):
        """Hand every file of this tag to the Checkpointer as one step; returns at once."""
        state = {}
        for fname, sd in self.files.items():
            tensors = {}
            skeleton = json.dumps(_encode(sd, fname, tensors)).encode()
            state[fname + SKELETON] = Chunk(torch.frombuffer(bytearray(skeleton), dtype=torch.uint8),
                                            (len(skeleton),), (0,))
            for name, t in tensors.items():
                state[name] = Chunk(t.detach(), tuple(t.shape), (0,) * t.dim())
        digits = re.findall(r"\d+", info.tag)
        self.step = max(self.step + 1, int(digits[-1]) if digits else 0)
        self._checkpointer(info.save_dir).save(self.step, state, extra={"ds_tag": info.tag,
                                                                         "ds_files": sorted(self.files)})
        self.files = {}
        return True

    def load(self, path: str, map_location=None):
        """Rebuild one file DeepSpeed saved, from the newest committed step with its tag
        (or the newest committed step, with a warning, when ``latest`` ran ahead of it)."""
        path = Path(path)
        ckpt = self._checkpointer(str(path.parent.parent))
        tag, fname = path.parent.name, path.name
        found = None  # (storage, step, manifest): the tag's step, else the newest holding this file
        for storage in [ckpt.storages[n] for n in ("l1", "l2") if n in ckpt.storages]:
            for step in storage.steps():
                manifest = storage.manifest(step)
                if fname + SKELETON not in manifest["tensors"]:
                    continue
                if manifest.get("ds_tag") == tag:
                    found = (storage, step, manifest)
                    break
                if found is None:  # steps() lists the newest commit first
                    found = (storage, step, manifest)
            if found and found[2].get("ds_tag") == tag:
                break
        if found is None:
            raise UserError(f"no committed Kintsugi checkpoint holds {fname} under {ckpt.root}; "
                            "save one first or load another directory")
        storage, step, manifest = found
        if manifest.get("ds_tag") != tag:
            log.warning("DeepSpeed tag %s was never committed; loading %s (step %d) instead",
                        tag, manifest.get("ds_tag"), step)
        step_dir, _ = storage.open_step(step)
        readers, tensors = {}, {}
        for name, meta in manifest["tensors"].items():
            if name == fname + SKELETON or name.startswith(fname + "."):
                c = meta["chunks"][0]
                reader = readers.setdefault(c["file"], ShardReader(step_dir / c["file"]))
                tensors[name] = reader.read(c["key"], c["crc32"])
        skeleton = json.loads(bytes(tensors.pop(fname + SKELETON).numpy()))
        return _decode(skeleton, tensors)

    def close(self):
        """Wait until every save is committed (call at the end of training; collective)."""
        if self.ckpt is not None:
            self.ckpt.close()
            self.ckpt = None

    cleanup = close

    def preserves_storage_sharing(self):
        return False


def enable(engine, cfg: CheckpointConfig | None = None) -> KintsugiCheckpointEngine:
    """Make a DeepSpeed engine save and load through Kintsugi; options from ``cfg`` or the
    ds_config's ``"kintsugi"`` section."""
    if cfg is None:
        section = dict(engine._config._param_dict.get("kintsugi", {}))
        try:
            cfg = CheckpointConfig(**section)
        except TypeError as e:
            raise UserError(f"ds_config section 'kintsugi': {e}; use the fields of checkpoint.CheckpointConfig") from None
    cfg.validate()
    engine.checkpoint_engine = KintsugiCheckpointEngine(engine._config, cfg)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps a torch optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        from checkpoint.lazy import protect
        protect(optimizer)
    return engine.checkpoint_engine
