"""Native files: shards in the safetensors layout plus one JSON manifest per step.

A shard is an 8-byte little-endian header length, a JSON header
``{key: {"dtype", "shape", "data_offsets"}}`` and raw little-endian bytes: readable by
``safetensors.safe_open`` and by ``numpy.memmap``, never unpickled (``checkpoint.shards``
writes and reads them with torch). The manifest holds every tensor's global shape and dtype,
where each chunk of it lies, and a CRC32 per chunk. This module needs no torch: the node
keeper, which commits steps without looking into the bytes, starts in a tenth of the time.

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
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from isal import isal_zlib

from comms.errors import UserError

FORMAT = "kintsugi"
VERSION = 1
MANIFEST = "manifest.json"
SHARD = "shard_{:05d}.safetensors"  # rank -> its shard's file name in a step directory
LATEST = "latest"
COMMITS = "commits"  # the commit-order journal of a checkpoint root
TRASH = "trash."  # prefix of a step being deleted (out of the step_* namespace)
# The dtypes a step may hold: manifest name -> safetensors code (checkpoint.shards maps them to torch's).
DTYPE_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


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
        if not isinstance(t, dict) or not is_ints(t.get("shape")) or not is_key(t.get("dtype"), DTYPE_CODES) \
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
