"""The ``locate-edit`` command. Each subcommand is one module of this package exposing ``add(sub)``,
which registers its parser with ``func`` set to the function that runs it."""

from __future__ import annotations

import argparse
import sys

from locate.errors import LocateEditError

from . import benchmark_cmd, demo, edit_cmd, eval_cmd, info, methods_cmd, neurons_cmd, trace_cmd, trace_many_cmd, train_cmd

SUBCOMMANDS = (info, demo, trace_cmd, trace_many_cmd, neurons_cmd, methods_cmd, edit_cmd, eval_cmd, benchmark_cmd, train_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locate-edit", description="Locate facts in a language model, then edit them.")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in SUBCOMMANDS:
        mod.add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; bad input (any :class:`LocateEditError`, checked before a model loads where it
    can be) and a file that cannot be read or written end with one line on stderr, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LocateEditError as e:
        print(f"locate-edit: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the run could not read or write (permissions, a full disk)
        print(f"locate-edit: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
