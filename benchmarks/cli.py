"""The ``nalora-bench`` command: ``fetch``, ``list``, ``run``, ``report``, ``compact``, ``steptime``.

Each subcommand lives with the code it drives; this file only wires them together, importing lazily so
that ``nalora-bench --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, help). Each module defines ``add_arguments(parser)`` and ``main(args) -> int``.
SUBCOMMANDS = {
    "fetch": ("benchmarks.assets.cli", "download, verify and convert offline assets into the cache"),
    "list": ("tasks.cli", "list tasks, methods, models or datasets"),
    "run": ("benchmarks.runner.cli", "run a suite (method x task x seed grid)"),
    "report": ("benchmarks.report.cli", "rebuild leaderboard, tables and plots from run JSONs"),
    "compact": ("benchmarks.runner.compact", "rewrite run records in compact form (histories to gzip side files)"),
    "steptime": ("benchmarks.perf.step_time", "time one training step per method (NA-LoRA's overhead vs LoRA)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nalora-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except (ValueError, OSError, KeyError, RuntimeError) as err:
        # Bad input and an unusable environment (results folder locked, full or read-only; a corrupt
        # asset) get one clear line, not a traceback.
        print(f"nalora-bench {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
