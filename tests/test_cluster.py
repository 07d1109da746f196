"""The emulated cluster (tests/cluster.py): hosts that are machines of their own (names,
addresses, processes, no way out), shaped links measured with real transfers, the faults
(partition, kill, replace, slow CPU), teardown that leaves nothing, and the real launcher
and trainer running one rank per host."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import cluster
from conftest import JOB, ROOT, env, losses, need_testbed, train

NAMES = "import json, socket, sys; n = socket.gethostname(); " \
        "print(json.dumps({'name': n, 'addr': socket.gethostbyname(n), 'peers': {p: socket.gethostbyname(p) for p in sys.argv[1:]}}))"


def test_hosts_have_own_names_and_addresses_and_no_way_out(testbed):
    tb, other = testbed(3), testbed(1)
    names = [h.name for h in tb.hosts]
    seen = [json.loads(tb.run(h, [sys.executable, "-c", NAMES, *names], check=True).stdout) for h in tb.hosts]
    assert [s["name"] for s in seen] == names
    assert [s["addr"] for s in seen] == [h.addr for h in tb.hosts] and len({h.addr for h in tb.hosts}) == 3
    assert all(s["peers"] == {h.name: h.addr for h in tb.hosts} for s in seen)
    assert tb.reachable(0, 1) and tb.reachable(2, 0)  # by name, over the bridge
    # One path, each host's own disk (L1); one shared directory (L2).
    for h in tb.hosts:
        tb.run(h, ["sh", "-c", f'hostname > {tb.local}/me && hostname >> {tb.shared}/all'], check=True)
    assert [open(os.path.join(h.local_dir, "me")).read() for h in tb.hosts] == [f"{n}\n" for n in names]
    assert sorted(open(tb.shared / "all").read().split()) == names and not os.listdir(tb.local)
    # Only the testbed's /24 is routed: the box's own addresses, another testbed's hosts and
    # the world have no route (route lookups only: nothing is sent).
    box = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    outside = [line.split()[3].split("/")[0] for line in box.splitlines()] + [other.head.addr, "1.1.1.1"]
    for h in tb.hosts:
        assert tb.run(h, ["ip", "-4", "route"]).stdout.split()[0] == h.addr.rsplit(".", 1)[0] + ".0/24"
        for addr in outside:
            got = tb.run(h, ["ip", "route", "get", addr])
            assert got.returncode != 0 and "unreachable" in got.stderr, (addr, got.stdout)


def test_shaped_links_measure_slower(testbed):
    tb = testbed(4)
    tb.link([2, 3], [2, 3], rate_mbit=1000)  # hosts 2-3 on 1 Gbit Ethernet
    tb.link([0, 1], [2, 3], rate_mbit=200)  # 200 Mbit between the fabrics; 0-1 unshaped
    fast, ethernet, across = tb.measure(0, 1, 16), tb.measure(3, 2, 16), tb.measure(1, 2, 8)
    # A shaper never lets more through than its rate (MB/s = Mbit/s / 8, a little slack for
    # the bucket's first burst); the unshaped pair is limited by the CPU only.
    assert ethernet < 1.1 * 1000 / 8 and across < 1.1 * 200 / 8
    assert fast / across > 3 and ethernet / across > 2 and fast > ethernet
    tb.port(0, rate_mbit=100)  # a host's own slow port: what it sends and what it receives
    assert tb.measure(1, 0, 4) < 1.1 * 100 / 8 and tb.measure(0, 1, 4) < 1.1 * 100 / 8


def test_link_delay_shows_in_round_trips(testbed):
    tb = testbed(3)
    if not tb.can_delay:
        pytest.skip("this kernel has no netem (CONFIG_NET_SCH_NETEM): link delay and loss are not emulated here")
    tb.link(0, 1, delay_ms=20)
    assert tb.rtt(0, 1) >= 0.040 > tb.rtt(0, 2)  # 20 ms each way on 0-1 only


def test_delay_without_netem_is_one_clear_error(testbed):
    tb = testbed(2)
    if tb.can_delay:
        pytest.skip("this kernel has netem: delay works (test_link_delay_shows_in_round_trips)")
    with pytest.raises(cluster.Unavailable, match="no netem.*bandwidth shaping"):
        tb.link(0, 1, rate_mbit=100, delay_ms=20)
    assert not tb.st.links  # nothing half applied


def test_partition_drops_traffic_and_heal_restores_it(testbed):
    tb = testbed(3)
    assert tb.reachable(0, 1) and tb.reachable(1, 2)
    tb.partition(1)
    assert tb.connect(0, 1) == tb.connect(1, 2) == "TimeoutError"  # silence both ways
    assert tb.reachable(0, 2)  # the others still talk
    tb.heal(1)
    assert tb.reachable(0, 1) and tb.reachable(1, 2)


# A process tree like a node's: a child in a session of its own (the keeper) and an orphaned
# grandchild (double fork), each holding the host's shared memory.
TREE = ("import os, subprocess, sys, time; open('/dev/shm/snapshot', 'w').write('x'); "
        "subprocess.Popen(['sleep', '300'], start_new_session=True); "
        "os.fork() or (os.fork() or time.sleep(300), os._exit(0)); time.sleep(300)")


def _wait_for(cond, what: str, guard_s: float = 60):
    deadline = time.monotonic() + guard_s  # a hang guard, not a speed limit
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_kill_host_leaves_no_process_and_replace_gives_a_fresh_one(testbed):
    tb = testbed(2)
    tb.popen(1, [sys.executable, "-c", TREE])
    _wait_for(lambda: len(tb.pids(1)) >= 3, "the process tree did not start")
    victims, survivor = tb.pids(1), tb.popen(0, ["sleep", "300"])
    open(os.path.join(tb.host(1).local_dir, "ckpt"), "w").close()
    tb.kill(1)
    assert tb.pids(1) == [] and not [p for p in victims if _alive(p)]
    assert survivor.poll() is None  # host 0 is untouched
    assert not (tb.shm_root / "node1" / "snapshot").exists()  # its memory is gone with it
    assert os.path.exists(os.path.join(tb.host(1).local_dir, "ckpt"))  # its disk is not
    assert tb.connect(0, 1) == "TimeoutError"  # powered off: silence, not a reset
    new = tb.replace(1)
    assert (new.name, new.addr) == ("node1", tb.hosts[1].addr) and new.alive
    assert os.listdir(new.local_dir) == [] and tb.run(1, ["ls", "/dev/shm"]).stdout == ""
    assert tb.reachable(0, 1) and tb.reachable(1, 0)


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for its reaper."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_slow_cpu_throttles_a_host(testbed):
    tb = testbed(1)
    # The spin imports comms.probe (and torch with it) before the quota: at a tenth of a core
    # the import alone would take half a minute, and so can the interpreter's teardown of it
    # (one CI run waited 120 s for the exit after the answer): the spin leaves with _exit.
    spin = ("import os, sys, time; from comms.probe import throttled_s\n"
            "print('ready', flush=True); sys.stdin.readline()\n"
            "t0 = throttled_s(); c, w = time.process_time(), time.perf_counter()\n"
            "while time.process_time() - c < 0.2: pass\n"
            "print((time.perf_counter() - w) / (time.process_time() - c), throttled_s() - t0, flush=True)\n"
            "os._exit(0)")
    p = tb.popen(0, [sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    tb.slow_cpu(0, 0.1)
    out, _ = p.communicate("go\n", timeout=120)
    slower, throttled = map(float, out.split())
    # A tenth of a core: the spin's wall time is at least ~10x its CPU time, however idle the box;
    # and the host's processes see their throttling as on a real machine (the link probe's test).
    assert slower > 4 and throttled > 0.5


def _gone(tid: str) -> bool:
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return not cluster._leftovers(tid) and tid not in links and not os.path.exists(f"/etc/netns/{tid}-h0")


def test_teardown_leaves_nothing(tmp_path):
    need_testbed()
    tb = cluster.Testbed(2, root=tmp_path)
    sleeper = tb.popen(1, ["sleep", "300"])
    tb.link(0, 1, rate_mbit=100)
    tb.slow_cpu(1, 0.5)
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"{tb.id}-sw" in spaces and f"{tb.id}-h1" in spaces and cluster._leftovers(tb.id)
    tb.down()
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tb.id not in spaces and _gone(tb.id) and sleeper.poll() is not None


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_testbed_removed_when_its_owner_dies(tmp_path, sig):
    """SIGTERM: the owner's handler tears down; SIGKILL: its watchdog does."""
    need_testbed()
    owner = ("import sys, time; sys.path.insert(0, 'tests'); import cluster\n"
             "tb = cluster.Testbed(2, root=sys.argv[1]); tb.popen(1, ['sleep', '300'])\n"
             "print(tb.id, flush=True); time.sleep(300)")
    child = subprocess.Popen([sys.executable, "-c", owner, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    tid = child.stdout.readline().strip()
    assert tid and cluster._leftovers(tid)
    child.send_signal(sig)
    child.wait()
    _wait_for(lambda: _gone(tid), f"testbed {tid} left behind: {cluster._leftovers(tid)}")


@pytest.mark.slow
def test_launcher_and_trainer_across_hosts(testbed, tmp_path):
    """A 2-host job, one rank per host, through `kintsugi launch` with a c10d rendezvous on
    the head host by name: its losses equal a 2-rank run on one host."""
    tb = testbed(2)
    run_dir = tb.shared / "run"
    procs = tb.launch_job("cluster-test", "--config", str(JOB), f"--train.run_dir={run_dir}", env=env())
    rcs = [p.wait(timeout=900) for p in procs]  # a hang guard
    logs = "\n".join(tb.log(h).read_text()[-3000:] for h in tb.hosts)
    assert rcs == [0, 0], logs
    train(2, tmp_path / "one-host")
    assert losses(run_dir) == losses(tmp_path / "one-host") and len(losses(run_dir)) == 4
    # Each host ran its own keeper, under its own hostname.
    assert sorted(p.name.split("-")[0] for p in (run_dir / "keeper").glob("*.log")) == ["node0", "node1"]
