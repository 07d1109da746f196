"""Collective-trace analysis, straggler scores, hang stacks and reports."""
from diagnostics.config import DiagnosticsConfig

__all__ = ["DiagnosticsConfig"]
