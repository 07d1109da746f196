"""Helpers every component's config dataclass uses: documented fields and named checks.

In the bottom package so that each package can own its config dataclass
(checkpoint.CheckpointConfig, diagnostics.DiagnosticsConfig, trainer's others).
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import field
from pathlib import Path

from comms.errors import UserError


def doc(text: str, default, **kw):
    """A dataclass field with its documentation attached."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": text, **kw})
    return field(default=default, metadata={"doc": text, **kw})


def check(ok: bool, name: str, why: str):
    if not ok:
        raise UserError(f"config {name}: {why}")


def read_toml(path: str | os.PathLike, what: str, hint: str) -> dict:
    """A TOML file's tables, or a UserError naming the file (``what``: "config file",
    "topology file"; ``hint``: how to pass a good one)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} not found; {hint}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {str(path)!r} is not valid TOML ({e}); fix the syntax") from None
