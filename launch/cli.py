"""The `kintsugi` command: one entry, a subcommand per job.

    kintsugi launch ...     train under torchrun's elastic agent (launch/launcher.py)
    kintsugi ckpt ...       convert / inspect / verify checkpoints (checkpoint/cli.py)
    kintsugi diagnose ...   diagnosis report of a run directory (diagnostics/cli.py)
    kintsugi plan ...       placement and pipeline split for a heterogeneous cluster (launch/plan.py)
"""
from __future__ import annotations

import importlib
import importlib.metadata
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "launch": ("launch.launcher", "run the trainer or your script under torchrun's agent: preflight, keeper, monitor"),
    "ckpt": ("checkpoint.cli", "convert, inspect and verify checkpoints (native, universal, DeepSpeed, DCP, safetensors)"),
    "diagnose": ("diagnostics.cli", "report hangs, stragglers and slow links of a run directory (C4D, MegaScale)"),
    "plan": ("launch.plan", "place parallel groups on a heterogeneous-NIC cluster and split the pipeline (Holmes)"),
}


def version() -> str:
    try:
        return importlib.metadata.version("kintsugi")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def usage() -> str:
    lines = ["usage: kintsugi [--version] <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`kintsugi <command> --help` for a command's flags and exit codes.",
              "exit codes: 0 success, 1 a check found a problem (ckpt verify: differences), 2 bad input "
              "(one line on stderr), other: the job's."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        import torch

        print(f"kintsugi {version()} (torch {torch.__version__}, python {sys.version.split()[0]})")
        return 0
    if argv[0] not in SUBCOMMANDS:
        print(f"kintsugi: error: unknown command {argv[0]!r}; one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return module.main(argv[1:])
