"""The `kintsugi` command: one entry, a subcommand per job.

    kintsugi launch ...     train under torchrun's elastic agent (launch/launcher.py)
    kintsugi plan ...       placement and pipeline split for a heterogeneous cluster (launch/plan.py)
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "launch": ("launch.launcher", "train under torchrun's elastic agent, with preflight checks"),
    "plan": ("launch.plan", "place parallel groups on a heterogeneous-NIC cluster and split the pipeline (Holmes)"),
}


def usage() -> str:
    lines = ["usage: kintsugi <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`kintsugi <command> --help` for a command's flags."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"kintsugi: error: unknown command {argv[0]!r}; one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])
