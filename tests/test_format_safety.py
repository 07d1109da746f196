"""On-disk safety of the native format (checkpoint/format.py): retention by commit order,
``latest`` that always resolves, a redone step replaced atomically, a prune that never
leaves a step without its files, and a real kill -9 at every commit point.

Run as a script (``python tests/test_format_safety.py ROOT KEEP_LAST STEP:VALUE...``) it saves
those steps one after another with ``save_state`` in one process: the crash tests' victim.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import format as fmt  # noqa: E402
from checkpoint.format import (  # noqa: E402
    COMMITS, LATEST, MANIFEST, TRASH, CorruptCheckpoint, check_latest, committed_steps, read_manifest, step_dirname,
)
from checkpoint.state import Chunk  # noqa: E402
from checkpoint.store import load_state, save_state  # noqa: E402

N = 64


def save(root: Path, step: int, value: int | None = None, keep_last: int = 2):
    """Save ``step`` holding ``value`` (default: the step) in one tensor and in its objects."""
    value = step if value is None else value
    save_state(root, step, {"w": Chunk(torch.full((N,), float(value)), (N,), (0,), True), "value": value},
               keep_last=keep_last)


def loaded(root: Path, step: int | None = None) -> tuple[int, int]:
    """(step, value) restored by ``load_state``; the tensor and the objects must agree."""
    target = {"w": Chunk(torch.zeros(N), (N,), (0,))}
    got, objects, _ = load_state(root, target, step=step)
    t = target["w"].tensor
    assert torch.all(t == objects["value"]), (got, t, objects)
    return got, objects["value"]


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# -- retention by commit order -----------------------------------------------------------------

def test_a_commit_numbered_below_older_steps_is_kept_and_latest_resolves(tmp_path):
    root = tmp_path / "ckpt"
    for step in (50, 60):
        save(root, step)
    save(root, 10)  # a new run in this directory (resume=false), or DeepSpeed tags restarting at 1
    assert committed_steps(root) == [10, 60]
    assert (root / LATEST).read_text().strip() == step_dirname(10) and check_latest(root) is None
    assert loaded(root) == (10, 10)
    save(root, 20)
    assert committed_steps(root) == [20, 10]  # step 60, the oldest commit, went though numbered highest
    assert names(root) == [COMMITS, LATEST, step_dirname(10), step_dirname(20)]


def test_keep_and_steps_from_before_the_journal(tmp_path):
    root = tmp_path / "ckpt"
    for step in (20, 30, 40):
        save(root, step, keep_last=5)
    (root / COMMITS).unlink()  # written before the journal existed: older than any journaled commit
    save(root, 5, keep_last=5)
    assert committed_steps(root) == [5, 40, 30, 20]
    assert loaded(root) == (5, 5)
    fmt.prune(root, 2, 5, keep=lambda s: s % 20 == 0)  # keep_every=20 keeps step 20 beyond keep_last
    assert committed_steps(root) == [5, 40, 20]


def test_a_torn_journal_line_is_skipped_not_misread(tmp_path):
    root = tmp_path / "ckpt"
    save(root, 1, keep_last=5)
    save(root, 7, keep_last=5)
    with open(root / COMMITS, "a") as f:
        f.write("step_0000000")  # a line cut short (power loss): not step 0, and not glued to the next
    (root / step_dirname(0)).mkdir()
    save(root, 3, keep_last=5)
    assert (root / COMMITS).read_text().splitlines()[-1] == step_dirname(3)
    assert committed_steps(root)[:3] == [3, 7, 1]


def test_the_journal_is_compacted_and_keeps_the_order(tmp_path):
    root = tmp_path / "ckpt"
    order = [1000 - i if i % 2 else i for i in range(120)]  # numbers jump up and down
    for step in order:
        save(root, step, keep_last=3)
    assert committed_steps(root) == order[::-1][:3]
    lines = (root / COMMITS).read_text().splitlines()
    assert len(lines) <= 2 * 3 + 64 + 1 and lines[-3:] == [step_dirname(s) for s in order[-3:]]
    assert names(root) == sorted([COMMITS, LATEST] + [step_dirname(s) for s in order[-3:]])


def test_latest_naming_a_missing_step_falls_back_with_one_line(tmp_path, capsys):
    root = tmp_path / "ckpt"
    save(root, 10)
    save(root, 20)
    shutil.rmtree(root / step_dirname(20))  # e.g. pruned by an older version right after its commit
    assert "step_00000020" in check_latest(root)
    assert loaded(root) == (10, 10)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "names 'step_00000020', which is missing" in out and step_dirname(10) in out


# -- replacing and deleting steps ----------------------------------------------------------------

def test_a_redone_step_replaces_its_copy(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save(root, 10, 1000)
    save(root, 20, 2000)
    save(root, 20, 2001)  # redone after a restart: exchanged with the old copy, which is then deleted
    assert loaded(root) == (20, 2001) and committed_steps(root) == [20, 10]
    assert names(root) == [COMMITS, LATEST, step_dirname(10), step_dirname(20)]
    # A filesystem without RENAME_EXCHANGE: the old copy is renamed aside, then the new one in.
    monkeypatch.setattr(fmt, "_exchange", lambda a, b: False)
    save(root, 20, 2002)
    assert loaded(root) == (20, 2002) and loaded(root, 10) == (10, 1000)
    assert names(root) == [COMMITS, LATEST, step_dirname(10), step_dirname(20)]


def test_prune_clears_trash_and_damaged_steps_not_steps_in_flight(tmp_path):
    root = tmp_path / "ckpt"
    save(root, 10, keep_last=5)
    save(root, 20, keep_last=5)
    (root / f"{TRASH}{step_dirname(5)}.0badc0de").mkdir()  # left by a killed prune
    (root / f"{TRASH}{step_dirname(5)}.0badc0de" / "shard_00000.safetensors").write_bytes(b"x")
    (root / step_dirname(15)).mkdir()  # a step without its manifest: damaged
    (root / (step_dirname(5) + ".tmp")).mkdir()  # abandoned by a crash
    (root / (step_dirname(40) + ".tmp")).mkdir()  # may be in flight
    assert 15 in committed_steps(root)  # listed, so that a restore says why it skips it
    with pytest.raises(CorruptCheckpoint, match="has no manifest.json"):
        read_manifest(root / step_dirname(15))
    save(root, 30, keep_last=5)
    assert names(root) == [COMMITS, LATEST, step_dirname(10), step_dirname(20), step_dirname(30),
                           step_dirname(40) + ".tmp"]


# -- kill -9 at every commit point ---------------------------------------------------------------

def victim(root: Path, keep_last: int, saves: list[tuple[int, int]], fault: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("KINTSUGI_FAULT", None)
    if fault:
        env["KINTSUGI_FAULT"] = fault
    args = [f"{s}:{v}" for s, v in saves]
    return subprocess.run([sys.executable, __file__, str(root), str(keep_last), *args], env=env).returncode


def check_visible(root: Path):
    """Every visible step is complete and its own, ``latest`` resolves, nothing half-deleted."""
    steps = committed_steps(root)
    assert steps
    for step in steps:
        assert (root / step_dirname(step) / MANIFEST).is_file()
        got, value = loaded(root, step)
        assert got == step and value // 100 == step
    assert check_latest(root) is None


SAVES = [(10, 1000), (20, 2001), (30, 3002), (20, 2003), (5, 504)]


@pytest.mark.parametrize("fault, expect", [
    # journaled, not yet renamed: step 30 is not visible, its .tmp is left for the rerun
    ("rename:kill:3", lambda root: committed_steps(root) == [20, 10] and (root / "step_00000030.tmp").is_dir()),
    # renamed, `latest` not yet moved: it still names step 20, which is there
    ("latest:kill:3", lambda root: committed_steps(root) == [30, 20, 10]
     and (root / LATEST).read_text().strip() == step_dirname(20)),
    # step 10 renamed to trash, not yet deleted: invisible, never half there
    ("prune:kill:1", lambda root: committed_steps(root) == [30, 20] and any(root.glob(TRASH + "*"))),
    # step 20 redone: the new copy is in place, the old one waits at step_00000020.tmp
    ("exchange:kill:1", lambda root: committed_steps(root) == [20, 30] and loaded(root, 20) == (20, 2003)),
])
def test_kill9_at_commit_points_leaves_complete_steps_and_a_rerun_commits(tmp_path, fault, expect):
    root = tmp_path / "ckpt"
    assert victim(root, 2, SAVES, fault) == -signal.SIGKILL
    check_visible(root)
    assert expect(root), names(root)
    for step, value in SAVES:  # the job rerun from the start
        save(root, step, value)
    check_visible(root)
    assert committed_steps(root) == [5, 20] and loaded(root) == (5, 504)
    assert names(root) == [COMMITS, LATEST, step_dirname(5), step_dirname(20)]


def test_kill9_while_compacting_the_journal(tmp_path):
    root = tmp_path / "ckpt"
    saves = [(s, s * 100) for s in range(1, 81)]
    assert victim(root, 2, saves, "journal:kill:1") == -signal.SIGKILL
    assert (root / (COMMITS + ".tmp")).is_file()  # the new journal was written, not yet renamed
    check_visible(root)
    done = committed_steps(root)[0]
    assert committed_steps(root) == [done, done - 1]
    for step, value in saves[done:]:
        save(root, step, value)
    check_visible(root)
    assert committed_steps(root) == [80, 79] and len((root / COMMITS).read_text().splitlines()) < 80


if __name__ == "__main__":
    root, keep_last = Path(sys.argv[1]), int(sys.argv[2])
    for arg in sys.argv[3:]:
        step, value = map(int, arg.split(":"))
        save(root, step, value, keep_last)
