r"""Area fokker_planck: the grid Fokker-Planck solver against its defining properties and closed forms
(Chang-Cooper / Scharfetter-Gummel fluxes; forward Fokker-Planck and reverse-SDE equations checked against the
exact noised mixture marginals p_t = sum_k pi_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)).

Residual functions take their parameters explicitly; the catalogue entries at the bottom run them on fixed
cases (all of them together take a few seconds).
"""
from __future__ import annotations


import numpy as np
import torch

from diffusion_lab.fokker_planck import (Grid, LinearCoefficients, assemble, face_coefficients,
                                         solve, solve_continuity, solve_forward, solve_reverse)
from diffusion_lab.schedules import VPLinear
from diffusion_lab.targets import bimodal_1d, ring8

from .catalogue import Outcome, check


def mass_drift_residual(n2d: int = 40, n1d: int = 128, steps: int = 40) -> Outcome:
    """Zero-flux (and periodic) finite volumes conserve mass: 1^T L = 0, so every implicit stage keeps
    sum_j p_j |cell| to round-off over a whole run: max_t |M(t) - M(t_0)| over (a) the forward VP equation on
    ring8 in 2-D (TR-BDF2), (b) the reverse SDE from p_1 to p_0.01 with the exact score in 1-D (TR-BDF2),
    (c) the PF-ODE continuity equation (upwind) with periodic boundaries in 1-D (Crank-Nicolson)."""
    vp = VPLinear()
    r8, bi = ring8(), bimodal_1d()
    a = solve_forward(vp, r8, Grid.box(-5.0, 5.0, n2d, 2), [0.0, 0.3, 1.0], steps=steps)
    b = solve_reverse(bi.field(vp), bi, Grid.box(-8.0, 8.0, n1d), [1.0, 0.3, 0.01], steps=steps)
    c = solve_continuity(bi.field(vp), bi, Grid.box(-8.0, 8.0, n1d), [0.01, 0.5, 1.0], steps=steps, method="cn",
                         bc="periodic")
    drifts = [a.mass_drift, b.mass_drift, c.mass_drift]
    return Outcome(max(drifts), f"forward 2-D {drifts[0]:.1e}, reverse SDE {drifts[1]:.1e}, periodic continuity "
                                f"{drifts[2]:.1e}")


def positivity_residual(n: int = 48, dt: float = 0.5) -> Outcome:
    """Backward Euler with exponential fitting is positive for every step: (I - h L)^{-1} >= 0 because I - h L is an
    M-matrix (A, C >= 0 in every flux). Residual max(0, -min_t,j p_j) for a single-cell delta start of the 2-D OU
    equation dp/dt = div(x p) + lap p with large steps h (Crank-Nicolson's minimum is reported for contrast)."""
    g = Grid.box(-4.0, 4.0, n, 2)
    p0 = np.zeros(g.shape)
    p0[n // 3, n // 2] = 1.0 / g.volume
    co = LinearCoefficients(rate=lambda s: -1.0, diffusion=lambda s: 1.0, time_independent=True)
    be = solve(g, p0, [0.0, 2.0 * dt, 4.0 * dt], co, method="be", dt=dt)
    cn = solve(g, p0, [0.0, 2.0 * dt, 4.0 * dt], co, method="cn", dt=dt)
    return Outcome(max(0.0, -float(be.min.min())), f"min p: backward Euler {be.min.min():.2e}, Crank-Nicolson "
                                                   f"{cn.min.min():.2e}")


def equilibrium_residual(n: int = 96, L: float = 6.0, t: float = 0.4) -> Outcome:
    """The discrete Gaussian equilibrium of the OU/VP drift is exact (Chang & Cooper 1970):
    zero flux A p_j = C p_{j+1} gives p_{j+1}/p_j = Bern(-w)/Bern(w) = e^w = exp(-dx x_{j+1/2}) for b = -x, D = 1,
    the ratio of N(0, 1) at the centres; hence L(t) pi = 0 for pi_j = exp(-|x_j|^2/2) and the VP operator
    (b = f(t) x, D = g^2(t)/2 = -f(t)) at any t. Residual: max of the ratio error and ||L pi||_inf / max_j |L_jj| pi_j
    on a 2-D grid."""
    g = Grid.box(-L, L, n, 2)
    xf = g.interior_faces(0)
    A, C = face_coefficients(-xf, 1.0, g.dx[0])
    r_ratio = float(np.max(np.abs((A / C) / np.exp(-g.dx[0] * xf) - 1.0)))
    vp = VPLinear()
    f = float(vp.f(torch.tensor(t, dtype=torch.float64)))
    D = 0.5 * float(vp.g2(torch.tensor(t, dtype=torch.float64)))
    co = LinearCoefficients(rate=lambda s: f, diffusion=lambda s: D)
    Lm = assemble(g, co.face_drifts(g, t, False), D)
    pi = np.exp(-0.5 * (g.points() ** 2).sum(1))
    r_op = float(np.max(np.abs(Lm @ pi)) / np.max(np.abs(Lm.diagonal()) * pi))
    return Outcome(max(r_ratio, r_op), f"ratio error {r_ratio:.1e}, ||L pi|| relative {r_op:.1e}")


def space_order_slope(ns=(48, 96, 192, 384), t0: float = 0.05, t1: float = 0.5, L: float = 8.0) -> Outcome:
    """Second order in space: L1 error of the forward VP solution from the exact p_{t0} of the 1-D bimodal mixture
    against the exact p_{t1} (closed form) scales as dx^2. Time is integrated exactly (method="expm": for VP,
    L(t) = g^2(t)/2 L^{(-1)}, so p(t1) = exp((B(t1) - B(t0))/2 L^{(-1)}) p(t0)), so the error is purely spatial.
    Residual |slope - 2| of the least-squares fit of log L1 against log dx."""
    vp, tg = VPLinear(), bimodal_1d()
    errs, dxs = [], []
    for n in ns:
        g = Grid.box(-L, L, n)
        sol = solve_forward(vp, tg, g, [t0, t1], method="expm")
        errs.append(float(sol.l1[-1]))
        dxs.append(g.dx[0])
    slope = float(np.polyfit(np.log(dxs), np.log(errs), 1)[0])
    return Outcome(abs(slope - 2.0), f"slope {slope:.3f} (expected 2); L1 = " + ", ".join(f"{e:.2e}" for e in errs))


FORWARD_TIMES = (0.05, 0.2, 0.5, 1.0)


def forward_closed_form_error(n: int = 96, L: float = 6.0, times=FORWARD_TIMES) -> Outcome:
    """The forward (noising) FP solution from the data density p_0 = ring8 (8 Gaussians of std 0.3 on the circle
    of radius 2) reproduces the closed-form p_t = sum_k pi_k N(alpha mu_k, (alpha^2 0.09 + sigma^2) I)
    at every requested t. Residual: max_t L1(p_grid(t), p_t) on [-6, 6]^2 with n^2 cells, exact time integration
    (expm), exact initial cell averages."""
    tg = ring8()
    g = Grid.box(-L, L, n, 2)
    sol = solve_forward(VPLinear(), tg, g, (0.0,) + tuple(times), method="expm")
    l1 = sol.l1[1:]
    return Outcome(float(l1.max()), "L1 at t = " + ", ".join(f"{t:g}: {e:.2e}" for t, e in zip(times, l1))
                   + f"; mass drift {sol.mass_drift:.1e}, min {sol.min.min():.1e}")


def reverse_sde_error(n: int = 256, steps: int = 200, L: float = 8.0) -> Outcome:
    """The generation equation in tau = 1 - t, dq/dtau = -div((-f x + g^2 s) q) + g^2/2 lap q with the exact score
    (reverse SDE, Anderson 1982), started from the exact p_1 of the 1-D bimodal mixture, returns
    p_t at t = 0.5, 0.1, 0.01. Residual max_t L1 (TR-BDF2, 200 steps, 256 cells on [-8, 8])."""
    vp, tg = VPLinear(), bimodal_1d()
    sol = solve_reverse(tg.field(vp), tg, Grid.box(-L, L, n), [1.0, 0.5, 0.1, 0.01], steps=steps, target=tg)
    return Outcome(float(sol.l1.max()), "L1 at t = 0.5, 0.1, 0.01: " + ", ".join(f"{e:.2e}" for e in sol.l1[1:])
                   + f"; {sol.nfe} NFE")


_REF = "Chang & Cooper 1970; Scharfetter & Gummel 1969"

check("fokker_planck.mass_conservation", area="fokker_planck", kind="exact", tol=1e-12,
      case="2-D ring8 forward VP 40^2 TR-BDF2; 1-D bimodal reverse SDE and periodic PF-ODE continuity, 128 cells",
      reference=_REF)(mass_drift_residual)
check("fokker_planck.positivity_backward_euler", area="fokker_planck", kind="exact", tol=0.0,
      case="2-D OU from a one-cell delta, 48^2, steps h = 0.5 (h max|L_jj| ~ 300)",
      reference="Buet & Dellacherie 2010; Chang & Cooper 1970")(positivity_residual)
check("fokker_planck.discrete_equilibrium", area="fokker_planck", kind="exact", tol=1e-12,
      case="b = -x, D = 1 face ratios; 2-D VP operator at t = 0.4 on [-6, 6]^2, 96^2", reference=_REF)(
    equilibrium_residual)
check("fokker_planck.space_order", area="fokker_planck", kind="order", tol=0.15,
      case="1-D bimodal VP forward t = 0.05 -> 0.5, n = 48..384 on [-8, 8], exact in time (expm)",
      reference="Mohammadi & Borzi 2015 (second order of CC)")(space_order_slope)
# Tolerance: the measured L1 errors at n = 96 are 4.6e-3 (t = 0.05), 3.0e-3, 1.9e-4, 9.6e-4; at n = 192 they are
# 1.2e-3, 7.4e-4, 4.8e-5, 2.4e-4, i.e. 3.9-4.0x smaller (second order), so the n = 96 values are the
# discretisation error (at t = 1 mostly the O(dx^2) gap between the exact discrete equilibrium, a point-value
# Gaussian, and the exact cell averages); tol = 1.5 x the largest.
check("fokker_planck.forward_matches_closed_form", area="fokker_planck", kind="quadrature", tol=6.8e-3,
      case="ring8 (std 0.3) from t = 0 to t = 0.05, 0.2, 0.5, 1 under VP, [-6, 6]^2 with 96^2 cells, expm",
      reference="Fokker-Planck equation of the VP SDE (Song et al. 2021); mixture p_t in closed form")(
    forward_closed_form_error)
# Tolerance: measured 7.2e-4 at 256 cells, 2.7e-3 at 128 (ratio 3.8, second order); tol = 1.5 x 7.2e-4.
check("fokker_planck.reverse_sde_marginals", area="fokker_planck", kind="quadrature", tol=1.1e-3,
      case="1-D bimodal, exact score, p_1 -> p_0.01, 256 cells, TR-BDF2 200 steps",
      reference="Anderson 1982; Karras et al. 2022, eq. 6")(reverse_sde_error)
