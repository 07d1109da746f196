"""Authenticated framing, spoken alike by the trainers' unix socket to their node keeper
and by the keepers' TCP share exchange.

Handshake: both sides prove they know the job token without sending it, so neither a
client nor a server that lacks it (a squatter on the socket path, a forged peer) gets
past it.

    server -> MAGIC + nonce_s (32 B)
    client -> nonce_c (32 B) + HMAC-SHA256(token, "client" | nonce_s | nonce_c)
    server -> 0x01 + HMAC-SHA256(token, "server" | nonce_c | nonce_s), or 0x00 and close
    session key = HMAC-SHA256(token, "session" | nonce_s | nonce_c)

Frames, either way:

    header  u32 JSON length | u64 payload length          (little endian)
    body    a JSON object, then the payload's raw bytes
    tag     Poly1305 over header | body, 16 B

Each frame's one-time Poly1305 key is HMAC-SHA256(session key, direction | counter), so a
frame can be neither forged, altered, replayed, reordered nor reflected back to its
sender; a bad tag ends the connection. Poly1305 (the `cryptography` package) runs at
memory speed, where HMAC-SHA256 over share payloads would cost more CPU than the erasure
coding itself. Both lengths are checked against the receiver's limits before anything is
allocated.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import socket
import struct
import threading

from cryptography.hazmat.primitives.poly1305 import Poly1305

log = logging.getLogger(__name__)

MAGIC = b"KINTSUGI-WIRE-2\n"
NONCE = 32
HEADER = struct.Struct("<IQ")
TAG = 16


class WireError(ConnectionError):
    """The other side broke the protocol, failed authentication, or went away."""


class AuthError(WireError):
    """The other side does not know the job token."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def token_bytes(token: bytes | str) -> bytes:
    token = token.encode() if isinstance(token, str) else bytes(token)
    if len(token) < 16:
        raise ValueError("a job token needs at least 16 bytes")
    return token


def recv_exact(sock: socket.socket, n: int, into=None) -> memoryview:
    buf = into if into is not None else bytearray(n)
    view, got = memoryview(buf).cast("B")[:n], 0
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += r
    return view


class Channel:
    """One authenticated connection; ``role`` is "client" or "server" (they MAC with
    different direction labels)."""

    def __init__(self, sock: socket.socket, key: bytes, role: str):
        self.sock, self.key = sock, key
        self.out_label, self.in_label = (b"c>s", b"s>c") if role == "client" else (b"s>c", b"c>s")
        self.sent = self.received = 0

    def _auth(self, label: bytes, seq: int) -> Poly1305:
        return Poly1305(_mac(self.key, label, struct.pack("<Q", seq)))

    def send(self, obj: dict, payload=None):
        raw = json.dumps(obj, separators=(",", ":")).encode()
        payload = memoryview(payload).cast("B") if payload is not None else memoryview(b"")
        head = HEADER.pack(len(raw), len(payload))
        auth = self._auth(self.out_label, self.sent)
        self.sent += 1
        auth.update(head + raw)
        auth.update(payload)
        self.sock.sendall(head + raw)
        if len(payload):
            self.sock.sendall(payload)
        self.sock.sendall(auth.finalize())

    def recv(self, max_json: int, max_payload: int = 0, into=None) -> tuple[dict, memoryview | None]:
        """The next frame's JSON object and payload (read into ``into`` when given). A
        length over ``max_json``/``max_payload`` ends the connection before any allocation."""
        head = bytes(recv_exact(self.sock, HEADER.size))
        n_json, n_payload = HEADER.unpack(head)
        if n_json > max_json or n_payload > max_payload:
            raise WireError(f"frame of {n_json} + {n_payload} bytes exceeds the limit of "
                            f"{max_json} + {max_payload}; not a Kintsugi peer, or a broken one")
        raw = bytes(recv_exact(self.sock, n_json))
        payload = recv_exact(self.sock, n_payload, into) if n_payload else None
        tag = bytes(recv_exact(self.sock, TAG))
        auth = self._auth(self.in_label, self.received)
        self.received += 1
        auth.update(head + raw)
        if payload is not None:
            auth.update(payload)
        try:
            auth.verify(tag)
        except Exception:  # cryptography's InvalidSignature
            raise WireError("a frame failed authentication (altered, replayed or forged); connection dropped") from None
        try:
            obj = json.loads(raw)
        except ValueError:
            raise WireError("a frame is not JSON") from None
        if not isinstance(obj, dict):
            raise WireError("a frame is not a JSON object")
        return obj, payload

    def close(self):
        self.sock.close()


def serve_handshake(sock: socket.socket, token: bytes) -> Channel | None:
    """The server's side; None when the client does not know the token (the caller says no
    with ``refuse``)."""
    nonce_s = os.urandom(NONCE)
    sock.sendall(MAGIC + nonce_s)
    hello = bytes(recv_exact(sock, NONCE + 32))
    nonce_c, proof = hello[:NONCE], hello[NONCE:]
    if not hmac.compare_digest(proof, _mac(token, b"client", nonce_s, nonce_c)):
        return None
    sock.sendall(b"\x01" + _mac(token, b"server", nonce_c, nonce_s))
    return Channel(sock, _mac(token, b"session", nonce_s, nonce_c), "server")


def refuse(sock: socket.socket):
    """Tell a client that does not know the token so, then the caller closes."""
    sock.sendall(b"\x00")


def client_handshake(sock: socket.socket, token: bytes, where: str) -> Channel:
    """The client's side; AuthError when either side does not know the token."""
    greeting = bytes(recv_exact(sock, len(MAGIC) + NONCE))
    if greeting[:len(MAGIC)] != MAGIC:
        raise AuthError(f"{where} does not speak Kintsugi's protocol")
    nonce_s, nonce_c = greeting[len(MAGIC):], os.urandom(NONCE)
    sock.sendall(nonce_c + _mac(token, b"client", nonce_s, nonce_c))
    if bytes(recv_exact(sock, 1)) != b"\x01":
        raise AuthError(f"{where} refused our job token")
    proof = bytes(recv_exact(sock, 32))
    if not hmac.compare_digest(proof, _mac(token, b"server", nonce_c, nonce_s)):
        raise AuthError(f"{where} does not know the job token (forged); refused")
    return Channel(sock, _mac(token, b"session", nonce_s, nonce_c), "client")


class Acceptor:
    """Accepts connections on ``listener`` and serves each on its own thread, at most
    ``max_conns`` at once: a connection beyond that is closed at once, and one that has not
    authenticated within ``handshake_s`` is dropped, so a flood of idle or bogus clients
    costs bounded threads and memory and frees its places quickly."""

    def __init__(self, listener: socket.socket, token: bytes, serve, max_conns: int, handshake_s: float,
                 timeout_s: float | None, name: str):
        self.listener, self.token, self.serve = listener, token, serve
        self.handshake_s, self.timeout_s = handshake_s, timeout_s
        self.places = threading.BoundedSemaphore(max_conns)
        self.refused = 0  # connections refused: wrong token, broken handshake, or no place left
        self.thread = threading.Thread(target=self._accept, name=f"{name}-accept", daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # the listener was closed
            if not self.places.acquire(blocking=False):
                self.refused += 1
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn, addr), daemon=True).start()

    def _connection(self, conn: socket.socket, addr):
        try:
            with conn:
                if conn.family != socket.AF_UNIX:
                    # A frame's 16-byte tag follows its payload in a write of its own: under
                    # Nagle's algorithm it waits for the peer's delayed ACK, tens of ms a frame.
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(self.handshake_s)
                try:
                    channel, why = serve_handshake(conn, self.token), "it does not know the job token"
                except (OSError, WireError) as e:
                    channel, why = None, f"broken handshake ({e})"
                if channel is None:
                    self.refused += 1  # counted before the client hears it
                    log.warning("refused a connection from %s: %s", addr or "a local process", why)
                    try:
                        refuse(conn)
                    except OSError:
                        pass
                    return
                conn.settimeout(self.timeout_s)
                self.serve(channel, addr)
        finally:
            self.places.release()
