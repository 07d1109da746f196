"""Collective-trace analysis, straggler scores, hang stacks, fault injection and reports."""
from diagnostics.config import DiagnosticsConfig
from diagnostics.detect import Detector, Verdict, dump_stacks, stop_all, write_verdicts
from diagnostics.inject import Injector

__all__ = ["DiagnosticsConfig", "Detector", "Verdict", "Injector", "dump_stacks", "stop_all", "write_verdicts"]
