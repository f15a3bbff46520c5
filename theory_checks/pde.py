r"""Area "pde": the SDE / ODE / PDE views as pointwise PDE residuals on Gaussian mixtures (forward
Fokker-Planck, PF-ODE continuity equation, the marginal-preserving SDE family).

All residuals are written for L = log p_t (dividing the PDE by p > 0) and evaluated with autograd in
float64 at points x with per-point times t. Each is normalised by the sum of the absolute values of the
terms, so it is a relative residual.
"""
from __future__ import annotations

import torch

from diffusion_lab.schedules import Schedule
from diffusion_lab.targets import GaussianMixture

from .catalogue import register_many
from .kernels import DEFAULT_SCHEDULES
from .parameterisation import random_mixture


def _log_density_derivatives(target: GaussianMixture, schedule: Schedule, x, t):
    """(dL/dt, grad L, lap L) at each (x_i, t_i), L = log p_t (autograd, float64)."""
    x = x.detach().clone().requires_grad_(True)
    t = torch.as_tensor(t, dtype=torch.float64).detach().clone().requires_grad_(True)
    L = target.log_prob_t(x, t, schedule)
    dLdt, gradL = torch.autograd.grad(L.sum(), (t, x), create_graph=True)
    lap = torch.zeros_like(L)
    for j in range(x.shape[1]):
        (h,) = torch.autograd.grad(gradL[:, j].sum(), x, retain_graph=True)
        lap = lap + h[:, j]
    return dLdt.detach(), gradL.detach(), lap.detach()


def _divergence(fn, x):
    """(fn(x), div fn(x)) by autograd, one backward pass per dimension."""
    x = x.detach().clone().requires_grad_(True)
    v = fn(x)
    div = torch.zeros(x.shape[0], dtype=x.dtype)
    for j in range(x.shape[1]):
        (h,) = torch.autograd.grad(v[:, j].sum(), x, retain_graph=True)
        div = div + h[:, j]
    return v.detach(), div.detach()


def _relative(*terms, floor: float = 0.0):
    """max_i |sum of terms| / (sum of |terms| + floor): the residual relative to the terms the equation balances,
    with ``floor`` the scale of those terms where all of them vanish at once (e.g. x = 0 on a centred Gaussian
    whose law does not change with t), so that round-off of an exact zero does not read as a relative error of 1."""
    total = sum(terms)
    scale = sum(t.abs() for t in terms) + floor
    return float((total.abs() / scale.clamp_min(1e-300)).max())


def _rate_scale(target: GaussianMixture, schedule: Schedule, t) -> float:
    """d (|f| + g^2/2 max_k ||C_k^{-1}||), C_k = alpha^2 Sigma_k + sigma^2 I, at the largest over the times t: the
    size of the terms of the log-density PDEs (1/time), used as their floor."""
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    ev_min = torch.linalg.eigvalsh(target.covs).min()
    prec = 1.0 / (a * a * ev_min + s * s)
    return float((target.dim * (schedule.f(tt).abs() + 0.5 * schedule.g2(tt) * prec)).max())


def fokker_planck_residual(target: GaussianMixture, schedule: Schedule, x, t) -> float:
    """Forward Fokker-Planck: dp/dt = -div(f x p) + g^2/2 lap p (the Fokker-Planck equation of
    dx = f x dt + g dw); in L = log p,
    dL/dt + d f + f x . grad L - g^2/2 (lap L + |grad L|^2) = 0."""
    dLdt, gL, lap = _log_density_derivatives(target, schedule, x, t)
    tt = torch.as_tensor(t, dtype=torch.float64)
    f, g2 = schedule.f(tt), schedule.g2(tt)
    d = x.shape[1]
    return _relative(dLdt, d * f * torch.ones_like(dLdt), f * (x * gL).sum(-1), -0.5 * g2 * lap,
                     -0.5 * g2 * (gL * gL).sum(-1), floor=_rate_scale(target, schedule, t))


def continuity_residual(target: GaussianMixture, schedule: Schedule, x, t, prediction: str = "x0") -> float:
    """Continuity equation of the PF-ODE: dp/dt + div(p v) = 0 with v the field's velocity (Song et al. 2021,
    eq. 13); in
    L = log p: dL/dt + div v + v . grad L = 0, div v by autograd through the field."""
    field = target.field(schedule, prediction=prediction)
    tt = torch.as_tensor(t, dtype=torch.float64)
    v, div = _divergence(lambda z: field.velocity(z, tt), x)
    dLdt, gL, _ = _log_density_derivatives(target, schedule, x, t)
    return _relative(dLdt, div, (v * gL).sum(-1), floor=_rate_scale(target, schedule, t))


def sde_family_residual(target: GaussianMixture, schedule: Schedule, x, t, gamma: float) -> float:
    """The family dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW_bar (reverse time) keeps p_t for every
    gamma (Karras et al. 2022, eq. 6; Huang, Lim & Courville 2021): with b the drift,
    dp/dt + div(b p) + gamma^2 g^2/2 lap p = 0, i.e.
    dL/dt + div b + b . grad L + gamma^2 g^2/2 (lap L + |grad L|^2) = 0."""
    field = target.field(schedule)
    tt = torch.as_tensor(t, dtype=torch.float64)
    b, div = _divergence(lambda z: field.sde_drift(z, tt, gamma), x)
    dLdt, gL, lap = _log_density_derivatives(target, schedule, x, t)
    c = 0.5 * gamma * gamma * schedule.g2(tt)
    return _relative(dLdt, div, (b * gL).sum(-1), c * lap, c * (gL * gL).sum(-1),
                     floor=_rate_scale(target, schedule, t))


def _on_points(fn, schedule: Schedule, seed: int = 0, **kw) -> float:
    tg, x, t = _points(schedule, seed=seed)
    return fn(tg, schedule, x, t, **kw)


def _points(schedule: Schedule, n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tg = random_mixture(2, 2, seed=seed)
    x = 2.0 * torch.randn(n, 2, dtype=torch.float64, generator=g)
    lo, hi = schedule.lam_range
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    t = schedule.t_from_lam(hi + u * (lo - hi))  # spread evenly in log-SNR
    return tg, x, t


register_many(
    [(f"pde.fokker_planck[{n}]", (lambda s=s: _on_points(fokker_planck_residual, s)))
     for n, s in DEFAULT_SCHEDULES.items() if n != "ddpm"],
    doc=fokker_planck_residual.__doc__, area="pde", kind="exact", tol=1e-10,
    case="random 2-component 2-D GMM, 12 (x, t) spread in log-SNR, autograd float64",
    reference="Fokker-Planck equation of dx = f x dt + g dw (Song et al. 2021)",
)
register_many(
    [(f"pde.continuity_pf_ode[{n}]", (lambda s=s: _on_points(continuity_residual, s, seed=1)))
     for n in ("vp", "ve", "edm", "rf") for s in [DEFAULT_SCHEDULES[n]]],
    doc=continuity_residual.__doc__, area="pde", kind="exact", tol=1e-10,
    case="random 2-D GMM, 12 (x, t); v from the field (x0 prediction), div by autograd",
    reference="Song et al. 2021, eq. 13 (probability-flow ODE)",
)
register_many(
    [(f"pde.sde_family[gamma={g}]", (lambda g=g: max(_on_points(sde_family_residual, DEFAULT_SCHEDULES[n], seed=2, gamma=g)
                                                   for n in ("vp", "subvp", "rf"))))
     for g in (0.0, 0.5, 1.0, 2.0)],
    doc=sde_family_residual.__doc__, area="pde", kind="exact", tol=1e-10,
    case="random 2-D GMM, 12 (x, t), VP / sub-VP / RF; drift from the field",
    reference="Karras et al. 2022, eq. 6; Huang, Lim & Courville 2021",
)
