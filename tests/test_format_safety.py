"""On-disk safety of the native format (checkpoint/format.py): retention by commit order,
``latest`` that always resolves, a redone step replaced atomically, a prune that never
leaves a step without its files, a real kill -9 at every commit point, and damaged shard
headers, manifests and universal atoms (seeded random damage) that only ever raise
CorruptCheckpoint (or, for a manifest that names another model, one UserError line).

Run as a script (``python tests/test_format_safety.py ROOT KEEP_LAST STEP:VALUE...``) it saves
those steps one after another with ``save_state`` in one process: the crash tests' victim.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import format as fmt  # noqa: E402
from checkpoint.convert import convert, detect  # noqa: E402
from checkpoint.format import (  # noqa: E402
    COMMITS, LATEST, MANIFEST, TRASH, CorruptCheckpoint, check_latest, committed_steps, read_manifest, step_dirname,
)
from checkpoint.shards import ShardReader, write_shard  # noqa: E402
from checkpoint.state import Chunk  # noqa: E402
from checkpoint.store import load_state, save_state  # noqa: E402
from checkpoint.universal import Universal, load_universal  # noqa: E402
from comms import UserError  # noqa: E402

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
    order = [1000 - i if i % 2 else i for i in range(80)]  # numbers jump up and down
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



# -- damaged headers and manifests ---------------------------------------------------------------

TENSORS = {"a": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), "b": torch.arange(5),
           "c": torch.tensor(True), "d": torch.zeros(0, dtype=torch.bfloat16), "e": torch.ones(2, dtype=torch.bfloat16)}
# Values a damaged header or manifest may hold where something else belongs.
WRONG = [None, -1, 0, 1.5, True, "x", "F32", "BF16", "float64", [], [1], [-1, 2], [0, 2 ** 70], [2 ** 63, 2 ** 64],
         [3, 4], [0, 48], ["a"], {}, {"x": 1}, 2 ** 70, "../shard_00000.safetensors", "/etc/passwd"]


def raw(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def with_header(header, rest: bytes) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + rest


def damage(rng: random.Random, clean: bytes) -> bytes:
    """One random damage to a safetensors-layout file's length, header JSON or size."""
    n = struct.unpack("<Q", clean[:8])[0]
    data, kind = bytearray(clean), rng.randrange(6)
    if kind == 0:  # a few flipped bits in the length or the header
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(8 + n)] ^= 1 << rng.randrange(8)
    elif kind == 1:  # another length
        data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, n - 1, n + 1, len(clean) - 8, len(clean), 2 ** 31,
                                                  2 ** 63, 2 ** 64 - 1, rng.randrange(2 ** 64)]))
    elif kind == 2:  # truncated anywhere
        del data[rng.randrange(len(data)):]
    elif kind == 3:  # random bytes over part of the length and header
        i = rng.randrange(8 + n)
        k = len(data[i:i + rng.randint(1, 24)])
        data[i:i + k] = rng.randbytes(k)
    elif kind == 4:  # one field of the header JSON holds a wrong value
        header = json.loads(clean[8:8 + n])
        key = rng.choice(list(header))
        field = rng.choice(["dtype", "shape", "data_offsets", None]) if key != "__metadata__" else None
        if field is None:
            header[key] = rng.choice(WRONG) if rng.random() < 0.8 else {"k": rng.choice(WRONG)}
        else:
            header[key][field] = rng.choice(WRONG)
        return with_header(header, clean[8 + n:])
    else:  # a header that is JSON of another kind entirely, or nested beyond any parser's depth
        return with_header(rng.choice([b"[]", b"null", b"1", b'"x"', b"[" * 50_000 + b"]" * 50_000, b"{}",
                                       b'{"a": {"dtype": "F32"}}', b'{"a": {"dtype": "F32", "shape": [3, 4]}}']),
                           clean[8 + n:])
    return bytes(data)


def test_damaged_header_cases_name_the_problem(tmp_path):
    path = tmp_path / "s.safetensors"
    write_shard(path, TENSORS, metadata={"k": "v"})
    clean = path.read_bytes()
    n = struct.unpack("<Q", clean[:8])[0]
    header, rest = json.loads(clean[8:8 + n]), clean[8 + n:]
    cases = [
        (struct.pack("<Q", 2 ** 63) + clean[8:], "damaged header (length 9223372036854775808"),  # OverflowError before
        (struct.pack("<Q", n + 1) + clean[8:], "damaged header"),
        (clean[:5], "truncated (5 bytes)"),
        (clean[:8 + n // 2], "damaged header"),  # struct.error / JSON before
        (clean[:-4], "truncated at 'e'"),
        (with_header(b"[" * 50_000 + b"]" * 50_000, rest), "damaged header (RecursionError)"),
        (with_header(b"[1, 2]", rest), "not a JSON object"),
        (with_header({**header, "a": {**header["a"], "dtype": "F8"}}, rest), "'a' has no known dtype"),  # KeyError
        (with_header({**header, "a": {**header["a"], "shape": [-3, 4]}}, rest), "'a' has a bad shape"),
        (with_header({**header, "a": {**header["a"], "shape": "34"}}, rest), "'a' has a bad shape"),
        (with_header({**header, "b": {**header["b"], "data_offsets": [48]}}, rest), "'b' has bad data_offsets"),
        (with_header({**header, "b": {**header["b"], "data_offsets": [48, 2 ** 40]}}, rest), "truncated at 'b'"),
        (with_header({**header, "b": {**header["b"], "shape": [4]}}, rest), "'b' holds 40 bytes"),
        (with_header({**header, "__metadata__": {"k": 1}}, rest), "__metadata__ is not a map of strings"),
        (with_header({**header, "a": [1]}, rest), "'a' has no known dtype"),  # TypeError before
    ]
    for data, message in cases:
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpoint) as e:
            ShardReader(path)
        assert message in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


def test_random_header_damage_only_ever_raises_corrupt_checkpoint(tmp_path):
    """600 seeded damages of a shard's length, header and size: every read either returns the
    original bytes (a harmless change) or raises CorruptCheckpoint with one line."""
    good = tmp_path / "good.safetensors"
    crcs = write_shard(good, TENSORS, metadata={"k": "v"})
    clean, path, rng = good.read_bytes(), tmp_path / "x.safetensors", random.Random(12)
    outcomes = {"read": 0, "corrupt": 0}
    for _ in range(600):
        path.write_bytes(damage(rng, clean))
        try:
            reader = ShardReader(path)
            for key, t in TENSORS.items():
                assert raw(reader.read(key, crcs[key])) == raw(t)
                out = torch.empty_like(t)
                reader.read_into(key, out, crcs[key])
                assert raw(out) == raw(t)
            outcomes["read"] += 1
        except CorruptCheckpoint as e:
            assert "\n" not in str(e)
            outcomes["corrupt"] += 1
    assert outcomes["corrupt"] > 450, outcomes


def mutate_json(rng: random.Random, tree):
    """A copy of a JSON tree with one random node replaced by a wrong value or removed."""
    tree = copy.deepcopy(tree)
    node, path = tree, []
    while isinstance(node, (dict, list)) and node and (not path or rng.random() < 0.75):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append((node, key))
        node = node[key]
    parent, key = path[-1]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    else:
        parent[key] = rng.choice(WRONG)
    return tree


def test_random_manifest_damage_falls_back_or_is_one_user_error(tmp_path, capsys):
    """300 seeded damages of the newest step's manifest: the restore falls back to the older
    step (CorruptCheckpoint, one line), restores the newest (a harmless change), or stops with
    one UserError line (a manifest that now describes another model); never another exception."""
    root = tmp_path / "ckpt"
    save(root, 1, keep_last=5)
    save(root, 2, keep_last=5)
    path = root / step_dirname(2) / MANIFEST
    clean, rng = json.loads(path.read_text()), random.Random(5)
    seen = {"fell back": 0, "restored": 0, "user error": 0}
    for _ in range(300):
        path.write_text(json.dumps(mutate_json(rng, clean)))
        target = {"w": Chunk(torch.zeros(N), (N,), (0,))}
        try:
            step, _, _ = load_state(root, target)
            assert step in (1, 2) and torch.all(target["w"].tensor == step)
            seen["fell back" if step == 1 else "restored"] += 1
        except UserError as e:
            assert not isinstance(e, CorruptCheckpoint) and "\n" not in str(e)
            seen["user error"] += 1
    assert seen["fell back"] > 100 and seen["restored"] > 50, seen
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == seen["fell back"] and all(line.startswith("kintsugi: warning: checkpoint step 2 is damaged")
                                                   for line in lines)


def test_random_damage_of_universal_atoms_and_safetensors_sources(tmp_path):
    """Atoms of a universal checkpoint and a consolidated safetensors file, damaged at random:
    reading them (whole, by rows, or as a converter source) only raises CorruptCheckpoint."""
    root = tmp_path / "ckpt"
    state = {f"model.{k}": Chunk(t, tuple(t.shape), (0,) * t.dim(), True) for k, t in TENSORS.items()}
    save_state(root, 3, {**state, "step": 3})
    convert(root, tmp_path / "uni", "universal", progress=False)
    convert(root, tmp_path / "st", "safetensors", progress=False)
    atom, st = tmp_path / "uni" / "atoms" / "model.a.safetensors", tmp_path / "st" / "model.safetensors"
    clean_atom, clean_st, rng = atom.read_bytes(), st.read_bytes(), random.Random(7)
    corrupt = 0
    for _ in range(150):
        atom.write_bytes(damage(rng, clean_atom))
        st.write_bytes(damage(rng, clean_st))
        target = {"model.a": Chunk(torch.zeros(2, 4), (3, 4), (1, 0))}
        for read in (lambda: Universal(tmp_path / "uni").read("model.a"),
                     lambda: load_universal(tmp_path / "uni", target),
                     lambda: [detect(st).read(name) for name in detect(st).tensors]):
            try:
                read()
            except CorruptCheckpoint as e:
                assert "\n" not in str(e)
                corrupt += 1
    assert corrupt > 300
    atom.write_bytes(clean_atom)
    meta = tmp_path / "uni" / "universal.json"
    clean_meta = json.loads(meta.read_text())
    for _ in range(100):
        meta.write_text(json.dumps(mutate_json(rng, clean_meta)))
        try:
            load_universal(tmp_path / "uni", {"model.a": Chunk(torch.zeros(3, 4), (3, 4), (0, 0))})
        except UserError as e:
            assert "\n" not in str(e)


if __name__ == "__main__":
    root, keep_last = Path(sys.argv[1]), int(sys.argv[2])
    for arg in sys.argv[3:]:
        step, value = map(int, arg.split(":"))
        save(root, step, value, keep_last)


def test_the_checksum_is_zlib_crc32_so_older_manifests_verify():
    """Manifests keep the field "crc32" with zlib's polynomial whatever computes it."""
    import zlib

    import numpy as np

    from checkpoint.format import checksum

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 4096, 1 << 20):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert checksum(data) == zlib.crc32(data)
        assert checksum(data[n // 2:], checksum(data[:n // 2])) == zlib.crc32(data)
