"""Collective-trace analysis (the rule table ``RULES``), straggler scores, hang stacks, link
probes, Flight Recorder dumps, fault injection, reports and the ``kintsugi diagnose`` CLI."""
from diagnostics.config import DiagnosticsConfig
from diagnostics.detect import RULES, Detector, Verdict, dump_stacks, stop_all, write_verdicts
from diagnostics.inject import Injector

__all__ = ["DiagnosticsConfig", "Detector", "RULES", "Verdict", "Injector", "dump_stacks", "stop_all", "write_verdicts"]
