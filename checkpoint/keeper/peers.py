"""Share exchange between node keepers over TCP, on the authenticated framing of
checkpoint/keeper/wire.py (mutual proof of the job's token, then every frame MACed with
the session key: a share altered, replayed or forged on the way is refused).

A keeper runs a ``PeerServer`` over what it holds (a ``ShareSource``: its snapshot's data
shares and its parity shares) and publishes the server's address in the job's
torch.distributed store under ``kintsugi/<job>/keeper/<node>``. Other keepers (and trainers
reading another node's level-0 shards) read through a ``PeerClient``, which is an
``erasure.ShareReader``: encoding parity and rebuilding a lost node run unchanged over the
network.

Requests: ``{"op": "held"}``, ``{"op": "header", step, codeword, index}``,
``{"op": "read", step, codeword, index, offset, length}``; replies ``{"ok": true, ...}``
(a read's bytes as the frame's payload, exactly ``length`` of them, checked before they
are received) or ``{"ok": false, "error"}``. Every socket has a timeout, so a dead or stuck
peer costs at most ``timeout`` seconds, never a hang; a server holds at most
``MAX_CONNECTIONS`` connections, and drops one that does not authenticate within
``HANDSHAKE_S``.
"""
from __future__ import annotations

import datetime
import json
import logging
import socket
import threading
from typing import Protocol

from checkpoint.erasure import ShareError, ShareHeader, ShareReader
from checkpoint.keeper.wire import Acceptor, AuthError, Channel, WireError, client_handshake, token_bytes

log = logging.getLogger(__name__)

MAX_JSON = 1 << 20  # a request or reply header is < 1 KB, a `held` list a few KB
MAX_CONNECTIONS = 64  # peers of a group (<= 256 with zfec) read a few at a time
HANDSHAKE_S = 5.0


class PeerError(ShareError):
    """A peer could not be reached, stopped answering, or broke the protocol."""


class PeerAuthError(PeerError):
    """The other side does not know the job's token."""


class ShareSource(ShareReader, Protocol):
    def held(self) -> list[ShareHeader]: ...


class PeerServer:
    """Serves ``source``'s shares to peers that know ``token``."""

    def __init__(self, source: ShareSource, token: bytes | str, host: str = "", port: int = 0,
                 advertise: str = "", timeout: float = 30.0):
        self.source, self.timeout = source, timeout
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.5)  # lets close() stop the accept loop
        self.address = f"{advertise or host or socket.gethostname()}:{self._listener.getsockname()[1]}"
        self._acceptor = Acceptor(self._listener, token_bytes(token), self._serve, MAX_CONNECTIONS,
                                  min(HANDSHAKE_S, timeout), timeout, "peer-server")
        self._stop = threading.Event()

    @property
    def token(self) -> bytes:
        return self._acceptor.token

    @token.setter
    def token(self, token: bytes | str):
        self._acceptor.token = token_bytes(token)

    @property
    def refused(self) -> int:
        """Connections refused: a wrong token, a broken handshake, or no place left."""
        return self._acceptor.refused

    def close(self):
        self._stop.set()
        self._listener.close()
        self._acceptor.thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self, channel: Channel, addr):
        try:
            while not self._stop.is_set():
                req, _ = channel.recv(MAX_JSON)
                self._answer(channel, req)
        except (OSError, WireError) as e:
            log.debug("peer connection from %s closed: %s", addr, e)

    def _answer(self, channel: Channel, req: dict):
        try:
            op = req.get("op")
            if op == "held":
                return channel.send({"ok": True, "held": [json.loads(h.to_json()) for h in self.source.held()]})
            step, codeword, index = (int(req[key]) for key in ("step", "codeword", "index"))
            if op == "header":
                return channel.send({"ok": True, "header": json.loads(self.source.header(step, codeword, index).to_json())})
            if op == "read":
                data = self.source.read(step, codeword, index, int(req["offset"]), int(req["length"]))
                return channel.send({"ok": True}, data)
            raise ShareError(f"unknown request {op!r}")
        except (ShareError, KeyError, TypeError, ValueError) as e:
            channel.send({"ok": False, "error": str(e)})


class PeerClient:
    """A connection to one peer keeper; an erasure.ShareReader over TCP.

    Connects on first use and reconnects once after a broken connection; any failure
    within ``timeout`` seconds raises PeerError.
    """

    def __init__(self, address: str, token: bytes | str, timeout: float = 10.0):
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port = address, host, int(port)
        self.token, self.timeout = token_bytes(token), timeout
        self._channel: Channel | None = None
        self._lock = threading.Lock()

    def close(self):
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _connect(self) -> Channel:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise PeerError(f"peer keeper at {self.address} unreachable: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return client_handshake(sock, self.token, f"peer keeper at {self.address}")
        except AuthError as e:
            sock.close()
            raise PeerAuthError(str(e)) from None
        except (OSError, WireError) as e:
            sock.close()
            raise PeerError(f"handshake with peer keeper at {self.address} failed: {e}") from None

    def _call(self, req: dict, expect: int = 0) -> tuple[dict, memoryview | None]:
        with self._lock:
            for attempt in (0, 1):
                fresh = self._channel is None
                if fresh:
                    self._channel = self._connect()
                try:
                    self._channel.send(req)
                    reply, payload = self._channel.recv(MAX_JSON, expect)
                    break
                except (OSError, WireError) as e:
                    self.close()
                    if fresh or attempt:  # a new connection failing is the peer, not a stale socket
                        raise PeerError(f"peer keeper at {self.address} stopped answering: {e}") from None
        if not reply.get("ok"):
            raise ShareError(f"peer keeper at {self.address}: {reply.get('error')}")
        return reply, payload

    def held(self) -> list[ShareHeader]:
        reply, _ = self._call({"op": "held"})
        return [ShareHeader.from_json(json.dumps(h)) for h in reply["held"]]

    def header(self, step: int, codeword: int, index: int) -> ShareHeader:
        reply, _ = self._call({"op": "header", "step": step, "codeword": codeword, "index": index})
        return ShareHeader.from_json(json.dumps(reply["header"]))

    def read(self, step: int, codeword: int, index: int, offset: int, length: int) -> memoryview:
        _, data = self._call({"op": "read", "step": step, "codeword": codeword, "index": index,
                              "offset": offset, "length": length}, expect=length)
        got = 0 if data is None else len(data)
        if got != length:
            raise PeerError(f"peer keeper at {self.address} sent {got} of {length} bytes")
        return data if data is not None else memoryview(b"")


# ---------------------------------------------------------------- addresses in the job's store

def _key(job: str, node: int) -> str:
    return f"kintsugi/{job}/keeper/{node}"


def publish(store, job: str, node: int, address: str) -> None:
    """Announce node ``node``'s keeper address in the torch.distributed store (a restarted
    keeper overwrites its predecessor's)."""
    store.set(_key(job, node), address)


def lookup(store, job: str, node: int, timeout: float = 30.0) -> str:
    """The keeper address node ``node`` published; PeerError if none appears in ``timeout`` s."""
    key = _key(job, node)
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))
        return store.get(key).decode()
    except RuntimeError as e:  # torch's stores raise RuntimeError/DistStoreError on timeout
        raise PeerError(f"no keeper address for node {node} in the job store after {timeout:.0f} s: {e}") from None
