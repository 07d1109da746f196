"""The trainer's one door to checkpoint/: save the flat state at a step, restore the newest.

This first engine is synchronous: ``save`` returns when the step is committed on disk.
The asynchronous multi-level engine replaces its internals, not its interface or format.
"""
from __future__ import annotations

from pathlib import Path

from checkpoint.config import CheckpointConfig
from checkpoint.format import committed_steps
from checkpoint.store import load_state, save_state


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, run_dir: Path):
        self.cfg = cfg
        self.root = Path(cfg.dir) if cfg.dir else Path(run_dir) / "checkpoints"

    def save(self, step: int, state: dict, extra: dict | None = None):
        """Commit ``state`` (name -> Chunk | object) as ``step``; collective over all ranks."""
        save_state(self.root, step, state, keep_last=self.cfg.keep_last, extra=extra)

    def restore(self, state: dict, optional=lambda name: False):
        """Fill ``state`` from the newest committed step: (step, objects, missing) or None.

        ``checkpoint.load_from`` (another run, any layout) is used only when this run has
        no checkpoint of its own yet, so a restarted job resumes from its own progress.
        """
        if self.cfg.resume and committed_steps(self.root):
            return load_state(self.root, state, optional)
        if self.cfg.load_from:
            return load_state(Path(self.cfg.load_from), state, optional)
        return None

    def close(self):
        """Wait for in-flight saves (none in the synchronous engine)."""
