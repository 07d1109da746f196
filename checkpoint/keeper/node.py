"""The node keeper's state: its slots (level 0), level writers, checksummer, the erasure
coder once the trainers set it up, and what it knows of every save.

What it reports is keyed by (generation, step): a generation is one attempt of the job
(all ranks agree on it when their Checkpointer starts). After a restart redoes step S, an
old "durable S" of another node, or an old failure, is never taken for the new attempt's.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from checkpoint.keeper import messages as m
from checkpoint.keeper.runtime import Instance
from checkpoint.keeper.slots import Slot, SlotStore
from checkpoint.keeper.writers import Checksummer, LevelWriter, WriteJob, records
from checkpoint.levels import LevelSpec, make_storage

log = logging.getLogger(__name__)

REMEMBERED = 256  # saves whose progress a keeper keeps (bounded memory)


@dataclass
class SaveProgress:
    """What this keeper knows of one save of one job attempt."""

    durable: dict[str, set[int]] = field(default_factory=dict)  # level -> local ranks whose shard is durable
    committed: set[str] = field(default_factory=set)  # levels where the step is committed
    failed: dict[str, str] = field(default_factory=dict)  # level -> why it could not be stored


class NodeKeeper:
    def __init__(self, instance: Instance, budget: int, warning: str = ""):
        self.store = SlotStore(instance, budget)
        self.warning = warning  # said to the trainers once (e.g. /dev/shm smaller than asked)
        self.writers: dict[str, LevelWriter] = {}
        self.checksummer = Checksummer(self)
        self.checksummer.start()
        self.lock = threading.Lock()
        self.saves: dict[tuple[str, int], SaveProgress] = {}
        self.gen = ""  # the newest job attempt that said hello
        self.fatal: str | None = None
        self.exchange = None  # checkpoint.keeper.exchange.SnapshotExchange, once erasure coding is set up
        self.written: dict[str, tuple[int, float]] = {}  # level (or "crc") -> (bytes, seconds) of its last shard

    def hello(self, msg: m.Hello):
        """Levels from the trainers' config (the first hello creates them); a new attempt."""
        with self.lock:
            self.store.local_world = max(self.store.local_world, msg.local_world)
            for spec in map(LevelSpec.from_dict, msg.levels):
                if spec.name not in self.writers:
                    w = self.writers[spec.name] = LevelWriter(self, make_storage(spec))
                    w.start()
            if msg.gen and msg.gen != self.gen:
                log.info("job attempt %s (was %s)", msg.gen, self.gen or "none")
                self.gen = msg.gen

    # ------------------------------------------------------------ progress

    def _save(self, gen: str, step: int) -> SaveProgress:
        key = (gen, step)
        if key not in self.saves:
            self.saves[key] = SaveProgress()
            while len(self.saves) > REMEMBERED:
                del self.saves[next(iter(self.saves))]
        return self.saves[key]

    def note_durable(self, level: str, gen: str, step: int, rank: int, written: tuple[int, float]):
        with self.lock:
            self._save(gen, step).durable.setdefault(level, set()).add(rank)
            self.written[level] = written

    def note_written(self, what: str, cost: tuple[int, float]):
        with self.lock:
            self.written[what] = cost

    def note_committed(self, level: str, gen: str, step: int):
        with self.lock:
            self._save(gen, step).committed.add(level)

    def note_failed(self, level: str, gen: str, step: int, message: str):
        with self.lock:
            self._save(gen, step).failed[level] = message

    def has_failed(self, level: str, gen: str, step: int) -> bool:
        with self.lock:
            save = self.saves.get((gen, step))
            return save is not None and level in save.failed

    # ------------------------------------------------------------ requests

    def filled(self, slot: Slot, msg: m.Filled):
        slot.entries, slot.objects, slot.world, slot.state = msg.entries, msg.objects, msg.world, "crc"
        if msg.levels:
            # The disk writes start now and the CRC pass runs beside them (both only read the
            # slot; the manifest, which needs the CRCs, comes after both): durable after
            # max(write, CRC) instead of their sum.
            self.store.pin([slot] * len(msg.levels))
            for name in msg.levels:
                self.writers[name].put(WriteJob(msg.gen, msg.step, slot))
            known = msg.crcs if msg.crcs is not None and len(msg.crcs) == len(msg.entries) else None
            if known is not None and all(isinstance(c, int) for c in known):  # checksummed during the copy
                slot.records = records(slot, known)
                self.store.mark_ready(slot)
            else:
                self.checksummer.put((slot, known))
            return
        # A snapshot that stays in memory is not checksummed: the copy protocol (ready only
        # after every byte is in, double-buffered) keeps it whole, and a CRC pass is CPU that
        # a snapshot every step cannot afford. Bytes that travel are checksummed: disk
        # shards here, erasure-coded shares by the exchange.
        slot.records = records(slot, None)
        self.store.mark_ready(slot)

    def status(self, rank: int, gen: str, steps: list | None = None) -> m.StatusReply:
        ready = [s for s in self.store.ready(rank) if s.gen == gen and (steps is None or s.step in steps)]
        with self.lock:
            mine = {step: save for (g, step), save in self.saves.items() if g == gen}
            levels = sorted(self.writers)
            return m.StatusReply(
                ready={str(s.step): s.records for s in ready},
                objects={str(s.step): s.objects for s in ready if s.objects is not None},
                durable={n: [st for st, save in mine.items() if rank in save.durable.get(n, ())] for n in levels},
                committed={n: [st for st, save in mine.items() if n in save.committed] for n in levels},
                failed={n: {str(st): save.failed[n] for st, save in mine.items() if n in save.failed} for n in levels},
                fatal=self.fatal,
                written={n: list(w) for n, w in self.written.items()},
                warnings=[w for w in (self.warning, self.exchange and self.exchange.error) if w],
            )

    def idle(self) -> bool:
        return self.checksummer.idle() and all(w.idle() for w in self.writers.values())
