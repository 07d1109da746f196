"""`kintsugi diagnose watch` beside a job that `kintsugi launch` did not start: plain torchrun
running the drill on 2 ranks; one rank is stopped for real (SIGSTOP) and the watcher names
it as a hang (not a crash), live; the report written afterwards agrees."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, env


def _wait(pred, what, timeout=120):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, what
        time.sleep(0.2)


def test_watch_names_a_stopped_rank_live(tmp_path):
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "diagnostics.drill", "--run-dir", str(tmp_path), "--steps", "100000"],
                           env=env(), cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    watch = subprocess.Popen([sys.executable, "-m", "diagnostics", "watch", str(tmp_path)], env=env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        state = lambda: sorted((tmp_path / "diagnostics").glob("gen-*/state-r1.json"))  # noqa: E731
        _wait(lambda: state() and json.loads(state()[-1].read_text()).get("step", 0) >= 20, "the job never got going")
        gen = state()[-1].parent
        os.kill(json.loads((gen / "meta-r1.json").read_text())["pid"], signal.SIGSTOP)
        t0 = time.time()
        lines = []
        while not any("hang_noncomm" in x for x in lines):
            line = watch.stdout.readline()
            assert line and time.time() - t0 < 60, "".join(lines)
            lines.append(line)
        hang = next(x for x in lines if "hang_noncomm" in x)
        assert "hang_noncomm: rank 1 on node 0" in hang and "is stopped (SIGSTOP" in hang, hang
        assert not any("crash" in x for x in lines), lines
        recorded = [json.loads(x) for x in (tmp_path / "diagnostics" / "verdicts.jsonl").read_text().splitlines()]
        assert [(v["kind"], v["suspects"][0]["rank"]) for v in recorded] == [("hang_noncomm", 1)]
    finally:  # torchrun starts its workers in sessions of their own: end them by pid
        for meta in (tmp_path / "diagnostics").glob("gen-*/meta-r*.json"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(json.loads(meta.read_text())["pid"], signal.SIGKILL)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        watch.send_signal(signal.SIGTERM)
        assert watch.wait(timeout=30) == 0
    # After the job is gone, the report reads the same: a hang of rank 1, not a crash.
    p = subprocess.run([sys.executable, "-m", "diagnostics", "report", str(tmp_path), "--json", "--no-html"],
                       env=env(), cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    kinds = {(v["kind"], v["suspects"][0].get("rank")) for v in json.loads(p.stdout)["verdicts"]}
    assert kinds == {("hang_noncomm", 1)}, kinds
