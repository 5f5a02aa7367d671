"""The ``kvkernels`` command line (also ``python -m kvkernels``).

Subcommands live in :data:`SUBCOMMANDS`: name -> (help, add_arguments(parser), run(args) -> exit status).
Another module adds one by calling :func:`register_subcommand` at import time and being listed in
:data:`SUBCOMMAND_MODULES` (imported lazily, only when building the parser, and skipped if it cannot be
imported, so a missing optional dependency never breaks ``kvkernels demo``). For example
``kvkernels/eval/cli.py``::

    from kvkernels.cli import register_subcommand
    register_subcommand("eval", "run the evaluation", add_arguments, main)
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple, Optional, Sequence


class Subcommand(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS: dict[str, Subcommand] = {}
# Modules that register subcommands when imported (the demo's is registered below, in this file).
SUBCOMMAND_MODULES = ["kvkernels.eval.cli", "kvkernels.hf.tp"]


def register_subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                        run: Callable[[argparse.Namespace], int]) -> None:
    """Add ``kvkernels <name>``: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the status."""
    SUBCOMMANDS[name] = Subcommand(help, add_arguments, run)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from . import demo
    demo.add_arguments(parser)


def _demo_run(args: argparse.Namespace) -> int:
    from . import demo
    return demo.main(args)


register_subcommand("demo", "KVzip compress-once/ask-many on SmolLM2-135M-Instruct (the main job)",
                    _demo_arguments, _demo_run)


def _load_subcommand_modules() -> None:
    for module in SUBCOMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # the module is simply not there (yet)
            print(f"kvkernels: subcommands of {module} unavailable: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    _load_subcommand_modules()
    parser = argparse.ArgumentParser(prog="kvkernels", description="kvkernels: KV-cache compression kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
