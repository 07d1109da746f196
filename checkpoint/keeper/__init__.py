"""The node keeper: one process per node that holds every local rank's newest snapshots in
shared memory (level 0: it survives a trainer crash), writes them to L1/L2 off the
trainers' cores and GIL, and erasure-codes them across nodes (REFT's snapshot management
process).

One concern per file: ``wire`` (authenticated framing), ``messages`` (typed requests and
replies), ``runtime`` (private directory, names, tokens, garbage collection), ``slots``
(level 0), ``writers`` (level writes and checksums), ``node`` (the keeper's state and
reports), ``server`` (the socket and its handler table), ``exchange`` and ``peers``
(erasure coding across keepers), ``client`` (the trainer's side).
"""
from checkpoint.keeper import messages
from checkpoint.keeper.client import KeeperClient, KeeperHandle, connect, start_keeper
from checkpoint.keeper.peers import PeerClient, PeerError, lookup, publish
from checkpoint.keeper.runtime import KeeperAddress, collect_garbage, job_id, read_token, shm_free

__all__ = ["KeeperClient", "KeeperHandle", "KeeperAddress", "connect", "start_keeper", "job_id", "read_token",
           "collect_garbage", "shm_free", "messages", "PeerClient", "PeerError", "lookup", "publish"]
