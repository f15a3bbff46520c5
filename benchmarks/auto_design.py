#!/usr/bin/env python
r"""The design study behind ``method="auto"``: which deterministic (method, grid) to use at each NFE budget.

It runs ONLY on the design set -- the package's original named targets (ring8, bimodal_1d, gaussian_2d,
ncsn_two_mode, aniso_gaussian d=16) under six schedules (VP-linear, VP-cosine, EDM, DDPM-discrete, VE, rectified
flow) and both
endings (final="step": the state at t_min; final="denoise": the denoiser there, as samplers that end at sigma = 0)
-- and never on the evaluation suite (``targets.suite()``), which is kept for measuring the rule it produces.
Every registered deterministic method runs at each budget through its own budget rule (``sample(..., nfe=K)``)
on each grid kind; the score of a (method, grid) at a budget is the geometric mean over the 75 (target,
schedule, ending) cases of the terminal error mean ||x - Phi(x_T)|| against the exact flow map (scipy DOP853,
rtol 1e-10; with a denoised ending the reference is the denoiser of the exact flow map at the end time), relative to the
best (method, grid) of that case (so every case weighs the same). The table prints the three best per budget.

Selection (the rule ``samplers.auto`` states): at each budget, among the (method, grid) pairs that do not fail on
any schedule -- whose worst per-schedule geometric mean is within 3x of the best worst case -- the one with the
best overall geometric mean; the budget thresholds of the rule are the midpoints between measured budgets where
that choice changes. (Without the robustness filter, rk4 on the time-quadratic grid wins at NFE 50 on the VP
schedules and is 760-8500x off the best on VE.)

Run:  python benchmarks/auto_design.py [--nfe "3 4 5 6 8 10 12 15 20 25 30 50"] [--samples 500] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

try:
    from diffusion_lab import samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from diffusion_lab import samplers, schedules, targets
from diffusion_lab.reference import flow_map

from _design import print_row, robust_choice  # noqa: E402  (benchmarks/_design.py)

DESIGN_TARGETS = [("ring8", {}), ("bimodal_1d", {}), ("gaussian_2d", {}), ("ncsn_two_mode", {}),
                  ("aniso_gaussian", {"d": 16, "cond": 100.0})]
SCHEDULES = {"vp_linear": schedules.VPLinear, "vp_cosine": schedules.VPCosine, "edm": schedules.EDM,
             "ddpm_discrete": schedules.DDPMDiscrete, "ve": schedules.VE, "rectified_flow": schedules.RectifiedFlow}
FINALS = ("step", "denoise", "denoise_early")
#: the "denoise_early" ending: the grid stops at t_e and the denoiser is taken there, as samplers whose K
#: "leading" steps end at timestep 1000/K do. On VP-linear t_e = 1/K; on every other schedule t_e is the time of
#: the same half log-SNR, lambda(t_e) = lambda_VP-linear(1/K) (from -0.38 at K = 3 to 2.56 at K = 50), so the
#: cases differ by schedule and not by how far they integrate. (The first version of this study ran the early
#: ending only on the three VP schedules, at t_e = 1/K: --early-schedules vp.)
EARLY_VP = ("vp_linear", "vp_cosine", "ddpm_discrete")
GRIDS = ("logsnr", "karras", "uniform", "quadratic")
EXCLUDE = {"adaptive", "auto"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nfe", default="3 4 5 6 8 10 12 15 20 25 30 50")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--methods", default=None, help="restrict the methods (space separated)")
    p.add_argument("--finals", default=" ".join(FINALS), help=f"endings to run (default: all of {FINALS})")
    p.add_argument("--early-schedules", choices=("all", "vp"), default="all",
                   help="schedules of the denoise_early ending (vp: the first version, t_e = 1/K on VP only)")
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    finals = a.finals.replace(",", " ").split()
    if set(finals) - set(FINALS):
        raise SystemExit(f"error: --finals: unknown {sorted(set(finals) - set(FINALS))}; choose from {FINALS}")
    torch.set_num_threads(1)
    nfes = [int(v) for v in a.nfe.replace(",", " ").split()]
    methods = [m.name for m in samplers.available() if not m.stochastic and m.name not in EXCLUDE
               and not math.isnan(m.nfe_per_step)]
    if a.methods:
        methods = [m for m in methods if m in a.methods.split()]
    tic = time.perf_counter()
    errors = {}  # (case, nfe) -> {(method, grid): error}

    def run_case(case, field, x_T, refs, final, t_end):
        for nfe in nfes:
            cell = errors.setdefault((case, nfe), {})
            for m in methods:
                for g in GRIDS:
                    try:
                        if t_end is None:
                            x = samplers.sample(field, x_T, m, nfe=nfe, grid_kind=g, final=final).x
                        else:  # the same budget rule, on a grid that stops at t_e
                            steps, opts = samplers.plan_for_nfe(m, nfe, "denoise")
                            grid = samplers.time_grid(field.schedule, steps, g, t_min=t_end[nfe])
                            x = samplers.sample(field, x_T, m, grid=grid, final="denoise", **opts).x
                    except ValueError:  # budget below the method's minimum
                        continue
                    e = float((x - refs[nfe]).reshape(len(x), -1).norm(dim=1).mean())
                    if math.isfinite(e):
                        cell[(m, g)] = e
        print(f"{case} done ({time.perf_counter() - tic:.0f}s)", flush=True)

    for tname, kw in DESIGN_TARGETS:
        target = targets.get_target(tname, **kw)
        for sname, cls in SCHEDULES.items():
            sch = cls()
            field = target.field(sch)
            x_T = target.marginal(sch, sch.t_max).sample(a.samples, torch.Generator().manual_seed(0))
            ref, _ = flow_map(field, x_T, sch.t_max, sch.t_min)
            for final in finals:
                if final == "denoise_early":
                    if a.early_schedules == "vp":
                        if sname not in EARLY_VP:
                            continue
                        t_end = {n: max(1.0 / n, sch.t_min) for n in nfes}
                    else:
                        vp = schedules.VPLinear()
                        t_end = {n: max(float(sch.t_from_lam(vp.lam(torch.tensor(1.0 / n, dtype=torch.float64)))),
                                        sch.t_min) for n in nfes}
                    refs = {n: field.denoiser(flow_map(field, x_T, sch.t_max, t_end[n])[0], t_end[n]) for n in nfes}
                    run_case(f"{tname}/{sname}/{final}", field, x_T, refs, final, t_end)
                    continue
                r = ref if final == "step" else field.denoiser(ref, sch.t_min)
                run_case(f"{tname}/{sname}/{final}", field, x_T, {n: r for n in nfes}, final, None)
    cases = sorted({c for c, _ in errors})
    summary = {}
    print(f"\n{'NFE':>4s}  best (method/grid: geometric-mean error relative to the per-case best; worst schedule)")
    for nfe in nfes:
        summary[nfe] = robust_choice({k: {c: errors[c, nfe][k] for c in cases if k in errors[c, nfe]}
                                      for k in set().union(*(errors[c, nfe] for c in cases))},
                                     lambda c: c.split("/")[1])
        print_row(nfe, summary[nfe])
    if a.json:
        nested = {}
        for (c, n), d in errors.items():
            nested.setdefault(c, {})[str(n)] = {f"{m}/{g}": float(f"{e:.4g}") for (m, g), e in d.items()}
        with open(a.json, "w") as fh:
            json.dump({"settings": {"targets": DESIGN_TARGETS, "schedules": list(SCHEDULES), "grids": GRIDS,
                                    "finals": finals, "early_schedules": a.early_schedules,
                                    "nfes": nfes, "samples": a.samples, "methods": methods,
                                    "torch": torch.__version__},
                       "summary": {str(k): v for k, v in summary.items()},
                       "errors_layout": "case -> nfe -> method/grid -> terminal error (4 significant digits)",
                       "errors": nested}, fh, separators=(",", ":"))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
