"""User errors end in one clear line, exit code 2, no traceback, before any worker starts."""
from __future__ import annotations

import os

import pytest

from conftest import JOB, kintsugi

CPUS = os.cpu_count() or 1


def one_line_error(out, *words):
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("kintsugi: error:"), out.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args,words", [
    (["--model.nope=1"], ["model.nope", "known keys"]),
    (["--bogus.dim=1"], ["[bogus]", "known sections"]),
    (["--model.dim=abc"], ["model.dim", "expected int", "'abc'"]),
    (["--config", "/does/not/exist.toml"], ["/does/not/exist.toml", "not found"]),
    (["--run-dir", "/does/not/exist/run"], ["train.run_dir", "/does/not/exist", "does not exist"]),
    (["--nproc-per-node", "3", "--parallel.tp=2"], ["world size 3", "not divisible"]),
    (["--nproc-per-node", "3"], ["data.batch_size", "data-parallel size 3"]),
    (["--nproc-per-node", "2", "--parallel.tp=3"], ["parallel.tp"]),
    (["--nproc-per-node", str(8 * CPUS), f"--data.batch_size={8 * CPUS}"], ["preflight", "CPU core"]),
    (["--train.dtype=fp8"], ["train.dtype", "fp32 or bf16"]),
])
def test_launch_rejects_bad_input(args, words, tmp_path):
    if "--run-dir" not in args:
        args = args + ["--run-dir", str(tmp_path / "run")]
    if "--config" not in args:
        args = ["--config", str(JOB)] + args
    one_line_error(kintsugi("launch", *args), *words)
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_bad_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\ndim = 3\n")
    one_line_error(kintsugi("launch", "--config", str(bad)), str(bad), "not valid TOML")


def test_unknown_subcommand():
    out = kintsugi("frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr


def test_print_config_resolves_overrides():
    import subprocess, sys
    from conftest import ROOT, env

    out = subprocess.run([sys.executable, "-m", "trainer", "--config", str(JOB), "--print-config", "--model.dim=96"],
                         env=env(), cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    assert "[model]\nvocab_size = 256\ndim = 96\n" in out.stdout


def test_preflight_memory_estimate_exceeds_free_memory(tmp_path):
    # ~3e12 parameters (a meta-device count, nothing allocated): far beyond this node's RAM
    out = kintsugi("launch", "--config", str(JOB), "--run-dir", str(tmp_path / "run"), "--nproc-per-node", "1",
                   "--model.dim=65536", "--model.n_layers=64")
    one_line_error(out, "preflight", "MB of memory", "available")


def test_preflight_checkpoint_disk_exceeds_free_disk(tmp_path):
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a 1 MiB tmpfs here (needs root and mount permission)")
    try:
        # the default model's checkpoints need ~30 MB; the run directory's disk has 1 MiB
        out = kintsugi("launch", "--config", str(JOB), "--run-dir", str(small / "run"), "--nproc-per-node", "1",
                       "--model.dim=256")
        one_line_error(out, "preflight", "checkpoints need", "free")
        assert not (small / "run").exists()
    finally:
        subprocess.run(["umount", "-l", str(small)])


def test_prebuild_refuses_a_stale_deepspeed_build_lock(tmp_path):
    """A DeepSpeed build killed mid-way leaves its lock and every later start would wait on it
    for ever: the prebuild step says so in one line instead of hanging."""
    import subprocess
    import sys

    from conftest import ROOT, env

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))
    out = subprocess.run([sys.executable, "-m", "launch.prebuild"], capture_output=True, text=True, cwd=ROOT,
                         env={**env(), "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    one_line_error(out, str(lock), "killed", "rm ")
    assert lock.exists()  # the user's to remove: nothing is deleted behind their back
