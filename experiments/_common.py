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
    return p


def versions() -> dict:
    import torch

    import diffusion_lab

    return {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__, "python": platform.python_version()}


def write(out: str, name: str, rows: list[dict], settings: dict, headline: dict) -> None:
    """Write NAME.csv and NAME.json (settings, versions, headline numbers) into ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    doc = {"experiment": name, "settings": settings, "headline": headline, "versions": versions(),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump(doc, fh, indent=2, default=float)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    w = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(w[c]) for c in cols)]
    lines += ["  ".join(fmt(r[c]).rjust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)
