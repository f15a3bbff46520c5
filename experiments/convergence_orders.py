"""Convergence orders of PF-ODE samplers against the exact flow map (Lu et al. 2022, DPM-Solver
Thm 3.2), and where the order breaks down as t_min -> 0.

Target: the bimodal 1-D mixture under VP, whose exact PF-ODE flow map is the quantile map F_{t_min}^{-1} o F_{t_max}
(a 1-D flow is monotone, so it maps quantiles to quantiles; no ODE solve). Error: mean |x_N - Phi(x_T)| over
samples, against NFE, for DDIM, Euler, Heun, DPM-Solver-1/2/3, DPM-Solver++ 2M/3M and UniPC on log-SNR grids;
slopes fitted over the largest four step counts.
Then the same fits for t_min in {1e-2 .. 1e-5} on log-SNR and uniform-t grids: the score's Lipschitz constant
grows like 1/sigma_t^2; DPM-Solver's theorem is in h = max delta-lambda, which a uniform-t grid lets grow without
bound in its last step, so there the third-order method's measured order falls (a log-SNR grid keeps it).

    python -m experiments.convergence_orders [--out results/experiments] [--quick]
"""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab.reference import quantile_flow_map
from diffusion_lab.samplers import get_method, sample, time_grid
from diffusion_lab.targets import bimodal_1d

from . import _common

#: the methods whose global order is fitted; the theoretical order is the registry's (dpmpp_3m with its default,
#: the reference implementation's coefficients, is order 2: see its docstring)
METHODS = ("ddim", "euler", "heun", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc")


def expected_order(method: str) -> float:
    """The global order the sampler registry states for ``method``."""
    return get_method(method).order


def errors(method: str, schedule, ns, n_samples: int, seed: int, grid_kind: str = "logsnr"):
    tg = bimodal_1d()
    x_T = tg.marginal(schedule, schedule.t_max).sample(n_samples, torch.Generator().manual_seed(seed))
    exact = quantile_flow_map(tg, schedule, x_T, schedule.t_max, schedule.t_min)
    field = tg.field(schedule)
    out = []
    for n in ns:
        r = sample(field, x_T, method, grid=time_grid(schedule, n, grid_kind))
        out.append((r.nfe, float((r.x - exact).abs().mean())))
    return out


def slope(ns, errs) -> float:
    return float(np.polyfit(np.log(1.0 / np.asarray(ns, dtype=float)), np.log(errs), 1)[0])


def run(quick: bool = False, seed: int = 0):
    ns = [16, 32, 64, 128] if quick else [8, 16, 32, 64, 128, 256]
    n_samples = 128 if quick else 512
    methods = ["ddim", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m"] if quick else list(METHODS)
    sch = S.VPLinear()
    rows = []
    for m in methods:
        errs = errors(m, sch, ns, n_samples, seed)
        p = slope(ns[-4:], [e for _, e in errs[-4:]])
        for n, (nfe, e) in zip(ns, errs):
            rows.append({"part": "orders", "grid": "logsnr", "t_min": sch.t_min, "method": m, "steps": n, "nfe": nfe, "error": e,
                         "expected_order": expected_order(m), "fitted_order": p})
    # break-down as t_min -> 0: fitted slope over N = 16..128 for several t_min, on log-SNR and uniform-t grids
    t_mins = [1e-2, 1e-3, 1e-4] if quick else [1e-2, 1e-3, 1e-4, 1e-5]
    ns_b = [16, 32, 64, 128]
    breakdown = []
    for kind in ("logsnr", "uniform"):
        for m in (["heun", "dpm_solver_3"] if quick else ["ddim", "heun", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m"]):
            for tm in t_mins:
                errs = errors(m, S.VPLinear(t_min=tm), ns_b, n_samples, seed, kind)
                p = slope(ns_b, [e for _, e in errs])
                breakdown.append({"part": "breakdown", "grid": kind, "t_min": tm, "method": m, "steps": ns_b[-1],
                                  "nfe": errs[-1][0], "error": errs[-1][1], "expected_order": expected_order(m),
                                  "fitted_order": p})
    rows += breakdown
    fitted = {m: next(r["fitted_order"] for r in rows if r["method"] == m and r["part"] == "orders") for m in methods}
    headline = {"fitted_order": fitted, "expected_order": {m: expected_order(m) for m in methods},
                "breakdown": {f"{r['method']}/{r['grid']}@t_min={r['t_min']:g}": r["fitted_order"] for r in breakdown}}
    settings = {"target": "bimodal_1d", "schedule": sch.settings(), "grid": "logsnr", "steps": ns,
                "n_samples": n_samples, "fit": "largest four step counts", "breakdown_steps": ns_b,
                "t_min_breakdown": t_mins, "reference": "quantile map F_{t_min}^-1 o F_{t_max}", "seed": seed}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    torch.set_num_threads(1)
    rows, meta = run(args.quick, args.seed)
    h = meta["headline"]
    print(_common.table([{"method": m, "expected": h["expected_order"][m], "fitted": h["fitted_order"][m]}
                         for m in h["fitted_order"]], ["method", "expected", "fitted"]))
    print(_common.table([r for r in rows if r["part"] == "breakdown"], ["method", "grid", "t_min", "fitted_order", "error"]))
    _common.write(args.out, "convergence_orders", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import convergence_orders

    with _common.figure_style(args):
        convergence_orders(rows, _common.figure(args, "convergence_orders"))
    return h


if __name__ == "__main__":
    main()
