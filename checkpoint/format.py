"""Native files: shards in the safetensors layout plus one JSON manifest per step.

A shard is an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets"}}`` and raw little-endian bytes: readable by
``safetensors.safe_open`` and by ``numpy.memmap``, never unpickled. The manifest holds every
tensor's global shape and dtype, where each chunk of it lies, and a CRC32 per chunk.

A step directory is written as ``step_XXXXXXXX.tmp`` and becomes ``step_XXXXXXXX`` by an
atomic rename only after its data files and manifest are fsynced; ``latest`` is rewritten
(write, fsync, rename) after that. A reader never sees a half-written step.

The order of commits is kept in ``commits`` beside the steps: one line per commit naming its
directory (``step_XXXXXXXX``), appended and fsynced before the rename; a step's last line
counts. Retention and restore follow that order, not step numbers: a run restarted with
``resume=false`` (or a DeepSpeed plug-in whose tags restart at 1) commits steps numbered
below older ones, and its newest commit is what it means. Step directories the journal does
not name (written before it existed, or copied in) count as older than every journaled one,
by number among themselves. A step that retention drops is first renamed out of the
``step_*`` namespace (``trash.step_XXXXXXXX.<hex>``) and then deleted, so a killed prune
never leaves a step with its manifest but without its shards.

Every reader validates what it reads (header length and schema, manifest schema): a damaged
file is a ``CorruptCheckpoint`` naming it, never another exception.
"""
from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import re
import secrets
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch
from isal import isal_zlib

from comms import UserError

FORMAT = "kintsugi"
VERSION = 1
MANIFEST = "manifest.json"
SHARD = "shard_{:05d}.safetensors"  # rank -> its shard's file name in a step directory
LATEST = "latest"
COMMITS = "commits"  # the commit-order journal of a checkpoint root
TRASH = "trash."  # prefix of a step being deleted (out of the step_* namespace)
# A shard header is a few hundred bytes per tensor; safetensors refuses more than 100 MB too.
MAX_HEADER = 100_000_000

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
DTYPE_NAMES = {d: str(d).removeprefix("torch.") for d in DTYPES}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


def human(n: float) -> str:
    """Bytes for a person: 512 B, 16.0 KiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step of a committed step directory's name (``step_<digits>``), else None."""
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


TMP = re.compile(r"^step_(\d+)(?:\.([0-9a-f]+))?\.tmp$")  # a step being written: step_S.tmp or step_S.<gen>.tmp


def tmp_dirname(step: int, gen: str = "") -> str:
    """Where step ``step`` is written before its commit; a job attempt (``gen``) has its own,
    so a step redone after a restart never mixes shards of two attempts."""
    return f"{step_dirname(step)}.{gen}.tmp" if gen else f"{step_dirname(step)}.tmp"


def tmp_of(name: str) -> tuple[int, str] | None:
    """(step, job attempt) of a step directory being written ("" for a synchronous save)."""
    m = TMP.match(name)
    return (int(m[1]), m[2] or "") if m else None


def as_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw bytes without a copy (it must be a contiguous CPU tensor)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def checksum(data, value: int = 0) -> int:
    """CRC32 of a buffer (zlib's polynomial, so every manifest's ``crc32`` reads alike), by
    ISA-L's carry-less-multiply kernel: 4-5x zlib's speed here, the GIL released."""
    return isal_zlib.crc32(data, value)



def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data, offset: int | None = None):
    """Write every byte of ``data`` to ``fd`` (at ``offset``, else at its position). One
    write may take less than asked: Linux moves at most 0x7ffff000 bytes per call, and a
    signal can cut a write short. Every unbuffered checkpoint write goes through this loop
    (Python's buffered files loop by themselves)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if n == 0:
            raise OSError(errno.EIO, f"write of {len(view)} bytes made no progress")
        view = view[n:]
        if offset is not None:
            offset += n


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


# -- validation: what a reader checks before trusting a file ---------------------------------

def is_ints(value, n: int | None = None) -> bool:
    """A JSON list of non-negative ints (of length ``n`` when given)."""
    return isinstance(value, list) and (n is None or len(value) == n) and \
        all(type(v) is int and v >= 0 for v in value)


def is_key(value, table: dict) -> bool:
    """A string naming an entry of ``table`` (a dtype name, ...)."""
    return isinstance(value, str) and value in table


def is_crc(value) -> bool:
    return type(value) is int and 0 <= value < 1 << 32


def is_relative(value) -> bool:
    """A path inside the directory that names it (no absolute path, no ``..``)."""
    return isinstance(value, str) and value != "" and not value.startswith("/") and "\0" not in value \
        and not any(part in ("", ".", "..") for part in value.split("/"))


def quoted(name) -> str:
    """A name for a one-line message, cut short (a damaged file can hold any bytes)."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


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


class CorruptCheckpoint(UserError):
    """A step on disk is damaged (bad checksum, truncated or missing file, bad header or manifest)."""


class MissingShard(CorruptCheckpoint):
    """A shard file the manifest names is not there (damage; or, in a node-local level of a
    multi-node job, a shard that lives on another node)."""


class PartlyFilled(CorruptCheckpoint):
    """A chunk was found damaged while a step was being copied into the state: the chunks
    copied before it now hold that step's values, not the state's own."""


def write_manifest(step_dir: Path, manifest: dict, name: str = MANIFEST):
    tmp = step_dir / (name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / name)
    fsync_dir(step_dir)


def check_manifest(m, step_dir: Path):
    """Validate a step's manifest: every field a reader uses, with its type and bounds."""
    def bad(what: str):
        raise CorruptCheckpoint(f"manifest of {step_dir} has a bad {what}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{step_dir} is not a Kintsugi checkpoint step (bad manifest)")
    if type(m.get("step")) is not int or m["step"] < 0:
        bad("step")
    if not isinstance(m.get("tensors"), dict) or not isinstance(m.get("objects"), dict):
        bad("tensors or objects map")
    for name, t in m["tensors"].items():
        if not isinstance(t, dict) or not is_ints(t.get("shape")) or not is_key(t.get("dtype"), DTYPE_BY_NAME) \
                or not isinstance(t.get("chunks"), list):
            bad(f"entry of tensor {quoted(name)}")
        gshape = t["shape"]
        for c in t["chunks"]:
            if not isinstance(c, dict) or not is_relative(c.get("file")) or "/" in c["file"] \
                    or not isinstance(c.get("key"), str) or not is_crc(c.get("crc32")) \
                    or not is_ints(c.get("offsets"), len(gshape)) or not is_ints(c.get("shape"), len(gshape)) \
                    or any(o + n > g for o, n, g in zip(c["offsets"], c["shape"], gshape)):
                bad(f"chunk of tensor {quoted(name)}")


def read_manifest(step_dir: Path) -> dict:
    try:
        m = json.loads((step_dir / MANIFEST).read_text())
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{step_dir} has no {MANIFEST}") from None
    except (OSError, ValueError, RecursionError) as e:
        raise CorruptCheckpoint(f"manifest of {step_dir} is unreadable ({e.__class__.__name__}: {e})") from None
    check_manifest(m, step_dir)
    return m


def fault_point(name: str):
    """Fault-injection hook for the crash tests: ``KINTSUGI_FAULT=name:kill[:N]`` kills this
    process with SIGKILL the N-th time (default 1st) it passes point ``name``, ``name:pause``
    stops it there until it is killed, ``name:sleep:SECONDS[:N]`` holds it there that long (a
    slow disk or network), ``name:hold[:N]`` writes ``$KINTSUGI_FAULT_DIR/name.held`` and waits
    there until the test removes that file (the test kills whom it wants meanwhile). Unset
    (always in production) it costs one dict lookup."""
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
    elif action == "sleep":
        time.sleep(seconds)
    elif action == "hold":
        marker = Path(os.environ["KINTSUGI_FAULT_DIR"]) / f"{name}.held"
        marker.write_text(str(os.getpid()))
        while marker.exists():
            time.sleep(0.01)
    else:
        while True:  # pause: wait here for the test's kill -9
            time.sleep(1)


_FAULT_HITS: dict[str, int] = {}


# -- commit order, commit, retention ---------------------------------------------------------

def _journal(root: Path) -> list[int]:
    """The journaled steps, oldest commit first; a step's last line counts. A line cut short
    by a crash (or otherwise unreadable) is skipped."""
    try:
        text = (root / COMMITS).read_text(errors="replace")
    except FileNotFoundError:
        return []
    order: dict[int, None] = {}
    for line in text.split("\n")[:-1]:  # the part after the last newline is an unfinished line
        step = step_of(line)
        if step is not None and line == step_dirname(step):  # "step_0000001" is a torn line, not step 1
            order.pop(step, None)
            order[step] = None
    return list(order)


def _journal_append(root: Path, step: int):
    """Record ``step`` as the newest commit, durably (before its directory is renamed in)."""
    path = root / COMMITS
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a line cut short by a crash
        write_all(fd, (b"\n" if torn else b"") + step_dirname(step).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:
        fsync_dir(root)


def _journal_compact(root: Path, steps_oldest_first: list[int]):
    """Rewrite the journal with just the steps that exist (write, fsync, rename)."""
    tmp = root / (COMMITS + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, "".join(step_dirname(s) + "\n" for s in steps_oldest_first).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    fault_point("journal")
    os.replace(tmp, root / COMMITS)
    fsync_dir(root)


def committed_steps(root: Path) -> list[int]:
    """Steps under ``root``, newest COMMIT first: the restore order. Journaled steps by their
    last commit; unjournaled ones count as older, newest number first. Every ``step_<digits>``
    directory is listed (``.tmp`` and ``trash.`` ones never are): a step is renamed into place
    with its manifest, so one without it is damaged (reading it raises CorruptCheckpoint)."""
    if not root.is_dir():
        return []
    present = {s for d in root.iterdir() if (s := step_of(d.name)) is not None and d.is_dir()}
    journaled = [s for s in _journal(root) if s in present]
    legacy = sorted(present - set(journaled))
    return list(reversed(legacy + journaled))


def check_latest(root: Path) -> str | None:
    """A one-line warning when ``latest`` names a step that is not there, else None."""
    try:
        name = (root / LATEST).read_text(errors="replace").strip()
    except FileNotFoundError:
        return None
    step = step_of(name)
    if step is not None and (root / name / MANIFEST).is_file():
        return None
    newest = committed_steps(root)
    return (f"{root / LATEST} names {quoted(name)}, which is missing; using the newest committed step "
            f"({step_dirname(newest[0]) if newest else 'none'}) instead")


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries atomically (renameat2 RENAME_EXCHANGE); False where the
    kernel, libc or filesystem cannot."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _trash_name(root: Path, name: str) -> Path:
    return root / f"{TRASH}{name}.{secrets.token_hex(4)}"


def _delete(root: Path, dirs: list[Path]):
    """Delete step directories: renamed out of the ``step_*`` namespace first (one directory
    fsync for all), so a kill midway leaves trash, never a step missing some of its files."""
    if not dirs:
        return
    doomed = []
    for d in dirs:
        t = _trash_name(root, d.name.removesuffix(".tmp"))
        os.replace(d, t)
        doomed.append(t)
    fsync_dir(root)
    fault_point("prune")
    for t in doomed:
        shutil.rmtree(t, ignore_errors=True)


def commit_step(root: Path, tmp_dir: Path, step: int, keep_last: int, keep=lambda step: False) -> Path:
    """Make a fully written step visible: journal it, rename it into place, point ``latest``
    at it, then prune (steps for which ``keep(step)`` is true are never pruned). A step redone
    after a restart replaces its older copy by an atomic exchange: ``step_S`` names a complete
    copy at every moment (renaming the old copy aside first where exchange is unsupported)."""
    final = root / step_dirname(step)
    _journal_append(root, step)
    fault_point("rename")
    if not final.exists():
        os.replace(tmp_dir, final)
        fsync_dir(root)
    elif _exchange(tmp_dir, final):  # tmp_dir now holds the old copy
        fsync_dir(root)
        fault_point("exchange")
        _delete(root, [tmp_dir])
    else:
        aside = _trash_name(root, final.name)
        os.replace(final, aside)
        os.replace(tmp_dir, final)
        fsync_dir(root)
        shutil.rmtree(aside, ignore_errors=True)
    fault_point("latest")
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(final.name + "\n")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)
    prune(root, keep_last, step, keep, (tmp_of(tmp_dir.name) or (step, ""))[1])
    return final


def prune(root: Path, keep_last: int, committed: int, keep=lambda step: False, gen: str = ""):
    """Retention after attempt ``gen`` committed step ``committed``: keep the newest
    ``keep_last`` commits (``committed`` always among them) and those ``keep`` names; delete
    the rest, step directories without a manifest (damaged), trash left by a killed prune,
    and the ``.tmp`` dirs of steps numbered below ``committed`` or of another attempt
    (abandoned by a crash or a restart; this attempt's newer ones may be in flight)."""
    for d in root.glob(TRASH + "*"):
        shutil.rmtree(d, ignore_errors=True)
    order = committed_steps(root)
    good = [s for s in order if (root / step_dirname(s) / MANIFEST).is_file()]
    kept = set(good[:keep_last]) | {committed}
    doomed = [s for s in order if s not in kept and (s not in good or not keep(s))]
    stale = [d for d in root.glob("step_*.tmp") if (t := tmp_of(d.name)) is not None and (t[0] < committed or t[1] != gen)]
    _delete(root, [root / step_dirname(s) for s in doomed] + stale)
    # The journal only grows: once it is much longer than the steps it orders, rewrite it.
    if (root / COMMITS).stat().st_size > (2 * len(order) + 64) * len(step_dirname(0) + "\n"):
        _journal_compact(root, list(reversed(committed_steps(root))))
