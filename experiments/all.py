"""Run every experiment of the gallery and collect the headline numbers (one command regenerates every figure).

    python -m experiments.all [--out docs/figures] [--quick] [--only NAME ...]

Writes NAME.csv, NAME.json and NAME.png (or --format, at --dpi) per experiment into --out and a summary
headlines.json.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import time

from . import _common

#: the gallery, in the order of docs/results.md (modules that are missing are reported, not skipped silently)
EXPERIMENTS = [
    "convergence_orders", "edm_ablation", "ddim_eta", "pc_vs_predictor", "ncsn_two_mode", "vdm_invariance",
    "same_marginals", "em_dimension", "langevin_bias", "three_views", "cfg_counterexample", "score_error",
    "ring8_recipes", "learned_ranking", "consistency_steps", "reflow_rounds",
]


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "docs/figures")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these ({', '.join(EXPERIMENTS)})")
    args = p.parse_args(argv)
    names = args.only or EXPERIMENTS
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        p.error(f"unknown experiment(s) {unknown}; choose from {EXPERIMENTS}")
    os.makedirs(args.out, exist_ok=True)
    summary, failed = {}, []
    for name in names:
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"experiments.{name}")
        except ImportError as exc:
            failed.append(name)
            print(f"== {name}: not available ({exc})", file=sys.stderr)
            continue
        print(f"== {name}")
        argv_ = (["--out", args.out, "--seed", str(args.seed), "--format", args.format]
                 + (["--dpi", str(args.dpi)] if args.dpi is not None else []) + (["--quick"] if args.quick else []))
        headline = mod.main(argv_)
        summary[name] = {"headline": headline, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"   ({summary[name]['seconds']} s)")
    from diffusion_lab._io import atomic_write

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(summary, fh, indent=2, default=float)

    atomic_write(os.path.join(args.out, "headlines.json"), write)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
