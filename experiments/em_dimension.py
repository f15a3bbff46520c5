"""Discretisation error of Euler-Maruyama for the reverse SDE against dimension d and step count N on Gaussian data, through
the exact moment recursion, no Monte Carlo (Chen et al. 2023; Benton et al. 2024; Anderson 1982
for the reverse SDE). With a linear drift and a Gaussian start the EM iterates stay Gaussian.

Data N(mu, Sigma) in d dimensions, VP-linear schedule on [1e-3, 1], reverse SDE (gamma = 1) with the exact score,
started from the exact p_{t_max} (so the only error is the discretisation), N uniform steps in t. The EM iterates stay
Gaussian and their law N(m_N, C_N) follows the closed-form recursion (theory_checks.solvers_sde.em_gaussian_law_closed_form)

    m' = A m + b,   C' = A C A^T + g^2 h I,   A = (1 - f h) I - g^2 h C_t^{-1},   b = g^2 h C_t^{-1} alpha_t mu,

checked here against the package's own sampler (``sampler_gaussian_law``) once. Reported: KL(N(m_N, C_N) || p_{t_min})
and W2 in closed form, the least-squares slopes of log KL and log W2 against log N (weak order 1 predicts W2 ~ N^-1,
hence KL ~ N^-2 for a smooth Gaussian family), and the exponent of the growth with d at fixed N. Two data families:
isotropic N(0, I_d) (coordinates decouple, so KL is exactly linear in d: a sanity check) and aniso_gaussian(d)
(eigenvalues log-spaced in [0.02, 2], seeded rotation and mean; d = 1 is the single eigenvalue 0.02).
Published upper bounds (general data, early stopping): KL <~ d h, i.e. N ~ d / eps^2 steps for KL <= eps^2 (Benton et
al. 2024, linear in d; Chen et al. 2023 polynomial in d); the measured Gaussian rates are compared with them.

    python -m experiments.em_dimension [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab.metrics import gaussian_w2
from diffusion_lab.samplers import time_grid
from diffusion_lab.targets import Gaussian, aniso_gaussian
from theory_checks.solvers_sde import em_gaussian_law_closed_form, sampler_gaussian_law

from . import _common


def gaussian_kl(m1, c1, m2, c2) -> float:
    """KL(N(m1, C1) || N(m2, C2)) = 1/2 [tr(C2^-1 C1) - d + (m2 - m1)^T C2^-1 (m2 - m1) + ln det C2 - ln det C1]."""
    d = m1.numel()
    l2 = torch.linalg.cholesky(c2)
    l1 = torch.linalg.cholesky(c1)
    a = torch.cholesky_solve(c1, l2)
    dm = (m2 - m1)[:, None]
    quad = float(dm.T @ torch.cholesky_solve(dm, l2))
    logdet = 2.0 * float(torch.log(torch.diagonal(l2)).sum() - torch.log(torch.diagonal(l1)).sum())
    return 0.5 * (float(torch.trace(a)) - d + quad + logdet)


def marginal(target: Gaussian, sch, t: float):
    tt = torch.tensor(float(t), dtype=torch.float64)
    a, s = float(sch.alpha(tt)), float(sch.sigma(tt))
    return a * target.mu, a * a * target.cov + s * s * torch.eye(target.mu.numel(), dtype=torch.float64)


def slope(x, y) -> float:
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


FAMILIES = {
    "isotropic": lambda d: Gaussian(torch.zeros(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64),
                                    name=f"isotropic{d}"),
    "aniso": lambda d: aniso_gaussian(d),
}


def run(quick: bool = False, seed: int = 0):
    torch.set_num_threads(1)
    sch = S.VPLinear()
    dims = [1, 4, 16, 64] if quick else [1, 4, 16, 64, 256]
    steps = [10, 20, 50, 100, 200] if quick else [10, 20, 50, 100, 200, 500]
    asym = [n for n in steps if n >= 50]  # the asymptotic range used for the headline slopes
    rows = []
    for fam, make in FAMILIES.items():
        for d in dims:
            tg = make(d)
            m0, c0 = marginal(tg, sch, sch.t_max)
            mr, cr = marginal(tg, sch, sch.t_min)
            for n in steps:
                m, c = em_gaussian_law_closed_form(tg, sch, time_grid(sch, n, "uniform"), 1.0, m0, c0)
                rows.append({"family": fam, "d": d, "N": n, "kl": gaussian_kl(m, c, mr, cr),
                             "w2": gaussian_w2(m, c, mr, cr), "kl_per_dim": gaussian_kl(m, c, mr, cr) / d})
    # the recursion is the package's sampler (affine map read off the sampler, exact)
    tg = aniso_gaussian(4)
    grid = time_grid(sch, 20, "uniform")
    m0, c0 = marginal(tg, sch, sch.t_max)
    m1, c1 = sampler_gaussian_law(tg.field(sch), "em", grid, m0, c0, gamma=1.0)
    m2, c2 = em_gaussian_law_closed_form(tg, sch, grid, 1.0, m0, c0)
    rec_diff = max(float((m1 - m2).abs().max() / m2.abs().max()), float((c1 - c2).abs().max() / c2.abs().max()))

    def sel(fam, d=None, n=None):
        return [r for r in rows if r["family"] == fam and (d is None or r["d"] == d) and (n is None or r["N"] == n)]

    headline = {"recursion_vs_sampler_rel_diff": rec_diff, "asymptotic_N": asym}
    for fam in FAMILIES:
        w2_slopes = {d: slope(asym, [r["w2"] for r in sel(fam, d) if r["N"] in asym]) for d in dims}
        kl_slopes = {d: slope(asym, [r["kl"] for r in sel(fam, d) if r["N"] in asym]) for d in dims}
        d_fit = [d for d in dims if d >= 4]
        kl_d = {n: slope(d_fit, [r["kl"] for r in sel(fam, n=n) if r["d"] in d_fit]) for n in steps}
        w2_d = {n: slope(d_fit, [r["w2"] for r in sel(fam, n=n) if r["d"] in d_fit]) for n in steps}
        headline[fam] = {
            "w2_slope_in_N": {str(d): v for d, v in w2_slopes.items()},
            "kl_slope_in_N": {str(d): v for d, v in kl_slopes.items()},
            "kl_local_slope_last_two_N": {str(d): slope(steps[-2:], [r["kl"] for r in sel(fam, d)][-2:]) for d in dims},
            "w2_slope_in_N_all_steps": {str(d): slope(steps, [r["w2"] for r in sel(fam, d)]) for d in dims},
            "kl_exponent_in_d": {str(n): v for n, v in kl_d.items()},
            "w2_exponent_in_d": {str(n): v for n, v in w2_d.items()},
            "d_range_for_exponent": d_fit,
        }
    settings = {"schedule": sch.settings(), "gamma": 1.0, "grid": "uniform t", "dims": dims, "steps": steps,
                "families": {"isotropic": "N(0, I_d)", "aniso": "aniso_gaussian(d, cond=100, seed=0)"},
                "start": "exact p_{t_max}", "reference": "p_{t_min}", "method": "closed-form EM moment recursion"}
    return rows, {"settings": settings, "headline": headline}


def steps_of(rows):
    return sorted({r["N"] for r in rows})


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["family", "d", "N", "kl", "kl_per_dim", "w2"]))
    h = meta["headline"]
    for fam in FAMILIES:
        hf = h[fam]
        print(f"{fam}: W2 slope in N (N >= 50) " + ", ".join(f"d={d}: {v:.3f}" for d, v in hf["w2_slope_in_N"].items()))
        print(f"{fam}: KL slope in N (N >= 50) " + ", ".join(f"d={d}: {v:.3f}" for d, v in hf["kl_slope_in_N"].items()))
        print(f"{fam}: KL local slope N={steps_of(rows)[-2]}->{steps_of(rows)[-1]} "
              + ", ".join(f"d={d}: {v:.3f}" for d, v in hf["kl_local_slope_last_two_N"].items()))
        print(f"{fam}: KL exponent in d " + ", ".join(f"N={n}: {v:.3f}" for n, v in hf["kl_exponent_in_d"].items()))
    print(f"recursion vs sampler: rel. diff {h['recursion_vs_sampler_rel_diff']:.2e}")
    _common.write(args.out, "em_dimension", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import em_dimension

    with _common.figure_style(args):
        em_dimension(rows, _common.figure(args, "em_dimension"),
                     title="Euler-Maruyama (reverse SDE, VP) on Gaussian data: exact KL and W2 vs N and d")
    return meta["headline"]


if __name__ == "__main__":
    main()
