"""Shared helpers: run the real trainer under real torchrun agents and read what it wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "job.toml"


def env(**extra) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.update(extra)
    return e


def torchrun_cmd(nproc: int, run_dir: Path, *overrides: str, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(max_restarts), "-m", "trainer", "--config", str(JOB),
            f"--train.run_dir={run_dir}", *overrides]


def train(nproc: int, run_dir: Path, *overrides: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run the trainer on ``nproc`` ranks (torchrun) or in one process (nproc=1 without torchrun)."""
    if nproc == 1 and not kw.pop("torchrun", False):
        cmd = [sys.executable, "-m", "trainer", "--config", str(JOB), f"--train.run_dir={run_dir}", *overrides]
    else:
        cmd = torchrun_cmd(nproc, run_dir, *overrides, **kw)
    out = subprocess.run(cmd, env=env(), cwd=ROOT, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a step logged twice (after a restart) keeps the last."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def kintsugi(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch", *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The single-process run every layout must reproduce: steps 1..6."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(1, run_dir, "--train.steps=6", "--checkpoint.interval=2")
    return run_dir
