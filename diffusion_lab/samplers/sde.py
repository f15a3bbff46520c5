r"""Stochastic samplers of the reverse process: native Euler-Maruyama, torchsde backends, DDPM ancestral
sampling and the EDM stochastic sampler.

The marginal-preserving family (Karras et al. 2022 eq. 6; Huang et al. 2021), in reverse time
(t decreasing, W_bar a reverse-time Brownian motion):

    dx = [f x - (1 + gamma^2)/2 g^2 s(x, t)] dt + gamma g dW_bar,     s = grad log p_t = -eps_hat/sigma,

has marginals p_t for every gamma(t) >= 0: gamma = 0 is the PF-ODE, gamma = 1 Anderson's (1982) reverse SDE.
Its noise is additive (gamma g depends on t only), so Ito = Stratonovich and Euler-Maruyama = Milstein,
strong order 1 and weak order 1 (Kloeden & Platen 1992, Thms 10.2.2 and 14.5.1).

Conventions shared by every stochastic sampler: the option ``noise`` is a tensor of shape (K, *x.shape) of
standard normals consumed in order, K being the number of normal draws the method makes for the grid and
options (here K = N and noise[i] drives the step grid[i] -> grid[i+1]); the method reports K as
``info["noise_draws"]``, and a ``noise`` of another shape raises ValueError naming K. Without it the normals
are drawn step by step with ``torch.randn(x.shape, generator=generator)``. Coefficients are computed once
per grid in float64 and applied to x in x's dtype.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import register, step_iter

__all__ = ["em_coefficients", "ddpm_posterior_coefficients", "make_brownian", "brownian_increments", "TORCHSDE_SOLVERS"]

#: torchsde solvers offered by method "torchsde": sde_type, noise_type and model evaluations for N steps
#: (measured with ``field.nfe``; see ``torchsde_sampler``).
TORCHSDE_SOLVERS = {
    "euler": ("ito", "additive", lambda n: n),
    "milstein": ("ito", "additive", lambda n: n),
    "srk": ("ito", "additive", lambda n: 2 * n),
    "reversible_heun": ("stratonovich", "diagonal", lambda n: n + 1),
}


# ------------------------------------------------------------------------------------------------
# shared helpers


def _gamma_fn(gamma, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """gamma as a function of a float64 time tensor; a number must be finite and >= 0."""
    if callable(gamma):
        return lambda t: torch.as_tensor(gamma(t), dtype=torch.float64) * torch.ones_like(t)
    try:
        g = float(gamma)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: gamma must be a number >= 0 or a callable gamma(t), got {gamma!r}") from None
    if not (math.isfinite(g) and g >= 0.0):
        raise ValueError(f"{name}: gamma must be finite and >= 0, got gamma={gamma!r}")
    return lambda t: torch.full_like(t, g)


def _gamma_values(gamma_fn, t: torch.Tensor, name: str) -> torch.Tensor:
    gam = gamma_fn(t)
    if not (torch.isfinite(gam).all() and (gam >= 0).all()):
        i = int(torch.nonzero(~(torch.isfinite(gam) & (gam >= 0)))[0])
        raise ValueError(f"{name}: gamma(t) must be finite and >= 0, got gamma({float(t[i])!r}) = {float(gam[i])!r}")
    return gam


def _noise_source(name: str, noise, k: int, x: torch.Tensor, generator):
    """z_j, the j-th of the K = ``k`` standard-normal draws of a sampler (j = 0..K-1, in the order it uses them):
    noise[j] if ``noise`` is given (a tensor of shape (K, *x.shape); anything else raises ValueError naming K),
    else a fresh ``torch.randn(x.shape, generator=generator)`` draw."""
    if noise is None:
        return lambda j: torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (k, *x.shape):
        shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"{name}: noise must be a tensor of shape (K, *x.shape) = {(k, *x.shape)}, K = {k} normal "
                         f"draws for this grid and these options; got {shape}")
    noise = noise.to(dtype=x.dtype, device=x.device)
    return lambda j: noise[j]


# ------------------------------------------------------------------------------------------------
# native Euler-Maruyama


def em_coefficients(schedule, grid: torch.Tensor, gamma=1.0) -> tuple[list, list, list]:
    r"""Float64 coefficients (a_i, b_i, c_i) of the Euler-Maruyama step of the marginal-preserving family,

        x_{i+1} = a_i x_i + b_i eps_hat(x_i, t_i) + c_i z_i,     z_i ~ N(0, I),   h_i = t_i - t_{i+1} > 0,
        a_i = 1 - f(t_i) h_i,   b_i = -(1 + gamma_i^2)/2 g^2(t_i) h_i / sigma(t_i),   c_i = gamma_i g(t_i) sqrt(h_i),

    i.e. x_{i+1} = x_i - h_i [f x_i - (1+gamma^2)/2 g^2 s] + gamma g (W_bar(t_{i+1}) - W_bar(t_i)) with
    s = -eps_hat/sigma (Maruyama 1955; Song et al. 2021's ``EulerMaruyamaPredictor`` for gamma = 1)."""
    t = torch.as_tensor(grid, dtype=torch.float64)
    t0 = t[:-1]
    h = t0 - t[1:]
    gam = _gamma_values(_gamma_fn(gamma, "em"), t0, "em")
    g2 = schedule.g2(t0)
    a = 1.0 - schedule.f(t0) * h
    b = -0.5 * (1.0 + gam * gam) * g2 * h / schedule.sigma(t0)
    c = gam * torch.sqrt(g2 * h)
    return a.tolist(), b.tolist(), c.tolist()


@register("em", family="sde", order=1, stochastic=True, nfe_per_step=1,
          description="Euler-Maruyama for dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW (gamma=1: reverse SDE)")
def em(field, x, grid, *, gamma=1.0, noise=None, generator=None, callback=None, progress=False):
    r"""Euler-Maruyama on the marginal-preserving reverse SDE family (Anderson 1982; Karras et al. 2022 eq. 6)

        dx = [f x - (1 + gamma^2)/2 g^2 s] dt + gamma g dW_bar,

    step x_{i+1} = a_i x_i + b_i eps_hat(x_i, t_i) + c_i z_i with the float64 coefficients of
    ``em_coefficients``, computed once for the grid. ``gamma`` >= 0 is a number or a callable gamma(t):
    gamma = 1 (default) is Anderson's (1982) reverse SDE, gamma = 0 the PF-ODE Euler step (no noise drawn).
    Weak order 1; strong order 1 (additive noise). Noise is added in the last step too, so x is a sample of
    (an approximation of) p_{t_min}; ``final='denoise'`` in ``sample`` removes it. NFE = N.
    Normal draws: K = N (noise[i] drives step i; a step where gamma(t_i) = 0 leaves its draw unused), or K = 0
    when gamma = 0 on the whole grid (then ``noise`` is ignored).
    """
    n = len(grid) - 1
    a, b, c = em_coefficients(field.schedule, grid, gamma)
    deterministic = all(ci == 0.0 for ci in c)
    z = None if deterministic else _noise_source("em", noise, n, x, generator)
    times = grid.to(torch.float64)
    for i in step_iter(n, progress, "em"):
        eps = field.eps(x, times[i])
        x_new = x.mul(a[i])
        x_new.add_(eps, alpha=b[i])
        if c[i] != 0.0:
            x_new.add_(z(i), alpha=c[i])
        x = x_new
        if callback is not None:
            callback(i + 1, x)
    return x, {"gamma": gamma if not callable(gamma) else "callable", "noise": "given" if noise is not None else "drawn",
               "noise_draws": 0 if deterministic else n}


# ------------------------------------------------------------------------------------------------
# DDPM ancestral sampling


def ddpm_posterior_coefficients(schedule, grid: torch.Tensor) -> tuple[list, list, list]:
    r"""Float64 coefficients (A_i, B_i, C_i) of the Gaussian posterior q(x_s | x_t, x_0) = N(A x_t + B x_0, C^2 I)
    for the step t = t_i -> s = t_{i+1} of the forward process x_t = alpha_t x_0 + sigma_t eps.

    Derivation (any schedule; Kingma et al. 2021 App. A): the forward Markov transition is
    x_t | x_s ~ N(alpha_{t|s} x_s, sigma_{t|s}^2) with alpha_{t|s} = alpha_t/alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2 = sigma_t^2 (1 - e^{-2h}), h = lambda_s - lambda_t > 0
    (lambda = log(alpha/sigma)). Completing the square in x_s (Bayes with x_s | x_0 ~ N(alpha_s x_0, sigma_s^2)):

        A = alpha_{t|s} sigma_s^2/sigma_t^2 = (sigma_s/sigma_t) e^{-h},
        B = alpha_s sigma_{t|s}^2/sigma_t^2 = alpha_s (1 - e^{-2h}),
        C^2 = sigma_{t|s}^2 sigma_s^2/sigma_t^2 = sigma_s^2 (1 - e^{-2h}),

    written with expm1 so that no difference of close numbers is formed. On a VP schedule
    (alphabar = alpha^2, beta_t = 1 - alphabar_t/alphabar_s) these are Ho et al. (2020) eq. 7:
    A = sqrt(1 - beta_t)(1 - alphabar_s)/(1 - alphabar_t), B = sqrt(alphabar_s) beta_t/(1 - alphabar_t),
    C^2 = beta~_t = (1 - alphabar_s) beta_t/(1 - alphabar_t).
    """
    t = torch.as_tensor(grid, dtype=torch.float64)
    lam, alpha, sigma = schedule.lam(t), schedule.alpha(t), schedule.sigma(t)
    h = lam[1:] - lam[:-1]
    q = -torch.expm1(-2.0 * h)
    A = sigma[1:] / sigma[:-1] * torch.exp(-h)
    B = alpha[1:] * q
    C = sigma[1:] * torch.sqrt(q)
    return A.tolist(), B.tolist(), C.tolist()


@register("ddpm_ancestral", family="sde", order=1, stochastic=True, nfe_per_step=1,
          description="DDPM ancestral sampling x_s ~ q(x_s | x_t, x0_hat) on any grid (Ho et al. 2020 Alg. 2)")
def ddpm_ancestral(field, x, grid, *, noise=None, generator=None, callback=None, progress=False):
    r"""DDPM ancestral sampling (Ho et al. 2020 Alg. 2) generalised to any grid and schedule:

        x_s = mu~(x_t, x0_hat) + C z = A x_t + B D(x_t, t) + C z,    t = t_i, s = t_{i+1},

    with the exact Gaussian posterior q(x_s | x_t, x_0) of ``ddpm_posterior_coefficients`` (posterior
    variance beta~, not beta: Ho et al.'s other choice sigma^2 = beta is not DDIM with eta = 1). Equal to
    DDIM with eta = 1 and the same noise (Song, Meng & Ermon 2021 eq. 16). The last step lands on t_min with posterior noise
    C_{N-1} > 0 (Alg. 2's noise-free last step to t = 0 is ``final='denoise'``). NFE = N; normal draws
    K = N (noise[i] is z for step i).
    """
    n = len(grid) - 1
    A, B, C = ddpm_posterior_coefficients(field.schedule, grid)
    z = _noise_source("ddpm_ancestral", noise, n, x, generator)
    times = grid.to(torch.float64)
    for i in step_iter(n, progress, "ddpm_ancestral"):
        x0 = field.denoiser(x, times[i])
        x_new = x.mul(A[i])
        x_new.add_(x0, alpha=B[i])
        x_new.add_(z(i), alpha=C[i])
        x = x_new
        if callback is not None:
            callback(i + 1, x)
    return x, {"noise": "given" if noise is not None else "drawn", "noise_draws": n}


# ------------------------------------------------------------------------------------------------
# EDM stochastic sampler


@register("edm_sde", family="sde", order=2, stochastic=True, nfe_per_step=2, nfe_of_steps=lambda n: 2 * n - 1,
          min_steps=1, description="EDM stochastic sampler (Karras et al. 2022 Alg. 2): churn + Heun, last step Euler")
def edm_sde(field, x, grid, *, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, noise=None,
            generator=None, callback=None, progress=False):
    r"""EDM stochastic sampler (Karras et al. 2022 Alg. 2) in the coordinates xbar = x/alpha,
    sigmabar = sigma/alpha = e^{-lambda}, in which every schedule's PF-ODE is d xbar/d sigmabar = eps_hat
    (ode.py coords='edm'; for the EDM schedule alpha = 1 and sigmabar = t, so this is EDM's sampler itself):

        gamma_i    = min(S_churn/N, sqrt(2) - 1) if S_min <= sigmabar_i <= S_max else 0
        sigmabar^  = min(sigmabar_i (1 + gamma_i), sigmabar(t_max)),   t^ = t(lambda = -log sigmabar^)
        xbar^      = xbar_i + sqrt(sigmabar^2 - sigmabar_i^2) S_noise z_i
        d          = eps_hat(alpha(t^) xbar^, t^)
        xbar_{i+1} = xbar^ + (sigmabar_{i+1} - sigmabar^) d                               (Euler)
        xbar_{i+1} = xbar^ + (sigmabar_{i+1} - sigmabar^) (d + eps_hat(x_{i+1}, t_{i+1}))/2   (Heun, i < N-1)

    The clip of sigmabar^ at sigmabar(t_max) keeps t^ inside the schedule's range (the exact score is not
    defined above t_max); it removes the churn of the first step when grid[0] = t_max. The last step is
    Euler as in EDM (whose last step goes to sigma = 0); here it ends at t_min. ``noise[i]`` is z_i (used
    only at steps where churn is active). With S_churn = 0 this is ``heun`` with coords='edm' exactly.
    NFE = 2N - 1. Normal draws: K = N when S_churn > 0 (noise[i] belongs to step i, unused where churn is
    inactive; ``info["churned_steps"]`` counts the used ones), K = 0 when S_churn = 0.
    """
    for nm, v in (("S_churn", S_churn), ("S_noise", S_noise), ("S_min", S_min)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"edm_sde: {nm} must be a finite number >= 0, got {nm}={v!r}")
    if not (isinstance(S_max, (int, float)) and S_max >= S_min):
        raise ValueError(f"edm_sde: need S_max >= S_min, got S_min={S_min!r}, S_max={S_max!r}")
    sch = field.schedule
    n = len(grid) - 1
    times = grid.to(torch.float64)
    sbar = torch.exp(-sch.lam(times)).tolist()
    alpha = sch.alpha(times).tolist()
    sbar_max = float(torch.exp(-sch.lam(torch.tensor(sch.t_max, dtype=torch.float64))))
    churn = min(S_churn / n, math.sqrt(2.0) - 1.0)
    z = _noise_source("edm_sde", noise, n, x, generator) if S_churn > 0 else None
    xbar = x / alpha[0]
    churned = 0
    for i in step_iter(n, progress, "edm_sde"):
        s_i = sbar[i]
        gam = churn if S_min <= s_i <= S_max else 0.0
        s_hat = min(s_i * (1.0 + gam), sbar_max)
        if s_hat > s_i:
            t_hat = sch.t_from_lam(torch.tensor(-math.log(s_hat), dtype=torch.float64)).clamp(max=sch.t_max)
            a_hat = float(sch.alpha(t_hat))
            xbar = xbar + (math.sqrt(s_hat * s_hat - s_i * s_i) * S_noise) * z(i)
            churned += 1
        else:
            s_hat, t_hat, a_hat = s_i, times[i], alpha[i]
        d = field.eps(xbar * a_hat, t_hat)
        dt = sbar[i + 1] - s_hat
        x_next = xbar + dt * d
        if i < n - 1:
            d2 = field.eps(x_next * alpha[i + 1], times[i + 1])
            x_next = xbar + dt * (0.5 * d + 0.5 * d2)
        xbar = x_next
        if callback is not None:
            callback(i + 1, xbar * alpha[i + 1])
    return xbar * alpha[-1], {"S_churn": S_churn, "S_min": S_min, "S_max": S_max, "S_noise": S_noise,
                              "churned_steps": churned, "noise_draws": n if S_churn > 0 else 0}


# ------------------------------------------------------------------------------------------------
# torchsde backends


def make_brownian(grid: torch.Tensor, shape, *, dtype=torch.float64, device=None, generator=None,
                  entropy: int | None = None, levy_area: str = "none"):
    r"""A ``torchsde.BrownianInterval`` on u = -t in [-grid[0], -grid[-1]] (the time in which the reverse SDE is
    integrated), batch shape ``shape`` = (batch, prod(data_shape)).

    ``entropy`` (an int) fixes the path; by default it is drawn from ``generator`` (or torch's global
    generator), so the path is reproducible from the generator's seed. Pass the result as the ``bm`` option of
    method "torchsde" to drive two samplers with the same path; its increments over the grid,
    (W(u_{i+1}) - W(u_i))/sqrt(u_{i+1} - u_i), are the ``noise`` that makes "em" take the same path.
    """
    import torchsde

    g = torch.as_tensor(grid, dtype=torch.float64)
    if entropy is None:
        entropy = int(torch.randint(0, 2**62, (1,), generator=generator))
    du = float((g[:-1] - g[1:]).mean())
    return torchsde.BrownianInterval(t0=float(-g[0]), t1=float(-g[-1]), size=tuple(shape), dtype=dtype,
                                     device=device, entropy=entropy, dt=du, levy_area_approximation=levy_area)


def brownian_increments(bm, grid: torch.Tensor, x_shape) -> torch.Tensor:
    """noise[i] = (W(u_{i+1}) - W(u_i))/sqrt(u_{i+1} - u_i), u = -t, reshaped to (N, *x_shape)."""
    u = (-torch.as_tensor(grid, dtype=torch.float64)).tolist()
    return torch.stack([bm(u[i], u[i + 1]) / math.sqrt(u[i + 1] - u[i]) for i in range(len(u) - 1)]).reshape(
        len(u) - 1, *x_shape)


class _ReverseSDE(torch.nn.Module):
    r"""The reverse SDE family as a torchsde SDE in the step-index time tau (tau = i at t = t_i).

    On step i, u = -t = u_i + (tau - i) du_i with du_i = t_i - t_{i+1}, so dtau = du/du_i and the SDE in tau is

        dy = -[f x - (1+gamma^2)/2 g^2 s](t(tau)) du_i dtau + gamma g(t(tau)) sqrt(du_i) dB(tau),

    with B(tau) = (W(u) - W(u_i))/sqrt(du_i) the rescaled u-time Brownian path (``_StepTimeBrownian``). A
    fixed step dtau = 1 lands on every grid time exactly (integers are exact in float64), and Euler in tau is
    term by term Euler-Maruyama on the grid in u. The step i is the interval of the last Brownian query (every
    torchsde solver queries the increment of the step before evaluating inside it).

    A one-entry cache of the last drift evaluation (keyed by tau and the identity/version of y) makes
    torchsde's shape probe in ``sdeint`` (it calls f(ts[0], y0)) free: the first step evaluates the same drift,
    and SRA1 re-evaluates its first stage.
    """

    def __init__(self, field, grid, gamma_fn, data_shape, sde_type, noise_type):
        super().__init__()
        self.sde_type, self.noise_type = sde_type, noise_type
        self.field, self.data_shape = field, tuple(data_shape)
        self.sch = field.schedule
        self.gamma_fn = gamma_fn
        t = grid.to(torch.float64)
        self.t = t
        self.t_list = t.tolist()
        self.du = (t[:-1] - t[1:]).tolist()
        gam = _gamma_values(gamma_fn, t, "torchsde")
        g2, f, sig = self.sch.g2(t), self.sch.f(t), self.sch.sigma(t)
        self.node = list(zip(f.tolist(), (0.5 * (1 + gam * gam) * g2 / sig).tolist(), (gam * torch.sqrt(g2)).tolist()))
        self.step = 0
        self._cache = None

    def _coeffs(self, tau):
        """(t, f, (1+gamma^2)/2 g^2/sigma, gamma g, du) at solver time tau within the current step."""
        i = self.step
        theta = float(tau) - i
        if not (-1e-9 <= theta <= 1.0 + 1e-9):
            i = min(max(int(math.floor(float(tau))), 0), len(self.du) - 1)
            theta = float(tau) - i
        du = self.du[i]
        if theta == 0.0 or theta == 1.0:
            j = i + int(theta)
            return self.t[j], *self.node[j], du
        t = torch.tensor(self.t_list[i] - theta * du, dtype=torch.float64)
        gam = float(self.gamma_fn(t.reshape(1))[0])
        g2, f, sig = float(self.sch.g2(t)), float(self.sch.f(t)), float(self.sch.sigma(t))
        return t, f, 0.5 * (1 + gam * gam) * g2 / sig, gam * math.sqrt(g2), du

    def f(self, tau, y):
        key = (float(tau), self.step)
        c = self._cache
        if c is not None and c[0] == key and c[1] is y and c[2] == y._version:
            return c[3]
        t, f, k, _, du = self._coeffs(tau)
        x = y.reshape(y.shape[0], *self.data_shape)
        eps = self.field.eps(x, t).reshape(y.shape)
        # -du [f x + (1+gamma^2)/2 g^2 eps/sigma]: minus the t-drift (s = -eps/sigma), times du/dtau
        out = y.mul(-f * du)
        out.add_(eps, alpha=-k * du)
        self._cache = (key, y, y._version, out)
        return out

    def g_prod(self, tau, y, v):  # g(tau) v without forming the (batch, d, d) additive-noise matrix
        _, _, _, gg, du = self._coeffs(tau)
        return v * (gg * math.sqrt(du))


class _ReverseSDEDiagonal(_ReverseSDE):
    """The same SDE with diagonal noise: g(tau, y) is the (batch, channels) diagonal (reversible_heun needs g)."""

    def g(self, tau, y):
        _, _, _, gg, du = self._coeffs(tau)
        return torch.full_like(y, gg * math.sqrt(du))


def _step_brownian_class():
    import torchsde

    class _StepTimeBrownian(torchsde.BaseBrownian):
        """Brownian motion in the step-index time tau built from a u-time ``bm``: on step i,
        B(tau_b) - B(tau_a) = (W(u(tau_b)) - W(u(tau_a)))/sqrt(du_i), and the space-time Levy area term
        U = int (B - B(tau_a)) dtau = U_u / du_i^{3/2} (Brownian scaling). Sets the SDE's current step."""

        def __init__(self, bm, u, sde):
            self.bm, self.u, self.sde = bm, u, sde

        def __call__(self, ta, tb=None, return_U=False, return_A=False):
            if tb is None or return_A:
                raise NotImplementedError("only interval queries without Levy area A are supported")
            ta, tb = float(ta), float(tb)
            i = min(max(int(math.floor(ta + 1e-9)), 0), len(self.u) - 2)
            if tb > i + 1 + 1e-9:
                raise RuntimeError(f"Brownian query [{ta}, {tb}] spans more than one grid step")
            du = self.u[i + 1] - self.u[i]

            def u_of(tau):
                th = tau - i
                return self.u[i] if th <= 0.0 else (self.u[i + 1] if th >= 1.0 else self.u[i] + th * du)

            self.sde.step = i
            out = self.bm(u_of(ta), u_of(tb), return_U=return_U)
            if return_U:
                return out[0] / math.sqrt(du), out[1] / du ** 1.5
            return out / math.sqrt(du)

        def __repr__(self):
            return f"_StepTimeBrownian({self.bm!r})"

        @property
        def dtype(self):
            return self.bm.dtype

        @property
        def device(self):
            return self.bm.device

        @property
        def shape(self):
            return self.bm.shape

        @property
        def levy_area_approximation(self):
            return self.bm.levy_area_approximation

    return _StepTimeBrownian


@register("torchsde", family="sde", order=1, stochastic=True, nfe_per_step=1,
          description="the reverse SDE family through torchsde.sdeint (sde_solver euler/milstein/srk/reversible_heun)")
def torchsde_sampler(field, x, grid, *, gamma=1.0, sde_solver="euler", bm=None, generator=None, callback=None,
                     progress=False):
    r"""The marginal-preserving reverse SDE dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW_bar solved by
    ``torchsde.sdeint`` (Li et al. 2020; Kidger et al. 2021), one solver step per grid interval.

    Time: torchsde needs strictly increasing times, so the reverse SDE is written in u = -t, and the solver runs in the step-index time tau (tau = i at t = t_i, u
    linear in tau on each step, see ``_ReverseSDE``) with dt = 1 and float64 ts: torchsde's fixed-step loop
    advances curr_t += dt and clips only at ts[-1], so with ts = -grid and dt = the spacing it cannot land on
    the points of a non-uniform grid, and even on a uniform grid float rounding makes it take an extra sliver
    step (measured: N = 10 and 1000 uniform steps gave N + 1 solver steps). The Brownian path stays in u:
    ``bm`` (optional) is a ``torchsde.BrownianInterval`` over [-grid[0], -grid[-1]] supplied by the caller
    (``make_brownian``), so two samplers can share one path; otherwise one is built from entropy drawn from
    ``generator`` (reproducible).

    ``sde_solver`` (default "euler", weak order 1, strong order 1 here since the noise is additive):

        euler            Ito, additive noise; Euler-Maruyama, NFE = N; the same path as method "em" when
                         driven by the same Brownian increments.
        milstein         Ito, additive; the Milstein correction g g' vanishes (g does not depend on x), so
                         it is Euler-Maruyama again; NFE = N.
        srk              Ito, additive noise (diffusion-vector product only, no d x d matrix); Rossler's SRA1,
                         strong order 1.5, 2 drift evaluations per step: NFE = 2N; needs a space-time Levy
                         area Brownian motion. It is torchsde's default for these noise types and costs twice
                         euler, which is why it is not the default here.
        reversible_heun  Stratonovich (equal to Ito for additive noise), diagonal; Kidger et al. 2021,
                         one new evaluation per step plus the initial one: NFE = N + 1. It carries f and g
                         across steps, so it needs a grid that is uniform in t (else ValueError).

    Noise types: "additive" is declared with the diffusion-vector product g_prod only, so no (batch, d, d)
    matrix is formed. The registered NFE (N) is euler's; ``sample`` reports the measured count for every solver. The state
    is flattened to (batch, prod(data_shape)) for torchsde. The global torch RNG is left untouched
    (torchsde's shape probe draws from it; that draw is made inside ``torch.random.fork_rng``).
    """
    import torchsde

    if sde_solver not in TORCHSDE_SOLVERS:
        raise ValueError(f"torchsde: sde_solver must be one of {sorted(TORCHSDE_SOLVERS)}, got {sde_solver!r}")
    sde_type, noise_type, _ = TORCHSDE_SOLVERS[sde_solver]
    gamma_fn = _gamma_fn(gamma, "torchsde")
    n = len(grid) - 1
    t = grid.to(torch.float64)
    du = t[:-1] - t[1:]
    if sde_solver == "reversible_heun" and n > 1 and float((du - du.mean()).abs().max()) > 1e-9 * float(du.mean()):
        raise ValueError(f"torchsde: sde_solver='reversible_heun' needs a grid uniform in t; steps range over "
                         f"[{float(du.min())!r}, {float(du.max())!r}]")
    batch = x.shape[0]
    dim = int(math.prod(x.shape[1:]))
    levy = "space-time" if sde_solver == "srk" else "none"
    if bm is None:
        bm = make_brownian(t, (batch, dim), dtype=x.dtype, device=x.device, generator=generator, levy_area=levy)
    else:
        if tuple(bm.shape) != (batch, dim):
            raise ValueError(f"torchsde: bm must have shape (batch, prod(data_shape)) = {(batch, dim)}, "
                             f"got {tuple(bm.shape)}")
        start, end = getattr(bm, "_start", None), getattr(bm, "_end", None)
        if start is not None and (start > -float(t[0]) + 1e-12 or end < -float(t[-1]) - 1e-12):
            raise ValueError(f"torchsde: bm must cover u = -t in [{-float(t[0])!r}, {-float(t[-1])!r}], "
                             f"it covers [{start!r}, {end!r}]")
        if sde_solver == "srk" and bm.levy_area_approximation not in ("space-time", "davie", "foster"):
            raise ValueError(f"torchsde: sde_solver='srk' needs a bm with space-time Levy area, got "
                             f"levy_area_approximation={bm.levy_area_approximation!r}")
    cls = _ReverseSDEDiagonal if noise_type == "diagonal" else _ReverseSDE
    sde = cls(field, t, gamma_fn, x.shape[1:], sde_type, noise_type)
    bm_tau = _step_brownian_class()(bm, (-t).tolist(), sde)
    ts = torch.arange(n + 1, dtype=torch.float64) if callback is not None else \
        torch.tensor([0.0, float(n)], dtype=torch.float64)
    y0 = x.reshape(batch, dim)
    with torch.random.fork_rng(devices=[]):
        ys = torchsde.sdeint(sde, y0, ts, bm=bm_tau, method=sde_solver, dt=1.0, adaptive=False)
    if callback is not None:
        for i in range(1, n + 1):
            callback(i, ys[i].reshape(x.shape))
    return ys[-1].reshape(x.shape), {"sde_solver": sde_solver, "sde_type": sde_type, "noise_type": noise_type,
                                     "gamma": gamma if not callable(gamma) else "callable"}
