"""The ``kvkernels`` command line (also ``python -m kvkernels``).

Subcommands live in :data:`SUBCOMMANDS`: name -> (help, add_arguments(parser), run(args) -> exit status).
Another module adds one by calling :func:`register_subcommand` at import time and being listed in
:data:`SUBCOMMAND_MODULES` (imported lazily, only when building the parser, and skipped if it cannot be
imported, so a missing optional dependency never breaks ``kvkernels demo``). For example
``kvkernels/eval/cli.py``::

    from kvkernels.cli import register_subcommand
    register_subcommand("eval", "run the evaluation", add_arguments, main)

Start-up stays fast (``kvkernels --help`` and argument errors answer in well under a second) because
nothing on the parser's path imports torch or transformers: a subcommand module and its
``add_arguments`` import only the standard library (and light kvkernels modules such as
:mod:`kvkernels._args`); ``run`` imports the heavy packages. Every option gets a help line, and its
default is shown. Values are checked at parse time (argparse ``type=`` functions from
:mod:`kvkernels._args`), so a bad one fails in one line with exit status 2 before any model loads.
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
# Modules that register subcommands when imported (the demo's and tp-demo's are registered below, in this file).
SUBCOMMAND_MODULES = ["kvkernels.eval.cli"]


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


def _tp_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from . import _args as A

    parser.add_argument("--keep", type=A.fraction(), nargs="+", default=[0.3],
                        help="fractions of context KV pairs KEPT, each in [0, 1]")
    parser.add_argument("--budgets", nargs="+", default=["global", "per_rank"],
                        choices=("global", "per_rank", "per_layer", "per_head"), help="budgets to compare")
    parser.add_argument("--people", type=A.int_at_least(1), default=16, help="people in the staff directory")
    parser.add_argument("--questions", type=A.int_at_least(1), default=4, help="questions per context")
    parser.add_argument("--tasks", nargs="*", default=[],
                        help="also one context of each quality-harness task (e.g. needle, kv_retrieval, "
                             "mixed_needle)")
    parser.add_argument("--tokens", type=A.int_at_least(128), default=1000,
                        help="approximate length of the task contexts")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 also runs the same on one process (unsharded model) and compares the tokens")
    parser.add_argument("--model", default=None,
                        help="a transformers folder to load instead of the SmolLM2 GGUF (e.g. written once by "
                             "kvkernels.hf.tp.save_for_tensor_parallel, so the ranks skip dequantising)")
    parser.add_argument("--threads", type=A.int_at_least(1), default=1, help="torch threads per rank")


def _tp_demo_run(args: argparse.Namespace) -> int:
    from .hf import tp
    return tp.main(args)


register_subcommand("tp-demo", "KVzip under tensor parallelism (run with torchrun --nproc-per-node 3): "
                    "global vs per-rank budget", _tp_demo_arguments, _tp_demo_run)


def _load_subcommand_modules() -> None:
    for module in SUBCOMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name is not None and module.startswith(exc.name):
                continue  # the module is simply not there (yet)
            print(f"kvkernels: subcommands of {module} unavailable: {exc}", file=sys.stderr)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default (not for flags, whose default is always off, nor for None)."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    _load_subcommand_modules()
    parser = argparse.ArgumentParser(prog="kvkernels", description="kvkernels: KV-cache compression kernels",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help, description=command.help,
                                             formatter_class=HelpFormatter))
    return parser


def _subparser(parser: argparse.ArgumentParser, name: Optional[str]) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's own parser, so its usage is the one shown
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 1
    return SUBCOMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
