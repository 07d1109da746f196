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
        self.encoded: set[int] = set()
        self.confirmed = -1  # newest step every peer of the group has encoded too
        self.plan: dict | None = None
        self.clients: dict[int, PeerClient] = {}
        self.last_queued = -1
        self.jobs: queue.Queue = queue.Queue()
        self.server = PeerServer(self, token, host=host, port=port, advertise=advertise, timeout=timeout)
        threading.Thread(target=self._run, name="keeper-ec", daemon=True).start()

    # ------------------------------------------------------------ requests from the trainers

    def configure(self, plan: dict, token: str) -> dict:
        """plan: job, group, pos (this node's position in its group), k, m, peers (pos -> address)."""
        with self.lock:
            old = self.plan
            if old and (old["k"], old["m"], old["pos"], old["group"]) != (plan["k"], plan["m"], plan["pos"], plan["group"]):
                self._drop(list(self.holding))  # another layout: what was coded is meaningless now
            self.plan = plan
            self.server.token = token.encode()
            for c in self.clients.values():
                c.close()
            self.clients = {int(p): PeerClient(a, token, self.timeout) for p, a in plan.get("peers", {}).items()
                            if int(p) != plan["pos"]}
        return {"address": self.server.address}

    def status(self) -> dict:
        """What this keeper holds: complete node snapshots by step (ranks, bytes), parity by
        step, the steps it has finished encoding, and its place in the group."""
        with self.store.cond:
            steps: dict[int, list] = {}
            for s in self.store.slots:
                if s.state == "ready":
                    steps.setdefault(s.step, []).append([s.rank, s.used])
        with self.lock:
            parity = {str(st): n.nbytes for st, n in self.holding.items()}
            layout = {}  # step -> the node snapshot's length and where each rank's slot sits in it
            for st, slots in self.pinned.items():
                offsets = np.cumsum([0] + [s.used for s in slots]).tolist()
                layout[str(st)] = {"length": len(self.holding[st].snapshot),
                                   "ranks": [[s.rank, o, s.used] for s, o in zip(slots, offsets)]}
            plan = None if self.plan is None else {x: self.plan[x] for x in ("group", "pos", "k", "m")}
            return {"steps": {str(k): sorted(v) for k, v in steps.items()}, "parity": parity, "layout": layout,
                    "encoded": sorted(self.encoded), "plan": plan, "address": self.server.address}

    def committed(self, step: int):
        """A local rank committed `step` at L0; encode once all local ranks have."""
        with self.store.cond:
            ranks = self.store.committed
            done = len(ranks) >= self.store.local_world and all(v >= step for v in ranks.values())
        with self.lock:
            if done and step > self.last_queued and self.plan is not None:
                self.last_queued = step
                self.jobs.put(step)

    def rebuild(self, step: int) -> dict:
        """Decode this node's snapshot of `step` from its peers into fresh level-0 slots,
        then re-encode its own parity (in the background) so the group is whole again."""
        t0 = time.perf_counter()
        plan = self.plan
        code = GroupCode(plan["k"], plan["m"])
        data = rebuild_snapshot(code, step, plan["pos"], dict(self.clients))
        (n,) = TRAILER.unpack(data[-TRAILER.size:].tobytes())
        raw = data[-TRAILER.size - n:-TRAILER.size].tobytes()
        meta = json.loads(raw)
        off = 0
        with self.store.cond:
            for r in meta["ranks"]:
                slot = self.store._create(r["rank"], max(r["used"], 1))
                slot.mm[:r["used"]] = data[off:off + r["used"]].tobytes()
                off += r["used"]
                slot.state, slot.step, slot.used, slot.world = "ready", step, r["used"], r["world"]
                slot.entries, slot.records, slot.objects = r["entries"], r["records"], r["objects"]
                self.store.committed[r["rank"]] = step
            self.store.local_world = max(self.store.local_world, len(meta["ranks"]))
        with self.lock:
            self.meta[step] = raw
            self.last_queued = step
            self.jobs.put(step)
        return {"bytes": len(data), "seconds": time.perf_counter() - t0, "ranks": [r["rank"] for r in meta["ranks"]]}

    # ------------------------------------------------------------ ShareSource (served to peers)

    def _node(self, step: int) -> NodeShares:
        with self.lock:
            node = self.holding.get(step)
        if node is None:
            raise ShareError(f"this keeper holds no snapshot of step {step}")
        return node

    def header(self, step: int, codeword: int, index: int) -> ShareHeader:
        return self._node(step).header(step, codeword, index)

    def read(self, step: int, codeword: int, index: int, offset: int, length: int):
        with self.lock:  # copied under the lock: no view of a slot outlives its pin (the keeper closes it then)
            return bytes(self._node(step).read(step, codeword, index, offset, length))

    def held(self) -> list[ShareHeader]:
        with self.lock:
            return [h for node in self.holding.values() for h in node.held()]

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
            slots = sorted((s for s in self.store.slots if s.step == step and s.state == "ready"), key=lambda s: s.rank)
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
        node = self._snapshot(step, plan)
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

    def close(self):
        self.server.close()


def handle(keeper, op: str, msg: dict) -> dict:
    """The keeper's ``ec_*`` requests (called from KeeperServer.handle)."""
    if op == "ec_setup":
        if keeper.exchange is None:
            keeper.exchange = SnapshotExchange(keeper.store, msg["token"], int(msg.get("port", 0)),
                                               advertise=msg.get("advertise", "127.0.0.1"),
                                               timeout=float(msg.get("timeout", 10.0)))
        return {"ok": True, **keeper.exchange.configure(msg["plan"], msg["token"])}
    if keeper.exchange is None:
        return {"ok": True, "steps": {}, "parity": {}, "layout": {}, "encoded": [], "plan": None, "address": None} \
            if op == "ec_status" else {"ok": False, "error": "erasure coding is not set up on this keeper"}
    if op == "ec_status":
        return {"ok": True, **keeper.exchange.status()}
    if op == "ec_rebuild":
        return {"ok": True, **keeper.exchange.rebuild(int(msg["step"]))}
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
        self.groups = plan_groups(self.nodes, cfg.k, cfg.m, cfg.target_survival, cfg.node_failure)
        self.slot_of_node: dict[int, int] = {}
        self.status: list[dict] = []

    def _gather_status(self) -> list[dict]:
        """Every node's keeper status, by node index (only lead ranks report)."""
        st = self.keeper.call("ec_status") if self.lead else None
        st = {"node": self.node, **st} if st else None
        out = [None] * self.nodes
        for g in dist_utils.all_gather_object(st):
            if g is not None:
                out[g["node"]] = g
        return out

    def setup(self):
        """Give every node's keeper its place in a group (a keeper that survived a restart
        keeps its place; empty ones take the places left), the peer token, and its peers'
        addresses through the store. Returns the gathered status."""
        if not self.groups:
            return []
        status = self._gather_status()
        n_slots = sum(len(g.nodes) for g in self.groups)
        slots = {}  # node -> slot (an index over all groups' nodes)
        for node, st in enumerate(status):
            plan = st["plan"]
            if plan is not None and plan["group"] < len(self.groups):
                slot = self.groups[plan["group"]].nodes[plan["pos"]] if plan["pos"] < len(self.groups[plan["group"]].nodes) else None
                if slot is not None and slot not in slots.values():
                    slots[node] = slot
        free = iter(sorted(set(range(n_slots)) - set(slots.values())))
        for node in range(self.nodes):
            if node not in slots:
                slots[node] = next(free)
        self.slot_of_node = slots
        token = self.token = dist_utils.broadcast_object(secrets.token_hex(32) if dist_utils.rank() == 0 else None)
        if self.lead:
            group = next(g for g in self.groups if slots[self.node] in g.nodes)
            pos = group.nodes.index(slots[self.node])
            plan = {"job": self.job, "group": group.id, "pos": pos, "k": group.code.k, "m": group.code.m,
                    "memory_mb": self.cfg.memory_mb}
            reply = self.keeper.call("ec_setup", plan=plan, token=token, port=self.cfg.peer_port,
                                     timeout=self.cfg.peer_timeout_s)
            publish(self.store, self.job, slots[self.node], reply["address"])
        dist_utils.barrier()
        if self.lead:
            plan["peers"] = {i: lookup(self.store, self.job, slot, self.cfg.peer_timeout_s)
                             for i, slot in enumerate(group.nodes)}
            self.keeper.call("ec_setup", plan=plan, token=token, port=self.cfg.peer_port,
                             timeout=self.cfg.peer_timeout_s)
        dist_utils.barrier()
        self.status = status
        return status

    def recover(self) -> dict:
        """Before loading: rebuild the snapshots of nodes whose keepers are empty from their
        peers' shares, when the newest step every other node holds is coded everywhere and
        no group lost more than m nodes. Returns {"step", "rebuilt": [nodes], "seconds"}
        or {} when nothing was (or could be) rebuilt; collective."""
        status = self.status or self._gather_status()
        held = [{int(s) for s in st["steps"]} for st in status]
        encoded = [set(st["encoded"]) for st in status]
        lost = [i for i, h in enumerate(held) if not h]
        if not lost or not self.groups:
            return {}
        by_slot = {self.slot_of_node.get(i, i): i for i in range(self.nodes)}
        candidates = sorted(set.union(*held), reverse=True)
        for step in candidates:
            ok = True
            for g in self.groups:
                members = [by_slot[s] for s in g.nodes]
                gone = [i for i in members if step not in held[i]]
                if len(gone) > g.code.m or any(step not in encoded[i] for i in members if i not in gone):
                    ok = False
            if ok and all(step in held[i] or i in lost for i in range(self.nodes)):
                break
        else:
            return {"step": None, "lost": lost}
        t0 = time.perf_counter()
        error = None
        if self.lead and self.node in lost:
            try:
                self.keeper.call("ec_rebuild", step=step)
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
            layout = st["layout"].get(str(step)) if node != self.node else None
            if layout is None:
                continue
            client = PeerClient(st["address"], self.token, self.cfg.peer_timeout_s)
            code = GroupCode(st["plan"]["k"], st["plan"]["m"])
            for rank, offset, used in layout["ranks"]:
                out[SHARD.format(rank)] = RemoteShard(client, step, code, st["plan"]["pos"], layout["length"],
                                                      offset, used)
        return out

    def restore(self, ckpt, state: dict, optional=lambda name: False):
        """Restore `state` with `ckpt` (a Checkpointer) from the fastest place that has the
        newest complete step, rebuilding lost nodes' snapshots first; logs one line saying
        from where, which step and how long. Collective; returns ckpt.restore's result."""
        t0 = time.perf_counter()
        self.setup()
        rebuilt = self.recover() if self.groups else {}
        if rebuilt.get("step") is not None:
            self.status = self._gather_status()
        ckpt.l0_remote = self.remote_readers
        got = ckpt.restore(state, optional)
        level = getattr(ckpt, "restored_from", None)
        took = time.perf_counter() - t0
        if got is None:
            line = "no snapshot or checkpoint to restore; starting fresh"
        elif level == "l0" and rebuilt.get("step") == got[0]:
            line = (f"recovered step {got[0]} from memory via EC rebuild of node(s) {rebuilt['rebuilt']} "
                    f"in {took:.2f} s")
        elif level == "l0":
            line = f"recovered step {got[0]} from memory (node keepers) in {took:.2f} s"
        else:
            why = f" (nodes {rebuilt['lost']} lost, more than the code tolerates or no coded step)" \
                if rebuilt.get("lost") else ""
            line = f"recovered step {got[0]} from disk {level.upper()}{why} in {took:.2f} s"
        log.info("%s", line)
        if dist_utils.rank() == 0:
            print(f"kintsugi: {line}", flush=True)
        self.recovery = {"line": line, "level": level, "step": got and got[0], "seconds": took,
                         "rebuilt": rebuilt.get("rebuilt", [])}
        return got


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

