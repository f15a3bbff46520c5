#!/usr/bin/env python
r"""The design study behind ``method="auto_sde"``: which stochastic (method, grid) to use at each NFE budget.

Design set only (never the evaluation suite ``targets.suite()``): the Gaussian targets gaussian_2d and
aniso_gaussian (d=16), where every stochastic sampler whose noise can be supplied has an EXACT output law
(``metrics.sampler_gaussian_law``) and the score is its exact W2 to p_{t_min}; and the mixtures ring8, bimodal_1d,
ncsn_two_mode, where the score is the unbiased MMD^2 against the exact p_{t_min} (closed-form p-terms,
``metrics.mmd2_exact``) on n samples, reported with its standard error. Schedules VP-linear, EDM, DDPM-discrete,
VE and rectified flow; three endings (final="step" against p_{t_min}; final="denoise" against p_0, as samplers
that end at sigma = 0; on VP-linear and DDPM-discrete "denoise_early", a grid that stops at t_e = 1/K for a budget
of K followed by the denoiser, as K-step "trailing" schedulers do, against p_0). Every registered stochastic
method (except torchsde and the Langevin-only ones) runs at each budget through its own budget rule
(``sample(..., nfe=K)``) on every grid kind.

Run:  python benchmarks/auto_design_sde.py [--nfe "5 10 20 50"] [--samples 2000] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

try:
    from diffusion_lab import metrics, samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from diffusion_lab import metrics, samplers, schedules, targets

from _design import print_row, robust_choice  # noqa: E402  (benchmarks/_design.py)
GAUSSIANS = [("gaussian_2d", {}), ("aniso_gaussian", {"d": 16, "cond": 100.0})]
MIXTURES = [("ring8", {}), ("bimodal_1d", {}), ("ncsn_two_mode", {})]
SCHEDULES = {"vp_linear": schedules.VPLinear, "edm": schedules.EDM, "ddpm_discrete": schedules.DDPMDiscrete,
             "ve": schedules.VE, "rectified_flow": schedules.RectifiedFlow}
GRIDS = ("logsnr", "karras", "uniform", "quadratic")
FINALS = ("step", "denoise", "denoise_early")
EARLY = ("vp_linear", "ddpm_discrete")  # schedules with t in [0, 1] that also get the early ending
EXCLUDE = {"torchsde", "annealed_langevin", "auto_sde", "pc"}


def _run(field, x, m, nfe, g, final, **kw):
    """One sampler call at budget nfe: on the full range, or (final "denoise_early") on a grid that stops at
    t_e = 1/nfe followed by the denoiser there."""
    if final != "denoise_early":
        return samplers.sample(field, x, m, nfe=nfe, grid_kind=g, final=final, **kw)
    steps, opts = samplers.plan_for_nfe(m, nfe, "denoise")
    grid = samplers.time_grid(field.schedule, steps, g, t_min=max(1.0 / nfe, field.schedule.t_min))
    return samplers.sample(field, x, m, grid=grid, final="denoise", **opts, **kw)


def _score(row, field, x_T, p_T, law, m, nfe, g, final):
    """Exact W2 (Gaussian targets, noise given as input) or MMD^2 +- SE (mixtures) of one configuration."""
    if row["metric"] == "w2":
        k = _run(field, x_T[:2], m, nfe, g, final, generator=torch.Generator().manual_seed(0)).info.get("noise_draws")
        if k is None:
            return
        run = lambda x, z: _run(field, x, m, nfe, g, final, noise=z).x  # noqa: E731
        mean, cov = metrics.sampler_gaussian_law(run, p_T.mu, p_T.cov, k)
        row["value"] = metrics.gaussian_w2(mean, cov, law.mu, law.cov)
    else:
        x = _run(field, x_T, m, nfe, g, final, generator=torch.Generator().manual_seed(1)).x
        r = metrics.mmd2_exact(x, law)
        row.update(value=r.mmd2, se=r.se)


def summarize(rows, nfes) -> dict:
    """Per budget: the five best (method, grid) by geometric mean of the value relative to the per-case best
    (W2; MMD^2 floored at its SE), and the robust choice: among the pairs whose worst per-schedule geometric mean
    is within 3x of the best worst case, the best geometric mean (the same selection as auto_design.py)."""
    summary = {}
    print(f"\n{'NFE':>4s}  best by geometric mean of value relative to the per-case best (W2; MMD^2 floored at 1 SE)")
    for nfe in nfes:
        by = {}
        for r in rows:
            if r["nfe"] == nfe:
                v = r["value"] if r["metric"] == "w2" else max(r["value"], r["se"])
                by.setdefault((r["method"], r["grid"]), {})[(r["target"], r["schedule"], r["final"])] = v
        summary[nfe] = robust_choice(by, lambda c: c[1])
        print_row(nfe, summary[nfe])
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", default="5 10 20 50")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--summarize", default=None, metavar="PATH", help="only print the summary of a saved --json run")
    a = p.parse_args(argv)
    if a.summarize:
        with open(a.summarize) as fh:
            saved = json.load(fh)
        summarize(saved["rows"], saved["settings"]["nfes"])
        return
    torch.set_num_threads(1)
    nfes = [int(v) for v in a.nfe.replace(",", " ").split()]
    methods = [m.name for m in samplers.available() if m.stochastic and m.name not in EXCLUDE]
    rows = []
    tic = time.perf_counter()
    for kind, cases in (("w2", GAUSSIANS), ("mmd2", MIXTURES)):
        for tname, kw in cases:
            target = targets.get_target(tname, **kw)
            for sname, cls in SCHEDULES.items():
                sch = cls()
                field = target.field(sch)
                p_T = target.marginal(sch, sch.t_max)
                x_T = p_T.sample(a.samples, torch.Generator().manual_seed(0))
                for final in FINALS:
                    if final == "denoise_early" and sname not in EARLY:
                        continue
                    law = target.marginal(sch, sch.t_min) if final == "step" else target
                    for nfe in nfes:
                        for m in methods:
                            for g in GRIDS:
                                row = {"target": tname, "schedule": sname, "final": final, "nfe": nfe, "method": m,
                                       "grid": g, "metric": kind}
                                try:
                                    _score(row, field, x_T, p_T, law, m, nfe, g, final)
                                except ValueError:
                                    continue
                                if "value" in row:
                                    rows.append(row)
                print(f"{tname}/{sname} done ({time.perf_counter() - tic:.0f}s)", flush=True)
    summary = summarize(rows, nfes)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": {"gaussians": GAUSSIANS, "mixtures": MIXTURES, "schedules": list(SCHEDULES),
                                    "finals": FINALS,
                                    "grids": GRIDS, "nfes": nfes, "samples": a.samples, "methods": methods},
                       "summary": {str(k): v for k, v in summary.items()}, "rows": rows}, fh, separators=(",", ":"))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
