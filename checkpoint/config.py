"""Configuration of saving and restoring (the [checkpoint] section).

Every save is a level-0 snapshot in the node keeper's memory; some of them also go to
L1 (a node-local directory) and L2 (``dir``, the persistent copy), each on its own interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comms.configlib import check, doc

CAPTURES = ("auto", "lazy", "eager")


@dataclass
class CheckpointConfig:
    """Saving and restoring the training state."""

    interval: int = doc("Save (a level-0 snapshot in the node keeper's memory) every N optimizer steps; "
                        "0 = only at the end and on SIGTERM.", 20)
    keep_last: int = doc("Committed steps to keep in `dir` (older ones are deleted after a newer one commits).", 2)
    dir: str = doc("The persistent level L2 (a shared filesystem path); empty = RUN_DIR/checkpoints.", "")
    resume: bool = doc("Resume from the newest committed step at any level (memory, L1, `dir`).", True)
    load_from: str = doc("Start from this checkpoint directory (any layout) instead of `dir`'s newest.", "")
    l2_interval: int = doc("Write a save to `dir` every N steps (a multiple of `interval`); 0 = every save.", 0)
    keep_every: int = doc("Also keep in `dir` every step divisible by N forever (0 = none).", 0)
    l1_dir: str = doc("The node-local level L1 (fast local disk); empty = no L1.", "")
    l1_interval: int = doc("Write a save to `l1_dir` every N steps (a multiple of `interval`); 0 = every save.", 0)
    l1_keep_last: int = doc("Committed steps to keep in `l1_dir`.", 2)
    host_memory_mb: int = doc("Host memory of the node keeper for snapshots, all local ranks together. With room "
                              "for 2 snapshots per rank, a save overlaps the previous one's disk writes (more let "
                              "saves overlap slow writes); with room for 1, every save also goes to L1 (else `dir`) "
                              "and first waits until the previous one is committed there, then overwrites it in "
                              "memory; with less, saves go to `dir` synchronously. A save waits rather than "
                              "exceeding it.", 8192)
    capture: str = doc("How a save copies the tensors into the keeper's memory: `lazy` beside the next "
                       "forward/backward (the optimizer's next step waits for what is left), `eager` at the save "
                       "on the rank's torch threads, `auto` lazy on GPU (the copy engine), where CPU cores are "
                       "left idle by the local ranks' torch threads and into a slot not yet touched (the first two "
                       "saves), eager where the ranks' threads fill every core.", "auto")
    keeper_timeout_s: float = doc("The node keeper exits this long after its last trainer disconnected "
                                  "(once the job's agent is gone too).", 60.0)
    close_timeout_s: float = doc("At the end or on SIGTERM, wait at most this long for in-flight levels to commit.",
                                 600.0)

    def validate(self):
        check(self.interval >= 0, "checkpoint.interval", "must be >= 0")
        check(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        check(self.l1_keep_last >= 1, "checkpoint.l1_keep_last", "must be >= 1")
        check(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
        for name in ("l1_interval", "l2_interval"):
            n = getattr(self, name)
            check(n >= 0, f"checkpoint.{name}", "must be >= 0")
            check(n == 0 or self.interval == 0 or n % self.interval == 0, f"checkpoint.{name}",
                  f"must be a multiple of checkpoint.interval={self.interval}")
        check(not self.l1_dir or not self.dir or Path(self.l1_dir).resolve() != Path(self.dir).resolve(),
              "checkpoint.l1_dir", "must differ from checkpoint.dir (L1 and L2 keep their own steps)")
        check(self.capture in CAPTURES, "checkpoint.capture", f"must be one of {', '.join(CAPTURES)}")
        check(self.host_memory_mb >= 1, "checkpoint.host_memory_mb", "must be >= 1")
        check(self.keeper_timeout_s > 0, "checkpoint.keeper_timeout_s", "must be > 0")
        check(self.close_timeout_s > 0, "checkpoint.close_timeout_s", "must be > 0")
