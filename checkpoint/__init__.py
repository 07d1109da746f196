"""The state model, save/restore with the commit protocol, and on-disk formats."""
from checkpoint.checkpointer import Checkpointer
from checkpoint.config import CheckpointConfig
from checkpoint.format import CorruptCheckpoint, committed_steps
from checkpoint.state import Chunk, chunk_of, flatten
from checkpoint.store import load_state, save_state

__all__ = ["Checkpointer", "CheckpointConfig", "Chunk", "chunk_of", "flatten", "save_state", "load_state", "committed_steps", "CorruptCheckpoint"]
