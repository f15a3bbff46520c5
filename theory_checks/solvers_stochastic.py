r"""Area "solvers" (stochastic samplers built on exponential integrators and on Heun): weak orders against the exact law.

On Gaussian data N(mu, Sigma) the exact denoiser is affine in x, so each of these samplers is an affine map of
its start x_T and of the K standard normals it draws; ``metrics.sampler_gaussian_law`` reads that map off one
batched run (noise given as the ``noise`` option), which gives the output law N(m_N, C_N) exactly, with no Monte
Carlo. The error e(N) = W2(N(m_N, C_N), p_{t_min}) is then a pure weak (law) discretisation error, and its slope
against 1/N on a log-SNR grid is the method's weak order.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.metrics import gaussian_w2, sampler_gaussian_law
from diffusion_lab.samplers import get_method, sample, time_grid

from .catalogue import Outcome, check

STEPS = (40, 80, 160, 320)


def gaussian_marginal(target: T.Gaussian, schedule, t: float):
    """(mean, covariance) of p_t = N(alpha_t mu, alpha_t^2 Sigma + sigma_t^2 I)."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    d = target.mu.numel()
    return a * target.mu, a * a * target.cov + s * s * torch.eye(d, dtype=torch.float64)


def exact_law_w2(method: str, n: int, *, target: T.Gaussian | None = None, schedule=None, grid_kind: str = "logsnr",
                 **options) -> float:
    """W2 between the exact output law of ``method`` (N = n steps, start x_T ~ p_{t_max}) and p_{t_min}."""
    target = target or T.gaussian_2d()
    schedule = schedule or S.VPLinear()
    field = target.field(schedule)
    grid = time_grid(schedule, n, grid_kind)
    m0, C0 = gaussian_marginal(target, schedule, schedule.t_max)
    m1, C1 = gaussian_marginal(target, schedule, schedule.t_min)
    k = sample(field, m0[None].clone(), method, grid=grid, **options).info.get("noise_draws", 0)
    m, C = sampler_gaussian_law(lambda x, z: sample(field, x, method, grid=grid, noise=z, **options).x, m0, C0, k)
    return gaussian_w2(m, C, m1, C1)


def weak_order(method: str, ns=STEPS, *, per_step=None, **kwargs):
    """Least-squares slope of log e(N) against log(1/N) and the errors; ``per_step(N)`` gives extra options that
    depend on N (Restart's inner step count)."""
    errs = [exact_law_w2(method, n, **kwargs, **(per_step(n) if per_step else {})) for n in ns]
    return float(np.polyfit(np.log(1.0 / np.asarray(ns, float)), np.log(errs), 1)[0]), errs


def _restart_steps(n: int) -> dict:
    return {"restart_steps": n // 5 + 1}


# (method, options, expected weak order, step counts, N-dependent options). sa_solver's default tau (noise
# only in the middle of the time range) approaches its slope slowly (local slopes 2.43, 2.25, 2.10 from N = 20
# to 160), hence its later range; so does dpmpp_sde's (0.75, 0.85, 0.91 from N = 20 to 160).
ORDER_CASES = [
    ("euler_ancestral", {}, 1.0, STEPS, None),
    ("dpmpp_2m_sde", {}, 2.0, STEPS, None),
    ("dpmpp_2m_sde", {"solver_type": "heun"}, 2.0, STEPS, None),
    ("dpmpp_3m_sde", {}, 2.0, STEPS, None),
    ("sa_solver", {}, 2.0, (80, 160, 320, 640), None),
    ("dpmpp_sde", {}, 1.0, (80, 160, 320, 640), None),
    ("restart", {}, 2.0, (20, 40, 80, 160), _restart_steps),
]


def _order_fn(method, opts, p, ns, per_step):
    def fn():
        slope, errs = weak_order(method, ns, per_step=per_step, **opts)
        pairs = ", ".join(f"N={n}: {e:.3e}" for n, e in zip(ns, errs))
        return Outcome(abs(slope - p), f"slope {slope:.3f} (expected {p:g}); W2 errors {pairs}")

    extra = " (Restart's inner grids get N/5 + 1 points so they refine with the main grid)" if per_step else ""
    fn.__doc__ = (f"{method} {opts or ''} has weak order {p:g}: the exact W2 between its output law and p_{{t_min}} "
                  f"falls like N^-{p:g} on Gaussian data{extra}.")
    return fn


def _register(cases):
    for method, opts, p, ns, per_step in cases:
        get_method(method)  # an unregistered method is an error, not a silently dropped check
        suffix = "" if not opts else "[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]"
        check(f"solvers.weak_order[{method}{suffix}]", area="solvers", kind="order", tol=0.15,
              case=f"gaussian_2d, VP linear, log-SNR grid, N in {ns}, exact output law (affine in start and noise)",
              reference="Kloeden & Platen 1992 ch. 14; Lu et al. 2022b; Xue et al. 2023; Xu et al. 2023")(
            _order_fn(method, opts, p, ns, per_step))


_register(ORDER_CASES)
