"""Multi-node paths proven across the hosts of the emulated cluster (tests/cluster.py,
docs/testbed.md): each test runs the real launcher (`kintsugi launch`) on every host, one
rank of the real trainer per host, a c10d rendezvous on the head host by name, and the
testbed's faults: a host killed whole (its port goes dark, then every process it ran dies
and its memory with them), a fresh machine in its place at the same address, a host
partitioned from the others, a hung host.

- keepers advertise the address their host reaches the rendezvous from; one that advertises
  an address its peers cannot reach (loopback, the old default) is one warning on rank 0;
- a worker crash restores from the keepers' memory; two hosts lost whole at once and replaced
  are rebuilt from the survivors' erasure-coded shares over the network (k=2, m=2), three
  lost fall back to disk; L1 is each host's own disk; the losses equal an uninterrupted run's;
- elastic shrink: a host lost for good, the survivors continue from the rebuilt snapshot
  resharded 3 -> 2, reading the lost rank's shard from another host's keeper;
- a partitioned host: the job goes on without it, and its own launcher gives up;
- the launcher's monitor excludes a hung host (`--on-fault exclude`).

The testbed's links carry no delay: a lost host is silence, so survivors notice it when a
collective times out (``parallel.timeout_s``: 10 s here).
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

from conftest import JOB, env, losses, records, train

pytestmark = pytest.mark.slow

BASE = ["--skip-preflight", "--config", str(JOB), "--snapshot.interval=1", "--snapshot.peer_timeout_s=5",
        "--parallel.timeout_s=10", "--train.log_every=1"]
# Elastic rounds: a dead node is noticed in ~2 s and a smaller round starts 5 s later.
ELASTIC = "join_timeout=60,read_timeout=15,last_call_timeout=5,keep_alive_interval=1,keep_alive_max_attempt=2"
GUARD_S = 600  # hang guards only, never speed limits


def l1_only(tb) -> list[str]:
    """Every step to each host's own disk (L1), none to the shared L2 until the end: the
    survivors of a lost host hold no complete step on disk, so they must resume from the
    keepers' memory (a complete L2 step newer than the newest coded one would rightly be
    taken instead)."""
    return ["--checkpoint.interval=1", f"--checkpoint.l1_dir={tb.local / 'l1'}", "--checkpoint.l1_interval=1",
            "--checkpoint.l1_keep_last=20", "--checkpoint.l2_interval=1000"]


def launch(tb, hosts, rdzv: str, nnodes: str, *args: str, max_restarts: int = 3, rdzv_conf: str = "") -> dict:
    """`kintsugi launch` on each of ``hosts`` (one rank each) for job ``rdzv``, its c10d
    rendezvous on the head host; host index -> process."""
    flags = ["--nnodes", nnodes, "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", tb.rdzv_endpoint(),
             "--rdzv-id", rdzv, "--max-restarts", str(max_restarts), *(["--rdzv-conf", rdzv_conf] if rdzv_conf else [])]
    return {h: tb.launch(h, *flags, "--node-rank", str(h), *args, env=env()) for h in hosts}


def said(tb, h=0) -> str:
    """What host ``h``'s launcher printed (rank 0 runs on node0, the first name in the rendezvous)."""
    path = tb.log(h)
    return path.read_text() if path.exists() else ""


def lines(text: str, pattern: str) -> list[str]:
    return re.findall(rf"^kintsugi: {pattern}.*$", text, re.M)


def keeper_log(run: Path, host) -> str:
    return "".join(p.read_text() for p in sorted((run / "keeper").glob(f"{host.name}-*.log")))


def coded(run: Path, host, since: int = 0) -> set[int]:
    """Steps host's keeper erasure-coded, in its log after offset ``since``."""
    return {int(s) for s in re.findall(r"step (\d+) erasure-coded", keeper_log(run, host)[since:])}


def wait_for(tb, cond, what: str, procs=()):
    deadline = time.monotonic() + GUARD_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}\n{logs(tb)}"
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"a launcher exited ({dead}) before {what}\n{logs(tb)}"
        time.sleep(0.2)


def wait_coded_after(tb, run: Path, hosts, procs, marks: dict, after: int):
    """Until every host's keeper has coded a step newer than ``after`` since its log offset in ``marks``."""
    wait_for(tb, lambda: all(any(s > after for s in coded(run, tb.host(h), marks.get(h, 0))) for h in hosts),
             f"every keeper coded a step after {after}", procs)


def l1_step(tb, step: int, into: Path) -> Path:
    """Step ``step`` whole on disk for a reference run: each host's L1 holds its ranks' shards."""
    out = into / f"step_{step:08d}"
    for h in tb.hosts:
        shutil.copytree(Path(h.local_dir, "l1", out.name), out, dirs_exist_ok=True)
    return out


def finish(tb, procs: dict) -> list[int]:
    return [p.wait(timeout=GUARD_S) for p in procs.values()]


def logs(tb) -> str:
    return "\n".join(f"--- {h.name}\n{said(tb, h)[-4000:]}" for h in tb.hosts)


# ---------------------------------------------------------------------------------- advertise

def test_keepers_advertise_routable_addresses_and_an_unreachable_peer_is_one_line(testbed):
    """node0's keeper advertises its own address on the testbed (the interface that reaches
    the rendezvous); node1's advertises 127.0.0.1 (what every keeper published before), so
    node0 cannot read its shares: rank 0 says so in one line, not once per step."""
    tb = testbed(2)
    run = tb.shared / "run"
    args = [*BASE, f"--train.run_dir={run}", "--train.steps=6", "--snapshot.k=1", "--snapshot.m=1"]
    procs = {0: launch(tb, [0], "adv", "2", *args)[0], 1: launch(tb, [1], "adv", "2", *args, "--snapshot.advertise=127.0.0.1")[1]}
    assert finish(tb, procs) == [0, 0], logs(tb)
    out = said(tb, 0)
    warned = lines(out, "warning: snapshots are not erasure-coded")
    # One line for the cause, not one per step; node1's keeper may also say, once, that node0
    # held no snapshot of a step node0 could not code (the same cause, seen from the other side).
    unreachable = [w for w in warned if "unreachable" in w]
    assert len(unreachable) == 1 and len(warned) <= 2, out
    assert re.search(r"from step \d+ on: peer keeper at 127\.0\.0\.1:\d+ unreachable.*snapshot\.advertise", unreachable[0])
    node0, node1 = keeper_log(run, tb.host(0)), keeper_log(run, tb.host(1))
    assert re.search(rf"shares served at {re.escape(tb.host(0).addr)}:\d+, peers at .*127\.0\.0\.1:\d+", node0), node0
    assert re.search(r"shares served at 127\.0\.0\.1:\d+", node1), node1
    assert len(losses(run)) == 6  # training was not held up


# ------------------------------------------------------------------------- hosts lost whole

def test_hosts_lost_whole_are_rebuilt_from_peer_shares_then_disk(testbed, tmp_path):
    """4 hosts, k=2, m=2, a snapshot every step, L1 on each host's own disk every 2 steps,
    L2 on the shared one every 8. In one job: a worker crashes (its keeper keeps its memory);
    then two hosts are lost whole at once and fresh ones take their place, their snapshots
    rebuilt from the peers' shares over the network; then three, more than the code
    tolerates: disk, and L2, since L1 is gone with the three hosts' disks. Every continuation
    equals the uninterrupted run's losses. Rank 0 sleeps 200 ms a step so that coding keeps
    up with training: the hosts are killed once step 8 is coded, well before L2's next step
    (16), which would otherwise be newer than the coded step and be restored instead."""
    tb = testbed(4)
    run, l1 = tb.shared / "run", tb.local / "l1"
    args = [*BASE, f"--train.run_dir={run}", "--train.steps=20", "--snapshot.k=2", "--snapshot.m=2",
            f"--checkpoint.l1_dir={l1}", "--checkpoint.l1_interval=2", "--checkpoint.l2_interval=8"]
    procs = launch(tb, range(4), "ec", "4", *args, '--diagnostics.inject=["crash:rank=1,step=3", "slow:rank=0,ms=200"]',
                   max_restarts=8)
    recovered = lambda: lines(said(tb), "recovered step")

    # 1. a worker crash: every keeper still holds the newest step
    wait_for(tb, lambda: len(recovered()) == 1, "the crashed worker's job recovered", procs.values())
    assert re.fullmatch(r"kintsugi: recovered step \d+ from memory \(node keepers\) in [\d.]+ s", recovered()[0])

    # 2.-4. hosts lost whole (every process, its memory and its disk), fresh machines in their place
    for lost, want, coded_from in (([2, 3], r"from memory via EC rebuild of node\(s\) \[2, 3\]", 8),
                                   ([1, 2, 3], r"from disk L2 \(nodes \[1, 2, 3\] lost, more than the code tolerates", 0)):
        before = len(recovered())
        step = int(re.search(r"recovered step (\d+)", recovered()[-1])[1])
        marks = {h.index: len(keeper_log(run, h)) for h in tb.hosts}
        wait_coded_after(tb, run, range(4), procs.values(), marks, max(step, coded_from - 1))
        if lost == [1, 2, 3]:  # L1: each host wrote its own rank's shards to its own disk
            l1_shards = lambda h: {p.name for p in Path(h.local_dir, "l1").glob("step_*/shard_*")}
            # (a replaced host's keeper may code a step before it writes its first L1 step)
            wait_for(tb, lambda: all(l1_shards(h) for h in tb.hosts), "every host wrote an L1 step", procs.values())
            for h in tb.hosts:
                assert l1_shards(h) <= {f"shard_{h.index:05d}.safetensors"}, (h.name, l1_shards(h))
        for h in lost:
            tb.kill(h)
        for h in lost:
            tb.replace(h)
            procs[h] = launch(tb, [h], "ec", "4", *args, max_restarts=8)[h]
        wait_for(tb, lambda: len(recovered()) > before, f"the job recovered from losing hosts {lost}", [procs[0]])
        assert re.fullmatch(rf"kintsugi: recovered step \d+ {want}.* in [\d.]+ s", recovered()[-1]), recovered()

    assert finish(tb, procs) == [0, 0, 0, 0], logs(tb)
    train(4, tmp_path / "uninterrupted", "--train.steps=20")
    assert losses(run) == losses(tmp_path / "uninterrupted") and len(losses(run)) == 20
    redone = [r for r in records(run / "metrics.jsonl") if r.get("redone")]
    assert redone  # steps trained again after a recovery equal the first time's (losses() keeps the last)


# ------------------------------------------------------------------------------ elastic shrink

def test_elastic_shrink_across_hosts_reads_the_lost_ranks_shards_from_another_host(testbed, tmp_path):
    """`--nnodes 2:3`, FSDP2 over 3 hosts (k=2, m=1; every step also to each host's own L1,
    L2 only at the end). node1 is lost for good: the survivors restart as 2 ranks, node0's
    keeper rebuilds node1's snapshot from its own and node2's shares and serves it; the new
    rank 1 (node2) reads its rows of old rank 1 from node0's keeper over the network. The
    continued losses equal the uninterrupted 3-rank run's (the same global batch, up to the
    reduction's rounding); the survivors then code over the 2 hosts left (k=1, m=1)."""
    tb = testbed(3)
    run = tb.shared / "run"
    args = [*BASE, f"--train.run_dir={run}", "--train.steps=12", "--data.batch_size=12", "--snapshot.k=2",
            "--snapshot.m=1", *l1_only(tb)]
    procs = launch(tb, range(3), "shrink", "2:3", *args, rdzv_conf=ELASTIC)
    wait_coded_after(tb, run, range(3), procs.values(), {}, 1)
    tb.kill(1)
    del procs[1]
    assert finish(tb, procs) == [0, 0], logs(tb)
    out = said(tb, 0)
    (line,) = lines(out, "recovered step")
    step = int(re.fullmatch(r"kintsugi: recovered step (\d+) from memory via EC rebuild of node\(s\) \[1\] onto 2 ranks "
                            r"\(was 3\) in [\d.]+ s", line)[1])
    assert "kintsugi: snapshots are now erasure-coded over 2 nodes: group 0: 2 nodes, k=1, m=1" in out
    # the new rank 1 runs on node2: old rank 1's rows came from node0's keeper, which rebuilt them
    rank1 = (run / "logs" / "rank1.log").read_text()
    assert re.search(rf"step {step}: read level-0 shards over the network: .*from the keeper at "
                     rf"{re.escape(tb.host(0).addr)}:\d+", rank1), rank1[-3000:]
    for h in (0, 2):  # coding goes on over the 2 hosts left
        log = keeper_log(run, tb.host(h))
        assert any(s > step for s in coded(run, tb.host(h), log.rindex("(k=1, m=1)"))), log[-3000:]

    train(3, tmp_path / "uninterrupted", "--train.steps=12", "--data.batch_size=12")
    got, want = losses(run), losses(tmp_path / "uninterrupted")
    assert sorted(got) == list(range(1, 13))
    for s in range(step + 1, 13):  # the same global batch on 2 ranks: equal up to the reduction's rounding
        assert got[s] == pytest.approx(want[s], rel=1e-5), (s, got[s], want[s])


# ------------------------------------------------------------------------------ partition

def test_partitioned_host_the_job_goes_on_without_it_and_its_launcher_gives_up(testbed, tmp_path):
    """`--nnodes 1:2` on 2 hosts (k=1, m=1: each keeper mirrors the other's snapshot; L1 on
    each host's own disk every step, no L2 until the end). node1 is cut off (its processes
    keep running): node0 goes on alone from node1's snapshot rebuilt out of its own parity
    (its L1 holds only its own shards), and node1's launcher, which can reach neither its
    peer nor the rendezvous, ends with an error after one rendezvous round instead of
    waiting forever."""
    tb = testbed(2)
    run = tb.shared / "run"
    args = [*BASE, f"--train.run_dir={run}", "--train.steps=10", "--snapshot.k=1", "--snapshot.m=1", *l1_only(tb)]
    # a short rendezvous round: node1's launcher gives up after join_timeout + 2 x read_timeout
    procs = launch(tb, range(2), "split", "1:2", *args,
                   rdzv_conf=ELASTIC.replace("join_timeout=60", "join_timeout=10").replace("read_timeout=15", "read_timeout=8"))
    wait_coded_after(tb, run, range(2), procs.values(), {}, 1)
    tb.partition(1)
    assert procs[0].wait(timeout=GUARD_S) == 0, logs(tb)
    assert procs[1].wait(timeout=GUARD_S) != 0, logs(tb)
    assert lines(said(tb, 1), "torchrun.s agent has had no workers for 26 s"), said(tb, 1)[-3000:]
    out = said(tb, 0)
    (line,) = lines(out, "recovered step")
    step = int(re.fullmatch(r"kintsugi: recovered step (\d+) from memory via EC rebuild of node\(s\) \[1\] onto 1 ranks "
                            r"\(was 2\) in [\d.]+ s", line)[1])
    assert "kintsugi: 1 node left: snapshots are no longer erasure-coded" in out
    train(1, tmp_path / "from-disk", "--train.steps=10", f"--checkpoint.load_from={l1_step(tb, step, tmp_path)}")
    got, want = losses(run), losses(tmp_path / "from-disk")
    assert sorted(want) == list(range(step + 1, 11)) and {s: got[s] for s in want} == want


# ------------------------------------------------------------------------------ exclude a hung host

def test_monitor_excludes_a_hung_host_and_the_job_finishes_on_the_rest(testbed):
    """`--on-fault exclude`, `--nnodes 1:2`: rank 1 (node1) stops before step 5 and never comes
    back. Both hosts' monitors read the shared run directory: node1's names its own rank and
    stops its agent, node0's waits for that; node0 goes on alone from the snapshot."""
    tb = testbed(2)
    run = tb.shared / "run"
    args = [*BASE, f"--train.run_dir={run}", "--train.steps=10", "--snapshot.k=1", "--snapshot.m=1",
            "--on-fault", "exclude", '--diagnostics.inject=["hang:rank=1,step=5"]',
            # named a hang before a collective times out (a rank that saves every step is always
            # just out of its checkpoint phase, which has the longer limit)
            "--parallel.timeout_s=120", "--diagnostics.hang_slow_phase_s=10"]
    procs = launch(tb, range(2), "hung", "1:2", *args, rdzv_conf=ELASTIC)
    assert procs[0].wait(timeout=GUARD_S) == 0, logs(tb)
    assert procs[1].wait(timeout=GUARD_S) != 0, logs(tb)
    actions = records(run / "diagnostics" / "actions.jsonl")
    (excluded,) = [a for a in actions if a["action"] == "exclude"]
    assert excluded["node"] == 1 and excluded["host"] == "node1"
    assert excluded["verdict"]["kind"] == "hang_noncomm" and excluded["verdict"]["suspects"][0]["rank"] == 1
    # node0's monitor left it to node1's: it waits on the hang, or (having polled only after
    # node1 killed its workers) sees rank 1 gone, which torchrun handles
    assert {a["action"] for a in actions if a["node"] == 0} <= {"wait", "warn"}
    (line,) = lines(said(tb, 0), "recovered step")
    assert re.fullmatch(r"kintsugi: recovered step [34] from memory via EC rebuild of node\(s\) \[1\] onto 1 ranks "
                        r"\(was 2\) in [\d.]+ s", line), line
    assert max(losses(run)) == 10
