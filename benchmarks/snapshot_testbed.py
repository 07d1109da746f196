"""The testbed mode of benchmarks/snapshot_bench.py (``--testbed``): erasure-coded snapshots
across the hosts of the emulated cluster (tests/cluster.py, docs/testbed.md), every host's
NIC shaped with tc.

    python benchmarks/snapshot_bench.py --testbed [--quick] [--nic-mbit 2000] [--filer-mbit 2000] [--json PATH]

1. Recovery of a lost host's snapshot. Three compute hosts form a group coded k=2, m=1;
   host 0 is the lost one's fresh replacement and rebuilds its snapshot from the shares its
   two peers serve (the project's share server and rebuild over TCP), against reading the
   same bytes from a shared L2 on a fourth host, a file server whose NIC is shaped like a
   network filesystem's (HTTP, one stream per reader, files in the server's page cache: the
   best case for L2, no NFS protocol cost). L2 is read by one host (that host alone
   restarts) and by all three at once (the whole job restarts from L2, as after a host loss
   without in-memory snapshots; with them, the survivors read their own memory).
2. Steady-state cost per step when shares cross the network: the real trainer and launcher,
   one rank per compute host, a snapshot every step coded k=2, m=1 between the keepers over
   the shaped NICs, against the same job without snapshots, and both again over unshaped
   NICs (the training's own collectives cross the same NICs). Rank 0's median wall time per step (between consecutive
   step records: the save's stall included) and the save's median stall; from the keepers'
   logs how long coding a step took and how many steps were coded.

Every number is measured, once, on this machine; the hosts share its cores, so a step's
time includes the other hosts' work (the report notes the load).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
K, M = 2, 1  # three compute hosts, any one of them rebuilt from the other two
SHARE_PORT, FILER_PORT = 29610, 29620
CHUNK = 1 << 20


def snapshot(pos: int, nbytes: int) -> np.ndarray:
    """Group position ``pos``'s snapshot: the same bytes in every process that makes it."""
    return np.random.default_rng(pos).integers(0, 256, nbytes, dtype=np.uint8)


# ------------------------------------------------------------------- roles run on the hosts

def serve_shares(pos: int, addr: str, token: str, nbytes: int):
    """Hold group position ``pos``'s snapshot and parity (coded here from every position's
    known bytes: the bench times the rebuild, not the coding) and serve them to peers."""
    from checkpoint.erasure import GroupCode, NodeShares
    from checkpoint.keeper.peers import PeerServer

    code = GroupCode(K, M)
    nodes = {p: NodeShares("bench", 1, 0, p, p, code, snapshot(p, nbytes)) for p in range(code.n)}
    nodes[pos].encode(nodes)
    server = PeerServer(nodes[pos], token, host=addr, port=SHARE_PORT)
    del nodes
    print(f"serving at {server.address}", flush=True)
    while True:
        time.sleep(3600)  # until the testbed goes down


def rebuild(peers: list[str], token: str, nbytes: int, repeats: int):
    """Rebuild position 0's snapshot from the peers' shares; prints the seconds of each try."""
    from checkpoint.erasure import GroupCode, rebuild_snapshot
    from checkpoint.keeper.peers import PeerClient

    clients = {p: PeerClient(a, token) for p, a in enumerate(peers, start=1)}
    out, times = np.empty(nbytes, np.uint8), []
    for _ in range(repeats):
        t = time.perf_counter()
        rebuild_snapshot(GroupCode(K, M), 1, 0, clients, out=out)
        times.append(time.perf_counter() - t)
    assert np.array_equal(out, snapshot(0, nbytes)), "rebuilt bytes differ"
    print(json.dumps(times))


def read_l2(url: str, nbytes: int, start_at: float):
    """Read one file from the file server (from wall-clock ``start_at``, so that several
    hosts start together); prints the seconds it took."""
    buf = bytearray(nbytes)
    time.sleep(max(0.0, start_at - time.time()))
    t = time.perf_counter()
    with urllib.request.urlopen(url) as r:
        view, got = memoryview(buf), 0
        while got < nbytes:
            n = r.readinto(view[got:got + CHUNK])
            assert n, f"{url}: {got} of {nbytes} bytes"
            got += n
    print(json.dumps(time.perf_counter() - t))


# ------------------------------------------------------------------------------- the driver

def here(tb, h, role: str, *args, **kw) -> subprocess.Popen:
    return tb.popen(h, [sys.executable, __file__, role, *map(str, args)], stdout=subprocess.PIPE, text=True, **kw)


def recovery(tb, nbytes: int, repeats: int) -> dict:
    """Host 0 lost: its snapshot rebuilt from hosts 1-2, or read from the filer (host 3)."""
    token = secrets.token_hex(16)
    servers = [here(tb, h, "serve", h, tb.host(h).addr, token, nbytes) for h in (1, 2)]
    peers = [s.stdout.readline().split()[-1] for s in servers]
    assert all(peers), "a share server did not start"
    out = here(tb, 0, "rebuild", ",".join(peers), token, nbytes, repeats).communicate()[0]
    ec = statistics.median(json.loads(out))

    l2 = tb.shared / "l2"
    l2.mkdir(exist_ok=True)
    for h in range(3):
        (l2 / f"node{h}.bin").write_bytes(snapshot(h, nbytes).tobytes())
    filer = tb.popen(3, [sys.executable, "-m", "http.server", str(FILER_PORT), "--bind", tb.host(3).addr,
                         "--directory", str(l2)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = lambda h: f"http://{tb.host(3).addr}:{FILER_PORT}/node{h}.bin"
    deadline = time.monotonic() + 30
    probe = [sys.executable, "-c", "import sys, urllib.request; urllib.request.urlopen(sys.argv[1]).close()", url(0)]
    while tb.run(0, probe).returncode:  # until the server answers
        assert time.monotonic() < deadline and filer.poll() is None, "the file server did not start"
        time.sleep(0.2)

    def read(hosts) -> float:
        """Wall time until every host of ``hosts`` has its own file (medians of ``repeats``)."""
        walls = []
        for _ in range(repeats):
            start = time.time() + 1.0
            readers = [here(tb, h, "read", url(h), nbytes, start) for h in hosts]
            walls.append(max(json.loads(r.communicate()[0]) for r in readers))
        return statistics.median(walls)

    one, everyone = read([0]), read([0, 1, 2])
    mb = nbytes / 1e6
    return {"snapshot_mb": mb, "ec_rebuild_s": ec, "ec_rebuild_mb_s": mb / ec, "l2_one_host_s": one,
            "l2_one_host_mb_s": mb / one, "l2_all_hosts_s": everyone, "l2_all_hosts_mb_s": 3 * mb / everyone}


def step_costs(tb, steps: int, dim: int, layers: int, nic_mbit: float) -> list[dict]:
    """The real job on hosts 0-2: median step time without snapshots and with a snapshot every
    step coded k=2, m=1, across NICs unshaped and shaped to ``nic_mbit``."""
    from conftest import JOB, env, records, steps as step_records

    coded = ["--snapshot.interval=1", f"--snapshot.k={K}", f"--snapshot.m={M}"]
    rows = []
    # The training's own collectives cross the same NICs: each setting against its own baseline.
    for name, nic, flags in (("no snapshots, NICs unshaped", None, ["--snapshot.interval=0"]),
                             (f"snapshot every step, coded k={K} m={M}, NICs unshaped", None, coded),
                             (f"no snapshots, NICs {nic_mbit:g} Mbit", nic_mbit, ["--snapshot.interval=0"]),
                             (f"snapshot every step, coded k={K} m={M}, NICs {nic_mbit:g} Mbit", nic_mbit, coded)):
        for h in range(3):
            tb.port(h, rate_mbit=nic)
        run = tb.shared / f"steady-{len(rows)}"
        procs = tb.launch_job(f"steady{len(rows)}", "--skip-preflight", "--config", str(JOB), f"--train.run_dir={run}",
                              f"--train.steps={steps}", f"--model.dim={dim}", f"--model.n_layers={layers}",
                              "--data.batch_size=12",
                              "--checkpoint.interval=1000", "--checkpoint.l2_interval=1000", "--diagnostics.inject=[]",
                              *flags, hosts=[0, 1, 2], env=env())
        rcs = [p.wait() for p in procs]
        assert rcs == [0, 0, 0], "\n".join(tb.log(h).read_text()[-2000:] for h in range(3))
        warm = min(5, steps // 4)  # steps left out: the first ones compile and warm the caches
        at = [r["time"] for r in step_records(run) if r["step"] > warm]
        walls = np.diff(at)  # one step's wall time, its save's stall included
        stalls = [r["stall_s"] for r in records(run / "metrics.jsonl")
                  if r.get("event") == "checkpoint" and warm < r["step"] < steps]  # not the final save
        keeper = "".join(p.read_text() for p in sorted((run / "keeper").glob("*.log")))
        code_s = [float(s) for s in re.findall(r"step \d+ erasure-coded: \d+ bytes of parity in ([\d.]+) s", keeper)]
        params = re.findall(r"([\d,]+) params on rank 0", tb.log(0).read_text())
        parity = re.findall(r"step \d+ erasure-coded: (\d+) bytes of parity", keeper)
        rows.append({"config": name, "step_ms": 1e3 * float(np.median(walls)), "steps": len(walls),
                     "stall_ms": 1e3 * statistics.median(stalls) if stalls else 0.0,
                     "coded_steps_per_host": len(code_s) / 3, "code_s_median": statistics.median(code_s) if code_s else None,
                     "params_rank0": int(params[-1].replace(",", "")) if params else None,
                     "parity_mb_per_step": int(parity[-1]) / 1e6 if parity else None})
        for h in range(3):
            tb.log(h).rename(tb.log(h).with_suffix(f".{len(rows)}.log"))
    return rows


def run(a) -> dict:
    import cluster

    why = cluster.unavailable()
    if why:
        raise SystemExit(f"--testbed: {why}")
    nbytes = (8 if a.quick else a.snapshot_mb) << 20
    load = [os.getloadavg()]
    with cluster.Testbed(4) as tb:
        for h in range(3):
            tb.port(h, rate_mbit=a.nic_mbit)
        tb.port(3, rate_mbit=a.filer_mbit)
        link = {"nic_mb_s": tb.measure(1, 0, 64 if not a.quick else 8), "filer_mb_s": tb.measure(3, 0, 64 if not a.quick else 8)}
        rec = recovery(tb, nbytes, 1 if a.quick else 3)
        load.append(os.getloadavg())
        steady = step_costs(tb, 8 if a.quick else a.job_steps, a.dim, a.layers, a.nic_mbit)
    load.append(os.getloadavg())
    out = {"nic_mbit": a.nic_mbit, "filer_mbit": a.filer_mbit, "measured_mb_s": link, "recovery": rec,
           "steady": steady, "loadavg_before_between_after": load}
    print(f"\ntestbed: 3 compute hosts, NICs shaped to {a.nic_mbit:g} Mbit ({link['nic_mb_s']:.0f} MB/s measured), "
          f"file server (L2) NIC {a.filer_mbit:g} Mbit ({link['filer_mb_s']:.0f} MB/s measured)")
    print(f"recovery of one host's {rec['snapshot_mb']:.0f} MB snapshot (median of {1 if a.quick else 3}):")
    print(f"  EC rebuild from 2 peers (k={K}, m={M}):  {rec['ec_rebuild_s']:6.2f} s  {rec['ec_rebuild_mb_s']:6.0f} MB/s")
    print(f"  L2, that host alone:                 {rec['l2_one_host_s']:6.2f} s  {rec['l2_one_host_mb_s']:6.0f} MB/s")
    print(f"  L2, all 3 hosts at once (job restart): {rec['l2_all_hosts_s']:6.2f} s  {rec['l2_all_hosts_mb_s']:6.0f} MB/s in all")
    print("steady state, rank 0's median wall time per step (save stall included):")
    for r in steady:
        code = "" if r["code_s_median"] is None else f"; coding a step {r['code_s_median']:.2f} s, " \
                                                     f"{r['coded_steps_per_host']:.0f} steps coded per host"
        print(f"  {r['config']:<48} {r['step_ms']:7.1f} ms (stall {r['stall_ms']:.1f} ms){code}")
    print(f"load average (1, 5, 15 min) before / between / after: {load}")
    return out


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "serve":
        serve_shares(int(args[0]), args[1], args[2], int(args[3]))
    elif role == "rebuild":
        rebuild(args[0].split(","), args[1], int(args[2]), int(args[3]))
    elif role == "read":
        read_l2(args[0], int(args[1]), float(args[2]))
