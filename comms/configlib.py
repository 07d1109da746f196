"""Helpers every component's config dataclass uses: documented fields and named checks.

In the bottom package so that each package can own its config dataclass
(checkpoint.CheckpointConfig, diagnostics.DiagnosticsConfig, trainer's others).
"""
from __future__ import annotations

from dataclasses import field

from comms.errors import UserError


def doc(text: str, default, **kw):
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


def check(ok: bool, name: str, why: str):
    if not ok:
        raise UserError(f"config {name}: {why}")
