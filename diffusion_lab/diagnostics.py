r"""Score-error diagnostics of any field on an exact target: where (in t and in x) a learned score is wrong, what that
costs in KL, and how much of a sampler's error is the network's.

The time profile. For a field with score s_theta and an exact target with noised marginals p_t,

    e(t) = E_{x ~ p_t} || s_theta(x, t) - grad log p_t(x) ||^2,

estimated by Monte Carlo from n exact samples of p_t (``GaussianMixture.marginal``), with standard error
SE = std_i ||.||^2 / sqrt(n). Since eps_hat = -sigma s and D = (x + sigma^2 s)/alpha at fixed (x, t), the same error in
the eps and x0 parameterisations is

    e_eps(t) = sigma_t^2 e(t),        e_x0(t) = (sigma_t^4 / alpha_t^2) e(t).

Weighted integrals I_w = int_{t_min}^{t_max} w(t) e(t) dt (``SCORE_WEIGHTINGS``): w = g^2 (likelihood weighting: half of
it is the score term of the KL bound below; Song, Durkan, Murray & Ermon 2021, Thm 1), w = 1 (score matching), w =
sigma^2 (eps matching, the "simple" loss of Ho et al. 2020), w = sigma^4/alpha^2 (x0 matching). The default times are
Gauss-Legendre nodes in lambda = log(alpha/sigma), where the integrands are smooth; dt = d lambda / |lambda'(t)|.

The KL bound. The reverse SDE dx = [f x - g^2 s_theta] dt + g dW_bar started from a law pi at t_max has a law q_theta at
t_min with (Song, Durkan, Murray & Ermon 2021, Thm 1, by Girsanov's theorem and data processing)

    KL(p_{t_min} || q_theta) <= KL(p_{t_max} || pi) + 1/2 int_{t_min}^{t_max} g(t)^2 e(t) dt.

Equality holds when s_theta is the exact score of another law q noised by the same forward SDE and pi = q_{t_max}:
then d/dt KL(p_t || q_t) = -1/2 g^2 E_{p_t} ||grad log p_t - grad log q_t||^2 (the de Bruijn-type identity behind the
theorem; Lyu 2009), which makes a sharp test of the factor 1/2 and of the weight g^2. ``kl_bound`` computes the left
side independently, from the Fokker-Planck solution of the field's reverse SDE (``fokker_planck.solve_reverse``) against
the exact density on the same grid (1-D and 2-D targets).

The error decomposition. For a sampler at NFE K with output law q_K, the network's converged law q_inf (the same field
solved by the adaptive Dormand-Prince solver) and the exact law p, the MMD (a metric) obeys

    MMD(q_K, p) <= MMD(q_inf, p) + MMD(q_K, q_inf)      (total <= network + discretisation),

each term estimated by an unbiased MMD^2 with its standard error (``metrics.mmd2_exact`` against the exact law, and the
paired two-sample U-statistic ``mmd2_two_sample`` between the sampler's and the adaptive solve's outputs from the same
starts), with the kernel bandwidth of the exact law (``metrics.mmd_bandwidth``).

No plotting and no file I/O here: ``diffusion-lab diagnose`` and ``experiments/score_error.py`` write the files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field
from typing import Callable

import numpy as np
import torch

from ._tensor import as_tensor, bcast
from .field import VelocityField
from .schedules import Schedule
from .targets import Gaussian, GaussianMixture

__all__ = [
    "SCORE_WEIGHTINGS", "score_weight", "gauss_legendre_times", "ScoreErrorProfile", "score_error_profile",
    "pointwise_score_error", "ErrorMap", "error_map", "PerturbedScoreModel", "perturbed_field",
    "linear_perturbation", "linear_perturbation_error", "kl_monte_carlo", "KLBound", "kl_bound",
    "mmd2_two_sample", "decompose_sampler_error", "rank_samplers", "ranking_agreement", "kendall_tau",
    "ranking_kendall",
]

SCORE_WEIGHTINGS = ("likelihood", "score", "eps", "x0")


def _t64(t) -> torch.Tensor:
    return as_tensor(t).to(torch.float64)


def score_weight(weighting, schedule: Schedule, t) -> torch.Tensor:
    r"""The weight w(t) of a score-error integral int w(t) e(t) dt.

    Parameters
    ----------
    weighting : str or callable
        ``"likelihood"``: w = g(t)^2 (Song, Durkan, Murray & Ermon 2021); ``"score"``: w = 1; ``"eps"``:
        w = sigma_t^2 (eps matching: ||eps_hat - eps*||^2 = sigma^2 ||s_theta - s||^2); ``"x0"``:
        w = sigma_t^4/alpha_t^2
        (x0 matching: ||D_theta - D||^2 = sigma^4/alpha^2 ||s_theta - s||^2); or a callable (schedule, t) -> w.
    schedule : Schedule
    t : float or tensor
        Times in [t_min, t_max].

    Returns
    -------
    torch.Tensor
        w(t) in float64, shaped like t.
    """
    t = _t64(t)
    if callable(weighting):
        return as_tensor(weighting(schedule, t)).to(torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    if weighting == "likelihood":
        return schedule.g2(t)
    if weighting == "score":
        return torch.ones_like(s)
    if weighting == "eps":
        return s * s
    if weighting == "x0":
        return s ** 4 / (a * a)
    raise ValueError(f"unknown score-error weighting {weighting!r}; choose one of {SCORE_WEIGHTINGS} or a callable")


def gauss_legendre_times(schedule: Schedule, n: int = 24, t_min: float | None = None, t_max: float | None = None):
    r"""Gauss-Legendre nodes in lambda = log(alpha/sigma) on [lambda(t_max), lambda(t_min)] mapped to t, with the
    weights of int h(t) dt = int h(t(lambda)) / |lambda'(t(lambda))| d lambda.

    Parameters
    ----------
    schedule : Schedule
    n : int
        Number of nodes (exact for polynomials in lambda of degree 2n - 1).
    t_min, t_max : float, optional
        The range (default the schedule's).

    Returns
    -------
    (t, w) : two float64 tensors of shape (n,), t increasing; sum_i w_i h(t_i) ~ int h dt.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    lo_t = schedule.t_min if t_min is None else float(t_min)
    hi_t = schedule.t_max if t_max is None else float(t_max)
    if not lo_t < hi_t:
        raise ValueError(f"need t_min < t_max, got {lo_t} and {hi_t}")
    schedule.check_t(torch.tensor([lo_t, hi_t], dtype=torch.float64))
    lam_hi, lam_lo = float(schedule.lam(_t64(lo_t))), float(schedule.lam(_t64(hi_t)))
    u, wu = np.polynomial.legendre.leggauss(int(n))
    lam = torch.tensor(0.5 * (lam_hi + lam_lo) + 0.5 * (lam_hi - lam_lo) * u, dtype=torch.float64)
    t = schedule.t_from_lam(lam).clamp(lo_t, hi_t)
    w = torch.tensor(0.5 * (lam_hi - lam_lo) * wu, dtype=torch.float64) / schedule.dlam(t).abs()
    order = torch.argsort(t)
    return t[order], w[order]


def _trapezoid_weights(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """Trapezoid weights in lambda over the given (sorted) times, mapped to dt = d lambda / |lambda'|."""
    if t.numel() < 2:
        return torch.zeros_like(t)
    lam = schedule.lam(t)
    d = (lam[:-1] - lam[1:]).abs()
    w = torch.zeros_like(t)
    w[:-1] += 0.5 * d
    w[1:] += 0.5 * d
    return w / schedule.dlam(t).abs()


# ------------------------------------------------------------------------------------------------
# the time profile e(t)

def _check_pair(field: VelocityField, target: GaussianMixture) -> None:
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField, got {type(field).__name__}")
    if not isinstance(target, GaussianMixture):
        raise TypeError(f"target must be an exact GaussianMixture target, got {type(target).__name__}")
    shape = field.data_shape
    if shape is not None and int(np.prod(shape)) != target.dim:
        raise ValueError(f"the field's data shape {shape} does not match the target's dimension {target.dim}")


@torch.no_grad()
def pointwise_score_error(field: VelocityField, target: GaussianMixture, x, t, *, batch: int = 1 << 14):
    r"""||s_theta(x, t) - grad log p_t(x)||^2 at the rows of x (scalar t).

    Parameters
    ----------
    field : VelocityField
        The field whose score s_theta = field.score is measured (one NFE per batch).
    target : GaussianMixture
        The exact target; grad log p_t is its closed-form score under ``field.schedule``.
    x : tensor (n, d)
    t : float
    batch : int
        Points per field evaluation.

    Returns
    -------
    torch.Tensor
        (n,) float64 squared errors.
    """
    _check_pair(field, target)
    x = as_tensor(x).to(torch.float64)
    sch = field.schedule
    tt = _t64(float(t))
    out = torch.empty(x.shape[0], dtype=torch.float64)
    shape = field.data_shape
    for i in range(0, x.shape[0], batch):
        xb = x[i:i + batch]
        s_true = target.score(xb, tt, sch)
        xin = xb.reshape(xb.shape[0], *shape) if shape is not None else xb
        s_hat = field.score(xin, tt).reshape(xb.shape[0], -1).to(torch.float64)
        out[i:i + batch] = (s_hat - s_true).pow(2).sum(1)
    return out


@dataclass(frozen=True)
class ScoreErrorProfile:
    r"""e(t) = E_{p_t} ||s_theta - grad log p_t||^2 at the times ``t`` with standard errors ``se`` (n samples each).

    ``quad_weights`` w_i integrate over [t[0], t[-1]]: int h(t) dt ~ sum_i w_i h(t_i) (Gauss-Legendre in lambda by
    default). ``alpha``, ``sigma``, ``g2`` are the schedule's coefficients at ``t``."""

    t: torch.Tensor
    e: torch.Tensor
    se: torch.Tensor
    n: int
    quad_weights: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor
    g2: torch.Tensor
    schedule: Schedule = dc_field(repr=False)
    quadrature: str = "gauss-legendre in lambda"

    @property
    def e_eps(self) -> torch.Tensor:
        """E ||eps_hat - eps*||^2 = sigma_t^2 e(t)."""
        return self.sigma ** 2 * self.e

    @property
    def se_eps(self) -> torch.Tensor:
        return self.sigma ** 2 * self.se

    @property
    def e_x0(self) -> torch.Tensor:
        """E ||D_theta - D||^2 = sigma_t^4 / alpha_t^2 e(t)."""
        return self.sigma ** 4 / self.alpha ** 2 * self.e

    @property
    def se_x0(self) -> torch.Tensor:
        return self.sigma ** 4 / self.alpha ** 2 * self.se

    def integral(self, weighting="likelihood") -> tuple[float, float]:
        r"""(I_w, SE) with I_w = int w(t) e(t) dt ~ sum_i q_i w(t_i) e(t_i) and SE = sqrt(sum_i (q_i w_i SE_i)^2)
        (independent samples per time; the quadrature error is not included).

        Parameters
        ----------
        weighting : str or callable
            See ``score_weight``.

        Returns
        -------
        (float, float)
        """
        w = self.quad_weights * score_weight(weighting, self.schedule, self.t)
        return float((w * self.e).sum()), float(((w * self.se) ** 2).sum().sqrt())

    def kl_score_term(self) -> tuple[float, float]:
        r"""(1/2 int g^2 e dt, SE): the score term of the KL bound (Song, Durkan, Murray & Ermon 2021, Thm 1)."""
        v, se = self.integral("likelihood")
        return 0.5 * v, 0.5 * se

    def integrals(self) -> dict:
        """Every ``SCORE_WEIGHTINGS`` integral with its SE, as a JSON-able dict."""
        out = {}
        for name in SCORE_WEIGHTINGS:
            v, se = self.integral(name)
            out[name] = {"value": v, "se": se}
        return out

    def rows(self) -> list[dict]:
        """One dict per time: t, lambda, e, se, e_eps, e_x0 (for CSV / JSON)."""
        lam = self.schedule.lam(self.t)
        return [{"t": float(self.t[i]), "lambda": float(lam[i]), "e": float(self.e[i]), "se": float(self.se[i]),
                 "e_eps": float(self.e_eps[i]), "se_eps": float(self.se_eps[i]), "e_x0": float(self.e_x0[i]),
                 "se_x0": float(self.se_x0[i]), "g2": float(self.g2[i]), "quad_weight": float(self.quad_weights[i])}
                for i in range(self.t.numel())]


def score_error_profile(field: VelocityField, target: GaussianMixture, times=None, *, n_times: int = 24,
                        n: int = 2000, seed: int = 0, t_min: float | None = None, t_max: float | None = None,
                        batch: int = 1 << 14) -> ScoreErrorProfile:
    r"""The score-error profile e(t) = E_{x ~ p_t} ||s_theta(x, t) - grad log p_t(x)||^2 with its Monte-Carlo SE.

    At each time, n exact samples x_i ~ p_t (``target.marginal(schedule, t)``) give
    e_hat = mean_i ||s_theta(x_i, t) - grad log p_t(x_i)||^2 and SE = std_i(.) / sqrt(n).

    Parameters
    ----------
    field : VelocityField
        Any field (a learned one from ``training.learned_field``, an exact or a perturbed one) on the target's space.
    target : GaussianMixture
        The exact target (its closed-form score under ``field.schedule``).
    times : sequence of float, optional
        The times (sorted here; integrals by the trapezoid rule in lambda). Default: ``n_times`` Gauss-Legendre
        nodes in lambda on [t_min, t_max] (``gauss_legendre_times``).
    n : int
        Samples per time.
    seed : int
        Seed of the samples (one generator for all times).
    t_min, t_max : float, optional
        Range of the default nodes (default the schedule's).
    batch : int
        Points per field evaluation.

    Returns
    -------
    ScoreErrorProfile
    """
    _check_pair(field, target)
    if int(n) != n or n < 2:
        raise ValueError(f"n must be an integer >= 2 (the standard error needs it), got {n!r}")
    sch = field.schedule
    if times is None:
        t, qw = gauss_legendre_times(sch, n_times, t_min, t_max)
        quad = "gauss-legendre in lambda"
    else:
        t = torch.sort(as_tensor(times).to(torch.float64).reshape(-1)).values
        if t.numel() < 1:
            raise ValueError("times must hold at least one time")
        sch.check_t(t)
        qw = _trapezoid_weights(sch, t)
        quad = "trapezoid in lambda"
    g = torch.Generator().manual_seed(int(seed))
    e = torch.empty_like(t)
    se = torch.empty_like(t)
    for i, ti in enumerate(t.tolist()):
        x = target.marginal(sch, ti).sample(int(n), g)
        err = pointwise_score_error(field, target, x, ti, batch=batch)
        e[i] = err.mean()
        se[i] = err.std() / math.sqrt(n)
    return ScoreErrorProfile(t, e, se, int(n), qw, sch.alpha(t), sch.sigma(t), sch.g2(t), sch, quad)


# ------------------------------------------------------------------------------------------------
# 2-D maps

@dataclass(frozen=True)
class ErrorMap:
    r"""||s_theta - grad log p_t||^2 at the centres of an (ny, nx) grid at time ``t`` (``err``), with log p_t there
    (``log_density``) and their product p_t ||.||^2 (``weighted``: the density of e(t) over x, which integrates to
    e(t)). ``extent`` = (x_lo, x_hi, y_lo, y_hi); rows run along y."""

    t: float
    extent: tuple
    x: np.ndarray
    y: np.ndarray
    err: np.ndarray
    log_density: np.ndarray

    @property
    def weighted(self) -> np.ndarray:
        return np.exp(self.log_density) * self.err

    def e_quadrature(self) -> float:
        """int p_t ||.||^2 dx by the midpoint rule on the map (compare with the profile's e(t))."""
        dx = (self.extent[1] - self.extent[0]) / len(self.x)
        dy = (self.extent[3] - self.extent[2]) / len(self.y)
        return float(self.weighted.sum() * dx * dy)


def error_map(field: VelocityField, target: GaussianMixture, t: float, extent=(-4.0, 4.0, -4.0, 4.0),
              cells: int = 96) -> ErrorMap:
    r"""The pointwise score error ||s_theta(x, t) - grad log p_t(x)||^2 over a 2-D box (cell centres).

    Parameters
    ----------
    field, target : see ``score_error_profile`` (the target must be 2-D).
    t : float
    extent : (x_lo, x_hi, y_lo, y_hi)
    cells : int
        Cells per axis.

    Returns
    -------
    ErrorMap
    """
    if target.dim != 2:
        raise ValueError(f"error maps are drawn for 2-D targets; this one has d={target.dim}")
    x_lo, x_hi, y_lo, y_hi = (float(v) for v in extent)
    if not (x_lo < x_hi and y_lo < y_hi):
        raise ValueError(f"extent must be (x_lo, x_hi, y_lo, y_hi) with lo < hi, got {extent!r}")
    if int(cells) != cells or cells < 2:
        raise ValueError(f"cells must be an integer >= 2, got {cells!r}")
    sch = field.schedule
    sch.check_t(_t64(float(t)))
    xs = x_lo + (np.arange(cells) + 0.5) * (x_hi - x_lo) / cells
    ys = y_lo + (np.arange(cells) + 0.5) * (y_hi - y_lo) / cells
    X, Y = np.meshgrid(xs, ys)
    pts = torch.from_numpy(np.stack([X.ravel(), Y.ravel()], 1))
    err = pointwise_score_error(field, target, pts, float(t)).numpy().reshape(cells, cells)
    lp = target.log_prob_t(pts, _t64(float(t)), sch).numpy().reshape(cells, cells)
    return ErrorMap(float(t), (x_lo, x_hi, y_lo, y_hi), xs, ys, err, lp)


# ------------------------------------------------------------------------------------------------
# perturbed exact scores (known error profiles)

class PerturbedScoreModel:
    r"""model(x, t) with score s(x, t) = grad log p_t(x) + delta(x, t): the target's exact (D, eps_hat) shifted by

        eps_hat = eps* - sigma delta,     D = D* + (sigma^2 / alpha) delta

    (the conversions eps = -sigma s and D = (x + sigma^2 s)/alpha), so its score error is exactly delta."""

    def __init__(self, target: GaussianMixture, schedule: Schedule, delta: Callable):
        from .targets import ExactModel

        if not callable(delta):
            raise TypeError(f"delta must be callable (x, t) -> tensor like x, got {type(delta).__name__}")
        self.exact = ExactModel(target, schedule, "x0")
        self.schedule, self.delta = schedule, delta

    def __repr__(self):
        return f"PerturbedScoreModel({self.exact.target.name})"

    def x0_eps(self, x, t):
        x0, eps = self.exact.x0_eps(x, t)
        d = self.delta(x, t)
        if not isinstance(d, torch.Tensor) or d.shape != x.shape:
            raise ValueError(f"delta returned {getattr(d, 'shape', type(d).__name__)}, expected x's shape "
                             f"{tuple(x.shape)}")
        tt = t.to(torch.float64)
        a, s = bcast(self.schedule.alpha(tt), x), bcast(self.schedule.sigma(tt), x)
        return (x0 + (s * s / a) * d).to(x.dtype), (eps - s * d).to(x.dtype)

    def __call__(self, x, t):
        return self.x0_eps(x, t)[0]


def perturbed_field(target: GaussianMixture, schedule: Schedule, delta: Callable) -> VelocityField:
    r"""The VelocityField whose score is grad log p_t + delta(x, t) (``PerturbedScoreModel``): a "learned" score with
    the known error delta, so e(t) = E_{p_t} ||delta(x, t)||^2."""
    return VelocityField(schedule, PerturbedScoreModel(target, schedule, delta), "x0", data_shape=target.data_shape)


def linear_perturbation(c: Callable, A=None, b=None) -> Callable:
    r"""delta(x, t) = c(t) (A x + b): the perturbation whose error has the closed form of ``linear_perturbation_error``.

    Parameters
    ----------
    c : callable
        t (tensor) -> c(t) (tensor of t's shape).
    A : (d, d) tensor, optional
        Default: the identity.
    b : (d,) tensor, optional
        Default: zero.

    Returns
    -------
    callable (x, t) -> tensor like x
    """
    def delta(x, t):
        x64 = x.to(torch.float64)
        y = x64 if A is None else x64 @ as_tensor(A).to(torch.float64).T
        if b is not None:
            y = y + as_tensor(b).to(torch.float64)
        ct = as_tensor(c(as_tensor(t, like=x64).to(torch.float64))).to(torch.float64)
        return (bcast(ct, y) * y).to(x.dtype)

    return delta


def linear_perturbation_error(target: GaussianMixture, schedule: Schedule, t: float, c: float, A=None,
                              b=None) -> float:
    r"""Closed form of E_{p_t} ||c (A x + b)||^2 = c^2 [tr(A M A^T) + 2 b^T A m + |b|^2] with the moments of
    p_t = sum_k pi_k N(alpha mu_k, C_k): m = sum_k pi_k alpha mu_k, M = sum_k pi_k (C_k + alpha^2 mu_k mu_k^T).

    Parameters
    ----------
    target, schedule : the exact target and its schedule.
    t : float
    c : float
        c(t) at this t.
    A, b : as in ``linear_perturbation``.

    Returns
    -------
    float
    """
    mix = target.marginal(schedule, float(t))
    d = target.dim
    A = torch.eye(d, dtype=torch.float64) if A is None else as_tensor(A).to(torch.float64)
    b = torch.zeros(d, dtype=torch.float64) if b is None else as_tensor(b).to(torch.float64)
    w = mix.weights
    m = (w[:, None] * mix.means).sum(0)
    M = (w[:, None, None] * (mix.covs + mix.means[:, :, None] * mix.means[:, None, :])).sum(0)
    return float(c) ** 2 * float(torch.trace(A @ M @ A.T) + 2.0 * b @ (A @ m) + b @ b)


# ------------------------------------------------------------------------------------------------
# the KL bound

def kl_monte_carlo(p: GaussianMixture, q: GaussianMixture, n: int = 20000, seed: int = 0) -> tuple[float, float]:
    r"""KL(p || q) = E_{x ~ p}[log p(x) - log q(x)] by Monte Carlo with its SE (both laws at t = 0 of their own).

    Parameters
    ----------
    p, q : GaussianMixture
    n : int
    seed : int

    Returns
    -------
    (float, float)
    """
    if p.dim != q.dim:
        raise ValueError(f"p has dimension {p.dim}, q has {q.dim}")
    x = p.sample(int(n), torch.Generator().manual_seed(int(seed)))
    r = p.log_prob(x) - q.log_prob(x)
    return float(r.mean()), float(r.std() / math.sqrt(n))


def _start_law(start, target: GaussianMixture, schedule: Schedule) -> GaussianMixture:
    """The reverse process's initial law at t_max: "exact" (p_{t_max}), "prior" (N(0, sigma(t_max)^2 I)) or a law."""
    t_max = schedule.t_max
    if isinstance(start, GaussianMixture):
        if start.dim != target.dim:
            raise ValueError(f"start law has dimension {start.dim}, the target {target.dim}")
        return start
    if start == "exact":
        return target.marginal(schedule, t_max)
    if start == "prior":
        s = float(schedule.sigma(_t64(t_max)))
        return Gaussian(torch.zeros(target.dim, dtype=torch.float64),
                        s * s * torch.eye(target.dim, dtype=torch.float64), name="prior")
    raise ValueError(f"start must be 'exact', 'prior' or a GaussianMixture law at t_max, got {start!r}")


@dataclass(frozen=True)
class KLBound:
    r"""KL(p_{t_min} || q_theta) (``truth``, from the Fokker-Planck grid solution) against its bound
    ``bound`` = ``kl_start`` + ``score_term`` (KL(p_{t_max} || pi) + 1/2 int g^2 e dt), with standard errors of the
    Monte-Carlo parts, ``ratio`` = bound / truth, the grid solution's TV to p_{t_min} and its mass."""

    truth: float
    bound: float
    bound_se: float
    kl_start: float
    kl_start_se: float
    score_term: float
    score_term_se: float
    ratio: float
    tv: float
    mass: float
    profile: ScoreErrorProfile = dc_field(repr=False)
    settings: dict = dc_field(default_factory=dict, repr=False)

    def summary(self) -> dict:
        """The numbers as a JSON-able dict."""
        keys = ("truth", "bound", "bound_se", "kl_start", "kl_start_se", "score_term", "score_term_se", "ratio", "tv",
                "mass")
        return {k: float(getattr(self, k)) for k in keys} | {"settings": self.settings}


def kl_bound(field: VelocityField, target: GaussianMixture, *, start="exact", grid=None, cells: int = 96,
             half_width: float = 5.0, steps: int = 100, method: str = "trbdf2",
             profile: ScoreErrorProfile | None = None,
             n_times: int = 24, n: int = 2000, n_start: int = 20000, seed: int = 0) -> KLBound:
    r"""The KL bound of the reverse SDE driven by ``field`` against the KL it bounds, computed independently:

        truth = KL(p_{t_min} || q_theta)  <=  bound = KL(p_{t_max} || pi) + 1/2 int_{t_min}^{t_max} g^2 e(t) dt

    (Song, Durkan, Murray & Ermon 2021, Thm 1). q_theta is the Fokker-Planck solution of the field's reverse SDE
    (gamma = 1; ``fokker_planck.solve_reverse``) from pi on a grid, and truth = sum_j p_j log(p_j / q_j) |cell| with
    the exact cell averages p_j of p_{t_min}; KL(p_{t_max} || pi) by Monte Carlo (``kl_monte_carlo``; 0 for
    start="exact"); e(t) from ``score_error_profile``.

    Parameters
    ----------
    field : VelocityField
    target : GaussianMixture
        A 1-D or 2-D exact target.
    start : "exact", "prior" or GaussianMixture
        pi: the exact p_{t_max}, the Gaussian prior N(0, sigma(t_max)^2 I), or a given law.
    grid : fokker_planck.Grid, optional
        Default: the box [-half_width, half_width]^d with ``cells`` cells per axis.
    steps, method : the Fokker-Planck time stepping (``solve_reverse``).
    profile : ScoreErrorProfile, optional
        A profile already computed (must span [t_min, t_max]); else one from ``n_times`` nodes and ``n`` samples.
    n_start : int
        Samples of the Monte-Carlo KL(p_{t_max} || pi).
    seed : int

    Returns
    -------
    KLBound
    """
    from .fokker_planck import Grid, solve_reverse
    from .fokker_planck.densities import exact_density, log_exact_density

    _check_pair(field, target)
    if target.dim not in (1, 2):
        raise ValueError(f"kl_bound solves the Fokker-Planck equation on a grid in 1-D or 2-D; the target has "
                         f"d={target.dim}")
    sch = field.schedule
    grid = Grid.box(-half_width, half_width, cells, target.dim) if grid is None else grid
    pi = _start_law(start, target, sch)
    p_T = target.marginal(sch, sch.t_max)
    if isinstance(start, str) and start == "exact":
        kl0, kl0_se = 0.0, 0.0
        p_start = target
    else:
        kl0, kl0_se = kl_monte_carlo(p_T, pi, n_start, seed + 17)
        p_start = exact_density(pi, None, grid, sch.t_max)
    if profile is None:
        profile = score_error_profile(field, target, n_times=n_times, n=n, seed=seed)
    term, term_se = profile.kl_score_term()
    sol = solve_reverse(field, p_start, grid, [sch.t_max, sch.t_min], gamma=1.0, steps=steps, method=method,
                        target=target)
    q = sol.densities[-1]
    lp = log_exact_density(target, sch, grid, sch.t_min)
    p = np.exp(lp)
    pos = p > 0
    # cells where the grid solution is not positive (underflow far out in the tails) are floored at 1e-300; the exact
    # mass they carry is reported (a KL there would be infinite, the floor's contribution is p log(p / 1e-300))
    bad = q <= 0
    lq = np.log(np.where(bad, 1e-300, q))
    truth = float(np.sum(p[pos] * (lp[pos] - lq[pos])) * grid.volume)
    floored_mass = float(p[bad].sum() * grid.volume)
    bound = kl0 + term
    settings = {"floored_mass": floored_mass, "grid": grid.settings(), "steps": steps, "method": method,
                "start": start if isinstance(start, str) else getattr(start, "name", "law"),
                "n_times": int(profile.t.numel()), "n": profile.n, "n_start": n_start, "seed": seed,
                "nfe": int(sol.nfe), "schedule": sch.settings()}
    return KLBound(truth, bound, math.hypot(kl0_se, term_se), kl0, kl0_se, term, term_se,
                   bound / truth if truth > 0 else math.inf, float(sol.tv[-1]), float(sol.mass[-1]), profile, settings)


# ------------------------------------------------------------------------------------------------
# sampler error = network + discretisation

def _pair_sums(x: torch.Tensor, y: torch.Tensor, l2: float, block: int):
    """For k(a, b) = exp(-|a - b|^2 / (2 l2)): row sums sum_{j != i} k(x_i, y_j) and column sums sum_{j != i}
    k(x_j, y_i) (the i = j pairs left out)."""
    n = x.shape[0]
    sx, sy = (x * x).sum(1), (y * y).sum(1)
    rows = torch.zeros(n, dtype=torch.float64)
    cols = torch.zeros(n, dtype=torch.float64)
    for a in range(0, n, block):
        d2 = (sx[a:a + block, None] + sy[None, :]).addmm_(x[a:a + block], y.T, alpha=-2.0).clamp_min_(0.0)
        k = d2.mul_(-0.5 / l2).exp_()
        idx = torch.arange(a, min(a + block, n))
        k[idx - a, idx] = 0.0
        rows[a:a + block] = k.sum(1)
        cols += k.sum(0)
    return rows, cols


def mmd2_two_sample(x, y, bandwidth: float, *, block: int = 1024, return_h1: bool = False):
    r"""Unbiased MMD^2 between two sample sets of equal size, PAIRED or not, with its standard error.

    With z_i = (x_i, y_i) and h(z_i, z_j) = k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i),
    MMD^2_u = 1/(n(n-1)) sum_{i != j} h(z_i, z_j) (Gretton et al. 2012, Lemma 6). The i = j pairs are left out, so the
    estimate stays unbiased when x_i and y_i are dependent (two solvers run from the same start): only independence
    across i is needed. SE^2 = 4/n Var_i(h1_i), h1_i = 1/(n-1) sum_{j != i} h(z_i, z_j) (Hoeffding projection).

    Parameters
    ----------
    x, y : tensors (n, ...)
    bandwidth : float
        l of k(a, b) = exp(-|a - b|^2 / (2 l^2)).
    block : int
    return_h1 : bool
        Also return the n projections h1_i (for the SE of a paired difference of two such estimates,
        SE^2 = 4/n Var_i(h1^a_i - h1^b_i)).

    Returns
    -------
    (float, float) or (float, float, tensor)
        MMD^2_u, its SE (and h1).
    """
    x = as_tensor(x).detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    y = as_tensor(y).detach().reshape(y.shape[0], -1).to("cpu", torch.float64)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"mmd2_two_sample needs at least 3 pairs, got {n}")
    l = float(bandwidth)
    if not (math.isfinite(l) and l > 0):
        raise ValueError(f"bandwidth must be finite and > 0, got {bandwidth!r}")
    xx, _ = _pair_sums(x, x, l * l, block)
    yy, _ = _pair_sums(y, y, l * l, block)
    xy_rows, xy_cols = _pair_sums(x, y, l * l, block)
    h1 = (xx + yy - xy_rows - xy_cols) / (n - 1)
    out = (float(h1.mean()), math.sqrt(4.0 / n * float(h1.var())))
    return (*out, h1) if return_h1 else out


def _paired_ranks(values: list, h1s: list, margin: float = 2.0) -> list:
    """rank_a = 1 + #{b : v_b < v_a - margin SE(v_a - v_b)}, SE^2 = 4/n Var_i(h1^a_i - h1^b_i) (paired estimates)."""
    n = h1s[0].numel()
    out = []
    for a in range(len(values)):
        better = sum(1 for b in range(len(values)) if b != a and values[b] < values[a]
                     - margin * math.sqrt(4.0 / n * float((h1s[a] - h1s[b]).var())))
        out.append(1 + better)
    return out


def _total_row(x, law, bw, pp):
    from .metrics import mmd2_exact

    return mmd2_exact(x.reshape(x.shape[0], -1), law, bw, pp=pp)


def decompose_sampler_error(field: VelocityField, target: GaussianMixture, methods, nfes=(10, 50), *,
                            n: int = 4000, seed: int = 0, final: str = "step", grid_kind: str = "logsnr",
                            rtol: float = 1e-6, x_T=None, progress=None) -> dict:
    r"""Split each sampler's distance to the exact law into the network's error and the discretisation error.

    From the same starts x_T (default: exact samples of p_{t_max}), every (method, NFE budget) runs on ``field``;
    the reference is the same field solved by the adaptive Dormand-Prince 5(4) solver (rtol = atol = ``rtol``), its
    converged law q_inf. Per row (MMD^2 with the exact law's kernel bandwidth ``metrics.mmd_bandwidth``)::

        total           MMD^2(q_K, p)        ``metrics.mmd2_exact`` against the exact law p (p_{t_min}, or p_0 with
                                             final="denoise")
        network         MMD^2(q_inf, p)      the same for the adaptive solve (one value for all rows)
        discretisation  MMD^2(q_K, q_inf)    ``mmd2_two_sample`` between the sampler's and the solve's samples
        flow_error      mean_i |x_i - Phi_theta(x_T,i)|   (deterministic samplers)

    ``mmd_rank`` (the SE-aware rank of the total within its budget, ``compare.mmd_ranks``: paired differences resolved
    at 2 SE) and ``discretisation_rank`` (the same rule for the discretisation column, paired through the shared
    reference), and ``mmd_*`` = sqrt(max(MMD^2, 0)), for which MMD(q_K, p) <= MMD(q_inf, p) + MMD(q_K, q_inf)
    (the triangle inequality of the metric MMD).

    Parameters
    ----------
    field : VelocityField
    target : GaussianMixture
    methods : sequence of str or compare.MethodSpec
    nfes : sequence of int
    n : int
        Samples (the same starts for every row).
    seed : int
    final, grid_kind : as in ``compare.run_comparison``.
    rtol : float
        Tolerance of the adaptive reference.
    x_T : tensor, optional
        The starts (default n exact samples of p_{t_max}).
    progress : callable (k, total, row), optional

    Returns
    -------
    dict
        {"rows": [...], "reference": {...}, "projections": {...}}. ``projections`` holds the Hoeffding projections
        h1_i of every estimate (float64 tensors; "mmd2_total" and "mmd2_discretisation" of shape (rows, n),
        "mmd2_network" of shape (n,)): each MMD^2 is their mean, and sample i of every row comes from start i, so
        they give paired standard errors across rows and across fields run from the same starts
        (``ranking_kendall``).
    """
    from .compare import MethodSpec, mmd_ranks, parse_method, plan_row
    from .metrics import mean_error, mmd_bandwidth, mmd_law_cross
    from .samplers import get_method, sample

    _check_pair(field, target)
    sch = field.schedule
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    plan = [(spec, int(nfe), plan_row(spec, int(nfe), final, grid_kind, sch)) for spec in specs for nfe in nfes]
    if x_T is None:
        x_T = target.marginal(sch, sch.t_max).sample(int(n), torch.Generator().manual_seed(int(seed)))
    else:
        n = x_T.shape[0]
    shape = field.data_shape
    if shape is not None:
        x_T = x_T.reshape(x_T.shape[0], *shape)
    law = target if final == "denoise" else target.marginal(sch, sch.t_min)
    bw = mmd_bandwidth(law)
    pp = mmd_law_cross(law, law, bw)
    nfe0 = field.nfe
    ref = sample(field, x_T, "adaptive", rtol=rtol, atol=rtol, final=final).x
    ref_nfe = field.nfe - nfe0
    net = _total_row(ref, law, bw, pp)
    net2, net_se = net.mmd2, net.se
    rows, results, dis_h1 = [], [], []
    for k, (spec, nfe, run_) in enumerate(plan):
        info = get_method(run_.method)
        res = sample(field, x_T, run_.method, steps=run_.steps, grid_kind=run_.grid_kind, final=final,
                     generator=torch.Generator().manual_seed(seed + 1), **run_.options)
        deterministic = not info.stochastic and not dict(spec.options).get("eta", 0)
        tot = _total_row(res.x, law, bw, pp)
        results.append(tot)
        tot2, tot_se = tot.mmd2, tot.se
        dis2, dis_se, h1 = mmd2_two_sample(res.x, ref, bw, return_h1=True)
        dis_h1.append(h1)
        row = {"sampler": spec.label, "nfe_budget": nfe, "nfe": res.nfe, "steps": run_.steps,
               "stochastic": not deterministic,
               "mmd2_total": tot2, "mmd2_total_se": tot_se, "mmd2_network": net2, "mmd2_network_se": net_se,
               "mmd2_discretisation": dis2, "mmd2_discretisation_se": dis_se,
               "mmd_total": math.sqrt(max(tot2, 0.0)), "mmd_network": math.sqrt(max(net2, 0.0)),
               "mmd_discretisation": math.sqrt(max(dis2, 0.0)),
               "flow_error": mean_error(res.x, ref) if deterministic else math.nan, "mmd_rank": 0,
               "discretisation_rank": 0}
        rows.append(row)
        if progress is not None:
            progress(k + 1, len(plan), row)
    for budget in dict.fromkeys(r["nfe_budget"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["nfe_budget"] == budget]
        for i, rk in zip(idx, mmd_ranks([results[i] for i in idx])):
            rows[i]["mmd_rank"] = rk
        for i, rk in zip(idx, _paired_ranks([rows[i]["mmd2_discretisation"] for i in idx], [dis_h1[i] for i in idx])):
            rows[i]["discretisation_rank"] = rk
    reference = {"solver": "adaptive (Dormand-Prince 5(4))", "rtol": rtol, "nfe": ref_nfe, "n": int(n),
                 "law": "p_0" if final == "denoise" else "p_t_min", "mmd_bandwidth": bw,
                 "mmd2_network": net2, "mmd2_network_se": net_se, "ranking": rank_samplers(rows),
                 "ranking_discretisation": rank_samplers(rows, "mmd2_discretisation", "discretisation_rank")}
    projections = {"mmd2_total": torch.stack([r.h1 for r in results]), "mmd2_discretisation": torch.stack(dis_h1),
                   "mmd2_network": net.h1}
    return {"rows": rows, "reference": reference, "projections": projections}


def rank_samplers(rows: list[dict], key: str = "mmd2_total", rank: str = "mmd_rank") -> dict:
    """Per NFE budget, the samplers ordered by (``rank``, ``key``): {budget: [sampler, ...]}."""
    out = {}
    for budget in dict.fromkeys(r["nfe_budget"] for r in rows):
        mine = sorted((r for r in rows if r["nfe_budget"] == budget), key=lambda r: (r.get(rank, 0), r[key]))
        out[budget] = [r["sampler"] for r in mine]
    return out


def ranking_agreement(rows_a: list[dict], rows_b: list[dict], rank: str = "mmd_rank") -> dict:
    """Does the SE-aware ranking of ``rows_a`` (e.g. the exact field) survive in ``rows_b`` (a learned field)?

    Per NFE budget, every pair of samplers that ``rows_a`` resolves (different ``rank``: ``mmd_rank`` for the totals,
    ``discretisation_rank`` for the discretisation column) is counted as ``kept``
    (resolved the same way in b), ``tied`` (not resolved in b) or ``reversed`` (resolved the other way in b); the
    pairs are listed as "winner<loser" of a.

    Returns
    -------
    dict
        {budget: {"kept": [...], "tied": [...], "reversed": [...], "resolved_in_b_only": [...]}}.
    """
    out = {}
    for budget in dict.fromkeys(r["nfe_budget"] for r in rows_a):
        ra = {r["sampler"]: r[rank] for r in rows_a if r["nfe_budget"] == budget}
        rb = {r["sampler"]: r[rank] for r in rows_b if r["nfe_budget"] == budget}
        res = {"kept": [], "tied": [], "reversed": [], "resolved_in_b_only": []}
        names = [n for n in ra if n in rb]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if ra[a] == ra[b]:
                    if rb[a] != rb[b]:
                        w, l_ = (a, b) if rb[a] < rb[b] else (b, a)
                        res["resolved_in_b_only"].append(f"{w}<{l_}")
                    continue
                w, l_ = (a, b) if ra[a] < ra[b] else (b, a)
                key = "tied" if rb[w] == rb[l_] else ("kept" if rb[w] < rb[l_] else "reversed")
                res[key].append(f"{w}<{l_}")
        out[budget] = res
    return out


def kendall_tau(a, b) -> float:
    r"""Kendall's tau-b between two score vectors over the same items (Kendall 1945):

        tau_b = (n_c - n_d) / sqrt((n_0 - n_a)(n_0 - n_b)),

    n_c / n_d the concordant / discordant pairs (sign(a_i - a_j) sign(b_i - b_j) = +1 / -1), n_0 = m(m - 1)/2 and
    n_a, n_b the pairs tied in a, in b. 1: the same order, -1: the reverse; NaN when a or b ties every pair.

    Parameters
    ----------
    a, b : sequences of float, or tensors of shape (m,) or (R, m) (R replicates, tau per replicate)

    Returns
    -------
    float, or a float64 tensor (R,)
    """
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape or a.dim() not in (1, 2) or a.shape[-1] < 2:
        raise ValueError(f"a and b must have the same shape (m,) or (R, m) with m >= 2, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    one = a.dim() == 1
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    i, j = torch.triu_indices(a.shape[1], a.shape[1], 1)
    sa, sb = torch.sign(a[:, i] - a[:, j]), torch.sign(b[:, i] - b[:, j])
    num = (sa * sb).sum(1)
    den = ((sa != 0).sum(1) * (sb != 0).sum(1)).to(torch.float64).sqrt()
    tau = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))
    return float(tau[0]) if one else tau


def ranking_kendall(rows_a: list[dict], proj_a, rows_b: list[dict], proj_b, key: str = "mmd2_total", *,
                    margin: float = 2.0, n_boot: int = 2000, seed: int = 0, paired: bool = True) -> dict:
    r"""Kendall's tau between the sampler rankings of two fields (e.g. the exact one, a, and a learned one, b), with
    its Monte-Carlo standard error, and every pair of samplers labelled by whether a change of order is resolved.

    Each MMD^2 estimate is a U-statistic U = mean_i h1_i (``decompose_sampler_error``'s ``projections``). To first
    order (Hoeffding 1948) U - theta = 2/n sum_i (h1_i - theta), so a bootstrap replicate, with the starts i drawn with
    replacement (the same draw for every sampler, and for both fields when ``paired``: sample i of every row comes from
    start i), is U* = U + 2 (mean_{i in draw} h1_i - mean_i h1_i); its variance is the SE^2 = 4/n Var(h1) of the
    estimate. Per NFE budget:

    - ``tau``: ``kendall_tau`` of the point estimates; ``tau_se`` the standard deviation of tau over ``n_boot``
      replicates and ``tau_ci`` their 2.5 and 97.5 percentiles;
    - ``tau_noise_a`` / ``tau_noise_b``: the mean tau between two independent replicates of the same field, the value
      tau takes when the two rankings are the same and only Monte-Carlo noise differs (1 when every pair is resolved);
    - ``pairs``: for every pair of samplers the paired differences d = U_x - U_y on a and on b, their SEs
      (4/n Var_i(h1^x_i - h1^y_i))^{1/2}, and a label: ``kept`` (the same sign on both fields), ``reversed`` (opposite
      signs, |d| > margin SE on both) or ``swapped within noise`` (opposite signs, unresolved on at least one field).

    Parameters
    ----------
    rows_a, rows_b : list of dict
        ``decompose_sampler_error(...)["rows"]`` of the two fields (same samplers and budgets, rows in any order).
    proj_a, proj_b : tensor (rows, n)
        The matching ``projections[key]``.
    key : str
        "mmd2_total" or "mmd2_discretisation".
    margin : float
        Standard errors that resolve a difference.
    n_boot : int
        Bootstrap replicates (even, >= 2).
    seed : int
    paired : bool
        Whether the two fields ran from the same starts (then one draw of i serves both).

    Returns
    -------
    dict
        {budget: {"samplers", "order_a", "order_b", "tau", "tau_se", "tau_ci", "tau_noise_a", "tau_noise_b",
        "pairs": [...], "counts": {label: number}}}.
    """
    if key not in ("mmd2_total", "mmd2_discretisation"):
        raise ValueError(f"key must be 'mmd2_total' or 'mmd2_discretisation', got {key!r}")
    if int(n_boot) != n_boot or n_boot < 2 or n_boot % 2:
        raise ValueError(f"n_boot must be an even integer >= 2, got {n_boot!r}")
    pa = torch.as_tensor(proj_a, dtype=torch.float64)
    pb = torch.as_tensor(proj_b, dtype=torch.float64)
    if pa.dim() != 2 or pa.shape[0] != len(rows_a) or pb.dim() != 2 or pb.shape[0] != len(rows_b):
        raise ValueError(f"proj_a and proj_b must have one row per row of rows_a / rows_b, got {tuple(pa.shape)} for "
                         f"{len(rows_a)} rows and {tuple(pb.shape)} for {len(rows_b)} rows")
    if paired and pa.shape[1] != pb.shape[1]:
        raise ValueError(f"paired fields need the same number of starts, got {pa.shape[1]} and {pb.shape[1]}")
    g = torch.Generator().manual_seed(int(seed))

    def draws(n):
        idx = torch.randint(0, n, (int(n_boot), n), generator=g)
        return torch.zeros(int(n_boot), n, dtype=torch.float64).scatter_add_(
            1, idx, torch.ones(int(n_boot), n, dtype=torch.float64)) / n

    wa = draws(pa.shape[1])
    wb = wa if paired else draws(pb.shape[1])
    index_a = {(r["sampler"], r["nfe_budget"]): i for i, r in enumerate(rows_a)}
    index_b = {(r["sampler"], r["nfe_budget"]): i for i, r in enumerate(rows_b)}
    out = {}
    for budget in dict.fromkeys(r["nfe_budget"] for r in rows_a):
        names = [r["sampler"] for r in rows_a if r["nfe_budget"] == budget and (r["sampler"], budget) in index_b]
        if len(names) < 2:
            continue
        ia = [index_a[(s, budget)] for s in names]
        ib = [index_b[(s, budget)] for s in names]
        ha, hb = pa[ia], pb[ib]
        ua, ub = ha.mean(1), hb.mean(1)
        # replicates (n_boot, m): U* = U + 2 (weighted mean - mean)
        ra = ua + 2.0 * (wa @ ha.T - ua)
        rb = ub + 2.0 * (wb @ hb.T - ub)
        taus = kendall_tau(ra, rb)
        half = int(n_boot) // 2
        noise_a = kendall_tau(ra[:half], ra[half:])
        noise_b = kendall_tau(rb[:half], rb[half:])
        tau = kendall_tau(ua, ub)
        pairs, counts = [], {"kept": 0, "reversed": 0, "swapped within noise": 0}
        for x in range(len(names)):
            for y in range(x + 1, len(names)):
                da, db = float(ua[x] - ua[y]), float(ub[x] - ub[y])
                sea = math.sqrt(4.0 / ha.shape[1] * float((ha[x] - ha[y]).var()))
                seb = math.sqrt(4.0 / hb.shape[1] * float((hb[x] - hb[y]).var()))
                if da * db > 0 or (da == 0 and db == 0):
                    label = "kept"
                elif abs(da) > margin * sea and abs(db) > margin * seb:
                    label = "reversed"
                else:
                    label = "swapped within noise"
                counts[label] += 1
                pairs.append({"pair": f"{names[x]}|{names[y]}", "diff_a": da, "se_a": sea, "diff_b": db, "se_b": seb,
                              "resolved_a": abs(da) > margin * sea, "resolved_b": abs(db) > margin * seb,
                              "label": label})
        ok = taus[torch.isfinite(taus)]
        out[budget] = {"samplers": names,
                       "order_a": [names[i] for i in torch.argsort(ua).tolist()],
                       "order_b": [names[i] for i in torch.argsort(ub).tolist()],
                       "tau": tau, "tau_se": float(ok.std()) if ok.numel() > 1 else math.nan,
                       "tau_ci": [float(torch.quantile(ok, 0.025)), float(torch.quantile(ok, 0.975))]
                       if ok.numel() else [math.nan, math.nan],
                       "tau_noise_a": float(noise_a[torch.isfinite(noise_a)].mean()),
                       "tau_noise_b": float(noise_b[torch.isfinite(noise_b)].mean()),
                       "pairs": pairs, "counts": counts, "n_boot": int(n_boot), "margin": margin}
    return out
