"""Erasure coding of node snapshots across a group of nodes (REFT), with zfec.

Every node of a group of n = k + m nodes holds its own snapshot (L0) and parity for m
codewords. Codewords rotate over the group like RAID stripes (diagram in
docs/snapshots.md): codeword c has n shares, share s lives on the node at group position
(c + s) mod n; shares 0..k-1 are data (block s of that node's own snapshot, nothing
copied), shares k..n-1 are parity. So node p's snapshot is cut into k blocks, block b is
data share b of codeword (p - b) mod n, and node p holds parity share s of codeword
(p - s) mod n for s = k..n-1.

- Memory overhead: m parity shares of about L/k each, i.e. m/k of the snapshot.
- Any m lost nodes of a group: every codeword loses at most m of its n shares, so each
  lost block is decoded from any k surviving shares of its codeword.
- Rebuilding one lost node reads k shares for each of its k blocks.

Shares of a codeword may differ in length (nodes hold snapshots of different sizes); a
codeword's size is its longest data block and shorter blocks count as zero-padded. All
coding runs in stripes of bounded size over views of the buffers, so coding a 10 GB
snapshot needs k + m stripes of temporary memory, not another snapshot.

A reader (``ShareReader``) is anything with ``header(step, codeword, index)`` and
``read(step, codeword, index, offset, length)``: a local ``NodeShares`` or a remote peer
(checkpoint.keeper.peers.PeerClient). Encoding and rebuilding only talk to readers, so the same
code runs in one process (tests, fault-injection loop) and across keepers.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import random
import zlib
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import zfec

from comms.errors import UserError

log = logging.getLogger(__name__)

# Bytes per share coded in one zfec call: large enough that the per-call overhead is
# negligible (~1 %), small enough that k + m stripes of scratch stay in the cache range.
STRIPE = 1 << 20


class ShareError(Exception):
    """A share is missing, corrupt, or too few shares survive to decode."""


@dataclass(frozen=True)
class ShareHeader:
    """What a share is; sent in front of its bytes and checked against them."""

    job: str
    step: int
    group: int
    codeword: int
    index: int  # share index in the codeword: < k data, >= k parity
    node: int  # node rank that holds the share
    k: int
    m: int
    size: int  # bytes of the share; data shorter than its codeword are zero-padded to it
    length: int  # bytes the share holds before padding
    crc: int  # crc32 of the share's `length` bytes
    data_lens: list = field(default_factory=list)  # parity only: length of each data share
    data_crcs: list = field(default_factory=list)  # parity only: crc32 of each data share
    gen: str = ""  # the job attempt whose snapshot the share codes (a redone step is another one)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "ShareHeader":
        try:
            fields = json.loads(raw)
            header = cls(**fields)
        except (ValueError, TypeError) as e:
            raise ShareError(f"malformed share header: {e}") from None
        ints = [header.step, header.group, header.codeword, header.index, header.node, header.k, header.m,
                header.size, header.length, header.crc, *header.data_lens, *header.data_crcs]
        if not all(isinstance(x, int) and x >= 0 for x in ints) or not 0 <= header.index < header.k + header.m \
                or header.length > header.size:
            raise ShareError(f"malformed share header: {fields}")
        return header


class ShareReader(Protocol):
    def header(self, step: int, codeword: int, index: int) -> ShareHeader: ...

    def read(self, step: int, codeword: int, index: int, offset: int, length: int) -> bytes | memoryview: ...


@dataclass(frozen=True)
class GroupCode:
    """The rotated layout of k data + m parity shares over a group of n = k + m nodes."""

    k: int
    m: int

    def __post_init__(self):
        if not (self.k >= 1 and self.m >= 1 and self.k + self.m <= 256):
            raise UserError(f"erasure code k={self.k}, m={self.m}: need k >= 1, m >= 1, k + m <= 256; "
                            "pick other snapshot.k / snapshot.m")

    @property
    def n(self) -> int:
        return self.k + self.m

    def holder(self, codeword: int, index: int) -> int:
        """Group position of the node that holds share `index` of `codeword`."""
        return (codeword + index) % self.n

    def data_share(self, pos: int, block: int) -> tuple[int, int]:
        """(codeword, index) of block `block` of node `pos`'s snapshot."""
        return (pos - block) % self.n, block

    def parity_roles(self, pos: int) -> list[tuple[int, int]]:
        """(codeword, index) of every parity share node `pos` holds."""
        return [((pos - s) % self.n, s) for s in range(self.k, self.n)]

    def blocks(self, length: int) -> list[tuple[int, int]]:
        """(offset, length) of the k blocks a snapshot of `length` bytes is cut into."""
        size = -(-length // self.k)
        return [(min(b * size, length), max(0, min(size, length - b * size))) for b in range(self.k)]


def crc32(buf, crc: int = 0) -> int:
    return zlib.crc32(buf, crc)


class UnusableShare(ShareError):
    """A share that cannot be used: its bytes do not match its header's checksum, or its
    holder stopped answering halfway."""

    def __init__(self, index: int, header: ShareHeader, why: str):
        super().__init__(f"share {index} of codeword {header.codeword} from node {header.node} "
                         f"(step {header.step}) {why}; rejected")
        self.index = index


def _stripes(step: int, codeword: int, shares: list[tuple[int, ShareReader, ShareHeader]], size: int, stripe: int):
    """Yield (offset, [block per share]) over `size` bytes in stripes; shares shorter than
    `size` read as zero-padded. Each share is checked against its header's crc32 once its
    last byte has been read; a mismatch or a failed read raises UnusableShare."""
    scratch = [np.empty(min(stripe, max(size, 1)), np.uint8) for _ in shares]
    crcs = [0] * len(shares)
    for off in range(0, size, stripe):
        want = min(stripe, size - off)
        blocks = []
        for i, (index, reader, h) in enumerate(shares):
            have = max(0, min(want, h.length - off))
            try:
                block = reader.read(step, codeword, index, off, have) if have else b""
            except ShareError as e:
                raise UnusableShare(index, h, f"could not be read ({e})") from None
            if len(block) != have:
                raise UnusableShare(index, h, f"was cut short ({len(block)} of {have} bytes)")
            crcs[i] = crc32(block, crcs[i])
            if have < want:  # zero-pad into scratch
                pad = scratch[i][:want]
                pad[:have] = np.frombuffer(block, np.uint8)
                pad[have:] = 0
                block = pad
            blocks.append(block)
        yield off, blocks
    for crc, (index, _, h) in zip(crcs, shares):
        if crc != h.crc:
            raise UnusableShare(index, h, "has a bad checksum")


def encode_parity(code: GroupCode, step: int, codeword: int, index: int, data: list[tuple[ShareReader, ShareHeader]],
                  out: np.ndarray, stripe: int = STRIPE) -> int:
    """Compute parity share `index` of `codeword` from its k data shares into `out`.

    `data` holds (reader, header) of data shares 0..k-1; `out` is a uint8 array of the
    codeword's size. Returns the parity's crc32. Data shares whose bytes do not match the
    crc32 their holder declared raise UnusableShare (the holder served corrupt bytes).
    """
    enc = zfec.Encoder(code.k, code.n)
    crc = 0
    for off, blocks in _stripes(step, codeword, [(j, r, h) for j, (r, h) in enumerate(data)], len(out), stripe):
        (parity,) = enc.encode(blocks, [index])
        out[off:off + len(parity)] = np.frombuffer(parity, np.uint8)
        crc = crc32(parity, crc)
    return crc


def decode_shares(code: GroupCode, step: int, codeword: int, shares: dict[int, tuple[ShareReader, ShareHeader]],
                  outs: dict[int, np.ndarray], size: int, stripe: int = STRIPE) -> None:
    """Rebuild data shares `outs` (index -> uint8 array) from k of the surviving `shares`.

    Prefers data shares (zfec passes them through without arithmetic); a share with a bad
    checksum (or whose holder dies while it is read) is dropped and decoding retried with
    another while k good ones are left. Each
    output array holds the lost share's length (<= `size`, the codeword's size).
    """
    shares, rejected = dict(shares), []
    while True:
        use = sorted(shares)[:code.k]
        if len(use) < code.k:
            raise ShareError(f"codeword {codeword}: {len(use)} good shares survive, {code.k} needed"
                             + "".join(f"; {why}" for why in rejected))
        dec = zfec.Decoder(code.k, code.n)
        try:
            for off, blocks in _stripes(step, codeword, [(s, *shares[s]) for s in use], size, stripe):
                primary = dec.decode(blocks, use)
                for s, out in outs.items():
                    n = max(0, min(len(primary[s]), len(out) - off))
                    if n:
                        out[off:off + n] = np.frombuffer(primary[s], np.uint8, count=n)
            return
        except UnusableShare as e:
            log.warning("%s", e)
            rejected.append(str(e))
            del shares[e.index]


class Segments:
    """Several buffers read as one (a node's snapshot: every local rank's shared-memory
    slot, then metadata) without concatenating them. A read inside one buffer is a view;
    only a read across a boundary (at most one stripe) is copied. Items may be
    (buffer, length) to use a prefix. No view is kept between reads, so the owner of a
    buffer (the keeper, for an mmap) can close it once nobody reads."""

    def __init__(self, buffers):
        self.parts = [b if isinstance(b, tuple) else (b, memoryview(b).nbytes) for b in buffers]
        self.starts = list(itertools.accumulate((n for _, n in self.parts), initial=0))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, sl: slice):
        lo, hi = max(0, sl.start or 0), min(len(self), len(self) if sl.stop is None else sl.stop)
        pieces = []
        for start, (part, n) in zip(self.starts, self.parts):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                pieces.append(memoryview(part).cast("B")[a - start:b - start])
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)


class NodeShares:
    """What one node holds at one step: its snapshot (data shares) and its parity shares.

    `snapshot` is a buffer or a list of buffers read as one (see Segments)."""

    def __init__(self, job: str, step: int, group: int, node: int, pos: int, code: GroupCode, snapshot, gen: str = ""):
        self.job, self.step, self.group, self.node, self.pos, self.code = job, step, group, node, pos, code
        self.gen = gen
        self.snapshot = Segments(snapshot if isinstance(snapshot, (list, tuple)) else [snapshot])
        self.headers: dict[tuple[int, int], ShareHeader] = {}
        self.parity: dict[tuple[int, int], np.ndarray] = {}
        for b, (off, length) in enumerate(code.blocks(len(self.snapshot))):
            c, s = code.data_share(pos, b)
            crc = 0
            for o in range(off, off + length, STRIPE):
                crc = crc32(self.snapshot[o:min(o + STRIPE, off + length)], crc)
            self.headers[c, s] = self._header(c, s, length, length, crc)

    def _header(self, c, s, size, length, crc, lens=(), crcs=()) -> ShareHeader:
        return ShareHeader(self.job, self.step, self.group, c, s, self.node, self.code.k, self.code.m, size, length,
                           crc, list(lens), list(crcs), self.gen)

    def encode(self, readers: dict[int, ShareReader], stripe: int = STRIPE, out: dict | None = None) -> None:
        """Compute this node's m parity shares, reading data shares through `readers` (by group
        position; this node itself may be among them). `out` may give preallocated arrays by
        (codeword, index), e.g. views of shared memory; missing ones are allocated."""
        for c, s in self.code.parity_roles(self.pos):
            data = []
            for j in range(self.code.k):
                reader = readers[self.code.holder(c, j)]
                data.append((reader, reader.header(self.step, c, j)))
            size = max(h.size for _, h in data)
            buf = (out or {}).get((c, s))
            buf = np.empty(size, np.uint8) if buf is None else buf[:size]
            crc = encode_parity(self.code, self.step, c, s, data, buf, stripe)
            self.parity[c, s] = buf
            self.headers[c, s] = self._header(c, s, size, size, crc, [h.length for _, h in data],
                                              [h.crc for _, h in data])

    @property
    def nbytes(self) -> int:
        """Bytes held beyond the snapshot itself (the parity)."""
        return sum(p.nbytes for p in self.parity.values())

    def held(self) -> list[ShareHeader]:
        return sorted(self.headers.values(), key=lambda h: (h.codeword, h.index))

    # ShareReader
    def header(self, step: int, codeword: int, index: int) -> ShareHeader:
        h = self.headers.get((codeword, index))
        if step != self.step or h is None:
            raise ShareError(f"node {self.node} holds no share {index} of codeword {codeword} at step {step}")
        return h

    def read(self, step: int, codeword: int, index: int, offset: int, length: int):
        h = self.header(step, codeword, index)
        if offset < 0 or length < 0 or offset + length > h.length:
            raise ShareError(f"read past share {index} of codeword {codeword}: {offset}+{length} > {h.length}")
        if index >= self.code.k:
            return memoryview(self.parity[codeword, index])[offset:offset + length]
        start = self.code.blocks(len(self.snapshot))[index][0]
        return self.snapshot[start + offset:start + offset + length]


def rebuild_snapshot(code: GroupCode, step: int, pos: int, readers: dict[int, ShareReader],
                     stripe: int = STRIPE, out=None) -> bytearray | np.ndarray:
    """The snapshot of the lost node at group position `pos`, decoded from surviving nodes'
    shares (`readers` by group position, without `pos`). Every rebuilt block is checked
    against the crc32 the parity holders recorded. Raises ShareError if too few survive.
    `out` may be a preallocated writable buffer of the snapshot's length."""
    plan = []
    for b in range(code.k):
        c, s = code.data_share(pos, b)
        shares = {}
        for j in range(code.n):
            holder = code.holder(c, j)
            if holder != pos and holder in readers:
                try:
                    shares[j] = (readers[holder], readers[holder].header(step, c, j))
                except ShareError:
                    continue  # that holder lost this step (e.g. restarted mid-encode)
        parity = [h for j, (_, h) in shares.items() if j >= code.k]
        if not parity or len(shares) < code.k:
            raise ShareError(f"node at group position {pos}: codeword {c} has {len(shares)} shares left "
                             f"({len(parity)} parity), {code.k} needed")
        plan.append((c, s, shares, parity[0]))
    lens = [p.data_lens[s] for _, s, _, p in plan]
    snap = np.zeros(sum(lens), np.uint8) if out is None else np.frombuffer(out, np.uint8)
    off = 0
    for (c, s, shares, p), length in zip(plan, lens):
        dst = snap[off:off + length]
        decode_shares(code, step, c, shares, {s: dst}, p.size, stripe)
        if crc32(dst) != p.data_crcs[s]:
            raise ShareError(f"rebuilt block {s} of group position {pos} does not match its checksum")
        off += length
    return snap


# ---------------------------------------------------------------- groups and survival

@dataclass(frozen=True)
class Group:
    id: int
    nodes: tuple[int, ...]  # node ranks; a node's group position is its index here
    code: GroupCode


def plan_groups(num_nodes: int, k: int = 0, m: int = 0, target: float = 0.0, p_fail: float = 0.0) -> list[Group]:
    """Split `num_nodes` nodes into groups and give each a code.

    - k and m given: groups of n = k + m nodes; leftover nodes join the groups as extra data
      nodes (a group's k grows, its m stays), so no node goes unprotected.
    - target > 0: the cheapest layout (least parity memory m/k, then smallest groups) whose
      probability that every group loses at most m nodes is >= target, when each node is
      lost independently with probability p_fail.
    - neither: `default_code(num_nodes)`.
    A single node cannot protect itself against its own loss: no groups.
    """
    if num_nodes < 2:
        return []
    if target:
        k, m = code_for_target(num_nodes, target, p_fail)
    elif not (k and m):
        k, m = default_code(num_nodes)
    n = k + m
    if n > num_nodes:
        raise UserError(f"snapshot.k + snapshot.m = {n} but the job has only {num_nodes} nodes; "
                        f"use k + m <= {num_nodes}")
    groups = num_nodes // n
    sizes = [n] * groups
    for i in range(num_nodes - n * groups):
        sizes[i % groups] += 1
    out, start = [], 0
    for g, size in enumerate(sizes):
        out.append(Group(g, tuple(range(start, start + size)), GroupCode(size - m, m)))
        start += size
    return out


def default_code(num_nodes: int) -> tuple[int, int]:
    """Groups of up to 8 nodes; one parity share up to 4 nodes a group, two above.
    Parity memory is then 1/3 of the snapshot for 4 or 8 nodes a group (k=3,m=1; k=6,m=2)."""
    if num_nodes == 2:
        return 1, 1  # mirroring
    groups = math.ceil(num_nodes / 8)
    n = num_nodes // groups
    m = 1 if n <= 4 else 2
    return n - m, m


def group_survival(n: int, m: int, p_fail: float) -> float:
    """P(at most m of n nodes lost), each lost independently with probability p_fail."""
    return sum(math.comb(n, f) * p_fail ** f * (1 - p_fail) ** (n - f) for f in range(m + 1))


def survival(groups: list[Group], p_fail: float) -> float:
    """P(every group loses at most its m nodes): the snapshot of every node can be rebuilt."""
    return math.prod(group_survival(len(g.nodes), g.code.m, p_fail) for g in groups)


def code_for_target(num_nodes: int, target: float, p_fail: float) -> tuple[int, int]:
    if not (0 < target < 1 and 0 <= p_fail < 1):
        raise UserError(f"snapshot.target_survival={target}, snapshot.node_failure={p_fail}: "
                        "need 0 < target_survival < 1 and 0 <= node_failure < 1")
    best = None
    for n, m in itertools.product(range(2, min(num_nodes, 32) + 1), range(1, 32)):
        if m >= n:
            continue
        groups = plan_groups(num_nodes, n - m, m)
        p = survival(groups, p_fail)
        cost = (max(g.code.m / g.code.k for g in groups), n)
        if p >= target and (best is None or cost < best[0]):
            best = (cost, (n - m, m))
    if best is None:
        raise UserError(f"no erasure code over {num_nodes} nodes reaches snapshot.target_survival={target} with "
                        f"snapshot.node_failure={p_fail}; lower the target or add nodes")
    return best[1]


def inject_faults(groups: list[Group], p_fail: float, trials: int, seed: int = 0, snapshot_bytes: int = 256,
                  stripe: int = 64) -> float:
    """Fraction of `trials` in which every lost node's snapshot was rebuilt exactly.

    Encodes one random snapshot per node with the real code, then per trial loses each
    node with probability p_fail and really decodes every lost node from the survivors'
    shares (a small `stripe` makes a snapshot span several stripes). Confirms `survival`.
    """
    rng = random.Random(seed)
    encoded = []
    for g in groups:
        snaps = [rng.randbytes(snapshot_bytes - rng.randrange(g.code.k)) for _ in g.nodes]
        holders = [NodeShares("inject", 0, g.id, node, pos, g.code, snaps[pos]) for pos, node in enumerate(g.nodes)]
        readers = dict(enumerate(holders))
        for h in holders:
            h.encode(readers, stripe)
        encoded.append((g, snaps, readers))
    survived = 0
    for _ in range(trials):
        ok = True
        for g, snaps, readers in encoded:
            lost = {pos for pos in range(len(g.nodes)) if rng.random() < p_fail}
            alive = {pos: r for pos, r in readers.items() if pos not in lost}
            try:
                ok &= all(rebuild_snapshot(g.code, 0, pos, alive, stripe).tobytes() == snaps[pos] for pos in lost)
            except ShareError:
                ok = False
        survived += ok
    return survived / trials
