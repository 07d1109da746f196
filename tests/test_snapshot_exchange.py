"""The keeper's SnapshotExchange across real processes: a node killed (kill -9) while the
group encodes a new snapshot leaves a decodable one behind, and a fresh, empty keeper
rebuilds the lost node's level-0 slots from its peers byte for byte.

Each node process holds a real SlotStore (shared-memory slots, as in the keeper) and a
SnapshotExchange; it publishes its share server's address in a real TCPStore.
"""
import datetime
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

JOB = "exchange-test"
SIZE = 24 << 20  # bytes per node and step: encoding takes long enough to be killed inside


def payload(node: int, step: int) -> bytes:
    return random.Random(node * 100 + step).randbytes(SIZE + 1000 * node)


def node_main(store_port: int, node: int, steps: int, rebuild: int):
    from torch.distributed import TCPStore

    from checkpoint.keeper.exchange import SnapshotExchange
    from checkpoint.keeper.runtime import Instance
    from checkpoint.keeper.slots import SlotStore

    logging_setup()
    store = TCPStore("127.0.0.1", store_port, is_master=False, timeout=datetime.timedelta(seconds=120))
    slots = SlotStore(Instance(), 512 << 20)
    ex = SnapshotExchange(slots, os.environ["TOKEN"], timeout=30)
    plan = {"job": JOB, "group": 0, "pos": node, "k": 2, "m": 1}
    ex.configure(plan, os.environ["TOKEN"])
    store.set(f"addr/{node}", ex.server.address)
    plan["peers"] = {p: store.get(f"addr/{p}").decode() for p in range(3)}
    ex.configure(plan, os.environ["TOKEN"])
    if rebuild:
        info = ex.rebuild(rebuild)
        slot = next(s for s in slots.slots if s.step == rebuild)
        ok = bytes(slot.mm[:slot.used]) == payload(node, rebuild) and slot.records == [["rec", node, rebuild]] \
            and slots.l0_of(node) == ("g1", rebuild)
        store.set(f"rebuilt/{node}", f"{int(ok)} {info.bytes}")
    else:
        for step in range(1, steps + 1):
            store.wait([f"go/{step}"])
            data = payload(node, step)
            slot = slots.alloc(node, "g1", step, len(data), wait_s=60)
            slot.mm[:len(data)] = data
            slot.records, slot.objects = [["rec", node, step]], None
            slots.mark_ready(slot)
            slots.commit_l0(node, "g1", step)
            ex.committed("g1", step)
    signal.pause()


def logging_setup():
    import logging
    logging.basicConfig(level=logging.INFO, format=f"node[{os.getpid()}] %(message)s")


@pytest.fixture
def cluster():
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=120))
    token = secrets.token_hex(16)
    env = {**os.environ, "TOKEN": token, "PYTHONPATH": os.getcwd()}
    procs = []

    def start(node, steps=0, rebuild=0):
        procs.append(subprocess.Popen([sys.executable, __file__, str(store.port), str(node), str(steps), str(rebuild)],
                                      env=env))
        return procs[-1]

    yield store, token, start
    for p in procs:
        p.kill()
        p.wait()
    from checkpoint.keeper import collect_garbage

    collect_garbage()  # the killed nodes' shared memory


def coded_steps(client) -> set:
    return {h.step for h in client.held() if h.index >= 2}  # parity held: the step is coded there


def test_node_killed_mid_encode_is_rebuilt_from_a_coded_step(cluster):
    from checkpoint.keeper.peers import PeerClient

    store, token, start = cluster
    nodes = [start(node, steps=2) for node in range(3)]
    store.wait([f"addr/{n}" for n in range(3)])
    clients = [PeerClient(store.get(f"addr/{n}").decode(), token, timeout=5) for n in range(3)]
    store.set("go/1", "1")
    while not all(1 in coded_steps(c) for c in clients):
        time.sleep(0.05)
    store.set("go/2", "1")
    time.sleep(0.3)  # the group is now reading each other's step-2 data
    os.kill(nodes[2].pid, signal.SIGKILL)
    nodes[2].wait()
    time.sleep(1)  # let the survivors finish (or give up on) step 2
    both = coded_steps(clients[0]) & coded_steps(clients[1])
    assert both, "the survivors dropped every step both of them had coded"
    newest = max(both)  # what EcSnapshots.recover would choose
    start(2, rebuild=newest)  # a fresh keeper with empty memory
    store.wait(["rebuilt/2"])
    ok, nbytes = store.get("rebuilt/2").decode().split()
    assert ok == "1" and int(nbytes) > SIZE


if __name__ == "__main__":
    node_main(*map(int, sys.argv[1:5]))
