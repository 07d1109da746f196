"""The examples/ scripts (a user's FSDP2 loop, a user's DeepSpeed loop) under `kintsugi launch`
on 2 ranks: a worker killed with SIGKILL is restarted by torchrun and recovers from the node
keeper's memory; the steps it redoes have the losses the first attempt had, bit for bit; the
job ends with its final step on disk; `kintsugi diagnose report` reads the run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from checkpoint import committed_steps
from conftest import ROOT, env, kintsugi, records

STEPS = 14


def workers(launcher: subprocess.Popen, script: str) -> list[psutil.Process]:
    return [p for p in psutil.Process(launcher.pid).children(recursive=True)
            if any(a.endswith(script) for a in p.cmdline()[1:3])]


def killed_run(run_dir, script: str, *args: str) -> tuple[str, list[dict]]:
    """Launch, kill -9 one worker after step 7 (a save at 5 is in the keeper's memory, the
    next is at 10: the restarted job must redo the steps between), finish."""
    cmd = [sys.executable, "-m", "launch", "launch", "--nproc-per-node", "2", "--run-dir", str(run_dir),
           str(ROOT / "examples" / script), "--steps", str(STEPS), *args]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None  # found while the job starts: at step 7 the kill must follow at once (a step takes ~10s of ms)
    while victim is None or not any(r["step"] >= 7 for r in records(run_dir / "metrics.jsonl")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if victim is None and len(found := workers(proc, script)) == 2:
            victim = found[-1]
        time.sleep(0.01)
    os.kill(victim.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    return out, records(run_dir / "metrics.jsonl")


def check_recovery(out: str, log: list[dict], run_dir):
    assert "recovered step" in out and "from memory (node keepers)" in out, out[-3000:]
    first, redone = {}, {}
    for r in log:  # the first attempt's losses, then the redone steps' (logged a second time)
        (redone if r["step"] in first else first)[r["step"]] = r["loss"]
    assert sorted(first) == list(range(1, STEPS + 1))
    assert len(redone) >= 2 and all(redone[s] == first[s] for s in redone), (first, redone)
    assert committed_steps(run_dir / "checkpoints")[0] == STEPS
    report = kintsugi("diagnose", "report", str(run_dir), "--no-html")
    assert report.returncode == 0, report.stdout + report.stderr
    rep = json.loads((run_dir / "diagnostics" / "report.json").read_text())
    assert rep["generations"] and any(v["kind"] == "crash" for v in rep["verdicts"]), rep.get("verdicts")


def test_fsdp2_example_recovers_from_keeper_memory(tmp_path):
    out, log = killed_run(tmp_path, "fsdp2_train.py")
    check_recovery(out, log, tmp_path)
    assert log[-1]["loss"] < log[0]["loss"] - 1.0  # it learns


@pytest.mark.slow
def test_deepspeed_example_recovers_from_keeper_memory(tmp_path):
    out, log = killed_run(tmp_path, "deepspeed_train.py", "--zero-stage", "2")
    check_recovery(out, log, tmp_path)
