"""Shared I/O for the experiment scripts: argument parsing, results files with their settings."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The shared options. Also pins torch to one intra-op thread: the experiments run small tensors, where OpenMP
    wake-ups under load cost more than a second thread gains (measured: ~10 ms per op)."""
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    p.add_argument("--quick", action="store_true", help="a small, fast run (for CI)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--format", default="png", choices=("png", "pdf", "svg"), help="figure file format (default png)")
    p.add_argument("--dpi", type=int, default=None, help="figure resolution (default: each figure's own)")
    return p


def figure(args, name: str) -> str:
    """The path of figure NAME in --out and --format; the figure's files in other formats are removed (so a folder
    never holds a png of an older run beside the pdf of this one)."""
    os.makedirs(args.out, exist_ok=True)
    fmt = getattr(args, "format", "png")
    for other in ("png", "pdf", "svg"):
        stale = os.path.join(args.out, f"{name}.{other}")
        if other != fmt and os.path.isfile(stale):
            os.remove(stale)
    return os.path.join(args.out, f"{name}.{fmt}")


def figure_style(args):
    """The package's figure style at --dpi (``diffusion_lab.plots.style``)."""
    from diffusion_lab.plots import style

    return style(dpi=getattr(args, "dpi", None))


def versions() -> dict:
    import torch

    import diffusion_lab

    return {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__, "python": platform.python_version()}


def write(out: str, name: str, rows: list[dict], settings: dict, headline: dict) -> None:
    """Write NAME.csv and NAME.json (settings, versions, headline numbers) into ``out``, each atomically."""
    from diffusion_lab._io import atomic_write

    os.makedirs(out, exist_ok=True)

    def write_csv(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    doc = {"experiment": name, "settings": settings, "headline": headline, "versions": versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def write_json(tmp):
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=2, default=float)

    atomic_write(os.path.join(out, f"{name}.csv"), write_csv)
    atomic_write(os.path.join(out, f"{name}.json"), write_json)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    w = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(w[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)
