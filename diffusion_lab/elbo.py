r"""The variational view: the discrete DDPM bound and the continuous-time (VDM) ELBO, per sample, in nats and bits/dim.

Notation. Data x at t = 0; latents z_t = alpha_t x + sigma_t eps, eps ~ N(0, I_d), on [t_0, T] = [t_min, t_max];
SNR(t) = alpha^2/sigma^2 = exp(2 lambda(t)) (lambda = the schedules' half log-SNR) and u = log SNR = 2 lambda.
The model is: a prior p(z_T); reverse transitions built from the field's x0-prediction x_hat(z_t, t) (equivalently
eps_hat = (z_t - alpha x_hat)/sigma); a decoder p(x | z_{t_0}). Its log-likelihood log p_theta(x) is bounded below by

    ELBO(x) = -[ KL(q(z_T|x) || p(z_T))  +  E_{q(z_0|x)}[-log p(x|z_0)]  +  L_diff(x) ]          (nats, per sample)

(Sohl-Dickstein et al. 2015; Ho, Jain & Abbeel 2020, eq. 5; Kingma, Salimans, Poole & Ho 2021, eq. 11), with

* discrete time (``ddpm_bound``), on a grid t_0 < t_1 < ... < t_N = T with s = t_{i-1} < t = t_i, h = lambda_s -
  lambda_t, the Gaussian posterior q(z_s | z_t, x) = N(A z_t + B x, C^2 I) (``samplers.sde.ddpm_posterior_coefficients``:
  B = alpha_s (1 - e^{-2h}), C^2 = sigma_s^2 (1 - e^{-2h})) and the model p(z_s | z_t) = N(A z_t + B x_hat, s_p^2 I):

      L_diff = sum_{i=1}^{N} L_i,  L_i = E_{q(z_t|x)} KL(q(z_s|z_t,x) || p(z_s|z_t))
             = E (1/2) [ d (C^2/s_p^2 - 1 - log(C^2/s_p^2)) + B^2 ||x - x_hat||^2 / s_p^2 ].

  With the posterior variance s_p^2 = C^2 (Ho et al.'s beta~) this is L_i = (1/2)(SNR_s/SNR_t - 1) E||eps - eps_hat||^2
  (Kingma et al. 2021, eq. 13); ``variance="beta"`` takes the forward step's variance s_p^2 = sigma_{t|s}^2 =
  sigma_t^2 (1 - e^{-2h}) (Ho et al.'s sigma_t^2 = beta_t). In Ho et al.'s indexing x_0 = data and x_1 .. x_N' are
  the latents: ``DDPMDiscrete(n_steps=N')`` with the uniform grid of N = N' - 1 steps on [1/N', 1] is their chain, our
  N terms L_i are their L_1 .. L_{N'-1}, our decoder term is their L_0 and our prior term their L_T.

* continuous time (``continuous_elbo``), the limit N -> infinity (Kingma et al. 2021, eq. 17):

      L_diff = L_inf(x) = -(1/2) E_eps int_{t_0}^{T} SNR'(t) ||x - x_hat(z_t, t)||^2 dt
                        = (1/2) E_eps int_{u_T}^{u_0} ||eps - eps_hat(z_t, t)||^2 du,

  estimated with t ~ U(t_0, T) (weight -lambda'(t) (T - t_0)), by importance sampling uniform in u = log SNR (weight
  (u_0 - u_T)/2), or by Gauss-Legendre quadrature in u. In the u form only the end points SNR(t_0), SNR(T) enter: the
  value is the same for every schedule with those end points, whenever x_hat depends on (z_t, t) only through
  (z_t/alpha_t, SNR) -- true for the exact x0-prediction E[x | z_t] of any data law, for which scaling z_t by
  alpha_t is a change of variables (Kingma et al. 2021, Sec. 5.1). The schedule only changes the variance of the
  t-uniform estimator.

Decoder (``decoder``): "gaussian" is p(x | z_0) = N(x; x_hat(z_0, t_0), V I) with V = sigma_0^2/alpha_0^2 = 1/SNR(t_0),
for continuous data, so the bound is on a density: -log p(x|z_0) = (d/2) log(2 pi V) + (1/2)||eps - eps_hat||^2.
"discretised" integrates that Gaussian over the bin of width ``bin_width`` centred at x (Ho et al. 2020, eq. 13: the
outermost bins of ``data_range`` extend to -/+ infinity); the bound is then on a probability mass.

Prior (``prior``): None is N(0, (alpha_T^2 data_var + sigma_T^2) I) (``likelihood.gaussian_prior``; for VP with
data_var = 1 VDM's N(0, I)), whose KL is in closed form; a callable log-density (e.g. the exact marginal
``target.marginal(schedule, T).log_prob``) is integrated by Monte Carlo.

Control variate (``control_variate``, default on; off is the published estimator). Near the data end the per-draw
value ||eps - eps_hat||^2 is ~ ||eps||^2 ~ chi^2_d, which dominates the variance. Subtracting beta(t) (||eps||^2 - d),
which has mean 0, leaves the estimator unbiased for any deterministic beta(t); beta = rho^2 with
rho = SNR v/(1 + SNR v), v = ``data_var``, is the optimal coefficient for Gaussian data of variance v (there
eps - eps_hat = rho eps - (an eps-independent term)). It shrinks the per-sample standard error by 10-100x.

Which density is bounded, and the exact comparison. ELBO(x) <= log p_theta(x) for every x (Jensen), where p_theta is
the model's own law of x: z_T ~ prior, the reverse chain (continuous time: the reverse SDE driven by x_hat), x ~ decoder.
For the exact field of a target p_0, in continuous time the reverse SDE started from the exact p_T has the exact
marginals, and the forward process is Markov (x -> z_0 -> z_t), so Bayes' rule gives, per x,

    ELBO(x) = log p_0(x) - Delta_dec(x) - Delta_prior(x),
    Delta_dec(x)   = E_{z_0 ~ q(z_0|x)} [ log q(x|z_0) - log p(x|z_0) ],     q(x|z_0) = p_0(x) q(z_0|x)/p_{t_0}(z_0),
    Delta_prior(x) = E_{z_T ~ q(z_T|x)} [ log p_T(z_T) - log p(z_T) ],

and equivalently L_inf(x) = KL(q(z_0|x) || p_{t_0}) - KL(q(z_T|x) || p_T) (a per-sample I-MMSE relation; Guo, Shamai
& Verdu 2005). So the right exact comparison is log p_0(x), the data law (not log p_{t_0}, the law of z_0): the gap
log p_0(x) - ELBO(x) is the decoder mismatch plus the prior mismatch. Their means over x ~ p_0 are
E_{z_0} KL(q(x|z_0) || p(x|z_0)) >= 0 and KL(p_T || p(z_T)) >= 0, so E gap >= 0 (and E ELBO <= E log p_0 also
follows from Gibbs' inequality E log p_theta <= E log p_0). Per sample, Delta_dec(x) may be slightly negative: for
Gaussian data N(mu, Sigma) with eigenvalues e_j and u_j = V/e_j,

    Delta_dec(x) = sum_j (1/2) [ log(1 + u_j) - u_j/(1 + u_j)^2 - u_j^2 dx_j^2 / (e_j (1 + u_j)^2) ]
                 = sum_j (u_j^2/2) (3/2 - dx_j^2/e_j) + O(u^3),        dx = U^T (x - mu),

negative beyond 1.22 standard deviations, but only at O(u^2) = O(SNR(t_0)^{-2}) (~1e-8 nats at VP's t_min = 1e-3),
below any Monte-Carlo error; its mean is sum_j [log(1+u_j) + 1/(1+u_j) - 1]/2 = sum_j u_j^2/4 + O(u^3). The per-sample
inequality that holds exactly is against log p_theta, the law at t_0 pushed through the decoder (for Gaussian data
N(mu, alpha_0^2 Sigma C_0^{-1} Sigma + V I), C_0 = alpha_0^2 Sigma + sigma_0^2 I, whose gap is the constant
sum_j u_j^2/4 + O(u^3), non-negative for every x, with an x-dependence only at O(u^3)). Both mismatches vanish as t_0 -> 0 (V -> 0) and T -> infinity (p_T -> the prior).
``gaussian_elbo_closed_form`` gives every term for Gaussian data in closed form; ``exact_elbo_terms`` estimates them
for Gaussian mixtures by Monte Carlo over z. In discrete time the exact field's reverse kernels
q(z_s | z_t, x_hat) are not the true reverse kernels, and the bound loses a further O(1/N) (``gaussian_diffusion_term``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable

import numpy as np
import torch

from ._tensor import check_batch
from .field import VelocityField
from .targets import Gaussian, GaussianMixture

__all__ = ["ELBOResult", "ddpm_bound", "continuous_elbo", "prior_kl", "gaussian_elbo_closed_form",
           "gaussian_diffusion_term", "exact_elbo_terms", "T_SAMPLING", "DECODERS", "VARIANCES"]

T_SAMPLING = ("logsnr", "uniform", "quadrature")
DECODERS = ("gaussian", "discretised")
VARIANCES = ("posterior", "beta")
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass
class ELBOResult:
    """Per-sample ELBO (nats; a lower bound on log p_theta(x)) with its Monte-Carlo standard error, bits/dim
    (``bpd`` = -elbo/(d ln 2), an upper bound on the NLL in bits/dim), the three terms of -ELBO as per-sample losses
    (``terms``: "prior", "reconstruction", "diffusion"; -elbo = their sum) with their SEs (``term_se``), and for the
    discrete bound the per-step terms L_1..L_N averaged over the batch (``per_step``, index i - 1 = step from t_i to
    t_{i-1}, t_0 = t_min) with their SEs. ``nfe`` counts field calls (each batched over many rows);
    ``extra["evaluations"]`` the model evaluations per sample."""

    elbo: torch.Tensor
    se: torch.Tensor
    bpd: torch.Tensor
    terms: dict
    term_se: dict
    nfe: int
    dim: int
    settings: dict
    per_step: torch.Tensor | None = None
    per_step_se: torch.Tensor | None = None
    grid: torch.Tensor | None = None
    seconds: float = 0.0
    extra: dict = dc_field(default_factory=dict)

    def summary(self) -> dict:
        """Batch means in nats and bits/dim: ``elbo`` and its ``se`` (sampling spread of x and the estimator's own
        error together: std over the batch / sqrt(n)), ``estimator_se`` (the Monte-Carlo error of the mean alone),
        and the mean of every term."""
        n = self.elbo.shape[0]
        ln2d = self.dim * math.log(2.0)
        m = float(self.elbo.mean())
        sd = float(self.elbo.std()) if n > 1 else float("nan")
        est = float(torch.sqrt((self.se ** 2).sum())) / n
        out = {"elbo_nats": m, "neg_elbo_bits_per_dim": -m / ln2d, "se": sd / math.sqrt(n), "estimator_se": est,
               "n": n, "dim": self.dim, "nfe": self.nfe, "seconds": self.seconds}
        for k, v in self.terms.items():
            out[f"{k}_nats"] = float(v.mean())
        return out


# ------------------------------------------------------------------------------------------------------------------
# shared pieces

def _coef(schedule, t):
    t = torch.as_tensor(t, dtype=torch.float64)
    return schedule.alpha(t), schedule.sigma(t), schedule.lam(t)


def _check_common(x, n_draws_name, n_draws, decoder, bin_width, data_var, min_draws=1):
    check_batch(x, "x")
    if not torch.isfinite(x).all():
        raise ValueError(f"x has {int((~torch.isfinite(x)).sum())} non-finite values (NaN/inf)")
    if int(n_draws) != n_draws or n_draws < min_draws:
        raise ValueError(f"{n_draws_name} must be an integer >= {min_draws}, got {n_draws!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "discretised" and not (bin_width is not None and bin_width > 0 and math.isfinite(bin_width)):
        raise ValueError(f"decoder='discretised' needs bin_width > 0, got {bin_width!r}")
    if not (data_var > 0 and math.isfinite(data_var)):
        raise ValueError(f"data_var must be a finite number > 0, got {data_var!r}")


def _rho2(schedule, t, data_var: float) -> torch.Tensor:
    """The control-variate coefficient beta = rho^2, rho = SNR v/(1 + SNR v) = sigmoid(log SNR + log v)."""
    u = 2.0 * schedule.lam(torch.as_tensor(t, dtype=torch.float64))
    return torch.sigmoid(u + math.log(data_var)) ** 2


def _eps_residual(field: VelocityField, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, shape) -> torch.Tensor:
    """||eps - eps_hat(z_t, t)||^2 per row, z_t = alpha_t x + sigma_t eps (x, eps flat (m, d); t (m,); one sample's
    shape ``shape``); one NFE."""
    sch = field.schedule
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    z = a * x + s * eps
    _, e = field.x0_eps(z.reshape(z.shape[0], *shape), t)
    return ((eps - e.reshape(e.shape[0], -1).to(torch.float64)) ** 2).sum(1)


def _evaluate_rows(field, xs, ts, eps, max_rows, shape):
    """_eps_residual over the rows (x, t, eps) in chunks of at most max_rows rows (one NFE per chunk)."""
    return torch.cat([_eps_residual(field, xs[lo:lo + max_rows], ts[lo:lo + max_rows], eps[lo:lo + max_rows], shape)
                      for lo in range(0, xs.shape[0], max_rows)])


def prior_kl(schedule, x: torch.Tensor, prior: Callable | float | None = None, data_var: float = 1.0,
             n_mc: int = 256, generator: torch.Generator | None = None, t1: float | None = None):
    """(KL(q(z_T|x) || p(z_T)) per sample, its SE) with q(z_T|x) = N(alpha_T x, sigma_T^2 I), x flat (n, d).

    ``prior`` None: N(0, v I), v = alpha_T^2 data_var + sigma_T^2; a number: that variance v; both in closed form
    KL = (1/2) sum_j [sigma_T^2/v + alpha_T^2 x_j^2/v - 1 - log(sigma_T^2/v)] (SE 0). A callable log-density of flat
    points (m, d): Monte Carlo over ``n_mc`` draws z_T, KL = E[log N(z_T; alpha_T x, sigma_T^2 I) - log p(z_T)]."""
    T = schedule.t_max if t1 is None else float(t1)
    a, s, _ = _coef(schedule, T)
    a, s = float(a), float(s)
    n, d = x.shape
    if prior is None or isinstance(prior, (int, float)):
        v = a * a * data_var + s * s if prior is None else float(prior)
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"prior variance must be a finite number > 0, got {v!r}")
        kl = 0.5 * (d * (s * s / v - 1.0 - math.log(s * s / v)) + a * a * (x ** 2).sum(1) / v)
        return kl, torch.zeros(n, dtype=torch.float64)
    if not callable(prior):
        raise TypeError(f"prior must be None, a variance or a callable log-density, got {type(prior).__name__}")
    eps = torch.randn((n_mc, n, d), dtype=torch.float64, generator=generator)
    z = a * x[None] + s * eps
    log_q = -0.5 * d * (_LOG_2PI + 2.0 * math.log(s)) - 0.5 * (eps ** 2).sum(-1)
    log_p = prior(z.reshape(n_mc * n, d)).reshape(n_mc, n).to(torch.float64)
    vals = log_q - log_p
    return vals.mean(0), vals.std(0) / math.sqrt(n_mc) if n_mc > 1 else torch.full((n,), math.nan, dtype=torch.float64)


def _reconstruction(field, x, n_draws, decoder, bin_width, data_range, control_variate, data_var, generator, max_rows,
                    shape):
    """Per-draw -log p(x | z_0) values (n, n_draws) at t_0 = t_min."""
    sch = field.schedule
    n, d = x.shape
    t0 = torch.tensor(sch.t_min, dtype=torch.float64)
    a0, s0, lam0 = _coef(sch, t0)
    V = float(torch.exp(-2.0 * lam0))
    eps = torch.randn((n_draws, n, d), dtype=torch.float64, generator=generator)
    xs = x[None].expand(n_draws, n, d).reshape(-1, d)
    ts = t0.expand(n_draws * n).clone()
    if decoder == "gaussian":
        r = _evaluate_rows(field, xs, ts, eps.reshape(-1, d), max_rows, shape).reshape(n_draws, n)
        if control_variate:
            r = r - float(_rho2(sch, t0, data_var)) * ((eps ** 2).sum(-1) - d)
        return (0.5 * d * (_LOG_2PI + math.log(V)) + 0.5 * r).T
    # discretised Gaussian: x_hat from the same single evaluation, then the mass of each coordinate's bin
    vals = []
    for lo in range(0, xs.shape[0], max_rows):
        sl = slice(lo, lo + max_rows)
        e = eps.reshape(-1, d)[sl]
        z = a0 * xs[sl] + s0 * e
        x0, _ = field.x0_eps(z.reshape(z.shape[0], *shape), ts[sl])
        x0 = x0.reshape(x0.shape[0], -1).to(torch.float64)
        vals.append(-_log_bin_mass(xs[sl], x0, math.sqrt(V), bin_width, data_range).sum(1))
    return torch.cat(vals).reshape(n_draws, n).T


def _log_bin_mass(x, mean, sd, width, data_range):
    """log P(bin of width ``width`` centred at x) under N(mean, sd^2), per coordinate; bins at the ends of
    ``data_range`` extend to -/+ infinity (Ho et al. 2020, eq. 13)."""
    lo = (x - 0.5 * width - mean) / sd
    hi = (x + 0.5 * width - mean) / sd
    if data_range is not None:
        tol = 1e-6 * width
        lo = torch.where(x <= data_range[0] + tol, torch.full_like(lo, -math.inf), lo)
        hi = torch.where(x >= data_range[1] - tol, torch.full_like(hi, math.inf), hi)
    # log(Phi(hi) - Phi(lo)) without cancellation: on the upper side use the mirrored tails
    upper = lo > 0
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    lb, la = torch.special.log_ndtr(b), torch.special.log_ndtr(a)
    return lb + torch.log1p(-torch.exp(la - lb).clamp(max=1.0 - 1e-300))


def _finish(kind, field, x_shape, d, terms, term_se, nfe0, start, settings, **extra):
    neg = terms["prior"] + terms["reconstruction"] + terms["diffusion"]
    se = torch.sqrt(term_se["prior"] ** 2 + term_se["reconstruction"] ** 2 + term_se["diffusion"] ** 2)
    elbo = -neg
    return ELBOResult(elbo=elbo, se=se, bpd=neg / (d * math.log(2.0)), terms=terms, term_se=term_se,
                      nfe=field.nfe - nfe0, dim=d, settings={"bound": kind, **settings},
                      seconds=time.perf_counter() - start, **extra)


def _flat(x):
    return x.detach().to(torch.float64).reshape(x.shape[0], -1)


# ------------------------------------------------------------------------------------------------------------------
# the continuous-time ELBO

def continuous_elbo(field: VelocityField, x: torch.Tensor, *, n_t: int = 32, t_sampling: str = "quadrature",
                    n_rep: int = 16, n_dec: int | None = None, decoder: str = "gaussian", bin_width: float | None = None,
                    data_range: tuple | None = None, prior: Callable | float | None = None, data_var: float = 1.0,
                    n_prior: int = 256, control_variate: bool = True, antithetic: bool = False,
                    generator: torch.Generator | None = None, max_rows: int = 1 << 16) -> ELBOResult:
    r"""The continuous-time ELBO of Kingma et al. (2021) per sample (module docstring): -ELBO(x) = prior KL +
    E[-log p(x|z_0)] + (1/2) E int_{u_T}^{u_0} ||eps - eps_hat(z_t, t)||^2 du, u = log SNR, x of shape (n, *data).

    ``t_sampling``: "logsnr" (u ~ U(u_T, u_0), ``n_t`` draws of (u, eps) per sample; VDM's importance sampling for a
    fixed schedule), "uniform" (t ~ U(t_min, t_max), weight -lambda'(t)(t_max - t_min)), or "quadrature"
    (``n_t``-point Gauss-Legendre in u, one eps per node, ``n_rep`` >= 2 independent replicates for the SE).
    ``n_dec`` draws of z_0 for the reconstruction term (default ``n_t``). NFE = n_t (x n_rep) + n_dec batched calls
    (in chunks of at most ``max_rows`` rows); ``extra["evaluations"]`` counts the model evaluations per sample."""
    if t_sampling not in T_SAMPLING:
        raise ValueError(f"t_sampling must be one of {T_SAMPLING}, got {t_sampling!r}")
    _check_common(x, "n_t", n_t, decoder, bin_width, data_var)
    if t_sampling == "quadrature" and (int(n_rep) != n_rep or n_rep < 2):
        raise ValueError(f"t_sampling='quadrature' needs n_rep >= 2 replicates for a standard error, got {n_rep!r}")
    n_dec = int(n_t) if n_dec is None else n_dec
    if int(n_dec) != n_dec or n_dec < 1:
        raise ValueError(f"n_dec must be an integer >= 1, got {n_dec!r}")
    start, nfe0 = time.perf_counter(), field.nfe
    sch = field.schedule
    xf, shape = _flat(x), tuple(x.shape[1:])
    n, d = xf.shape
    u0, uT = 2.0 * float(sch.lam(torch.tensor(sch.t_min, dtype=torch.float64))), \
        2.0 * float(sch.lam(torch.tensor(sch.t_max, dtype=torch.float64)))
    n_t = int(n_t)
    A = 2 if antithetic else 1  # evaluations per draw: (eps, -eps) share their t
    if t_sampling == "quadrature":
        nodes, weights = np.polynomial.legendre.leggauss(n_t)
        u = torch.as_tensor(uT + 0.5 * (nodes + 1.0) * (u0 - uT), dtype=torch.float64)
        w = torch.as_tensor(0.25 * (u0 - uT) * weights, dtype=torch.float64)  # (1/2) x Gauss-Legendre weights
        t_nodes = sch.t_from_lam(0.5 * u).clamp(sch.t_min, sch.t_max)
        R = int(n_rep)
        ts = t_nodes[None, :, None].expand(R, n_t, n).reshape(-1)
        wt = w[None, :, None].expand(R, n_t, n).reshape(-1)
        draws = R * n_t
    else:
        U = torch.rand((n_t, n), dtype=torch.float64, generator=generator)
        if t_sampling == "logsnr":
            ts = sch.t_from_lam(0.5 * (uT + U * (u0 - uT))).clamp(sch.t_min, sch.t_max).reshape(-1)
            wt = torch.full_like(ts, 0.5 * (u0 - uT))
        else:
            ts = (sch.t_min + U * (sch.t_max - sch.t_min)).reshape(-1)
            wt = -sch.dlam(ts) * (sch.t_max - sch.t_min)
        draws = n_t
    eps = torch.randn((draws * n, d), dtype=torch.float64, generator=generator)
    xs = xf[None].expand(draws, n, d).reshape(-1, d)
    vals = 0.0
    for sign in (1.0, -1.0)[:A]:
        r = _evaluate_rows(field, xs, ts, sign * eps, max_rows, shape)
        if control_variate:
            r = r - _rho2(sch, ts, data_var) * ((eps ** 2).sum(1) - d)
        vals = vals + (wt * r).reshape(draws, n) / A
    if t_sampling == "quadrature":
        per_node = vals.reshape(R, n_t, n)  # weighted values; the nodes' draws are independent
        diff = per_node.sum(1).mean(0)
        # SE^2 = sum_j w_j^2 Var(f_j)/R, each node's variance from its R draws: pooled over the nodes, this has
        # ~n_t (R - 1) degrees of freedom, where the spread of the R replicate sums would have only R - 1
        diff_se = torch.sqrt(per_node.var(0).sum(0) / R)
    else:
        diff = vals.mean(0)
        diff_se = vals.std(0) / math.sqrt(n_t) if n_t > 1 else torch.full((n,), math.nan, dtype=torch.float64)
    rec_v = _reconstruction(field, xf, int(n_dec), decoder, bin_width, data_range, control_variate, data_var,
                            generator, max_rows, shape)
    rec = rec_v.mean(1)
    rec_se = rec_v.std(1) / math.sqrt(n_dec) if n_dec > 1 else torch.full((n,), math.nan, dtype=torch.float64)
    pk, pk_se = prior_kl(sch, xf, prior, data_var, n_prior, generator)
    settings = {"t_sampling": t_sampling, "n_t": n_t, "n_rep": int(n_rep) if t_sampling == "quadrature" else None,
                "n_dec": int(n_dec), "decoder": decoder, "bin_width": bin_width, "data_range": data_range,
                "prior": "gaussian" if prior is None else ("variance" if isinstance(prior, (int, float)) else "callable"),
                "data_var": data_var, "control_variate": bool(control_variate), "antithetic": bool(antithetic),
                "log_snr_range": (uT, u0),
                "schedule": sch.settings()}
    return _finish("continuous", field, x.shape, d, {"prior": pk, "reconstruction": rec, "diffusion": diff},
                   {"prior": pk_se, "reconstruction": rec_se, "diffusion": diff_se}, nfe0, start, settings,
                   extra={"evaluations": draws * A + int(n_dec)})


# ------------------------------------------------------------------------------------------------------------------
# the discrete DDPM bound

def _discrete_grid(schedule, steps, kind):
    from .samplers.grids import time_grid

    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        g = time_grid(schedule, int(steps), kind)
    else:
        t = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
        g = time_grid(schedule, kind=torch.sort(t, descending=True).values)
    return torch.flip(g, (0,))  # ascending: t_0 = t_min < ... < t_N = t_max


def ddpm_bound(field: VelocityField, x: torch.Tensor, steps=1000, *, grid_kind: str = "uniform",
               variance: str = "posterior", n_eps: int | None = None, n_dec: int = 64, decoder: str = "gaussian",
               bin_width: float | None = None, data_range: tuple | None = None, prior: Callable | float | None = None,
               data_var: float = 1.0, n_prior: int = 256, control_variate: bool = True,
               generator: torch.Generator | None = None, max_rows: int = 1 << 16) -> ELBOResult:
    r"""The discrete variational bound L = L_T + sum_{i=1}^{N} L_i + L_0 (Ho et al. 2020, eq. 5; module docstring) per
    sample, every L_i summed (not sampled), each estimated with ``n_eps`` >= 2 draws of z_{t_i} ~ q(z_{t_i}|x) (default
    max(2, 256 // N): the per-sample SE pools the N terms' variances, each from n_eps draws, and needs some N (n_eps - 1)
    degrees of freedom to be trusted).

    ``steps``: the number N of steps of a ``grid_kind`` grid (``samplers.time_grid``) on [t_min, t_max], or a grid
    (any order). ``variance``: "posterior" (beta~, s_p^2 = C^2) or "beta" (the forward step's variance). The per-step
    terms averaged over the batch are in ``per_step`` (L_1 .. L_N) with their SEs. N n_eps + n_dec model evaluations
    per sample (``extra["evaluations"]``), batched over samples, draws and steps in calls of at most ``max_rows`` rows
    (``nfe`` counts the calls)."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    sch = field.schedule
    grid = _discrete_grid(sch, steps, grid_kind)
    if n_eps is None:
        n_eps = max(2, 256 // (grid.numel() - 1))
    _check_common(x, "n_eps", n_eps, decoder, bin_width, data_var, min_draws=2)
    if int(n_dec) != n_dec or n_dec < 1:
        raise ValueError(f"n_dec must be an integer >= 1, got {n_dec!r}")
    start, nfe0 = time.perf_counter(), field.nfe
    xf, shape = _flat(x), tuple(x.shape[1:])
    n, d = xf.shape
    N, K = grid.numel() - 1, int(n_eps)
    alpha, sigma, lam = _coef(sch, grid)
    h = lam[:-1] - lam[1:]  # lambda_s - lambda_t > 0 for s = t_{i-1}, t = t_i
    q = -torch.expm1(-2.0 * h)  # 1 - e^{-2h}
    if variance == "posterior":
        mean_w = 0.5 * torch.expm1(2.0 * h)  # (1/2)(SNR_s/SNR_t - 1)
        const = torch.zeros(N, dtype=torch.float64)
    else:
        ratio = (sigma[:-1] / sigma[1:]) ** 2  # C^2/s_p^2 = sigma_s^2/sigma_t^2
        mean_w = 0.5 * (alpha[:-1] / alpha[1:]) ** 2 * q  # (1/2) B^2/s_p^2 x sigma_t^2/alpha_t^2
        const = 0.5 * d * (ratio - 1.0 - torch.log(ratio))
    t_rows = grid[1:]  # z at t = t_i
    vals = torch.empty((N, K, n), dtype=torch.float64)
    steps_per_chunk = max(1, max_rows // (K * n))
    for lo in range(0, N, steps_per_chunk):
        hi = min(N, lo + steps_per_chunk)
        m = hi - lo
        ts = t_rows[lo:hi, None, None].expand(m, K, n).reshape(-1)
        eps = torch.randn((m * K * n, d), dtype=torch.float64, generator=generator)
        xs = xf[None].expand(m * K, n, d).reshape(-1, d)
        r = _evaluate_rows(field, xs, ts, eps, max_rows, shape)
        if control_variate:
            r = r - _rho2(sch, ts, data_var) * ((eps ** 2).sum(1) - d)
        vals[lo:hi] = (const[lo:hi, None, None] + mean_w[lo:hi, None, None] * r.reshape(m, K, n))
    per = vals.mean(1)  # (N, n)
    var = vals.var(1)  # unbiased over the K draws
    diff = per.sum(0)
    diff_se = torch.sqrt(var.sum(0) / K)
    per_step = per.mean(1)
    # the spread of the per-sample values over the batch holds both the spread of x and the draws' noise
    per_step_se = per.std(1) / math.sqrt(n) if n > 1 else torch.sqrt(var[:, 0] / K)
    rec_v = _reconstruction(field, xf, int(n_dec), decoder, bin_width, data_range, control_variate, data_var,
                            generator, max_rows, shape)
    rec = rec_v.mean(1)
    rec_se = rec_v.std(1) / math.sqrt(n_dec) if n_dec > 1 else torch.full((n,), math.nan, dtype=torch.float64)
    pk, pk_se = prior_kl(sch, xf, prior, data_var, n_prior, generator)
    settings = {"steps": N, "grid_kind": grid_kind if isinstance(steps, (int, np.integer)) else "given",
                "variance": variance, "n_eps": K, "n_dec": int(n_dec), "decoder": decoder, "bin_width": bin_width,
                "data_range": data_range,
                "prior": "gaussian" if prior is None else ("variance" if isinstance(prior, (int, float)) else "callable"),
                "data_var": data_var, "control_variate": bool(control_variate), "schedule": sch.settings()}
    return _finish("ddpm", field, x.shape, d, {"prior": pk, "reconstruction": rec, "diffusion": diff},
                   {"prior": pk_se, "reconstruction": rec_se, "diffusion": diff_se}, nfe0, start, settings,
                   per_step=per_step, per_step_se=per_step_se, grid=grid, extra={"evaluations": N * K + int(n_dec)})


# ------------------------------------------------------------------------------------------------------------------
# exact values for exact targets

def _gaussian_parts(target: Gaussian, x: torch.Tensor):
    ev, U = torch.linalg.eigh(target.cov)
    dx = (x.to(torch.float64) - target.mu) @ U  # coordinates in the eigenbasis
    return ev, dx


def gaussian_diffusion_term(target: Gaussian, schedule, x: torch.Tensor, grid=None, variance: str = "posterior",
                            per_step: bool = False):
    r"""The diffusion term of the exact field of Gaussian data N(mu, Sigma), exact in eps, per sample (x flat (n, d)).

    With r = SNR, w_j = 1 + r e_j (e_j the eigenvalues of Sigma), dx = U^T (x - mu):
    E||eps - eps_hat(z_t)||^2 = sum_j [(r e_j/w_j)^2 + r dx_j^2/w_j^2]. ``grid`` None: the continuous
    L_inf = (1/2) sum_j [log w + 1/w - dx_j^2/(e_j w)] evaluated between w_T and w_0 (its antiderivative in r);
    a grid (or a number of steps of the log-SNR grid): the discrete sum of ``ddpm_bound``'s terms with that variance
    (``per_step``: the terms L_1 .. L_N themselves, shape (N, n)). The discrete sum is a Riemann sum in u = log SNR with
    the integrand taken at the noisier end of each step and step weight (e^{2h} - 1)/2 = h + O(h^2), so it converges
    to L_inf at first order in the step, O(1/N) on a log-SNR grid."""
    ev, dx = _gaussian_parts(target, x)
    if grid is None:
        def F(t):
            r = float(torch.exp(schedule.log_snr(torch.tensor(t, dtype=torch.float64))))
            w = 1.0 + r * ev
            return 0.5 * (torch.log(w) + 1.0 / w - dx ** 2 / (ev * w)).sum(1)

        return F(schedule.t_min) - F(schedule.t_max)
    g = _discrete_grid(schedule, grid, "logsnr")
    alpha, sigma, lam = _coef(schedule, g)
    r = torch.exp(2.0 * lam[1:])  # SNR at t = t_i
    w = 1.0 + r[:, None] * ev[None, :]  # (N, d)
    e2 = ((r[:, None] * ev / w) ** 2).sum(1)[:, None] + (r[:, None, None] * dx[None] ** 2 / w[:, None, :] ** 2).sum(2)
    h = lam[:-1] - lam[1:]
    if variance == "posterior":
        terms = 0.5 * torch.expm1(2.0 * h)[:, None] * e2
    else:
        ratio = (sigma[:-1] / sigma[1:]) ** 2
        terms = (0.5 * (alpha[:-1] / alpha[1:]) ** 2 * -torch.expm1(-2.0 * h))[:, None] * e2 \
            + (0.5 * dx.shape[1] * (ratio - 1.0 - torch.log(ratio)))[:, None]
    return terms if per_step else terms.sum(0)


def _kl_to_marginal_gaussian(ev, dx, r):
    """KL(q(z_t|x) || p_t) for Gaussian data at SNR r: (1/2) sum_j [1/w + r dx_j^2/w - 1 + log w], w = 1 + r e_j."""
    w = 1.0 + r * ev
    return 0.5 * (1.0 / w + r * dx ** 2 / w - 1.0 + torch.log(w)).sum(1)


def gaussian_elbo_closed_form(target: Gaussian, schedule, x: torch.Tensor, prior: float | str | None = None,
                              data_var: float = 1.0) -> dict:
    r"""Every term of the continuous-time ELBO of the exact field of Gaussian data, in closed form, per sample
    (x flat (n, d); Gaussian decoder): "log_p" = log p_0(x), "prior" (KL to N(0, v I), v as in ``prior_kl``, or 0
    with ``prior="exact"``), "reconstruction" = (d/2) log(2 pi V) + (1/2) E||eps - eps_hat(z_0)||^2, "diffusion"
    (``gaussian_diffusion_term``), "elbo", "gap" = log_p - elbo, and the gap's decomposition "decoder_mismatch"
    (Delta_dec, module docstring) and "prior_mismatch" = KL(q(z_T|x)||p(z_T)) - KL(q(z_T|x)||p_T) (their sum equals
    "gap" identically; a test checks it), plus "log_p_model", the log-density of the exact model's own law
    N(mu, alpha_0^2 Sigma C_0^{-1} Sigma + V I), which the ELBO bounds per sample."""
    if not isinstance(target, Gaussian):
        raise TypeError(f"target must be a Gaussian, got {type(target).__name__}; use exact_elbo_terms for mixtures")
    x = x.to(torch.float64)
    n, d = x.shape
    ev, dx = _gaussian_parts(target, x)
    r0 = float(torch.exp(schedule.log_snr(torch.tensor(schedule.t_min, dtype=torch.float64))))
    rT = float(torch.exp(schedule.log_snr(torch.tensor(schedule.t_max, dtype=torch.float64))))
    V = 1.0 / r0
    w0 = 1.0 + r0 * ev
    e2_0 = ((r0 * ev / w0) ** 2).sum() + (r0 * dx ** 2 / w0 ** 2).sum(1)
    rec = 0.5 * d * (_LOG_2PI + math.log(V)) + 0.5 * e2_0
    diff = gaussian_diffusion_term(target, schedule, x)
    kl_T_exact = _kl_to_marginal_gaussian(ev, dx, rT)
    if prior == "exact":
        pk = kl_T_exact
    else:
        pk, _ = prior_kl(schedule, x, prior, data_var)
    elbo = -(pk + rec + diff)
    log_p = target.log_prob(x)
    u = V / ev
    dec = 0.5 * (torch.log1p(u) - u / (1 + u) ** 2 - u ** 2 * dx ** 2 / (ev * (1 + u) ** 2)).sum(1)
    a0 = float(schedule.alpha(torch.tensor(schedule.t_min, dtype=torch.float64)))
    model_ev = a0 * a0 * ev ** 2 / (a0 * a0 * ev + a0 * a0 * V) + V  # alpha^2 e^2/C + V, C = alpha^2 (e + V)
    log_p_model = -0.5 * (d * _LOG_2PI + torch.log(model_ev).sum() + (dx ** 2 / model_ev).sum(1))
    return {"log_p": log_p, "prior": pk, "reconstruction": rec, "diffusion": diff, "elbo": elbo, "gap": log_p - elbo,
            "decoder_mismatch": dec, "prior_mismatch": pk - kl_T_exact, "log_p_model": log_p_model}


def exact_elbo_terms(target: GaussianMixture, schedule, x: torch.Tensor, *, prior: Callable | float | str | None = None,
                     data_var: float = 1.0, n_mc: int = 2048, generator: torch.Generator | None = None) -> dict:
    r"""The continuous-time ELBO of a mixture's exact field and its gap to log p_0(x), per sample, by Monte Carlo over
    z (x flat (n, d); Gaussian decoder). Returns (value, SE) pairs: "log_p" (exact, SE 0); "diffusion" =
    KL(q(z_0|x)||p_{t_0}) - KL(q(z_T|x)||p_T) (the exact L_inf); "decoder_mismatch" = E_{z_0|x}[log q(x|z_0) -
    log N(x; x_hat(z_0), V I)]; "prior_mismatch" = KL(q(z_T|x)||p(z_T)) - KL(q(z_T|x)||p_T) (0 for
    ``prior="exact"``); "elbo" = log_p - decoder_mismatch - prior_mismatch; "gap" = the two mismatches. Each estimate
    uses its own ``n_mc`` draws of eps per sample; the integrands are differences of log-densities at the same z,
    whose chi^2 parts cancel, so the SEs are small. A Gaussian target is delegated to ``gaussian_elbo_closed_form``
    (SE 0)."""
    x = x.to(torch.float64)
    n, d = x.shape
    zero = torch.zeros(n, dtype=torch.float64)
    if isinstance(target, Gaussian):
        cf = gaussian_elbo_closed_form(target, schedule, x, prior=prior, data_var=data_var)
        return {k: (cf[k], zero) for k in ("log_p", "diffusion", "decoder_mismatch", "prior_mismatch", "elbo", "gap")}

    def kl_to_marginal(t):
        a, s, _ = _coef(schedule, t)
        eps = torch.randn((n_mc, n, d), dtype=torch.float64, generator=generator)
        z = (a * x[None] + s * eps).reshape(-1, d)
        log_q = -0.5 * d * (_LOG_2PI + 2.0 * math.log(float(s))) - 0.5 * (eps ** 2).sum(-1)
        v = log_q - target.log_prob_t(z, t, schedule).reshape(n_mc, n)
        return v.mean(0), v.var(0) / n_mc

    t0, T = schedule.t_min, schedule.t_max
    k0, k0v = kl_to_marginal(t0)
    kT, kTv = kl_to_marginal(T)
    diff, diff_se = k0 - kT, torch.sqrt(k0v + kTv)
    # decoder mismatch
    a0, s0, lam0 = _coef(schedule, t0)
    V = float(torch.exp(-2.0 * lam0))
    eps = torch.randn((n_mc, n, d), dtype=torch.float64, generator=generator)
    z0 = (a0 * x[None] + s0 * eps).reshape(-1, d)
    xhat = target.denoiser(z0, t0, schedule).reshape(n_mc, n, d)
    log_p0 = target.log_prob(x)
    log_q_x = log_p0[None] - 0.5 * d * (_LOG_2PI + 2.0 * math.log(float(s0))) - 0.5 * (eps ** 2).sum(-1) \
        - target.log_prob_t(z0, t0, schedule).reshape(n_mc, n)
    log_dec = -0.5 * d * (_LOG_2PI + math.log(V)) - 0.5 * ((x[None] - xhat) ** 2).sum(-1) / V
    v = log_q_x - log_dec
    dec, dec_se = v.mean(0), v.std(0) / math.sqrt(n_mc)
    if prior == "exact":
        pm, pm_se = zero, zero
    else:
        pk, pk_se = prior_kl(schedule, x, prior, data_var, n_mc, generator)
        pm, pm_se = pk - kT, torch.sqrt(pk_se ** 2 + kTv)
    gap = dec + pm
    gap_se = torch.sqrt(dec_se ** 2 + pm_se ** 2)
    return {"log_p": (log_p0, zero), "diffusion": (diff, diff_se), "decoder_mismatch": (dec, dec_se),
            "prior_mismatch": (pm, pm_se), "elbo": (log_p0 - gap, gap_se), "gap": (gap, gap_se)}
