"""Configuration of saving and restoring (the [checkpoint] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import check, doc


@dataclass
class CheckpointConfig:
    """Saving and restoring the training state."""

    interval: int = doc("Save every N optimizer steps; 0 = only at the end and on SIGTERM.", 20)
    keep_last: int = doc("Committed steps to keep (older ones are deleted after a newer one commits).", 2)
    dir: str = doc("Checkpoint directory; empty = RUN_DIR/checkpoints.", "")
    resume: bool = doc("Resume from the newest committed step found in `dir`.", True)
    load_from: str = doc("Start from this checkpoint directory (any layout) instead of `dir`'s newest.", "")

    def validate(self):
        check(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
