"""The keeper's protocol as typed messages: one dataclass per request, each naming its
reply's dataclass. A frame is ``{"op": ..., fields}`` (requests) or ``{"ok": true,
fields}`` / ``{"ok": false, "error", "user"}`` (replies); ``decode`` checks every field's
type, so a malformed frame is an error reply, never a crash deep in a handler.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

MAX_FRAME = 1 << 30  # a frame's JSON: a manifest, or the records of a model with very many tensors

_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
}


class BadMessage(ValueError):
    """A frame that is not a well-formed message of this protocol."""


def _ok(annotation: str, value) -> bool:
    return any(value is None if t == "None" else _CHECKS[t](value)
               for t in (part.strip().split("[")[0] for part in annotation.split("|")))


def _build(cls, fields: dict):
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in fields:
            value = fields[f.name]
            if not _ok(f.type, value):
                raise BadMessage(f"{cls.__name__}.{f.name} must be {f.type}, not {type(value).__name__}")
            kw[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadMessage(f"{cls.__name__} lacks {f.name!r}")
    return cls(**kw)


# ------------------------------------------------------------------ replies

@dataclass
class Done:
    """A request that answers nothing but success."""


@dataclass
class HelloReply:
    pid: int
    budget: int  # bytes of snapshot memory this keeper holds for all local ranks
    warning: str = ""  # e.g. /dev/shm smaller than checkpoint.host_memory_mb: said once on rank 0


@dataclass
class AllocReply:
    slot: int
    path: str
    size: int
    live: list  # this rank's slot ids: the trainer unmaps the others


@dataclass
class StatusReply:
    """One rank's view of the saves of its generation (reports of other generations, such
    as a redone step's old writes, are never shown)."""

    ready: dict  # step -> manifest records of this rank's complete snapshot
    objects: dict  # step -> rank 0's small objects and manifest extras
    durable: dict  # level -> steps whose shard of this rank is durable there
    committed: dict  # level -> steps committed there
    failed: dict  # level -> {step: message}
    fatal: str | None
    written: dict  # level -> [bytes, seconds] of its last shard write
    warnings: list = field(default_factory=list)  # node-level news for rank 0 to say once (e.g. a peer unreachable)


@dataclass
class SnapshotsReply:
    snapshots: list  # {rank, step, world, path, records, objects} of every ready slot


@dataclass
class AddressReply:
    address: str | None


@dataclass
class EcStatusReply:
    steps: dict
    worlds: dict
    parity: dict
    layout: dict
    encoded: list
    plan: dict | None
    address: str | None


@dataclass
class RebuildReply:
    bytes: int
    seconds: float
    ranks: list


# ------------------------------------------------------------------ requests

@dataclass
class Hello:
    """First request of a connection: binds it to a rank (-1: a launcher or a probe)."""

    op: ClassVar[str] = "hello"
    reply: ClassVar[type] = HelloReply
    rank: int
    local_world: int = 1
    levels: list = field(default_factory=list)  # checkpoint.levels.LevelSpec as dicts
    gen: str = ""  # the job attempt; reports are keyed by (gen, step)


@dataclass
class Alloc:
    op: ClassVar[str] = "alloc"
    reply: ClassVar[type] = AllocReply
    gen: str
    step: int
    nbytes: int
    wait_s: float  # how long to wait for memory to be freed (slow writes) before failing
    durable: int = -1  # the newest step committed at a disk level: slots of it and older may be reused
    copies: int = 2  # snapshots of this rank the keeper must have room for (1: the trainer waits for the disk)


@dataclass
class Filled:
    op: ClassVar[str] = "filled"
    reply: ClassVar[type] = Done
    gen: str
    step: int
    slot: int
    entries: list  # [name, key, offsets, shape, global_shape, dtype, lo, hi] per tensor
    world: int
    levels: list  # disk levels due at this step
    objects: dict | None = None
    crcs: list | None = None  # per entry: its CRC32 taken during the copy, or None (the keeper computes it)


@dataclass
class Release:
    """Give back a slot this rank was given but will not fill (its save went to disk)."""

    op: ClassVar[str] = "release"
    reply: ClassVar[type] = Done
    slot: int


@dataclass
class Status:
    op: ClassVar[str] = "status"
    reply: ClassVar[type] = StatusReply
    gen: str
    steps: list | None = None  # the steps whose ready records to send (None: all); a trainer needs only
    # those not yet committed at level 0, and the records are most of a reply's bytes


@dataclass
class L0Commit:
    op: ClassVar[str] = "l0_commit"
    reply: ClassVar[type] = Done
    gen: str
    step: int


@dataclass
class Commit:
    op: ClassVar[str] = "commit"
    reply: ClassVar[type] = Done
    gen: str
    level: str
    step: int
    manifest: dict


@dataclass
class Snapshots:
    op: ClassVar[str] = "snapshots"
    reply: ClassVar[type] = SnapshotsReply


@dataclass
class Bye:
    op: ClassVar[str] = "bye"
    reply: ClassVar[type] = Done


@dataclass
class Shutdown:
    op: ClassVar[str] = "shutdown"
    reply: ClassVar[type] = Done


@dataclass
class EcSetup:
    """Place this node's keeper in an erasure-coding group (plan None: coding off)."""

    op: ClassVar[str] = "ec_setup"
    reply: ClassVar[type] = AddressReply
    plan: dict | None
    token: str
    port: int = 0
    timeout: float = 10.0
    advertise: str = ""  # the address peers reach this keeper at (host part)


@dataclass
class EcStatus:
    op: ClassVar[str] = "ec_status"
    reply: ClassVar[type] = EcStatusReply


@dataclass
class EcRekey:
    op: ClassVar[str] = "ec_rekey"
    reply: ClassVar[type] = Done
    token: str


@dataclass
class EcRanks:
    op: ClassVar[str] = "ec_ranks"
    reply: ClassVar[type] = Done
    ranks: list


@dataclass
class EcRebuild:
    op: ClassVar[str] = "ec_rebuild"
    reply: ClassVar[type] = RebuildReply
    step: int
    pos: int


@dataclass
class EcAdopt:
    op: ClassVar[str] = "ec_adopt"
    reply: ClassVar[type] = RebuildReply
    step: int
    pos: int


REQUESTS = {cls.op: cls for cls in (Hello, Alloc, Filled, Release, Status, L0Commit, Commit, Snapshots, Bye, Shutdown,
                                    EcSetup, EcStatus, EcRekey, EcRanks, EcRebuild, EcAdopt)}


def _fields(msg) -> dict:
    """A message's fields, shallow: they are plain JSON values already (asdict's deep copy of
    every record list cost ~10 ms per save)."""
    return {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}


def request_frame(msg) -> dict:
    return {"op": msg.op, **_fields(msg)}


def decode_request(frame: dict):
    cls = REQUESTS.get(frame.get("op"))
    if cls is None:
        raise BadMessage(f"unknown request {frame.get('op')!r}")
    return _build(cls, frame)


def reply_frame(reply) -> dict:
    return {"ok": True, **_fields(reply)}


def error_frame(message: str, user: bool = False) -> dict:
    return {"ok": False, "error": message, "user": user}


def decode_reply(request, frame: dict):
    """The typed reply to ``request``; raises KeeperError(frame) for an error reply."""
    if not frame.get("ok"):
        raise RequestFailed(str(frame.get("error")), bool(frame.get("user")))
    return _build(request.reply, frame)


class RequestFailed(Exception):
    """The keeper answered a request with an error (``user``: the user's to fix)."""

    def __init__(self, message: str, user: bool):
        super().__init__(message)
        self.user = user
