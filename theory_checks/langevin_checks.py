"""Area F: Langevin samplers (ULA, MALA, the annealed / predictor-corrector step rules), run through the
implementations themselves."""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab import langevin as L
from diffusion_lab import schedules as S
from diffusion_lab.targets import Gaussian

from .catalogue import Outcome, check


def gaussian_field(mean: float = 0.3, var: float = 1.7, schedule=None):
    """A 1-D Gaussian target's exact field; at the schedule's t_min the marginal is N(alpha m, alpha^2 v + sigma^2)."""
    schedule = schedule or S.VE(sigma_min=1e-3)
    tg = Gaussian([mean], [[var]])
    return tg, schedule, tg.field(schedule)


def ula_affine_step(field, t, h: float, dim: int = 1, dtype=torch.float64):
    """(A, b, B) of one ULA step of the implementation, x' = A x + b + B z, read off by running it with zero and
    unit noise (the exact Gaussian score is affine, so the step is exactly affine)."""
    pts = torch.cat([torch.zeros(1, dim, dtype=dtype), torch.eye(dim, dtype=dtype)], 0)
    zero = torch.zeros(1, *pts.shape, dtype=dtype)
    out = L.ula(field, pts, t, h, 1, noise=zero).x
    b = out[0]
    A = (out[1:] - b).T
    z = torch.eye(dim, dtype=dtype)[:, None, :].expand(dim, 1, dim).reshape(dim, 1, dim)
    B = torch.stack([L.ula(field, torch.zeros(1, dim, dtype=dtype), t, h, 1, noise=z[j:j + 1]).x[0] - b
                     for j in range(dim)], 1)
    return A, b, B


def ula_stationary_variance_residual(var_t: float, h: float, field, t) -> float:
    """ULA x' = x + h s + sqrt(2h) z on N(m, v) has stationary variance v / (1 - h/(2v)) for h < 2v (the
    fixed point of the AR(1) variance recursion): the
    fixed point B^2/(1 - A^2) of the implementation's exact variance recursion v' = A^2 v + B^2, relative error."""
    A, _, B = ula_affine_step(field, t, h)
    v_star = float(B[0, 0] ** 2 / (1 - A[0, 0] ** 2))
    return abs(v_star / (var_t / (1 - h / (2 * var_t))) - 1)


def ula_transition_order(var_t: float, field, t, x0: float, T: float, ks=(8, 16, 32, 64)) -> tuple[float, list]:
    """k ULA steps of size h = T/k from x0 converge to the exact Langevin transition on N(m, v),
    N(m + (x0 - m) e^{-T/v}, v (1 - e^{-2T/v})) (the Ornstein-Uhlenbeck transition), at order 1 in h: slope of the
    moment error."""
    A, b, B = ula_affine_step(field, t, 1.0)  # only to get the mean m = b/(1 - A) of p_t
    m = float(b[0] / (1 - A[0, 0]))
    exact_mean = m + (x0 - m) * math.exp(-T / var_t)
    exact_var = var_t * (1 - math.exp(-2 * T / var_t))
    errs = []
    for k in ks:
        A, b, B = ula_affine_step(field, t, T / k)
        a, c, s2 = float(A[0, 0]), float(b[0]), float(B[0, 0] ** 2)
        mean, var = x0, 0.0
        for _ in range(k):
            mean, var = a * mean + c, a * a * var + s2
        errs.append(abs(mean - exact_mean) + abs(var - exact_var))
    slope = float(np.polyfit(np.log([T / k for k in ks]), np.log(errs), 1)[0])
    return slope, errs


def _var_t(tg, schedule, t) -> float:
    tt = torch.tensor(float(t), dtype=torch.float64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    return a * a * float(tg.cov[0, 0]) + s * s


@check("F.ula_stationary_variance", area="langevin", kind="exact", tol=1e-12,
       case="1-D Gaussian (v = 1.7 + sigma_min^2) under VE at t_min, h/v in {0.01, 0.3, 1, 1.9}",
       reference="Roberts & Tweedie 1996 (ULA); AR(1) variance recursion")
def _ula_var():
    """ULA's stationary variance on N(m, v) is v / (1 - h/(2v)), from the implementation's exact variance recursion."""
    tg, sch, f = gaussian_field()
    v = _var_t(tg, sch, sch.t_min)
    return max(ula_stationary_variance_residual(v, r * v, f, sch.t_min) for r in (0.01, 0.3, 1.0, 1.9))


@check("F.ula_stability_bound", area="langevin", kind="exact", tol=0.0,
       case="1-D Gaussian under VE at t_min; h = 2v (1 -+ 1e-9)",
       reference="Roberts & Tweedie 1996 (ULA); AR(1) stability |1 - h/v| < 1")
def _ula_stab():
    """ULA on N(m, v) is stable iff h < 2v: |A| = |1 - h/v| < 1 below the bound, and ula refuses h >= 2v."""
    tg, sch, f = gaussian_field()
    v = _var_t(tg, sch, sch.t_min)
    A_below = abs(float(ula_affine_step(f, sch.t_min, 2 * v * (1 - 1e-9))[0]))
    try:
        L.ula(f, torch.zeros(1, 1, dtype=torch.float64), sch.t_min, 2 * v * (1 + 1e-9), 1)
        refused = False
    except ValueError:
        refused = True
    ok = A_below < 1 and refused
    return Outcome(0.0 if ok else 1.0, f"|A| just below the bound = {A_below:.12f}; h above the bound refused: {refused}")


@check("F.langevin_gaussian_transition", area="langevin", kind="order", tol=0.15,
       case="1-D Gaussian under VE at t_min, x0 = 2.5, T = 1, k in {8..64} steps",
       reference="Ornstein-Uhlenbeck transition in closed form; Roberts & Tweedie 1996")
def _transition():
    """ULA's k-step moments converge to the exact Langevin transition N(m + (x0-m)e^{-T/v}, v(1 - e^{-2T/v})) at order 1."""
    tg, sch, f = gaussian_field()
    v = _var_t(tg, sch, sch.t_min)
    slope, errs = ula_transition_order(v, f, sch.t_min, 2.5, 1.0)
    return Outcome(abs(slope - 1), f"slope {slope:.3f} (expected 1); errors " + ", ".join(f"{e:.2e}" for e in errs))


def mala_invariance_zscores(h_ratio: float = 0.5, n_chains: int = 4000, n_steps: int = 30, seed: int = 0,
                            method: str = "mala"):
    """Chains started from exact samples of p_t (2-D correlated Gaussian, VP at t = 0.05) run ``n_steps`` of
    MALA (or ULA) with h = h_ratio * lambda_min(C_t); returns (max |z| of the means and variances along the
    eigenvectors of C_t against the truth, acceptance rate). MALA keeps p_t exactly (Roberts & Tweedie 1996);
    ULA does not (its stationary variance is v / (1 - h/(2v)))."""
    from diffusion_lab.targets import gaussian_2d

    tg, sch = gaussian_2d(), S.VPLinear()
    t = 0.05
    pt = tg.marginal(sch, t)
    f = tg.field(sch)
    g = torch.Generator().manual_seed(seed)
    x0 = pt.sample(n_chains, g)
    h = h_ratio * float(torch.linalg.eigvalsh(pt.cov).min())
    if method == "mala":
        res = L.mala(f, x0, t, h, n_steps, generator=g)
    else:
        res = L.ula(f, x0, t, h, n_steps, generator=g)
    # test in the eigenbasis of C_t, where the coordinates are independent and ULA's bias is largest
    lam, U = torch.linalg.eigh(pt.cov)
    y = (res.x - pt.mu) @ U
    z_mean = y.mean(0) / torch.sqrt(lam / n_chains)
    z_var = (y.var(0) - lam) / (lam * math.sqrt(2.0 / (n_chains - 1)))
    return float(torch.cat([z_mean, z_var]).abs().max()), res.acceptance_rate


@check("F.mala_invariance", area="langevin", kind="mc", tol=5.0,
       case="2-D Gaussian, VP t=0.05, 4000 chains from p_t, 30 steps, h = 0.5 lambda_min",
       reference="Roberts & Tweedie 1996 (MALA: Metropolis-Hastings detailed balance)")
def _mala():
    """MALA leaves p_t invariant: after 30 steps from exact samples, means and variances agree with p_t (max |z|)."""
    z, acc = mala_invariance_zscores()
    return Outcome(z, f"max |z| = {z:.2f}; acceptance rate {acc:.3f}")


@check("F.ula_bias_detected", area="langevin", kind="mc", tol=0.0,
       case="as F.mala_invariance, with ULA instead of MALA",
       reference="Roberts & Tweedie 1996 (ULA bias O(h))")
def _ula_detect():
    """At the same step the same test resolves ULA's bias (|z| >= 5), so MALA's pass is not for want of power:
    residual = max(0, 5 - max|z|)."""
    z, _ = mala_invariance_zscores(method="ula")
    return Outcome(max(0.0, 5.0 - z), f"ULA max |z| = {z:.1f} (variance v/(1 - h/2v) along lambda_min)")


def corrector_variance_zscore(snr: float = 0.16, d: int = 64, n_chains: int = 1000, n_steps: int = 40, seed: int = 0):
    """The Langevin corrector alone at fixed t (VE, d-dim isotropic Gaussian data, chains from exact p_t, SNR rule)
    keeps p_t up to ULA's bias: pooled variance vs v / (1 - hbar/(2v)) with hbar the mean step used (corrector step
    h = 2 (r ||z|| / ||s||)^2, Song et al. 2021, predictor-corrector sampling).
    Returns (z-score against the ULA prediction, z-score against the unbiased v)."""
    sch = S.VE()
    tg = Gaussian(torch.zeros(d), 0.5)
    t = 0.3
    pt = tg.marginal(sch, t)
    v = float(pt.cov[0, 0])
    g = torch.Generator().manual_seed(seed)
    x = pt.sample(n_chains, g)
    x, hs = L.langevin_corrector(tg.field(sch), x, t, snr, n_steps, generator=g)
    hbar = float(np.mean(hs[-10:]))
    pred = v / (1 - hbar / (2 * v))
    emp = float(x.var(0).mean())
    se = pred * math.sqrt(2.0 / (n_chains * d))
    return (emp - pred) / se, (emp - v) / (v * math.sqrt(2.0 / (n_chains * d)))


@check("F.corrector_keeps_p_t", area="langevin", kind="mc", tol=5.0,
       case="VE, 64-D Gaussian, t=0.3, 1000 chains from p_t, 40 corrector steps, r = 0.16",
       reference="Song et al. 2021 (predictor-corrector sampling, Langevin corrector)")
def _corrector():
    """The SNR-rule corrector at fixed t keeps p_t up to the ULA bias v/(1 - h/(2v)), h ~ 2 r^2 v."""
    z_pred, z_true = corrector_variance_zscore()
    return Outcome(abs(z_pred), f"z vs ULA-biased prediction {z_pred:.2f}; z vs unbiased p_t {z_true:.1f}")
