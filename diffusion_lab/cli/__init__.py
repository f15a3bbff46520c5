"""The ``diffusion-lab`` command. All of the package's terminal and file output for users starts here.

One module per subcommand (check, compare, fokker_planck, likelihood, train, sample), each with
``add_parser(sub)`` and ``run(args, parser)``; options and output helpers they share live in ``_common``.
"""
from __future__ import annotations

import argparse
import sys

from . import check, compare, diagnose, distill, fokker_planck, likelihood, sample, train
from ._common import _Parser

__all__ = ["build_parser", "main"]

# in the order of `diffusion-lab --help`
_SUBCOMMANDS = (check, compare, likelihood, fokker_planck, train, distill, sample, diagnose)


def build_parser(prog: str = "diffusion-lab") -> argparse.ArgumentParser:
    import diffusion_lab

    parser = _Parser(
        prog=prog,
        description=(
            "diffusion_lab: numerical experiments on diffusion-model theory with exact scores. "
            "One velocity field, three views: sample-path solvers, Langevin, Fokker-Planck."
        ),
    )
    parser.add_argument("--version", action="version", version=f"diffusion_lab {diffusion_lab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in _SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv=None, prog: str = "diffusion-lab") -> int:
    """Run the command line ``argv`` (default sys.argv[1:]); returns the exit status."""
    try:
        try:
            return _main(argv, prog)
        finally:  # flush here, not at interpreter exit, so that a closed pipe is caught below (also after --help)
            sys.stdout.flush()
    except BrokenPipeError:
        return _closed_pipe()


def _main(argv, prog: str) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]
    try:
        return args.func(args, sub_parser)
    except BrokenPipeError:
        raise
    except (ValueError, TypeError, OSError) as exc:
        sys.stderr.write(f"{prog} {args.command}: error: {exc}\n")
        return 2


def _closed_pipe() -> int:
    """The reader of stdout went away (``diffusion-lab check --list | head``): stop quietly, as a Unix filter does.

    Python would report the failed flush of stdout at exit; pointing stdout at /dev/null first prevents that. The
    status is 128 + SIGPIPE, what a shell reports for a command a closed pipe ended."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured in a test)
        pass
    return 141
