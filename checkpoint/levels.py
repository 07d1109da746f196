"""Where snapshots go after memory: L1 (a node-local directory) and L2 (a persistent,
shared directory), behind one small storage interface that an object store can implement.

Both directory levels use the native format of checkpoint/format.py unchanged, so
``checkpoint.load_state`` and ``kintsugi ckpt`` read them like any synchronous checkpoint.
A step is written as ``step_S.tmp/shard_R.safetensors`` (one per rank, fsynced) by the node
keepers; once every rank's part is durable, one committer writes the manifest (fsync,
rename), renames the step into place, fsyncs the directory and moves ``latest``.
"""
from __future__ import annotations

import abc
import os
import shutil
from pathlib import Path

from checkpoint.format import (
    commit_step, committed_steps, fault_point, read_manifest, step_dirname, write_manifest,
)

# One write() call per 16 MiB: large enough that the disk sees sequential streams (and the
# syscall count stays ~60 per GiB), small enough that a crash test can stop mid-file.
WRITE_PIECE = 16 << 20


class Storage(abc.ABC):
    """One level's store of committed steps. Implement these six methods for another backend."""

    name: str

    @abc.abstractmethod
    def write_part(self, step: int, fname: str, data: memoryview):
        """Store one rank's shard bytes of ``step`` durably (not yet visible to readers)."""

    @abc.abstractmethod
    def commit(self, step: int, manifest: dict):
        """Make ``step`` visible atomically (after every part is durable), then apply retention."""

    @abc.abstractmethod
    def abort(self, step: int):
        """Drop the uncommitted parts of ``step``."""

    @abc.abstractmethod
    def steps(self) -> list[int]:
        """Committed steps, newest first."""

    @abc.abstractmethod
    def manifest(self, step: int) -> dict:
        """The manifest of a committed step (raises CorruptCheckpoint when unreadable)."""

    @abc.abstractmethod
    def open_step(self, step: int) -> tuple[Path, dict]:
        """(directory, readers by file name) for ``checkpoint.store.fill``."""


class DirectoryStorage(Storage):
    """A directory on a local or shared filesystem, in the native format."""

    def __init__(self, name: str, root: str | Path, keep_last: int, keep_every: int = 0):
        self.name, self.root = name, Path(root)
        self.keep_last, self.keep_every = keep_last, keep_every

    def _tmp(self, step: int) -> Path:
        return self.root / (step_dirname(step) + ".tmp")

    def write_part(self, step: int, fname: str, data: memoryview):
        tmp = self._tmp(step)
        tmp.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for lo in range(0, len(data), WRITE_PIECE):
                piece = data[lo:lo + WRITE_PIECE]
                while piece:  # os.write may write less than asked (signals, pipes)
                    piece = piece[os.write(fd, piece):]
                fault_point("write")
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, step: int, manifest: dict):
        tmp = self._tmp(step)
        tmp.mkdir(parents=True, exist_ok=True)  # a step whose ranks all own no data
        write_manifest(tmp, manifest)
        keep = (lambda s: s % self.keep_every == 0) if self.keep_every else (lambda s: False)
        commit_step(self.root, tmp, step, self.keep_last, keep)

    def abort(self, step: int):
        shutil.rmtree(self._tmp(step), ignore_errors=True)

    def steps(self) -> list[int]:
        return committed_steps(self.root)

    def manifest(self, step: int) -> dict:
        return read_manifest(self.root / step_dirname(step))

    def open_step(self, step: int) -> tuple[Path, dict]:
        return self.root / step_dirname(step), {}

