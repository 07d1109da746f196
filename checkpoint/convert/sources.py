"""Reading any supported checkpoint as a set of logical tensors, one at a time.

Every reader presents the same view: the step, the source layout, each logical tensor's
global shape and dtype under its universal name (checkpoint/universal.py), and ``read(name)``
that consolidates just that tensor from its pieces. Converters, ``inspect``, ``verify`` and
``load_any`` are written once against this view.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint.format import CorruptCheckpoint, committed_steps, read_manifest, step_dirname
from checkpoint.shards import DTYPE_BY_NAME, TORCH_DTYPES, ShardReader
from checkpoint.patterns import assemble
from checkpoint.universal import Universal, fill_state, is_universal
from comms import UserError


@dataclass
class Info:
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Source:
    """Base of the readers: subclasses set the fields and implement ``read``."""

    format = "?"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.step = 0
        self.layout: dict = {}
        self.tensors: dict[str, Info] = {}
        self.missing: list[str] = []  # what a full training state would have but this one lacks

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def read_box(self, name: str, offsets, shape) -> torch.Tensor:
        return self.read(name)[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]

    def objects(self) -> dict:
        return {}

    def peak_bytes(self, name: str) -> int:
        """Memory ``read(name)`` needs beyond the result (buffers of pieces)."""
        return self.tensors[name].nbytes

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


class NativeSource(Source):
    """Kintsugi's own checkpoint: a root with step_XXXXXXXX dirs (newest committed) or one step dir."""

    format = "kintsugi"

    def __init__(self, path: Path):
        super().__init__(path)
        step_dir = self.path
        if not (step_dir / "manifest.json").is_file():
            steps = committed_steps(self.path)
            if not steps:
                raise UserError(f"{self.path} holds no committed Kintsugi step; point at a checkpoint root or step dir")
            step_dir = self.path / step_dirname(steps[0])
        self.dir = step_dir
        self.manifest = read_manifest(step_dir)
        self.step = self.manifest["step"]
        self.layout = {"world_size": self.manifest.get("world_size")}
        self.tensors = {n: Info(tuple(t["shape"]), DTYPE_BY_NAME[t["dtype"]]) for n, t in self.manifest["tensors"].items()}
        self.readers: dict[str, ShardReader] = {}

    def _reader(self, file: str) -> ShardReader:
        if file not in self.readers:
            path = self.dir / file
            if not path.is_file():
                raise UserError(f"shard {path} is missing; the checkpoint is incomplete")
            self.readers[file] = ShardReader(path)
        return self.readers[file]

    def read(self, name: str) -> torch.Tensor:
        t = self.manifest["tensors"][name]
        pieces = [(tuple(c["offsets"]), self._reader(c["file"]).read(c["key"], c["crc32"])) for c in t["chunks"]]
        return assemble(name, t["shape"], pieces, DTYPE_BY_NAME[t["dtype"]])

    def objects(self) -> dict:
        return {"step": self.step, **self.manifest["objects"]}


class UniversalSource(Source):
    format = "universal"

    def __init__(self, path: Path):
        super().__init__(path)
        self.u = Universal(path)
        self.step = self.u.step
        self.layout = self.u.meta["source"].get("layout", {})
        self.tensors = {n: Info(tuple(r["shape"]), DTYPE_BY_NAME[r["dtype"]]) for n, r in self.u.tensors.items()}
        self.missing = self.u.meta.get("missing", [])

    def read(self, name: str) -> torch.Tensor:
        return self.u.read(name)

    def read_box(self, name: str, offsets, shape) -> torch.Tensor:
        return self.u.read_box(name, offsets, shape)

    def objects(self) -> dict:
        return self.u.meta["objects"]


class SafetensorsSource(Source):
    """Consolidated model weights: a .safetensors file, or a directory with model.safetensors
    or Hugging Face shards and their model.safetensors.index.json."""

    format = "safetensors"
    FILE = "model.safetensors"
    INDEX = "model.safetensors.index.json"

    def __init__(self, path: Path):
        super().__init__(path)
        if self.path.is_file():
            files = [self.path]
        elif (self.path / self.INDEX).is_file():
            try:
                weight_map = json.loads((self.path / self.INDEX).read_text())["weight_map"]
                files = [self.path / f for f in sorted(set(weight_map.values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CorruptCheckpoint(f"{self.path / self.INDEX} is not a safetensors index ({e})") from None
        else:
            files = [self.path / self.FILE]
        self.readers: dict[str, ShardReader] = {}  # tensor name (with model.) -> the file's reader
        for f in files:
            if not f.is_file():
                raise UserError(f"{f} is missing; the safetensors checkpoint is incomplete")
            reader = ShardReader(f)
            meta = reader.header.get("__metadata__") or {}
            step = meta.get("step", "0")  # a string: the header was validated
            self.step = int(step) if step.isascii() and step.isdigit() else 0
            for k, v in reader.header.items():
                if k != "__metadata__":
                    self.tensors["model." + k] = Info(tuple(v["shape"]), TORCH_DTYPES[v["dtype"]])
                    self.readers["model." + k] = reader
        self.layout = {"files": len(files)}

    def read(self, name: str) -> torch.Tensor:
        return self.readers[name].read(name[len("model."):])


@dataclass
class NameMap:
    r"""Renames a foreign checkpoint's tensors onto Kintsugi's names (``model.<fqn>``,
    ``optim.state.<fqn>.<key>``): regex rules, the first whose pattern matches a name
    rewrites it (``re.sub``; the replacement ``-`` drops the tensor); ``prefix`` goes before
    the names no rule rewrote that do not start with it. A rules file holds one ``PATTERN
    REPLACEMENT`` per line (``#`` starts a comment), e.g. ``^optimizer\.state\. optim.state.``
    for torchtitan."""

    rules: list[tuple[re.Pattern, str]] = field(default_factory=list)
    prefix: str = ""

    @staticmethod
    def load(path: str | None, prefix: str = "") -> "NameMap | None":
        if not path and not prefix:
            return None
        rules = []
        if path:
            try:
                lines = Path(path).read_text().splitlines()
            except OSError as e:
                raise UserError(f"--map {path}: cannot read it ({e.strerror or e}); give a file of PATTERN REPLACEMENT lines") from None
            for n, line in enumerate(lines, 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise UserError(f"--map {path} line {n}: write one PATTERN and one REPLACEMENT separated by spaces "
                                    f"(use - to drop a tensor), not {line!r}")
                try:
                    rules.append((re.compile(parts[0]), parts[1]))
                except re.error as e:
                    raise UserError(f"--map {path} line {n}: {parts[0]!r} is not a regular expression ({e})") from None
        return NameMap(rules, prefix)

    def __call__(self, name: str) -> str | None:
        for pattern, repl in self.rules:
            if pattern.search(name):
                return None if repl == "-" else pattern.sub(repl, name, count=1)
        return name if name.startswith(self.prefix) else self.prefix + name


class RenamedSource(Source):
    """Another source seen through a ``NameMap``."""

    def __init__(self, src: Source, names: NameMap):
        super().__init__(src.path)
        self.src, self.format, self.step, self.layout, self.missing = src, src.format, src.step, src.layout, src.missing
        self.original: dict[str, str] = {}  # new name -> source name
        for old in src.tensors:
            new = names(old)
            if new is None:
                continue
            if new in self.original:
                raise UserError(f"the name map sends both {self.original[new]!r} and {old!r} to {new!r}; make the rules "
                                "tell them apart")
            self.original[new] = old
            self.tensors[new] = src.tensors[old]

    def read(self, name: str) -> torch.Tensor:
        return self.src.read(self.original[name])

    def read_box(self, name: str, offsets, shape) -> torch.Tensor:
        return self.src.read_box(self.original[name], offsets, shape)

    def objects(self) -> dict:
        return self.src.objects()

    def peak_bytes(self, name: str) -> int:
        return self.src.peak_bytes(self.original[name])


def detect(path: Path, names: NameMap | None = None) -> Source:
    """``detect_format(path)`` seen through ``names`` when given."""
    src = detect_format(path)
    return RenamedSource(src, names) if names else src


def detect_format(path: Path) -> Source:
    """The reader for whatever checkpoint ``path`` is; a UserError naming what was found otherwise."""
    from checkpoint.convert.deepspeed import DeepSpeedSource, DeepSpeedUniversalSource, is_deepspeed, is_deepspeed_universal

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give the checkpoint directory")
    if is_universal(path):
        return UniversalSource(path)
    if (path / "manifest.json").is_file() or committed_steps(path):
        return NativeSource(path)
    if path.is_file() and path.suffix == ".safetensors" or (path / SafetensorsSource.FILE).is_file() \
            or (path / SafetensorsSource.INDEX).is_file():
        return SafetensorsSource(path)
    if (path / ".metadata").is_file():  # DCP's (torch.distributed.checkpoint is imported only for it)
        from checkpoint.convert.dcp import DCPSource

        return DCPSource(path)
    if is_deepspeed_universal(path):
        return DeepSpeedUniversalSource(path)
    if is_deepspeed(path):
        return DeepSpeedSource(path)
    raise UserError(f"{path} is not a checkpoint this tool knows (Kintsugi native or universal, DeepSpeed ZeRO or "
                    "universal, torch DCP); check the path")


def load_from_source(src: Source, state: dict, optional=lambda name: False) -> tuple[int, dict, set]:
    """Fill ``state``'s chunks from any source (consolidating each tensor it needs)."""
    shapes = {n: i.shape for n, i in src.tensors.items()}
    return src.step, src.objects(), fill_state(state, shapes, src.read_box, str(src.path), optional)


def load_any(path: Path, state: dict, optional=lambda name: False) -> tuple[int, dict, set]:
    """Restore ``state`` from a checkpoint of any supported format, at any layout.

    Native roots go through ``checkpoint.store.load_state`` (collective, falls back to older
    steps on damage); universal checkpoints read only each chunk's rows; DCP, DeepSpeed and
    DeepSpeed-universal checkpoints are consolidated tensor by tensor.
    """
    from checkpoint.store import load_state
    from checkpoint.universal import load_universal

    path = Path(path)
    if is_universal(path):
        return load_universal(path, state, optional)
    if not (path / "manifest.json").is_file() and committed_steps(path):
        return load_state(path, state, optional)  # a native root: its newest good step
    return load_from_source(detect(path), state, optional)
