"""Flight Recorder dumps fed to the detector: dumps torch itself writes (gloo keeps the
Flight Recorder too), on a real hang, both through the tracer's on-hang request and as a
watchdog would leave them; NCCL-shaped dumps built from the documented format (times,
pg_config ranks, started/completed states); and the restricted unpickling."""
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest

from comms import UserError
from diagnostics import Detector
from diagnostics.drill import free_port, run_local
from diagnostics.flight import load


def kinds(vs):
    return [(v.kind, sorted(s.get("rank", -1) for s in v.suspects)) for v in vs]


def nccl_dump(rank: int, world: int, entries: list, completed: int) -> dict:
    """A dump as ProcessGroupNCCL's Flight Recorder writes it (FlightRecorder.hpp, 2.x)."""
    return {"version": "2.10", "comm_lib_version": "2.21.5",
            "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": str(list(range(world)))}},
            "pg_status": {"0": {"last_enqueued_collective": max((e["collective_seq_id"] for e in entries), default=-1),
                                "last_started_collective": -1, "last_completed_collective": completed}},
            "entries": entries}


def entry(seq: int, created: float, state: str, done: float | None = None, numel: int = 1 << 20) -> dict:
    return {"record_id": seq, "pg_id": 0, "process_group": ("0", "default_pg"), "collective_seq_id": seq,
            "p2p_seq_id": 0, "op_id": seq, "profiling_name": "nccl:all_reduce", "time_created_ns": int(created * 1e9),
            "duration_ms": None, "input_sizes": [[numel]], "input_dtypes": ["Float"], "output_sizes": [[numel]],
            "output_dtypes": ["Float"], "state": state,
            "time_discovered_started_ns": int((created + 0.001) * 1e9) if state != "scheduled" else None,
            "time_discovered_completed_ns": int(done * 1e9) if done else None,
            "retired": state == "completed", "timeout_ms": 600000, "is_p2p": False, "thread_id": "1", "thread_name": "pt"}


def write_dumps(run_dir, dumps: dict, taken: float):
    d = run_dir / "diagnostics" / "flight-recorder"
    d.mkdir(parents=True)
    for r, dump in dumps.items():
        p = d / f"nccl_trace_rank_{r}"
        p.write_bytes(pickle.dumps(dump, protocol=2))
        os.utime(p, (taken, taken))


def test_nccl_dumps_name_the_rank_that_never_arrived(tmp_path):
    t0 = 1.7e9
    dumps = {}
    for r in range(4):
        # 20 complete all-reduces, rank 1 arriving 30 ms after the others each time; then
        # ranks 0, 2, 3 enter #21 and rank 1 never does.
        es = [entry(s, t0 + s + (0.03 if r == 1 else 0.0), "completed", t0 + s + 0.05) for s in range(1, 21)]
        if r != 1:
            es.append(entry(21, t0 + 21, "started"))
        dumps[r] = nccl_dump(r, 4, es, completed=20)
    write_dumps(tmp_path, dumps, taken=t0 + 21 + 600)  # the watchdog's timeout
    det = Detector(tmp_path, live=False, dump_stacks=False)
    vs = det.poll()
    assert kinds(vs) == [("hang_noncomm", [1])]
    assert vs[0].evidence["seq"] == 21 and vs[0].evidence["waited_s"] == pytest.approx(600, abs=1)
    (gen,) = det.gens.values()
    assert gen.source == "flight-recorder" and gen.world == 4
    late = {r: sum(gen.lateness[r].values()) for r in range(4)}  # clock-free lateness from the completed ones
    assert max(late, key=late.get) == 1 and late[1] == pytest.approx(20 * 0.03, rel=0.05)


def test_nccl_dumps_of_a_collective_that_never_completes_name_the_group(tmp_path):
    t0 = 1.7e9
    dumps = {r: nccl_dump(r, 2, [entry(1, t0, "completed", t0 + 0.01), entry(2, t0 + 1, "started")], completed=1)
             for r in range(2)}
    write_dumps(tmp_path, dumps, taken=t0 + 30)
    vs = Detector(tmp_path, live=False, dump_stacks=False).poll()
    assert [v.kind for v in vs] == ["hang_comm"] and vs[0].suspects[0]["group"] == [0, 1]


def test_dumps_are_unpickled_without_running_anything(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    bad = tmp_path / "diagnostics" / "flight-recorder"
    bad.mkdir(parents=True)
    (bad / "nccl_trace_rank_0").write_bytes(pickle.dumps({"version": "2.10", "entries": [Evil()]}))
    with pytest.raises(UserError, match="not a Flight Recorder dump"):
        load(bad / "nccl_trace_rank_0")
    assert not (tmp_path / "pwned").exists()
    p = subprocess.run([sys.executable, "-m", "diagnostics", "report", str(tmp_path), "--no-html"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a Flight Recorder dump" in p.stderr
    assert not (tmp_path / "pwned").exists()


def _gloo_rank(rank: int, world: int, port: int, out: str):
    """All-reduces, then ranks 0 and 1 enter one more that rank 2 never joins; 6 s later each
    rank writes torch's own Flight Recorder dump, named as the NCCL watchdog names them."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x = torch.ones(1024)
    for _ in range(5):
        dist.all_reduce(x)

    def dump():
        time.sleep(6)
        tmp = f"{out}/.nccl_trace_rank_{rank}.tmp"
        with open(tmp, "wb") as f:
            f.write(torch._C._distributed_c10d._dump_fr_trace(includeStackTraces=False))
        os.replace(tmp, f"{out}/nccl_trace_rank_{rank}")
        os._exit(0)

    threading.Thread(target=dump, daemon=True).start()
    if rank != 2:
        dist.all_reduce(x)
    time.sleep(60)


def test_torch_written_dumps_of_a_real_hang(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "200")
    out = tmp_path / "elsewhere"
    out.mkdir()
    # Spawned, not forked: a fork inherits this process's Flight Recorder ring, with the
    # entries of any process group an earlier test made here (read as this job's ops).
    mp.start_processes(_gloo_rank, args=(3, free_port(), str(out)), nprocs=3, start_method="spawn")
    assert sorted(p.name for p in out.iterdir()) == [f"nccl_trace_rank_{r}" for r in range(3)]
    (tmp_path / "run").mkdir()
    vs = Detector(tmp_path / "run", live=False, dump_stacks=False, flight_recorder=[out / "nccl_trace_rank_"]).poll()
    assert kinds(vs) == [("hang_noncomm", [2])], [v.line() for v in vs]
    assert vs[0].evidence["op"] == "all_reduce" and vs[0].evidence["seq"] == 6


def test_tracer_dumps_the_flight_recorder_on_a_hang(tmp_path, monkeypatch):
    """Live: the hang verdict asks every rank for its stacks and its Flight Recorder; the
    report reads those dumps as a second source that names the same rank."""
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "200")
    verdicts, _ = run_local(3, tmp_path, inject=["hang:rank=2,step=8"], steps=30, watch_s=40, stop_on=("hang_noncomm",),
                            start_method="spawn")  # see above
    assert kinds(verdicts)[0] == ("hang_noncomm", [2])
    gen = next((tmp_path / "diagnostics").glob("gen-*"))
    assert sorted(p.name for p in gen.glob("fr-r*.pkl")) == ["fr-r0.pkl", "fr-r1.pkl", "fr-r2.pkl"]
    det = Detector(tmp_path, live=False, dump_stacks=False)
    vs = det.poll()
    fr = [v for v in vs if det.gens[v.generation].source == "flight-recorder"]
    assert kinds(fr) == [("hang_noncomm", [2])], [v.line() for v in vs]
