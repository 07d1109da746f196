"""torch.distributed.checkpoint (DCP) directories, read and written without a process group.

A DCP directory is ``.metadata`` (a pickled ``Metadata``: every tensor's global size and
chunks, every item's file, offset and length) plus ``*.distcp`` files holding each chunk as
a ``torch.save`` record and each non-tensor item as ``torch.save``d bytes (or, for a
``BytesIO`` in the state, the caller's own bytes).

Any job's DCP checkpoint is read, whatever its names: torchtitan's (weights at the top level
or under ``model.``, ``optimizer.state.<fqn>.<key>``, ``train_state.step`` a 0-d tensor) as
well as ``get_state_dict``'s (``model.``/``optim.``). The step is the ``step`` object, else
the ``train_state.step`` or ``step`` tensor. Objects that ``torch.load(weights_only=True)``
cannot read (pickled Python objects, e.g. a data loader's state) are left out, with a warning.

``.metadata`` is read by an unpickler that only builds DCP's own metadata dataclasses, torch
sizes and dtypes (a crafted file cannot run code); records are read with
``torch.load(weights_only=True)``. The writer emits one ``.distcp`` file per logical tensor
(one chunk covering it), so ``dcp.load`` reshards it onto any world size and a rerun of an
interrupted conversion skips files already written.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import metadata as dcp_meta
from torch.distributed.checkpoint.filesystem import _StorageInfo

from checkpoint.convert.sources import Info, Source
from checkpoint.format import CorruptCheckpoint, fsync_dir
from checkpoint.patterns import assemble
from checkpoint.universal import jsonable
from comms import UserError

log = logging.getLogger(__name__)
METADATA = ".metadata"
STEP_TENSORS = ("train_state.step", "step")  # where jobs that keep the step as a tensor put it (torchtitan)
ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def read_metadata(path: Path) -> dcp_meta.Metadata:
    try:
        with open(path / METADATA, "rb") as f:
            return _MetadataUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as e:
        raise CorruptCheckpoint(f"{path / METADATA} is not readable DCP metadata ({e})") from None


class DCPSource(Source):
    format = "dcp"

    def __init__(self, path: Path):
        super().__init__(path)
        self.meta = read_metadata(self.path)
        self.storage = self.meta.storage_data or {}
        self.items = {}
        for fqn, md in self.meta.state_dict_metadata.items():
            if isinstance(md, dcp_meta.TensorStorageMetadata):
                self.tensors[fqn] = Info(tuple(md.size), md.properties.dtype)
                self.items[fqn] = md
        ranks = {info.relative_path for info in self.storage.values()}
        self.layout = {"files": len(ranks), "chunks_per_tensor": max((len(m.chunks) for m in self.items.values()), default=0)}
        self._objects: dict | None = None
        self.step = self._step()

    def _step(self) -> int:
        step = self.objects().get("step")
        if step is None:
            name = next((n for n in STEP_TENSORS if n in self.tensors and self.tensors[n].shape in ((), (1,))), None)
            step = self.read(name).item() if name else 0
        try:
            return int(step)
        except (TypeError, ValueError):
            raise CorruptCheckpoint(f"{self.path}: its step is {step!r}, not a number") from None

    def _record(self, index: dcp_meta.MetadataIndex) -> bytes:
        info = self.storage.get(index)
        if info is None:
            raise CorruptCheckpoint(f"{self.path / METADATA} lists no storage for {index.fqn}")
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{self.path} uses DCP storage transforms {info.transform_descriptors}; save it without them")
        path = self.path / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except FileNotFoundError:
            raise UserError(f"{path} is missing; the DCP checkpoint is incomplete") from None
        if len(data) != info.length:
            raise CorruptCheckpoint(f"{path} is truncated at {index.fqn}")
        return data

    def _load(self, index) -> object:
        try:
            return torch.load(io.BytesIO(self._record(index)), map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise CorruptCheckpoint(f"{self.path}: record of {index.fqn} is corrupt ({str(e).splitlines()[0][:120]})") from None

    def read(self, name: str) -> torch.Tensor:
        md = self.items[name]
        pieces = [(tuple(c.offsets), self._load(dcp_meta.MetadataIndex(name, c.offsets)).reshape(tuple(c.sizes)))
                  for c in md.chunks]
        return assemble(name, md.size, pieces, md.properties.dtype)

    def objects(self) -> dict:
        if self._objects is None:
            self._objects, skipped = {}, []
            for fqn, md in self.meta.state_dict_metadata.items():
                if isinstance(md, dcp_meta.BytesStorageMetadata):
                    data = self._record(dcp_meta.MetadataIndex(fqn))  # a missing or short record is damage
                    try:
                        self._objects[fqn] = jsonable(load_plain(data))
                    except (RuntimeError, EOFError, pickle.UnpicklingError):  # not plain data: never unpickled here
                        skipped.append(fqn)
            if skipped:
                log.warning("%s: left out %d object(s) that are not plain data (%s)", self.path, len(skipped),
                            ", ".join(skipped[:5]))
        return self._objects


def load_plain(data: bytes):
    """A torch.save'd object of plain data (``weights_only``); a ``BytesIO`` in a job's state
    (torchtitan keeps lists that way) is opened and its own torch.save'd content read too."""
    with torch.serialization.safe_globals([io.BytesIO]):  # rebuilding a BytesIO runs no code
        value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(value, io.BytesIO):
        value = torch.load(io.BytesIO(value.getvalue()), map_location="cpu", weights_only=True)
    return value


def tensor_file(k: int) -> str:
    return f"__0_{k}.distcp"


def planner_key(name: str) -> tuple:
    """How dcp_to_torch_save nests a flat name back: model.<fqn> -> ("model", fqn), ..."""
    if name.startswith("optim.state."):
        fqn, _, state = name[len("optim.state."):].rpartition(".")
        return ("optim", "state", fqn, state)
    head, _, rest = name.partition(".")
    return (head, rest) if rest else (head,)


def write_tensor(root: Path, k: int, tensor: torch.Tensor) -> int:
    """One tensor as its own .distcp file (tmp + rename); returns its length."""
    final = root / tensor_file(k)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(tensor.detach().cpu().contiguous(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return final.stat().st_size


def write_metadata(root: Path, names: list[str], infos: dict[str, Info], objects: dict):
    """The objects file and ``.metadata`` (written last: a DCP reader sees a complete checkpoint)."""
    sd_meta, storage, planner = {}, {}, {}
    for k, name in enumerate(names):
        info = infos[name]
        size = torch.Size(info.shape)
        zeros = torch.Size([0] * len(size))
        sd_meta[name] = dcp_meta.TensorStorageMetadata(
            dcp_meta.TensorProperties(dtype=info.dtype), size, [dcp_meta.ChunkStorageMetadata(zeros, size)])
        storage[dcp_meta.MetadataIndex(name, zeros, 0)] = _StorageInfo(tensor_file(k), 0, (root / tensor_file(k)).stat().st_size)
        planner[name] = planner_key(name)
    with open(root / "objects.distcp", "wb") as f:
        for key, value in objects.items():
            buf = io.BytesIO()
            torch.save(value, buf)
            offset = f.tell()
            f.write(buf.getbuffer())
            sd_meta[key] = dcp_meta.BytesStorageMetadata()
            storage[dcp_meta.MetadataIndex(key)] = _StorageInfo("objects.distcp", offset, f.tell() - offset)
            planner[key] = planner_key(key)
        f.flush()
        os.fsync(f.fileno())
    meta = dcp_meta.Metadata(state_dict_metadata=sd_meta, planner_data=planner, storage_data=storage, version="1.0.0")
    with open(root / (METADATA + ".tmp"), "wb") as f:
        pickle.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(root / (METADATA + ".tmp"), root / METADATA)
    fsync_dir(root)
