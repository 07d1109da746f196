"""The trainer's one door to checkpoint/: lazy asynchronous multi-level saves, and restore
from the fastest level that holds the newest good step.

``save(step, state)`` at a step boundary plans the shard (which replicated chunk this rank
writes: checkpoint.store.plan_writes), takes a shared-memory slot from the node keeper
(waiting only when the host-memory budget is spent) and returns: the bytes are copied
during the next forward/backward (checkpoint/lazy.py), or before it returns where the
step's threads fill every core (``checkpoint.capture``). The keeper checksums the slot
(level 0) and writes it to the levels due at this step (L1 node-local, L2 ``dir``).

Agreement: at every step boundary (``check``, ``save``, ``close``) the ranks all-gather
what their keepers report (snapshots ready, shards durable, steps committed, failures).
Since every rank then sees the same reports, every rank takes the same decisions: a step
is committed at L0 once every rank's snapshot is ready; one committer per level (global
rank 0 for L2, each node's local rank 0 for its L1) has its keeper write the manifest and
commit once every rank's shard is durable there. A keeper or writer failure is raised on
every rank at the same boundary; a failed level write is a warning (training goes on
with the other levels) unless it was the final save.

Each Checkpointer is one attempt of the job (a *generation*, agreed by all ranks when it
starts): the keeper keys what it reports by (generation, step), so after a restart redoes
step S no report of the old attempt counts for the new one, and each attempt writes its
shards under its own ``step_S.<gen>.tmp``.

Memory: the keeper double-buffers each rank (its newest committed snapshot stays whole
while the next is captured). Where ``host_memory_mb`` holds one snapshot per rank but not
two, every save also goes to a disk level (L1, else L2) and the next save first waits until
it is committed there, then overwrites it in memory (one warning line): a crash during that
capture restores from disk. When not even one snapshot fits (a /dev/shm smaller than
``host_memory_mb``), that save goes to L2 directly and synchronously (one warning line).
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import signal
import socket
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from checkpoint.config import CheckpointConfig
from checkpoint.format import CorruptCheckpoint, MissingShard, PartlyFilled, check_latest, checksum, fault_point
from checkpoint.shards import DTYPE_NAMES, ShardReader, shard_header
from checkpoint.keeper import KeeperClient, collect_garbage, connect, messages as m
from checkpoint.keeper.runtime import open_segment
from checkpoint.lazy import LazyCopy, host_unview, host_view, lazy_ok, optimizer_storages, protect
from checkpoint.levels import LevelSpec, make_storage
from checkpoint.state import is_chunk
from checkpoint.store import SHARD, build_manifest, chunk_key, fill_all, plan_writes, save_state
from comms import UserError, dist_utils

log = logging.getLogger(__name__)

LEVELS = ("l0", "l1", "l2")  # fastest first


@dataclass
class PendingSave:
    """A save on its way to its levels."""

    step: int
    levels: set[str]  # levels it is not yet committed at ("l0" until every rank's snapshot is ready)
    requested: set[str] = field(default_factory=set)  # levels whose commit was asked of the committer's keeper
    manifest: dict | None = None  # built when it commits at L0
    failed: list[str] = field(default_factory=list)  # why levels could not store it


@dataclass
class CopyError:
    """Why one rank could not restore one copy (gathered from every rank)."""

    message: str
    elsewhere: bool  # a shard it needs is on another node's L1: not damage
    partly: bool  # found while copying: part of the copy is in the state already


@dataclass
class SaveTiming:
    """One save's cost to the training loop and its time to durable (for metrics.jsonl and
    the library's save handles)."""

    step: int
    levels: tuple[str, ...]  # where it goes ("l0", "l1", "l2")
    started: float  # time.monotonic() when save() was called
    stall_s: float = 0.0  # how long save() held the caller (a lazy copy runs after it; an eager one within it)
    capture: str = ""  # how the tensors were copied: "lazy", or "eager" (at the save) on N threads
    durable_s: float | None = None  # save() to committed at every level (or given up); None while in flight
    failed: list[str] = field(default_factory=list)  # levels that did not store it, with the reason
    # Where the stall goes: sync_s (keeper status + the ranks' gather), alloc_s (the keeper's
    # slot), eager_s (tensors copied at save), then the lazy copy's copy_s, faults, hook_wait_s.
    parts: dict = field(default_factory=dict)


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path):
        cfg.validate()
        self.cfg = cfg
        self.root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"
        specs = [LevelSpec("l2", str(self.root), cfg.keep_last, cfg.keep_every)]
        if cfg.l1_dir:
            specs.append(LevelSpec("l1", cfg.l1_dir, cfg.l1_keep_last))
        self.storages = {spec.name: make_storage(spec) for spec in specs}
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.local_rank = dist_utils.local_rank()
        self.nodes = self.world // int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.gen = dist_utils.broadcast_object(secrets.token_hex(6) if self.rank == 0 else None)
        self.keeper: KeeperClient = connect(run_dir, self.rank, self.local_rank, self.world // self.nodes,
                                            [spec.to_dict() for spec in specs], cfg.host_memory_mb,
                                            cfg.keeper_timeout_s, self.gen)
        self.said = set()  # warnings rank 0 printed already
        if self.keeper.warning:
            self._warn(self.keeper.warning)
        self.keeper_error: tuple[str, bool] | None = None  # (message, is the user's to fix)
        self.buffers: dict[int, torch.Tensor] = {}  # keeper slot id -> its bytes, mapped here
        self.capture: LazyCopy | None = None
        self.pending: dict[int, PendingSave] = {}
        self.failures: dict[int, list[str]] = {}  # finished steps -> level failures
        self.owner: dict[str, int] = {}
        self.sigs: list | None = None
        self.last_save: int | None = None
        self.durable = -1  # the newest step committed at a disk level (L1 or L2), as every rank saw it
        self.final: int | None = None
        self.stop_requested = False
        self.l0_remote = None  # step -> readers of other nodes' level-0 shards (checkpoint.snapshot)
        self.restored_from: str | None = None  # the level the last restore read
        self.timings: dict[int, SaveTiming] = {}  # saves in flight, and finished ones not yet collected

    # ------------------------------------------------------------------ the training loop's calls

    def attach(self, optimizer: torch.optim.Optimizer):
        """Declare the optimizer whose state is saved: its state is then copied lazily
        (only its ``step`` mutates it) from the first save on. Optional: every torch
        optimizer's step already waits for pending copies."""
        protect(optimizer)

    def handle_sigterm(self, signals=(signal.SIGTERM, signal.SIGINT)):
        """On SIGTERM (and Ctrl-C's SIGINT), make ``check()`` return True (on every rank)
        instead of dying; the loop then saves with ``final=True`` and calls ``close()``, which
        waits for the levels."""
        for sig in signals:
            signal.signal(sig, lambda *_: setattr(self, "stop_requested", True))

    def in_flight(self, step: int) -> bool:
        """Is ``step``'s save still on its way to a level (as of the last step boundary)?"""
        return step in self.pending

    def finished_saves(self) -> list[SaveTiming]:
        """The saves that left flight since the last call (committed, or failed at a level)."""
        done = [t for s, t in sorted(self.timings.items()) if s not in self.pending]
        for t in done:
            del self.timings[t.step]
        return done

    def check(self) -> bool:
        """Step boundary (collective; call it on every rank after every optimizer step):
        commits what became durable, raises keeper/writer errors on every rank, and
        returns True when any rank received SIGTERM (see ``handle_sigterm``)."""
        if not self.pending:  # the same on every rank: nothing in flight to agree on
            # Only a stop request or a failed keeper call (this rank's news alone) can need
            # the others: one flag all-reduce (~0.2 ms on gloo) instead of gathering every
            # keeper's report (6-9 ms per step measured on 2 CPU ranks).
            stop, failed = dist_utils.any_true([self.stop_requested, self.keeper_error is not None])
            if not failed:
                return stop
        return any(g["stop"] for g in self._sync())

    def save(self, step: int, state: dict, extra: dict | None = None, final: bool = False) -> SaveTiming:
        """Snapshot ``state`` (name -> Chunk | JSON-able object) as ``step``; collective, returns
        at once. ``final`` sends it to every level regardless of intervals (except a level
        whose newest commit is this very step: a run resumed at its end), and ``close()``
        then fails unless it is committed there. Returns the save's timing record (its
        ``durable_s`` is filled at the boundary that sees it committed)."""
        if self.last_save is not None and step <= self.last_save:  # the keeper keys reports by (attempt, step)
            raise UserError(f"checkpoint save of step {step} after a save of step {self.last_save} in this run: "
                            "save each step at most once and in increasing order (the final save included)")
        started, prev = time.monotonic(), self.last_save
        self._join_capture()
        chunks = {chunk_key(n, c.offsets): (n, c) for n, c in state.items() if is_chunk(c)}
        meta = sorted((k, c.nbytes) for k, (_, c) in chunks.items())
        sig = zlib.crc32(repr(meta).encode())
        latest = {n: st.steps()[:1] for n, st in self.storages.items()} if final else {}
        t_sync = time.monotonic()
        gathered = self._sync(sig=sig, wait_ready=True, latest=latest)
        t_sync = time.monotonic() - t_sync
        if [g["sig"] for g in gathered] != self.sigs:  # the layout changed (or first save): re-plan
            self.owner = plan_writes(dist_utils.all_gather_object(meta))
            self.sigs = [g["sig"] for g in gathered]
        objects = {n: v for n, v in state.items() if not is_chunk(v)}
        if self.rank == 0:
            try:
                objects = json.loads(json.dumps({"objects": objects, "extra": extra or {}}))
            except (TypeError, ValueError) as e:
                raise UserError(f"checkpoint state holds an object that is not JSON-able ({e}); "
                                "store tensors as tensors and the rest as plain numbers, strings, lists, dicts") from None
        due = [n for n in ("l1", "l2") if n in self.storages and (final or self._due(n, step))
               and not (final and all(g["latest"][n] == [step] for g in gathered))]
        self.last_save = step
        if final:
            self.final = step
        mine = sorted(k for k in chunks if self.owner[k] == self.rank)
        head, offsets = shard_header((k, chunks[k][1].tensor.dtype, chunks[k][1].shape) for k in mine)
        nbytes = len(head) + sum(chunks[k][1].nbytes for k in mine)
        t_disk = time.monotonic()
        held = 1 if self._one_copy(nbytes) else 2  # snapshots of this rank the keeper must have room for
        if held == 1:
            if not due and not final:  # (a final save skips only levels that hold this very step)
                due = [next(n for n in ("l1", "l2") if n in self.storages)]
            if prev is not None:
                self._wait_disk(prev)
        t_disk = time.monotonic() - t_disk
        t_alloc = time.monotonic()
        reply, no_room = self._alloc(step, nbytes, held)  # waits when memory is spent
        t_alloc = time.monotonic() - t_alloc
        if any(dist_utils.any_true([no_room is not None])):
            if reply is not None:
                self._call(m.Release(reply.slot))
            timing = self.timings[step] = SaveTiming(step, ("l2",), started)
            self._save_to_disk(step, state, extra, no_room)
            timing.stall_s = timing.durable_s = time.monotonic() - started
            return timing
        self.pending[step] = PendingSave(step, {"l0", *due})
        timing = self.timings[step] = SaveTiming(step, ("l0", *due), started)
        timing.parts.update(sync_s=t_sync, disk_wait_s=t_disk, alloc_s=t_alloc)
        if reply is None:
            return timing
        t_eager = time.monotonic()
        buf, fresh = self._buffer(reply)
        now = self._copy_threads((chunks[k][1].tensor for k in mine), fresh)
        buf[:len(head)].copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        entries, copies, owned = [], [], optimizer_storages()
        crcs: list[int | None] = []  # a shard bound for disk is checksummed as it is copied
        copy_at = []  # the entries LazyCopy copies (at once, or beside the next step)
        for k, off in zip(mine, offsets):
            name, c = chunks[k]
            t = c.tensor if c.tensor.is_contiguous() else c.tensor.contiguous()
            lo = len(head) + off
            dst = buf[lo:lo + c.nbytes]
            if now or lazy_ok(t, owned):
                copies.append((t, dst))
                copy_at.append(len(crcs))
                crcs.append(None)  # filled by the copy
            else:  # the forward pass may change it (a buffer): copy now
                dst.copy_(t.detach().reshape(-1).view(torch.uint8))
                crcs.append(checksum(dst.numpy()) if due else None)  # dst is host memory
            entries.append([name, k, list(c.offsets), list(c.shape), list(c.global_shape),
                            DTYPE_NAMES[c.tensor.dtype], lo, lo + c.nbytes])

        def filled(copy_crcs: list):
            for i, crc in zip(copy_at, copy_crcs):
                crcs[i] = crc
            self._call(m.Filled(self.gen, step, reply.slot, entries, self.world, due,
                                objects if self.rank == 0 else None, crcs if due else None))

        timing.parts["eager_s"] = time.monotonic() - t_eager
        timing.capture = f"eager, {now} threads" if now else "lazy"
        self.capture = LazyCopy(copies, filled, timing.parts, crc=bool(due), now=now)
        timing.stall_s = time.monotonic() - started
        return timing

    def _copy_threads(self, tensors, fresh: bool) -> int:
        """How many threads copy a save at once; 0 = lazily (``checkpoint.capture``). Lazy
        pays only where the copy runs beside the step on something it leaves idle, or where
        the slot is ``fresh`` (newly mapped here): then the copy is mostly first-touch page
        faults, kernel work the step hides better than it hides a memcpy."""
        mode = self.cfg.capture
        if mode == "auto":
            idle = len(os.sched_getaffinity(0)) > self.world // self.nodes * torch.get_num_threads()
            mode = "lazy" if idle or fresh or any(t.is_cuda for t in tensors) else "eager"
        return max(1, torch.get_num_threads()) if mode == "eager" else 0

    def _alloc(self, step: int, nbytes: int, held: int) -> tuple[m.AllocReply | None, str | None]:
        """A keeper slot for this rank's shard, or (None, why) when it does not fit into the
        keeper's memory (then the save goes to disk directly)."""
        if self.keeper_error is not None:
            return None, None
        wait_s = self.cfg.close_timeout_s
        try:
            return self.keeper.call(m.Alloc(self.gen, step, nbytes, wait_s, self.durable, held), timeout_s=wait_s + 60), None
        except UserError as e:
            return None, str(e)
        except (OSError, ConnectionError, RuntimeError) as e:
            self._failed(e)
            return None, None

    def _one_copy(self, nbytes: int) -> bool:
        """Does the keeper hold only one snapshot of some rank (collective)? Said once. Not
        with erasure-coded snapshots: the coder keeps a step's slot until the next is coded."""
        coded = self.l0_remote is not None
        room = self.keeper.budget // (self.world // self.nodes) if self.keeper_error is None and not coded else 0
        if not any(dist_utils.any_true([nbytes <= room < 2 * nbytes])):
            return False
        level = "L1" if "l1" in self.storages else str(self.root)
        self._warn(f"the node keeper has room for one snapshot per rank, not two (checkpoint.host_memory_mb="
                   f"{self.cfg.host_memory_mb}): every save also goes to {level}, and each save first waits until "
                   "the previous one is durable there")
        return True

    def _wait_disk(self, step: int):
        """Step boundaries until ``step`` is committed at a disk level, or can no longer be
        (failed, or not due at one): its slot may be overwritten then. Collective: every
        rank sees the same reports, so every rank loops as often."""
        while self.durable < step and step in self.pending and self.pending[step].levels - {"l0"}:
            self._sync()
            time.sleep(0.002)

    def _save_to_disk(self, step: int, state: dict, extra: dict | None, why: str | None):
        """The synchronous path for a snapshot the keeper cannot hold: straight to L2."""
        self._warn(f"{why or 'another rank has no room for its snapshot in the node keeper'}; saves that do not fit "
                   f"go to {self.root} directly (synchronously)")
        log.info("step %d goes to %s directly", step, self.root)
        save_state(self.root, step, state, self.cfg.keep_last, extra, self.gen)
        self.failures[step] = []
        self.durable = step

    def restore(self, state: dict, optional=lambda name: False, say: bool = True):
        """Fill ``state`` from the newest good step at any level (L0 memory, L1, L2), else from
        ``load_from``: (step, objects, missing) or None. Damaged copies are skipped with a
        warning; chunks are resharded onto the current layout. Collective. ``say``: rank 0
        prints which step came from where (callers with a line of their own turn it off)."""
        self._join_capture()
        if self.cfg.resume:
            got = self._restore_levels(state, optional, say)
            if got is not None:
                return got
        if self.cfg.load_from:
            # Any format: native, universal, DeepSpeed, DCP (detected), resharded on load.
            from checkpoint.convert import load_any

            return load_any(Path(self.cfg.load_from), state, optional)
        return None

    def close(self):
        """Wait (at most ``close_timeout_s``) until every save is committed at its levels.
        Raises unless the final save (or else the last one) is committed at every level it
        was due at: a UserError naming the level and why when the storage refused it (a
        full or read-only disk: the user's to fix; the job resumes from memory or disk when
        rerun), RuntimeError when time ran out. Collective; call it at the end and after SIGTERM."""
        if self.keeper is None:
            return
        try:
            self._join_capture()
            fault_point("close")
            deadline = time.monotonic() + self.cfg.close_timeout_s
            while True:
                gathered = self._sync(timed_out=time.monotonic() > deadline)
                if not self.pending:
                    break
                if any(g["timed_out"] for g in gathered):
                    raise RuntimeError(f"checkpoint steps {sorted(self.pending)} were not committed within "
                                       f"checkpoint.close_timeout_s={self.cfg.close_timeout_s:g} s")
                time.sleep(0.02)
            final = self.final if self.final is not None else self.last_save  # the one the job promised
            if self.failures.get(final):
                raise UserError(f"the final checkpoint (step {final}) was not saved: "
                                f"{'; '.join(self.failures[final])}; fix that and rerun: the job resumes from its "
                                "newest committed step")
            self._call(m.Bye())
        finally:
            self.keeper.close()
            self.keeper = None
            for buf in self.buffers.values():
                host_unview(buf)
            self.buffers.clear()

    # ------------------------------------------------------------------ internals

    def _due(self, level: str, step: int) -> bool:
        every = self.cfg.l1_interval if level == "l1" else self.cfg.l2_interval
        return every == 0 or step % every == 0

    def _join_capture(self):
        if self.capture is not None:
            try:
                self.capture.join()
            except Exception as e:  # a failed copy: reported collectively at the boundary
                self.keeper_error = (f"copying the snapshot failed: {e!r}", False)
            self.capture = None

    def _buffer(self, reply: m.AllocReply) -> tuple[torch.Tensor, bool]:
        """The slot's bytes, mapped here, and whether they were mapped just now (every page
        then faults on its first touch)."""
        for sid in [s for s in self.buffers if s not in reply.live]:  # slots the keeper dropped
            host_unview(self.buffers.pop(sid))
        buf = self.buffers.get(reply.slot)
        fresh = buf is None or buf.numel() != reply.size
        if fresh:
            fd = open_segment(reply.path)
            try:
                buf = self.buffers[reply.slot] = host_view(mmap.mmap(fd, reply.size))
            finally:
                os.close(fd)
        return buf, fresh

    def _call(self, msg):
        """A keeper request; a failure is kept and raised on every rank at the next boundary
        (raising on this rank alone would leave the others waiting in a collective)."""
        if self.keeper_error is not None:
            return None
        try:
            return self.keeper.call(msg)
        except (UserError, OSError, ConnectionError, RuntimeError) as e:
            self._failed(e)
        return None

    def _failed(self, e: Exception):
        if isinstance(e, UserError):
            self.keeper_error = (str(e), True)
        elif isinstance(e, (OSError, ConnectionError)):
            self.keeper_error = (f"the node keeper on {socket.gethostname()} is gone or not answering ({e})", False)
            collect_garbage()  # a killed keeper's shared memory: nobody else may be left to remove it
        else:
            self.keeper_error = (str(e), False)

    def _warn(self, line: str):
        """Say a warning once, on rank 0 (and in every rank's log)."""
        if line in self.said:
            return
        self.said.add(line)
        log.warning("%s", line)
        if self.rank == 0:
            print(f"kintsugi: warning: {line}", flush=True)

    def _status(self, wait_ready: bool) -> dict:
        l0 = sorted(s for s, p in self.pending.items() if "l0" in p.levels)  # records travel until L0 commits
        st = self._call(m.Status(self.gen, l0))
        while st is not None and wait_ready and self.last_save in l0 and str(self.last_save) not in st.ready \
                and not st.fatal:
            time.sleep(0.002)  # the keeper is still checksumming the previous snapshot
            st = self._call(m.Status(self.gen, l0))
        if self.keeper_error is not None:
            return {"fatal": self.keeper_error[0], "user": self.keeper_error[1]}
        return dict(vars(st))  # shallow: asdict's deep copy of every record cost ~10 ms per boundary

    def _sync(self, sig=None, wait_ready=False, timed_out=False, latest=None) -> list[dict]:
        st = self._status(wait_ready)
        st.update(sig=sig, stop=self.stop_requested, timed_out=timed_out, latest=latest)
        gathered = dist_utils.all_gather_object(st)
        fatal = [(r, g) for r, g in enumerate(gathered) if g.get("fatal")]
        if fatal:
            r, g = fatal[0]
            raise (UserError if g.get("user") else RuntimeError)(f"checkpointing failed on rank {r}: {g['fatal']}")
        for line in dict.fromkeys(w for g in gathered for w in g.get("warnings", ())):
            self._warn(line)
        for step in sorted(self.pending):
            self._advance(step, gathered)
        return gathered

    def _advance(self, step: int, gathered: list[dict]):
        p, s = self.pending[step], str(step)
        if "l0" in p.levels and all(s in g["ready"] for g in gathered):
            self._call(m.L0Commit(self.gen, step))
            objs = gathered[0]["objects"][s]
            p.manifest = build_manifest(step, self.world, [g["ready"][s] for g in gathered], objs["objects"],
                                        objs["extra"])
            p.levels.discard("l0")
        for level in sorted(p.levels - {"l0"}):
            errors = [g["failed"][level][s] for g in gathered if s in g["failed"].get(level, {})]
            if errors:
                p.failed.append(errors[0])
                p.levels.discard(level)
                log.warning("checkpoint step %d was not stored at %s: %s", step, level, errors[0])
                if self.rank == 0:
                    print(f"kintsugi: warning: checkpoint step {step} was not stored at {level}: {errors[0]}; "
                          "training continues with the other levels", flush=True)
            elif self._committed(level, step, gathered):
                p.levels.discard(level)
                self.durable = max(self.durable, step)
            elif level not in p.requested and p.manifest is not None \
                    and all(step in g["durable"].get(level, []) for g in gathered):
                if (self.rank == 0) if level == "l2" else (self.local_rank == 0):
                    self._call(m.Commit(self.gen, level, step, p.manifest))
                p.requested.add(level)
        if not p.levels:
            self.failures[step] = p.failed
            del self.pending[step]
            if step in self.timings:
                self.timings[step].durable_s = time.monotonic() - self.timings[step].started
                self.timings[step].failed = self.failures[step]

    @staticmethod
    def _committed(level: str, step: int, gathered: list[dict]) -> bool:
        """L2 is committed by global rank 0's keeper; L1 by every node's keeper for itself."""
        reports = gathered[:1] if level == "l2" else gathered
        return all(step in g["committed"].get(level, []) for g in reports)

    def _restore_levels(self, state: dict, optional, say: bool):
        for storage in self.storages.values():
            if (line := check_latest(storage.root)) is not None:
                self._warn(line)
        try:
            snaps = self.keeper.call(m.Snapshots()).snapshots
        except (OSError, ConnectionError, RuntimeError) as e:
            log.warning("no level-0 snapshots: the node keeper did not answer (%s)", e)
            snaps = []
        view = {"l0": [(x["step"], x["world"], x["rank"], x["records"], x["objects"]) for x in snaps]
                if self.local_rank == 0 else [],  # one report per node: its keeper holds all local ranks
                **{n: restorable(st.steps()) for n, st in self.storages.items()}}
        views = dist_utils.all_gather_object(view)
        held: dict[int, dict] = {}  # step -> {"world", "records" by rank, "objects"}
        for v in views:
            for step, world, rank, records, objects in v["l0"]:
                h = held.setdefault(step, {"world": world, "records": {}, "objects": None})
                h["records"][rank] = records
                if objects is not None:
                    h["objects"] = objects
        candidates = [(s, "l0") for s, h in held.items()
                      if len(h["records"]) == h["world"] and h["objects"] is not None]
        for name in self.storages:
            candidates += [(s, name) for s in set.intersection(*(set(v[name]) for v in views))]
        self.durable = max([self.durable] + [s for s, level in candidates if level != "l0"])
        partly = None  # a copy found damaged while it was being copied into ``state`` (on any rank)
        for step, level in sorted(candidates, key=lambda c: (-c[0], LEVELS.index(c[1]))):
            error, missing, manifest = None, set(), None
            try:
                if level == "l0":
                    h = held[step]
                    manifest = build_manifest(step, h["world"], [h["records"][r] for r in range(h["world"])],
                                              h["objects"]["objects"], h["objects"]["extra"])
                    step_dir = Path("/dev/shm")
                    readers = {SHARD.format(x["rank"]): ShardReader(Path(x["path"]), memory=True)
                               for x in snaps if x["step"] == step}
                    if self.l0_remote is not None:  # shards in other nodes' keepers
                        readers = {**self.l0_remote(step), **readers}
                else:
                    manifest = self.storages[level].manifest(step)
                    step_dir, readers = self.storages[level].open_step(step)
                missing = fill_all(state, manifest, step_dir, readers, optional)
            except MissingShard as e:
                # a node's L1 holds its own ranks' shards: on several nodes a rank may need another's
                error = CopyError(str(e), level == "l1" and self.nodes > 1, False)
            except CorruptCheckpoint as e:
                error = CopyError(str(e), False, isinstance(e, PartlyFilled))
            errors = [e for e in dist_utils.all_gather_object(error) if e]
            partly = next((f"step {step} at {level.upper()}: {e.message}" for e in errors if e.partly), partly)
            if not errors:
                self.restored_from = level
                log.info("restored step %d from %s", step, level)
                if say and self.rank == 0:
                    print(f"kintsugi: restored step {step} from {level.upper()}", flush=True)
                return step, manifest["objects"], missing
            if all(e.elsewhere for e in errors):
                log.info("step %d at L1: a shard this rank needs is on another node (%s); trying the next copy",
                         step, errors[0].message)
                continue
            errors = [e.message for e in errors]
            log.warning("checkpoint step %d at %s is damaged (%s); trying the next copy", step, level, errors[0])
            if self.rank == 0:
                print(f"kintsugi: warning: checkpoint step {step} at {level.upper()} is damaged ({errors[0]}); "
                      "falling back to the next older copy", flush=True)
        if partly and not self.cfg.load_from:
            raise UserError(f"no copy could be restored, and one was found damaged while it was being loaded ({partly}): "
                            "the model no longer holds its initial values, so the job will not start fresh from it; "
                            "restore a good step into the checkpoint directory, or set checkpoint.resume=false to start over")
        return None


def restorable(steps: list[int]) -> list[int]:
    """A level's steps a restore may take (``steps``: newest commit first): those numbered
    at most its newest commit. A step numbered above it was committed before, by an
    abandoned run (e.g. one started over with ``checkpoint.resume=false`` in the same run
    directory), and is kept only until retention removes it."""
    return [s for s in steps if s <= steps[0]] if steps else []
