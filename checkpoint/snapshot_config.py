"""Configuration of in-memory erasure-coded snapshots (the [snapshot] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import check, doc


@dataclass
class SnapshotConfig:
    """Snapshots in the node keepers' memory, protected across nodes by erasure coding (REFT)."""

    interval: int = doc("Take an in-memory snapshot (a level-0 save) every N optimizer steps (1 = every step), "
                        "erasure-coded across nodes; 0 = off (checkpoint.interval applies).", 0)
    k: int = doc("Data shares per erasure-coding group (a group has k + m nodes); 0 = chosen for the job size "
                 "or from target_survival.", 0)
    m: int = doc("Parity shares per group: any m lost nodes of a group are rebuilt from the others; parity "
                 "memory per node is m/k of its snapshot. 0 = chosen with k.", 0)
    target_survival: float = doc("Instead of k/m: pick the cheapest code whose probability that every "
                                 "snapshot survives is at least this (e.g. 0.999); 0 = off.", 0.0)
    node_failure: float = doc("Probability that a node is lost within one snapshot interval, for "
                              "target_survival.", 0.01)
    memory_mb: int = doc("Host memory per node for parity shares (m/k of the node's snapshot per coded step; "
                         "two steps while a new one is coded). The snapshots themselves count against "
                         "checkpoint.host_memory_mb. A step that does not fit is not coded (warning).", 4096)
    peer_port: int = doc("TCP port of this node's keeper for share exchange with peer keepers; 0 = any free port.", 0)
    peer_timeout_s: float = doc("A peer keeper that does not answer within this many seconds counts as lost.", 10.0)
    advertise: str = doc("The address, or the name of the network interface, at which peer keepers reach this "
                         "node's keeper; empty = the address this host uses to reach the rendezvous (MASTER_ADDR).", "")

    def validate(self):
        check(self.interval >= 0, "snapshot.interval", "must be >= 0")
        check(self.k >= 0 and self.m >= 0, "snapshot.k/m", "must be >= 0")
        check((self.k == 0) == (self.m == 0), "snapshot.k/m", "set both k and m, or neither")
        check(self.k + self.m <= 256, "snapshot.k/m", "k + m must be <= 256 (zfec)")
        check(0.0 <= self.target_survival < 1.0, "snapshot.target_survival", "must be in [0, 1)")
        check(not (self.target_survival and self.k), "snapshot.target_survival", "set k/m or target_survival, not both")
        check(0.0 <= self.node_failure < 1.0, "snapshot.node_failure", "must be in [0, 1)")
        check(self.memory_mb >= 1, "snapshot.memory_mb", "must be >= 1")
        check(0 <= self.peer_port < 65536, "snapshot.peer_port", "must be a TCP port (0 = any)")
        check(self.peer_timeout_s > 0, "snapshot.peer_timeout_s", "must be > 0")
