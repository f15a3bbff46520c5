"""Pieces shared by the subcommands: the parser class, repeated options and their checks, output writing."""
from __future__ import annotations

import argparse
import sys


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump, no traceback) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# ------------------------------------------------------------------------------------------------
# options used by several subcommands

def add_target_schedule(p) -> None:
    """--target (an exact target) and --schedule (a noise schedule)."""
    from ..schedules import SCHEDULES
    from ..targets import TARGETS

    p.add_argument("--target", default="ring8", choices=sorted(TARGETS), help="exact target (default ring8)")
    p.add_argument("--schedule", default="vp", choices=sorted(SCHEDULES), help="noise schedule (default vp)")


def add_seed(p) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_threads(p, help: str) -> None:
    p.add_argument("--threads", type=int, default=1, help=help)


def set_threads(args, parser) -> None:
    """Check --threads >= 1 and set torch's intra-op thread count."""
    import torch

    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)


def add_device(p, help: str) -> None:
    p.add_argument("--device", default="auto", help=help)


def device(name: str):
    """torch.device for auto (cuda if available), cpu, cuda, cuda:N; ValueError for CUDA on a machine without it."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return torch.device(name)


def choose_device(args, parser):
    """The device of --device, or a parser error."""
    try:
        return device(args.device)
    except ValueError as exc:
        parser.error(str(exc))


def add_out(p, default: str, help: str | None = None) -> None:
    p.add_argument("--out", default=default, metavar="DIR", help=help or f"output folder (default {default})")


def add_no_plot(p, help: str = "skip the figure") -> None:
    p.add_argument("--no-plot", action="store_true", help=help)


def at_least(parser, option: str, value, lo) -> None:
    """parser error "OPTION must be >= LO, got VALUE" unless value >= lo."""
    if value < lo:
        parser.error(f"{option} must be >= {lo}, got {value}")


# ------------------------------------------------------------------------------------------------
# output files

def versions(numpy: bool = False) -> dict:
    """Versions recorded in every settings.json."""
    import platform

    import torch

    import diffusion_lab

    out = {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__}
    if numpy:
        import numpy as np

        out["numpy"] = np.__version__
    out["python"] = platform.python_version()
    return out


def write_csv(path: str, rows: list) -> None:
    """rows (a list of dicts with the same keys) as CSV with a header."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def write_json(path: str, obj, default=None) -> None:
    import json

    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2, default=default)
