"""Configuration of collective tracing and fault injection (the [diagnostics] section)."""
from __future__ import annotations

from dataclasses import dataclass

from comms.configlib import doc


@dataclass
class DiagnosticsConfig:
    """Collective tracing and fault injection (for tests and drills)."""

    trace: bool = doc("Record every collective in a per-rank ring buffer.", True)
    inject: list = doc("Faults to inject, e.g. `crash:rank=1,step=30`; empty = none.", [])

    def validate(self):
        pass
