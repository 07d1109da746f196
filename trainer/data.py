"""The embedded corpus: the source files of this Python's standard library, as bytes.

Every machine with Python has it, so the default job needs no download. Samples are
non-overlapping windows of ``seq_len + 1`` bytes, visited in a seeded permutation per epoch.
The loader's whole state is one integer, the number of samples the job has consumed, so a
resumed run continues with exactly the next batch, on any data-parallel layout.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import torch

from comms import UserError
from trainer.config import DataConfig


def read_corpus(cfg: DataConfig) -> np.ndarray:
    root = Path(cfg.corpus_dir) if cfg.corpus_dir else Path(sysconfig.get_paths()["stdlib"])
    pattern = "*" if cfg.corpus_dir else "*.py"
    budget = int(cfg.max_corpus_mb * 2**20)
    parts, size = [], 0
    # Sorted paths: the same corpus on every rank and every run of this Python.
    for path in sorted(p for p in root.rglob(pattern) if p.is_file() and "site-packages" not in p.parts):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data[: budget - size])
        size += len(parts[-1])
        if size >= budget:
            break
    corpus = np.frombuffer(b"".join(parts), dtype=np.uint8)
    if corpus.size < 2 * (cfg.seq_len + 1):
        raise UserError(f"corpus at {str(root)!r} has {corpus.size} bytes, too few for data.seq_len={cfg.seq_len}; point data.corpus_dir at more text")
    return corpus


class Batches:
    """Deterministic batches for one data-parallel rank; ``position`` is the resumable state."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, corpus: np.ndarray | None = None):
        self.cfg = cfg
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.corpus = read_corpus(cfg) if corpus is None else corpus
        self.n_windows = (self.corpus.size - 1) // cfg.seq_len
        self.position = 0  # global samples consumed so far
        self._perm_epoch, self._perm = -1, None

    def _window(self, sample: int) -> np.ndarray:
        epoch, i = divmod(sample, self.n_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        start = int(self._perm[i]) * self.cfg.seq_len
        return self.corpus[start : start + self.cfg.seq_len + 1]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the next global batch: (inputs, targets), each (B/dp, seq_len)."""
        per_rank = self.cfg.batch_size // self.dp_size
        first = self.position + self.dp_rank * per_rank
        rows = np.stack([self._window(first + j) for j in range(per_rank)]).astype(np.int64)
        self.position += self.cfg.batch_size
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.cfg.seed}

    def load_state_dict(self, state: dict):
        self.position = int(state["position"])
