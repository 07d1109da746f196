"""Resume: after kill -9 a run continues from its last committed step and reproduces the
uninterrupted run exactly; a checkpoint saved on one layout resumes on another."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from checkpoint import committed_steps
from conftest import ROOT, env, losses, records, torchrun_cmd, train


def wait_for_step(run_dir, step, proc):
    """Poll metrics.jsonl until ``step`` is logged (the job keeps running meanwhile)."""
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None:
        if any(rec["step"] >= step for rec in records(metrics)):
            return
        time.sleep(0.05)
    raise AssertionError(f"job exited with {proc.returncode} before step {step}")


def workers(agent: subprocess.Popen) -> list[psutil.Process]:
    """The agent's ``python -m trainer`` children (not the keeper, whatever the paths say)."""
    def is_worker(c):
        return "-m" in c and c.index("-m") + 1 < len(c) and c[c.index("-m") + 1] == "trainer"
    return [p for p in psutil.Process(agent.pid).children(recursive=True) if is_worker(p.cmdline())]


LONG = ["--train.steps=30", "--checkpoint.interval=5", "--optim.warmup_steps=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(2, run_dir, *LONG)
    return losses(run_dir)


def test_worker_kill9_torchrun_restarts_and_resumes_exactly(uninterrupted, tmp_path):
    # Two restarts allowed: under heavy load a re-initializing gloo mesh can time out once.
    agent = subprocess.Popen(torchrun_cmd(2, tmp_path, *LONG, max_restarts=2), env=env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 12, agent)
    victim = workers(agent)[-1]
    os.kill(victim.pid, signal.SIGKILL)
    out, _ = agent.communicate()
    assert agent.returncode == 0, out[-3000:]
    # the keeper outlived the worker: the restart restores from its memory (L0)
    assert re.search(r"resumed from step (10|15) \(L0; checkpoints in", out), out[-3000:]
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 31))
    assert got == uninterrupted  # bit-exact: same layout, same reductions


def test_whole_job_kill9_then_relaunch_resumes_exactly(uninterrupted, tmp_path):
    agent = subprocess.Popen(torchrun_cmd(2, tmp_path, *LONG), env=env(), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path, 17, agent)
    # The agent, every worker (torchrun puts them in sessions of their own) and the node's
    # keeper (its shared-memory snapshots die with it): the whole node at once.
    node = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    for p in node:
        p.send_signal(signal.SIGKILL)
    agent.wait()
    psutil.wait_procs(node)
    # A step renamed into place is complete even if `latest` was not yet rewritten.
    newest = committed_steps(tmp_path / "checkpoints")[0]
    assert newest in (15, 20)
    out = train(2, tmp_path, *LONG)
    assert f"resumed from step {newest}" in out.stdout
    assert losses(tmp_path) == uninterrupted


@pytest.mark.parametrize("src,dst", [
    ((2, ["--parallel.dp_shard=2"]), (1, [])),                               # FSDP2 x2 -> one process
    ((2, ["--parallel.pp=2"]), (2, ["--parallel.tp=2"])),                    # PP x2 -> TP x2
    ((2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=3"]), (2, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"])),  # ZeRO-3 -> DDP
    ((1, []), (2, ["--parallel.engine=deepspeed", "--deepspeed.zero_stage=2"])),  # one process -> ZeRO-2
])
def test_resume_on_another_layout(src, dst, reference, tmp_path):
    """Save at step 4 on one layout, continue to step 6 on another: the source's losses and
    the continued ones are the single-process run's, so weights and optimizer state came
    across intact."""
    train(src[0], tmp_path / "a", "--train.steps=4", "--checkpoint.interval=2", *src[1])
    out = train(dst[0], tmp_path / "b", "--train.steps=6", f"--checkpoint.load_from={tmp_path / 'a' / 'checkpoints'}", *dst[1])
    assert "resumed from step 4" in out.stdout
    got, want = {**losses(tmp_path / "a"), **losses(tmp_path / "b")}, losses(reference)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in got:  # the source layout's own steps too (tests/test_layouts.py leaves these layouts to this)
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


def test_sigterm_finishes_step_saves_and_exits_zero(tmp_path):
    cmd = torchrun_cmd(2, tmp_path, "--train.steps=100000", "--checkpoint.interval=0")
    agent = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(tmp_path, 3, agent)
    for w in workers(agent):
        w.send_signal(signal.SIGTERM)
    out, _ = agent.communicate()
    assert agent.returncode == 0, out[-3000:]
    last = max(losses(tmp_path))
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    assert "stop requested" in out


def test_injected_crash_in_the_trainer_is_recovered_and_named(uninterrupted, tmp_path):
    """The trainer's own fault injection (--diagnostics.inject): rank 1 SIGKILLs itself
    before step 12 of the first attempt; torchrun restarts, the job resumes from step 10 with
    the uninterrupted losses, and the trace shows rank 1 as the crashed one."""
    from diagnostics import Detector

    out = train(2, tmp_path, *LONG, '--diagnostics.inject=["crash:rank=1,step=12"]', max_restarts=2)
    assert "resumed from step 10" in out.stdout
    # A planned drill reads as one: announced, then one line per survivor, no traceback.
    assert "drill: rank 1 is killed (SIGKILL) before step 12" in out.stdout
    assert "another rank stopped (" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "restored step" not in out.stdout  # "resumed from step 10" says it once
    assert losses(tmp_path) == uninterrupted
    verdicts = Detector(tmp_path, live=False, dump_stacks=False).poll()
    crashes = [v for v in verdicts if v.kind == "crash"]
    assert [s["rank"] for v in crashes for s in v.suspects] == [1], verdicts
