r"""Langevin samplers: the second view of the velocity field.

At a fixed time t the overdamped Langevin diffusion dx = s(x, t) dtau + sqrt(2) dW, s = grad log p_t, has
stationary law p_t (Roberts & Tweedie 1996); annealed over a decreasing sequence of times it samples the data.

Step-size convention (pinned here, since papers differ by a factor 2): a step of size h is

    x' = x + h s(x, t) + sqrt(2 h) z,     z ~ N(0, I),

the Euler-Maruyama step of the diffusion above with time step h (NCSN's code convention). The NCSN *paper*
writes x' = x + (alpha/2) s + sqrt(alpha) z, i.e. alpha = 2h. On N(mu, v) this step is stable iff h < 2v and
its stationary variance is v / (1 - h/(2v)) (the ULA bias; Roberts & Tweedie 1996).

Every sampler takes the VelocityField, counts model evaluations exactly (field.nfe), and draws noise only
from the given ``generator`` (or a ``noise`` tensor of shape (n_steps, *x.shape)).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field as dc_field
from typing import Callable

import torch

from ._tensor import as_tensor, check_batch
from .field import VelocityField
from .samplers.base import get_method, register, sample, step_iter
from .samplers.sde import _noise_source as _noise
from .targets import ExactModel, Gaussian, GaussianMixture

__all__ = ["LangevinResult", "ula", "mala", "annealed_langevin", "kinetic_langevin", "geometric_levels",
           "stability_bound", "effective_sample_size", "snr_step_size", "langevin_corrector", "pc", "PC_PREDICTORS"]


@dataclass
class LangevinResult:
    """Final states ``x``, model evaluations ``nfe``, the chain (n_saved, batch, *data) on request, MALA's
    acceptance rate, an effective sample size per coordinate of the chain, and method-specific ``info``."""

    x: torch.Tensor
    nfe: int
    trajectory: torch.Tensor | None = None
    acceptance_rate: float | None = None
    ess: torch.Tensor | None = None
    info: dict = dc_field(default_factory=dict)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# helpers

def _exact_target(field: VelocityField) -> GaussianMixture | None:
    m = field.model
    return m.target if isinstance(m, ExactModel) else None


def stability_bound(target: GaussianMixture, schedule, t) -> float:
    """2 min_k lambda_min(C_k), C_k = alpha^2 Sigma_k + sigma^2 I: the ULA step h must stay below it for each
    Gaussian component (exact for a Gaussian: |1 - h/lambda| < 1 on every eigen-direction)."""
    tt = as_tensor(float(t))
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    return float(2.0 * (a * a * target._ev + s * s).min())


def _check_step(name: str, field: VelocityField, t, h: float) -> None:
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise ValueError(f"{name}: step size h must be a finite number > 0, got h={h!r}")
    target = _exact_target(field)
    if target is None:
        return
    bound = stability_bound(target, field.schedule, t)
    if h >= bound:
        msg = (f"{name}: step size h={h:g} >= the stability bound 2 lambda_min(C) = {bound:.6g} of the target at "
               f"t={float(t):g}; the chain diverges")
        if isinstance(target, Gaussian):
            raise ValueError(msg)
        warnings.warn(msg + " for at least one component (mixture: a warning, the bound is per component)",
                      RuntimeWarning, stacklevel=3)


def _check_steps_all(name: str, field: VelocityField, ts, hs) -> None:
    """_check_step over several levels, with at most one warning naming the worst level."""
    worst = None
    for t_i, h_i in zip(ts, hs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _check_step(name, field, t_i, h_i)
        if caught and worst is None:
            worst = caught[0].message
    if worst is not None:
        n_bad = sum(1 for t_i, h_i in zip(ts, hs) if _exact_target(field) is not None
                    and h_i >= stability_bound(_exact_target(field), field.schedule, t_i))
        warnings.warn(f"{worst} (first of {n_bad} level(s) above the bound)", RuntimeWarning, stacklevel=3)


def _check_finite(name: str, x: torch.Tensor, step: int, h) -> None:
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"{name}: the chain became non-finite at step {step} (h={h}); lower the step size")


def _check_x(name: str, x) -> None:
    check_batch(x, f"{name}: x0")


def _check_steps(name: str, n_steps) -> int:
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"{name}: n_steps must be an integer >= 1, got {n_steps!r}")
    return int(n_steps)


def effective_sample_size(chain: torch.Tensor) -> torch.Tensor:
    r"""ESS per coordinate of a batch of chains, shape (n_steps, n_chains, *data) -> (*data).

    ESS = M n / (1 + 2 sum_k rho_k), with rho_k the autocorrelation at lag k of each coordinate, averaged over
    the M chains, and the sum truncated by Geyer's initial positive sequence (pairs rho_{2m} + rho_{2m+1} > 0).
    """
    x = chain.to(torch.float64)
    n, m = x.shape[:2]
    if n < 4:
        raise ValueError(f"effective_sample_size needs at least 4 states per chain, got {n}")
    x = x - x.mean(0, keepdim=True)
    f = torch.fft.rfft(x, n=2 * n, dim=0)
    acov = torch.fft.irfft(f * f.conj(), dim=0)[:n] / n  # (n, m, *data)
    rho = acov.mean(1) / acov[0].mean(0).clamp_min(1e-300)
    tau = torch.ones_like(rho[0])
    alive = torch.ones_like(rho[0], dtype=torch.bool)
    for k in range(1, n - 1, 2):
        pair = rho[k] + rho[k + 1]
        alive = alive & (pair > 0)
        tau = tau + 2 * torch.where(alive, pair, torch.zeros_like(pair))
        if not alive.any():
            break
    return m * n / tau


def _result(name, x, field, nfe0, traj, t0, **kw):
    trajectory = torch.stack(traj) if traj else None
    ess = effective_sample_size(trajectory) if trajectory is not None and len(traj) >= 4 else None
    return LangevinResult(x=x, nfe=field.nfe - nfe0, trajectory=trajectory, ess=ess, seconds=time.perf_counter() - t0, **kw)


# ------------------------------------------------------------------------------------------------
# fixed-t samplers

def ula(field: VelocityField, x0: torch.Tensor, t, h: float, n_steps: int, *, generator=None, noise=None,
        return_trajectory: bool = False, thin: int = 1, progress=False) -> LangevinResult:
    """Unadjusted Langevin at fixed t: x' = x + h s(x, t) + sqrt(2h) z (one NFE per step)."""
    n = _check_steps("ula", n_steps)
    _check_x("ula", x0)
    _check_step("ula", field, t, h)
    z = _noise("ula", noise, n, x0, generator)
    x, traj, nfe0, t0 = x0, ([x0.clone()] if return_trajectory else None), field.nfe, time.perf_counter()
    c = math.sqrt(2.0 * h)
    for i in step_iter(n, progress, "ula"):
        x = x + h * field.score(x, t) + c * z(i)
        if traj is not None and (i + 1) % thin == 0:
            traj.append(x.clone())
    _check_finite("ula", x, n, h)
    return _result("ula", x, field, nfe0, traj, t0, info={"h": h, "t": float(t)})


def mala(field: VelocityField, x0: torch.Tensor, t, h: float, n_steps: int, *, log_prob: Callable | None = None,
         generator=None, return_trajectory: bool = False, thin: int = 1, progress=False) -> LangevinResult:
    r"""Metropolis-adjusted Langevin (Roberts & Tweedie 1996) at fixed t: propose y = x + h s(x) + sqrt(2h) z and
    accept with probability min(1, p_t(y) q(x|y) / (p_t(x) q(y|x))), log q(y|x) = -|y - x - h s(x)|^2 / (4h).

    ``log_prob(x)`` defaults to the exact target's log p_t. NFE counts score evaluations (one per step, the
    current state's score is kept); log-density evaluations are reported in ``info['log_prob_evals']``."""
    n = _check_steps("mala", n_steps)
    _check_x("mala", x0)
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise ValueError(f"mala: step size h must be a finite number > 0, got h={h!r}")
    if log_prob is None:
        target = _exact_target(field)
        if target is None:
            raise ValueError("mala needs log_prob(x) unless the field comes from an exact target")
        log_prob = lambda y: target.log_prob_t(y, float(t), field.schedule)  # noqa: E731
    x, traj, nfe0, t0 = x0, ([x0.clone()] if return_trajectory else None), field.nfe, time.perf_counter()
    dims = tuple(range(1, x.ndim))
    s_x, lp_x = field.score(x, t), log_prob(x)
    accepted = torch.zeros(x.shape[0], dtype=torch.float64)
    c = math.sqrt(2.0 * h)
    for i in step_iter(n, progress, "mala"):
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        y = x + h * s_x + c * z
        s_y, lp_y = field.score(y, t), log_prob(y)
        log_q_fwd = -((y - x - h * s_x) ** 2).sum(dims) / (4 * h)
        log_q_bwd = -((x - y - h * s_y) ** 2).sum(dims) / (4 * h)
        log_a = (lp_y - lp_x + log_q_bwd - log_q_fwd).to(torch.float64)
        u = torch.rand(x.shape[0], generator=generator, dtype=torch.float64)
        acc = torch.log(u) < log_a
        accepted += acc
        a_ = acc.reshape((-1,) + (1,) * (x.ndim - 1))
        x, s_x = torch.where(a_, y, x), torch.where(a_, s_y, s_x)
        lp_x = torch.where(acc, lp_y, lp_x)
        if traj is not None and (i + 1) % thin == 0:
            traj.append(x.clone())
    rate = float(accepted.mean() / n)
    return _result("mala", x, field, nfe0, traj, t0, acceptance_rate=rate,
                   info={"h": h, "t": float(t), "log_prob_evals": n + 1})


def kinetic_langevin(field: VelocityField, x0: torch.Tensor, t, h: float, n_steps: int, *, friction: float = 1.0,
                     v0: torch.Tensor | None = None, generator=None, return_trajectory: bool = False, thin: int = 1,
                     progress=False) -> LangevinResult:
    r"""Underdamped Langevin dx = v dtau, dv = s(x, t) dtau - gamma v dtau + sqrt(2 gamma) dW (unit mass), whose
    stationary law is p_t(x) N(v; 0, I), by the BAOAB splitting (Leimkuhler & Matthews 2013):
    B: v += (h/2) s(x);  A: x += (h/2) v;  O: v = e^{-gamma h} v + sqrt(1 - e^{-2 gamma h}) z;  A;  B.
    The force at the end of a step is reused at the start of the next: NFE = n_steps + 1."""
    n = _check_steps("kinetic_langevin", n_steps)
    _check_x("kinetic_langevin", x0)
    if not (isinstance(h, (int, float)) and math.isfinite(h) and h > 0):
        raise ValueError(f"kinetic_langevin: step size h must be a finite number > 0, got h={h!r}")
    if not friction > 0:
        raise ValueError(f"kinetic_langevin: friction must be > 0, got {friction!r}")
    x = x0
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype) if v0 is None else v0
    traj, nfe0, t0 = ([x0.clone()] if return_trajectory else None), field.nfe, time.perf_counter()
    e1 = math.exp(-friction * h)
    e2 = math.sqrt(-math.expm1(-2 * friction * h))
    force = field.score(x, t)
    for i in step_iter(n, progress, "kinetic"):
        v = v + 0.5 * h * force
        x = x + 0.5 * h * v
        v = e1 * v + e2 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = x + 0.5 * h * v
        force = field.score(x, t)
        v = v + 0.5 * h * force
        if traj is not None and (i + 1) % thin == 0:
            traj.append(x.clone())
    _check_finite("kinetic_langevin", x, n, h)
    return _result("kinetic_langevin", x, field, nfe0, traj, t0, info={"h": h, "t": float(t), "v": v})


# ------------------------------------------------------------------------------------------------
# annealed samplers

def geometric_levels(schedule, sigma_max: float, sigma_min: float, n_levels: int) -> torch.Tensor:
    """Times t_1 > ... > t_L whose noise levels sigma(t)/alpha(t) are geometric from sigma_max to sigma_min
    (NCSN's sigmas; for VE/EDM sigma/alpha = sigma)."""
    if int(n_levels) != n_levels or n_levels < 1:
        raise ValueError(f"n_levels must be an integer >= 1, got {n_levels!r}")
    if not (0 < sigma_min <= sigma_max):
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    sig = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), int(n_levels), dtype=torch.float64))
    t = schedule.t_from_lam(-torch.log(sig))
    schedule.check_t(t, what="noise level time")
    return t


def annealed_langevin(field: VelocityField, x0: torch.Tensor, levels, eps: float, n_steps_each: int, *,
                      generator=None, denoise: bool = False, return_trajectory: bool = False,
                      progress=False) -> LangevinResult:
    r"""Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) over the times ``levels`` (t_1 > ... > t_L):
    at level i, ``n_steps_each`` steps x' = x + h_i s(x, t_i) + sqrt(2 h_i) z with h_i = eps sigma_i^2 / sigma_L^2,
    sigma_i = sigma(t_i) the schedule's noise std (constant signal-to-noise across levels; the paper's
    alpha_i = 2 h_i). On VE this is NCSN's rule; on VP, sigma(t) <= 1 is the noise's share of the marginal
    scale, which keeps h_i within the stability bound where sigma/alpha would explode.
    ``denoise`` adds the final Tweedie step x = D(x, t_L) (NCSNv2), one more NFE."""
    levels = torch.as_tensor(levels, dtype=torch.float64).reshape(-1)
    if levels.numel() == 0:
        raise ValueError("annealed_langevin: the list of noise levels is empty")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"annealed_langevin: eps must be a finite number > 0, got eps={eps!r}")
    k = _check_steps("annealed_langevin", n_steps_each)
    _check_x("annealed_langevin", x0)
    field.schedule.check_t(levels, what="noise level time")
    sch = field.schedule
    sig = sch.sigma(levels)
    hs = (eps * sig**2 / sig[-1] ** 2).tolist()
    _check_steps_all("annealed_langevin", field, levels.tolist(), hs)
    x, traj, nfe0, t0 = x0, ([x0.clone()] if return_trajectory else None), field.nfe, time.perf_counter()
    for i in step_iter(len(hs), progress, "annealed langevin"):
        t_i, h_i = levels[i], hs[i]
        c = math.sqrt(2.0 * h_i)
        for _ in range(k):
            x = x + h_i * field.score(x, t_i) + c * torch.randn(x.shape, generator=generator, dtype=x.dtype)
        if traj is not None:
            traj.append(x.clone())
    _check_finite("annealed_langevin", x, len(hs) * k, hs[-1])
    if denoise:
        x = field.denoiser(x, levels[-1])
    return _result("annealed_langevin", x, field, nfe0, traj, t0, info={"h": hs, "levels": levels.tolist()})


# ------------------------------------------------------------------------------------------------
# predictor-corrector, registered as sample-path methods (usable in sample() and compare)

def snr_step_size(score: torch.Tensor, z: torch.Tensor, snr: float, alpha: float = 1.0) -> float:
    r"""score_sde's Langevin-corrector step (Song et al. 2021, Alg. 4): eps = 2 alpha (r ||z|| / ||s||)^2, norms per sample
    averaged over the batch; in this module's convention the corrector step is x' = x + eps s + sqrt(2 eps) z."""
    dims = tuple(range(1, score.ndim))
    g = float(score.reshape(score.shape[0], -1).norm(dim=1).mean())
    nz = float(z.reshape(z.shape[0], -1).norm(dim=1).mean())
    return 2.0 * alpha * (snr * nz / max(g, 1e-300)) ** 2


#: single-step predictors usable in PC (multistep methods would restart their history every step)
PC_PREDICTORS = ("em", "ddpm_ancestral", "euler", "ddim", "heun", "midpoint", "rk4", "dpm_solver_1",
                 "dpm_solver_2", "dpm_solver_3", "none")


def _predictor_nfe(predictor: str) -> int:
    if predictor == "none":
        return 0
    if predictor == "heun":
        return 2  # run per step without the final-Euler shortcut
    return get_method(predictor).nfe_of_steps(1)


def _pc_nfe(n: int, predictor: str = "em", corrector_steps: int = 1, **_) -> int:
    return n * (_predictor_nfe(predictor) + corrector_steps)


@register("pc", family="langevin", order=1, stochastic=True, nfe_per_step=2, nfe_of_steps=_pc_nfe,
          description="Predictor-corrector (Song et al. 2021): Langevin corrector steps with the SNR rule, then a "
                      "predictor step; NFE = N (predictor + corrector_steps)")
def pc(field, x, grid, *, predictor="em", corrector_steps=1, snr=0.16, corrector_first=True, generator=None,
       callback=None, progress=False, **predictor_options):
    r"""Predictor-corrector sampling as score_sde's ``get_pc_sampler`` (Song et al. 2021, Alg. 2-3): for each
    step grid[i] -> grid[i+1], ``corrector_steps`` Langevin steps at t_i, x' = x + e s(x, t_i) + sqrt(2 e) z with

        e = 2 a (r ||z|| / ||s||)^2,   a = alpha_i^2 / alpha_{i+1}^2,

    (r = ``snr``; norms per sample, averaged over the batch). a is score_sde's ``LangevinCorrector`` factor
    ``alphas[t]`` = 1 - beta_i on VP and sub-VP schedules, and 1 on VE / EDM where alpha = 1. Then one
    predictor step t_i -> t_{i+1} (any single-step method, or "none" for corrector-only annealed Langevin).
    ``corrector_first=False`` runs the predictor first and the corrector at t_{i+1} (the order written in the
    paper's Algorithm 1; the official code corrects first).
    Random draws: the corrector's z come from ``generator`` before the predictor's noise of the same step."""
    if predictor not in PC_PREDICTORS:
        raise ValueError(f"pc: predictor must be one of {PC_PREDICTORS}, got {predictor!r}")
    if int(corrector_steps) != corrector_steps or corrector_steps < 0:
        raise ValueError(f"pc: corrector_steps must be an integer >= 0, got {corrector_steps!r}")
    if not snr > 0:
        raise ValueError(f"pc: snr must be > 0, got {snr!r}")
    sch = field.schedule
    alpha = sch.alpha(grid).tolist()
    if predictor == "heun":
        predictor_options.setdefault("final_euler", False)
    n = len(grid) - 1
    steps = []

    def correct(x, i, t):
        a = alpha[i] ** 2 / alpha[i + 1] ** 2
        x, h = langevin_corrector(field, x, t, snr, int(corrector_steps), alpha=a, generator=generator)
        steps.extend(h)
        return x

    for i in step_iter(n, progress, "pc"):
        if corrector_first:
            x = correct(x, i, grid[i])
        if predictor != "none":
            x = sample(field, x, predictor, grid=grid[i:i + 2], generator=generator, **predictor_options).x
        if not corrector_first:
            x = correct(x, i, grid[i + 1])
        if callback is not None:
            callback(i + 1, x)
    return x, {"predictor": predictor, "corrector_steps": corrector_steps, "snr": snr,
               "corrector_first": corrector_first, "corrector_h": steps}


def langevin_corrector(field: VelocityField, x: torch.Tensor, t, snr: float, n_steps: int, *, alpha: float = 1.0,
                       generator=None) -> tuple[torch.Tensor, list]:
    r"""``n_steps`` corrector steps at fixed t (score_sde LangevinCorrector): x' = x + e s + sqrt(2e) z with the
    SNR rule e = 2 alpha (r ||z||/||s||)^2 recomputed every step. Returns (x, the step sizes e used)."""
    used = []
    for _ in range(n_steps):
        s = field.score(x, t)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        e = snr_step_size(s, z, snr, alpha)
        x = x + e * s + math.sqrt(2.0 * e) * z
        used.append(e)
    return x, used


@register("annealed_langevin", family="langevin", order=1, stochastic=True, nfe_per_step=1,
          nfe_of_steps=lambda n, n_steps_each=1, **_: n * n_steps_each,
          description="Annealed Langevin (NCSN) on the grid times as noise levels, h_i = eps (sigma_i/sigma_L)^2")
def _annealed_method(field, x, grid, *, eps=2e-5, n_steps_each=1, generator=None, callback=None, progress=False):
    """Annealed Langevin as a sample-path method: levels grid[1:], ``n_steps_each`` steps per level."""
    res = annealed_langevin(field, x, grid[1:], eps, n_steps_each, generator=generator, progress=progress)
    return res.x, {"eps": eps, "n_steps_each": n_steps_each}
