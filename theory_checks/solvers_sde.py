r"""Area "solvers" (stochastic): SDE solver checks: reverse SDE, the marginal-preserving family, DDPM = DDIM(eta = 1), weak orders.

With Gaussian data N(mu, Sigma) the exact score is affine in x, so every sampler step here is an affine map
of the state and of the step's standard normals. The output of N steps from x_0 is then

    x_N = Phi x_0 + beta + sum_i K_i z_i,       z_i ~ N(0, I) independent,

and for x_0 ~ N(m_0, C_0) its law is exactly N(Phi m_0 + beta, Phi C_0 Phi^T + sum_i K_i K_i^T): weak errors
are computed with no Monte Carlo. ``sampler_gaussian_law`` reads (Phi, beta, K_i) off the package's own sampler
(one run on the points 0, e_1..e_d and on unit noises), so the checks test the code, not a re-derivation;
``em_gaussian_law_closed_form`` is the independent moment recursion of Euler-Maruyama,

    m' = A m + b,   C' = A C A^T + gamma^2 g^2 h I,   A = (1 - f h) I - (1+gamma^2)/2 g^2 h C_t^{-1},
    b = (1+gamma^2)/2 g^2 h C_t^{-1} alpha_t mu,   C_t = alpha_t^2 Sigma + sigma_t^2 I,

and the two agree to rounding (``solvers.em_law_closed_form``). Every order check here runs the package's samplers.
(A strong-order check on geometric Brownian motion used to be listed here; it ran torchsde's own solvers on an SDE
no sampler of this package integrates, so it was removed from the catalogue: the package's Euler-Maruyama is checked
by its weak order, its exact law and its path-by-path identity with torchsde's Euler.)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab.metrics import gaussian_w2  # noqa: F401  (re-exported for the tests)

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.samplers import sample, time_grid

from .catalogue import Outcome, check

STEPS = (16, 32, 64, 128, 256)


# ------------------------------------------------------------------------------------------------
# Gaussian laws of sampler outputs (every step is affine for Gaussian data: exact laws)


def sampler_gaussian_law(field, method: str, grid, m0, C0, **options):
    r"""Exact law N(m, C) of ``method``'s output on ``grid`` for x_0 ~ N(m0, C0) and Gaussian data.

    One run of the sampler (float64) on 1 + d + N d points: x_0 = 0 (offset beta), x_0 = e_k (columns of Phi)
    and x_0 = 0 with z_i = e_k on one (step, coordinate) and zero elsewhere (columns of K_i); then
    m = Phi m0 + beta and C = Phi C0 Phi^T + sum_i K_i K_i^T. Exact for any sampler that is affine in
    (x_0, z_0..z_{N-1}) — true for exact Gaussian scores — and that takes its normals from ``noise``.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64)
    d = field.data_shape[0]
    n = len(grid) - 1
    eye = torch.eye(d, dtype=torch.float64)
    x = torch.cat([torch.zeros(1, d, dtype=torch.float64), eye, torch.zeros(n * d, d, dtype=torch.float64)])
    noise = torch.zeros(n, x.shape[0], d, dtype=torch.float64)
    rows = 1 + d + torch.arange(n * d)
    noise[torch.arange(n).repeat_interleave(d), rows, torch.arange(d).repeat(n)] = 1.0
    out = sample(field, x, method, grid=grid, noise=noise, **options).x
    beta = out[0]
    Phi = (out[1:1 + d] - beta).T
    K = (out[1 + d:] - beta).reshape(n, d, d).transpose(1, 2)  # K[i][:, k] = response to z_i = e_k
    m = Phi @ torch.as_tensor(m0, dtype=torch.float64) + beta
    C = Phi @ torch.as_tensor(C0, dtype=torch.float64) @ Phi.T + torch.einsum("nij,nkj->ik", K, K)
    return m, 0.5 * (C + C.T)


def em_gaussian_law_closed_form(target: T.Gaussian, schedule, grid, gamma: float, m0, C0):
    r"""Euler-Maruyama moment recursion for the reverse SDE family on Gaussian data N(mu, Sigma), in closed form:

        s(x, t) = -C_t^{-1}(x - alpha_t mu),   x' = x - h [f x - (1+gamma^2)/2 g^2 s] + gamma g sqrt(h) z,
        m' = A m + b,   C' = A C A^T + gamma^2 g^2 h I (module docstring), h = t_i - t_{i+1}.
    """
    grid = torch.as_tensor(grid, dtype=torch.float64)
    mu, Sig = target.mu, target.cov
    d = mu.numel()
    eye = torch.eye(d, dtype=torch.float64)
    m, C = torch.as_tensor(m0, dtype=torch.float64), torch.as_tensor(C0, dtype=torch.float64)
    for i in range(len(grid) - 1):
        t, h = grid[i], float(grid[i] - grid[i + 1])
        a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
        f, g2 = float(schedule.f(t)), float(schedule.g2(t))
        Pt = torch.linalg.inv(a * a * Sig + s * s * eye)
        k = 0.5 * (1.0 + gamma * gamma) * g2 * h
        A = (1.0 - f * h) * eye - k * Pt
        m = A @ m + k * (Pt @ (a * mu))
        C = A @ C @ A.T + gamma * gamma * g2 * h * eye
    return m, 0.5 * (C + C.T)


def _exact_marginal(target: T.Gaussian, schedule, t):
    a, s = float(schedule.alpha(torch.tensor(t, dtype=torch.float64))), float(schedule.sigma(torch.tensor(t, dtype=torch.float64)))
    return a * target.mu, a * a * target.cov + s * s * torch.eye(target.mu.numel(), dtype=torch.float64)


def fitted_slope(hs, errs) -> float:
    """Least-squares slope of log(err) against log(h)."""
    return float(np.polyfit(np.log(np.asarray(hs, float)), np.log(np.asarray(errs, float)), 1)[0])


def weak_order(method: str = "em", *, target: T.Gaussian | None = None, schedule=None, steps=STEPS,
               grid_kind: str = "uniform", closed_form: bool = False, **options):
    r"""Weak order of a sampler on Gaussian data: e(N) = W2(law of x_N, p_{t_min}) from x_{t_max} ~ p_{t_max},
    with the law computed exactly (no Monte Carlo); returns (slope of log e vs log h, errors).

    h = (t_max - t_min)/N. For method "em" with ``closed_form`` the moments come from
    ``em_gaussian_law_closed_form`` instead of the sampler.
    """
    target = target or T.gaussian_2d()
    schedule = schedule or S.VPLinear()
    field = target.field(schedule)
    m0, C0 = _exact_marginal(target, schedule, schedule.t_max)
    m_ref, C_ref = _exact_marginal(target, schedule, schedule.t_min)
    errs, hs = [], []
    for n in steps:
        grid = time_grid(schedule, n, grid_kind)
        if closed_form:
            m, C = em_gaussian_law_closed_form(target, schedule, grid, float(options.get("gamma", 1.0)), m0, C0)
        else:
            m, C = sampler_gaussian_law(field, method, grid, m0, C0, **options)
        errs.append(gaussian_w2(m, C, m_ref, C_ref))
        hs.append((schedule.t_max - schedule.t_min) / n)
    return fitted_slope(hs, errs), errs


def _order_outcome(slope: float, errs, p: float, steps=STEPS, what: str = "W2 errors") -> Outcome:
    pairs = ", ".join(f"N={n}: {e:.3e}" for n, e in zip(steps, errs))
    return Outcome(abs(slope - p), f"slope {slope:.3f} (expected {p:g}); {what} {pairs}")


@check("solvers.em_weak_order", area="solvers", kind="order", tol=0.15,
       case="em, gamma=0.5, VP linear, gaussian_2d, uniform t, N in {16..256}, moments from the sampler's affine map",
       reference="Kloeden & Platen 1992 Thm 14.5.1")
def _em_weak():
    """Euler-Maruyama on dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW has weak order 1: the exact Gaussian
    law of its output converges to p_{t_min} in W2 like h^1."""
    slope, errs = weak_order("em", gamma=0.5)
    return _order_outcome(slope, errs, 1.0)


@check("solvers.reverse_sde_gaussian_weak_order[gamma=1]", area="solvers", kind="order", tol=0.15,
       case="the package's em sampler, gamma=1, VP linear, gaussian_2d, uniform t, N in {16..256}, exact output law",
       reference="Anderson 1982")
def _reverse_sde_weak():
    """The reverse SDE dx = [f x - g^2 s] dt + g dW_bar (Anderson 1982) started at p_{t_max} carries p_{t_max} to
    p_{t_min}: the exact output law of the package's EM sampler (read off its affine map) converges to p_{t_min} at
    weak order 1."""
    slope, errs = weak_order("em", gamma=1.0)
    return _order_outcome(slope, errs, 1.0)


@check("solvers.reverse_sde_gaussian_weak_order[gamma=2]", area="solvers", kind="order", tol=0.15,
       case="the package's em sampler, gamma=2, VP linear, gaussian_2d, uniform t, N in {32..512}, exact output law",
       reference="Huang et al. 2021; Karras et al. 2022 eq. 6")
def _family_weak():
    """Every member of the family dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW_bar has marginals p_t
    (Karras et al. 2022 eq. 6): with gamma = 2 the package's EM sampler's exact output law also converges to
    p_{t_min} at weak order 1.

    N starts at 32: at N = 16 the step h (1+gamma^2)/2 g^2 |C_t^{-1}| ~ (1/16) 2.5 20 ~ 3 near t_max exceeds
    EM's stability bound 2 (W2 error 0.46 at N = 16 against 0.076 at N = 32), outside the asymptotic range."""
    steps = (32, 64, 128, 256, 512)
    slope, errs = weak_order("em", gamma=2.0, steps=steps)
    return _order_outcome(slope, errs, 1.0, steps=steps)


@check("solvers.ddpm_ancestral_weak_order", area="solvers", kind="order", tol=0.15,
       case="ddpm_ancestral, VP linear, gaussian_2d, quadratic t grid, N in {32..256}, moments from the sampler's affine map",
       reference="Ho et al. 2020 Alg. 2 and eq. 7")
def _ddpm_weak():
    """DDPM ancestral sampling x_s = mu~(x_t, x0_hat) + sqrt(beta~) z is a weak first-order discretisation of the
    reverse SDE: the exact law of its output converges to p_{t_min} like h^1.

    On a uniform t grid the asymptotic range starts late (local slopes 0.77, 0.83, 0.88, 0.92, 0.95 from
    N = 16 to 512); the quadratic grid (DDIM's), with smaller steps near t_min, is asymptotic from N = 32."""
    steps = (32, 64, 128, 256)
    slope, errs = weak_order("ddpm_ancestral", grid_kind="quadratic", steps=steps)
    return _order_outcome(slope, errs, 1.0, steps=steps)


@check("solvers.ddim_eta_weak_order[eta=0.5]", area="solvers", kind="order", tol=0.15,
       case="ddim eta=0.5, VP linear, gaussian_2d, quadratic t grid, N in {32..256}, moments from the sampler's "
            "affine map",
       reference="Song, Meng & Ermon 2021 eq. 12 and 16")
def _ddim_eta_weak():
    """DDIM with 0 < eta < 1 keeps the marginals of the forward process (its step has the posterior variance
    c^2 = eta^2 sigma_t^2 (1 - e^{-2h}) and the eps weight sqrt(sigma_t^2 - c^2)): the exact law of its output
    converges to p_{t_min} like h^1. (At eta = 1 a wrong eta factor is invisible; at eta = 0.5 it is not.)"""
    steps = (32, 64, 128, 256)
    slope, errs = weak_order("ddim", grid_kind="quadratic", steps=steps, eta=0.5)
    return _order_outcome(slope, errs, 1.0, steps=steps)


def em_law_residual(gamma: float = 0.5, n: int = 32) -> float:
    """The sampler "em" and the closed-form moment recursion give the same Gaussian law (relative max error of
    mean and covariance; exact class): the sampler implements x' = x - h [f x - (1+gamma^2)/2 g^2 s] + gamma g dW."""
    target, sch = T.gaussian_2d(), S.VPLinear()
    grid = time_grid(sch, n, "logsnr")
    m0, C0 = _exact_marginal(target, sch, sch.t_max)
    m1, C1 = sampler_gaussian_law(target.field(sch), "em", grid, m0, C0, gamma=gamma)
    m2, C2 = em_gaussian_law_closed_form(target, sch, grid, gamma, m0, C0)
    return max(float((m1 - m2).abs().max() / m2.abs().max()), float((C1 - C2).abs().max() / C2.abs().max()))


@check("solvers.em_law_closed_form", area="solvers", kind="exact", tol=1e-12,
       case="gamma=0.5, VP linear, gaussian_2d, 32 log-SNR steps", reference="exact Gaussian law of an affine sampler")
def _em_law():
    """The law of the "em" sampler's output read off its affine map equals the closed-form EM moment recursion."""
    return em_law_residual()


# ------------------------------------------------------------------------------------------------
# exact identities between samplers


def ddim_eta1_residual(n: int = 20, seed: int = 0, schedule=None) -> float:
    """DDIM with eta = 1 equals DDPM ancestral sampling with the same noise (Song, Meng & Ermon 2021
    sec. 4.1): max |x_ddim - x_ddpm| / max |x_ddpm| on the ring8 mixture (float64)."""
    schedule = schedule or S.VPLinear()
    field = T.ring8().field(schedule)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 2, dtype=torch.float64, generator=g) * float(schedule.sigma(torch.tensor(schedule.t_max)))
    noise = torch.randn(n, *x.shape, dtype=torch.float64, generator=g)
    a = sample(field, x, "ddim", steps=n, eta=1.0, noise=noise).x
    b = sample(field, x, "ddpm_ancestral", steps=n, noise=noise).x
    return float((a - b).abs().max() / b.abs().max())


@check("solvers.ddim_eta1_is_ddpm", area="solvers", kind="exact", tol=1e-12,
       case="ring8, VP linear and EDM schedules, 20 log-SNR steps, 256 samples, same noise",
       reference="Song, Meng & Ermon 2021 eq. 16; Ho et al. 2020 eq. 7")
def _ddim_ddpm():
    """DDIM with eta = 1 (sigma_t^2 = beta~_t) and DDPM ancestral sampling with the posterior variance
    beta~ give the same samples from the same noise."""
    return max(ddim_eta1_residual(schedule=S.VPLinear()), ddim_eta1_residual(schedule=S.EDM()))


def edm_heun_residual(n: int = 12, schedule=None) -> float:
    """The EDM stochastic sampler with S_churn = 0 is Heun in (x/alpha, sigma/alpha) with a final Euler step
    (Karras et al. 2022 Alg. 2 reduces to Alg. 1): max relative difference from ``heun`` coords='edm'."""
    schedule = schedule or S.VPLinear()
    field = T.ring8().field(schedule)
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x * float(schedule.sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    a = sample(field, x, "edm_sde", steps=n, grid_kind="karras", S_churn=0.0).x
    b = sample(field, x, "heun", steps=n, grid_kind="karras", coords="edm").x
    return float((a - b).abs().max() / b.abs().max())


@check("solvers.edm_sde_churn0_is_heun", area="solvers", kind="exact", tol=1e-12,
       case="ring8, VP linear and EDM schedules, 12 Karras steps", reference="Karras et al. 2022 Alg. 1-2")
def _edm_heun():
    """EDM's stochastic sampler with S_churn = 0 equals its deterministic Heun sampler (NFE 2N - 1)."""
    return max(edm_heun_residual(schedule=S.VPLinear()), edm_heun_residual(schedule=S.EDM()))


def torchsde_em_residual(n: int = 40, gamma: float = 1.0) -> float:
    """torchsde's Euler on the reverse SDE (sde_solver='euler', Brownian path bm in u = -t) and the native "em"
    sampler fed the increments noise[i] = (W(u_{i+1}) - W(u_i))/sqrt(du_i) take the same path (float64)."""
    from diffusion_lab.samplers.sde import brownian_increments, make_brownian

    sch = S.VPLinear()
    field = T.ring8().field(sch)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(256, 2, dtype=torch.float64, generator=g)
    grid = time_grid(sch, n, "logsnr")
    bm = make_brownian(grid, x.shape, generator=g)
    a = sample(field, x, "torchsde", grid=grid, bm=bm, gamma=gamma).x
    b = sample(field, x, "em", grid=grid, noise=brownian_increments(bm, grid, x.shape), gamma=gamma).x
    return float((a - b).abs().max() / b.abs().max())


@check("solvers.torchsde_euler_is_em", area="solvers", kind="exact", tol=1e-12,
       case="ring8, VP linear, 40 log-SNR steps, gamma=1, one BrownianInterval", reference="Li et al. 2020 (torchsde); Kloeden & Platen 1992")
def _torchsde_em():
    """torchsde Euler (step-index time, one step per grid interval) and the native Euler-Maruyama sampler are the
    same scheme: driven by the same Brownian path they agree to rounding."""
    return torchsde_em_residual()
