"""Tensor shards: the safetensors layout written from and read into torch tensors.

A shard is an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets"}}`` (8-byte aligned) and the raw little-endian
bytes: readable by ``safetensors.safe_open`` and by ``numpy.memmap``, never unpickled. The
steps that hold shards (manifests, commits, retention) are ``checkpoint.format``'s, which
needs no torch: the node keeper, which moves shard bytes without looking into them, starts
without importing it.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch

from checkpoint.format import DTYPE_CODES, CorruptCheckpoint, checksum, is_ints, is_key, quoted


# torch's dtypes <-> the codes in shard headers and the names in manifests (format.DTYPE_CODES).
DTYPES = {getattr(torch, name): code for name, code in DTYPE_CODES.items()}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in DTYPES}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
# A shard header is a few hundred bytes per tensor; safetensors refuses more than 100 MB too.
MAX_HEADER = 100_000_000


def as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (it must be a contiguous CPU tensor)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def shard_header(entries, metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The bytes before a shard's data (length + JSON header) for ``(key, dtype, shape)``
    entries, and each tensor's data offset. Also used to lay out a shard in host memory.
    ``metadata`` goes into the header's ``__metadata__`` (safetensors' string map)."""
    header, offset, offsets = ({"__metadata__": metadata} if metadata else {}), 0, []
    for key, dtype, shape in entries:
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offsets.append(offset)
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    return struct.pack("<Q", len(blob)) + blob, offsets


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict[str, int]:
    """Write one shard file and fsync it; returns the CRC32 of every tensor's bytes."""
    cpu = {key: t.detach().cpu().contiguous() for key, t in tensors.items()}
    head, _ = shard_header(((key, t.dtype, tuple(t.shape)) for key, t in cpu.items()), metadata)
    crcs = {}
    with open(path, "wb") as f:  # a buffered file loops over short writes itself
        f.write(head)
        for key, t in cpu.items():
            data = as_bytes(t)
            crcs[key] = checksum(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return crcs


def check_header(header, where: str, data_size: int):
    """Validate a safetensors-layout header whose data region holds ``data_size`` bytes."""
    def bad(what: str):
        raise CorruptCheckpoint(f"{where} has a damaged header ({what})")

    if not isinstance(header, dict):
        bad("not a JSON object")
    for key, meta in header.items():
        if key == "__metadata__":
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                bad("__metadata__ is not a map of strings")
            continue
        if not isinstance(meta, dict) or not is_key(meta.get("dtype"), TORCH_DTYPES):
            bad(f"{quoted(key)} has no known dtype")
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if not is_ints(shape):
            bad(f"{quoted(key)} has a bad shape")
        if not is_ints(offsets, 2) or offsets[0] > offsets[1]:
            bad(f"{quoted(key)} has bad data_offsets")
        if offsets[1] > data_size:
            raise CorruptCheckpoint(f"{where} is truncated at {quoted(key)}")
        if offsets[1] - offsets[0] != math.prod(shape) * TORCH_DTYPES[meta["dtype"]].itemsize:
            bad(f"{quoted(key)} holds {offsets[1] - offsets[0]} bytes, not those of its shape and dtype")


class ShardReader:
    """Reads tensors out of one shard file (no pickle, no full load). ``memory``: a snapshot in
    this node's keeper (/dev/shm): mapped once and copied by torch (11-12 GB/s here against
    4.5-8 GB/s through read()), and not checked against CRCs, as memory-only snapshots have
    none (checkpoint.keeper: the copy protocol guards memory; checksums guard bytes that
    travel, to and from disk or over the network). The header is validated on opening."""

    def __init__(self, path: Path, memory: bool = False):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size < 8:
                    raise CorruptCheckpoint(f"shard {path} is truncated ({self.size} bytes)")
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(self.size - 8, MAX_HEADER):
                    raise CorruptCheckpoint(f"shard {path} has a damaged header (length {n} in a file of "
                                            f"{self.size} bytes)")
                raw = f.read(n)
                self.header = json.loads(raw)
                if memory:  # private and writable: torch wants writable memory; nothing writes
                    self.map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                else:
                    self.map = None
        except OSError as e:
            raise CorruptCheckpoint(f"shard {path} is unreadable ({e.strerror or e})") from None
        except (ValueError, RecursionError) as e:  # JSON, UTF-8, or nesting too deep
            raise CorruptCheckpoint(f"shard {path} has a damaged header ({e.__class__.__name__})") from None
        if len(raw) != n:
            raise CorruptCheckpoint(f"shard {path} is truncated in its header")
        self.data_start = 8 + n
        check_header(self.header, f"shard {path}", self.size - self.data_start)

    def _locate(self, key: str) -> tuple[dict, int, int]:
        meta = self.header.get(key) if key != "__metadata__" else None
        if meta is None:
            raise CorruptCheckpoint(f"shard {self.path} has no tensor {quoted(key)}")
        lo, hi = meta["data_offsets"]
        return meta, self.data_start + lo, hi - lo

    def _mapped(self, start: int, n: int) -> torch.Tensor:
        return torch.frombuffer(self.map, dtype=torch.uint8, count=n, offset=start) if n \
            else torch.empty(0, dtype=torch.uint8)

    def read(self, key: str, crc: int | None = None) -> torch.Tensor:
        meta, start, n = self._locate(key)
        if self.map is not None or n == 0:  # (numpy gives an empty read a stride torch cannot view)
            raw = self._mapped(start, n)
        else:
            raw = torch.from_numpy(np.fromfile(self.path, dtype=np.uint8, count=n, offset=start))
            if raw.numel() != n:  # shrank since it was opened
                raise CorruptCheckpoint(f"shard {self.path} is truncated at {quoted(key)}")
        if crc is not None and self.map is None and checksum(raw.numpy()) != crc:
            raise CorruptCheckpoint(f"checksum mismatch for {quoted(key)} in {self.path}")
        return raw.view(TORCH_DTYPES[meta["dtype"]]).reshape(meta["shape"])

    def read_into(self, key: str, out: torch.Tensor, crc: int | None = None):
        """Read ``key`` straight into ``out`` (a contiguous CPU tensor of its dtype and size):
        one copy from the file, page cache or memory map, no temporary buffer."""
        meta, start, n = self._locate(key)
        dst = out.detach().reshape(-1).view(torch.uint8).numpy()
        if TORCH_DTYPES[meta["dtype"]] != out.dtype or dst.nbytes != n:
            raise CorruptCheckpoint(f"shard {self.path} holds {quoted(key)} as {meta['dtype']} {meta['shape']}, "
                                    f"not as its manifest says")
        if self.map is not None:
            torch.from_numpy(dst).copy_(self._mapped(start, n))  # torch copies with all its threads
        else:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(start)
                view, got = memoryview(dst), 0
                while got < n:
                    k = f.readinto(view[got:])
                    if not k:
                        raise CorruptCheckpoint(f"shard {self.path} is truncated at {quoted(key)}")
                    got += k
        if crc is not None and self.map is None and checksum(dst) != crc:
            raise CorruptCheckpoint(f"checksum mismatch for {quoted(key)} in {self.path}")
