"""`kintsugi launch` as torchrun takes its arguments, and stopping a job without losing its
final checkpoint."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from checkpoint import committed_steps
from comms import UserError
from conftest import JOB, ROOT, env, kintsugi, records, steps
from launch.launcher import split_args


def test_arguments_split_as_torchrun_takes_them():
    job = split_args(["--nproc-per-node", "2", "--rdzv-conf", "timeout=5", "--checkpoint.interval=3",
                      "--run-dir", "r", "train.py", "--lr", "3", "--parallel.tp=9"])
    assert (job.nproc, job.torchrun, job.target, job.args) == ("2", ["--rdzv-conf", "timeout=5"], ["train.py"],
                                                                ["--lr", "3", "--parallel.tp=9"])
    assert job.overrides == ["--checkpoint.interval=3", "--train.run_dir=r"] and not job.trainer and job.name == "train"
    job = split_args(["--standalone", "-m", "pkg.train", "-x"])
    assert (job.torchrun, job.target, job.args, job.name) == (["--standalone"], ["-m", "pkg.train"], ["-x"], "train")
    # the trainer (the default) takes its config flags from either side of `-m trainer`
    job = split_args(["--max-restarts=1", "-m", "trainer", "--config", "c.toml", "--train.steps=3", "--print-config"])
    assert job.trainer and (job.max_restarts, job.config, job.overrides, job.args) == ("1", "c.toml", ["--train.steps=3"],
                                                                                       ["--print-config"])
    assert split_args(["--train.steps=3"]).target == ["-m", "trainer"]


@pytest.mark.parametrize("argv,words", [
    (["--parallel.tp", "2"], ["--parallel.tp 2", "--parallel.tp=2"]),
    (["-m", "trainer", "--train.steps", "3"], ["--train.steps=VALUE"]),
    (["--frobnicate", "x.py"], ["unknown flag --frobnicate"]),
])
def test_bad_arguments_are_one_line(argv, words):
    with pytest.raises(UserError) as e:
        split_args(argv)
    for w in words:
        assert w in str(e.value)


def test_dry_run_prints_the_agent_command(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    out = kintsugi("launch", "--nproc-per-node", "2", "--dry-run", "--checkpoint.close_timeout_s=100", str(script), "--lr", "3")
    assert out.returncode == 0, out.stderr
    cmd, note = out.stdout.splitlines()
    assert cmd.endswith(f"--nproc-per-node 2 --nnodes 1 --node-rank 0 --max-restarts 3 --standalone {script} --lr 3")
    assert f"KINTSUGI_RUN_DIR={ROOT / 'runs' / 'train'}" in note and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=160" in note
    missing = kintsugi("launch", str(tmp_path / "nope.py"))
    assert missing.returncode == 2 and "script" in missing.stderr and "not found" in missing.stderr


def test_sigterm_waits_for_a_final_save_slower_than_torchruns_30_s(tmp_path):
    """SIGTERM to `kintsugi launch` while the disk takes 34 s for the final save (the keeper
    sleeps in its write): the workers finish the step and save, the launcher does not let
    torchrun's agent kill them after its 30 s, the job exits 0 with the final step on disk."""
    cmd = [sys.executable, "-m", "launch", "launch", "--nproc-per-node", "2", "--config", str(JOB),
           "--run-dir", str(tmp_path), "--train.steps=100000", "--checkpoint.interval=0",
           "--checkpoint.close_timeout_s=300"]
    proc = subprocess.Popen(cmd, env=env(KINTSUGI_FAULT="write:sleep:34"), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while len(steps(tmp_path)) < 3:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    last = max(r["step"] for r in steps(tmp_path))
    assert f"stop requested: saved step {last}" in out and "stopping torchrun's agent" not in out
    assert committed_steps(tmp_path / "checkpoints") == [last]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    final = [r for r in records(tmp_path / "metrics.jsonl") if r.get("event") == "checkpoint"]
    assert [r["step"] for r in final] == [last] and final[0]["durable_s"] > 34 and not final[0]["failed"]


def test_version_and_plan_json(tmp_path):
    out = kintsugi("--version")
    assert out.returncode == 0 and out.stdout.startswith("kintsugi ")
    out = kintsugi("plan", "--topology", str(ROOT / "configs/topology-ib-roce.toml"), "--model", "gpt-7.5b",
                   "--tp", "8", "--pp", "2", "--dp", "4", "--out", str(tmp_path / "plan.json"), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["sizes"]["tp"] == 8 and sum(plan["layers_per_stage"]) > 0 and (tmp_path / "plan.json").is_file()


def test_a_script_that_dies_on_sigterm_is_not_restarted_after_the_stop(tmp_path):
    """A worker that does not handle SIGTERM dies of it; torchrun would restart it: the
    launcher sees the new workers, stops the agent instead, and the job exits non-zero."""
    script = tmp_path / "plain.py"
    script.write_text("import os, time, torch.distributed as dist\n"
                      "dist.init_process_group('gloo')\n"
                      "open(os.path.join(os.environ['KINTSUGI_RUN_DIR'], f'up-{os.getpid()}'), 'w').close()\n"
                      "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-m", "launch", "launch", "--max-restarts", "2",
                             "--run-dir", str(tmp_path / "run"), str(script)], env=env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while not list((tmp_path / "run").glob("up-*")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    assert proc.returncode != 0 and "the agent restarted workers after the stop: stopping torchrun's agent" in out, out[-3000:]


def test_rendezvous_round_limit_from_rdzv_conf():
    # the partitioned-agent watchdog (tests/test_cluster_jobs.py proves it across hosts)
    from launch.launcher import rendezvous_limit_s

    assert rendezvous_limit_s(split_args(["--rdzv-conf", "join_timeout=30,read_timeout=10", "t.py"])) == 50
    assert rendezvous_limit_s(split_args(["--rdzv_conf=last_call_timeout=5", "t.py"])) == 600 + 2 * 60
    with pytest.raises(UserError, match="join_timeout"):
        rendezvous_limit_s(split_args(["--rdzv-conf", "join_timeout=soon", "t.py"]))
