"""The project installed as a cluster user installs it: non-editable (`pip install .`) into
a fresh environment that already has torch and the other dependencies, then `kintsugi
launch` from another directory finds its default config inside the package."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv

import pytest

from conftest import ROOT, env


def test_non_editable_install_runs_kintsugi_launch_elsewhere(tmp_path):
    env_dir, work = tmp_path / "env", tmp_path / "elsewhere"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (and pip, setuptools) of this test run's environment, offline; its
    # editable install of this project is not seen (only its site dir's .pth files add it).
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KINTSUGI_RUN_DIR", "KINTSUGI_CONFIG")}
    # pip builds in the source tree: build from a copy, as a fresh clone would be.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    pip = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                          "--ignore-installed", str(src)], env=clean, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    work.mkdir()
    where = subprocess.run([python, "-c", "import trainer, checkpoint; print(trainer.__file__, checkpoint.__file__)"],
                           cwd=work, env=clean, capture_output=True, text=True, check=True).stdout
    assert all(p.startswith(site) for p in where.split()), where
    out = subprocess.run([env_dir / "bin" / "kintsugi", "launch", "--nproc-per-node", "1", "--train.steps=2",
                          "--diagnostics.inject=[]", "--train.progress=false"], cwd=work,
                         env={**clean, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "done: step 2/2" in out.stdout and (work / "runs" / "tiny" / "checkpoints" / "latest").is_file()
    version = subprocess.run([env_dir / "bin" / "kintsugi", "--version"], cwd=work, env=clean, capture_output=True, text=True)
    assert version.stdout.startswith("kintsugi 0.") and sys.version.split()[0] in version.stdout


@pytest.mark.parametrize("module", ["checkpoint.keeper.__main__", "diagnostics.cli", "launch.launcher"])
def test_processes_that_move_bytes_or_read_traces_import_no_torch(module):
    """torch's import alone takes seconds: the node keeper (every job start and restart waits
    for it), ``kintsugi diagnose`` (a report on a login node) and ``kintsugi launch`` until
    it has checked the command line and the config do without it."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
