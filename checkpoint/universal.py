"""The universal format: one consolidated atom per logical tensor, loadable at any layout.

A universal checkpoint is a directory::

    universal.json            format, step, source format and layout, every tensor's global
                              shape, dtype, atom file and CRC32, the non-tensor state
    atoms/<name>.safetensors  one file per logical tensor (a parameter, or one optimizer
                              state of it: fp32 master, exp_avg, exp_avg_sq, step)

Atoms are safetensors-layout files (checkpoint/format.py): a loader reads the byte range of
just the rows its chunk needs, so a rank of a 64-way FSDP job reads 1/64 of each atom.

Tensor names follow torch's ``get_state_dict`` flattening, shared with the native format and
DCP: ``model.<fqn>`` for parameters (the fp32 master where the source has one) and
``optim.state.<fqn>.<state>`` for optimizer states; objects are e.g. ``step``,
``lr_scheduler``, ``rng``, ``data``, ``loss_scaler``, ``optim.param_groups``.
"""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from checkpoint.format import CorruptCheckpoint, is_crc, is_ints, is_key, is_relative, quoted, write_manifest
from checkpoint.shards import DTYPE_BY_NAME, DTYPE_NAMES, TORCH_DTYPES, ShardReader, write_shard
from checkpoint.state import Chunk, is_chunk
from comms import UserError

FORMAT = "kintsugi-universal"
VERSION = 1
META = "universal.json"
ATOMS = "atoms"
STATES = ("fp32", "exp_avg", "exp_avg_sq", "step")


def param_name(fqn: str, state: str) -> str:
    """The universal name of a parameter's state (``fp32`` is the parameter itself)."""
    return f"model.{fqn}" if state == "fp32" else f"optim.state.{fqn}.{state}"


def split_name(name: str) -> tuple[str, str] | None:
    """(fqn, state) of a universal tensor name, None for anything else (buffers, ...)."""
    if name.startswith("optim.state."):
        fqn, _, state = name[len("optim.state."):].rpartition(".")
        return (fqn, state) if fqn and state in STATES else None
    if name.startswith("model."):
        return name[len("model."):], "fp32"
    return None


def atom_path(name: str) -> str:
    return f"{ATOMS}/{name.replace('/', '%2F')}.safetensors"


def jsonable(obj):
    """A JSON-able copy of a small object (tensors become numbers or lists, tuples lists);
    anything else becomes its repr so inspect can still show it."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "value") and isinstance(obj.value, (int, str)):  # enums
        return obj.value
    return repr(obj)


def write_atom(root: Path, name: str, tensor: torch.Tensor) -> dict:
    """Write one atom (tmp file, fsync, rename: a present atom is a complete atom)."""
    rel = atom_path(name)
    final = root / rel
    tmp = final.with_name(final.name + ".tmp")
    t = tensor.detach().cpu().contiguous()
    crc = write_shard(tmp, {"data": t}, metadata={"name": name})["data"]
    os.replace(tmp, final)
    return {"file": rel, "shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype], "crc32": crc}


def open_atom(path: Path) -> ShardReader:
    """A reader of one atom file, its header validated (one tensor named ``data``)."""
    r = ShardReader(path)
    if "data" not in r.header:
        raise CorruptCheckpoint(f"atom {path} holds no tensor 'data'")
    return r


def atom_record(root: Path, name: str) -> dict | None:
    """The record of an atom already written by an interrupted run, or None."""
    path = root / atom_path(name)
    if not path.is_file():
        return None
    r = open_atom(path)
    meta = r.header["data"]
    crc = zlib.crc32(_read_range(r, "data", 0, meta["data_offsets"][1] - meta["data_offsets"][0]))
    return {"file": atom_path(name), "shape": meta["shape"], "dtype": DTYPE_NAMES[TORCH_DTYPES[meta["dtype"]]], "crc32": crc}


def write_meta(root: Path, step: int, tensors: dict, objects: dict, source: dict, missing: list):
    write_manifest(root, {"format": FORMAT, "version": VERSION, "step": step, "source": source, "tensors": tensors,
                          "objects": jsonable(objects), "missing": sorted(missing)}, name=META)


def is_universal(path: Path) -> bool:
    return (Path(path) / META).is_file()


def _read_range(reader: ShardReader, key: str, lo: int, n: int) -> np.ndarray:
    """``n`` bytes of tensor ``key`` starting at byte ``lo`` of it (one positioned read)."""
    start, end = reader.header[key]["data_offsets"]
    raw = np.fromfile(reader.path, dtype=np.uint8, count=n, offset=reader.data_start + start + lo) \
        if start + lo + n <= end else None
    if raw is None or raw.size != n:
        raise CorruptCheckpoint(f"atom {reader.path} is truncated")
    return raw


def check_meta(meta, where: Path):
    """Validate universal.json: every field a reader uses, with its type."""
    def bad(what: str):
        raise CorruptCheckpoint(f"{where / META} is damaged ({what}); reconvert the checkpoint")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{where} is not a Kintsugi universal checkpoint")
    if type(meta.get("step")) is not int or not isinstance(meta.get("tensors"), dict) \
            or not isinstance(meta.get("objects"), dict) or not isinstance(meta.get("source"), dict) \
            or not isinstance(meta.get("missing", []), list):
        bad("step, tensors, objects, source or missing")
    for name, rec in meta["tensors"].items():
        if not isinstance(rec, dict) or not is_relative(rec.get("file")) or not is_ints(rec.get("shape")) \
                or not is_key(rec.get("dtype"), DTYPE_BY_NAME) or not is_crc(rec.get("crc32")):
            bad(f"the record of {quoted(name)}")


class Universal:
    """Reads a universal checkpoint: whole atoms (checksummed) or just a chunk's rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise CorruptCheckpoint(f"{self.path / META} is unreadable ({e.__class__.__name__}); "
                                    "reconvert the checkpoint") from None
        check_meta(self.meta, self.path)
        self.tensors: dict = self.meta["tensors"]
        self.readers: dict[str, ShardReader] = {}

    @property
    def step(self) -> int:
        return self.meta["step"]

    def _reader(self, name: str) -> ShardReader:
        rec = self.tensors[name]
        r = self.readers.get(name)
        if r is None:
            path = self.path / rec["file"]
            if not path.is_file():
                raise CorruptCheckpoint(f"atom {path} is missing")
            r = open_atom(path)
            meta = r.header["data"]
            if meta["shape"] != rec["shape"] or TORCH_DTYPES[meta["dtype"]] != DTYPE_BY_NAME[rec["dtype"]]:
                raise CorruptCheckpoint(f"atom {path} holds {meta['dtype']} {meta['shape']}, not the "
                                        f"{rec['dtype']} {rec['shape']} of {META}")
            self.readers[name] = r
        return r

    def read(self, name: str, verify: bool = True) -> torch.Tensor:
        rec = self.tensors[name]
        return self._reader(name).read("data", rec["crc32"] if verify else None)

    def read_box(self, name: str, offsets, shape) -> torch.Tensor:
        """The box [offsets, offsets + shape) of atom ``name``, reading only its dim-0 rows."""
        rec = self.tensors[name]
        gshape, dtype = rec["shape"], DTYPE_BY_NAME[rec["dtype"]]
        if not gshape:
            return self.read(name, verify=False)
        row = math.prod(gshape[1:]) * dtype.itemsize
        raw = _read_range(self._reader(name), "data", offsets[0] * row, shape[0] * row)
        rows = torch.from_numpy(raw).view(dtype).reshape([shape[0], *gshape[1:]])
        return rows[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(offsets[1:], shape[1:]))]


def load_universal(path: Path, state: dict, optional=lambda name: False) -> tuple[int, dict, set]:
    """Fill every Chunk of ``state`` in place from the universal checkpoint at ``path``.

    Same contract as ``checkpoint.store.load_state``: returns (step, objects, names that were
    absent but optional). Each rank reads only the rows of each atom that its chunks cover.
    """
    u = Universal(path)
    shapes = {n: r["shape"] for n, r in u.tensors.items()}
    return u.step, u.meta["objects"], fill_state(state, shapes, u.read_box, str(path), optional)


def fill_state(state: dict, shapes: dict, read_box, where: str, optional) -> set:
    """Fill every Chunk of ``state`` from a checkpoint holding tensors of ``shapes`` (name ->
    global shape) through ``read_box(name, offsets, shape)``; returns the optional names absent."""
    missing = set()
    for name, chunk in state.items():
        if not is_chunk(chunk):
            continue
        if name not in shapes:
            if optional(name):
                missing.add(name)
                continue
            raise UserError(f"checkpoint {where} has no tensor {name!r}; it was saved from a different model")
        fill_chunk(chunk, shapes[name], lambda off, shp: read_box(name, off, shp), where)
    return missing


def fill_chunk(chunk: Chunk, stored_shape, read_box, where: str):
    """Copy the box of the stored tensor that ``chunk`` covers into it."""
    if list(stored_shape) != list(chunk.global_shape):
        raise UserError(f"checkpoint {where} holds {list(stored_shape)} where the model has {list(chunk.global_shape)}; "
                        "the model config differs from the one that saved it")
    if chunk.tensor.numel() == 0:
        return
    with torch.no_grad():
        chunk.tensor.copy_(read_box(chunk.offsets, chunk.shape).to(chunk.tensor.dtype))
