"""The keeper's background work on filled slots: one writer thread per disk level (shard
writes, then commits, in order) and one checksum thread.

A write of a superseded job attempt (a restarted job redoes its steps under a new
generation) is skipped: its shard would only be overwritten, and its report ignored.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

from checkpoint.format import SHARD, checksum, fault_point
from checkpoint.keeper.slots import Slot
from checkpoint.levels import Storage

log = logging.getLogger(__name__)


@dataclass
class WriteJob:
    gen: str
    step: int
    slot: Slot


@dataclass
class CommitJob:
    gen: str
    step: int
    manifest: dict


def records(slot: Slot, crcs: list | None, compute: bool = False) -> list:
    """Manifest records of a filled slot (as checkpoint.store.build_manifest takes them):
    its entries with the CRC32 of each tensor's bytes from ``crcs`` (per entry; None: not
    known), the unknown ones computed here when ``compute``, else left None."""
    out, fname = [], SHARD.format(slot.rank)
    with memoryview(slot.mm) as view:
        for i, (name, key, offsets, shape, gshape, dtype, lo, hi) in enumerate(slot.entries):
            crc = crcs[i] if crcs is not None else None
            if crc is None and compute:
                crc = checksum(view[lo:hi])  # releases the GIL
            out.append([name, key, fname, offsets, shape, gshape, dtype, crc])
    return out


class Worker(threading.Thread):
    """A FIFO of jobs run one at a time on its own thread; ``busy`` while one runs."""

    def __init__(self, name: str, node):
        super().__init__(name=name, daemon=True)
        self.node = node
        self.jobs: queue.Queue = queue.Queue()
        self.busy = False

    def put(self, job):
        self.jobs.put(job)

    def idle(self) -> bool:
        return self.jobs.empty() and not self.busy

    def run(self):
        while True:
            job = self.jobs.get()
            self.busy = True
            try:
                self.handle(job)
            except Exception as e:  # a keeper bug: every rank must hear of it
                log.exception("%s crashed", self.name)
                self.node.fatal = f"keeper {self.name} crashed: {e!r}"
            finally:
                self.busy = False
                self.jobs.task_done()

    def handle(self, job):
        raise NotImplementedError


class LevelWriter(Worker):
    """Writes one level's shards and commits, in order."""

    def __init__(self, node, storage: Storage):
        super().__init__(f"keeper-{storage.name}", node)
        self.storage = storage
        self.handlers = {WriteJob: self._write, CommitJob: self._commit}

    def handle(self, job):
        try:
            self.handlers[type(job)](job)
        except OSError as e:
            log.error("%s: step %d failed: %s", self.storage.name, job.step, e)
            self.storage.abort(job.gen, job.step)
            self.node.note_failed(self.storage.name, job.gen, job.step,
                                  f"{self.storage.name} ({self.storage.root}) could not store step {job.step}: "
                                  f"{e.strerror or e}")

    def _write(self, job: WriteJob):
        slot, name = job.slot, self.storage.name
        try:
            if job.gen != self.node.gen or self.node.has_failed(name, job.gen, job.step):
                return
            t0 = time.perf_counter()
            with memoryview(slot.mm) as view:
                self.storage.write_part(job.gen, job.step, SHARD.format(slot.rank), view[:slot.used])
            dt = time.perf_counter() - t0
            log.info("%s: step %d rank %d: %.1f MiB durable in %.2f s (%.2f GB/s)", name, job.step, slot.rank,
                     slot.used / 2**20, dt, slot.used / dt / 1e9)
            self.node.note_durable(name, job.gen, job.step, slot.rank, (slot.used, dt))
        finally:
            self.node.store.unpin(slot)

    def _commit(self, job: CommitJob):
        if job.gen != self.node.gen:
            return
        self.storage.commit(job.gen, job.step, job.manifest)
        self.node.note_committed(self.storage.name, job.gen, job.step)


class Checksummer(Worker):
    """CRC32 of the tensors of a slot bound for disk that the copy did not checksum (jobs:
    ``(slot, the CRCs known per entry, or None)``); the slot is ready after it."""

    def __init__(self, node):
        super().__init__("keeper-crc", node)

    def handle(self, job: tuple[Slot, list | None]):
        slot, known = job
        fault_point("crc")
        t0 = time.perf_counter()
        slot.records = records(slot, known, compute=True)
        self.node.note_written("crc", (slot.used, time.perf_counter() - t0))
        self.node.store.mark_ready(slot)
