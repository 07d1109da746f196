"""Erasure-coded snapshots across node keepers (REFT), the keeper's side.

Once every local rank's snapshot of step S is committed at level 0, the node snapshot (all
local ranks' shared-memory slots back to back, then a JSON trailer with their metadata,
without copying) is protected in the background: the keeper reads its codewords' data
shares from its group's peer keepers over TCP (checkpoint/keeper/peers.py), computes its m
parity shares (checkpoint/erasure.py) and serves its own shares to them. Double-buffered:
the previous step's data (its slots stay pinned) and parity are dropped only after every
peer of the group has encoded S, so a keeper killed mid-encode or mid-transfer leaves the
previous complete step decodable.

Everything held is tagged with the job attempt (generation) that saved it: a step redone
after a restart is coded anew, never from another attempt's shares.

Elastic shrink: a survivor of a lost node's group rebuilds that node's snapshot and serves
it in its place (``adopt``) until the job's next layout.

The trainer side (placing keepers in groups, choosing what to restore from) is
checkpoint/snapshot.py; it talks to this through the ``ec_*`` requests (``HANDLERS``).
"""
from __future__ import annotations

import json
import logging
import queue
import struct
import threading
import time

import numpy as np

from checkpoint.erasure import GroupCode, NodeShares, ShareError, ShareHeader, rebuild_snapshot
from checkpoint.format import fault_point
from checkpoint.keeper import messages as m
from checkpoint.keeper.peers import PeerClient, PeerError, PeerServer
from checkpoint.keeper.slots import Slot, SlotStore

log = logging.getLogger(__name__)

TRAILER = struct.Struct("<Q")  # length of the metadata JSON, the node snapshot's last 8 bytes
LAYOUT = ("group", "pos", "k", "m", "nodes", "nodes_total")  # a keeper's place; another one drops what it coded


class SnapshotExchange:
    """Lives in the node keeper; ``store`` is its SlotStore (level-0 slots)."""

    def __init__(self, store: SlotStore, token: str, port: int = 0, host: str = "", advertise: str = "",
                 timeout: float = 10.0):
        self.store, self.timeout = store, timeout
        self.lock = threading.RLock()
        self.holding: dict[int, NodeShares] = {}  # step -> what this node serves at that step
        self.pinned: dict[int, list[Slot]] = {}  # step -> slots kept alive for it
        self.meta: dict[int, bytes] = {}  # step -> metadata trailer of a rebuilt snapshot (kept verbatim)
        # step -> [(shares, slots)] of lost nodes' snapshots this keeper rebuilt and serves in
        # their place (elastic shrink), until the job's next layout
        self.adopted: dict[int, list[tuple[NodeShares, list[Slot]]]] = {}
        self.ranks: set[int] | None = None  # the global ranks now on this node (None: every rank seen)
        self.encoded: set[int] = set()
        self.confirmed = -1  # newest step every peer of the group has encoded too
        self.plan: dict | None = None
        self.clients: dict[int, PeerClient] = {}
        self.last_queued: tuple[str, int] = ("", -1)
        self.error: str | None = None  # why snapshots are not being coded now (rank 0 says it once)
        self.cause: str | None = None  # the failure behind ``error``, without the step: the same cause is one line
        self.jobs: queue.Queue = queue.Queue()
        self.server = PeerServer(self, token, host=host, port=port, advertise=advertise, timeout=timeout)
        threading.Thread(target=self._run, name="keeper-ec", daemon=True).start()

    # ------------------------------------------------------------ requests from the trainers

    def configure(self, plan: dict | None, token: str) -> m.AddressReply:
        """plan: job, group, pos (this node's position in its group), k, m, nodes (the group's
        node slots), nodes_total, peers (pos -> address); None turns erasure coding off."""
        with self.lock:
            if self.plan and (plan is None or any(self.plan.get(x) != plan.get(x) for x in LAYOUT)):
                self._drop(list(self.holding))  # another layout: what was coded is meaningless now
                self._release_adopted()
            self.plan = plan
            self.error = self.cause = None  # news of the previous layout or attempt
            self._connect(token)
        if plan is not None and "peers" in plan:
            log.info("erasure coding: group %d position %d (k=%d, m=%d), shares served at %s, peers at %s", plan["group"],
                     plan["pos"], plan["k"], plan["m"], self.server.address, ", ".join(map(str, plan["peers"].values())))
        return m.AddressReply(self.server.address)

    def rekey(self, token: str):
        """Keep this node's place, with the token of the job's new attempt."""
        with self.lock:
            self.error = self.cause = None
            self._connect(token)

    def _connect(self, token: str):
        self.server.token = token
        for c in self.clients.values():
            c.close()
        peers = (self.plan or {}).get("peers", {})
        self.clients = {int(p): PeerClient(a, token, self.timeout) for p, a in peers.items() if int(p) != self.plan["pos"]}

    def set_ranks(self, ranks: list[int]):
        """The global ranks now on this node (they change when torchrun restarts the job on
        another set of nodes): only they count for a complete node snapshot; slots of other
        ranks, left from the previous attempt and no longer needed, are freed."""
        with self.lock:
            self.ranks = set(ranks)
            self.store.keep_ranks(self.ranks)

    def status(self) -> m.EcStatusReply:
        """What this keeper holds: complete node snapshots by step (ranks, bytes), parity by
        step, the steps it has finished encoding, and its place in the group."""
        steps: dict[int, list] = {}
        worlds: dict[str, int] = {}  # step -> the world size that saved it
        for s in self.store.ready():
            steps.setdefault(s.step, []).append([s.rank, s.used])
            worlds[str(s.step)] = s.world
        with self.lock:
            parity = {str(st): n.nbytes for st, n in self.holding.items()}
            layout: dict[str, list] = {}  # step -> the node snapshots served: position, length, each rank's slot in it
            for st, slots in self.pinned.items():
                layout[str(st)] = [_layout(self.holding[st], slots)]
            for st, entries in self.adopted.items():
                layout.setdefault(str(st), []).extend(_layout(node, slots) for node, slots in entries)
            plan = None if self.plan is None else {x: self.plan.get(x) for x in LAYOUT}
            return m.EcStatusReply({str(k): sorted(v) for k, v in steps.items()}, worlds, parity, layout,
                                   sorted(self.encoded), plan, self.server.address)

    def committed(self, gen: str, step: int):
        """A local rank committed ``step`` of attempt ``gen`` at L0; encode once all local ranks have."""
        ranks = self.store.ranks() if self.ranks is None else self.ranks
        l0 = [self.store.l0_of(r) for r in ranks]
        done = len(ranks) >= self.store.local_world and all(t is not None and t[0] == gen and t[1] >= step for t in l0)
        with self.lock:
            if done and self.plan is not None and (gen != self.last_queued[0] or step > self.last_queued[1]):
                self.last_queued = (gen, step)
                self.jobs.put((gen, step))

    def rebuild(self, step: int) -> m.RebuildReply:
        """Decode this node's snapshot of ``step`` from its peers into fresh level-0 slots,
        then re-encode its own parity (in the background) so the group is whole again."""
        t0 = time.perf_counter()
        plan = self.plan
        data = rebuild_snapshot(GroupCode(plan["k"], plan["m"]), step, plan["pos"], dict(self.clients))
        raw, ranks, slots = self._install(step, data)
        with self.store.cond:
            self.store.local_world = max(self.store.local_world, len(slots))
        with self.lock:
            self.meta[step] = raw
        gen = slots[0].gen if slots else ""
        self._snapshot(gen, step, plan)  # its data shares are served at once (peers read restored shards)
        with self.lock:
            self.last_queued = (gen, step)
            self.jobs.put((gen, step))
        return m.RebuildReply(len(data), time.perf_counter() - t0, ranks)

    def adopt(self, step: int, pos: int) -> m.RebuildReply:
        """Rebuild the snapshot of the node at group position ``pos``, lost for good (the job
        goes on without it), from this node's and the other survivors' shares: its ranks'
        slots join this keeper's level 0 and their data shares are served in its place, so
        the job's new, smaller layout can read their chunks. Held until the next layout."""
        t0 = time.perf_counter()
        plan = self.plan
        own = self._node(step)
        readers = {**{p: c for p, c in self.clients.items() if p != pos}, plan["pos"]: own}
        data = rebuild_snapshot(own.code, step, pos, readers)
        raw, ranks, slots = self._install(step, data)
        del data
        self.store.pin(slots)  # no trainer of this node may reuse them
        node = NodeShares(plan["job"], step, plan["group"], plan["pos"], pos, own.code,
                          [(s.mm, s.used) for s in slots] + [raw + TRAILER.pack(len(raw))], own.gen)
        with self.lock:
            self.adopted.setdefault(step, []).append((node, slots))
        took = time.perf_counter() - t0
        log.info("rebuilt the snapshot of lost group position %d at step %d (ranks %s, %d bytes) in %.3f s; serving it",
                 pos, step, ranks, len(node.snapshot), took)
        return m.RebuildReply(len(node.snapshot), took, ranks)

    def _install(self, step: int, data) -> tuple[bytes, list[int], list[Slot]]:
        """Ready level-0 slots of ``step`` from a decoded node snapshot (its ranks' shards back
        to back, then the metadata trailer): (the trailer's JSON, the ranks, the slots)."""
        (n,) = TRAILER.unpack(data[-TRAILER.size:].tobytes())
        raw = data[-TRAILER.size - n:-TRAILER.size].tobytes()
        off, slots = 0, []
        for r in json.loads(raw)["ranks"]:
            slots.append(self.store.install(r["rank"], step, r, data[off:off + r["used"]]))
            off += r["used"]
        return raw, [s.rank for s in slots], slots

    # ------------------------------------------------------------ ShareSource (served to peers)

    def _node(self, step: int) -> NodeShares:
        with self.lock:
            node = self.holding.get(step)
        if node is None:
            raise ShareError(f"this keeper holds no snapshot of step {step}")
        return node

    def _source(self, step: int, codeword: int, index: int) -> NodeShares:
        """Whichever snapshot this keeper serves holds that share: its own, or an adopted one."""
        with self.lock:
            own = self.holding.get(step)
            for node in ([own] if own else []) + [n for n, _ in self.adopted.get(step, [])]:
                if (codeword, index) in node.headers:
                    return node
        return self._node(step)  # raises ShareError, or names the step's share as missing

    def header(self, step: int, codeword: int, index: int) -> ShareHeader:
        return self._source(step, codeword, index).header(step, codeword, index)

    def read(self, step: int, codeword: int, index: int, offset: int, length: int):
        fault_point("ec_transfer")
        with self.lock:  # copied under the lock: no view of a slot outlives its pin (the keeper closes it then)
            return bytes(self._source(step, codeword, index).read(step, codeword, index, offset, length))

    def held(self) -> list[ShareHeader]:
        with self.lock:
            nodes = [*self.holding.values(), *(n for entries in self.adopted.values() for n, _ in entries)]
            return [h for node in nodes for h in node.held()]

    # ------------------------------------------------------------ the encoding thread

    def _run(self):
        while True:
            gen, step = self.jobs.get()
            while not self.jobs.empty():  # only the newest step matters
                gen, step = self.jobs.get()
            try:
                self._encode(gen, step)
                self.error = self.cause = None
            except Exception as e:  # a dead or lying peer: keep the previous step, try the next one
                log.warning("snapshot of step %d was not erasure-coded: %s; the previous coded step stays", step, e)
                self._failed(step, e)
                with self.lock:
                    if step not in self.encoded:
                        self._drop([step])

    def _failed(self, step: int, e: Exception):
        """Tell the trainers (rank 0 prints each distinct line once): one line while the same
        cause keeps every step from being coded, naming the first step it hit."""
        if str(e) == self.cause:
            return
        hint = (" (every keeper must be reachable from the other nodes at the address it advertises: "
                "set snapshot.advertise to an address or interface they reach)") if isinstance(e, PeerError) else ""
        self.cause, self.error = str(e), f"snapshots are not erasure-coded from step {step} on: {e}{hint}"

    def _snapshot(self, gen: str, step: int, plan: dict) -> NodeShares | None:
        slots = sorted((s for s in self.store.ready() if s.step == step and s.gen == gen
                        and (self.ranks is None or s.rank in self.ranks)), key=lambda s: s.rank)
        if len(slots) < self.store.local_world:
            return None  # already replaced by a newer step
        self.store.pin(slots)
        meta = self.meta.get(step) or json.dumps({"step": step, "ranks": [
            {"rank": s.rank, "used": s.used, "world": s.world, "gen": s.gen, "entries": s.entries,
             "records": s.records, "objects": s.objects} for s in slots]}, separators=(",", ":")).encode()
        node = NodeShares(plan["job"], step, plan["group"], plan["pos"], plan["pos"], GroupCode(plan["k"], plan["m"]),
                          [(s.mm, s.used) for s in slots] + [meta + TRAILER.pack(len(meta))], gen)
        with self.lock:
            if step in self.holding:  # another attempt's copy of this step: superseded
                self._drop([step])
            self.holding[step], self.pinned[step] = node, slots
        return node

    def _encode(self, gen: str, step: int):
        plan = self.plan
        with self.lock:
            node = self.holding.get(step)  # a rebuilt step is served before it is coded
        if node is None or node.gen != gen:
            node = self._snapshot(gen, step, plan)
        if node is None:
            return
        need = plan["m"] * -(-len(node.snapshot) // plan["k"])
        with self.lock:
            held = sum(n.nbytes for s, n in self.holding.items() if s == self.confirmed)
        if held + need > plan.get("memory_mb", 1 << 20) << 20:
            raise RuntimeError(f"snapshot.memory_mb={plan['memory_mb']} is too small for {need >> 20} MiB of parity "
                              f"(with the {held >> 20} MiB kept for the previous coded step); raise snapshot.memory_mb")
        readers = {**self.clients, plan["pos"]: node}
        code = node.code
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        for c, s in code.parity_roles(plan["pos"]):  # wait until the peers hold this attempt's data of step
            for j in range(code.k):
                reader = readers[code.holder(c, j)]
                while True:
                    try:
                        if reader.header(step, c, j).gen == gen:
                            break
                    except PeerError:
                        raise
                    except ShareError:
                        pass
                    if self.jobs.qsize() or any(h.step > step for h in reader.held()):
                        log.info("step %d superseded by a newer snapshot before it was coded", step)
                        with self.lock:
                            self._drop([step])
                        return
                    if time.monotonic() > deadline:
                        raise ShareError(f"the peer at group position {code.holder(c, j)} did not hold the step's "
                                         f"snapshot within {self.timeout:g} s")
                    time.sleep(0.01)
        node.encode(readers)
        with self.lock:
            self.encoded.add(step)
        log.info("step %d erasure-coded: %d bytes of parity in %.3f s", step, node.nbytes, time.perf_counter() - t0)
        confirmed = self._group_has(step, code)
        with self.lock:  # keep the newest step the whole group has coded, and this one
            if confirmed:
                self.confirmed = step
            self._drop([s for s in self.holding if s < step and s != self.confirmed])
            self.encoded = {s for s in self.encoded if s in self.holding}

    def _group_has(self, step: int, code: GroupCode) -> bool:
        """Whether every peer has encoded ``step`` (waits up to the timeout). A peer that died
        or is slow may never encode it: then the previous coded step must stay decodable."""
        deadline = time.monotonic() + self.timeout
        for pos, client in self.clients.items():
            c, s = code.parity_roles(pos)[0]
            while True:
                try:
                    client.header(step, c, s)
                    break
                except PeerError:
                    return False
                except ShareError:
                    if time.monotonic() > deadline or self.jobs.qsize():
                        return False
                    time.sleep(0.01)
        return True

    def _drop(self, steps):
        for step in steps:
            self.holding.pop(step, None)
            self.meta.pop(step, None)
            self.encoded.discard(step)
            for slot in self.pinned.pop(step, []):
                self.store.unpin(slot)
        if self.ranks is not None:
            self.store.keep_ranks(self.ranks)

    def _release_adopted(self):
        for entries in self.adopted.values():
            for _, slots in entries:
                for slot in slots:
                    self.store.unpin(slot)
                    self.store.drop(slot)
        self.adopted.clear()

    def close(self):
        self.server.close()


def _layout(node: NodeShares, slots) -> dict:
    """Where each rank's shard sits in a node snapshot served at group position node.pos."""
    offsets = np.cumsum([0] + [s.used for s in slots]).tolist()
    return {"pos": node.pos, "length": len(node.snapshot), "ranks": [[s.rank, o, s.used] for s, o in zip(slots, offsets)]}


# ------------------------------------------------------------------ the ec_* requests

def _setup(keeper, msg: m.EcSetup) -> m.AddressReply:
    if keeper.exchange is None:
        if msg.plan is None:
            return m.AddressReply(None)
        keeper.exchange = SnapshotExchange(keeper.store, msg.token, msg.port, advertise=msg.advertise,
                                           timeout=msg.timeout)
    return keeper.exchange.configure(msg.plan, msg.token)


def _status(keeper, msg: m.EcStatus) -> m.EcStatusReply:
    if keeper.exchange is None:
        return m.EcStatusReply({}, {}, {}, {}, [], None, None)
    return keeper.exchange.status()


def _rekey(keeper, msg: m.EcRekey) -> m.Done:
    _exchange(keeper).rekey(msg.token)
    return m.Done()


def _ranks(keeper, msg: m.EcRanks) -> m.Done:
    if keeper.exchange is not None:
        keeper.exchange.set_ranks([int(r) for r in msg.ranks])
    return m.Done()


def _exchange(keeper) -> SnapshotExchange:
    if keeper.exchange is None:
        raise ValueError("erasure coding is not set up on this keeper")
    return keeper.exchange


HANDLERS = {
    m.EcSetup: _setup,
    m.EcStatus: _status,
    m.EcRekey: _rekey,
    m.EcRanks: _ranks,
    m.EcRebuild: lambda keeper, msg: _exchange(keeper).rebuild(msg.step),
    m.EcAdopt: lambda keeper, msg: _exchange(keeper).adopt(msg.step, msg.pos),
}
