"""The cluster as the placement sees it: nodes, their GPUs and network cards, and fabrics.

A *fabric* is a set of nodes that share one RDMA network (an InfiniBand subnet, a RoCE
network). Nodes of different fabrics reach each other only over Ethernet (TCP sockets),
and so do the nodes of an Ethernet-only fabric. Ranks are numbered node by node, in node
order (torchrun's ``--node-rank``): node i holds the next ``gpus`` global ranks.

A topology comes from a TOML file (``load_topology``, see configs/topology-*.toml) or from
each node's /sys (``detect_local_node``), shared through the rendezvous store
(``gather_topology``) so that every rank sees the whole cluster.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from comms.configlib import read_toml
from comms.errors import UserError

log = logging.getLogger(__name__)

NIC_KINDS = ("ib", "roce", "eth")

# Effective per-NIC bandwidth (Gbit/s) and one-hop latency (µs) when a file does not say.
# They are what NCCL's bus bandwidth reaches on common cards: HDR InfiniBand 200 Gb/s,
# 100 GbE RoCE v2, 25 GbE TCP sockets; NVLink is per GPU inside a node (A100: ~2400 Gb/s).
DEFAULT_GBPS = {"nvlink": 2400.0, "ib": 200.0, "roce": 100.0, "eth": 25.0}
DEFAULT_LATENCY_US = {"nvlink": 3.0, "ib": 5.0, "roce": 8.0, "eth": 40.0}
# AdamW updates per second per GPU, billions of parameters: memory-bound, ~40 bytes moved per
# parameter (fp32 master, two moments, gradient) at ~1.5 TB/s on an A100.
DEFAULT_ADAM_GPS = 30.0


@dataclass(frozen=True)
class Link:
    """What one GPU gets on a path: bandwidth in Gbit/s, per-message latency in µs."""

    kind: str
    gbps: float
    latency_us: float

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8


@dataclass
class Node:
    """One machine: its GPUs, the fabric it belongs to, its fastest NIC kind and speeds."""

    name: str
    gpus: int
    fabric: str
    kind: str  # ib | roce | eth: the NIC kind the fabric runs on
    nics: int  # NICs of that kind
    gbps: float  # per NIC
    eth_gbps: float  # the node's Ethernet, the only path to other fabrics
    tflops: float = 120.0  # achieved TFLOP/s per GPU (bf16 at ~40% MFU on an A100)
    adam_gps: float = DEFAULT_ADAM_GPS  # optimizer updates per second per GPU, billions of parameters

    def __post_init__(self):
        if self.kind not in NIC_KINDS:
            raise UserError(f"node {self.name!r}: NIC kind {self.kind!r} is unknown; use one of {', '.join(NIC_KINDS)}")
        for name in ("gpus", "nics", "gbps", "eth_gbps", "tflops", "adam_gps"):
            if not getattr(self, name) > 0:
                raise UserError(f"node {self.name!r}: {name} must be positive (got {getattr(self, name)!r})")


@dataclass
class Topology:
    """Nodes in node-rank order, plus the latency table."""

    nodes: list[Node]
    latency_us: dict = field(default_factory=lambda: dict(DEFAULT_LATENCY_US))
    nvlink_gbps: float = DEFAULT_GBPS["nvlink"]

    def __post_init__(self):
        names = [n.name for n in self.nodes]
        if not names:
            raise UserError("topology has no nodes; declare at least one [[fabric]] with nodes")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise UserError(f"topology: node name {dup!r} appears twice; give every node its own name")
        for n in self.nodes:
            kinds = {m.kind for m in self.nodes if m.fabric == n.fabric}
            if len(kinds) > 1:
                raise UserError(f"topology: fabric {n.fabric!r} mixes NIC kinds {sorted(kinds)}; one fabric is one RDMA network, split it")
        self._node_of_rank = [i for i, n in enumerate(self.nodes) for _ in range(n.gpus)]

    @property
    def world_size(self) -> int:
        return len(self._node_of_rank)

    def node_of(self, rank: int) -> int:
        return self._node_of_rank[rank]

    def ranks_of_node(self, i: int) -> list[int]:
        start = sum(n.gpus for n in self.nodes[:i])
        return list(range(start, start + self.nodes[i].gpus))

    def fabrics(self) -> dict[str, list[int]]:
        """Fabric name -> its node indices, in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, n in enumerate(self.nodes):
            out.setdefault(n.fabric, []).append(i)
        return out

    def fabric_of(self, rank: int) -> str:
        return self.nodes[self.node_of(rank)].fabric

    def group_link(self, ranks) -> Link | None:
        """The slowest path one GPU of this group uses; None for a one-rank group.

        Inside a node: NVLink. Inside an RDMA fabric: the node's RDMA bandwidth shared by its
        GPUs (every GPU of a node talks at once in DP and pipeline traffic). Across fabrics or
        on an Ethernet fabric: the node's Ethernet shared by its GPUs. The slowest node rules.
        """
        ranks = list(ranks)
        if len(ranks) < 2:
            return None
        nodes = sorted({self.node_of(r) for r in ranks})
        if len(nodes) == 1:
            return Link("nvlink", self.nvlink_gbps, self.latency_us["nvlink"])
        fabrics = {self.nodes[i].fabric for i in nodes}
        if len(fabrics) == 1:
            kind = self.nodes[nodes[0]].kind
            gbps = min(self.nodes[i].nics * self.nodes[i].gbps / self.nodes[i].gpus for i in nodes)
            return Link(kind, gbps, self.latency_us[kind])
        gbps = min(self.cross_gbps(self.nodes[i]) / self.nodes[i].gpus for i in nodes)
        return Link("eth", gbps, self.latency_us["eth"])

    @staticmethod
    def cross_gbps(node: Node) -> float:
        """The node's path to other fabrics: its Ethernet (``eth_gbps``); on an Ethernet
        fabric its NICs, or less where the link between the fabrics is slower."""
        return min(node.nics * node.gbps, node.eth_gbps) if node.kind == "eth" else node.eth_gbps

    def homogeneous(self) -> "Topology":
        """The same nodes all on one RDMA fabric with the best fabric's NICs (the baseline)."""
        best = max((n for n in self.nodes if n.kind != "eth"), key=lambda n: n.nics * n.gbps / n.gpus, default=None)
        if best is None:
            best = max(self.nodes, key=lambda n: n.nics * n.gbps / n.gpus)
        per_gpu = best.nics * best.gbps / best.gpus
        nodes = [replace(n, fabric="all", kind=best.kind, nics=n.gpus, gbps=per_gpu) for n in self.nodes]
        return Topology(nodes, dict(self.latency_us), self.nvlink_gbps)

    def with_bandwidth(self, gbps: dict[str, float]) -> "Topology":
        """Override the bandwidth table: ``ib``/``roce`` set the per-NIC speed of those nodes,
        ``eth`` every node's Ethernet (an Ethernet fabric's nodes get one such NIC),
        ``nvlink`` the per-GPU bandwidth inside a node."""
        unknown = set(gbps) - set(DEFAULT_GBPS)
        if unknown or any(not v > 0 for v in gbps.values()):
            raise UserError(f"bandwidth override {gbps}: keys are {', '.join(DEFAULT_GBPS)}, values positive Gbit/s")
        nodes = []
        for n in self.nodes:
            if "eth" in gbps:
                n = replace(n, eth_gbps=gbps["eth"], **({"nics": 1, "gbps": gbps["eth"]} if n.kind == "eth" else {}))
            if n.kind in gbps and n.kind != "eth":
                n = replace(n, gbps=gbps[n.kind])
            nodes.append(n)
        return Topology(nodes, dict(self.latency_us), gbps.get("nvlink", self.nvlink_gbps))


def load_topology(path: str | os.PathLike) -> Topology:
    """Read a topology TOML file (format: configs/topology-ib-roce.toml)."""
    path = Path(path)
    data = read_toml(path, "topology file", "pass --topology with an existing TOML file (e.g. configs/topology-ib-roce.toml)")
    try:
        return topology_from_toml(data)
    except UserError as e:
        raise UserError(f"topology file {str(path)!r}: {e}") from None


def topology_from_toml(data: dict) -> Topology:
    unknown = set(data) - {"cluster", "bandwidth", "latency_us", "fabric"}
    if unknown:
        raise UserError(f"unknown section(s) {sorted(unknown)}; known: [cluster], [bandwidth], [latency_us], [[fabric]]")
    cluster = data.get("cluster", {})
    gbps = {**DEFAULT_GBPS, **_numbers(data.get("bandwidth", {}), "bandwidth")}
    latency = {**DEFAULT_LATENCY_US, **_numbers(data.get("latency_us", {}), "latency_us")}
    fabrics = data.get("fabric", [])
    if not isinstance(fabrics, list) or not fabrics:
        raise UserError("no [[fabric]] tables; declare each fabric with name, kind and nodes")
    nodes = []
    for f in fabrics:
        unknown = set(f) - {"name", "kind", "nodes", "nics", "gbps", "gpus_per_node", "tflops", "eth_gbps"}
        if unknown or "name" not in f or "kind" not in f or "nodes" not in f:
            raise UserError(f"[[fabric]] {f.get('name', '?')!r}: needs name, kind, nodes; optional nics, gbps, gpus_per_node, tflops, eth_gbps (unknown: {sorted(unknown)})")
        kind = f["kind"]
        if kind not in NIC_KINDS:
            raise UserError(f"[[fabric]] {f['name']!r}: kind {kind!r} is unknown; use one of {', '.join(NIC_KINDS)}")
        names = f["nodes"] if isinstance(f["nodes"], list) else [f"{f['name']}-{i}" for i in range(int(f["nodes"]))]
        for name in names:
            nodes.append(Node(
                name=str(name), fabric=str(f["name"]), kind=kind,
                gpus=int(f.get("gpus_per_node", cluster.get("gpus_per_node", 8))),
                nics=int(f.get("nics", 1)),
                gbps=float(f.get("gbps", gbps[kind])),
                eth_gbps=float(f.get("eth_gbps", cluster.get("eth_gbps", gbps["eth"]))),
                tflops=float(f.get("tflops", cluster.get("tflops", 120.0))),
            ))
    order = cluster.get("order")
    if order is not None:
        by_name = {n.name: n for n in nodes}
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(by_name):
            raise UserError("[cluster] order must list every node name exactly once (node-rank order)")
        nodes = [by_name[str(name)] for name in order]
    return Topology(nodes, latency, gbps["nvlink"])


def _numbers(table: dict, section: str) -> dict:
    out = {}
    for key, value in table.items():
        if key not in DEFAULT_GBPS or not isinstance(value, (int, float)) or value <= 0:
            raise UserError(f"[{section}] {key} = {value!r}: keys are {', '.join(DEFAULT_GBPS)}, values positive numbers")
        out[key] = float(value)
    return out


@dataclass
class Interface:
    """One network interface of this machine, as /sys and the kernel describe it."""

    name: str
    addr: str | None  # its IPv4 address
    mbit: float | None  # ``speed`` in /sys (Mb/s); None where the driver reports none
    physical: bool  # a NIC (``device`` link in /sys), not a bridge, veth or tunnel
    alias: str = ""  # ``ifalias``: ``fabric=NAME`` names the fabric this interface is on


def interfaces(sysfs: str | os.PathLike = "/sys") -> list[Interface]:
    """Every up, non-loopback Ethernet interface (type 1; 32 would be IPoIB)."""
    out = []
    for dev in sorted((Path(sysfs) / "class" / "net").glob("*")):
        if _read(dev / "type") != "1" or _read(dev / "operstate") not in ("up", "unknown") or dev.name == "lo":
            continue
        speed = _read(dev / "speed")
        out.append(Interface(dev.name, _ipv4(dev.name), float(speed) if _is_number(speed) and float(speed) > 0 else None,
                             (dev / "device").exists(), _read(dev / "ifalias")))
    return out


def traffic_interface() -> str | None:
    """The interface the job's TCP traffic uses, where the user named it (gloo, NCCL)."""
    return os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME") or None


def _ipv4(name: str) -> str | None:
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # SIOCGIFADDR: the interface's address, without parsing `ip` output
            return socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))[20:24])
        except OSError:
            return None


def _alias_fabric(alias: str) -> str | None:
    return next((w.split("=", 1)[1] for w in alias.split() if w.startswith("fabric=") and len(w) > 7), None)


def detect_local_node(name: str | None = None, sysfs: str | os.PathLike = "/sys", gpus: int | None = None,
                      tflops: float = 120.0, adam_gps: float = DEFAULT_ADAM_GPS) -> Node:
    """This machine's NICs and GPUs, read from /sys.

    RDMA ports come from ``/sys/class/infiniband/*/ports/*`` (link_layer InfiniBand -> ib,
    Ethernet -> RoCE; ``rate`` like "200 Gb/sec (4X HDR)"); Ethernet from
    ``/sys/class/net/*/speed`` (Mb/s) of physical, up interfaces and of the interface the
    job's traffic is pinned to (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, which may be
    virtual). The fabric is ``$KINTSUGI_FABRIC`` when set, else ``fabric=NAME`` in an
    interface's alias (``ip link set eth0 alias fabric=east``: the traffic interface's
    first), else the NIC kind plus the InfiniBand subnet prefix when it is not the default
    fe80:: (two separate clusters with the same NIC kind need one of the first two).
    """
    sysfs = Path(sysfs)
    rdma: dict[str, list[float]] = {"ib": [], "roce": []}
    subnet = ""
    for port in sorted((sysfs / "class" / "infiniband").glob("*/ports/*")):
        if "ACTIVE" not in _read(port / "state"):
            continue
        kind = "ib" if _read(port / "link_layer") == "InfiniBand" else "roce"
        rate = _read(port / "rate").split()
        rdma[kind].append(float(rate[0]) if rate and _is_number(rate[0]) else DEFAULT_GBPS[kind])
        gid = _read(port / "gids" / "0")
        if kind == "ib" and gid and not gid.startswith("fe80:0000:0000:0000"):
            subnet = gid[:19]
    pinned = traffic_interface()
    nets = sorted(interfaces(sysfs), key=lambda i: i.name != pinned)
    eth = [i.mbit / 1000 for i in nets if i.mbit and (i.physical or i.name == pinned)]
    kind = "ib" if rdma["ib"] else "roce" if rdma["roce"] else "eth"
    speeds = rdma[kind] if kind != "eth" else (eth or [DEFAULT_GBPS["eth"]])
    named = next((f for i in nets if (f := _alias_fabric(i.alias))), None)
    fabric = os.environ.get("KINTSUGI_FABRIC") or named or (f"{kind}-{subnet}" if subnet else kind)
    if gpus is None:
        gpus = _local_gpus()
    return Node(name=name or os.uname().nodename, gpus=gpus, fabric=fabric, kind=kind, nics=len(speeds),
                gbps=min(speeds), eth_gbps=sum(eth) or DEFAULT_GBPS["eth"], tflops=tflops, adam_gps=adam_gps)


def _local_gpus() -> int:
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    import torch

    return max(torch.cuda.device_count(), 1)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def gather_topology(store, node_rank: int, nnodes: int, local: Node | None, prefix: str = "kintsugi/topology") -> Topology:
    """Every node's description through the rendezvous store (a torch.distributed Store).

    Each node publishes its own ``Node`` under ``{prefix}/{node_rank}`` (pass ``local=None``
    on ranks that only read, e.g. local ranks > 0) and reads all ``nnodes`` entries; the
    store's ``get`` waits until a node has published, up to the store's timeout.
    """
    if local is not None:
        store.set(f"{prefix}/{node_rank}", json.dumps(asdict(local)))
    nodes = [Node(**json.loads(store.get(f"{prefix}/{i}"))) for i in range(nnodes)]
    log.info("topology: %d nodes, fabrics %s", nnodes, sorted({n.fabric for n in nodes}))
    return Topology(nodes)


@dataclass
class LinkProbe:
    """Measured between every pair of nodes: MB/s of a gloo point-to-point transfer from the
    lower to the higher node (0 on the diagonal) and round trips of a small message (s)."""

    mb_s: list[list[float]]
    rtt_s: list[list[float]]


def _round_robin(n: int) -> list[list[tuple[int, int]]]:
    """Rounds of disjoint pairs covering every pair once (the circle method; a bye when odd)."""
    ring = list(range(n + n % 2))
    rounds = []
    for _ in range(len(ring) - 1):
        pairs = [(ring[k], ring[-1 - k]) for k in range(len(ring) // 2)]
        rounds.append([tuple(sorted(p)) for p in pairs if max(p) < n])
        ring = [ring[0], ring[-1], *ring[1:-1]]
    return rounds


def probe_links(leaders: list[int], mbytes: float = 8.0, repeats: int = 2) -> LinkProbe:
    """Measure every pair of ``leaders`` (global ranks, one per node) with gloo point-to-point
    traffic, the pairs of a round at once (each node talks to one peer at a time), so a
    cluster of n nodes takes n - 1 rounds. The sender times ``mbytes`` out and a one-byte
    acknowledgement back, the best of ``repeats`` (the first warms the TCP window).

    What it measures is what the job's TCP traffic gets (gloo, NCCL's socket transport): the
    real path between fabrics and on Ethernet fabrics, whatever a NIC's nominal speed says.
    Collective over every rank of the default group; everyone gets the result.
    """
    import time

    import torch
    import torch.distributed as dist

    n, rank = len(leaders), dist.get_rank()
    group = dist.new_group(leaders, backend="gloo")  # also under NCCL: CPU tensors
    mb_s = [[0.0] * n for _ in range(n)]
    rtt = [[0.0] * n for _ in range(n)]
    if rank in leaders:
        me = leaders.index(rank)
        buf, ack = torch.zeros(int(mbytes * 1e6) // 4), torch.zeros(1)
        for pairs in _round_robin(n):
            for a, b in pairs:
                if me not in (a, b):
                    continue
                peer = leaders[b if me == a else a]
                pings, best = [], 0.0
                for _ in range(5):
                    t0 = time.perf_counter()
                    if me == a:
                        dist.send(ack, peer, group=group)
                        dist.recv(ack, peer, group=group)
                        pings.append(time.perf_counter() - t0)
                    else:
                        dist.recv(ack, peer, group=group)
                        dist.send(ack, peer, group=group)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    if me == a:
                        dist.send(buf, peer, group=group)
                        dist.recv(ack, peer, group=group)
                        best = max(best, buf.numel() * 4 / 1e6 / (time.perf_counter() - t0))
                    else:
                        dist.recv(buf, peer, group=group)
                        dist.send(ack, peer, group=group)
                if me == a:
                    mb_s[a][b] = mb_s[b][a] = best
                    rtt[a][b] = rtt[b][a] = sorted(pings)[len(pings) // 2]
            dist.barrier(group=group)  # rounds in turn: pairs of two rounds never share a node
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, (mb_s, rtt) if rank in leaders else None)
    got = [r for r in rows if r is not None]
    merged = [[max(r[0][i][j] for r in got) for j in range(n)] for i in range(n)]
    merged_rtt = [[max(r[1][i][j] for r in got) for j in range(n)] for i in range(n)]
    dist.destroy_process_group(group)
    return LinkProbe(merged, merged_rtt)


def with_probe(topology: Topology, probe: LinkProbe) -> Topology:
    """The topology with its TCP paths as measured: each node's Ethernet fabric bandwidth is
    the slowest of its links to the nodes of its fabric, its path to other fabrics the
    slowest of its links to them, and the Ethernet latency half the median round trip. RDMA
    bandwidth inside a fabric stays as read from /sys (gloo's TCP does not use it)."""
    import statistics

    nodes = []
    for i, node in enumerate(topology.nodes):
        same = [probe.mb_s[i][j] for j, m in enumerate(topology.nodes) if j != i and m.fabric == node.fabric]
        other = [probe.mb_s[i][j] for j, m in enumerate(topology.nodes) if m.fabric != node.fabric]
        gbit = lambda rates: min(rates) * 8 / 1000
        if node.kind == "eth" and same:
            node = replace(node, nics=1, gbps=gbit(same))
        nodes.append(replace(node, eth_gbps=gbit(other)) if other else node)
    pairs = [probe.rtt_s[i][j] for i in range(len(nodes)) for j in range(i + 1, len(nodes))]
    latency = dict(topology.latency_us)
    if pairs:
        latency["eth"] = statistics.median(pairs) / 2 * 1e6
    return Topology(nodes, latency, topology.nvlink_gbps)
