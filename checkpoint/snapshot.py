"""Erasure-coded snapshots across node keepers (REFT), the trainer's side.

The keepers code each node's level-0 snapshot across a group of nodes in the background
(checkpoint/keeper/exchange.py). This side (``EcSnapshots``) places every node's keeper in
a group and publishes the keepers' addresses in the job's store, decides at restart what to
restore from: L0 memory when every node's keeper still holds the newest complete step; an
EC rebuild of the nodes whose keepers are empty (at most m per group) from their peers'
shares; else the newest disk checkpoint (L1/L2), and logs that choice as one line. All
ranks agree on the step before loading; shards held by other nodes' keepers are read over
TCP (``remote_readers``).

Elastic shrink: when torchrun restarts the job on fewer nodes (``--nnodes MIN:MAX``), a
survivor of each lost node's group rebuilds that node's snapshot and serves it in its place;
the smaller world loads the old world's step resharded (the Checkpointer reads chunks by
overlap), then the keepers take places in a new layout with a code re-chosen for the nodes
left (``fit_code``).

Keepers advertise the address of the interface this host uses to reach the job's
rendezvous (``snapshot.advertise`` overrides it: an address or an interface name), so
peers on other hosts reach them.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import time
import zlib
from dataclasses import asdict

import numpy as np
import psutil
import torch

from checkpoint.erasure import GroupCode, ShareError, plan_groups
from checkpoint.format import SHARD, CorruptCheckpoint
from checkpoint.shards import TORCH_DTYPES, check_header
from checkpoint.keeper import KeeperAddress, KeeperClient, PeerClient, lookup, messages as m, publish, read_token
from checkpoint.snapshot_config import SnapshotConfig
from comms import UserError, dist_utils

log = logging.getLogger(__name__)


def advertise_address(spec: str = "") -> str:
    """The address peer keepers reach this node's keeper at: ``spec`` (an address, or the
    name of a network interface), else the address of the interface this host uses to
    reach the rendezvous (MASTER_ADDR; a UDP connect sends nothing)."""
    if spec:
        addrs = psutil.net_if_addrs().get(spec)
        if addrs is None:
            return spec
        ipv4 = [a.address for a in addrs if a.family == socket.AF_INET]
        if not ipv4:
            raise UserError(f"snapshot.advertise={spec!r}: that interface has no IPv4 address; name another one")
        return ipv4[0]
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


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
        self.remote: list[RemoteShard] = []  # readers of other nodes' shards handed to the last restore

    def _gather_status(self) -> list[dict]:
        """Every node's keeper status, by node index (only lead ranks report)."""
        st = asdict(self.keeper.call(m.EcStatus())) if self.lead else None
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
                self.keeper.call(m.EcSetup(None, self.token))
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
            reply = self.keeper.call(self._setup_request(plan))
            publish(self.store, self.job, slots[self.node], reply.address)
        dist_utils.barrier()
        if self.lead:
            plan["peers"] = {i: lookup(self.store, self.job, slot, self.cfg.peer_timeout_s)
                             for i, slot in enumerate(group.nodes)}
            self.keeper.call(self._setup_request(plan))
        dist_utils.barrier()

    def _setup_request(self, plan: dict) -> m.EcSetup:
        return m.EcSetup(plan, self.token, self.cfg.peer_port, self.cfg.peer_timeout_s,
                         advertise_address(self.cfg.advertise))

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
        jobs = []  # the rebuilds this node's keeper does
        for j, slot in enumerate(lost):
            gid, pos = where[slot]
            if adopt:
                members = sorted(groups[gid]["members"].values())
                if members[j % len(members)] == self.node:
                    jobs.append(m.EcAdopt(step, pos))
            elif self.slot_of_node.get(self.node) == slot:
                jobs.append(m.EcRebuild(step, pos))
        error = None
        if self.lead:
            try:
                for job in jobs:
                    self.keeper.call(job)
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
        self.remote += out.values()
        return out

    def _log_remote_reads(self, step: int):
        """Which other nodes' keepers this rank read level-0 bytes from (its log only)."""
        got: dict[str, list] = {}
        for shard in self.remote:
            if shard.nread:
                got.setdefault(shard.client.address, []).append(shard.nread)
        if got:
            log.info("step %d: read level-0 shards over the network: %s", step,
                     ", ".join(f"{sum(n)} bytes in {len(n)} shard(s) from the keeper at {a}" for a, n in got.items()))
        self.remote = []

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
                self.keeper.call(m.EcRekey(self.token))
            dist_utils.barrier()
        else:
            self.setup(status)
        self.status = status
        rebuilt = self.recover(status, adopt=reshaped)
        if rebuilt.get("step") is not None:
            self.status = self._gather_status()
        ckpt.l0_remote = self.remote_readers
        got = ckpt.restore(state, optional, say=False)
        self._log_remote_reads(got[0] if got else -1)
        if reshaped:
            self.setup(self.status, keep_places=False)
        nodes_of = dist_utils.all_gather_object(self.node)
        if self.lead:
            self.keeper.call(m.EcRanks([r for r, n in enumerate(nodes_of) if n == self.node]))
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
        self.nread = 0  # bytes of tensors read through it (the header is not counted)
        self.blocks = code.blocks(length)
        self.path = f"{client.address}/step{step}/{offset}"
        try:
            (n,) = struct.unpack("<Q", self._range(0, 8))
            if not 0 < n <= used - 8:
                raise ValueError(f"header length {n}")
            self.header = json.loads(self._range(8, n))
        except (ShareError, struct.error, ValueError) as e:
            raise CorruptCheckpoint(f"snapshot shard at {self.path} is unreadable ({e})") from None
        check_header(self.header, f"snapshot shard at {self.path}", used - 8 - n)
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
        self.nread += len(raw)
        if crc is not None and zlib.crc32(raw) != crc:
            raise CorruptCheckpoint(f"checksum mismatch for {key!r} in {self.path}")
        return torch.from_numpy(np.frombuffer(raw, np.uint8).copy()).view(TORCH_DTYPES[meta["dtype"]]) \
            .reshape(meta["shape"])


# ============================================================================ inspection

def inspect_keeper(run_dir, job: str, node_id: str | None = None) -> dict:
    """What one node keeper of `job` on this machine holds (for ``kintsugi ckpt inspect``):
    level-0 snapshots by step (ranks, bytes) and its erasure coding (group, position, k, m,
    coded steps, parity bytes, share server address). Raises UserError if none answers."""
    addr = KeeperAddress.of(run_dir, job, node_id)
    try:
        client = KeeperClient(addr.sock, read_token(addr.token_file), rank=-1)
    except (OSError, ConnectionError, RuntimeError) as e:
        raise UserError(f"no node keeper of job {job!r} answers for {run_dir} on this machine ({e}); "
                        "is the job running (and KINTSUGI_NODE_ID / --node-id right)?") from None
    try:
        snaps = client.call(m.Snapshots()).snapshots
        ec = asdict(client.call(m.EcStatus()))
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

