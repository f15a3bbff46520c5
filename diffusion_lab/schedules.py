r"""Noise schedules: small immutable objects describing the forward interpolation

    x_t = alpha(t) x_0 + sigma(t) eps,   eps ~ N(0, I),   t in [t_min, t_max],

with data at t = 0 and noise at t = t_max (the book's and score_sde's time direction).

Every schedule gives, as functions of a tensor ``t`` (float64 works and is what the theory
checks use; python floats are promoted to float64 tensors):

- ``alpha(t)``, ``sigma(t)`` and their exact derivatives ``dalpha(t)``, ``dsigma(t)``;
- the SDE coefficients of dx = f(t) x dt + g(t) dW,
      f = alpha'/alpha,    g^2 = d(sigma^2)/dt - 2 f sigma^2 = -2 sigma^2 lambda'(t);
- ``lam(t) = log(alpha/sigma)`` -- the HALF log-SNR used by DPM-Solver -- and ``log_snr(t) = 2 lam``
  (VDM / Kingma-Gao); the two are never mixed;
- ``t_from_lam(lam)``, the inverse of the strictly decreasing lam(t) (closed form where one exists);
- the valid time range ``(t_min, t_max)``; t_min is the truncation time used by samplers and may be
  lowered by constructing the schedule with another value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property
from typing import ClassVar

import torch

from ._tensor import as_tensor, interp, interp_slope

def _const(t, c: float) -> torch.Tensor:
    """c broadcast like t and still attached to t's autograd graph (so d/dt by autograd gives 0)."""
    t = as_tensor(t)
    return t * 0.0 + c


__all__ = [
    "Schedule",
    "VPLinear",
    "VPCosine",
    "SubVP",
    "VE",
    "EDM",
    "RectifiedFlow",
    "DDPMDiscrete",
    "SCHEDULES",
    "get_schedule",
]


@dataclass(frozen=True)
class Schedule:
    """Base class. Subclasses implement alpha, sigma, dalpha, dsigma (and closed forms where cheaper)."""

    t_min: float = 1e-3
    t_max: float = 1.0

    name: ClassVar[str] = "schedule"
    variance_preserving: ClassVar[bool] = False

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isfinite(v):
                raise ValueError(f"{type(self).__name__}: {f.name} must be a finite number, got {v!r}")
        lo, hi = self.domain()
        if not (lo <= self.t_min < self.t_max <= hi):
            raise ValueError(
                f"{type(self).__name__}: need {lo} <= t_min < t_max <= {hi}, got t_min={self.t_min}, "
                f"t_max={self.t_max}"
            )
        if self.sigma(self.t_min).item() <= 0 or self.alpha(self.t_max).item() <= 0:
            raise ValueError(
                f"{type(self).__name__}: sigma(t_min) and alpha(t_max) must be > 0 "
                f"(t_min={self.t_min}, t_max={self.t_max})"
            )

    # -- to be provided by subclasses -------------------------------------------------------
    def domain(self) -> tuple[float, float]:
        """Closed interval on which alpha and sigma are defined (t_min/t_max must lie inside)."""
        return (0.0, 1.0)

    def alpha(self, t):
        raise NotImplementedError

    def sigma(self, t):
        raise NotImplementedError

    def dalpha(self, t):
        raise NotImplementedError

    def dsigma(self, t):
        raise NotImplementedError

    # -- derived quantities (overridden by closed forms where they are more accurate) ---------
    def log_alpha(self, t):
        return torch.log(self.alpha(t))

    def log_sigma(self, t):
        return torch.log(self.sigma(t))

    def f(self, t):
        """Drift coefficient f(t) = d log alpha / dt."""
        return self.dalpha(t) / self.alpha(t)

    def g2(self, t):
        """Squared diffusion g(t)^2 = 2 sigma sigma' - 2 f sigma^2 (the variance ODE d sigma^2/dt = 2 f sigma^2 + g^2
        of the linear SDE dx = f x dt + g dw)."""
        s = self.sigma(t)
        return 2.0 * s * self.dsigma(t) - 2.0 * self.f(t) * s * s

    def lam(self, t):
        """Half log-SNR lambda(t) = log(alpha/sigma) (DPM-Solver's lambda)."""
        t = as_tensor(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def dlam(self, t):
        """d lambda / dt = alpha'/alpha - sigma'/sigma (< 0)."""
        return self.dalpha(t) / self.alpha(t) - self.dsigma(t) / self.sigma(t)

    def log_snr(self, t):
        """log SNR = log(alpha^2/sigma^2) = 2 lambda(t) (VDM's convention)."""
        return 2.0 * self.lam(t)

    def t_from_lam(self, lam):
        """Inverse of the strictly decreasing lambda(t): a closed-form (or bisection) first guess polished by
        two Newton steps t <- t - (lambda(t) - lam)/lambda'(t), which restores full relative precision
        where the closed form cancels (e.g. sub-VP at tiny t)."""
        lam = as_tensor(lam)
        t = self._t_from_lam_guess(lam)
        lo, hi = self.domain()
        for _ in range(2):
            step = (self.lam(t) - lam) / self.dlam(t)
            t = torch.where(torch.isfinite(step), t - step, t).clamp(lo, hi)
        return t

    def _t_from_lam_guess(self, lam):
        """Vectorised bisection in float64 (80 halvings) on the domain."""
        lo_d, hi_d = self.domain()
        hi_d = min(hi_d, 1e6)
        lo = torch.full_like(lam, max(lo_d, 1e-300), dtype=torch.float64)
        hi = torch.full_like(lam, hi_d, dtype=torch.float64)
        target = lam.to(torch.float64)
        for _ in range(80):
            mid = 0.5 * (lo + hi)
            above = self.lam(mid) > target  # lambda decreasing: root lies to the right
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return (0.5 * (lo + hi)).to(lam.dtype)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def lam_range(self) -> tuple[float, float]:
        """(lambda(t_max), lambda(t_min))."""
        return (float(self.lam(self.t_max)), float(self.lam(self.t_min)))

    def check_t(self, t, *, what: str = "t") -> None:
        """Raise ValueError naming the offending value if t lies outside [t_min, t_max]."""
        t = as_tensor(t)
        if torch.isnan(t).any():
            raise ValueError(f"{what} contains NaN")
        lo, hi = float(t.min()), float(t.max())
        tol = 1e-9 * max(1.0, abs(self.t_max))
        if lo < self.t_min - tol or hi > self.t_max + tol:
            bad = lo if lo < self.t_min - tol else hi
            raise ValueError(
                f"{what}={bad!r} is outside the valid range [{self.t_min}, {self.t_max}] of {self!r}"
            )

    def settings(self) -> dict:
        """A JSON-able description (name and constructor arguments)."""
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}


# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VPLinear(Schedule):
    r"""Variance-preserving SDE with linear beta (score_sde VPSDE, Song et al. 2021):

        beta(t) = b0 + (b1 - b0) t,   B(t) = int_0^t beta = b0 t + (b1 - b0) t^2 / 2,
        alpha = exp(-B/2),   sigma = sqrt(1 - alpha^2),   f = -beta/2,   g^2 = beta.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: ClassVar[str] = "vp"
    variance_preserving: ClassVar[bool] = True

    def __post_init__(self):
        if not (0 < self.beta_min <= self.beta_max):
            raise ValueError(f"VPLinear: need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")
        super().__post_init__()

    def domain(self):
        return (0.0, float("inf"))

    def beta(self, t):
        t = as_tensor(t)
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def B(self, t):
        t = as_tensor(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def log_alpha(self, t):
        return -0.5 * self.B(t)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.B(t)))

    def log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(-self.B(t)))

    def dalpha(self, t):
        return -0.5 * self.beta(t) * self.alpha(t)

    def dsigma(self, t):
        return 0.5 * self.beta(t) * torch.exp(-self.B(t)) / self.sigma(t)

    def f(self, t):
        return -0.5 * self.beta(t)

    def g2(self, t):
        return self.beta(t)

    def _t_from_B(self, B):
        # root of (b1-b0)/2 t^2 + b0 t - B = 0 in the cancellation-free form 2B / (b0 + sqrt(...))
        db = self.beta_max - self.beta_min
        return 2.0 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * db * B))

    def _t_from_lam_guess(self, lam):
        # alpha^2 = 1/(1+e^{-2 lam})  =>  B = -log alpha^2 = softplus(-2 lam)   (DPM-Solver inverse_lambda)
        lam = as_tensor(lam)
        return self._t_from_B(torch.nn.functional.softplus(-2.0 * lam))


@dataclass(frozen=True)
class SubVP(VPLinear):
    r"""sub-VP SDE (Song et al. 2021): alpha as VPLinear, sigma = 1 - exp(-B(t)) (so sigma^2 <= 1 - alpha^2),
    g^2 = beta(t) (1 - exp(-2 B(t))) (score_sde's ``discount``)."""

    name: ClassVar[str] = "subvp"
    variance_preserving: ClassVar[bool] = False

    def sigma(self, t):
        return -torch.expm1(-self.B(t))

    def log_sigma(self, t):
        return torch.log(-torch.expm1(-self.B(t)))

    def dsigma(self, t):
        return self.beta(t) * torch.exp(-self.B(t))

    def g2(self, t):
        return self.beta(t) * (-torch.expm1(-2.0 * self.B(t)))

    def _t_from_lam_guess(self, lam):
        # a = e^{-B/2} solves e^lam a^2 + a - e^lam = 0  =>  a = 2 e^lam / (1 + sqrt(1 + 4 e^{2 lam}))
        lam = as_tensor(lam)
        log_a = math.log(2.0) + lam - torch.log1p(torch.sqrt(1.0 + 4.0 * torch.exp(2.0 * lam)))
        return self._t_from_B(-2.0 * log_a)


@dataclass(frozen=True)
class VPCosine(Schedule):
    r"""Cosine VP schedule (Nichol & Dhariwal 2021) in continuous time:

        alpha(t) = cos(phi(t)) / cos(phi(0)),  phi(t) = (pi/2) (t + s)/(1 + s),  sigma = sqrt(1 - alpha^2).

    beta(t) = -2 d log alpha/dt = pi/(1+s) tan(phi(t)) is clipped at ``beta_max`` (999, the discrete
    schedule's clipping of beta at 0.999 per step of 1/1000) by ending time at
    t_max = (2(1+s)/pi) atan(beta_max (1+s)/pi) - s ~= 0.998 (DPM-Solver's NoiseScheduleVP computes the same
    cosine_t_max, then samples only up to T = 0.9946 for numerical safety).
    """

    s: float = 0.008
    beta_max: float = 999.0
    t_min: float = 1e-3
    t_max: float | None = None  # None -> the clipped t_max above
    name: ClassVar[str] = "cosine"
    variance_preserving: ClassVar[bool] = True

    def __post_init__(self):
        if self.s <= 0 or self.beta_max <= 0:
            raise ValueError(f"VPCosine: need s > 0 and beta_max > 0, got s={self.s}, beta_max={self.beta_max}")
        if self.t_max is None:
            object.__setattr__(self, "t_max", self.clipped_t_max)
        super().__post_init__()

    @property
    def clipped_t_max(self) -> float:
        return 2.0 * (1.0 + self.s) / math.pi * math.atan(self.beta_max * (1.0 + self.s) / math.pi) - self.s

    def domain(self):
        return (0.0, self.clipped_t_max)

    def _phi(self, t):
        return 0.5 * math.pi * (as_tensor(t) + self.s) / (1.0 + self.s)

    @property
    def _log_cos_phi0(self) -> float:
        return math.log(math.cos(0.5 * math.pi * self.s / (1.0 + self.s)))

    def log_alpha(self, t):
        return torch.log(torch.cos(self._phi(t))) - self._log_cos_phi0

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t):
        return -0.5 * math.pi / (1.0 + self.s) * torch.tan(self._phi(t))

    def dalpha(self, t):
        return self.f(t) * self.alpha(t)

    def dsigma(self, t):
        a = self.alpha(t)
        return -a * self.dalpha(t) / self.sigma(t)

    def g2(self, t):
        return -2.0 * self.f(t)

    def _t_from_lam_guess(self, lam):
        lam = as_tensor(lam)
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam)
        phi = torch.arccos(torch.exp(log_alpha + self._log_cos_phi0))
        return 2.0 * (1.0 + self.s) / math.pi * phi - self.s


@dataclass(frozen=True)
class VE(Schedule):
    r"""Variance-exploding SDE (score_sde VESDE): alpha = 1, sigma(t) = sigma_min (sigma_max/sigma_min)^t,
    f = 0, g^2 = d sigma^2/dt = 2 sigma(t)^2 ln(sigma_max/sigma_min).

    Variance convention: the kernel from clean data is N(x_0, sigma(t)^2 I), score_sde's
    ``marginal_prob`` convention, so sigma(0) = sigma_min > 0: the SDE started at t = 0 must start from the
    data convolved with N(0, sigma_min^2), not from the data itself.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-5
    t_max: float = 1.0
    name: ClassVar[str] = "ve"

    def __post_init__(self):
        if not (0 < self.sigma_min < self.sigma_max):
            raise ValueError(f"VE: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        super().__post_init__()

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return _const(t, 1.0)

    def log_alpha(self, t):
        return _const(t, 0.0)

    def log_sigma(self, t):
        return math.log(self.sigma_min) + as_tensor(t) * self._log_ratio

    def sigma(self, t):
        return torch.exp(self.log_sigma(t))

    def dalpha(self, t):
        return _const(t, 0.0)

    def dsigma(self, t):
        return self.sigma(t) * self._log_ratio

    def f(self, t):
        return _const(t, 0.0)

    def g2(self, t):
        return 2.0 * self.sigma(t) ** 2 * self._log_ratio

    def _t_from_lam_guess(self, lam):
        return (-as_tensor(lam) - math.log(self.sigma_min)) / self._log_ratio


@dataclass(frozen=True)
class EDM(Schedule):
    r"""EDM (Karras et al. 2022) with s(t) = 1, sigma(t) = t: alpha = 1, sigma = t, f = 0, g^2 = 2t,
    PF-ODE dx/dt = (x - D(x; t))/t. Time is sigma, t in [sigma_min, sigma_max] = [0.002, 80]."""

    t_min: float = 0.002
    t_max: float = 80.0
    name: ClassVar[str] = "edm"

    def domain(self):
        return (0.0, float("inf"))

    def alpha(self, t):
        return _const(t, 1.0)

    def log_alpha(self, t):
        return _const(t, 0.0)

    def sigma(self, t):
        return as_tensor(t) * 1.0

    def dalpha(self, t):
        return _const(t, 0.0)

    def dsigma(self, t):
        return _const(t, 1.0)

    def f(self, t):
        return _const(t, 0.0)

    def g2(self, t):
        return 2.0 * as_tensor(t)

    def _t_from_lam_guess(self, lam):
        return torch.exp(-as_tensor(lam))


@dataclass(frozen=True)
class RectifiedFlow(Schedule):
    r"""Linear interpolant / rectified flow / conditional-OT flow matching with data at t = 0:
    alpha = 1 - t, sigma = t, f = -1/(1-t), g^2 = 2t/(1-t) (singular at t = 1, so t_max < 1).

    Flow-matching codes that put the noise at t = 0 use s = 1 - t; flip time at that edge."""

    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3
    name: ClassVar[str] = "rf"

    def alpha(self, t):
        return 1.0 - as_tensor(t)

    def sigma(self, t):
        return as_tensor(t) * 1.0

    def dalpha(self, t):
        return -_const(t, 1.0)

    def dsigma(self, t):
        return _const(t, 1.0)

    def log_alpha(self, t):
        return torch.log1p(-as_tensor(t))

    def f(self, t):
        return -1.0 / (1.0 - as_tensor(t))

    def g2(self, t):
        t = as_tensor(t)
        return 2.0 * t / (1.0 - t)

    def _t_from_lam_guess(self, lam):
        return torch.sigmoid(-as_tensor(lam))


@dataclass(frozen=True)
class DDPMDiscrete(Schedule):
    r"""The discrete DDPM schedule (Ho et al. 2020) of N betas, linear from beta_min/N to beta_max/N
    (1e-4 .. 0.02 for N = 1000, score_sde's ``discrete_betas``), with alphabar_i = prod_{j<=i} (1 - beta_j).

    Mapping to continuous time (as DPM-Solver's NoiseScheduleVP('discrete')): step i = 1..N sits at
    t_i = i/N and log alpha(t) is the piecewise-linear interpolant of (t_i, log sqrt(alphabar_i)) with
    (t_0, 0) added, so alpha(0) = 1. Its derivatives are those of the interpolant (piecewise constant
    f), and sigma = sqrt(1 - alpha^2). A diffusers timestep k (0-based) corresponds to i = k + 1.
    """

    n_steps: int = 1000
    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    t_max: float = 1.0
    name: ClassVar[str] = "ddpm"
    variance_preserving: ClassVar[bool] = True

    def __post_init__(self):
        if int(self.n_steps) != self.n_steps or self.n_steps < 2:
            raise ValueError(f"DDPMDiscrete: n_steps must be an integer >= 2, got {self.n_steps!r}")
        if not (0 < self.beta_min <= self.beta_max < self.n_steps):
            raise ValueError(f"DDPMDiscrete: need 0 < beta_min <= beta_max < n_steps, got {self.beta_min}, {self.beta_max}")
        super().__post_init__()

    @cached_property
    def betas(self) -> torch.Tensor:
        n = self.n_steps
        return torch.linspace(self.beta_min / n, self.beta_max / n, n, dtype=torch.float64)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1.0 - self.betas, 0)

    @cached_property
    def _knots(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(self.n_steps + 1, dtype=torch.float64) / self.n_steps
        log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.cumsum(torch.log1p(-self.betas), 0)])
        return t, log_alpha

    def _k(self, t):
        kt, kl = self._knots
        return kt.to(t.device, t.dtype), kl.to(t.device, t.dtype)

    def knots(self) -> list[float]:
        """Times i/N where the piecewise-linear log alpha has kinks."""
        return [i / self.n_steps for i in range(self.n_steps + 1)]

    def t_of_index(self, i):
        """Continuous time of the 1-based DDPM step i (diffusers timestep i - 1)."""
        return as_tensor(i) / self.n_steps

    def log_alpha(self, t):
        t = as_tensor(t)
        kt, kl = self._k(t)
        return interp(t, kt, kl)

    def alpha(self, t):
        return torch.exp(self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def log_sigma(self, t):
        return 0.5 * torch.log(-torch.expm1(2.0 * self.log_alpha(t)))

    def f(self, t):
        t = as_tensor(t)
        kt, kl = self._k(t)
        return interp_slope(t, kt, kl)

    def dalpha(self, t):
        return self.f(t) * self.alpha(t)

    def dsigma(self, t):
        return -self.alpha(t) * self.dalpha(t) / self.sigma(t)

    def g2(self, t):
        return -2.0 * self.f(t)

    def _t_from_lam_guess(self, lam):
        lam = as_tensor(lam)
        kt, kl = self._k(lam)
        log_alpha = -0.5 * torch.nn.functional.softplus(-2.0 * lam)
        return interp(-log_alpha, -kl, kt)


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (VPLinear, VPCosine, SubVP, VE, EDM, RectifiedFlow, DDPMDiscrete)
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """Build a schedule by name (``vp``, ``cosine``, ``subvp``, ``ve``, ``edm``, ``rf``, ``ddpm``)."""
    try:
        cls = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    return cls(**kwargs)
