"""Share exchange between keepers over TCP: real processes on loopback, real kill -9.

Each "node" is a separate process (``python tests/test_peers.py serve ...``) holding a
snapshot and a PeerServer; it publishes its address in a real TCPStore, encodes its parity
by reading its peers' data shares over TCP, then serves until killed.
"""
import datetime
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time

import pytest

from checkpoint.erasure import GroupCode, NodeShares, ShareError, rebuild_snapshot
from checkpoint.keeper.peers import PeerAuthError, PeerClient, PeerError, PeerServer, lookup, publish

JOB = "peers-test"
SNAPSHOT = 300_000  # bytes per node; spans several 64 KiB stripes


def snapshot_of(seed: int, pos: int) -> bytes:
    return random.Random(seed * 1000 + pos).randbytes(SNAPSHOT + 17 * pos)


def serve(store_port: int, pos: int, k: int, m: int, seed: int, corrupt: bool):
    """One node: hold a snapshot, serve it, encode parity from peers, wait to be killed."""
    from torch.distributed import TCPStore

    token = os.environ["KINTSUGI_TEST_TOKEN"]
    store = TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=60))
    code = GroupCode(k, m)
    memory = bytearray(snapshot_of(seed, pos))
    node = NodeShares(JOB, 1, 0, pos, pos, code, memory)
    server = PeerServer(node, token, host="127.0.0.1")
    publish(store, JOB, pos, server.address)
    readers = {q: PeerClient(lookup(store, JOB, q), token) for q in range(code.n) if q != pos}
    node.encode({**readers, pos: node}, stripe=1 << 16)
    store.set(f"encoded/{pos}", "1")
    if corrupt:  # bit flips in memory after every node has encoded, in both data blocks
        store.wait([f"encoded/{q}" for q in range(code.n)])
        memory[5] ^= 0x10
        memory[-5] ^= 0x10
    store.set(f"ready/{pos}", "1")
    signal.pause()


@pytest.fixture
def group(tmp_path):
    """Start n node processes; yields (code, procs, clients, token); kills what is left."""
    from torch.distributed import TCPStore

    procs, token = [], secrets.token_hex(16)
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))

    def start(k, m, seed, corrupt=()):
        env = {**os.environ, "KINTSUGI_TEST_TOKEN": token, "PYTHONPATH": os.getcwd()}
        for pos in range(k + m):
            args = [sys.executable, __file__, "serve", str(store.port), str(pos), str(k), str(m), str(seed),
                    str(int(pos in corrupt))]
            procs.append(subprocess.Popen(args, env=env))
        while True:  # until every node is ready; a node that died fails the test at once
            try:
                store.wait([f"ready/{pos}" for pos in range(k + m)], datetime.timedelta(seconds=1))
                break
            except RuntimeError:
                assert all(p.poll() is None for p in procs), "a node process died while starting"
        clients = {pos: PeerClient(lookup(store, JOB, pos), token, timeout=5) for pos in range(k + m)}
        return GroupCode(k, m), procs, clients, token

    yield start
    for p in procs:
        p.kill()
        p.wait()


def kill9(proc):
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_wrong_token_refused_and_m_killed_nodes_rebuilt_over_tcp(group):
    code, procs, clients, token = group(2, 2, seed=1)
    with pytest.raises(PeerAuthError, match="refused our job token"):
        PeerClient(clients[0].address, secrets.token_hex(16)).held()
    assert len(clients[0].held()) == 4  # the real peer still serves the right token: 2 data + 2 parity
    lost = (0, 2)
    for pos in lost:
        kill9(procs[pos])
    alive = {pos: c for pos, c in clients.items() if pos not in lost}
    for pos in lost:
        assert rebuild_snapshot(code, 1, pos, alive, stripe=1 << 16).tobytes() == snapshot_of(1, pos)
    with pytest.raises(PeerError, match="unreachable"):  # a dead peer fails at once, no hang
        clients[0].header(1, 0, 0)


def test_corrupt_shares_are_rejected_over_tcp(group):
    code, procs, clients, token = group(2, 1, seed=2, corrupt=(1,))
    kill9(procs[0])
    with pytest.raises(ShareError, match="bad checksum"):
        rebuild_snapshot(code, 1, 0, {1: clients[1], 2: clients[2]}, stripe=1 << 16)


def test_forged_keeper_is_refused():
    """A keeper that does not know the token: the client learns it from the server's proof."""
    token = secrets.token_hex(16)
    node = NodeShares(JOB, 1, 0, 9, 0, GroupCode(1, 1), b"forged" * 10)
    with PeerServer(node, secrets.token_hex(16), host="127.0.0.1") as forged:
        with pytest.raises(PeerAuthError, match="refused our job token"):
            PeerClient(forged.address, token).held()
        assert forged.refused == 1


def test_forged_server_that_accepts_any_client_is_refused():
    """A server that speaks the protocol and says yes without knowing the token."""
    token = secrets.token_hex(16)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        fake = subprocess.Popen([sys.executable, "-c", f"""
import socket, os
s = socket.socket(fileno={listener.fileno()})
conn, _ = s.accept()
conn.sendall(b"KINTSUGI-WIRE-2\\n" + os.urandom(32))
conn.recv(64)
conn.sendall(b"\\x01" + os.urandom(32))
conn.recv(1)
"""], pass_fds=[listener.fileno()])
        try:
            with pytest.raises(PeerAuthError, match="forged"):
                PeerClient(f"127.0.0.1:{port}", token).held()
        finally:
            fake.kill()
            fake.wait()


def test_silent_peer_times_out_instead_of_hanging():
    """A peer that accepts the connection but never answers (a stuck keeper)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # kernel accepts, nobody speaks
        with pytest.raises(PeerError, match="handshake"):
            PeerClient(f"127.0.0.1:{listener.getsockname()[1]}", secrets.token_hex(16), timeout=0.5).held()


def test_garbage_client_does_not_hurt_the_server():
    node = NodeShares(JOB, 1, 0, 0, 0, GroupCode(1, 1), b"x" * 100)
    token = secrets.token_hex(16)
    with PeerServer(node, token, host="127.0.0.1", timeout=0.5) as server:
        host, port = server.address.rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"\xff" * 200)
            s.settimeout(5)
            s.recv(100)
        with socket.create_connection((host, int(port))):
            time.sleep(0.6)  # a client that says nothing: the server drops it after its timeout
        assert PeerClient(server.address, token).read(1, 0, 0, 0, 100) == b"x" * 100
        assert server.refused == 2  # the garbage proof and the silent handshake


def test_addresses_through_the_store():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=10))
    publish(store, "job", 3, "10.0.0.3:1234")
    assert lookup(store, "job", 3) == "10.0.0.3:1234"
    publish(store, "job", 3, "10.0.0.9:99")  # a replacement keeper overwrites
    assert lookup(store, "job", 3) == "10.0.0.9:99"
    with pytest.raises(PeerError, match="no keeper address for node 4"):
        lookup(store, "job", 4, timeout=0.2)


if __name__ == "__main__" and sys.argv[1] == "serve":
    serve(*map(int, sys.argv[2:7]), corrupt=bool(int(sys.argv[7])))
