"""The launcher's monitor acting on verdicts under real torchrun agents: a node flagged as
faulty is excluded and the job finishes on the rest from its last checkpoint.

Two agents on this machine play two nodes (``--nnodes 1:2``, c10d rendezvous); each has a
monitor with policy ``exclude``, as ``kintsugi launch`` starts them. Rank 3 hangs at step 12.
"""
import json
import os
import socket
import subprocess
import sys
import time

from conftest import on_testbed_instead
from diagnostics.drill import free_port
from launch.monitor import start_monitor


def _agent(run_dir, port, tag, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "diag-test",
           "--max-restarts", "2", "--monitor-interval", "0.2",
           "--rdzv-conf", "join_timeout=60,last_call_timeout=8,keep_alive_interval=1,keep_alive_max_attempt=2",
           "-m", "diagnostics.drill", "--run-dir", str(run_dir), "--steps", "40", "--ckpt-every", "5", *extra]
    # A fresh worker store per rendezvous round: with the agent's shared store, keys of the
    # excluded round's ranks are still there and gloo can read a dead peer's address.
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, start_new_session=True, env=env, stdout=open(run_dir / f"agent-{tag}.log", "w"),
                            stderr=subprocess.STDOUT)


@on_testbed_instead("tests/test_cluster_jobs.py::test_monitor_excludes_a_hung_host_and_the_job_finishes_on_the_rest")
def test_exclude_hung_node_and_finish_on_the_rest(tmp_path):
    port = free_port()
    fault = ("--inject", "hang:rank=3,step=12")
    first = _agent(tmp_path, port, "a", *fault)
    # The agent that binds the endpoint hosts the rendezvous store, which must outlive the
    # exclusion (as node 0 or etcd would on a cluster): start the second once the first has it,
    # within last_call_timeout (8 s), so that the first round has both nodes.
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and first.poll() is None, "the first agent never opened its store"
            time.sleep(0.2)
    second = _agent(tmp_path, port, "b", *fault)
    monitors = [start_monitor(tmp_path, "exclude", first, 0), start_monitor(tmp_path, "exclude", second, 1)]
    try:
        assert first.wait(timeout=300) == 0, (tmp_path / "agent-a.log").read_text()[-3000:]
        assert second.wait(timeout=60) != 0  # terminated by its monitor
    finally:
        for p in (first, second):
            if p.poll() is None:
                os.killpg(p.pid, 9)
        for m in monitors:
            m.stop()
    actions = [json.loads(x) for x in (tmp_path / "diagnostics" / "actions.jsonl").read_text().splitlines()]
    by_node = {a["node"]: a for a in actions}
    assert by_node[1]["action"] == "exclude" and by_node[0]["action"] == "wait"
    assert by_node[1]["verdict"]["kind"] == "hang_noncomm" and by_node[1]["verdict"]["suspects"][0]["rank"] == 3
    # the job finished with node 0's two ranks, resumed from the step-10 checkpoint
    gens = sorted((tmp_path / "diagnostics").glob("gen-*"))
    assert json.loads((gens[0] / "meta-r0.json").read_text())["world"] == 4
    done = [json.loads((tmp_path / f"drill-done-r{r}.json").read_text()) for r in (0, 1)]
    assert all(d["world"] == 2 and d["first_step"] == 10 for d in done)
    assert not (tmp_path / "drill-done-r2.json").exists()
