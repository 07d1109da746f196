"""Job configuration: one dataclass per component, loaded from TOML, overridden from the
command line with ``--section.key=value``, validated before any worker does real work.

Every field carries its documentation in ``metadata["doc"]``; ``reference_markdown()``
renders the README's config reference from it, so the two never drift apart.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint.config import CheckpointConfig
from checkpoint.snapshot_config import SnapshotConfig
from comms import UserError
from comms.configlib import check, doc, read_toml
from diagnostics.config import DiagnosticsConfig
from trainer.moe_config import MoEConfig

# The default job ships inside the package (trainer/configs/, the repository's configs/), so
# an installed `kintsugi launch` finds it from any directory.
DEFAULT_CONFIG = "configs/tiny.toml"


@dataclass
class ModelConfig:
    """The decoder-only transformer (trainer/model.py)."""

    vocab_size: int = doc("Token vocabulary; 256 for the byte-level corpus.", 256)
    dim: int = doc("Hidden size.", 128)
    n_layers: int = doc("Number of transformer blocks.", 4)
    n_heads: int = doc("Attention heads; must divide `dim` and be divisible by `parallel.tp`.", 4)
    n_kv_heads: int = doc("Key/value heads (grouped-query attention); 0 means `n_heads`.", 0)
    ffn_hidden: int = doc("SwiGLU hidden size; 0 means 8/3 x dim rounded up to 32.", 0)
    max_seq_len: int = doc("Longest sequence the rotary table covers.", 256)
    rope_theta: float = doc("Rotary position base.", 10000.0)
    norm_eps: float = doc("RMSNorm epsilon.", 1e-5)
    tie_embeddings: bool = doc("Share the input embedding with the output projection.", False)
    init_std: float = doc("Standard deviation of the normal weight init.", 0.02)
    def validate(self):
        check(self.vocab_size > 0, "model.vocab_size", "must be positive")
        check(self.dim > 0 and self.n_layers > 0, "model.dim/n_layers", "must be positive")
        check(self.n_heads > 0 and self.dim % self.n_heads == 0, "model.n_heads", f"must divide model.dim={self.dim}")
        check((self.dim // self.n_heads) % 2 == 0, "model.n_heads", "dim / n_heads must be even for rotary positions")
        kv = self.n_kv_heads or self.n_heads
        check(self.n_heads % kv == 0, "model.n_kv_heads", f"must divide model.n_heads={self.n_heads}")


@dataclass
class DataConfig:
    """The embedded corpus: Python's own standard library sources, byte-level tokens."""

    seq_len: int = doc("Tokens per sample.", 128)
    batch_size: int = doc("Global batch size in samples per optimizer step (all data-parallel ranks together).", 8)
    seed: int = doc("Seed of the shuffle; the same seed gives the same batches on any layout.", 1234)
    max_corpus_mb: float = doc("Read at most this many MiB of source files (sorted by path).", 16.0)
    corpus_dir: str = doc("Directory of text files to train on; empty = the standard library of this Python.", "")

    def validate(self):
        check(self.seq_len > 0, "data.seq_len", "must be positive")
        check(self.batch_size > 0, "data.batch_size", "must be positive")
        check(self.max_corpus_mb > 0, "data.max_corpus_mb", "must be positive")
        if self.corpus_dir:
            check(Path(self.corpus_dir).is_dir(), "data.corpus_dir", f"{self.corpus_dir!r} is not a directory")


@dataclass
class ParallelConfig:
    """How the world is split: one device mesh with named dims (pp, dp_replicate, dp_shard, tp)."""

    engine: str = doc("`torch` (DDP / FSDP2 / TP / PP on one device mesh) or `deepspeed` (a ZeRO engine).", "torch")
    dp_replicate: int = doc("Data-parallel replicas (DDP; HSDP when combined with dp_shard or tp).", 1)
    dp_shard: int = doc("Data-parallel shards (FSDP2 fully_shard); -1 = whatever the other dims leave.", -1)
    tp: int = doc("Tensor-parallel degree (DTensor column/row sharding of attention and MLP).", 1)
    pp: int = doc("Pipeline stages (torch.distributed.pipelining).", 1)
    pp_schedule: str = doc("Pipeline schedule: `eager-1F1B` (1F1B with sends off the critical path and 2(p-s)-1 "
                           "warm-up forwards on stage s, trainer/schedule.py; what `kintsugi plan` models), torch's "
                           "`1F1B`, or `GPipe`.", "eager-1F1B")
    pp_microbatches: int = doc("Microbatches per step under pipeline parallelism.", 4)
    pp_layers: list = doc("Blocks per pipeline stage (uneven splits); empty = as even as possible.", [])
    ep: int = doc("Expert-parallel degree for MoE layers (experts split over this many data-parallel ranks).", 1)
    plan: str = doc("Placement plan from `kintsugi plan` (JSON): its rank grid orders the mesh so that TP stays in a node and DP in a fabric; its sizes and layers per stage replace pp/dp_replicate/dp_shard/tp/pp_layers. Empty = ranks in order.", "")
    placement: str = doc("`auto`: detect the cluster at start (NICs, fabrics, measured links and speeds) and plan the placement and pipeline split with the cost model (trainer/placement.py; `kintsugi launch --placement auto`); empty = `plan` or ranks in order.", "")
    overlap_optimizer: bool = doc("Data-parallel replicas reduce gradients in buckets and step each bucket's parameters as soon as its reduction is done, overlapping the rest (Holmes; trainer/overlap_optim.py). Needs dp_replicate > 1, dp_shard = tp = 1, optim.grad_clip = 0 and the torch engine.", False)
    bucket_mb: float = doc("Gradient bucket size (MB) of the overlapped optimizer.", 4.0)
    optimizer_overlap: bool = doc("With overlap_optimizer: step each bucket as soon as its reduction is done (true), or once after every reduction (false: the same plain replicas and buckets without the overlap, the baseline that measures the overlap's own gain).", True)
    backend: str = doc("Process-group backend: `auto` (NCCL with CUDA, else gloo), `gloo` or `nccl`.", "auto")
    timeout_s: float = doc("Process-group timeout in seconds.", 600.0)

    def validate(self):
        check(self.engine in ("torch", "deepspeed"), "parallel.engine", "must be `torch` or `deepspeed`")
        check(self.pp_schedule in ("eager-1F1B", "1F1B", "GPipe"), "parallel.pp_schedule",
              "must be `eager-1F1B`, `1F1B` or `GPipe`")
        check(self.backend in ("auto", "gloo", "nccl"), "parallel.backend", "must be auto, gloo or nccl")
        for name in ("dp_replicate", "tp", "pp", "ep", "pp_microbatches"):
            check(getattr(self, name) >= 1, f"parallel.{name}", "must be >= 1")
        check(self.dp_shard == -1 or self.dp_shard >= 1, "parallel.dp_shard", "must be >= 1 or -1 (auto)")
        check(self.placement in ("", "auto"), "parallel.placement", "must be `auto` or empty")
        check(not (self.placement and self.plan), "parallel.placement", "plans at start; drop it or parallel.plan (a plan file)")
        check(self.bucket_mb > 0, "parallel.bucket_mb", "must be > 0")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine (used when parallel.engine = "deepspeed")."""

    zero_stage: int = doc("ZeRO stage 0, 1, 2 or 3.", 2)
    config_file: str = doc("A ds_config JSON file; its keys are overridden by `ds_config`.", "")
    ds_config: dict = doc("An inline ds_config table, merged over the file and the generated defaults.", {})

    def validate(self):
        check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        if self.config_file:
            check(Path(self.config_file).is_file(), "deepspeed.config_file", f"{self.config_file!r} does not exist")


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = doc("Peak learning rate.", 3e-3)
    min_lr_ratio: float = doc("Final learning rate as a fraction of `lr`.", 0.1)
    weight_decay: float = doc("AdamW weight decay.", 0.1)
    beta1: float = doc("AdamW beta1.", 0.9)
    beta2: float = doc("AdamW beta2.", 0.95)
    eps: float = doc("AdamW epsilon.", 1e-8)
    warmup_steps: int = doc("Linear warm-up steps.", 10)
    schedule: str = doc("Decay after warm-up: `cosine`, `linear` or `constant`.", "cosine")
    grad_clip: float = doc("Clip the global gradient norm to this; 0 = off.", 1.0)

    def validate(self):
        check(self.lr > 0, "optim.lr", "must be positive")
        check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        check(self.schedule in ("cosine", "linear", "constant"), "optim.schedule", "must be cosine, linear or constant")
        check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class TrainConfig:
    """The training loop and its outputs."""

    steps: int = doc("Optimizer steps to train for (a resumed run stops at the same step).", 60)
    grad_accum: int = doc("Micro-steps per optimizer step; the global batch is split into this many.", 1)
    dtype: str = doc("Compute precision: `fp32` or `bf16` (autocast).", "fp32")
    seed: int = doc("Seed of the weight init; identical on every rank.", 42)
    log_every: int = doc("Print a step line every N steps (rank 0).", 10)
    run_dir: str = doc("Where logs, metrics, checkpoints and diagnostics go; created if missing. Its parent must exist, except `runs/` in the working directory, which is created on demand.", "runs/tiny")
    progress: bool = doc("Show a progress bar on rank 0 when its output is a terminal (logs get the step lines only).", True)
    threads: int = doc("torch intra-op threads per rank; 0 = leave torch's default.", 1)

    def validate(self):
        check(self.steps >= 1, "train.steps", "must be >= 1")
        check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        check(self.dtype in ("fp32", "bf16"), "train.dtype", "must be fp32 or bf16")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        parent = Path(self.run_dir).resolve().parent
        check(parent.is_dir() or parent == Path("runs").resolve(), "train.run_dir", f"parent directory {str(parent)!r} does not exist; create it or pick another run_dir")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)

    def validate(self, world_size: int | None = None):
        """Check every section, and with ``world_size`` that the layout fits that many ranks
        (the resolved degrees are ``ParallelDims.resolve(cfg, world_size)``; the config is
        not rewritten)."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        p = self.parallel
        if self.moe.every and p.ep > 1:
            check(p.engine == "torch", "parallel.ep", "expert parallel needs parallel.engine=torch")
            check(p.tp == 1, "parallel.ep", "expert parallel with tensor parallel is not supported; set parallel.tp=1")
            check(p.dp_shard in (1, -1), "parallel.ep",
                  "expert parallel with FSDP2 (dp_shard > 1) is not supported; use parallel.dp_replicate for data parallel")
        if p.ep > 1:
            check(self.moe.every > 0, "parallel.ep", "expert parallel needs MoE layers; set moe.every")
        self._check_pipeline(p.pp, p.pp_layers)
        check(self.model.n_heads % p.tp == 0 and (self.model.n_kv_heads or self.model.n_heads) % p.tp == 0,
              "parallel.tp", f"must divide model.n_heads={self.model.n_heads} and n_kv_heads")
        if p.overlap_optimizer:
            check(p.engine == "torch" and p.tp == 1 and p.ep == 1, "parallel.overlap_optimizer",
                  "steps whole data-parallel replicas: needs parallel.engine=torch, tp=1, ep=1")
            check(self.optim.grad_clip == 0, "parallel.overlap_optimizer",
                  "steps a bucket before the others are reduced, so it cannot clip by the global norm; set optim.grad_clip=0")
        if world_size is not None:
            from trainer.parallel_dims import ParallelDims

            dims = ParallelDims.resolve(self, world_size)
            self._check_pipeline(dims.pp, list(dims.pp_layers))  # a placement plan sets them
            check(self.data.batch_size % (dims.dp_size * self.train.grad_accum) == 0, "data.batch_size",
                  f"{self.data.batch_size} must be divisible by data-parallel size {dims.dp_size} x train.grad_accum {self.train.grad_accum}")
            if dims.pp_enabled:
                local = self.data.batch_size // dims.dp_size // self.train.grad_accum
                check(local % p.pp_microbatches == 0, "parallel.pp_microbatches", f"must divide the per-rank batch {local}")
            if self.moe.every:
                check(dims.dp_size % p.ep == 0 and self.moe.n_experts % p.ep == 0, "parallel.ep",
                      f"must divide the data-parallel size {dims.dp_size} and moe.n_experts={self.moe.n_experts}")
            if p.overlap_optimizer:
                check(dims.dp_shard == 1 and dims.dp_replicate > 1, "parallel.overlap_optimizer",
                      f"steps data-parallel replicas: needs dp_replicate > 1 and dp_shard = 1 (got {dims.dp_replicate} x {dims.dp_shard})")
        return self

    def _check_pipeline(self, pp: int, layers: list):
        if pp == 1:
            return
        check(not self.moe.every, "parallel.pp", "MoE models do not support pipeline parallelism yet; set parallel.pp=1")
        check(not self.model.tie_embeddings, "model.tie_embeddings", "cannot tie embeddings across pipeline stages; set it false")
        check(self.parallel.engine == "torch", "parallel.pp", "pipeline parallelism needs parallel.engine=torch")
        check(pp <= self.model.n_layers, "parallel.pp", f"more stages than model.n_layers={self.model.n_layers}")
        if layers:
            check(len(layers) == pp and sum(layers) == self.model.n_layers,
                  "parallel.pp_layers", f"must list {pp} stage sizes summing to model.n_layers={self.model.n_layers}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, tp, name: str):
    """Turn a TOML or command-line value into the field's type, or say which field is wrong."""
    origin = typing.get_origin(tp) or tp
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. moe.chunks = 4 for a field that also takes "auto"
    elif origin in (list, dict):
        if isinstance(value, origin):
            return value
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = [v for v in value.split(",") if v] if origin is list else None
            if isinstance(parsed, origin):
                return parsed
    raise UserError(f"config {name}: expected {origin.__name__}, got {value!r}")


_HINTS = {}


def _fields(section_cls):
    if section_cls not in _HINTS:
        hints = typing.get_type_hints(section_cls)
        _HINTS[section_cls] = {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}
    return _HINTS[section_cls]


def _set(cfg: JobConfig, section: str, key: str, value):
    sections = _fields(JobConfig)
    if section not in sections:
        raise UserError(f"config: unknown section [{section}]; known sections: {', '.join(sections)}")
    obj = getattr(cfg, section)
    fields = _fields(type(obj))
    if key not in fields:
        raise UserError(f"config: unknown key {section}.{key}; known keys of [{section}]: {', '.join(fields)}")
    setattr(obj, key, _coerce(value, fields[key], f"{section}.{key}"))


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = (), default_file: bool = True) -> JobConfig:
    """Defaults, then the TOML file (without ``path``: the shipped configs/tiny.toml, unless
    ``default_file`` is False), then ``--section.key=value`` overrides; validated."""
    cfg = JobConfig()
    hint = "pass --config with an existing TOML file (e.g. configs/tiny.toml)"
    data = {}
    if path:
        data = read_toml(Path(path), "config file", hint)
    elif default_file:
        with importlib.resources.as_file(importlib.resources.files("trainer").joinpath(DEFAULT_CONFIG)) as path:
            data = read_toml(path, "config file", hint)
    for section, table in data.items():
        if not isinstance(table, dict):
            raise UserError(f"config file {str(path)!r}: top-level key {section!r} must be a [section] table")
        for key, value in table.items():
            _set(cfg, section, key, value)
    for item in overrides:
        if not item.startswith("--") or "=" not in item or "." not in item.split("=", 1)[0]:
            raise UserError(f"bad override {item!r}; write it as --section.key=value (e.g. --train.steps=100)")
        dotted, value = item[2:].split("=", 1)
        section, key = dotted.split(".", 1)
        _set(cfg, section, key, value)
    return cfg.validate()


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML (what --print-config prints and the run directory keeps)."""
    lines = []
    for section, obj in cfg.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in obj.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def reference_markdown() -> str:
    """The config reference for the README, generated from the field docs."""
    out = []
    for section, sec_tp in _fields(JobConfig).items():
        out.append(f"### `[{section}]` — {sec_tp.__doc__.strip()}\n")
        out.append("| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(sec_tp):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(f"| `{f.name}` | `{_toml_value(default)}` | {f.metadata['doc']} |")
        out.append("")
    return "\n".join(out)
