"""The keeper's unix-socket server: authenticated connections (checkpoint/keeper/wire.py),
typed requests (checkpoint/keeper/messages.py) dispatched through one table of handlers,
and the keeper's lifetime (its lease on the job).

Lifetime: the keeper exits when every rank that connected has said ``bye`` (a job with no
launcher), or when no trainer has been connected for ``timeout_s`` and the job's agent
(torchrun's agent or ``kintsugi launch``) is gone; ``shutdown`` makes it exit after its
queued writes. Its shared memory is unlinked on exit (and by the next keeper's garbage
collection, should this one be killed).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from checkpoint.keeper import exchange
from checkpoint.keeper import messages as m
from checkpoint.keeper.node import NodeKeeper
from checkpoint.keeper.wire import Acceptor, Channel, WireError, token_bytes
from checkpoint.keeper.writers import CommitJob
from comms import UserError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # trainers of this node (one each), launchers, probes
HANDSHAKE_S = 5.0


@dataclass
class Conn:
    """One trainer's (or probe's) connection."""

    id: int
    rank: int = -1  # -1: a launcher or a probe
    greeted: bool = False  # its hello came


class KeeperServer:
    def __init__(self, node: NodeKeeper, sock_path: str, token: str, timeout_s: float, agent_pid: int | None,
                 exit_on_bye: bool):
        self.node = node
        self.timeout_s, self.agent_pid, self.exit_on_bye = timeout_s, agent_pid, exit_on_bye
        self.conns: dict[int, Conn] = {}
        self.hello: set[int] = set()
        self.bye: set[int] = set()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next_id = 0
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
        self.acceptor = Acceptor(self.sock, token_bytes(token), self._serve_conn, MAX_CONNECTIONS, HANDSHAKE_S,
                                 None, "keeper")

    def serve(self):
        idle_since = time.monotonic()
        while not self.stop.wait(0.2):
            with self.lock:
                connected = bool(self.conns)
                all_bye = self.exit_on_bye and self.hello and self.hello <= self.bye
            if all_bye and self.node.idle():
                log.info("every rank said bye; exiting")
                break
            if connected:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > self.timeout_s and not _alive(self.agent_pid):
                log.info("no trainer for %.0f s and no agent; exiting", self.timeout_s)
                break
        while self.stop.is_set() and not self.node.idle():  # shutdown: finish queued writes
            time.sleep(0.05)
        self.sock.close()
        try:
            if os.stat(self.sock_path).st_ino == self.sock_ino:
                os.unlink(self.sock_path)
        except FileNotFoundError:
            pass
        self.node.store.close()

    # ------------------------------------------------------------ connections

    def _serve_conn(self, channel: Channel, _addr):
        with self.lock:
            self.next_id += 1
            conn = self.conns[self.next_id] = Conn(self.next_id)
        try:
            while True:
                frame, _ = channel.recv(m.MAX_FRAME)
                try:
                    msg = m.decode_request(frame)
                    if conn.greeted == isinstance(msg, m.Hello):
                        raise m.BadMessage("hello must come first, and once")
                    reply = m.reply_frame(HANDLERS[type(msg)](self, conn, msg))
                except UserError as e:  # a budget too small for the state, a full /dev/shm: the user's to fix
                    reply = m.error_frame(str(e), user=True)
                except Exception as e:  # the trainer raises it; the keeper keeps serving
                    log.exception("request %s failed", frame.get("op"))
                    reply = m.error_frame(str(e))
                channel.send(reply)
        except (OSError, WireError):
            pass
        finally:
            with self.lock:
                self.conns.pop(conn.id, None)
                if conn.rank >= 0 and all(c.rank != conn.rank for c in self.conns.values()):
                    self.node.store.reset_rank(conn.rank)

    # ------------------------------------------------------------ handlers

    def _hello(self, conn: Conn, msg: m.Hello) -> m.HelloReply:
        conn.greeted = True
        conn.rank = msg.rank
        self.node.hello(msg)
        if msg.rank >= 0:
            self.node.store.reset_rank(msg.rank)
            with self.lock:
                self.hello.add(msg.rank)
                self.bye.discard(msg.rank)
        return m.HelloReply(os.getpid(), self.node.store.budget, self.node.warning)

    def _alloc(self, conn: Conn, msg: m.Alloc) -> m.AllocReply:
        slot = self.node.store.alloc(conn.rank, msg.gen, msg.step, msg.nbytes, msg.wait_s, msg.durable, msg.copies)
        live = [s.id for s in self.node.store.slots if s.rank == conn.rank]  # the trainer unmaps the others
        return m.AllocReply(slot.id, slot.path, slot.size, live)

    def _filled(self, conn: Conn, msg: m.Filled) -> m.Done:
        slot = self.node.store.get(msg.slot)
        if slot.rank != conn.rank or slot.state != "filling" or slot.step != msg.step or slot.gen != msg.gen:
            raise ValueError(f"slot {msg.slot} is not rank {conn.rank}'s capture of step {msg.step}")
        self.node.filled(slot, msg)
        return m.Done()

    def _release(self, conn: Conn, msg: m.Release) -> m.Done:
        slot = self.node.store.get(msg.slot)
        if slot.rank != conn.rank or slot.state != "filling":
            raise ValueError(f"slot {msg.slot} is not a capture of rank {conn.rank} in progress")
        self.node.store.free(slot)
        return m.Done()

    def _status(self, conn: Conn, msg: m.Status) -> m.StatusReply:
        return self.node.status(conn.rank, msg.gen, msg.steps)

    def _l0_commit(self, conn: Conn, msg: m.L0Commit) -> m.Done:
        self.node.store.commit_l0(conn.rank, msg.gen, msg.step)
        if self.node.exchange is not None:
            self.node.exchange.committed(msg.gen, msg.step)
        return m.Done()

    def _commit(self, conn: Conn, msg: m.Commit) -> m.Done:
        self.node.writers[msg.level].put(CommitJob(msg.gen, msg.step, msg.manifest))
        return m.Done()

    def _snapshots(self, conn: Conn, msg: m.Snapshots) -> m.SnapshotsReply:
        return m.SnapshotsReply([{"rank": s.rank, "step": s.step, "world": s.world, "path": s.path,
                                  "records": s.records, "objects": s.objects}
                                 for s in sorted(self.node.store.ready(), key=lambda s: (s.rank, s.step))])

    def _bye(self, conn: Conn, msg: m.Bye) -> m.Done:
        with self.lock:
            self.bye.add(conn.rank)
        return m.Done()

    def _shutdown(self, conn: Conn, msg: m.Shutdown) -> m.Done:
        self.stop.set()
        return m.Done()


HANDLERS = {
    m.Hello: KeeperServer._hello,
    m.Alloc: KeeperServer._alloc,
    m.Filled: KeeperServer._filled,
    m.Release: KeeperServer._release,
    m.Status: KeeperServer._status,
    m.L0Commit: KeeperServer._l0_commit,
    m.Commit: KeeperServer._commit,
    m.Snapshots: KeeperServer._snapshots,
    m.Bye: KeeperServer._bye,
    m.Shutdown: KeeperServer._shutdown,
    **{cls: (lambda h: lambda server, conn, msg: h(server.node, msg))(h) for cls, h in exchange.HANDLERS.items()},
}


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
