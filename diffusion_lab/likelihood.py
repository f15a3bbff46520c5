r"""Log-likelihood through the probability-flow ODE (instantaneous change of variables, Chen et al. 2018,
Thm 1; Song et al. 2021, Sec. 4.3).

Along the PF-ODE, d log p_t(x(t))/dt = -div v(x(t), t), so

    log p_{t0}(x) = log p_{t1}(x(t1)) + int_{t0}^{t1} div_x v(x(t), t) dt.

It is integrated in xbar = x/alpha against sigmabar = sigma/alpha = e^{-lambda}, where dxbar/dsigmabar = eps_hat
(Karras et al. 2022) no longer depends on the schedule's kinks; with p_t(x) = pbar(x/alpha)/alpha^d,

    log p_{t0}(x) = log p_{t1}(x1) + d log(alpha_1/alpha_0) + int_{sigmabar_0}^{sigmabar_1} alpha div_x eps_hat dsigmabar.

The divergence is exact (one backward pass per coordinate: small d) or Hutchinson's estimate
eps^T (d eps_hat/dx) eps with K probes held fixed along the path (FFJORD), Rademacher or Gaussian (Hutchinson 1989); the
K estimates give a standard error. Results in nats and bits per dimension.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ._tensor import check_batch
from .field import VelocityField
from .targets import ExactModel

__all__ = ["LikelihoodResult", "log_likelihood", "hutchinson_moments_exact", "gaussian_prior"]


@dataclass
class LikelihoodResult:
    """Per-sample log-likelihood ``log_prob`` (nats) at time t0, its standard error ``se`` (Hutchinson; zeros for the
    exact divergence; NaN for a single Hutchinson probe, where the spread between probes is undefined), bits per
    dimension, the encoded ``latent`` x(t1), the prior term and the NFE."""

    log_prob: torch.Tensor
    se: torch.Tensor
    bpd: torch.Tensor
    latent: torch.Tensor
    prior_log_prob: torch.Tensor
    nfe: int
    t0: float
    t1: float
    settings: dict
    seconds: float = 0.0


def gaussian_prior(field: VelocityField, data_var: float = 1.0) -> Callable:
    """log N(x; 0, (alpha_T^2 data_var + sigma_T^2) I): the prior of a field with no exact marginal."""
    sch = field.schedule
    tt = torch.tensor(sch.t_max, dtype=torch.float64)
    v = float(sch.alpha(tt)) ** 2 * data_var + float(sch.sigma(tt)) ** 2

    def log_p(x):
        d = x[0].numel()
        return -0.5 * (x.reshape(x.shape[0], -1) ** 2).sum(1) / v - 0.5 * d * math.log(2 * math.pi * v)

    return log_p


def _divergence(field, x, t, divergence, probes):
    """(eps_hat, div_x eps_hat per sample [or per probe]) at (x, t), one model evaluation plus backward passes."""
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        e = field.eps(xr, t)
        if divergence == "exact":
            div = torch.zeros(x.shape[0], dtype=x.dtype)
            flat = e.reshape(e.shape[0], -1)
            for j in range(flat.shape[1]):
                (gr,) = torch.autograd.grad(flat[:, j].sum(), xr, retain_graph=True)
                div = div + gr.reshape(gr.shape[0], -1)[:, j]
            return e.detach(), div[:, None]
        divs = []
        for k in range(probes.shape[0]):
            (vjp,) = torch.autograd.grad(e, xr, grad_outputs=probes[k], retain_graph=k < probes.shape[0] - 1)
            divs.append((vjp * probes[k]).reshape(x.shape[0], -1).sum(1))
        return e.detach(), torch.stack(divs, 1)


def log_likelihood(field: VelocityField, x: torch.Tensor, *, divergence: str = "exact", probe: str = "rademacher",
                   n_probes: int = 8, prior: Callable | None = None, t0: float | None = None, t1: float | None = None,
                   rtol: float = 1e-8, atol: float = 1e-10, generator: torch.Generator | None = None) -> LikelihoodResult:
    """log p_{t0}(x) by the augmented PF-ODE from t0 (default t_min) to t1 (default t_max), float64.

    ``prior``: log-density at t1; default the exact marginal for an exact target's field, otherwise
    ``gaussian_prior(field)``. ``divergence``: "exact" or "hutchinson" (``probe`` "rademacher" or "gaussian",
    ``n_probes`` >= 2 for a standard error: with ``n_probes`` = 1 the result's ``se`` is NaN, not 0, since one probe
    gives no estimate of the estimator's spread, se = std_k(q_k) / sqrt(K) with the unbiased std over K probes)."""
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}")
    if divergence == "hutchinson" and (int(n_probes) != n_probes or n_probes < 1):
        raise ValueError(f"n_probes must be an integer >= 1, got {n_probes!r}")
    if not (0 < rtol < 1 and atol > 0):
        raise ValueError(f"need 0 < rtol < 1 and atol > 0, got rtol={rtol}, atol={atol}")
    sch = field.schedule
    t0 = sch.t_min if t0 is None else float(t0)
    t1 = sch.t_max if t1 is None else float(t1)
    if not (sch.t_min <= t0 < t1 <= sch.t_max):
        raise ValueError(f"need t_min <= t0 < t1 <= t_max = [{sch.t_min}, {sch.t_max}], got t0={t0}, t1={t1}")
    if prior is None:
        model = field.model
        if isinstance(model, ExactModel):
            p1 = model.target.marginal(sch, t1)
            prior = p1.log_prob
        else:
            prior = gaussian_prior(field)
    check_batch(x, "x")
    if not torch.isfinite(x).all():
        raise ValueError(f"x has {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf)")
    x = x.detach().to(torch.float64)
    shape, n = x.shape, x.shape[0]
    d = x[0].numel()
    K = 1 if divergence == "exact" else int(n_probes)
    probes = None
    if divergence == "hutchinson":
        if probe == "rademacher":
            probes = torch.randint(0, 2, (K, *shape), generator=generator).to(torch.float64) * 2 - 1
        else:
            probes = torch.randn((K, *shape), generator=generator, dtype=torch.float64)
    f64 = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
    nfe0 = field.nfe

    def time_of(sbar):
        return sch.t_from_lam(-torch.log(f64(sbar))).clamp(sch.t_min, sch.t_max)

    def rhs(sbar, state):
        t = time_of(sbar)
        a = sch.alpha(t)
        y = torch.from_numpy(state[: n * d]).reshape(shape)
        e, div = _divergence(field, y * a, t, divergence, probes)
        return np.concatenate([e.reshape(-1).numpy(), (a * div).reshape(-1).numpy()])

    s0, s1 = (float(torch.exp(-sch.lam(f64(v)))) for v in (t0, t1))
    a0, a1 = float(sch.alpha(f64(t0))), float(sch.alpha(f64(t1)))
    state0 = np.concatenate([(x / a0).reshape(-1).numpy(), np.zeros(n * K)])
    start = time.perf_counter()
    sol = solve_ivp(rhs, (s0, s1), state0, method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"likelihood ODE failed: {sol.message}")
    end = sol.y[:, -1]
    latent = torch.from_numpy(end[: n * d].copy()).reshape(shape) * a1
    integral = torch.from_numpy(end[n * d:].copy()).reshape(n, K)
    prior_lp = prior(latent).to(torch.float64)
    per_probe = prior_lp[:, None] + d * math.log(a1 / a0) + integral
    log_prob = per_probe.mean(1)
    if K > 1:
        se = per_probe.std(1) / math.sqrt(K)
    elif divergence == "exact":
        se = torch.zeros(n, dtype=torch.float64)
    else:  # one Hutchinson probe: the spread is unknown, not zero
        se = torch.full((n,), math.nan, dtype=torch.float64)
    settings = {"divergence": divergence, "probe": probe if divergence == "hutchinson" else None, "n_probes": K,
                "rtol": rtol, "atol": atol, "t0": t0, "t1": t1, "schedule": sch.settings()}
    return LikelihoodResult(log_prob=log_prob, se=se, bpd=-log_prob / (d * math.log(2)), latent=latent,
                            prior_log_prob=prior_lp, nfe=field.nfe - nfe0, t0=t0, t1=t1, settings=settings,
                            seconds=time.perf_counter() - start)


def hutchinson_moments_exact(A: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of z^T A z over all 2^d Rademacher vectors z (exact enumeration, small d); theory:
    mean = tr A, variance = 2 (||A_s||_F^2 - sum_i A_ii^2) with A_s = (A + A^T)/2 (Hutchinson 1989)."""
    d = A.shape[0]
    if d > 16:
        raise ValueError(f"exact enumeration needs d <= 16, got d={d}")
    idx = torch.arange(2**d)
    z = ((idx[:, None] >> torch.arange(d)) & 1).to(A.dtype) * 2 - 1
    q = ((z @ A) * z).sum(1)
    return float(q.mean()), float(q.var(unbiased=False))
