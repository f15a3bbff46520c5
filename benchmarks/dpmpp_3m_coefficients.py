#!/usr/bin/env python
r"""Which third-order coefficients should ``dpmpp_3m`` use by default?

``coefficients="taylor"`` integrates the quadratic interpolant of the data prediction exactly (global order 3);
``coefficients="reference"`` is what the official DPM-Solver code, diffusers and k-diffusion compute (half the
second-difference term; measured global order 2). The order decides at large N, but a sampler is used at 5-20
NFE, where the smaller second-difference term can be the more accurate one.

Decision rule, written before the run: over every cell (target x schedule x NFE in {5, 10, 20, 50} x grid in
{logsnr, karras}), take the ratio error(taylor)/error(reference) of the terminal error mean ||x - Phi(x_T)||
against the exact flow map (scipy DOP853, rtol 1e-10); the default is "taylor" if the geometric mean of the
ratios over the cells with NFE <= 20 is below 1, "reference" otherwise. The cells at NFE 50 are reported, not
voted.

Run:  python benchmarks/dpmpp_3m_coefficients.py [--samples 1000] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

try:
    from diffusion_lab import samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from diffusion_lab import samplers, schedules, targets
from diffusion_lab.reference import flow_map

CASES = [("ring8", {}), ("bimodal_1d", {}), ("gaussian_2d", {}), ("ncsn_two_mode", {}),
         ("aniso_gaussian", {"d": 16, "cond": 100.0})]
SCHEDULES = {"vp_linear": schedules.VPLinear, "vp_cosine": schedules.VPCosine, "edm": schedules.EDM}
NFES = (5, 10, 20, 50)
GRIDS = ("logsnr", "karras")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'target':15s} {'schedule':10s} {'grid':7s} {'NFE':>4s} {'taylor':>10s} {'reference':>10s} {'ratio':>7s}")
    for name, kw in CASES:
        target = targets.get_target(name, **kw)
        for sname, cls in SCHEDULES.items():
            sch = cls()
            field = target.field(sch)
            x_T = target.marginal(sch, sch.t_max).sample(a.samples, torch.Generator().manual_seed(a.seed))
            ref, _ = flow_map(field, x_T, sch.t_max, sch.t_min)
            for grid in GRIDS:
                for nfe in NFES:
                    err = {}
                    for coef in ("taylor", "reference"):
                        x = samplers.sample(field, x_T, "dpmpp_3m", steps=nfe, grid_kind=grid, coefficients=coef).x
                        err[coef] = float((x - ref).reshape(len(x), -1).norm(dim=1).mean())
                    ratio = err["taylor"] / err["reference"]
                    rows.append({"target": name, "schedule": sname, "grid": grid, "nfe": nfe, **err, "ratio": ratio})
                    print(f"{name:15s} {sname:10s} {grid:7s} {nfe:4d} {err['taylor']:10.3e} {err['reference']:10.3e} "
                          f"{ratio:7.3f}", flush=True)
    voted = [r["ratio"] for r in rows if r["nfe"] <= 20]
    gm = math.exp(sum(math.log(r) for r in voted) / len(voted))
    gm50 = math.exp(sum(math.log(r["ratio"]) for r in rows if r["nfe"] == 50) / len(NFES[-1:]) /
                    sum(1 for r in rows if r["nfe"] == 50))
    wins = sum(r < 1 for r in voted)
    verdict = "taylor" if gm < 1 else "reference"
    print(f"\ngeometric mean of taylor/reference over {len(voted)} cells with NFE <= 20: {gm:.3f} "
          f"(taylor better in {wins}); at NFE 50: {gm50:.3f}.  Rule -> default coefficients = {verdict!r}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": {"samples": a.samples, "seed": a.seed, "cases": CASES, "schedules": list(SCHEDULES),
                                    "nfes": NFES, "grids": GRIDS, "rule": "taylor iff geo-mean ratio (NFE<=20) < 1",
                                    "torch": torch.__version__},
                       "rows": rows, "geo_mean_ratio_nfe_le_20": gm, "geo_mean_ratio_nfe_50": gm50,
                       "verdict": verdict}, fh, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
