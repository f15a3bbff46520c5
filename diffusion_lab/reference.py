r"""Exact references for sampler errors.

- ``flow_map``: the PF-ODE flow map Phi_{s->t}(x) of any field, solved by scipy's DOP853 in float64 to a
  tight tolerance (default rtol 1e-10). The whole batch is one ODE system; scipy's error norm is the RMS over
  all components, so the tolerance is divided by sqrt(batch) to bound each sample's error. By default it
  integrates d xbar/d sigmabar = eps_hat in xbar = x/alpha, sigmabar = sigma/alpha (Karras et al. 2022), where the
  ODE no longer depends on the schedule, so a schedule with kinks in t (DDPMDiscrete's piecewise-linear
  log alpha) costs no more than a smooth one.
- ``quantile_flow_map``: for a 1-D mixture the PF-ODE map is the monotone map F_t^{-1} o F_s (a 1-D flow
  keeps the order of points and carries p_s to p_t), computed from the closed-form CDF with no ODE solve at all.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ._tensor import as_tensor
from .field import VelocityField
from .schedules import Schedule
from .targets import GaussianMixture

__all__ = ["flow_map", "quantile_flow_map", "mixture_cdf_sf"]


def flow_map(field: VelocityField, x: torch.Tensor, t_from: float, t_to: float, *, rtol: float = 1e-10,
             atol: float = 1e-12, coords: str = "edm") -> tuple[torch.Tensor, int]:
    """Phi_{t_from -> t_to}(x) for the PF-ODE of ``field`` (float64), integrated in ``coords`` "edm"
    (xbar against sigmabar, see the module docstring) or "t" (dx/dt = v(x, t)); returns (x_t, nfe)."""
    if coords not in ("edm", "t"):
        raise ValueError(f"coords must be 'edm' or 't', got {coords!r}")
    sch = field.schedule
    x64 = x.detach().to(torch.float64)
    shape = x64.shape
    n = shape[0]
    nfe0 = field.nfe
    scale = 1.0 / math.sqrt(n)
    f64 = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731

    if coords == "t":
        def rhs(t, y):
            xt = torch.from_numpy(y).reshape(shape)
            return field.velocity(xt, f64(t)).reshape(-1).numpy()

        span, y0 = (float(t_from), float(t_to)), x64
    else:
        def time_of(sbar):
            t = sch.t_from_lam(-torch.log(f64(sbar)))
            return t.clamp(sch.t_min, sch.t_max)

        def rhs(sbar, y):
            t = time_of(sbar)
            xt = torch.from_numpy(y).reshape(shape) * sch.alpha(t)
            return field.eps(xt, t).reshape(-1).numpy()

        span = tuple(float(torch.exp(-sch.lam(f64(v)))) for v in (t_from, t_to))
        y0 = x64 / sch.alpha(f64(t_from))
    sol = solve_ivp(rhs, span, y0.reshape(-1).numpy().copy(), method="DOP853",
                    rtol=max(rtol * scale, 2.3e-14), atol=atol * scale)
    if not sol.success:
        raise RuntimeError(f"reference flow map failed: {sol.message}")
    out = torch.from_numpy(sol.y[:, -1].copy()).reshape(shape)
    if coords == "edm":
        out = out * sch.alpha(f64(t_to))
    return out.to(x.dtype), field.nfe - nfe0


def mixture_cdf_sf(target: GaussianMixture, schedule: Schedule, t: float, y: torch.Tensor):
    """(F_t(y), 1 - F_t(y)) of a 1-D mixture's noised marginal, both accurate in their tails (erfc)."""
    tt = as_tensor(float(t))
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    mu = a * target.means[:, 0]
    sd = torch.sqrt(a * a * target.covs[:, 0, 0] + s * s)
    z = (y[..., None] - mu) / (sd * math.sqrt(2.0))
    cdf = (target.weights * 0.5 * torch.erfc(-z)).sum(-1)
    sf = (target.weights * 0.5 * torch.erfc(z)).sum(-1)
    return cdf, sf


def quantile_flow_map(target: GaussianMixture, schedule: Schedule, x: torch.Tensor, s: float, t: float,
                      tol: float = 1e-14, max_iter: int = 200) -> torch.Tensor:
    """Phi_{s->t}(x) = F_t^{-1}(F_s(x)) for a 1-D mixture (F_t: closed-form CDF of p_t), x of shape (batch, 1), float64.

    Solved by safeguarded Newton on the CDF (or on the survival function in the upper tail, where 1 - F
    would lose digits), to |step| <= tol (1 + |y|)."""
    if target.dim != 1:
        raise ValueError(f"quantile_flow_map needs a 1-D target, got d={target.dim}")
    x = x.to(torch.float64)
    cdf_s, sf_s = mixture_cdf_sf(target, schedule, s, x[:, 0])
    upper = cdf_s > 0.5
    goal = torch.where(upper, sf_s, cdf_s)
    tt = as_tensor(float(t))
    a, sg = schedule.alpha(tt), schedule.sigma(tt)
    mu = a * target.means[:, 0]
    sd = torch.sqrt(a * a * target.covs[:, 0, 0] + sg * sg)
    lo = torch.full_like(goal, float((mu - 40 * sd).min()))
    hi = torch.full_like(goal, float((mu + 40 * sd).max()))
    # start from the Gaussian with the mixture's moments at t
    m = (target.weights * mu).sum()
    v = (target.weights * (sd * sd + mu * mu)).sum() - m * m
    y = m + torch.sqrt(v) * torch.erfinv(2 * cdf_s.clamp(1e-300, 1 - 1e-16) - 1) * math.sqrt(2.0)
    y = y.clamp(lo, hi)
    for _ in range(max_iter):
        cdf, sf = mixture_cdf_sf(target, schedule, t, y)
        val = torch.where(upper, goal - sf, cdf - goal)  # increasing in y in both branches
        lo = torch.where(val < 0, y, lo)
        hi = torch.where(val > 0, y, hi)
        pdf = (target.weights * torch.exp(-0.5 * ((y[..., None] - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))).sum(-1)
        step = val / pdf.clamp_min(1e-300)
        y_new = y - step
        bad = (y_new <= lo) | (y_new >= hi) | ~torch.isfinite(y_new)
        y_new = torch.where(bad, 0.5 * (lo + hi), y_new)
        done = (y_new - y).abs() <= tol * (1 + y.abs())
        y = y_new
        if bool(done.all()):
            break
    return y[:, None]
