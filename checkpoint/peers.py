"""Share exchange between node keepers over TCP, authenticated with the per-job token.

A keeper runs a ``PeerServer`` over what it holds (a ``ShareSource``: its snapshot's data
shares and its parity shares) and publishes the server's address in the job's
torch.distributed store under ``kintsugi/<job>/keeper/<node>``. Other keepers read shares
through a ``PeerClient``, which is an ``erasure.ShareReader``: encoding parity and
rebuilding a lost node run unchanged over the network.

Wire format (nothing is ever pickled):

    handshake   server -> MAGIC + nonce_s (32 B)
                client -> nonce_c (32 B) + HMAC-SHA256(token, "client" + nonce_s + nonce_c)
                server -> 0x01 + HMAC-SHA256(token, "server" + nonce_c + nonce_s), or 0x00 and close
    request     u32 length + JSON {"op": "header"|"read"|"held", step, codeword, index, offset, length}
    reply       u32 length + JSON {"ok": true, ...} [+ "nbytes" raw bytes] | {"ok": false, "error"}

Both sides prove they know the token without sending it, so a peer with a wrong token,
or a forged server, is refused before any share moves. Share bytes are checked end to end
against the checksums in the share headers by the coding layer (erasure.py). Every socket
has a timeout, so a dead or stuck peer costs at most `timeout` seconds, never a hang.
"""
from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import threading
from typing import Protocol

from checkpoint.erasure import ShareError, ShareHeader, ShareReader

log = logging.getLogger(__name__)

MAGIC = b"KINTSUGI-PEER-1\n"
NONCE = 32
MAX_JSON = 1 << 20  # a request/reply header is < 1 KB; anything larger is not a peer


class PeerError(ShareError):
    """A peer could not be reached, stopped answering, or broke the protocol."""


class PeerAuthError(PeerError):
    """The other side does not know the job's token."""


class ShareSource(ShareReader, Protocol):
    def held(self) -> list[ShareHeader]: ...


def _mac(token: bytes, role: bytes, a: bytes, b: bytes) -> bytes:
    return hmac.new(token, role + a + b, hashlib.sha256).digest()


def _token(token: bytes | str) -> bytes:
    token = token.encode() if isinstance(token, str) else bytes(token)
    if len(token) < 16:
        raise ValueError("the peer token must have at least 16 bytes")
    return token


def _recv_exact(sock: socket.socket, n: int, into: bytearray | None = None) -> bytearray:
    buf = into if into is not None else bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += r
    return buf


def _send_msg(sock: socket.socket, msg: dict, payload=None):
    raw = json.dumps(msg, separators=(",", ":")).encode()
    sock.sendall(struct.pack("!I", len(raw)) + raw)
    if payload is not None and len(payload):
        sock.sendall(payload)


def _recv_msg(sock: socket.socket) -> dict:
    (n,) = struct.unpack("!I", _recv_exact(sock, 4))
    if n > MAX_JSON:
        raise ConnectionError(f"message header of {n} bytes; not a Kintsugi peer")
    msg = json.loads(_recv_exact(sock, n))
    if not isinstance(msg, dict):
        raise ConnectionError("message is not a JSON object; not a Kintsugi peer")
    return msg


class PeerServer:
    """Serves `source`'s shares to peers that know `token`; one thread per connection."""

    def __init__(self, source: ShareSource, token: bytes | str, host: str = "", port: int = 0,
                 advertise: str = "", timeout: float = 30.0):
        self.source, self.token, self.timeout = source, _token(token), timeout
        self._listener = socket.create_server((host, port), reuse_port=False)
        self._listener.settimeout(0.5)  # lets close() stop the accept loop
        self.address = f"{advertise or host or socket.gethostname()}:{self._listener.getsockname()[1]}"
        self.refused = 0  # connections refused for a wrong token or broken handshake
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="peer-server", daemon=True)
        self._thread.start()

    def close(self):
        self._stop.set()
        self._thread.join()
        self._listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn, addr), daemon=True).start()

    def _connection(self, conn: socket.socket, addr):
        with conn:
            conn.settimeout(self.timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if not self._handshake(conn, addr):
                    return
                while not self._stop.is_set():
                    self._answer(conn, _recv_msg(conn))
            except (OSError, ConnectionError, ValueError, struct.error) as e:
                log.debug("peer connection from %s closed: %s", addr, e)

    def _handshake(self, conn: socket.socket, addr) -> bool:
        nonce_s = os.urandom(NONCE)
        conn.sendall(MAGIC + nonce_s)
        hello = _recv_exact(conn, NONCE + 32)
        nonce_c, proof = bytes(hello[:NONCE]), bytes(hello[NONCE:])
        if not hmac.compare_digest(proof, _mac(self.token, b"client", nonce_s, nonce_c)):
            self.refused += 1
            log.warning("refused a peer connection from %s:%s: it does not know the job token", *addr[:2])
            conn.sendall(b"\x00")
            return False
        conn.sendall(b"\x01" + _mac(self.token, b"server", nonce_c, nonce_s))
        return True

    def _answer(self, conn: socket.socket, req: dict):
        try:
            op = req.get("op")
            if op == "held":
                return _send_msg(conn, {"ok": True, "held": [json.loads(h.to_json()) for h in self.source.held()]})
            step, codeword, index = (int(req[key]) for key in ("step", "codeword", "index"))
            if op == "header":
                h = self.source.header(step, codeword, index)
                return _send_msg(conn, {"ok": True, "header": json.loads(h.to_json())})
            if op == "read":
                data = self.source.read(step, codeword, index, int(req["offset"]), int(req["length"]))
                return _send_msg(conn, {"ok": True, "nbytes": len(data)}, data)
            raise ShareError(f"unknown request {op!r}")
        except (ShareError, KeyError, TypeError, ValueError) as e:
            _send_msg(conn, {"ok": False, "error": str(e)})


class PeerClient:
    """A connection to one peer keeper; an erasure.ShareReader over TCP.

    Connects on first use and reconnects once after a broken connection; any failure
    within `timeout` seconds raises PeerError.
    """

    def __init__(self, address: str, token: bytes | str, timeout: float = 10.0):
        host, _, port = address.rpartition(":")
        self.address, self.host, self.port = address, host, int(port)
        self.token, self.timeout = _token(token), timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise PeerError(f"peer keeper at {self.address} unreachable: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            greeting = _recv_exact(sock, len(MAGIC) + NONCE)
            if greeting[:len(MAGIC)] != MAGIC:
                raise PeerAuthError(f"{self.address} is not a Kintsugi peer keeper")
            nonce_s, nonce_c = bytes(greeting[len(MAGIC):]), os.urandom(NONCE)
            sock.sendall(nonce_c + _mac(self.token, b"client", nonce_s, nonce_c))
            verdict = _recv_exact(sock, 1)
            if verdict != b"\x01":
                raise PeerAuthError(f"peer keeper at {self.address} refused our job token")
            proof = bytes(_recv_exact(sock, 32))
            if not hmac.compare_digest(proof, _mac(self.token, b"server", nonce_c, nonce_s)):
                raise PeerAuthError(f"peer at {self.address} does not know the job token (forged peer); refused")
        except (OSError, ConnectionError) as e:
            sock.close()
            raise PeerError(f"handshake with peer keeper at {self.address} failed: {e}") from None
        except PeerAuthError:
            sock.close()
            raise
        return sock

    def _call(self, req: dict, into: bytearray | None = None) -> tuple[dict, bytearray | None]:
        with self._lock:
            for attempt in (0, 1):
                fresh = self._sock is None
                if fresh:
                    self._sock = self._connect()
                try:
                    _send_msg(self._sock, req)
                    reply = _recv_msg(self._sock)
                    payload = None
                    if reply.get("ok") and "nbytes" in reply:
                        payload = _recv_exact(self._sock, int(reply["nbytes"]), into)
                    break
                except (OSError, ConnectionError, ValueError, struct.error) as e:
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

    def read(self, step: int, codeword: int, index: int, offset: int, length: int) -> bytearray:
        _, data = self._call({"op": "read", "step": step, "codeword": codeword, "index": index,
                              "offset": offset, "length": length})
        if data is None or len(data) != length:
            raise PeerError(f"peer keeper at {self.address} sent {0 if data is None else len(data)} of {length} bytes")
        return data


# ---------------------------------------------------------------- addresses in the job's store

def _key(job: str, node: int) -> str:
    return f"kintsugi/{job}/keeper/{node}"


def publish(store, job: str, node: int, address: str) -> None:
    """Announce node `node`'s keeper address in the torch.distributed store (a restarted
    keeper overwrites its predecessor's)."""
    store.set(_key(job, node), address)


def lookup(store, job: str, node: int, timeout: float = 30.0) -> str:
    """The keeper address node `node` published; PeerError if none appears in `timeout` s."""
    key = _key(job, node)
    try:
        store.wait([key], datetime.timedelta(seconds=timeout))
        return store.get(key).decode()
    except RuntimeError as e:  # torch's stores raise RuntimeError/DistStoreError on timeout
        raise PeerError(f"no keeper address for node {node} in the job store after {timeout:.0f} s: {e}") from None
