"""A short pairwise link probe among a group's hosts at a step boundary (C4P-style).

When a group's collectives slow down and no rank arrives late, the collective trace cannot
say which link is slow: every member waits the same. The monitor then writes
``probe-request.json`` into the generation's trace directory (``diagnostics.probe``), naming
a step S that no rank has reached yet, the probing ranks (one per host) and a payload size.
At the end of step S each rank's tracer calls ``run``:

1. join: a counter in the job's c10d store; the last rank to arrive flips a state key to
   ``go``, a rank that waited ``join_s`` in vain flips it to ``abandoned`` (compare-and-set:
   exactly one of them wins, and everyone follows the winner), so no rank is ever left alone
   inside a probe, e.g. one that read the request too late;
2. the probers measure every ordered pair, round robin (circle method): the pairs of a round
   are disjoint, so each host talks to one other at a time. Per direction, ``reps`` ping-pongs
   of the payload and of 4 bytes, timed at the sender (send, then receive a 4-byte ack: no
   cross-host clocks);
3. before and after each round every prober times a fixed piece of CPU work and reads its
   cgroup's throttled time: a rank whose process is short of CPU (throttled, or sharing its
   cores) makes its transfers slow both ways, and must not be taken for a slow link;
4. leave: a second counter, with a timeout, then each prober writes its measurements to
   ``probe-<id>-r<R>.json``.

Ranks that do not probe take part in 1 and 4 only, so the whole job spends the probe inside
the same step (its ``probe`` phase, which the detector leaves out of its statistics). The
probe's ops are the untraced originals: they are not the job's traffic.
"""
from __future__ import annotations

import datetime
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from comms.trace import hostname

CPU_LOOP = 300_000  # iterations of the fixed CPU work: ~20 ms of CPython, longer than a 10% cgroup quota slice


def run(req: dict, rank: int, world: int, store=None) -> dict | None:
    """Take part in probe ``req``; returns this prober's measurements (None for a rank that
    only joined and left)."""
    store = store or c10d._get_default_store()
    key = f"kintsugi/probe/{req['id']}"
    t0 = time.time()
    status = _agree(store, f"{key}/in", world, float(req.get("join_s", 10.0)))
    probers = [int(r) for r in req["ranks"]]
    out = {"id": req["id"], "rank": rank, "host": hostname(), "status": status,
           "bytes": int(req["bytes"]), "reps": int(req.get("reps", 3)), "started": t0}
    if status == "go" and rank in probers:
        out.update(_measure(probers, rank, int(req["bytes"]), int(req.get("reps", 3))))
    if status == "go":
        # Generous: the slowest pair's transfers, however slow the link being looked for.
        out["left"] = _agree(store, f"{key}/out", world, float(req.get("leave_s", 120.0)))
    out["ended"] = time.time()
    return out if rank in probers else None


def _agree(store, key: str, world: int, timeout_s: float) -> str:
    """Everyone arrives (``go``) or someone gave up waiting (``abandoned``); all see one answer."""
    if store.add(f"{key}/n", 1) == world:
        store.compare_set(f"{key}/state", "", "go")
    try:
        store.wait([f"{key}/state"], datetime.timedelta(seconds=timeout_s))
    except Exception:  # the store's timeout error (its type differs across torch versions)
        pass
    return store.compare_set(f"{key}/state", "", "abandoned").decode()


def rounds(ranks: list[int]) -> list[list[tuple[int, int]]]:
    """Round-robin pairings (circle method): every pair once, each rank in one pair per round."""
    players = list(ranks) + ([None] if len(ranks) % 2 else [])
    n = len(players)
    out = []
    for _ in range(n - 1):
        out.append([(a, b) for a, b in zip(players[: n // 2], reversed(players[n // 2:])) if a is not None and b is not None])
        players = [players[0], players[-1]] + players[1:-1]
    return out


def _measure(probers: list[int], me: int, nbytes: int, reps: int) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()).lower() else "cpu"
    payload = torch.zeros(max(nbytes // 4, 1), device=device)
    tiny, ack = torch.zeros(1, device=device), torch.zeros(1, device=device)
    send_s: dict[str, list[float]] = {}
    ping_s: dict[str, list[float]] = {}
    cpu_s = [_cpu_work()]
    throttled0 = throttled_s()
    for pairs in rounds(sorted(probers)):
        for a, b in pairs:
            if me not in (a, b):
                continue
            peer = b if me == a else a
            for sender in (a, b):  # a -> b, then b -> a
                for _ in range(reps):
                    for buf, into in ((tiny, ping_s), (payload, send_s)):
                        if me == sender:
                            t = time.perf_counter()
                            dist.send(buf, peer)
                            dist.recv(ack, peer)
                            if device != "cpu":
                                torch.cuda.synchronize()
                            into.setdefault(str(peer), []).append(time.perf_counter() - t)
                        else:
                            dist.recv(buf, peer)
                            dist.send(ack, peer)
        cpu_s.append(_cpu_work())
    throttled = throttled_s()
    return {"send_s": send_s, "ping_s": ping_s, "cpu_s": cpu_s,
            "throttled_s": None if throttled is None or throttled0 is None else throttled - throttled0}


def _cpu_work() -> float:
    """Seconds a fixed piece of single-threaded work takes now."""
    t = time.perf_counter()
    x = 0
    for i in range(CPU_LOOP):
        x += i * i
    return time.perf_counter() - t


def throttled_s() -> float | None:
    """Seconds this process's cgroup has been held back by its CPU quota (cgroup v2
    ``cpu.stat`` throttled_usec, v1 ``cpu.stat`` throttled_time); None when not readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            f, field, scale = Path("/sys/fs/cgroup") / path.lstrip("/") / "cpu.stat", "throttled_usec", 1e-6
        elif "cpu" in controllers.split(","):
            f, field, scale = Path("/sys/fs/cgroup") / controllers / path.lstrip("/") / "cpu.stat", "throttled_time", 1e-9
        else:
            continue
        try:
            for stat in f.read_text().splitlines():
                name, _, value = stat.partition(" ")
                if name == field:
                    return int(value) * scale
        except OSError:
            continue
    return None
