"""Classifier-free guidance does not sample the gamma-powered law, and its ODE and SDE samplers disagree
(Ho & Salimans 2022; Bradley & Nakkiran 2024; Chidambaram et al. 2024).

Two 1-D Gaussian classes N(-/+1, 1) with equal weights, class c = 1, VP schedule, exact scores. For guidance weight
w (gamma = 1 + w) the CFG field is eps~ = (1 + w) eps(x|c) - w eps(x). Compared at t_min, on one grid:
  (a) the gamma-powered law p_0(x|c)^gamma p_0(x)^(1-gamma) / Z (quadrature),
  (b) CFG with the PF-ODE sampler (Heun), (c) CFG with the reverse-SDE sampler (Euler-Maruyama), both from the
      same exact samples of p_{t_max},
  (d) the Fokker-Planck evolution of the guided field on the grid, reverse SDE (gamma_sde = 1) and PF-ODE (0).
TV distances against (a) and between the two samplers, next to the Monte-Carlo floor (the TV of a histogram of
as many exact samples of (a)). w = 0 must give p(x|c) exactly (TV at the floor).

    python -m experiments.cfg_counterexample [--out results/experiments] [--quick]
"""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import fokker_planck as fp
from diffusion_lab import schedules as S
from diffusion_lab.guidance import cfg_from_fields
from diffusion_lab.samplers import sample, time_grid
from diffusion_lab.targets import two_class_1d

from . import _common


def powered_density(target, c: int, gamma: float, grid: "fp.Grid") -> np.ndarray:
    """Cell averages of p_0(x|c)^gamma p_0(x)^(1-gamma) / Z, by 8-point Gauss-Legendre in each cell."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    lo, hi, n = grid.lo[0], grid.hi[0], grid.n[0]
    dx = (hi - lo) / n
    centres = lo + dx * (np.arange(n) + 0.5)
    pts = (centres[:, None] + 0.5 * dx * nodes[None, :]).reshape(-1, 1)
    xt = torch.as_tensor(pts, dtype=torch.float64)
    cond = target.conditional(c).log_prob(xt).numpy()
    marg = target.log_prob(xt).numpy()
    logq = gamma * cond + (1 - gamma) * marg
    q = np.exp(logq - logq.max()).reshape(n, -1) @ (0.5 * weights)
    return q / (q.sum() * dx)


def run(quick: bool = False, seed: int = 0):
    tg, sch, c = two_class_1d(2.0, 1.0), S.VPLinear(), 1
    grid = fp.Grid.box(-8.0, 8.0, 400 if quick else 800, 1)
    n = 40_000 if quick else 100_000
    steps = 100 if quick else 200
    ws = [0.0, 1.0, 3.0] if quick else [0.0, 0.5, 1.0, 3.0, 6.0]
    cond, uncond = tg.conditional(c).field(sch), tg.field(sch)
    g = torch.Generator().manual_seed(seed)
    x_T = tg.marginal(sch, sch.t_max).sample(n, g)
    rows = []
    curves = {}
    for w in ws:
        field = cfg_from_fields(cond, uncond, w)
        powered = powered_density(tg, c, 1.0 + w, grid)
        floor_samples = _sample_density(powered, grid, n, g)
        floor = fp.tv(fp.density_from_samples(floor_samples, grid), powered, grid)
        ode = sample(field, x_T, "heun", grid=time_grid(sch, steps, "logsnr")).x
        sde = sample(field, x_T, "em", grid=time_grid(sch, 4 * steps, "logsnr"), generator=g).x
        d_ode, d_sde = fp.density_from_samples(ode.numpy(), grid), fp.density_from_samples(sde.numpy(), grid)
        times = [sch.t_max, sch.t_min]
        fp_sde = fp.solve_reverse(field, tg, grid, times, gamma=1.0, steps=steps).density(sch.t_min)
        fp_ode = fp.solve_reverse(field, tg, grid, times, gamma=0.0, steps=steps).density(sch.t_min)
        row = {"w": w, "gamma": 1 + w,
               "tv_ode_vs_powered": fp.tv(d_ode, powered, grid), "tv_sde_vs_powered": fp.tv(d_sde, powered, grid),
               "tv_ode_vs_sde": fp.tv(d_ode, d_sde, grid),
               "tv_fp_sde_vs_powered": fp.tv(fp_sde, powered, grid), "tv_fp_ode_vs_powered": fp.tv(fp_ode, powered, grid),
               "tv_fp_sde_vs_fp_ode": fp.tv(fp_sde, fp_ode, grid), "mc_floor": floor,
               "mean_powered": _mean(powered, grid), "mean_ode": float(ode.mean()), "mean_sde": float(sde.mean())}
        rows.append(row)
        curves[w] = {"powered": powered, "CFG + PF-ODE (samples)": d_ode, "CFG + reverse SDE (samples)": d_sde,
                     "FP, reverse SDE": fp_sde, "FP, PF-ODE (upwind)": fp_ode}
    headline = {f"w={r['w']:g}": {k: r[k] for k in ("tv_ode_vs_powered", "tv_sde_vs_powered", "tv_ode_vs_sde",
                                                    "mc_floor")} for r in rows}
    settings = {"target": "two_class_1d(2, 1)", "class": c, "schedule": sch.settings(), "n": n, "ode": f"heun {steps}",
                "sde": f"em {4 * steps}", "grid": grid.settings(), "w": ws, "seed": seed}
    return rows, {"settings": settings, "headline": headline}, curves, grid


def _sample_density(p: np.ndarray, grid, n: int, g: torch.Generator) -> np.ndarray:
    lo, hi, m = grid.lo[0], grid.hi[0], grid.n[0]
    dx = (hi - lo) / m
    idx = torch.multinomial(torch.as_tensor(p * dx), n, replacement=True, generator=g).numpy()
    u = torch.rand(n, dtype=torch.float64, generator=g).numpy()
    return (lo + dx * (idx + u))[:, None]


def _mean(p, grid) -> float:
    lo, hi, m = grid.lo[0], grid.hi[0], grid.n[0]
    dx = (hi - lo) / m
    x = lo + dx * (np.arange(m) + 0.5)
    return float((x * p).sum() * dx)


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    torch.set_num_threads(1)
    rows, meta, curves, grid = run(args.quick, args.seed)
    print(_common.table(rows, ["w", "tv_ode_vs_powered", "tv_sde_vs_powered", "tv_ode_vs_sde", "tv_fp_sde_vs_powered",
                               "tv_fp_ode_vs_powered", "mc_floor"]))
    _common.write(args.out, "cfg_counterexample", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import density_curves

    lo, hi, m = grid.lo[0], grid.hi[0], grid.n[0]
    x = lo + (hi - lo) / m * (np.arange(m) + 0.5)
    with _common.figure_style(args):
        density_curves(x, curves, _common.figure(args, "cfg_counterexample"), xlim=(-4, 6),
                       title="CFG on two 1-D Gaussian classes: neither sampler gives the powered law")
    return meta["headline"]


if __name__ == "__main__":
    main()
