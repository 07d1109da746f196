"""The state model, lazy asynchronous multi-level checkpoints with the node keeper,
erasure-coded in-memory snapshots, on-disk formats, and universal conversion.

For your own training loop: ``AsyncCheckpointer`` (checkpoint/stateful.py; save returns a
``SaveHandle``), and for DeepSpeed ``checkpoint.deepspeed_engine.enable(engine)``."""
from checkpoint.checkpointer import Checkpointer, SaveTiming
from checkpoint.config import CheckpointConfig
from checkpoint.convert import load_any
from checkpoint.format import CorruptCheckpoint, committed_steps
from checkpoint.keeper import KeeperHandle, collect_garbage, job_id, shm_free, start_keeper
from checkpoint.snapshot import EcSnapshots, format_keeper, inspect_keeper
from checkpoint.snapshot_config import SnapshotConfig
from checkpoint.state import Chunk, chunk_of, flatten
from checkpoint.stateful import AsyncCheckpointer, SaveHandle, init_optimizer_state
from checkpoint.store import load_state, save_state
from checkpoint.universal import load_universal

__all__ = ["Checkpointer", "CheckpointConfig", "Chunk", "chunk_of", "flatten", "save_state", "load_state",
           "committed_steps", "CorruptCheckpoint", "load_any", "load_universal", "KeeperHandle", "start_keeper", "collect_garbage", "shm_free",
           "job_id", "EcSnapshots", "inspect_keeper", "format_keeper", "SnapshotConfig", "AsyncCheckpointer",
           "SaveHandle", "SaveTiming", "init_optimizer_state"]
