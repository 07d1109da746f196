"""`kintsugi diagnose` (also `python -m diagnostics`): report on a run directory, or watch one.

    kintsugi diagnose report RUN_DIR [--json] [--no-html] [--flight-recorder PATH]
    kintsugi diagnose watch RUN_DIR [--interval S] [--no-stacks]

``report`` writes RUN_DIR/diagnostics/report.json and report.html (with report-files/) and
prints a summary, or with ``--json`` the report itself on stdout (machine-readable; the
files are still written). ``watch`` is the launcher's monitor for a job that
``kintsugi launch`` did not start (plain torchrun, Slurm, a notebook): it prints each
verdict as it is found, appends it to verdicts.jsonl, dumps local ranks' stacks on a hang,
and asks for link probes; it takes no action on the job. It exits once the job has
finished (every rank of its latest generation closed, then 10 s without a new one) or on
Ctrl-C. Exit status 0; 2 on a user error.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from comms import UserError, exits_on_user_error
from diagnostics import report
from diagnostics.detect import Detector, write_verdicts

DONE_QUIET_S = 10.0  # after the job's last rank closed, how long to wait for a restart


@exits_on_user_error
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kintsugi diagnose", description="Hang, straggler and slow-link diagnosis of a run.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="summarise RUN_DIR's traces; write report.json and report.html")
    rp.add_argument("run_dir", type=Path, help="the job's train.run_dir (holds diagnostics/)")
    rp.add_argument("--json", action="store_true", help="print the report as JSON on stdout instead of the summary")
    rp.add_argument("--no-html", action="store_true", help="skip report.html (no matplotlib needed)")
    rp.add_argument("--flight-recorder", action="append", default=[], metavar="PATH",
                    help="also read torch Flight Recorder dumps: a directory or a file prefix such as "
                         "/tmp/nccl_trace_rank_ (RUN_DIR/diagnostics/flight-recorder/ is always read)")
    wp = sub.add_parser("watch", help="watch a running job's RUN_DIR and print verdicts as they are found")
    wp.add_argument("run_dir", type=Path, help="the job's train.run_dir (holds diagnostics/)")
    wp.add_argument("--interval", type=float, default=0.5, help="seconds between reads of the traces (default 0.5)")
    wp.add_argument("--no-stacks", action="store_true", help="do not signal local ranks for their stacks on a hang")
    a = ap.parse_args(argv)
    return watch(a) if a.cmd == "watch" else _report(a)


def _report(a) -> int:
    rep, det = report.build(a.run_dir, a.flight_recorder)
    out = a.run_dir / "diagnostics"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    if not a.no_html:
        from diagnostics.html import write_html

        write_html(rep, det, out)
    if a.json:
        print(json.dumps(rep, default=str))
        return 0
    print(report.summary(rep))
    print(f"wrote {out / 'report.json'}" + ("" if a.no_html else f" and {out / 'report.html'}"))
    return 0


def watch(a) -> int:
    if not a.run_dir.is_dir():
        raise UserError(f"run directory {str(a.run_dir)!r} does not exist; pass the train.run_dir of a running job")
    if a.interval <= 0:
        raise UserError("--interval must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    det = Detector(a.run_dir, live=True, dump_stacks=not a.no_stacks)
    print(f"kintsugi diagnose: watching {a.run_dir} (Ctrl-C to stop)", flush=True)
    done_since = None
    try:
        while True:
            verdicts = det.poll()
            if verdicts:
                (a.run_dir / "diagnostics").mkdir(exist_ok=True)
                write_verdicts(a.run_dir, verdicts)
            for v in verdicts:
                print(f"{time.strftime('%H:%M:%S')} {v.line()}", flush=True)
            latest = max(det.gens.values(), key=lambda g: g.id, default=None)
            finished = latest is not None and latest.state and all(s.get("closed") for s in latest.state.values())
            done_since = (done_since or time.time()) if finished else None
            if done_since and time.time() - done_since > DONE_QUIET_S:
                print(f"kintsugi diagnose: the job finished; {len(det.verdicts)} verdict(s)", flush=True)
                return 0
            time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0
