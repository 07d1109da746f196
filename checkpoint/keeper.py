"""The node keeper: one process per node that holds every local rank's newest snapshots in
shared memory (level 0: it survives a trainer crash) and writes them to L1/L2 off the
trainers' cores and GIL (REFT's snapshot management process).

Three parts, each replaceable: ``SnapshotStore`` (the shared-memory slots and their byte
budget), ``LevelWriter`` (one thread per level, FIFO: shard writes, then commits) and
``KeeperServer`` (the unix-socket request server, the token check and the lease). The
trainer side is ``KeeperClient``; ``start_keeper``/``connect`` start or find a node's keeper.
The protocol (length-prefixed JSON requests) is documented in docs/async.md.

Privacy: the socket lives in a 0700 directory and is 0600, every shared-memory file is
0600, and a connection must present the job's token (compared in constant time) first.
Lifetime: the keeper exits when every rank that connected has said ``bye``, or when no
trainer has been connected for ``timeout_s`` and the job's agent (torchrun's agent or
``kintsugi launch``) is gone. Its shared-memory files are unlinked on exit (and by the next
keeper of the same job, should this one be killed).
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import mmap
import os
import queue
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from checkpoint import snapshot
from checkpoint.format import fault_point
from checkpoint.levels import DirectoryStorage
from checkpoint.store import SHARD
from comms import UserError

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")


# ----------------------------------------------------------------------------- framing

def send_msg(sock: socket.socket, obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("keeper connection closed")
        buf += part
    return bytes(buf)


def recv_msg(sock: socket.socket):
    (n,) = struct.unpack("<I", _recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, n))


# ----------------------------------------------------------------------------- level 0

@dataclass
class Slot:
    """One shared-memory buffer holding one rank's shard of one step (safetensors layout)."""

    id: int
    rank: int
    path: str
    size: int
    mm: mmap.mmap
    state: str = "free"  # free -> filling (trainer copies) -> crc (keeper sums) -> ready
    step: int = -1
    used: int = 0  # bytes of the shard in this slot (the slot may be larger: it is reused)
    entries: list = field(default_factory=list)  # [name, key, offsets, shape, gshape, dtype, lo, hi]
    records: list = field(default_factory=list)  # entries' manifest records, with CRC32
    objects: dict | None = None  # rank 0's small objects and manifest extras of this step
    world: int = 1  # the world size that saved this step
    pins: int = 0  # level writes that still read this slot


class SnapshotStore:
    """Per-rank shared-memory slots within a byte budget (level 0).

    Each local rank gets ``budget // local_world`` bytes; it needs two slots (the newest
    snapshot every rank has, and the one being captured), more let captures overlap slow
    flushes. When no slot is free the request waits (back-pressure) instead of allocating.
    """

    def __init__(self, prefix: str, budget: int):
        self.prefix, self.budget = prefix, budget
        self.local_world = 1
        self.slots: list[Slot] = []
        self.committed: dict[int, int] = {}  # rank -> newest step committed at L0
        self.cond = threading.Condition()
        self.next_id = 0
        for stale in SHM.glob(Path(prefix).name + "-*"):  # left by a killed keeper of this job
            stale.unlink(missing_ok=True)

    def _create(self, rank: int, size: int) -> Slot:
        path = f"{self.prefix}-r{rank}-{self.next_id}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        slot = Slot(self.next_id, rank, path, size, mm)
        self.next_id += 1
        self.slots.append(slot)
        return slot

    def _drop(self, slot: Slot):
        slot.mm.close()
        os.unlink(slot.path)
        self.slots.remove(slot)

    def _release_old(self, rank: int):
        """Free ready slots older than the rank's L0-committed step once no writer reads them."""
        newest = self.committed.get(rank, -1)
        for s in self.slots:
            if s.rank == rank and s.state == "ready" and s.step < newest and s.pins == 0:
                s.state = "free"
        self.cond.notify_all()

    def alloc(self, rank: int, step: int, nbytes: int) -> Slot:
        cap = self.budget // self.local_world
        if 2 * nbytes > cap:
            raise MemoryError(f"checkpoint.host_memory_mb is too small: {self.local_world} local ranks x 2 snapshots "
                              f"of {nbytes >> 20} MiB do not fit in {self.budget >> 20} MiB; raise it")
        with self.cond:
            for s in self.slots:  # a restarted trainer redoes steps: drop the abandoned timeline
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
                    self._drop(min(free, key=lambda s: s.size))
                    continue
                else:
                    self.cond.wait(0.5)  # back-pressure: a flush still reads the older snapshots
                    continue
                slot.state, slot.step, slot.used = "filling", step, nbytes
                slot.entries, slot.records, slot.objects = [], [], None
                return slot

    def get(self, slot_id: int) -> Slot:
        with self.cond:
            return next(s for s in self.slots if s.id == slot_id)

    def commit_l0(self, rank: int, step: int):
        with self.cond:
            self.committed[rank] = max(step, self.committed.get(rank, -1))
            self._release_old(rank)

    def unpin(self, slot: Slot):
        with self.cond:
            slot.pins -= 1
            self._release_old(slot.rank)

    def reset_rank(self, rank: int):
        """A trainer went away mid-copy: its half-filled slots hold nothing."""
        with self.cond:
            for s in self.slots:
                if s.rank == rank and s.state == "filling":
                    s.state = "free"
            self.cond.notify_all()

    def snapshots(self, rank: int) -> list[Slot]:
        with self.cond:
            return [s for s in self.slots if s.rank == rank and s.state == "ready"]

    def close(self):
        with self.cond:
            for s in list(self.slots):
                self._drop(s)


def checksum(slot: Slot, crc: bool) -> list:
    """Manifest records of a filled slot (as checkpoint.store.build_manifest takes them):
    the entries with the CRC32 of each tensor's bytes, or None when ``crc`` is off."""
    view = memoryview(slot.mm)
    records, fname = [], SHARD.format(slot.rank)
    for name, key, offsets, shape, gshape, dtype, lo, hi in slot.entries:
        records.append([name, key, fname, offsets, shape, gshape, dtype,
                        zlib.crc32(view[lo:hi]) if crc else None])  # releases the GIL
    view.release()
    return records


# ----------------------------------------------------------------------------- levels

class LevelWriter(threading.Thread):
    """Writes one level's shards and commits, in order, on its own thread."""

    def __init__(self, keeper: "Keeper", storage: DirectoryStorage):
        super().__init__(name=f"keeper-{storage.name}", daemon=True)
        self.keeper, self.storage = keeper, storage
        self.jobs: queue.Queue = queue.Queue()
        self.busy = False

    def run(self):
        k, name = self.keeper, self.storage.name
        while True:
            job = self.jobs.get()
            self.busy = True
            kind, step = job[0], job[1]
            try:
                if kind == "write":
                    slot = job[2]
                    if step not in k.failed[name]:
                        t0 = time.perf_counter()
                        with memoryview(slot.mm) as view:
                            self.storage.write_part(step, SHARD.format(slot.rank), view[:slot.used])
                        dt = time.perf_counter() - t0
                        log.info("%s: step %d rank %d: %.1f MiB durable in %.2f s (%.2f GB/s)", name, step,
                                 slot.rank, slot.used / 2**20, dt, slot.used / dt / 1e9)
                        k.note(name, "durable", step, slot.rank)
                        k.written[name] = (slot.used, dt)
                else:
                    self.storage.commit(step, job[2])
                    k.note(name, "committed", step)
            except OSError as e:
                log.error("%s: step %d failed: %s", name, step, e)
                self.storage.abort(step)
                k.note(name, "failed", step, message=f"{name} ({self.storage.root}) could not store step {step}: "
                                                     f"{e.strerror or e}")
            except Exception as e:  # a keeper bug: every rank must hear of it
                log.exception("%s writer failed", name)
                k.fatal = f"keeper {name} writer crashed: {e!r}"
            finally:
                if kind == "write":
                    k.store.unpin(job[2])
                self.busy = False
                self.jobs.task_done()


# ----------------------------------------------------------------------------- the keeper

class Keeper:
    """The node keeper's state: snapshot store, level writers, progress reports per rank."""

    def __init__(self, prefix: str, budget: int):
        self.store = SnapshotStore(prefix, budget)
        self.writers: dict[str, LevelWriter] = {}
        self.crc_jobs: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.durable: dict[str, dict[int, set]] = {}  # level -> step -> ranks with their part durable
        self.committed: dict[str, list[int]] = {}
        self.failed: dict[str, dict[int, str]] = {}
        self.fatal: str | None = None
        self.exchange = None  # checkpoint.snapshot.SnapshotExchange, once the trainers set up erasure coding
        self.written: dict[str, tuple[int, float]] = {}  # level -> (bytes, seconds) of its last shard write
        threading.Thread(target=self._crc_loop, name="keeper-crc", daemon=True).start()

    def configure(self, levels: dict, local_world: int):
        """Levels from the trainers' config (the first hello creates them)."""
        with self.lock:
            self.store.local_world = max(self.store.local_world, local_world)
            for name, spec in levels.items():
                if name not in self.writers:
                    self.durable[name], self.committed[name], self.failed[name] = {}, [], {}
                    w = self.writers[name] = LevelWriter(self, DirectoryStorage(name, **spec))
                    w.start()

    def note(self, level: str, what: str, step: int, rank: int | None = None, message: str = ""):
        with self.lock:
            if what == "durable":
                self.durable[level].setdefault(step, set()).add(rank)
            elif what == "committed":
                self.committed[level] = sorted(set(self.committed[level] + [step]))[-64:]
            else:
                self.failed[level][step] = message
            for table in (self.durable[level], self.failed[level]):  # bounded memory
                for old in sorted(table)[:-64]:
                    del table[old]

    def filled(self, slot: Slot, entries: list, objects: dict | None, world: int, levels: list[str]):
        slot.entries, slot.objects, slot.world, slot.state = entries, objects, world, "crc"
        if levels:
            # The disk writes start now and the CRC pass runs beside them (both only read the
            # slot; the manifest, which needs the CRCs, comes after both): durable after
            # max(write, CRC) instead of their sum, 0.3 s sooner per GB.
            with self.store.cond:
                slot.pins += len(levels)
            for name in levels:
                self.writers[name].jobs.put(("write", slot.step, slot))
            self.crc_jobs.put(slot)
            return
        # A snapshot that stays in memory is not checksummed: the copy protocol (ready only
        # after every byte is in, double-buffered) keeps it whole, and a CRC pass costs
        # ~0.3 s of CPU per GB (zlib, 3.8 GB/s here) that a snapshot every step cannot
        # afford on a busy node. Bytes that travel are checksummed: disk shards here,
        # erasure-coded shares by the exchange.
        slot.records = checksum(slot, crc=False)
        with self.store.cond:
            slot.state = "ready"
            self.store.cond.notify_all()

    def _crc_loop(self):
        while True:
            slot = self.crc_jobs.get()
            try:
                fault_point("crc")
                slot.records = checksum(slot, crc=True)
                with self.store.cond:
                    slot.state = "ready"
                    self.store.cond.notify_all()
            except Exception as e:
                log.exception("checksum failed")
                self.fatal = f"keeper checksum thread crashed: {e!r}"
            finally:
                self.crc_jobs.task_done()

    def status(self, rank: int) -> dict:
        ready = self.store.snapshots(rank)
        with self.lock:
            return {
                "ready": {str(s.step): s.records for s in ready},
                "objects": {str(s.step): s.objects for s in ready if s.objects is not None},
                "durable": {n: [s for s, ranks in d.items() if rank in ranks] for n, d in self.durable.items()},
                "committed": {n: list(c) for n, c in self.committed.items()},
                "failed": {n: {str(s): m for s, m in f.items()} for n, f in self.failed.items()},
                "fatal": self.fatal,
                "written": dict(self.written),
            }

    def idle(self) -> bool:
        return not self.crc_jobs.unfinished_tasks and all(w.jobs.empty() and not w.busy for w in self.writers.values())


class KeeperServer:
    """Accepts trainer connections on the unix socket and serves their requests."""

    def __init__(self, keeper: Keeper, sock_path: str, token: str, timeout_s: float, agent_pid: int | None,
                 exit_on_bye: bool):
        self.keeper, self.token = keeper, token
        self.timeout_s, self.agent_pid, self.exit_on_bye = timeout_s, agent_pid, exit_on_bye
        self.conns: dict[int, int] = {}  # connection id -> rank (or -1 before hello)
        self.hello: set[int] = set()
        self.bye: set[int] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        Path(sock_path).unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            self.sock.bind(sock_path)
        finally:
            os.umask(old)
        self.sock.listen(64)
        self.sock_path = sock_path
        self.sock_ino = os.stat(sock_path).st_ino  # a successor may bind the same path as we exit

    def serve(self):
        threading.Thread(target=self._accept, name="keeper-accept", daemon=True).start()
        idle_since = time.monotonic()
        while not self.stop.wait(0.2):
            with self.lock:
                connected = bool(self.conns)
                all_bye = self.exit_on_bye and self.hello and self.hello <= self.bye
            if all_bye and self.keeper.idle():
                log.info("every rank said bye; exiting")
                break
            if connected:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.timeout_s and not _alive(self.agent_pid):
                log.info("no trainer for %.0f s and no agent; exiting", self.timeout_s)
                break
        while self.stop.is_set() and not self.keeper.idle():  # shutdown: finish queued writes
            time.sleep(0.05)
        self.sock.close()
        try:
            if os.stat(self.sock_path).st_ino == self.sock_ino:
                os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        self.keeper.store.close()

    def _accept(self):
        n = 0
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            n += 1
            threading.Thread(target=self._serve_conn, args=(conn, n), daemon=True).start()

    def _serve_conn(self, conn: socket.socket, cid: int):
        rank = -1
        try:
            msg = recv_msg(conn)
            if msg.get("op") != "hello" or not hmac.compare_digest(str(msg.get("token", "")), self.token):
                send_msg(conn, {"ok": False, "error": "bad job token"})
                return
            rank = int(msg["rank"])
            self.keeper.configure(msg.get("levels", {}), int(msg.get("local_world", 1)))
            self.keeper.store.reset_rank(rank)
            with self.lock:
                self.conns[cid] = rank
                if rank >= 0:  # -1: a launcher's or a probe's connection
                    self.hello.add(rank)
                    self.bye.discard(rank)
            send_msg(conn, {"ok": True, "pid": os.getpid()})
            while True:
                msg = recv_msg(conn)
                try:
                    reply = self.handle(rank, msg)
                except MemoryError as e:  # a budget too small for the state: the user's to fix
                    reply = {"ok": False, "error": str(e), "user": True}
                except Exception as e:  # the trainer raises it; the keeper keeps serving
                    log.exception("request %s failed", msg.get("op"))
                    reply = {"ok": False, "error": str(e)}
                send_msg(conn, reply)
                if msg["op"] == "shutdown":
                    self.stop.set()
        except (ConnectionError, OSError, json.JSONDecodeError, struct.error):
            pass
        finally:
            conn.close()
            with self.lock:
                self.conns.pop(cid, None)
                if rank >= 0 and rank not in self.conns.values():
                    self.keeper.store.reset_rank(rank)

    def handle(self, rank: int, msg: dict) -> dict:
        k, op = self.keeper, msg["op"]
        if op == "alloc":
            slot = k.store.alloc(rank, int(msg["step"]), int(msg["nbytes"]))
            with k.store.cond:
                live = [s.id for s in k.store.slots if s.rank == rank]  # the trainer unmaps the others
            return {"ok": True, "slot": slot.id, "path": slot.path, "size": slot.size, "live": live}
        if op == "filled":
            slot = k.store.get(int(msg["slot"]))
            k.filled(slot, msg["entries"], msg.get("objects"), int(msg["world"]), msg["levels"])
            return {"ok": True}
        if op == "status":
            return {"ok": True, **k.status(rank)}
        if op == "l0_commit":
            k.store.commit_l0(rank, int(msg["step"]))
            if k.exchange is not None:
                k.exchange.committed(int(msg["step"]))
            return {"ok": True}
        if op.startswith("ec_"):
            return snapshot.handle(k, op, msg)
        if op == "commit":
            k.writers[msg["level"]].jobs.put(("commit", int(msg["step"]), msg["manifest"]))
            return {"ok": True}
        if op == "snapshots":  # for restore: every local rank's ready slots
            out = []
            for r in sorted({s.rank for s in k.store.slots}):
                for s in k.store.snapshots(r):
                    out.append({"rank": r, "step": s.step, "world": s.world, "path": s.path, "records": s.records,
                                "objects": s.objects})
            return {"ok": True, "snapshots": out}
        if op == "bye":
            with self.lock:
                self.bye.add(rank)
            return {"ok": True}
        if op == "shutdown":
            return {"ok": True}
        raise ValueError(f"unknown keeper request {op!r}")


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


# ----------------------------------------------------------------------------- finding a keeper

@dataclass
class KeeperAddress:
    """Where a job's keeper on this node listens, and the file holding the job's token."""

    sock: str
    token_file: Path
    log_file: Path
    shm_prefix: str

    @staticmethod
    def of(run_dir: str | Path, job: str, node_id: str | None = None) -> "KeeperAddress":
        run_dir = Path(run_dir).resolve()
        host = socket.gethostname()
        # KINTSUGI_NODE_ID tells several "nodes" (torchrun agents) on one machine apart
        node_id = os.environ.get("KINTSUGI_NODE_ID", "") if node_id is None else node_id
        host = f"{host}-{node_id}" if node_id else host
        key = hashlib.sha256(f"{run_dir}|{host}|{job}".encode()).hexdigest()[:20]
        # unix socket paths are limited to 107 bytes: keep it short and out of run_dir
        sock_dir = Path(f"/tmp/kintsugi-{os.getuid()}")
        sock_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(sock_dir, 0o700)
        base = run_dir / "keeper"
        return KeeperAddress(str(sock_dir / f"{key}.sock"), base / f"{host}-{job}.token",
                             base / f"{host}-{job}.log", str(SHM / f"kintsugi-{key}"))


def job_id() -> str:
    """The job this process belongs to: torchrun's run id, else 'local'."""
    return os.environ.get("TORCHELASTIC_RUN_ID") or "local"


def _token(addr: KeeperAddress, create: bool, wait_s: float) -> str:
    addr.token_file.parent.mkdir(parents=True, exist_ok=True)
    if create:
        try:
            fd = os.open(addr.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
            os.close(fd)
        except FileExistsError:
            pass
    deadline = time.monotonic() + wait_s
    while True:
        try:
            token = addr.token_file.read_text().strip()
            if len(token) == 64:
                return token
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"no keeper token appeared at {addr.token_file} within {wait_s:.0f} s "
                               "(local rank 0 did not start the node keeper)")
        time.sleep(0.05)


@dataclass
class KeeperHandle:
    """A keeper this process started (for ``kintsugi launch``): its address and process."""

    address: KeeperAddress
    token: str
    proc: subprocess.Popen

    def stop(self, timeout_s: float = 30.0):
        """Ask it to exit after its queued writes; kill it if it does not within the timeout."""
        try:
            c = KeeperClient(self.address.sock, self.token, rank=-1)
            c.call("shutdown")
            c.close()
        except (OSError, ConnectionError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def env(self) -> dict:
        """Environment for the job's workers so they use this keeper (and its token)."""
        return {"KINTSUGI_KEEPER_SOCK": self.address.sock, "KINTSUGI_JOB_TOKEN": self.token}


def start_keeper(run_dir: str | Path, job_token: str | None = None, host_memory_mb: int = 4096,
                 timeout_s: float = 60.0, agent_pid: int | None = None, exit_on_bye: bool = False,
                 job: str | None = None) -> KeeperHandle:
    """Start this node's keeper detached (own session: a signal to the job's process group
    does not reach it before its trainers) and return once it accepts connections.

    ``kintsugi launch`` calls this with its own pid as ``agent_pid`` and passes
    ``handle.env()`` to the workers; under plain torchrun local rank 0 calls it via ``connect``.
    """
    addr = KeeperAddress.of(run_dir, job or job_id())
    addr.token_file.parent.mkdir(parents=True, exist_ok=True)
    if job_token is None:
        job_token = _token(addr, create=True, wait_s=0)
    else:
        fd = os.open(addr.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, job_token.encode())
        os.close(fd)
    args = [sys.executable, "-c", "from checkpoint.keeper import main; main()", "--sock", addr.sock,
            "--token-file", str(addr.token_file), "--shm-prefix", addr.shm_prefix,
            "--host-memory-mb", str(host_memory_mb), "--timeout-s", str(timeout_s)]
    if agent_pid:
        args += ["--agent-pid", str(agent_pid)]
    if exit_on_bye:
        args.append("--exit-on-bye")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    with open(addr.log_file, "ab") as logf:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                                start_new_session=True, close_fds=True)
    handle = KeeperHandle(addr, job_token, proc)
    deadline = time.monotonic() + 30
    while True:
        try:
            KeeperClient(addr.sock, job_token, rank=-1).close()
            return handle
        except (OSError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the node keeper did not start; see {addr.log_file}") from None
            time.sleep(0.05)


class KeeperClient:
    """A trainer rank's connection to its node keeper (one request at a time)."""

    def __init__(self, sock_path: str, token: str, rank: int, local_world: int = 1, levels: dict | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)
        self.lock = threading.Lock()
        reply = self._call({"op": "hello", "token": token, "rank": rank, "local_world": local_world,
                            "levels": levels or {}})
        self.pid = reply["pid"]

    def _call(self, msg: dict) -> dict:
        with self.lock:
            send_msg(self.sock, msg)
            reply = recv_msg(self.sock)
        if not reply.get("ok"):
            raise (UserError if reply.get("user") else RuntimeError)(f"node keeper: {reply.get('error')}")
        return reply

    def call(self, op: str, **kw) -> dict:
        return self._call({"op": op, **kw})

    def close(self):
        self.sock.close()


def connect(run_dir: str | Path, rank: int, local_rank: int, local_world: int, levels: dict,
            host_memory_mb: int, timeout_s: float) -> KeeperClient:
    """This rank's keeper: the launcher's (from the environment), else this job's keeper on
    this node, which local rank 0 starts when none answers (detached; the others wait)."""
    sock, token = os.environ.get("KINTSUGI_KEEPER_SOCK"), os.environ.get("KINTSUGI_JOB_TOKEN")
    if not (sock and token):
        addr = KeeperAddress.of(run_dir, job_id())
        token = _token(addr, create=local_rank == 0, wait_s=60)
        sock = addr.sock
        if local_rank == 0:
            try:
                return KeeperClient(sock, token, rank, local_world, levels)
            except (OSError, ConnectionError):  # none alive: start it
                agent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
                start_keeper(run_dir, token, host_memory_mb, timeout_s, agent_pid=agent,
                             exit_on_bye=agent is None)
    deadline = time.monotonic() + 60
    while True:
        try:
            return KeeperClient(sock, token, rank, local_world, levels)
        except (OSError, ConnectionError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach the node keeper at {sock}; is local rank 0 running?") from None
            time.sleep(0.1)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m checkpoint.keeper", description=__doc__.split("\n")[0])
    p.add_argument("--sock", required=True)
    p.add_argument("--token-file", required=True)
    p.add_argument("--shm-prefix", required=True)
    p.add_argument("--host-memory-mb", type=int, default=4096)
    p.add_argument("--timeout-s", type=float, default=60.0)
    p.add_argument("--agent-pid", type=int, default=None)
    p.add_argument("--exit-on-bye", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper[%(process)d] %(message)s")
    token = Path(a.token_file).read_text().strip()
    keeper = Keeper(a.shm_prefix, a.host_memory_mb << 20)
    server = KeeperServer(keeper, a.sock, token, a.timeout_s, a.agent_pid, a.exit_on_bye)
    log.info("serving %s (budget %d MiB)", a.sock, a.host_memory_mb)
    server.serve()


if __name__ == "__main__":
    main()
