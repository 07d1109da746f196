"""The state model, lazy asynchronous multi-level checkpoints with the node keeper,
erasure-coded in-memory snapshots, on-disk formats, and universal conversion.

For your own training loop: ``AsyncCheckpointer`` (checkpoint/stateful.py; save returns a
``SaveHandle``), and for DeepSpeed ``checkpoint.deepspeed_engine.enable(engine)``.

The names below are imported on first use: a process that needs only a part (the node
keeper, a converter, a worker without DTensors) does not pay for importing the rest.
"""
import importlib

_API = {  # name -> the module that defines it
    "Checkpointer": "checkpoint.checkpointer", "SaveTiming": "checkpoint.checkpointer",
    "CheckpointConfig": "checkpoint.config",
    "load_any": "checkpoint.convert",
    "CorruptCheckpoint": "checkpoint.format", "committed_steps": "checkpoint.format",
    "KeeperHandle": "checkpoint.keeper", "collect_garbage": "checkpoint.keeper", "job_id": "checkpoint.keeper",
    "shm_free": "checkpoint.keeper", "start_keeper": "checkpoint.keeper",
    "EcSnapshots": "checkpoint.snapshot", "format_keeper": "checkpoint.snapshot", "inspect_keeper": "checkpoint.snapshot",
    "SnapshotConfig": "checkpoint.snapshot_config",
    "Chunk": "checkpoint.state", "chunk_of": "checkpoint.state", "flatten": "checkpoint.state",
    "AsyncCheckpointer": "checkpoint.stateful", "SaveHandle": "checkpoint.stateful",
    "init_optimizer_state": "checkpoint.stateful",
    "load_state": "checkpoint.store", "save_state": "checkpoint.store",
    "load_universal": "checkpoint.universal",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'checkpoint' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
