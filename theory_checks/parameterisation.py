"""Area "parameterisation": parameterisations, Tweedie's formula (first and second order) and exact mixture scores."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from diffusion_lab import param
from diffusion_lab.schedules import Schedule
from diffusion_lab.targets import GaussianMixture, bimodal_1d, ring8

from .catalogue import Outcome, check, register_many
from .kernels import DEFAULT_SCHEDULES


def random_mixture(K: int, d: int, seed: int = 0, spread: float = 2.0) -> GaussianMixture:
    """A K-component mixture in R^d with random weights, means and full covariances (A A^T + 0.1 I)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(K, dtype=torch.float64, generator=g) + 0.2
    mu = spread * torch.randn(K, d, dtype=torch.float64, generator=g)
    A = 0.6 * torch.randn(K, d, d, dtype=torch.float64, generator=g)
    cov = A @ A.transpose(-1, -2) + 0.1 * torch.eye(d, dtype=torch.float64)
    return GaussianMixture(w / w.sum(), mu, cov, name=f"random_gmm(K={K},d={d},seed={seed})")


def _coeffs(schedule: Schedule, t, x):
    t = torch.as_tensor(t, dtype=torch.float64)
    c = [schedule.alpha(t), schedule.sigma(t), schedule.dalpha(t), schedule.dsigma(t)]
    return [ci.reshape(ci.shape + (1,) * (x.ndim - ci.ndim)) for ci in c]


def _maxrel(a, b, floor: float = 0.0) -> float:
    """max |a - b| / max(max |b|, floor): relative error, measured against ``floor`` where b itself is ~0 (the scale
    of the inputs an identity combines, so a zero reference does not turn round-off into an infinite residual)."""
    return float((a - b).abs().max() / max(float(b.abs().max()), floor, 1e-300))


def closed_form_predictions(x0, eps, a, s, da, ds) -> dict:
    """The five prediction targets written from their definitions (independently of ``param``):
    eps, x0, score = -eps/sigma, v = alpha eps - sigma x0 (Salimans & Ho 2022), velocity u = alpha' x0 + sigma' eps."""
    return {"eps": eps, "x0": x0, "score": -eps / s, "v": a * eps - s * x0, "velocity": da * x0 + ds * eps}


def roundtrip_residual(schedule: Schedule, t, x0, eps) -> float:
    """With x = alpha x0 + sigma eps, ``param.from_x0_eps`` gives each prediction type's closed form (eps, x0,
    score = -eps/sigma, v = alpha eps - sigma x0, u = alpha' x0 + sigma' eps, written in the check), and
    ``param.convert`` maps the closed form of every type to the closed form of every other one (v only on VP
    schedules). Max relative error."""
    kinds = [k for k in param.PREDICTIONS if k != "v" or schedule.variance_preserving]
    a, s, da, ds = _coeffs(schedule, t, x0)
    x = a * x0 + s * eps
    closed = closed_form_predictions(x0, eps, a, s, da, ds)
    worst = max(_maxrel(param.from_x0_eps(k, x0, eps, a, s, da, ds), closed[k]) for k in kinds)
    for src, dst in itertools.permutations(kinds, 2):
        worst = max(worst, _maxrel(param.convert(closed[src], src, dst, x, a, s, da, ds), closed[dst]))
    return worst


def v_prediction_residual(schedule: Schedule, t, x0, eps) -> float:
    """v = alpha eps - sigma x0 gives x0 = alpha x - sigma v, eps = sigma x + alpha v on VP, and with
    alpha = cos phi, sigma = sin phi, v = dx/dphi (Salimans & Ho 2022). The flow velocity
    u = alpha' x0 + sigma' eps differs from v, yet both convert to the same x0."""
    a, s, da, ds = _coeffs(schedule, t, x0)
    x = a * x0 + s * eps
    v = param.from_x0_eps("v", x0, eps, a, s)
    scale = max(float(x0.abs().max()), float(eps.abs().max()))  # |x|, |v| <= |x0| + |eps| on VP
    r1 = _maxrel(a * x - s * v, x0, scale)
    r2 = _maxrel(s * x + a * v, eps, scale)
    dphi = (a * ds - s * da) / (a * a + s * s)
    dx_dphi = (da * x0 + ds * eps) / dphi
    r3 = _maxrel(dx_dphi, v, scale)
    u = param.from_x0_eps("velocity", x0, eps, a, s, da, ds)
    r4 = _maxrel(param.convert(u, "velocity", "x0", x, a, s, da, ds), param.convert(v, "v", "x0", x, a, s), scale)
    return max(r1, r2, r3, r4)


def velocity_residual(target: GaussianMixture, schedule: Schedule, x, t) -> float:
    """v(x,t) = E[alpha' x0 + sigma' eps | x_t = x] = alpha' x0_hat + sigma' eps_hat equals the PF-ODE drift
    f x - g^2/2 grad log p_t (Song et al. 2021, eq. 13); the field's velocity against the closed-form score.
    Relative error, with the size of the terms combined (|f x| and g^2/2 times ``component_score_scale``) as the
    floor of the reference."""
    field = target.field(schedule)
    v = field.velocity(x, t)
    tt = torch.as_tensor(t, dtype=torch.float64)
    drift = schedule.f(tt) * x - 0.5 * schedule.g2(tt) * target.score(x, t, schedule)
    floor = max(float((schedule.f(tt) * x).abs().max()),
                0.5 * float(schedule.g2(tt)) * component_score_scale(target, schedule, x, t))
    return _maxrel(v, drift, floor)


def autograd_score(target: GaussianMixture, schedule: Schedule, x, t):
    """grad_x log p_t(x) by autograd of the closed-form log-density (float64)."""
    xr = x.detach().clone().requires_grad_(True)
    lp = target.log_prob_t(xr, t, schedule)
    (g,) = torch.autograd.grad(lp.sum(), xr)
    return g


def component_score_scale(target: GaussianMixture, schedule: Schedule, x, t) -> float:
    """max over points n and components k of |C_k^{-1}(alpha mu_k - x_n)|, C_k = alpha^2 Sigma_k + sigma^2 I: the
    size of the terms the mixture score sum_k r_k C_k^{-1}(alpha mu_k - x) adds up. Where they cancel (x between
    opposite means, x = 0 on a symmetric mixture) the score is ~0 while its round-off is eps times this scale, so
    relative errors of score identities are measured against it as a floor."""
    tt = torch.as_tensor(t, dtype=torch.float64)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    C = a * a * target.covs + s * s * torch.eye(target.dim, dtype=torch.float64)  # (K, d, d)
    diff = a * target.means[None, :, :] - x.to(torch.float64)[:, None, :]  # (n, K, d)
    terms = torch.linalg.solve(C[None], diff.unsqueeze(-1)).squeeze(-1)
    return float(terms.abs().max())


def score_residual(target: GaussianMixture, schedule: Schedule, x, t) -> float:
    """The closed-form mixture score sum_k r_k C_k^{-1}(alpha mu_k - x) and the exact field's score equal
    the autograd gradient of log p_t (each component noised in closed form). Relative error, with the size of
    the per-component terms as the floor of the reference (``component_score_scale``)."""
    g = autograd_score(target, schedule, x, t)
    s1 = target.score(x, t, schedule)
    s2 = target.field(schedule, prediction="x0").score(x, t)
    floor = component_score_scale(target, schedule, x, t)
    return max(_maxrel(s1, g, floor), _maxrel(s2, g, floor))


def tweedie_residual(target: GaussianMixture, schedule: Schedule, x, t, converter=param.to_x0_eps) -> float:
    """Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log p_t)/alpha (Efron 2011). The mixture posterior mean
    sum_k r_k m_k against ``converter`` applied to the autograd score (converter is injectable so a
    test can show that a wrong sign fails). Relative error, with the size of the terms both sides combine as the
    floor of the reference: |x|/alpha, sigma^2 |score terms|/alpha and the means |mu_k| (the posterior mean
    mu_k + gain (x - alpha mu_k) cancels its mu_k where sigma << alpha)."""
    g = autograd_score(target, schedule, x, t)
    a, s, da, ds = _coeffs(schedule, t, x)
    x0_tweedie, _ = converter(g, "score", x, a, s, da, ds)
    a0, s0 = float(a.reshape(-1)[0]), float(s.reshape(-1)[0])
    floor = max(float(x.abs().max()) / a0, s0 * s0 * component_score_scale(target, schedule, x, t) / a0,
                float(target.means.abs().max()))
    return _maxrel(x0_tweedie, target.denoiser(x, t, schedule), floor)


def tweedie2_residual(target: GaussianMixture, schedule: Schedule, x, t) -> float:
    """Second-order Tweedie: Cov[x0 | x_t] = (sigma^2/alpha^2)(I + sigma^2 grad^2 log p_t) (Efron 2011),
    with the Hessian by autograd against the mixture posterior covariance."""
    tt = torch.as_tensor(t, dtype=torch.float64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    d = x.shape[1]
    hess = []
    for xi in x:
        H = torch.autograd.functional.hessian(lambda z: target.log_prob_t(z[None], t, schedule).sum(), xi)
        hess.append(H)
    H = torch.stack(hess)
    cov_tw = (s * s / (a * a)) * (torch.eye(d, dtype=torch.float64) + s * s * H)
    return _maxrel(cov_tw, target.posterior_cov(x, t, schedule))


def score_fd_order(target: GaussianMixture, schedule: Schedule, x, t, hs=(0.2, 0.1, 0.05, 0.025)) -> float:
    """A central difference of log p_t converges to the score at order 2 in h: fitted slope."""
    s = target.score(x, t, schedule)
    errs = []
    for h in hs:
        fd = torch.empty_like(x)
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[:, j] = h
            fd[:, j] = (target.log_prob_t(x + e, t, schedule) - target.log_prob_t(x - e, t, schedule)) / (2 * h)
        errs.append(float((fd - s).abs().max()))
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def dsm_scaling_residual(target: GaussianMixture, schedule: Schedule, x0, eps, t) -> float:
    """||s_theta + eps/sigma||^2 = ||eps_hat - eps||^2 / sigma^2 with s_theta = -eps_hat/sigma:
    a uniform-weight eps-loss is a score loss weighted by sigma^2."""
    a, s, _, _ = _coeffs(schedule, t, x0)
    x = a * x0 + s * eps
    field = target.field(schedule, prediction="x0")
    score, eps_hat = field.score(x, t), field.eps(x, t)
    lhs = ((score + eps / s) ** 2).sum(-1)
    rhs = ((eps_hat - eps) ** 2).sum(-1) / (s.reshape(-1) ** 2)
    return _maxrel(lhs, rhs)


# ---------------------------------------------------------------------------------------------
# default cases

def _case(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    tg = random_mixture(3, 3, seed=seed)
    x = 1.5 * torch.randn(n, 3, dtype=torch.float64, generator=g)
    return tg, x, g


def _mid_t(s: Schedule, u: float = 0.4) -> float:
    return float(s.t_from_lam(torch.tensor((1 - u) * s.lam_range[1] + u * s.lam_range[0], dtype=torch.float64)))


def _roundtrip(s):
    _, x0, g = _case()
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    t = torch.linspace(s.t_min, s.t_max, x0.shape[0], dtype=torch.float64)
    return roundtrip_residual(s, t, x0, eps)


register_many(
    [(f"parameterisation.param_roundtrip[{n}]", (lambda s=s: _roundtrip(s))) for n, s in DEFAULT_SCHEDULES.items()],
    doc=roundtrip_residual.__doc__, area="parameterisation", kind="exact", tol=1e-10, case="closed forms of eps/x0/v/score/velocity and all ordered conversions between them, 16 (x0, eps, t) "
         "with t from t_min to t_max",
    reference="Ho et al. 2020; Salimans & Ho 2022; Karras et al. 2022 (prediction types)",
)


@check("parameterisation.v_prediction[vp,cosine]", area="parameterisation", kind="exact", tol=1e-10,
       case="VP linear and cosine, 16 (x0, eps, t)", reference="Salimans & Ho 2022")
def _vpred():
    """v = alpha eps - sigma x0 inverts to (x0, eps) on VP, equals dx/dphi, and differs from the flow velocity."""
    _, x0, g = _case(1)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    res = 0.0
    for name in ("vp", "cosine"):
        s = DEFAULT_SCHEDULES[name]
        t = torch.linspace(s.t_min, s.t_max, x0.shape[0], dtype=torch.float64)
        res = max(res, v_prediction_residual(s, t, x0, eps))
    return res


register_many(
    [(f"parameterisation.velocity_is_pf_drift[{n}]", (lambda s=s: velocity_residual(_case()[0], s, _case()[1], _mid_t(s))))
     for n, s in DEFAULT_SCHEDULES.items()],
    doc=velocity_residual.__doc__, area="parameterisation", kind="exact", tol=1e-10, case="random 3-component 3-D GMM, 16 x, mid-lambda t",
    reference="Song et al. 2021, eq. 13; Lipman et al. 2023",
)


@check("parameterisation.tweedie", area="parameterisation", kind="exact", tol=1e-10,
       case="random 3-D GMM, 16 x, every schedule at mid-lambda t", reference="Efron 2011 (Tweedie's formula)")
def _tweedie():
    """E[x0|x_t] = (x_t + sigma^2 grad log p_t)/alpha against the mixture posterior mean."""
    tg, x, _ = _case()
    return max(tweedie_residual(tg, s, x, _mid_t(s)) for s in DEFAULT_SCHEDULES.values())


@check("parameterisation.tweedie_second_order", area="parameterisation", kind="exact", tol=1e-10,
       case="random 3-D GMM, 8 x, VP / VE / RF at mid-lambda t",
       reference="Efron 2011 (second-order Tweedie)")
def _tweedie2():
    """Cov[x0|x_t] = (sigma^2/alpha^2)(I + sigma^2 Hess log p_t) against the mixture posterior covariance."""
    tg, x, _ = _case(n=8)
    return max(tweedie2_residual(tg, DEFAULT_SCHEDULES[n], x, _mid_t(DEFAULT_SCHEDULES[n])) for n in ("vp", "ve", "rf"))


@check("parameterisation.score_autograd", area="parameterisation", kind="exact", tol=1e-10,
       case="ring8, bimodal_1d, random 3-D GMM; every schedule", reference="Gaussian mixture noised in closed form")
def _score():
    """Closed-form GMM score = autograd gradient of the closed-form log p_t (ring8, 1-D, random 3-D)."""
    res = 0.0
    g = torch.Generator().manual_seed(3)
    for tg in (ring8(), bimodal_1d(), _case()[0]):
        x = 2.0 * torch.randn(16, tg.dim, dtype=torch.float64, generator=g)
        for s in DEFAULT_SCHEDULES.values():
            res = max(res, score_residual(tg, s, x, _mid_t(s, 0.7)))
    return res


@check("parameterisation.score_fd_order", area="parameterisation", kind="order", tol=0.15,
       case="ring8 under VP at t=0.3, h in {0.2..0.025}", reference="central differences, O(h^2)")
def _score_fd():
    """Central differences of log p_t converge to the closed-form score at order 2 in h."""
    g = torch.Generator().manual_seed(4)
    x = 2.0 * torch.randn(16, 2, dtype=torch.float64, generator=g)
    slope = score_fd_order(ring8(), DEFAULT_SCHEDULES["vp"], x, 0.3)
    return Outcome(abs(slope - 2.0), f"slope {slope:.3f} (expected 2)")


@check("parameterisation.dsm_eps_scaling", area="parameterisation", kind="exact", tol=1e-10,
       case="random 3-D GMM, 16 (x0, eps), VP and EDM", reference="Vincent 2011; Ho et al. 2020 (eps-loss)")
def _dsm():
    """||s + eps/sigma||^2 = ||eps_hat - eps||^2 / sigma^2."""
    tg, x0, g = _case(2)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    return max(dsm_scaling_residual(tg, DEFAULT_SCHEDULES[n], x0, eps, _mid_t(DEFAULT_SCHEDULES[n])) for n in ("vp", "edm"))
