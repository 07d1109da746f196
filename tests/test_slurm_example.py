"""examples/slurm.sbatch: valid bash, one node is not elastic, several are, its timeouts nest
inside each other, and the command it would run is one `kintsugi launch` accepts."""
from __future__ import annotations

import re
import shlex
import subprocess

import pytest

from conftest import ROOT, env, kintsugi
from launch.launcher import STOP_GRACE_S

SBATCH = ROOT / "examples" / "slurm.sbatch"


def dry_run(nodes: int, *args: str) -> list[str]:
    out = subprocess.run(["bash", str(SBATCH), "configs/tiny.toml", *args], cwd=ROOT, capture_output=True, text=True,
                         env=env(DRY_RUN="1", SLURM_JOB_NUM_NODES=str(nodes), SLURM_GPUS_PER_NODE="2"))
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_sbatch_is_valid_bash_with_nested_timeouts():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    lead = int(re.search(r"#SBATCH --signal=B:USR1@(\d+)", text)[1])
    close = int(re.search(r"^CLOSE_TIMEOUT_S=(\d+)", text, re.M)[1])
    assert "#SBATCH --requeue" in text and lead > close + STOP_GRACE_S  # the stop ends before Slurm's time limit


@pytest.mark.parametrize("nodes,nnodes", [(1, "1"), (2, "1:2")])
def test_dry_run_prints_a_launch_command_kintsugi_accepts(nodes, nnodes):
    [line] = dry_run(nodes, "--train.steps=10")
    argv = shlex.split(line)
    assert argv[:4] == ["srun", "--kill-on-bad-exit=0", "kintsugi", "launch"]
    launch = argv[3:]
    assert launch[launch.index("--nnodes") + 1] == nnodes
    assert launch[launch.index("--run-dir") + 1] == str(ROOT / "runs" / "kintsugi")  # the job's name, not its id
    out = kintsugi(*launch, "--dry-run")
    assert out.returncode == 0, out.stderr
    assert f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={240 + int(STOP_GRACE_S)}" in out.stdout
