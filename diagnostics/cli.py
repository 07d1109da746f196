"""`kintsugi diagnose report RUN_DIR` (also `python -m diagnostics report RUN_DIR`)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from comms import exits_on_user_error
from diagnostics import report


@exits_on_user_error
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kintsugi diagnose", description="Hang, straggler and slow-link diagnosis of a run.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="summarise RUN_DIR's traces; write report.json and report.html")
    rp.add_argument("run_dir", type=Path)
    rp.add_argument("--no-html", action="store_true", help="skip report.html (no matplotlib needed)")
    a = ap.parse_args(argv)
    rep, det = report.build(a.run_dir)
    out = a.run_dir / "diagnostics"
    (out / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    print(report.summary(rep))
    if not a.no_html:
        report.write_html(rep, det, out / "report.html")
    print(f"wrote {out / 'report.json'}" + ("" if a.no_html else f" and {out / 'report.html'}"))
    return 0
