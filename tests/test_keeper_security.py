"""The keeper's local trust and the peer exchange's integrity, against real sockets, files
and processes: a runtime directory someone else made (or a link) is refused with one line;
a squatter on the keeper's socket learns nothing and is refused; a share altered on the
wire is rejected; oversized lengths are refused before anything is allocated; a flood of
connections costs bounded threads; a killed keeper's shared memory is collected, a live
one's never."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from checkpoint.erasure import GroupCode, NodeShares
from checkpoint.keeper import KeeperClient
from checkpoint.keeper.peers import PeerClient, PeerError, PeerServer
from checkpoint.keeper.runtime import SHM, open_segment
from checkpoint.keeper.wire import HEADER, MAGIC, AuthError, client_handshake, serve_handshake

import conftest

ROOT = Path(__file__).resolve().parent.parent


def run_trainer(tmp_path: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    """One process of the real trainer whose runtime directory is under ``tmpdir``."""
    env = conftest.env(TMPDIR=str(tmpdir))
    env.pop("XDG_RUNTIME_DIR", None)
    return subprocess.run([sys.executable, "-m", "trainer", "--config", str(conftest.JOB),
                           f"--train.run_dir={tmp_path / 'run'}", "--train.steps=2"],
                          env=env, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("squat", ["foreign owner", "symlink", "open to others"])
def test_runtime_dir_not_ours_is_refused_in_one_line(tmp_path, squat):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    runtime = tmpdir / f"kintsugi-{os.getuid()}"
    if squat == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        runtime.symlink_to(tmp_path / "elsewhere")
    else:
        runtime.mkdir(mode=0o700)
        if squat == "foreign owner":
            if os.getuid() != 0:
                pytest.skip("making a directory owned by another user needs root")
            os.chown(runtime, 65534, 65534)
        else:
            os.chmod(runtime, 0o777)
    out = run_trainer(tmp_path, tmpdir)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    line, = [line for line in out.stderr.splitlines() if line.startswith("kintsugi: error:")]
    assert str(runtime) in line and {"foreign owner": "belongs to uid 65534", "symlink": "symbolic link",
                                     "open to others": "writable by others"}[squat] in line


def test_squatter_on_the_keeper_socket_is_refused_and_learns_nothing(tmp_path):
    """A process that binds the keeper's socket path without knowing the job token: the
    client never sends the token (it proves knowledge), and refuses the forged server."""
    path = str(tmp_path / "keeper.sock")
    seen = []
    listening = threading.Event()

    def squatter():
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path)
            s.listen(1)
            listening.set()  # not the path's existence: a connect between bind and listen is refused
            conn, _ = s.accept()
            with conn:
                conn.sendall(MAGIC + os.urandom(32))
                seen.append(conn.recv(1024))
                conn.sendall(b"\x01" + os.urandom(32))  # "yes", with a proof it cannot make
                seen.append(conn.recv(1024))

    t = threading.Thread(target=squatter)
    t.start()
    assert listening.wait(30)
    token = secrets.token_hex(32)
    with pytest.raises(AuthError, match="forged"):
        KeeperClient(path, token, rank=0)
    t.join()
    assert not any(token.encode() in got for got in seen)  # only a nonce and an HMAC went out


def test_open_segment_refuses_anything_but_a_private_keeper_segment(tmp_path):
    with pytest.raises(PermissionError, match="not a keeper segment"):
        open_segment(str(tmp_path / "kintsugi-0123456789abcdef-r0-0"))
    link = SHM / f"kintsugi-{secrets.token_hex(8)}-r0-0"
    link.symlink_to("/etc/passwd")
    try:
        with pytest.raises(OSError):  # O_NOFOLLOW
            open_segment(str(link))
    finally:
        link.unlink()


# ----------------------------------------------------------------------------- the peer exchange

@pytest.fixture
def served():
    token = secrets.token_hex(16)
    data = os.urandom(1 << 20)
    node = NodeShares("job", 1, 0, 0, 0, GroupCode(1, 1), data)
    server = PeerServer(node, token, host="127.0.0.1", timeout=1.0)
    yield server, token, data
    server.close()


class Tamper:
    """A TCP relay between a client and the server that flips one byte of the server's
    bytes once ``after`` bytes have passed (a bit error or an attacker on the wire)."""

    def __init__(self, target: str, after: int):
        host, port = target.rsplit(":", 1)
        self.target, self.after = (host, int(port)), after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)

        def pipe(src, dst, flip):
            passed = 0
            while data := src.recv(65536):
                if flip and passed <= self.after < passed + len(data):
                    data = bytearray(data)
                    data[self.after - passed] ^= 0x01
                passed += len(data)
                dst.sendall(data)
            dst.close()

        threading.Thread(target=pipe, args=(client, server, False), daemon=True).start()
        pipe(server, client, True)


def test_a_share_altered_on_the_wire_is_rejected(served):
    server, token, data = served
    clean = PeerClient(server.address, token)
    assert bytes(clean.read(1, 0, 0, 0, len(data))) == data
    tampered = PeerClient(Tamper(server.address, after=len(MAGIC) + 32 + 65 + 100_000).address, token)
    with pytest.raises(PeerError, match="failed authentication"):
        tampered.read(1, 0, 0, 0, len(data))


def test_oversized_lengths_are_refused_before_allocating(served):
    server, token, _ = served
    # a client that claims a 2 GiB request: the server drops it at the header
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        channel = client_handshake(s, token.encode(), "server")
        s.sendall(HEADER.pack(1 << 31, 0))  # 2 GiB of JSON
        s.settimeout(5)
        assert s.recv(10) == b""  # closed, not waiting for a terabyte
    # a server that answers a 100-byte read with a 1 TiB payload: the client refuses it
    listener = socket.create_server(("127.0.0.1", 0))

    def liar():
        conn, _ = listener.accept()
        channel = serve_handshake(conn, token.encode())  # it knows the token: a lying peer, not a stranger
        channel.recv(1 << 20)
        conn.sendall(HEADER.pack(11, 1 << 40) + b'{"ok":true}')
        time.sleep(1)
        conn.close()

    threading.Thread(target=liar, daemon=True).start()
    with pytest.raises(PeerError, match="exceeds the limit"):
        PeerClient(f"127.0.0.1:{listener.getsockname()[1]}", token).read(1, 0, 0, 0, 100)
    listener.close()
    assert PeerClient(server.address, token).read(1, 0, 0, 0, 100)  # the real server still serves


def test_a_connection_flood_costs_bounded_threads(served):
    server, token, data = served
    host, port = server.address.rsplit(":", 1)
    before = threading.active_count()
    flood = [socket.create_connection((host, int(port))) for _ in range(300)]
    time.sleep(0.3)
    assert threading.active_count() - before <= 64 + 2
    assert server.refused >= 300 - 64  # over the cap: closed at once
    for s in flood:
        s.close()
    time.sleep(1.5)  # the idle ones are dropped at the handshake timeout
    assert bytes(PeerClient(server.address, token).read(1, 0, 0, 0, 1000)) == data[:1000]


# ----------------------------------------------------------------------------- leaked memory

def test_killed_keepers_memory_is_collected_live_ones_never(tmp_path):
    from checkpoint import CheckpointConfig, Checkpointer, flatten
    import torch

    def keeper_segments(pid):
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        return {Path(line.split()[-1]) for line in maps if "/dev/shm/kintsugi-" in line}

    live = Checkpointer(CheckpointConfig(keeper_timeout_s=30), tmp_path / "live")
    live.save(1, flatten({"w": torch.ones(1000)}))
    live.check()
    doomed = Checkpointer(CheckpointConfig(keeper_timeout_s=30), tmp_path / "doomed")
    doomed.save(1, flatten({"w": torch.ones(1000)}))
    doomed.check()
    kept, lost = keeper_segments(live.keeper.pid), keeper_segments(doomed.keeper.pid)
    assert kept and lost
    os.kill(doomed.keeper.pid, signal.SIGKILL)
    conftest.wait_dead(doomed.keeper.pid)
    assert all(p.exists() for p in lost)  # kill -9: nobody unlinked them
    out = subprocess.run([sys.executable, "-m", "launch", "ckpt", "gc"], env=conftest.env(), cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "removed" in out.stdout, out.stderr
    assert not any(p.exists() for p in lost)
    assert all(p.exists() for p in kept)
    live.close()
    conftest.stop_keeper(tmp_path / "live")
    doomed.keeper.close()


def test_accepted_tcp_connections_send_without_nagle_delay():
    """A frame's MAC tag is written after its payload: with Nagle's algorithm on the serving
    side it waits for the peer's delayed ACK, every frame (docs/snapshots.md, "Rebuild speed")."""
    from checkpoint.keeper.wire import Acceptor

    token, seen = secrets.token_bytes(32), []
    listener = socket.create_server(("127.0.0.1", 0))
    Acceptor(listener, token, lambda channel, addr: seen.append(
        channel.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)), 4, 5.0, 5.0, "test")
    with socket.create_connection(listener.getsockname()) as s:
        client_handshake(s, token, "test")
        deadline = time.monotonic() + 30
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    listener.close()
    assert seen and seen[0] != 0

