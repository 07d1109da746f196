"""Erasure-coded snapshots across node keepers (REFT): the keeper side and the trainer side.

Keeper side (``SnapshotExchange``, one per node keeper): once every local rank's snapshot
of step S is committed at level 0, the node snapshot (all local ranks' shared-memory slots
back to back, then a JSON trailer with their metadata, without copying) is protected in
the background: the keeper reads its codewords' data shares from its group's peer keepers
over TCP (checkpoint.peers), computes its m parity shares (checkpoint.erasure) and serves
its own shares to them. Double-buffered: the previous step's data (its slots stay pinned)
and parity are dropped only after every peer of the group has encoded S, so a keeper
killed mid-encode or mid-transfer leaves the previous complete step decodable.

Trainer side (``EcSnapshots``): publishes the keepers' addresses in the job's store,
decides at restart what to restore from: L0 memory when every node's keeper still holds
the newest complete step; an EC rebuild of the nodes whose keepers are empty (at most m per
group) from their peers' shares; else the newest disk checkpoint (L1/L2), and logs that
choice as one line. All ranks agree on the step before loading; shards held by other
nodes' keepers are read over TCP (``remote_readers``).

Elastic shrink: when torchrun restarts the job on fewer nodes (``--nnodes MIN:MAX``), a
survivor of each lost node's group rebuilds that node's snapshot and serves it in its place
(``SnapshotExchange.adopt``); the smaller world loads the old world's step resharded (the
Checkpointer reads chunks by overlap), then the keepers take places in a new layout with a
code re-chosen for the nodes left (``fit_code``).
"""
from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import struct
import threading
import time
import zlib

import numpy as np
import torch

from checkpoint.erasure import GroupCode, NodeShares, ShareError, ShareHeader, plan_groups, rebuild_snapshot
from checkpoint.format import TORCH_DTYPES, CorruptCheckpoint
from checkpoint.peers import PeerClient, PeerError, PeerServer, lookup, publish
from checkpoint.snapshot_config import SnapshotConfig
from checkpoint.store import SHARD
from comms import dist_utils

log = logging.getLogger(__name__)

TRAILER = struct.Struct("<Q")  # length of the metadata JSON, the node snapshot's last 8 bytes
LAYOUT = ("group", "pos", "k", "m", "nodes", "nodes_total")  # a keeper's place; another one drops what it coded


# ============================================================================ keeper side

class SnapshotExchange:
    """Lives in the node keeper; `store` is its SnapshotStore (level-0 slots)."""

    def __init__(self, store, token: str, port: int = 0, host: str = "", advertise: str = "127.0.0.1",
                 timeout: float = 10.0):
        self.store, self.timeout = store, timeout
        self.lock = threading.RLock()
        self.holding: dict[int, NodeShares] = {}  # step -> what this node serves at that step
        self.pinned: dict[int, list] = {}  # step -> slots kept alive for it
        self.meta: dict[int, bytes] = {}  # step -> metadata trailer of a rebuilt snapshot (kept verbatim)
        # step -> [(shares, slots)] of lost nodes' snapshots this keeper rebuilt and serves in
        # their place (elastic shrink), until the job's next layout
        self.adopted: dict[int, list[tuple[NodeShares, list]]] = {}
        self.ranks: set[int] | None = None  # the global ranks now on this node (None: every rank seen)
        self.encoded: set[int] = set()
        self.confirmed = -1  # newest step every peer of the group has encoded too
        self.plan: dict | None = None
        self.clients: dict[int, PeerClient] = {}
        self.last_queued = -1
        self.jobs: queue.Queue = queue.Queue()
        self.server = PeerServer(self, token, host=host, port=port, advertise=advertise, timeout=timeout)
        threading.Thread(target=self._run, name="keeper-ec", daemon=True).start()

    # ------------------------------------------------------------ requests from the trainers

    def configure(self, plan: dict | None, token: str) -> dict:
        """plan: job, group, pos (this node's position in its group), k, m, nodes (the group's
        node slots), nodes_total, peers (pos -> address); None turns erasure coding off."""
        with self.lock:
            if self.plan and (plan is None or any(self.plan.get(x) != plan.get(x) for x in LAYOUT)):
                self._drop(list(self.holding))  # another layout: what was coded is meaningless now
                self._release_adopted()
            self.plan = plan
            self._connect(token)
        return {"address": self.server.address}

    def rekey(self, token: str):
        """Keep this node's place, with the token of the job's new attempt."""
        with self.lock:
            self._connect(token)

    def _connect(self, token: str):
        self.server.token = token.encode()
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
            self._release_stale()

    def status(self) -> dict:
        """What this keeper holds: complete node snapshots by step (ranks, bytes), parity by
        step, the steps it has finished encoding, and its place in the group."""
        with self.store.cond:
            steps: dict[int, list] = {}
            worlds: dict[str, int] = {}  # step -> the world size that saved it
            for s in self.store.slots:
                if s.state == "ready":
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
            return {"steps": {str(k): sorted(v) for k, v in steps.items()}, "worlds": worlds, "parity": parity,
                    "layout": layout, "encoded": sorted(self.encoded), "plan": plan, "address": self.server.address}

    def committed(self, step: int):
        """A local rank committed `step` at L0; encode once all local ranks have."""
        with self.store.cond:
            ranks = self.store.committed if self.ranks is None else self.ranks
            done = len(ranks) >= self.store.local_world and all(self.store.committed.get(r, -1) >= step for r in ranks)
        with self.lock:
            if done and step > self.last_queued and self.plan is not None:
                self.last_queued = step
                self.jobs.put(step)

    def rebuild(self, step: int) -> dict:
        """Decode this node's snapshot of `step` from its peers into fresh level-0 slots,
        then re-encode its own parity (in the background) so the group is whole again."""
        t0 = time.perf_counter()
        plan = self.plan
        data = rebuild_snapshot(GroupCode(plan["k"], plan["m"]), step, plan["pos"], dict(self.clients))
        raw, ranks, slots = self._install(step, data)
        with self.store.cond:
            for slot in slots:
                self.store.committed[slot.rank] = step
            self.store.local_world = max(self.store.local_world, len(slots))
        with self.lock:
            self.meta[step] = raw
        self._snapshot(step, plan)  # its data shares are served at once (peers read restored shards)
        with self.lock:
            self.last_queued = step
            self.jobs.put(step)
        return {"bytes": len(data), "seconds": time.perf_counter() - t0, "ranks": ranks}

    def adopt(self, step: int, pos: int) -> dict:
        """Rebuild the snapshot of the node at group position `pos`, lost for good (the job
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
        with self.store.cond:
            for slot in slots:
                slot.pins += 1  # no trainer of this node may reuse them
        node = NodeShares(plan["job"], step, plan["group"], plan["pos"], pos, own.code,
                          [(s.mm, s.used) for s in slots] + [raw + TRAILER.pack(len(raw))])
        with self.lock:
            self.adopted.setdefault(step, []).append((node, slots))
        took = time.perf_counter() - t0
        log.info("rebuilt the snapshot of lost group position %d at step %d (ranks %s, %d bytes) in %.3f s; serving it",
                 pos, step, ranks, len(node.snapshot), took)
        return {"bytes": len(node.snapshot), "seconds": took, "ranks": ranks}

    def _install(self, step: int, data) -> tuple[bytes, list[int], list]:
        """Ready level-0 slots of `step` from a decoded node snapshot (its ranks' shards back
        to back, then the metadata trailer): (the trailer's JSON, the ranks, the slots)."""
        (n,) = TRAILER.unpack(data[-TRAILER.size:].tobytes())
        raw = data[-TRAILER.size - n:-TRAILER.size].tobytes()
        off, slots = 0, []
        with self.store.cond:
            for r in json.loads(raw)["ranks"]:
                slot = self.store._create(r["rank"], max(r["used"], 1))
                slot.mm[:r["used"]] = data[off:off + r["used"]].tobytes()
                off += r["used"]
                slot.state, slot.step, slot.used, slot.world = "ready", step, r["used"], r["world"]
                slot.entries, slot.records, slot.objects = r["entries"], r["records"], r["objects"]
                slots.append(slot)
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
        with self.lock:  # copied under the lock: no view of a slot outlives its pin (the keeper closes it then)
            return bytes(self._source(step, codeword, index).read(step, codeword, index, offset, length))

    def held(self) -> list[ShareHeader]:
        with self.lock:
            nodes = [*self.holding.values(), *(n for entries in self.adopted.values() for n, _ in entries)]
            return [h for node in nodes for h in node.held()]

    # ------------------------------------------------------------ the encoding thread

    def _run(self):
        while True:
            step = self.jobs.get()
            while not self.jobs.empty():  # only the newest step matters
                step = max(step, self.jobs.get())
            try:
                self._encode(step)
            except Exception as e:  # a dead or lying peer: keep the previous step, try the next one
                log.warning("snapshot of step %d not erasure-coded: %s; the previous coded step stays", step, e)
                with self.lock:
                    if step not in self.encoded:
                        self._drop([step])

    def _snapshot(self, step: int, plan: dict) -> NodeShares | None:
        with self.store.cond:
            slots = sorted((s for s in self.store.slots if s.step == step and s.state == "ready"
                            and (self.ranks is None or s.rank in self.ranks)), key=lambda s: s.rank)
            if len(slots) < self.store.local_world:
                return None  # already replaced by a newer step
            for s in slots:
                s.pins += 1
        meta = self.meta.get(step) or json.dumps({"step": step, "ranks": [
            {"rank": s.rank, "used": s.used, "world": s.world, "entries": s.entries, "records": s.records,
             "objects": s.objects} for s in slots]}, separators=(",", ":")).encode()
        node = NodeShares(plan["job"], step, plan["group"], plan["pos"], plan["pos"], GroupCode(plan["k"], plan["m"]),
                          [(s.mm, s.used) for s in slots] + [meta + TRAILER.pack(len(meta))])
        with self.lock:
            self.holding[step], self.pinned[step] = node, slots
        return node

    def _encode(self, step: int):
        plan = self.plan
        with self.lock:
            node = self.holding.get(step)  # a rebuilt step is served before it is coded
        node = node or self._snapshot(step, plan)
        if node is None:
            return
        need = plan["m"] * -(-len(node.snapshot) // plan["k"])
        with self.lock:
            held = sum(n.nbytes for s, n in self.holding.items() if s == self.confirmed)
        if held + need > plan.get("memory_mb", 1 << 20) << 20:
            log.warning("snapshot.memory_mb=%d is too small for %d MiB of parity (with the %d MiB kept for "
                        "step %d): step %d is not erasure-coded; raise snapshot.memory_mb",
                        plan["memory_mb"], need >> 20, held >> 20, self.confirmed, step)
            with self.lock:
                self._drop([step])
            return
        readers = {**self.clients, plan["pos"]: node}
        code = node.code
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout
        for c, s in code.parity_roles(plan["pos"]):  # wait until the peers hold step's data
            for j in range(code.k):
                reader = readers[code.holder(c, j)]
                while True:
                    try:
                        reader.header(step, c, j)
                        break
                    except PeerError:
                        raise
                    except ShareError:
                        if self.jobs.qsize() or any(h.step > step for h in reader.held()):
                            log.info("step %d superseded by a newer snapshot before it was coded", step)
                            with self.lock:
                                self._drop([step])
                            return
                        if time.monotonic() > deadline:
                            raise
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
        """Whether every peer has encoded `step` (waits up to the timeout). A peer that died
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
            for slot in self.pinned.pop(step, []):
                self.store.unpin(slot)
        self._release_stale()

    def _release_adopted(self):
        with self.store.cond:
            for entries in self.adopted.values():
                for _, slots in entries:
                    for slot in slots:
                        slot.pins -= 1
                        self.store._drop(slot)
        self.adopted.clear()

    def _release_stale(self):
        """Free the slots of ranks no longer on this node once nothing reads them."""
        if self.ranks is None:
            return
        with self.store.cond:
            for slot in [s for s in self.store.slots if s.rank not in self.ranks and s.pins == 0
                         and s.state in ("ready", "free")]:
                self.store._drop(slot)
            self.store.committed = {r: v for r, v in self.store.committed.items() if r in self.ranks}

    def close(self):
        self.server.close()


def _layout(node: NodeShares, slots) -> dict:
    """Where each rank's shard sits in a node snapshot served at group position node.pos."""
    offsets = np.cumsum([0] + [s.used for s in slots]).tolist()
    return {"pos": node.pos, "length": len(node.snapshot), "ranks": [[s.rank, o, s.used] for s, o in zip(slots, offsets)]}


def handle(keeper, op: str, msg: dict) -> dict:
    """The keeper's ``ec_*`` requests (called from KeeperServer.handle)."""
    if op == "ec_setup":
        if keeper.exchange is None:
            if msg["plan"] is None:
                return {"ok": True, "address": None}
            keeper.exchange = SnapshotExchange(keeper.store, msg["token"], int(msg.get("port", 0)),
                                               advertise=msg.get("advertise", "127.0.0.1"),
                                               timeout=float(msg.get("timeout", 10.0)))
        return {"ok": True, **keeper.exchange.configure(msg["plan"], msg["token"])}
    if keeper.exchange is None:
        if op == "ec_ranks":
            return {"ok": True}
        return {"ok": True, "steps": {}, "worlds": {}, "parity": {}, "layout": {}, "encoded": [], "plan": None,
                "address": None} if op == "ec_status" else {"ok": False, "error": "erasure coding is not set up on this keeper"}
    ex = keeper.exchange
    if op == "ec_status":
        return {"ok": True, **ex.status()}
    if op == "ec_rekey":
        ex.rekey(msg["token"])
        return {"ok": True}
    if op == "ec_ranks":
        ex.set_ranks([int(r) for r in msg["ranks"]])
        return {"ok": True}
    if op == "ec_rebuild":
        return {"ok": True, **ex.rebuild(int(msg["step"]))}
    if op == "ec_adopt":
        return {"ok": True, **ex.adopt(int(msg["step"]), int(msg["pos"]))}
    raise ValueError(f"unknown keeper request {op!r}")


# ============================================================================ trainer side

def node_index() -> tuple[int, int]:
    """(this node's index, number of nodes) from torchrun's environment."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist_utils.world_size()))
    world = dist_utils.world_size()
    return int(os.environ.get("GROUP_RANK", dist_utils.rank() // local_world)), max(1, world // local_world)


class EcSnapshots:
    """The trainer side of erasure-coded snapshots; collective calls on every rank.

    `keeper` is this rank's KeeperClient, `store` the job's torch.distributed store.
    """

    def __init__(self, cfg: SnapshotConfig, keeper, store, job: str):
        cfg.validate()
        self.cfg, self.keeper, self.store, self.job = cfg, keeper, store, job
        self.node, self.nodes = node_index()
        self.lead = dist_utils.local_rank() == 0  # one rank per node talks to its keeper about EC
        self.groups = plan_groups(self.nodes, *fit_code(cfg.k, cfg.m, self.nodes), cfg.target_survival, cfg.node_failure)
        self.slot_of_node: dict[int, int] = {}
        self.status: list[dict] = []
        self.token = ""

    def _gather_status(self) -> list[dict]:
        """Every node's keeper status, by node index (only lead ranks report)."""
        st = self.keeper.call("ec_status") if self.lead else None
        st = {"node": self.node, **st} if st else None
        out = [None] * self.nodes
        for g in dist_utils.all_gather_object(st):
            if g is not None:
                out[g["node"]] = g
        return out

    def setup(self, status: list[dict], keep_places: bool = True):
        """Give every node's keeper its place in a group (with `keep_places`, a keeper that
        survived a restart keeps its place; empty ones take the places left), the peer
        token, and its peers' addresses through the store. Too few nodes for any parity:
        coding is turned off."""
        if not self.groups:
            if self.lead and status[self.node]["plan"] is not None:
                self.keeper.call("ec_setup", plan=None, token=self.token)
            return
        n_slots = sum(len(g.nodes) for g in self.groups)
        slots = {}  # node -> slot (an index over all groups' nodes)
        for node, st in enumerate(status):
            plan = st["plan"]
            if keep_places and plan is not None and plan["group"] < len(self.groups):
                slot = self.groups[plan["group"]].nodes[plan["pos"]] if plan["pos"] < len(self.groups[plan["group"]].nodes) else None
                if slot is not None and slot not in slots.values():
                    slots[node] = slot
        free = iter(sorted(set(range(n_slots)) - set(slots.values())))
        for node in range(self.nodes):
            if node not in slots:
                slots[node] = next(free)
        self.slot_of_node = slots
        if self.lead:
            group = next(g for g in self.groups if slots[self.node] in g.nodes)
            plan = {"job": self.job, "group": group.id, "pos": group.nodes.index(slots[self.node]), "k": group.code.k,
                    "m": group.code.m, "nodes": list(group.nodes), "nodes_total": self.nodes, "memory_mb": self.cfg.memory_mb}
            reply = self.keeper.call("ec_setup", plan=plan, token=self.token, port=self.cfg.peer_port,
                                     timeout=self.cfg.peer_timeout_s)
            publish(self.store, self.job, slots[self.node], reply["address"])
        dist_utils.barrier()
        if self.lead:
            plan["peers"] = {i: lookup(self.store, self.job, slot, self.cfg.peer_timeout_s)
                             for i, slot in enumerate(group.nodes)}
            self.keeper.call("ec_setup", plan=plan, token=self.token, port=self.cfg.peer_port,
                             timeout=self.cfg.peer_timeout_s)
        dist_utils.barrier()

    def recover(self, status: list[dict], adopt: bool) -> dict:
        """Before loading: rebuild the snapshots of the nodes lost since the keepers' last
        layout (their keepers are empty, or gone for good), from the survivors' shares, when
        no group lost more than m nodes and the newest step every survivor holds is coded
        by every survivor of the groups that lost one. The node that took a lost node's place
        rebuilds it into its empty keeper; with `adopt` (the job shrank: nobody took it) a
        survivor of its group rebuilds it and serves it. Returns {"step", "rebuilt": [lost
        nodes], "seconds"}, {"step": None, "lost"} when it cannot, or {} when no node was
        lost; collective."""
        groups, total = old_layout(status)
        present = {g["nodes"][pos] for g in groups.values() for pos in g["members"]}
        lost = sorted(set(range(total)) - present)
        if not lost:
            return {}
        where = {g["nodes"][pos]: (gid, pos) for gid, g in groups.items() for pos in range(len(g["nodes"]))
                 if pos not in g["members"]}
        hit = {gid for gid, _ in where.values()}
        survivors = [node for g in groups.values() for node in g["members"].values()]
        held = [{int(s) for s in st["steps"]} for st in status]
        coded = [set(st["encoded"]) for st in status]
        step = None
        if set(lost) <= set(where) and all(sum(gid == g for g, _ in where.values()) <= groups[gid]["m"] for gid in hit):
            common = set.intersection(*(held[i] for i in survivors))
            step = max((s for s in common if all(s in coded[i] for gid in hit for i in groups[gid]["members"].values())),
                       default=None)
        if step is None:
            return {"step": None, "lost": lost}
        t0 = time.perf_counter()
        jobs = []  # (op, group position) this node's keeper rebuilds
        for j, slot in enumerate(lost):
            gid, pos = where[slot]
            if adopt:
                members = sorted(groups[gid]["members"].values())
                if members[j % len(members)] == self.node:
                    jobs.append(("ec_adopt", pos))
            elif self.slot_of_node.get(self.node) == slot:
                jobs.append(("ec_rebuild", pos))
        error = None
        if self.lead:
            try:
                for op, pos in jobs:
                    self.keeper.call(op, step=step, pos=pos)
            except RuntimeError as e:
                error = str(e)
        errors = [e for e in dist_utils.all_gather_object(error) if e]
        if errors:
            log.warning("EC rebuild of step %d failed: %s", step, errors[0])
            return {"step": None, "lost": lost, "error": errors[0]}
        return {"step": step, "rebuilt": lost, "seconds": time.perf_counter() - t0}

    def remote_readers(self, step: int) -> dict:
        """ShardReader-likes for `step`'s shards held in other nodes' keepers (read over TCP)."""
        out = {}
        for node, st in enumerate(self.status):
            served = st["layout"].get(str(step), []) if node != self.node else []
            if not served:
                continue
            client = PeerClient(st["address"], self.token, self.cfg.peer_timeout_s)
            code = GroupCode(st["plan"]["k"], st["plan"]["m"])
            for snap in served:
                for rank, offset, used in snap["ranks"]:
                    out[SHARD.format(rank)] = RemoteShard(client, step, code, snap["pos"], snap["length"], offset, used)
        return out

    def restore(self, ckpt, state: dict, optional=lambda name: False):
        """Restore `state` with `ckpt` (a Checkpointer) from the fastest place that has the
        newest complete step, rebuilding lost nodes' snapshots first; logs one line saying
        from where, which step and how long. Collective; returns ckpt.restore's result.

        When the job now runs on fewer (or more) nodes than the keepers' last layout (an
        elastic restart), the survivors keep their old places until the old world's step is
        restored (resharded onto this one: chunks are read by overlap), then every keeper
        takes its place in the new layout; the old coded steps are dropped then."""
        t0 = time.perf_counter()
        status = self._gather_status()
        self.token = dist_utils.broadcast_object(secrets.token_hex(32) if dist_utils.rank() == 0 else None)
        reshaped = old_layout(status)[1] not in (0, self.nodes)
        if reshaped:
            if self.lead and status[self.node]["plan"] is not None:
                self.keeper.call("ec_rekey", token=self.token)
            dist_utils.barrier()
        else:
            self.setup(status)
        self.status = status
        rebuilt = self.recover(status, adopt=reshaped)
        if rebuilt.get("step") is not None:
            self.status = self._gather_status()
        ckpt.l0_remote = self.remote_readers
        got = ckpt.restore(state, optional)
        if reshaped:
            self.setup(self.status, keep_places=False)
        nodes_of = dist_utils.all_gather_object(self.node)
        if self.lead:
            self.keeper.call("ec_ranks", ranks=[r for r, n in enumerate(nodes_of) if n == self.node])
        took = time.perf_counter() - t0
        line, level, world, was = self._line(got, getattr(ckpt, "restored_from", None), rebuilt, took)
        self._say(line)
        if reshaped:
            self._say(f"snapshots are now erasure-coded over {self.nodes} nodes: "
                      + ", ".join(f"group {g.id}: {len(g.nodes)} nodes, k={g.code.k}, m={g.code.m}" for g in self.groups)
                      if self.groups else
                      f"{self.nodes} node left: snapshots are no longer erasure-coded (no other node to hold parity); "
                      "they stay in this node's memory and go to disk at checkpoint.l1_interval/l2_interval")
        self.recovery = {"line": line, "level": level, "step": got and got[0], "seconds": took,
                         "rebuilt": rebuilt.get("rebuilt", []), "world": world, "was": was}
        return got

    def _line(self, got, level: str | None, rebuilt: dict, took: float):
        """The recovery's log line: (line, level, world now, world that saved the step)."""
        world = dist_utils.world_size()
        was = next((st["worlds"][str(got[0])] for st in self.status if got and str(got[0]) in st["worlds"]), world)
        onto = f" onto {world} ranks (was {was})" if was != world else ""
        if got is None:
            line = "no snapshot or checkpoint to restore; starting fresh"
        elif level == "l0" and rebuilt.get("step") == got[0]:
            line = f"recovered step {got[0]} from memory via EC rebuild of node(s) {rebuilt['rebuilt']}{onto} in {took:.2f} s"
        elif level == "l0":
            line = f"recovered step {got[0]} from memory (node keepers){onto} in {took:.2f} s"
        else:
            why = f" (nodes {rebuilt['lost']} lost, more than the code tolerates or no coded step)" \
                if rebuilt.get("lost") else ""
            line = f"recovered step {got[0]} from disk {level.upper()}{why} in {took:.2f} s"
        return line, level, world, was

    @staticmethod
    def _say(line: str):
        log.info("%s", line)
        if dist_utils.rank() == 0:
            print(f"kintsugi: {line}", flush=True)


def fit_code(k: int, m: int, nodes: int) -> tuple[int, int]:
    """The configured k/m, or, when fewer nodes run the job than k + m (an elastic job
    that shrank), as many parity shares as still fit with the other nodes as data."""
    if not k or k + m <= nodes or nodes < 2:
        return k, m
    m2 = min(m, nodes - 1)
    log.warning("snapshot.k=%d, snapshot.m=%d need %d nodes, the job has %d: coding with k=%d, m=%d",
                k, m, k + m, nodes, nodes - m2, m2)
    return nodes - m2, m2


def old_layout(status: list[dict]) -> tuple[dict, int]:
    """The groups the keepers were placed in before this restart, from their plans:
    group id -> {"m", "nodes" (node slots by position), "members" {position: node index
    now}}, and how many nodes that layout had (0: none was placed)."""
    groups, total = {}, 0
    for node, st in enumerate(status):
        plan = st["plan"]
        if plan is not None:
            g = groups.setdefault(plan["group"], {"m": plan["m"], "nodes": plan["nodes"], "members": {}})
            g["members"][plan["pos"]] = node
            total = max(total, plan["nodes_total"])
    return groups, total


class RemoteShard:
    """One rank's shard inside another node's snapshot, read over TCP through that node's
    data shares (same interface as checkpoint.format.ShardReader)."""

    def __init__(self, client: PeerClient, step: int, code: GroupCode, pos: int, length: int, offset: int, used: int):
        self.client, self.step, self.code, self.pos, self.offset, self.size = client, step, code, pos, offset, used
        self.blocks = code.blocks(length)
        self.path = f"{client.address}/step{step}/{offset}"
        try:
            (n,) = struct.unpack("<Q", self._range(0, 8))
            self.header = json.loads(self._range(8, n))
        except (ShareError, struct.error, ValueError) as e:
            raise CorruptCheckpoint(f"snapshot shard at {self.path} is unreadable ({e})") from None
        self.data_start = 8 + n

    def _range(self, lo: int, n: int) -> bytes:
        """Bytes [lo, lo + n) of this shard: the node snapshot's data blocks it spans."""
        lo += self.offset
        out = bytearray()
        for b, (start, length) in enumerate(self.blocks):
            a, z = max(lo, start), min(lo + n, start + length)
            if a < z:
                c, s = self.code.data_share(self.pos, b)
                out += self.client.read(self.step, c, s, a - start, z - a)
        return bytes(out)

    def read(self, key: str, crc: int | None = None) -> torch.Tensor:
        meta = self.header.get(key)
        if meta is None:
            raise CorruptCheckpoint(f"shard {self.path} has no tensor {key!r}")
        lo, hi = meta["data_offsets"]
        try:
            raw = self._range(self.data_start + lo, hi - lo)
        except ShareError as e:
            raise CorruptCheckpoint(f"shard {self.path}: {e}") from None
        if crc is not None and zlib.crc32(raw) != crc:
            raise CorruptCheckpoint(f"checksum mismatch for {key!r} in {self.path}")
        return torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).view(TORCH_DTYPES[meta["dtype"]]) \
            .reshape(meta["shape"])


# ============================================================================ inspection

def inspect_keeper(run_dir, job: str, node_id: str | None = None) -> dict:
    """What one node keeper of `job` on this machine holds (for ``kintsugi ckpt inspect``):
    level-0 snapshots by step (ranks, bytes) and its erasure coding (group, position, k, m,
    coded steps, parity bytes, share server address). Raises UserError if none answers."""
    from pathlib import Path

    from checkpoint.keeper import KeeperAddress, KeeperClient
    from comms import UserError

    addr = KeeperAddress.of(run_dir, job, node_id)
    try:
        client = KeeperClient(addr.sock, Path(addr.token_file).read_text().strip(), rank=-1)
    except (OSError, ConnectionError, RuntimeError) as e:
        raise UserError(f"no node keeper of job {job!r} answers for {run_dir} on this machine ({e}); "
                        "is the job running (and KINTSUGI_NODE_ID / --node-id right)?") from None
    try:
        snaps = client.call("snapshots")["snapshots"]
        ec = client.call("ec_status")
    finally:
        client.close()
    steps: dict[int, dict] = {}
    for x in snaps:
        s = steps.setdefault(x["step"], {"ranks": [], "world": x["world"]})
        s["ranks"].append(x["rank"])
    return {"job": job, "node_id": node_id, "keeper_pid": client.pid, "l0": steps,
            "ec": {k: ec[k] for k in ("plan", "encoded", "parity", "address")}}


def format_keeper(report: dict) -> str:
    lines = [f"keeper of job {report['job']} (pid {report['keeper_pid']})"]
    for step, s in sorted(report["l0"].items()):
        lines.append(f"  L0 step {step}: ranks {sorted(s['ranks'])} of {s['world']}")
    ec = report["ec"]
    if ec["plan"] is None:
        lines.append("  erasure coding: not set up")
    else:
        p = ec["plan"]
        lines.append(f"  erasure coding: group {p['group']} position {p['pos']} (k={p['k']}, m={p['m']}), "
                     f"shares served at {ec['address']}")
        for step, nbytes in sorted(ec["parity"].items(), key=lambda kv: int(kv[0])):
            coded = "coded" if int(step) in ec["encoded"] else "coding"
            lines.append(f"  EC step {step}: {coded}, {nbytes} bytes of parity")
    return "\n".join(lines)

