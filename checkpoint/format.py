"""Native files: shards in the safetensors layout plus one JSON manifest per step.

A shard is an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets"}}`` and raw little-endian bytes: readable by
``safetensors.safe_open`` and by ``numpy.memmap``, never unpickled. The manifest holds every
tensor's global shape and dtype, where each chunk of it lies, and a CRC32 per chunk.

A step directory is written as ``step_XXXXXXXX.tmp`` and becomes ``step_XXXXXXXX`` by an
atomic rename only after its data files and manifest are fsynced; ``latest`` is rewritten
(write, fsync, rename) after that. A reader never sees a half-written step.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from comms import UserError

FORMAT = "kintsugi"
VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in DTYPES}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (it must be a contiguous CPU tensor)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def crc32(t: torch.Tensor) -> int:
    return zlib.crc32(as_bytes(t.detach().cpu().contiguous()))


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    with open(path, "wb") as f:
        f.write(head)
        for key, t in cpu.items():
            data = as_bytes(t)
            crcs[key] = zlib.crc32(data)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return crcs


class ShardReader:
    """Reads tensors out of one shard file (no pickle, no full load). ``memory``: a snapshot in
    this node's keeper (/dev/shm): mapped once and copied by torch (11-12 GB/s here against
    4.5-8 GB/s through read()), and not checked against CRCs, as memory-only snapshots have
    none (checkpoint.keeper: the copy protocol guards memory; checksums guard bytes that
    travel, to and from disk or over the network)."""

    def __init__(self, path: Path, memory: bool = False):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                self.header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"shard {path} is unreadable ({e})") from None
        self.data_start = 8 + n
        self.size = path.stat().st_size
        self.map = None
        if memory:
            with open(path, "rb") as f:  # private and writable: torch wants writable memory; nothing writes
                self.map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def _locate(self, key: str) -> tuple[dict, int, int]:
        meta = self.header.get(key)
        if meta is None:
            raise CorruptCheckpoint(f"shard {self.path} has no tensor {key!r}")
        lo, hi = meta["data_offsets"]
        if self.data_start + hi > self.size:
            raise CorruptCheckpoint(f"shard {self.path} is truncated at {key!r}")
        return meta, self.data_start + lo, hi - lo

    def _mapped(self, start: int, n: int) -> torch.Tensor:
        return torch.frombuffer(self.map, dtype=torch.uint8, count=n, offset=start) if n \
            else torch.empty(0, dtype=torch.uint8)

    def read(self, key: str, crc: int | None = None) -> torch.Tensor:
        meta, start, n = self._locate(key)
        if self.map is not None:
            raw = self._mapped(start, n)
        else:
            raw = torch.from_numpy(np.fromfile(self.path, dtype=np.uint8, count=n, offset=start))
        if crc is not None and self.map is None and zlib.crc32(raw.numpy()) != crc:
            raise CorruptCheckpoint(f"checksum mismatch for {key!r} in {self.path}")
        return raw.view(TORCH_DTYPES[meta["dtype"]]).reshape(meta["shape"])

    def read_into(self, key: str, out: torch.Tensor, crc: int | None = None):
        """Read ``key`` straight into ``out`` (a contiguous CPU tensor of its dtype and size):
        one copy from the file, page cache or memory map, no temporary buffer."""
        meta, start, n = self._locate(key)
        dst = out.detach().reshape(-1).view(torch.uint8).numpy()
        if TORCH_DTYPES[meta["dtype"]] != out.dtype or dst.nbytes != n:
            raise CorruptCheckpoint(f"shard {self.path} holds {key!r} as {meta['dtype']} {meta['shape']}, "
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
                        raise CorruptCheckpoint(f"shard {self.path} is truncated at {key!r}")
                    got += k
        if crc is not None and self.map is None and zlib.crc32(dst) != crc:
            raise CorruptCheckpoint(f"checksum mismatch for {key!r} in {self.path}")


class CorruptCheckpoint(UserError):
    """A step on disk is damaged (bad checksum, truncated or missing file, bad manifest)."""


def write_manifest(step_dir: Path, manifest: dict, name: str = MANIFEST):
    tmp = step_dir / (name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / name)
    fsync_dir(step_dir)


def read_manifest(step_dir: Path) -> dict:
    try:
        m = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"manifest of {step_dir} is unreadable ({e.__class__.__name__}: {e})") from None
    if m.get("format") != FORMAT or "tensors" not in m or "step" not in m:
        raise CorruptCheckpoint(f"{step_dir} is not a Kintsugi checkpoint step (bad manifest)")
    return m


def fault_point(name: str):
    """Fault-injection hook for the crash tests: ``KINTSUGI_FAULT=name:kill[:N]`` kills this
    process with SIGKILL the N-th time (default 1st) it passes point ``name``, ``name:pause``
    stops it there until it is killed, ``name:sleep:SECONDS[:N]`` holds it there that long (a
    slow disk or network). Unset (always in production) it costs one dict lookup."""
    spec = os.environ.get("KINTSUGI_FAULT")
    if not spec or spec.split(":")[0] != name:
        return
    _, action, *args = spec.split(":")
    seconds = float(args.pop(0)) if action == "sleep" else 0.0
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] != (int(args[0]) if args else 1):
        return
    if action == "kill":
        os.kill(os.getpid(), 9)
    if action == "sleep":
        time.sleep(seconds)
        return
    while True:  # pause: wait here for the test's kill -9
        time.sleep(1)


_FAULT_HITS: dict[str, int] = {}


def commit_step(root: Path, tmp_dir: Path, step: int, keep_last: int, keep=lambda step: False) -> Path:
    """Rename a fully written step into place, then point ``latest`` at it, then prune
    (steps for which ``keep(step)`` is true are never pruned)."""
    final = root / step_dirname(step)
    if final.exists():  # a step redone after a restart replaces its older copy
        shutil.rmtree(final)
    fault_point("rename")
    os.replace(tmp_dir, final)
    fsync_dir(root)
    fault_point("latest")
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(final.name + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)
    prune(root, keep_last, step, keep)
    return final


def committed_steps(root: Path) -> list[int]:
    """Steps with a manifest, newest first (``.tmp`` directories are never listed)."""
    steps = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and d.name[5:].isdigit() and (d / MANIFEST).exists():
                steps.append(int(d.name[5:]))
    return sorted(steps, reverse=True)


def prune(root: Path, keep_last: int, committed: int, keep=lambda step: False):
    """Delete committed steps beyond the newest ``keep_last`` (except those ``keep`` names),
    and ``.tmp`` dirs of steps older than the one just committed (abandoned by a crash;
    newer ones may be in flight)."""
    for step in committed_steps(root)[keep_last:]:
        if not keep(step):
            shutil.rmtree(root / step_dirname(step), ignore_errors=True)
    for d in root.glob("step_*.tmp"):
        if d.name[5:-4].isdigit() and int(d.name[5:-4]) < committed:
            shutil.rmtree(d, ignore_errors=True)
