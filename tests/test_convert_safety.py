"""The converter and ``kintsugi ckpt`` on hard input: a tensor over 2 GiB (one write() moves at
most 0x7ffff000 bytes on Linux), damaged checkpoints (one line, exit 2, nothing left behind),
and Ctrl-C in the middle of a conversion (prompt stop, exit 130, resumable)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoint.cli import main
from checkpoint.format import write_all
from checkpoint.keeper import shm_free
from checkpoint.state import Chunk
from checkpoint.store import save_state
from checkpoint.universal import Universal

ROOT = Path(__file__).resolve().parents[1]
TAIL = 1 << 20


def pattern(n: int, seed: int) -> bytes:
    return ((np.arange(n) * 7 + seed) % 251 + 1).astype(np.uint8).tobytes()  # never zero: a hole reads as zeros


@pytest.fixture
def memory_dir(tmp_path):
    """A directory in /dev/shm (tmpfs) where it has room for the 2 GiB output, else on disk;
    removed afterwards. A write() moves at most 0x7ffff000 bytes on either, and memory spares
    the disk 2 GiB of writes (this test: 16-19 s in /dev/shm, 52 s on disk with the older
    pure-Python byte pattern, measured)."""
    if shm_free() < (5 << 30):  # a container's 64 MiB /dev/shm, say
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="kintsugi-test-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_tensor_over_2gib_is_converted_whole(memory_dir):
    """A 2 GiB + 1 MiB tensor through ``convert --to safetensors``: its last bytes, which lie
    beyond what one pwrite() moves, arrive (the source file is sparse but for them)."""
    n = (1 << 31) + TAIL
    blob = json.dumps({"big": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    blob += b" " * (-len(blob) % 8)
    src = memory_dir / "src.safetensors"
    fd = os.open(src, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_all(fd, struct.pack("<Q", len(blob)) + blob + pattern(4096, 1))
        os.ftruncate(fd, 8 + len(blob) + n)
        write_all(fd, pattern(TAIL, 2), 8 + len(blob) + n - TAIL)
    finally:
        os.close(fd)
    assert main(["convert", str(src), str(memory_dir / "dst"), "--to", "safetensors", "--quiet", "--workers", "1"]) == 0
    out = memory_dir / "dst" / "model.safetensors"
    with open(out, "rb") as f:
        (m,) = struct.unpack("<Q", f.read(8))
        start = 8 + m
        assert json.loads(f.read(m))["big"]["data_offsets"] == [0, n]
        assert f.read(4096) == pattern(4096, 1)
        f.seek(start + n - TAIL)
        assert f.read() == pattern(TAIL, 2)


# -- damaged input: one line, exit 2 -------------------------------------------------------------

def run_cli(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def damaged(tmp_path):
    """A native step whose shard header length is damaged, and its intact twin."""
    g = torch.Generator().manual_seed(0)
    state = {f"model.w{i}": Chunk(torch.randn(8, 8, generator=g), (8, 8), (0, 0), True) for i in range(3)}
    save_state(tmp_path / "good", 1, {**state, "step": 1})
    save_state(tmp_path / "bad", 1, {**state, "step": 1})
    shard = tmp_path / "bad" / "step_00000001" / "shard_00000.safetensors"
    with open(shard, "r+b") as f:
        f.write(struct.pack("<Q", 2 ** 62))  # OverflowError / MemoryError before
    return tmp_path


def test_verify_convert_inspect_on_damaged_input_print_one_line(damaged, capsys):
    bad, good = str(damaged / "bad"), str(damaged / "good")
    assert "damaged header" in run_cli(["verify", bad, good], capsys)
    for to in ("universal", "safetensors", "dcp"):
        assert "damaged header" in run_cli(["convert", bad, str(damaged / to), "--to", to, "--quiet"], capsys)
        assert not (damaged / to).exists() and not (damaged / (to + ".partial")).exists()
    manifest = damaged / "bad" / "step_00000001" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"shape": [\n    8,', '"shape": [\n    -8,', 1))
    assert "has a bad entry of tensor" in run_cli(["inspect", bad], capsys)
    st = damaged / "model.safetensors"
    st.write_bytes(struct.pack("<Q", 12) + b'{"a": [1]}  ')
    assert "has a damaged header" in run_cli(["inspect", str(st)], capsys)


# -- Ctrl-C --------------------------------------------------------------------------------------

def test_ctrl_c_stops_a_conversion_promptly_and_the_rerun_resumes(tmp_path):
    """SIGINT while converting 200 tensors (two workers, a budget that lets one run at a time,
    so the other waits): the queued and the waiting tensors are dropped, ``DST.partial`` is
    kept, one line, exit 130; the rerun converts only the rest."""
    g = torch.Generator().manual_seed(0)
    full = {f"model.layer{i:03d}": torch.randn(128, 512, generator=g) for i in range(200)}  # 256 KiB each
    save_state(tmp_path / "src", 1, {n: Chunk(t, tuple(t.shape), (0, 0), True) for n, t in full.items()})
    dst, partial = tmp_path / "out", tmp_path / "out.partial"
    cmd = [sys.executable, "-m", "checkpoint", "convert", str(tmp_path / "src"), str(dst), "--to", "universal",
           "--workers", "2", "--max-memory", "768K", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and len(list((partial / "atoms").glob("*.safetensors"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "interrupted" in err and f"{partial} is kept" in err and "Traceback" not in err
    written = list((partial / "atoms").glob("*.safetensors"))
    assert not dst.exists() and 3 <= len(written) < 50  # not every queued tensor (200) was converted
    inodes = {p.name: p.stat().st_ino for p in written}
    assert main(cmd[3:]) == 0  # the rerun
    assert all((dst / "atoms" / name).stat().st_ino == ino for name, ino in inodes.items())  # kept, not redone
    u = Universal(dst)
    assert len(u.tensors) == 200 and all(torch.equal(u.read(n), t) for n, t in full.items())


def test_deepspeed_universal_files_carry_the_zip_checksums(tmp_path):
    """save_pt builds torch.save's zip without torch's CRC-32s and fills them in itself:
    every record must check (zipfile verifies each one) and load back, empty tensors and a
    buffer grown past its first size included."""
    import zipfile

    from checkpoint.convert.deepspeed import save_pt

    objects = [{"param": torch.randn(300, 7), "cat_dim": 0}, torch.tensor(3.0),
               {"a": [torch.ones(5), torch.zeros(0)], "b": torch.arange(3 << 18, dtype=torch.int64)}]
    for i, obj in enumerate(objects):
        path = tmp_path / f"{i}.pt"
        save_pt(obj, path, size_hint=16)  # far too small a hint: the buffer grows
        with zipfile.ZipFile(path) as z:
            assert z.testzip() is None and all(info.CRC for info in z.infolist() if info.file_size)
        back = torch.load(path, weights_only=True)
        flat = lambda o: o if isinstance(o, torch.Tensor) else o.get("param", o.get("b"))  # noqa: E731
        assert torch.equal(flat(back), flat(obj))
    assert torch.serialization.get_crc32_options()  # torch.save elsewhere keeps its own CRCs
