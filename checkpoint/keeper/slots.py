"""Level 0: every local rank's snapshots in shared-memory slots, within a byte budget.

A slot holds one rank's shard of one step in the safetensors layout. Its life:
free -> filling (the trainer copies into it) -> crc (the keeper checksums it, when a disk
level is due) -> ready. A rank needs two slots (its newest snapshot that every rank has,
and the one being captured) for a save to overlap the previous one's disk write; more let
captures overlap slow level writes. With room for one, the trainer sends every save to a
disk level and the capture reuses the rank's slot once the step it holds is committed
there (``durable``), as DataStates reuses its host buffer after a flush. When none is free
the request waits (back-pressure) while a level write still reads a slot, within a
deadline; when no write does, waiting frees nothing and the request is refused at once
(the trainer then saves to disk directly).

Each rank's **L0 timeline** is the (generation, step) of its newest snapshot committed at
level 0 by its job attempt. A ready slot is freed only when a newer snapshot of the same
attempt is committed, or any snapshot of a later attempt (the old attempt's steps are an
abandoned timeline), and never while a level write or the erasure coder reads it (pins).
So after a restore to an older step the new snapshots are protected from their first
commit on, and until the new attempt's first commit the old attempt's stay. Attempts are
ordered as this keeper first sees them (a restarted job allocates after its predecessor).

Slots are reserved when created (``posix_fallocate``): a /dev/shm too small for the budget
is an error at allocation, with the sizes, instead of SIGBUS in the middle of a copy.
"""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from dataclasses import dataclass, field

from checkpoint.format import human
from checkpoint.keeper.runtime import Instance
from comms import UserError


class KeeperTimeout(RuntimeError):
    """Memory was not freed in time: a level write (a hung filesystem?) holds every slot."""


@dataclass(eq=False)
class Slot:
    """One shared-memory buffer holding one rank's shard of one step."""

    id: int
    rank: int
    path: str
    size: int
    mm: mmap.mmap
    state: str = "free"  # free -> filling -> crc -> ready
    gen: str = ""  # the job attempt that saved it
    step: int = -1
    used: int = 0  # bytes of the shard in this slot (the slot may be larger: it is reused)
    world: int = 1  # the world size that saved it
    entries: list = field(default_factory=list)  # [name, key, offsets, shape, gshape, dtype, lo, hi]
    records: list = field(default_factory=list)  # the entries' manifest records, with CRC32 or None
    objects: dict | None = None  # rank 0's small objects and manifest extras
    pins: int = 0  # level writes and erasure coding that still read it


class SlotStore:
    def __init__(self, instance: Instance, budget: int):
        self.instance, self.budget = instance, budget
        self.local_world = 1
        self.slots: list[Slot] = []
        self.l0: dict[int, tuple[str, int]] = {}  # rank -> its L0 timeline: (gen, newest committed step)
        self.attempts: dict[str, int] = {}  # gen -> the order this keeper first saw it in
        self.cond = threading.Condition()
        self.next_id = 0

    # ------------------------------------------------------------ allocation

    def _create(self, rank: int, size: int) -> Slot:
        path = self.instance.segment(rank, self.next_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                os.unlink(path)
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise UserError(f"/dev/shm has no room for a {human(size)} snapshot of rank {rank}; enlarge "
                                    "/dev/shm (e.g. docker --shm-size) or lower checkpoint.host_memory_mb") from None
                raise
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slot = Slot(self.next_id, rank, str(path), size, mm)
        self.next_id += 1
        self.slots.append(slot)
        return slot

    def drop(self, slot: Slot):
        with self.cond:
            slot.mm.close()
            os.unlink(slot.path)
            self.slots.remove(slot)

    def alloc(self, rank: int, gen: str, step: int, nbytes: int, wait_s: float, durable: int = -1,
              copies: int = 2) -> Slot:
        """A slot of at least ``nbytes`` for ``rank``'s capture of ``step``, where ``copies``
        snapshots of the rank must fit; with one, ``durable`` (the newest step the trainer saw
        committed at a disk level) says whose slot may be overwritten when there is no other
        room (with two, a slot a level write still reads is freed once it is done)."""
        cap = self.budget // self.local_world
        if copies * nbytes > cap:
            raise UserError(f"the node keeper's memory is too small: {self.local_world} local rank(s) x {copies} "
                            f"snapshot(s) of {human(nbytes)} do not fit in {human(self.budget)}; raise "
                            "checkpoint.host_memory_mb (and /dev/shm with it)")
        deadline = time.monotonic() + wait_s
        with self.cond:
            for s in self.slots:  # a restarted trainer redoes steps: its old copies of them are abandoned
                if s.rank == rank and s.state == "ready" and s.step >= step and s.pins == 0:
                    s.state = "free"
            while True:
                mine = [s for s in self.slots if s.rank == rank]
                free = [s for s in mine if s.state == "free"]
                fit = [s for s in free if s.size >= nbytes]
                if fit:
                    slot = min(fit, key=lambda s: s.size)
                elif sum(s.size for s in mine) + nbytes <= cap:
                    slot = self._create(rank, nbytes)
                elif free:
                    self.drop(min(free, key=lambda s: s.size))
                    continue
                elif copies == 1 and (on_disk := [s for s in mine if s.state == "ready" and s.pins == 0
                                                  and s.step <= durable]):
                    min(on_disk, key=lambda s: s.step).state = "free"  # its step is safe on disk
                    continue
                elif not any(s.pins for s in mine):
                    raise UserError(f"the node keeper has no room for another snapshot of rank {rank} "
                                    f"({human(nbytes)} in {human(cap)} per rank) and the one it holds is not on disk")
                elif time.monotonic() > deadline:
                    raise KeeperTimeout(f"no snapshot memory was freed within {wait_s:.0f} s: the level writes that "
                                        "read the older snapshots are stuck (a hung filesystem?)")
                else:
                    self.cond.wait(0.5)  # back-pressure: a level write still reads the older snapshots
                    continue
                self.attempts.setdefault(gen, len(self.attempts))
                slot.state, slot.gen, slot.step, slot.used = "filling", gen, step, nbytes
                slot.entries, slot.records, slot.objects = [], [], None
                return slot

    def install(self, rank: int, step: int, meta: dict, data) -> Slot:
        """A ready slot for a snapshot rebuilt from erasure-coded shares (``meta``: its rank
        record from the node snapshot's trailer); it becomes the rank's L0 timeline."""
        with self.cond:
            slot = self._create(rank, max(meta["used"], 1))
            slot.mm[:meta["used"]] = data
            slot.state, slot.gen, slot.step, slot.used, slot.world = "ready", meta.get("gen", ""), step, meta["used"], meta["world"]
            slot.entries, slot.records, slot.objects = meta["entries"], meta["records"], meta["objects"]
            self.attempts.setdefault(slot.gen, len(self.attempts))
            self.l0[rank] = (slot.gen, step)
            return slot

    # ------------------------------------------------------------ the L0 timeline

    def _stale(self, s: Slot) -> bool:
        """A ready slot older than its rank's L0 timeline (an earlier step of the same
        attempt, or any step of an earlier attempt), that nothing reads."""
        if s.state != "ready" or s.pins or s.rank not in self.l0:
            return False
        gen, step = self.l0[s.rank]
        mine, theirs = self.attempts.get(s.gen, -1), self.attempts.get(gen, -1)
        return mine < theirs or (mine == theirs and s.step < step)

    def _release(self):
        for s in self.slots:
            if self._stale(s):
                s.state = "free"
        self.cond.notify_all()

    def free(self, slot: Slot):
        with self.cond:
            slot.state = "free"
            self.cond.notify_all()

    def mark_ready(self, slot: Slot):
        with self.cond:
            slot.state = "ready"
            self.cond.notify_all()

    def commit_l0(self, rank: int, gen: str, step: int):
        """Every rank holds ``step`` of attempt ``gen``: it is this rank's L0 timeline now."""
        with self.cond:
            self.attempts.setdefault(gen, len(self.attempts))
            old = self.l0.get(rank)
            if old is None or old[0] != gen or step > old[1]:
                self.l0[rank] = (gen, step)
            self._release()

    def l0_of(self, rank: int) -> tuple[str, int] | None:
        with self.cond:
            return self.l0.get(rank)

    def pin(self, slots: list[Slot]):
        with self.cond:
            for s in slots:
                s.pins += 1

    def unpin(self, slot: Slot):
        with self.cond:
            slot.pins -= 1
            self._release()

    def reset_rank(self, rank: int):
        """A trainer went away mid-copy: its half-filled slots hold nothing."""
        with self.cond:
            for s in self.slots:
                if s.rank == rank and s.state == "filling":
                    s.state = "free"
            self.cond.notify_all()

    def keep_ranks(self, ranks: set[int]):
        """Only ``ranks`` run on this node now (an elastic restart moved the others away):
        free the other ranks' slots once nothing reads them."""
        with self.cond:
            for s in [s for s in self.slots if s.rank not in ranks and s.pins == 0 and s.state in ("ready", "free")]:
                self.drop(s)
            self.l0 = {r: v for r, v in self.l0.items() if r in ranks}

    # ------------------------------------------------------------ reading

    def get(self, slot_id: int) -> Slot:
        with self.cond:
            slot = next((s for s in self.slots if s.id == slot_id), None)
        if slot is None:
            raise ValueError(f"the node keeper has no slot {slot_id}")
        return slot

    def ready(self, rank: int | None = None) -> list[Slot]:
        with self.cond:
            return [s for s in self.slots if s.state == "ready" and (rank is None or s.rank == rank)]

    def ranks(self) -> set[int]:
        with self.cond:
            return {s.rank for s in self.slots}

    def close(self):
        with self.cond:
            for s in list(self.slots):
                self.drop(s)
