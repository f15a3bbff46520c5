r"""Stochastic samplers built on the exponential integrators and on EDM's Heun: Euler ancestral, SDE-DPM-Solver++
(2M, 3M), SA-Solver and Restart sampling.

Two coordinate systems are used, both valid for every schedule (alpha_t, sigma_t):

* lambda = log(alpha/sigma) (half log-SNR). The reverse SDE of the forward process, with its noise scaled by
  eta >= 0 relative to the PF-ODE (Lu et al. 2022b, sec. 4 and App. B; Xue et al. 2023, eq. 7), has for data
  prediction D = x0_hat the exactly integrable linear part

      x_t = (sigma_t/sigma_s) e^{-eta h} x_s + (1 + eta) alpha_t int_0^h e^{-(1+eta)(h-u)} D(lambda_s + u) du
            + sigma_t sqrt(1 - e^{-2 eta h}) z,        h = lambda_t - lambda_s > 0,

  and the methods differ in the polynomial (in lambda) that replaces D in the integral. eta = 0 is the PF-ODE
  (DPM-Solver++), eta = 1 the reverse SDE of Anderson (1982). SA-Solver writes eta = tau^2.
* xbar = x/alpha against sigmabar = sigma/alpha = e^{-lambda}, where the PF-ODE is d xbar/d sigmabar = eps_hat
  (Karras et al. 2022 eq. 4 with s = alpha) and the forward process is a pure variance-exploding one,
  xbar_t = x_0 + sigmabar_t z. k-diffusion's samplers work in these coordinates (its model is the denoiser of
  xbar at noise level sigmabar); Euler ancestral and Restart are written in them here.

Noise convention (shared with ``sde.py``): the option ``noise`` is a tensor of shape (K, *x.shape) of standard
normals consumed in order, K (the number of normal draws of the method for this grid and these options) is
stated in each docstring and reported as ``info["noise_draws"]``; a ``noise`` of another shape raises ValueError
naming K. Without ``noise`` each draw is ``torch.randn(x.shape, generator=generator)``. Coefficients are float64
python floats applied to x in x's dtype; the model is called only through the field.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import torch

from .base import register, step_iter
from .exponential import _tables
from .sde import _noise_source

__all__ = ["ancestral_step", "exp_poly_integrals", "sa_solver_weights", "restart_plan", "DEFAULT_RESTART"]


def _check_unit(name: str, **vals):
    for k, v in vals.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name}: {k} must be a finite number >= 0, got {k}={v!r}")


def _info(noise, k: int, **extra) -> dict:
    return {**extra, "noise": "given" if noise is not None else "drawn", "noise_draws": k}


# ------------------------------------------------------------------------------------------------
# Euler ancestral (k-diffusion sample_euler_ancestral)


def ancestral_step(s_from: float, s_to: float, eta: float = 1.0) -> tuple[float, float]:
    r"""(sigma_down, sigma_up) of an ancestral step from noise level s_from to s_to < s_from in the
    variance-exploding coordinates (k-diffusion ``get_ancestral_step``):

        sigma_up = min(s_to, eta sqrt(s_to^2 (s_from^2 - s_to^2)/s_from^2)),  sigma_down = sqrt(s_to^2 - sigma_up^2).

    With eta = 1, sigma_up^2 is the variance of the exact posterior xbar_{s_to} | xbar_{s_from}, x_0 of
    xbar_s = x_0 + s z, and an Euler step to sigma_down followed by sigma_up z is DDPM's ancestral step with
    x0_hat in place of x_0 (Ho et al. 2020 Alg. 2); eta = 0 gives (s_to, 0), the deterministic Euler step."""
    if not eta:
        return s_to, 0.0
    up = min(s_to, eta * math.sqrt(s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from)))
    return math.sqrt(max(s_to * s_to - up * up, 0.0)), up


@register("euler_ancestral", family="stochastic", order=1, stochastic=True, nfe_per_step=1,
          description="Euler ancestral in (x/alpha, sigma/alpha) (k-diffusion sample_euler_ancestral), eta in [0, 1]",
          budget_rule='N = K steps')
def euler_ancestral(field, x, grid, *, eta=1.0, s_noise=1.0, noise=None, generator=None, callback=None,
                    progress=False):
    r"""Ancestral sampling with Euler steps (k-diffusion ``sample_euler_ancestral``) in xbar = x/alpha,
    sigmabar = sigma/alpha: with (sigma_down, sigma_up) = ``ancestral_step(sigmabar_i, sigmabar_{i+1}, eta)``,

        xbar' = xbar_i + (sigma_down - sigmabar_i) eps_hat(x_i, t_i),     xbar_{i+1} = xbar' + s_noise sigma_up z_i,

    i.e. x_{i+1} = (alpha_{i+1}/alpha_i) x_i + alpha_{i+1} (sigma_down - sigmabar_i) eps_hat + alpha_{i+1}
    s_noise sigma_up z_i. eta = 0 is Euler in (xbar, sigmabar), which is DDIM; eta = 1 samples the exact
    posterior of the variance-exploding process with x0_hat for x_0, which is DDIM with eta = 1 (= DDPM
    ancestral sampling). eta in [0, 1]; s_noise >= 0 scales the added noise (1: the method; k-diffusion's
    option). Weak order 1. NFE = N; normal draws K = N for eta > 0 (z_i in step i), K = 0 for eta = 0.
    """
    _check_unit("euler_ancestral", eta=eta, s_noise=s_noise)
    if eta > 1:
        raise ValueError(f"euler_ancestral: eta must be in [0, 1], got eta={eta!r}")
    alpha, sigma, _ = _tables(field, grid)
    sbar = [s / a for s, a in zip(sigma, alpha)]
    n = len(grid) - 1
    steps = [ancestral_step(sbar[i], sbar[i + 1], eta) for i in range(n)]
    k = sum(1 for _, up in steps if up > 0.0)
    z = _noise_source("euler_ancestral", noise, k, x, generator) if k else None
    j = 0
    for i in step_iter(n, progress, "euler_ancestral"):
        eps = field.eps(x, grid[i])
        down, up = steps[i]
        a1 = alpha[i + 1]
        x_new = x.mul(a1 / alpha[i])
        x_new.add_(eps, alpha=a1 * (down - sbar[i]))
        if up > 0.0:
            x_new.add_(z(j), alpha=a1 * s_noise * up)
            j += 1
        x = x_new
        if callback is not None:
            callback(i + 1, x)
    return x, _info(noise, k, eta=eta, s_noise=s_noise)


# ------------------------------------------------------------------------------------------------
# SDE-DPM-Solver++ (2M, 3M): k-diffusion sample_dpmpp_2m_sde / sample_dpmpp_3m_sde,
# diffusers DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")


def _dpmpp_sde_multistep(field, x, grid, order, eta, s_noise, solver_type, d2_scale, noise, generator, callback,
                         progress, name):
    _check_unit(name, eta=eta, s_noise=s_noise)
    alpha, sigma, lam = _tables(field, grid)
    n = len(grid) - 1
    k = n if eta > 0 else 0
    z = _noise_source(name, noise, k, x, generator) if k else None
    hist, hs = [], []  # D_i, D_{i-1}, ... and h_{i-1}, h_{i-2} (newest first)
    for i in step_iter(n, progress, name):
        D = field.x0_eps(x, grid[i])[0]
        h = lam[i + 1] - lam[i]
        a = (1.0 + eta) * h  # h_eta of k-diffusion's 3M, h + eta h of its 2M
        a_t = alpha[i + 1]
        one_m = -math.expm1(-a)  # 1 - e^{-(1+eta) h}
        x_new = x.mul((sigma[i + 1] / sigma[i]) * math.exp(-eta * h))
        x_new.add_(D, alpha=a_t * one_m)
        phi_2 = one_m / (-a) + 1.0  # 1 - (1 - e^{-a})/a
        if order == 2 and hist:
            r = hs[0] / h
            coef = 0.5 * one_m if solver_type == "midpoint" else phi_2
            x_new.add_(D - hist[0], alpha=a_t * coef / r)
        elif order == 3 and len(hist) >= 2:
            r0, r1 = hs[0] / h, hs[1] / h
            d1_0 = (D - hist[0]) / r0
            d1_1 = (hist[0] - hist[1]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) * (d2_scale / (r0 + r1))
            phi_3 = phi_2 / a - 0.5
            x_new.add_(d1, alpha=a_t * phi_2)
            x_new.add_(d2, alpha=-a_t * phi_3)
        elif order == 3 and hist:
            x_new.add_(D - hist[0], alpha=a_t * phi_2 * h / hs[0])
        if k:
            x_new.add_(z(i), alpha=sigma[i + 1] * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise)
        x = x_new
        hist.insert(0, D)
        hs.insert(0, h)
        del hist[order - 1:], hs[order - 1:]
        if callback is not None:
            callback(i + 1, x)
    return x, k


@register("dpmpp_2m_sde", family="stochastic", order=2, stochastic=True, nfe_per_step=1,
          description="SDE-DPM-Solver++(2M) (Lu et al. 2022b; k-diffusion sample_dpmpp_2m_sde), midpoint | heun",
          budget_rule='N = K steps; first step first order (warm-up)')
def dpmpp_2m_sde(field, x, grid, *, eta=1.0, s_noise=1.0, solver_type="midpoint", noise=None, generator=None,
                 callback=None, progress=False):
    r"""SDE-DPM-Solver++(2M) (Lu et al. 2022b, App. B; k-diffusion ``sample_dpmpp_2m_sde``, diffusers
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)``) for any (alpha, sigma):
    with D_i = x0_hat(x_i, t_i), h_i = lambda_{i+1} - lambda_i, a = (1 + eta) h_i, r = h_{i-1}/h_i,

        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h_i} x_i + alpha_{i+1} (1 - e^{-a}) D_i
                  + alpha_{i+1} c (D_i - D_{i-1})/r + sigma_{i+1} sqrt(1 - e^{-2 eta h_i}) s_noise z_i,

    c = (1 - e^{-a})/2 for solver_type="midpoint" (k-diffusion's default) and c = 1 - (1 - e^{-a})/a (the exact
    weight of the linear interpolant, diffusers' "heun") for solver_type="heun"; the first step has no D-difference
    term. In xbar = x/alpha (divide by alpha_{i+1}; sigma_{i+1}/sigma_i = (alpha_{i+1}/alpha_i) e^{-h_i})
    this is k-diffusion's update term for term. eta = 0 is the PF-ODE's DPM-Solver++(2M) (without its
    lower-order final step); eta = 1 the reverse SDE. NFE = N; normal draws K = N for eta > 0, else 0.
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    x, k = _dpmpp_sde_multistep(field, x, grid, 2, eta, s_noise, solver_type, 1.0, noise, generator, callback,
                                progress, "dpmpp_2m_sde")
    return x, _info(noise, k, eta=eta, s_noise=s_noise, solver_type=solver_type)


@register("dpmpp_3m_sde", family="stochastic", order=2, stochastic=True, nfe_per_step=1,
          description="SDE-DPM-Solver++(3M) (k-diffusion sample_dpmpp_3m_sde)",
          budget_rule='N = K steps; orders 1, 2, then 3 (warm-up)')
def dpmpp_3m_sde(field, x, grid, *, eta=1.0, s_noise=1.0, coefficients="reference", noise=None, generator=None,
                 callback=None, progress=False):
    r"""SDE-DPM-Solver++(3M) (k-diffusion ``sample_dpmpp_3m_sde``) for any (alpha, sigma): with D_i, h_i, a as in
    ``dpmpp_2m_sde``, r0 = h_{i-1}/h_i, r1 = h_{i-2}/h_i, D1_0 = (D_i - D_{i-1})/r0, D1_1 = (D_{i-1} - D_{i-2})/r1,
    phi_2 = 1 - (1 - e^{-a})/a, phi_3 = phi_2/a - 1/2::

        d1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)   (= h D' + O(h^3)),     d2 = s (D1_0 - D1_1)/(r0 + r1),
        x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h_i} x_i + alpha_{i+1} [(1 - e^{-a}) D_i + phi_2 d1 - phi_3 d2]
                  + sigma_{i+1} sqrt(1 - e^{-2 eta h_i}) s_noise z_i;

    the second step uses phi_2 (D_i - D_{i-1})/r0 only and the first none. ``coefficients="reference"``
    (default, s = 1: k-diffusion's code, d2 = h^2 D''/2 + O(h^3)) or "taylor" (s = 2, d2 = h^2 D'' + O(h^3)):
    the exact weight of the quadratic term is (1 + eta) int_0^h e^{-(1+eta)(h-u)} u^2/2 du = -h^2 phi_3, so only
    "taylor" integrates the quadratic interpolant of D exactly. For eta = 0 this is the PF-ODE's DPM-Solver++(3M)
    except for the warm-up second step, which uses the exact linear weight phi_2 (``dpmpp_3m`` uses the midpoint
    weight (1 - e^{-h})/2 there). Registered weak order 2: with eta > 0 the measured weak order is 2 for both
    coefficient sets (theory_checks.solvers_stochastic). NFE = N; normal draws K = N for eta > 0, else 0.
    """
    if coefficients not in ("reference", "taylor"):
        raise ValueError(f"dpmpp_3m_sde: coefficients must be 'reference' or 'taylor', got {coefficients!r}")
    x, k = _dpmpp_sde_multistep(field, x, grid, 3, eta, s_noise, None, 1.0 if coefficients == "reference" else 2.0,
                                noise, generator, callback, progress, "dpmpp_3m_sde")
    return x, _info(noise, k, eta=eta, s_noise=s_noise, coefficients=coefficients)


# ------------------------------------------------------------------------------------------------
# DPM-Solver++(2S) with ancestral noise (k-diffusion sample_dpmpp_sde)


@register("dpmpp_sde", family="stochastic", order=1, stochastic=True, nfe_per_step=2,
          description="DPM-Solver++(2S) with ancestral noise in both stages (k-diffusion sample_dpmpp_sde)")
def dpmpp_sde(field, x, grid, *, eta=1.0, s_noise=1.0, r=0.5, noise=None, generator=None, callback=None,
              progress=False):
    r"""Stochastic singlestep DPM-Solver++(2S) (k-diffusion ``sample_dpmpp_sde``) in xbar = x/alpha,
    sigmabar = e^{-lambda}: with D_i = x0_hat(x_i, t_i), h = lambda_{i+1} - lambda_i, the stage lambda_u =
    lambda_i + r h, and each stage an ancestral step (``ancestral_step``) whose deterministic part is the
    DPM-Solver++1 (= DDIM) step to sigma_down,

        (d_1, u_1) = ancestral_step(sigmabar_i, e^{-lambda_u}, eta),
        xbar_u = (d_1/sigmabar_i) xbar_i + (1 - d_1/sigmabar_i) D_i + s_noise u_1 z_{2i},
        D_u = x0_hat(alpha_u xbar_u, t(lambda_u)),
        (d_2, u_2) = ancestral_step(sigmabar_i, sigmabar_{i+1}, eta),
        xbar_{i+1} = (d_2/sigmabar_i) xbar_i + (1 - d_2/sigmabar_i) [(1 - 1/(2r)) D_i + D_u/(2r)] + s_noise u_2 z_{2i+1}.

    eta = 0 is the PF-ODE's DPM-Solver++(2S) (``dpmpp_2s``, r = 1/2). Both stages start from xbar_i, so the second
    stage's noise is independent of the first's; with eta > 0 the method is an ancestral sampler, registered weak
    order 1. r in (0, 1]. NFE = 2N; normal draws K = 2N for eta > 0 (z_{2i}, z_{2i+1} in step i), else 0.
    """
    _check_unit("dpmpp_sde", eta=eta, s_noise=s_noise)
    if not (isinstance(r, (int, float)) and 0 < r <= 1):
        raise ValueError(f"dpmpp_sde: r must be in (0, 1], got r={r!r}")
    sch = field.schedule
    alpha, sigma, lam = _tables(field, grid)
    sbar = [s_ / a_ for s_, a_ in zip(sigma, alpha)]
    n = len(grid) - 1
    k = 2 * n if eta > 0 else 0
    z = _noise_source("dpmpp_sde", noise, k, x, generator) if k else None
    fac = 1.0 / (2.0 * r)
    for i in step_iter(n, progress, "dpmpp_sde"):
        D = field.x0_eps(x, grid[i])[0]
        xbar = x / alpha[i]
        lam_u = lam[i] + r * (lam[i + 1] - lam[i])
        t_u = sch.t_from_lam(torch.tensor(lam_u, dtype=torch.float64))
        a_u = float(sch.alpha(t_u))
        d1, u1 = ancestral_step(sbar[i], math.exp(-lam_u), eta)
        q1 = d1 / sbar[i]
        xu = xbar.mul(q1)
        xu.add_(D, alpha=1.0 - q1)
        if k:
            xu.add_(z(2 * i), alpha=s_noise * u1)
        Du = field.x0_eps(xu * a_u, t_u)[0]
        d2, u2 = ancestral_step(sbar[i], sbar[i + 1], eta)
        q2 = d2 / sbar[i]
        xn = xbar.mul(q2)
        xn.add_(D, alpha=(1.0 - q2) * (1.0 - fac))
        xn.add_(Du, alpha=(1.0 - q2) * fac)
        if k:
            xn.add_(z(2 * i + 1), alpha=s_noise * u2)
        x = xn.mul(alpha[i + 1])
        if callback is not None:
            callback(i + 1, x)
    return x, _info(noise, k, eta=eta, s_noise=s_noise, r=r)


# ------------------------------------------------------------------------------------------------
# SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector in lambda, data prediction


def exp_poly_integrals(z: float, m: int) -> list[float]:
    r"""J_k(z) = int_0^1 e^{-z s} s^k ds for k = 0..m-1 (z >= 0), without cancellation: the alternating series
    sum_j (-z)^j / (j! (k + j + 1)) for z <= 2 and the upward recurrence J_k = (k J_{k-1} - e^{-z})/z above
    (whose error factor k/z stays below m/2)."""
    if z <= 2.0:
        out = []
        for k in range(m):
            term, total, j = 1.0, 1.0 / (k + 1), 0
            while True:
                j += 1
                term *= -z / j
                add = term / (k + j + 1)
                total += add
                if abs(add) <= 1e-18 * abs(total) or j > 200:
                    break
            out.append(total)
        return out
    e = math.exp(-z)
    out = [-math.expm1(-z) / z]
    for k in range(1, m):
        out.append((k * out[-1] - e) / z)
    return out


def _poly_mul(p, q):
    out = [0.0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        for j, b in enumerate(q):
            out[i + j] += a * b
    return out


def sa_solver_weights(lam_t: float, lam_s: float, nodes: list[float], tau: float, alpha_t: float) -> list[float]:
    r"""Weights w_j of sum_j w_j D_j in one SA-Solver step (Xue et al. 2023 eq. 14 for data prediction) from
    lambda_s to lambda_t = lambda_s + h: with c = 1 + tau^2 and l_j the Lagrange basis polynomial of the nodes
    lambda_j,

        w_j = c alpha_t int_{lambda_s}^{lambda_t} e^{c (lambda - lambda_t)} l_j(lambda) d lambda
            = c alpha_t sum_k P_jk (-1)^k h^{k+1} J_k(c h),

    where l_j(lambda_t + u) = sum_k P_jk u^k (coefficients in u = lambda - lambda_t, of size O(h), so the
    expansion is well conditioned) and J_k from ``exp_poly_integrals``. This equals diffusers'
    ``SASolverScheduler.get_coefficients_fn`` times (1 + tau^2) sigma_t e^{-tau^2 lambda_t}, which expands the
    same integral in powers of lambda itself."""
    c = 1.0 + tau * tau
    h = lam_t - lam_s
    u = [lj - lam_t for lj in nodes]
    m = len(nodes)
    J = exp_poly_integrals(c * h, m)
    I = [(-1) ** k * h ** (k + 1) * J[k] for k in range(m)]
    w = []
    for j in range(m):
        poly = [1.0]
        for i in range(m):
            if i != j:
                den = u[j] - u[i]
                poly = _poly_mul(poly, [-u[i] / den, 1.0 / den])
        w.append(c * alpha_t * sum(pk * ik for pk, ik in zip(poly, I)))
    return w


def _slope_tweak(h: float, tau: float, alpha_t: float) -> float:
    """c alpha_t (h^2/2 - int_{-h}^0 e^{c u} (u + h) du)/h^2, c = 1 + tau^2 (see ``sa_solver``)."""
    c = 1.0 + tau * tau
    J = exp_poly_integrals(c * h, 2)
    return c * alpha_t * (0.5 - (J[0] - J[1]))


def _tau_values(tau, grid, t_max: float) -> list[float]:
    if tau is None:
        fn = lambda t: 1.0 if 0.2005 * t_max <= t <= 0.8015 * t_max else 0.0  # noqa: E731
    elif callable(tau):
        fn = tau
    else:
        fn = lambda t, v=tau: v  # noqa: E731
    vals = []
    for t in grid.tolist():
        try:
            v = float(fn(t))
        except (TypeError, ValueError):
            raise ValueError(f"sa_solver: tau must be a number >= 0 or a callable tau(t) -> number, got {tau!r}") from None
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"sa_solver: tau(t) must be finite and >= 0, got tau({t!r}) = {v!r}")
        vals.append(v)
    return vals


def sa_solver_orders(n: int, predictor_order: int, corrector_order: int, lower_order_final: bool = True):
    """(predictor order of step k, order of the corrector that step k+1 applies to x_{k+1}) for k = 0..n-1,
    as diffusers' ``SASolverScheduler.step``: warm-up min(p, k + 1) and min(q, k + 2) with the history available,
    and with ``lower_order_final`` also <= n - k and <= n - k + 1."""
    hist = max(predictor_order, corrector_order - 1)
    out = []
    for k in range(n):
        done = min(k, hist)
        p, q = predictor_order, corrector_order
        if lower_order_final:
            p, q = min(p, n - k), min(q, n - k + 1)
        out.append((min(p, done + 1), min(q, done + 2)))
    return out


@register("sa_solver", family="stochastic", order=2, stochastic=True, nfe_per_step=1,
          description="SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector, data prediction",
          budget_rule="N = K steps; predictor and corrector orders grow with the history and drop in the last steps (diffusers' lower_order_final)")
def sa_solver(field, x, grid, *, predictor_order=2, corrector_order=2, tau=None, lower_order_final=True,
              order2_tweak=True, noise=None, generator=None, callback=None, progress=False):
    r"""SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams Solver for Fast Sampling of Diffusion Models",
    eqs. 14-15, data prediction; diffusers ``SASolverScheduler`` with algorithm_type="data_prediction"). With
    D_k = x0_hat(x_k, t_k), h_k = lambda_{k+1} - lambda_k and tau_k = tau(t_k) (noise amount; eta = tau^2 in the
    family of the module docstring), the predictor of order p_k (nodes lambda_k, ..., lambda_{k-p_k+1}) is

        x_{k+1} = (sigma_{k+1}/sigma_k) e^{-tau_k^2 h_k} x_k + sum_j w_j D_{k-j} + sigma_{k+1} sqrt(1 - e^{-2 tau_k^2 h_k}) z_k,

    with the weights of ``sa_solver_weights``. After D_{k+1} is evaluated at the predicted x_{k+1}, the
    corrector of order q (nodes lambda_{k+1}, lambda_k, ...: it includes the new point) redoes the step from the
    corrected x_k with the same z_k and tau_k; the corrected x_{k+1} carries on, while D_{k+1} (from the
    predicted state) stays in the history, so NFE = N. The last step is a predictor only.

    Options (defaults as diffusers): ``predictor_order`` in 1..4 (2), ``corrector_order`` in 1..4 (2; the
    corrector of order q uses q - 1 past values), ``tau`` a number >= 0 or a callable tau(t) of the float time
    (default: 1 for 0.2005 t_max <= t <= 0.8015 t_max and 0 elsewhere, which is diffusers' ``tau_func`` window
    of timesteps k = 200..800 under the DDPM mapping t = (k + 1)/1000 t_max, with half a timestep of slack;
    0 gives a deterministic predictor-corrector for the PF-ODE), ``lower_order_final``
    (True: orders drop to fit the steps left, see ``sa_solver_orders``). ``order2_tweak`` (default True, the
    code's choice): at order 2 the slope term (D_k - D_{k-1})/(lambda_k - lambda_{k-1}) is integrated without
    its exponential weight, c alpha_t h^2/2 instead of c alpha_t int_{-h}^0 e^{c u}(u + h) du (c = 1 + tau^2;
    diffusers' and the official code's modification, O(h^3) per step); False is the paper's exact Lagrange
    weights. Normal draws K = N (z_k in step k, drawn even where tau_k = 0, as diffusers does).
    """
    for nm, v in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if v not in (1, 2, 3, 4):
            raise ValueError(f"sa_solver: {nm} must be 1, 2, 3 or 4, got {nm}={v!r}")
    sch = field.schedule
    alpha, sigma, lam = _tables(field, grid)
    n = len(grid) - 1
    taus = _tau_values(tau, grid.to(torch.float64), float(sch.t_max))
    orders = sa_solver_orders(n, predictor_order, corrector_order, lower_order_final)
    z = _noise_source("sa_solver", noise, n, x, generator)
    hist: list[torch.Tensor] = []  # D_k, D_{k-1}, ... (newest first)
    keep = max(predictor_order, corrector_order - 1) + 1
    x_prev = z_prev = None

    def propagate(x_s, k, nodes_idx, values, zk):
        """x at lambda_{k+1} from x_s at lambda_k with the Lagrange weights of the nodes ``nodes_idx``."""
        tk, h, a_t = taus[k], lam[k + 1] - lam[k], alpha[k + 1]
        w = sa_solver_weights(lam[k + 1], lam[k], [lam[m] for m in nodes_idx], tk, a_t)
        if len(w) == 2 and order2_tweak:
            # predictor: nodes (k, k-1), the slope's lambda span is lambda_k - lambda_{k-1};
            # corrector: nodes (k+1, k), span h
            span = lam[nodes_idx[0]] - lam[nodes_idx[1]]
            d = _slope_tweak(h, tk, a_t) * h * h / span
            w[0] += d
            w[1] -= d
        out = x_s.mul((sigma[k + 1] / sigma[k]) * math.exp(-tk * tk * h))
        for wj, v in zip(w, values):
            out.add_(v, alpha=wj)
        if tk > 0.0:
            out.add_(zk, alpha=sigma[k + 1] * math.sqrt(-math.expm1(-2.0 * tk * tk * h)))
        return out

    for k in step_iter(n, progress, "sa_solver"):
        D = field.x0_eps(x, grid[k])[0]
        if k > 0:  # correct x_k: step k-1 again, now with the node lambda_k
            q = orders[k - 1][1]
            x = propagate(x_prev, k - 1, list(range(k, k - q, -1)), [D] + hist[:q - 1], z_prev)
            if callback is not None:
                callback(k, x)
        hist.insert(0, D)
        del hist[keep:]
        zk = z(k)
        p = orders[k][0]
        x_prev, z_prev = x, zk
        x = propagate(x, k, list(range(k, k - p, -1)), hist[:p], zk)
    if callback is not None:
        callback(n, x)
    return x, _info(noise, n, predictor_order=predictor_order, corrector_order=corrector_order,
                    tau="callable" if callable(tau) else ("default" if tau is None else tau),
                    orders=orders, order2_tweak=order2_tweak)


# ------------------------------------------------------------------------------------------------
# Restart sampling (Xu et al. 2023) on EDM's Heun

#: the paper's CIFAR-10 (VP) configuration, in the official code's format [N_restart, K, t_min, t_max]: one
#: restart interval [0.06, 0.30] in sigmabar, K = 2 restarts of 3 Karras points (2 Heun steps) each
DEFAULT_RESTART = ((3, 2, 0.06, 0.30),)


def _parse_intervals(intervals, K, restart_steps):
    if isinstance(intervals, str):
        try:
            intervals = list(json.loads(intervals).values())
        except (ValueError, AttributeError):
            raise ValueError(f"restart: intervals as a string must be the official JSON "
                             f"'{{\"0\": [N_restart, K, t_min, t_max], ...}}', got {intervals!r}") from None
    out = []
    for item in intervals:
        try:
            n_r, k_r, lo, hi = item
        except (TypeError, ValueError):
            raise ValueError(f"restart: each interval is (N_restart, K, t_min, t_max), got {item!r}") from None
        n_r = n_r if restart_steps is None else restart_steps
        k_r = k_r if K is None else K
        if not (isinstance(n_r, int) and n_r >= 2):
            raise ValueError(f"restart: N_restart (points of the restart grid, steps + 1) must be an integer >= 2, "
                             f"got {n_r!r}")
        if not (isinstance(k_r, int) and k_r >= 0):
            raise ValueError(f"restart: K (restarts per interval) must be an integer >= 0, got {k_r!r}")
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo < hi < math.inf):
            raise ValueError(f"restart: need 0 < t_min < t_max (noise levels sigma/alpha), got t_min={lo!r}, "
                             f"t_max={hi!r}")
        out.append((n_r, k_r, float(lo), float(hi)))
    return out


def _karras(s_hi: float, s_lo: float, m: int, rho: float) -> list[float]:
    """m noise levels from s_hi down to s_lo, equally spaced in s^{1/rho} (Karras et al. 2022 eq. 5)."""
    a, b = s_hi ** (1.0 / rho), s_lo ** (1.0 / rho)
    out = [(a + j / (m - 1) * (b - a)) ** rho for j in range(m)]
    out[0], out[-1] = s_hi, s_lo
    return out


def restart_plan(schedule, grid, intervals=DEFAULT_RESTART, *, K=None, restart_steps=None, restart_gamma=0.05,
                 S_min=0.01, S_max=1.0, rho=7.0):
    r"""Where and how ``restart`` restarts on ``grid``: a dict main-grid index i (1..N) -> (n_r, K, [inner noise
    levels from t_max_restart down to sigmabar_i], [churned level s_hat per inner step]), and K_draws, the
    number of normal draws (1 per restart jump + 1 per churned inner step, per restart). The index of an
    interval is the grid point whose sigmabar is nearest to its t_min (official code), searched over 1..N
    (index 0 would never be reached by a step)."""
    sch = schedule
    g = torch.as_tensor(grid, dtype=torch.float64)
    sbar = torch.exp(-sch.lam(g)).tolist()
    sbar_max = float(torch.exp(-sch.lam(torch.tensor(sch.t_max, dtype=torch.float64))))
    plan, draws = {}, 0
    for n_r, k_r, lo, hi in _parse_intervals(intervals, K, restart_steps):
        idx = min(range(1, len(sbar)), key=lambda i: abs(sbar[i] - lo))
        if idx in plan:
            raise ValueError(f"restart: two restart intervals start at the same grid point {idx} "
                             f"(sigmabar {sbar[idx]:.4g}); t_min {lo!r} is nearest to it")
        if not (sbar[idx] < hi <= sbar_max * (1 + 1e-12)):
            raise ValueError(f"restart: t_max={hi!r} must lie above the restart point's sigmabar {sbar[idx]:.6g} "
                             f"and at most sigmabar(t_max) = {sbar_max:.6g} of the schedule")
        levels = _karras(min(hi, sbar_max), sbar[idx], n_r, rho)
        hats = []
        for s in levels[:-1]:
            gam = restart_gamma if S_min <= s <= S_max else 0.0
            hats.append(min(s * (1.0 + gam), sbar_max))
        plan[idx] = (n_r, k_r, levels, hats)
        draws += k_r * (1 + sum(1 for s, sh in zip(levels, hats) if sh > s))
    return plan, draws


def _restart_nfe(n, intervals=DEFAULT_RESTART, K=None, restart_steps=None):
    return 2 * n - 1 + sum(2 * k_r * (n_r - 1) for n_r, k_r, _, _ in _parse_intervals(intervals, K, restart_steps))


@register("restart", family="stochastic", order=2, stochastic=True, nfe_per_step=2, nfe_of_steps=_restart_nfe,
          description="Restart sampling (Xu et al. 2023): EDM Heun plus K forward-noise restarts of an interval")
def restart(field, x, grid, *, intervals=DEFAULT_RESTART, K=None, restart_steps=None, restart_gamma=0.05,
            S_min=0.01, S_max=1.0, S_noise=1.0, rho=7.0, noise=None, generator=None, callback=None, progress=False):
    r"""Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes", Alg. 1; official
    ``restart_sampler`` in Newbeeer/diffusion_restart_sampling) in xbar = x/alpha, sigmabar = sigma/alpha:

    Main process: EDM's deterministic Heun on the grid (Karras et al. 2022 Alg. 1; last step Euler), i.e.
    ``heun`` with coords='edm'. After the step that reaches the grid point i nearest to an interval's
    t_min (sigmabar_i =: s_lo; see ``restart_plan``) the state is restarted K times:

        xbar <- xbar + S_noise sqrt(s_hi^2 - s_lo^2) z         (the exact forward kernel from s_lo up to s_hi)
        then Heun (with its correction on every step) down the n_r Karras levels (rho) from s_hi to s_lo,

    where each inner step from level s first adds churn (EDM Alg. 2): s_hat = s (1 + restart_gamma) when
    S_min <= s <= S_max (else s_hat = s), xbar += S_noise sqrt(s_hat^2 - s^2) z, and the Heun step runs from
    s_hat. Levels above sigmabar(t_max) are clipped to it (the exact score is defined only up to t_max).

    ``intervals``: a sequence of (N_restart, K, t_min, t_max) in sigmabar units, or the official JSON string
    '{"0": [N_restart, K, t_min, t_max], ...}'; default ``DEFAULT_RESTART`` = [3, 2, 0.06, 0.30] (the paper's
    CIFAR-10 VP setting). ``K`` and ``restart_steps`` (= N_restart) override those of every interval;
    restart_gamma = 0.05, S_min = 0.01, S_max = 1, S_noise = 1 are the official command's values. K = 0 is
    ``heun`` coords='edm' exactly. The official code attaches an interval nearest to grid point 0 to no step;
    here the search is over points 1..N, so every interval restarts (and the NFE does not depend on the grid).

    NFE = 2N - 1 + sum over intervals of 2 K (N_restart - 1). Normal draws K_draws (``restart_plan``): per restart,
    one for the jump and one per churned inner step, in the order they are used.
    """
    _check_unit("restart", restart_gamma=restart_gamma, S_min=S_min, S_noise=S_noise, rho=rho)
    if not (isinstance(S_max, (int, float)) and S_max >= S_min):
        raise ValueError(f"restart: need S_max >= S_min, got S_min={S_min!r}, S_max={S_max!r}")
    if rho <= 0:
        raise ValueError(f"restart: rho must be > 0, got rho={rho!r}")
    sch = field.schedule
    times = grid.to(torch.float64)
    alpha = sch.alpha(times).tolist()
    sbar = torch.exp(-sch.lam(times)).tolist()
    plan, k_draws = restart_plan(sch, times, intervals, K=K, restart_steps=restart_steps,
                                 restart_gamma=restart_gamma, S_min=S_min, S_max=S_max, rho=rho)
    z = _noise_source("restart", noise, k_draws, x, generator) if k_draws else None
    n = len(grid) - 1
    draw = [0]

    def nz():
        draw[0] += 1
        return z(draw[0] - 1)

    def t_of(s):
        t = sch.t_from_lam(torch.tensor(-math.log(s), dtype=torch.float64)).clamp(max=sch.t_max)
        return t, float(sch.alpha(t))

    def heun(xbar, s0, t0, a0, s1, t1, a1, correct):
        d = field.eps(xbar * a0, t0)
        x1 = xbar + (s1 - s0) * d
        if correct:
            d2 = field.eps(x1 * a1, t1)
            x1 = xbar + (s1 - s0) * (0.5 * d + 0.5 * d2)
        return x1

    xbar = x / alpha[0]
    for i in step_iter(n, progress, "restart"):
        xbar = heun(xbar, sbar[i], times[i], alpha[i], sbar[i + 1], times[i + 1], alpha[i + 1], i < n - 1)
        if i + 1 in plan:
            n_r, k_r, levels, hats = plan[i + 1]
            stage = [t_of(s) for s in levels[:-1]] + [(times[i + 1], alpha[i + 1])]
            hat_stage = [t_of(sh) if sh > s else st for s, sh, st in zip(levels, hats, stage)]
            for _ in range(k_r):
                xbar = xbar + (S_noise * math.sqrt(levels[0] ** 2 - levels[-1] ** 2)) * nz()
                for j in range(n_r - 1):
                    s, sh = levels[j], hats[j]
                    if sh > s:
                        xbar = xbar + (S_noise * math.sqrt(sh * sh - s * s)) * nz()
                    th, ah = hat_stage[j]
                    tn, an = stage[j + 1]
                    xbar = heun(xbar, sh, th, ah, levels[j + 1], tn, an, True)
        if callback is not None:
            callback(i + 1, xbar * alpha[i + 1])
    restarts = [{"index": i, "n_restart": p[0], "K": p[1], "t_min": p[2][-1], "t_max": p[2][0]}
                for i, p in sorted(plan.items())]
    return xbar * alpha[-1], _info(noise, k_draws, restarts=restarts, restart_gamma=restart_gamma)
