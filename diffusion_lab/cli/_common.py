"""Pieces shared by the subcommands: the parser class, repeated options and their checks, output writing."""
from __future__ import annotations

import argparse
import sys

from .._io import atomic_write


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


def add_threads(p, help: str = "torch intra-op threads on CPU (default 1: at these tensor sizes OpenMP wake-ups "
                                        "cost more than they save)") -> None:
    p.add_argument("--threads", type=int, default=1, metavar="N", help=help)


def set_threads(args, parser, n: int | None = None) -> None:
    """Check --threads >= 1 (or use ``n`` for a command without the option) and set it through the library's one
    switch, ``diffusion_lab.set_threads``."""
    from .._threads import set_threads as _set

    n = getattr(args, "threads", 1) if n is None else n
    if n < 1:
        parser.error(f"--threads must be >= 1, got {n}")
    _set(n)


def add_device(p, help: str) -> None:
    p.add_argument("--device", default="auto", help=help)


DEVICE_NAMES = "auto, cpu, cuda, cuda:N"


def device(name: str):
    """torch.device for auto (cuda if available), cpu, cuda, cuda:N; ValueError for any other name (with the
    accepted ones) and for CUDA on a machine without it."""
    import re

    import torch

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device {name!r} is not a device this command runs on; use one of {DEVICE_NAMES}")
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


def add_out(p, default: str | None, help: str | None = None) -> None:
    """--out DIR and --overwrite (a non-empty DIR is refused without it)."""
    p.add_argument("--out", default=default, metavar="DIR",
                   help=help or f"output folder (default {default}); a non-empty folder needs --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out: this command's earlier files there are removed first, so "
                        "nothing stale stays beside the new ones (other files are left alone)")


def add_no_plot(p, help: str = "skip the figure") -> None:
    p.add_argument("--no-plot", action="store_true", help=help)


FIGURE_FORMATS = ("png", "pdf", "svg")


def add_figure_options(p) -> None:
    """--format png|pdf|svg and --dpi for the figures a command writes."""
    p.add_argument("--format", default="png", choices=FIGURE_FORMATS, help="figure file format (default png)")
    p.add_argument("--dpi", type=int, default=150, help="figure resolution in dots per inch (default 150; "
                                                        "pdf and svg are vector, dpi only sets embedded images)")


def check_figure_options(args, parser) -> None:
    if getattr(args, "dpi", 1) < 1:
        parser.error(f"--dpi must be >= 1, got {args.dpi}")


def figure_names(*stems: str) -> list:
    """Every file name a figure stem may have been written under (one per format), for stale-file removal."""
    return [f"{s}.{f}" for s in stems for f in FIGURE_FORMATS]


def at_least(parser, option: str, value, lo) -> None:
    """parser error "OPTION must be >= LO, got VALUE" unless value >= lo."""
    if value < lo:
        parser.error(f"{option} must be >= {lo}, got {value}")


def memory_limit() -> int:
    """Bytes a command may plan to allocate: half of the physical memory (the fokker-planck grid solver's
    ``default_memory_limit``, ``os.sysconf``; 4 GiB where it cannot be read)."""
    from ..fokker_planck.splitting import default_memory_limit

    return default_memory_limit()


def check_size(parser, option: str, value: int, item_bytes: float, copies: float, what: str) -> int:
    """Refuse a size option whose arrays would not fit, before anything is allocated or written.

    The estimate is need = value x item_bytes x copies: ``item_bytes`` is one item's bytes (its number of
    coordinates times 8 for float64, 4 for float32) and ``copies`` a rough count of arrays of that size alive at the
    peak (stages of the integrator, reference samples, probes; each command documents its own). A parser error
    (exit status 2, one line naming the option, its value, the estimate and the limit) is raised when need exceeds
    ``memory_limit()``; returns the estimate in bytes otherwise.
    """
    need = float(value) * float(item_bytes) * float(copies)
    limit = memory_limit()
    if need > limit:
        parser.error(f"{option} {value}: {what} needs about {need / 2**30:.1f} GiB ({value:,} x {item_bytes:g} bytes "
                     f"x ~{copies:g} live copies), over the limit of {limit / 2**30:.1f} GiB (half the physical "
                     "memory); use a smaller value")
    return int(need)


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


def prepare_out(args, parser, artefacts, keep=()) -> str:
    """Make --out ready for this command's files, before any work.

    A missing or empty folder is created. A non-empty one is refused unless ``--overwrite`` (or a ``keep`` file
    the run continues from, e.g. train --resume's checkpoint) is given; then the files of ``artefacts`` found there
    (this command's earlier outputs, every figure format) are removed, except ``keep``, so that a run with fewer
    outputs (--no-plot, another format) never leaves an older figure beside newer numbers. Returns the folder.
    """
    import os

    out = check_out(args, parser, keep)
    for name in artefacts:
        path = os.path.join(out, name)
        if name not in keep and os.path.isfile(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    return out


def check_out(args, parser, keep=()) -> str:
    """The checks of ``prepare_out`` without touching the folder (for processes other than rank 0 of a
    distributed run, which must refuse the same --out as rank 0 but leave the writing to it). Returns the folder."""
    import os

    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out} is a file, not a folder")
    present = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if present and not (getattr(args, "overwrite", False) or keep):
        shown = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        parser.error(f"--out {out} is not empty ({shown}); pass --overwrite to replace this command's files there, "
                     "or choose another folder")
    return out


def check_file_out(path: str, parser, overwrite: bool, option: str) -> None:
    """An existing file at ``path`` (an option such as --json) is refused unless ``overwrite``."""
    import os

    if os.path.isdir(path):
        parser.error(f"{option} {path} is a folder, not a file")
    if os.path.exists(path) and not overwrite:
        parser.error(f"{option} {path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"{option} {path}: no folder {folder}")


def write_csv(path: str, rows: list) -> None:
    """rows (a list of dicts) as CSV with a header: the union of their keys in first-seen order (missing cells
    empty), written atomically."""
    import csv

    fields = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def write_json(path: str, obj, default=None) -> None:
    """obj as indented JSON, written atomically."""
    import json

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, default=default)

    atomic_write(path, write)


def wrote(names, folder: str, extra: str = "") -> None:
    """The line every command ends with: what it wrote and where."""
    print(f"wrote {', '.join(names)} to {folder}" + (f" {extra}" if extra else ""))
