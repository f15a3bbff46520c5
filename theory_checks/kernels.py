"""Area "kernels": forward kernels and schedules (VP, sub-VP, VE, EDM, rectified flow, discrete DDPM).

Residual functions take their parameters explicitly so tests can draw them with Hypothesis; the
catalogue entries at the bottom run them on fixed cases.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp

from diffusion_lab import schedules as S
from diffusion_lab.schedules import Schedule

from .catalogue import check, register_many

DEFAULT_SCHEDULES: dict[str, Schedule] = {name: cls() for name, cls in S.SCHEDULES.items()}


def _tgrid(schedule: Schedule, n: int = 33) -> torch.Tensor:
    # interior points, away from the DDPM knots where the interpolant is not differentiable
    u = (torch.arange(n, dtype=torch.float64) + 0.37) / n
    return schedule.t_min + u * (schedule.t_max - schedule.t_min)


def derivative_residual(schedule: Schedule, t) -> float:
    """alpha'(t) and sigma'(t) equal the autograd derivatives of alpha(t) and sigma(t).

    Max error over t (float64), relative to |alpha'| for alpha and to |sigma'| + |f sigma| for sigma: the two
    terms of g^2 = 2 sigma sigma' - 2 f sigma^2, so that a sigma' that is tiny next to f sigma (sub-VP near
    t = 1, where autograd of 1 - e^{-B} itself cancels) is judged on the scale it enters. Exact class.
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).clone().requires_grad_(True)
    a, s = schedule.alpha(t), schedule.sigma(t)
    da_ad, = torch.autograd.grad(a.sum(), t)
    ds_ad, = torch.autograd.grad(s.sum(), t)
    with torch.no_grad():
        da, ds = schedule.dalpha(t), schedule.dsigma(t)
        scale_a = da_ad.abs() + a.abs() * 1e-12
        scale_s = ds_ad.abs() + (schedule.f(t) * s).abs()
        ra = ((da - da_ad).abs() / scale_a.clamp_min(1e-300)).max()
        rs = ((ds - ds_ad).abs() / scale_s.clamp_min(1e-300)).max()
    return float(torch.maximum(ra, rs))


def f_g_residual(schedule: Schedule, t) -> float:
    """f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 = -2 sigma^2 lambda'(t) (Kingma et al. 2021;
    Lu et al. 2022, Sec. 2).

    The schedule's closed-form f and g^2 against autograd derivatives of log alpha, sigma^2 and lambda.
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).clone().requires_grad_(True)
    la = schedule.log_alpha(t)
    s2 = schedule.sigma(t) ** 2
    lam = schedule.lam(t)
    dla, = torch.autograd.grad(la.sum(), t)
    ds2, = torch.autograd.grad(s2.sum(), t)
    dlam, = torch.autograd.grad(lam.sum(), t)
    with torch.no_grad():
        f, g2 = schedule.f(t), schedule.g2(t)
        g2_a = ds2 - 2 * dla * s2
        g2_b = -2.0 * s2 * dlam
        rf = ((f - dla).abs() / dla.abs().clamp_min(1e-300)).max() if dla.abs().max() > 0 else (f - dla).abs().max()
        rg = torch.maximum(((g2 - g2_a).abs() / g2.abs()).max(), ((g2 - g2_b).abs() / g2.abs()).max())
    return float(torch.maximum(torch.as_tensor(rf), rg))


def lambda_roundtrip_residual(schedule: Schedule, t) -> float:
    """t(lambda(t)) = t and lambda is strictly decreasing (lambda = log(alpha/sigma), half the
    log-SNR; closed-form inverse as in DPM-Solver's NoiseScheduleVP.inverse_lambda, Lu et al. 2022).

    Returns the max relative round-trip error, or inf if lambda is not strictly decreasing on the grid. Strict
    decrease is demanded only where float64 can resolve it: between neighbours whose expected change
    |lambda'(t)| (t_{k+1} - t_k) exceeds lambda's own rounding, 8 eps (max(1, |lambda|) + e^{2 lambda}) -- the
    second term because sigma^2 = 1 - alpha^2 on VP schedules carries an absolute error eps alpha^2, i.e. a
    relative one eps SNR; closer neighbours (e.g. one ulp apart) may only not increase beyond that rounding.
    """
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    t_sorted, _ = torch.sort(t)
    lam = schedule.lam(t_sorted)
    if t_sorted.numel() > 1:
        dt, dlam = torch.diff(t_sorted), torch.diff(lam)
        eps = torch.finfo(torch.float64).eps
        rounding = 8 * eps * (torch.maximum(lam[1:].abs(), torch.ones_like(dt)) + torch.exp(2 * lam[1:]))
        resolvable = (schedule.dlam(t_sorted[1:]).abs() * dt > rounding) & (dt > 0)
        if not (dlam[resolvable] < 0).all() or not (dlam[dt > 0] <= rounding[dt > 0]).all():
            return float("inf")
    back = schedule.t_from_lam(lam)
    return float(((back - t_sorted).abs() / t_sorted.abs().clamp_min(1e-300)).max())


def kernel_moment_residual(schedule: Schedule, t0: float | None = None, t1: float | None = None) -> float:
    """The forward SDE dx = f x dt + g dW carries the kernel moments: for x_t = alpha x0 + sigma eps,

        m' = f m  (m = alpha x0),    v' = 2 f v + g^2  (v = sigma^2)

    integrated by DOP853 (rtol 1e-12) from t0 to t1 reproduces alpha(t1)/alpha(t0) and sigma^2(t1)
    (moment ODEs of a linear SDE, Sarkka & Solin 2019; Song et al. 2021, App. B; for VE
    this pins the convention sigma(0) = sigma_min). Quadrature class.
    """
    t0 = schedule.t_min if t0 is None else t0
    t1 = schedule.t_max if t1 is None else t1

    def rhs(t, y):
        tt = torch.tensor(t, dtype=torch.float64)
        f, g2 = float(schedule.f(tt)), float(schedule.g2(tt))
        return [f, 2.0 * f * y[1] + g2]

    # integrate piece by piece between the schedule's kinks (DDPM's knots), where f is smooth
    knots = getattr(schedule, "knots", None)
    inner = [] if knots is None else [k for k in knots() if t0 < k < t1]
    y = [0.0, float(schedule.sigma(torch.tensor(t0, dtype=torch.float64)) ** 2)]
    edges = [t0, *inner, t1]
    for a, b in zip(edges[:-1], edges[1:]):
        # clamp into the open piece so the one-sided slope of this piece is used at its ends
        f_seg = (lambda t, y, a=a, b=b: rhs(min(max(t, a + 1e-15), b - 1e-15), y)) if inner else rhs
        y = solve_ivp(f_seg, (a, b), y, method="DOP853", rtol=1e-12, atol=1e-14).y[:, -1]
    la_num, v_num = y[0], y[1]
    ta, tb = (torch.tensor(v, dtype=torch.float64) for v in (t0, t1))
    la_true = float(schedule.log_alpha(tb) - schedule.log_alpha(ta))
    v_true = float(schedule.sigma(tb) ** 2)
    r_alpha = abs(math.expm1(la_num - la_true))
    return max(r_alpha, abs(v_num - v_true) / v_true)


def ddpm_posterior_residual(schedule: S.DDPMDiscrete, i: int, x0: float, xi: float) -> float:
    """DDPM posterior q(x_{i-1} | x_i, x0) = N(mu~, beta~) (Ho et al. 2020, eq. 6-7):

        mu~ = sqrt(abar_{i-1}) beta_i/(1-abar_i) x0 + sqrt(1-beta_i)(1-abar_{i-1})/(1-abar_i) x_i,
        beta~ = (1-abar_{i-1}) beta_i/(1-abar_i)

    against Bayes' rule by completing the square in x_{i-1}: prior N(sqrt(abar_{i-1}) x0, 1-abar_{i-1}) times
    likelihood N(x_i; sqrt(1-beta_i) x_{i-1}, beta_i).
    """
    b = schedule.betas
    ab = schedule.alphas_cumprod
    bi, abi = b[i - 1], ab[i - 1]
    abp = ab[i - 2] if i >= 2 else torch.tensor(1.0, dtype=torch.float64)
    mu_t = abp.sqrt() * bi / (1 - abi) * x0 + (1 - bi).sqrt() * (1 - abp) / (1 - abi) * xi
    var_t = (1 - abp) * bi / (1 - abi)
    prec = 1 / (1 - abp) + (1 - bi) / bi
    var_b = 1 / prec
    mu_b = var_b * (abp.sqrt() * x0 / (1 - abp) + (1 - bi).sqrt() * xi / bi)
    scale = abs(float(mu_b)) + math.sqrt(float(var_b))
    return max(abs(float(mu_t - mu_b)) / scale, abs(float(var_t / var_b - 1)))


def ddpm_continuum_order(ns=(50, 100, 200, 400, 800, 1600)) -> float:
    """With beta_i = beta(t_i)/N, log abar_N + B(1) = O(1/N) (Song et al. 2021, App. B:
    DDPM is a discretisation of the VP SDE): least-squares slope of log|err|
    against log(1/N)."""
    errs = []
    vp = S.VPLinear()
    for n in ns:
        sch = S.DDPMDiscrete(n_steps=n)
        errs.append(abs(float(torch.log(sch.alphas_cumprod[-1]) + vp.B(1.0))))
    h = 1.0 / np.asarray(ns, dtype=float)
    return float(np.polyfit(np.log(h), np.log(errs), 1)[0])


# ---------------------------------------------------------------------------------------------
# catalogue entries

def _per_schedule(fn):
    return [(name, (lambda s=s: fn(s, _tgrid(s)))) for name, s in DEFAULT_SCHEDULES.items()]


register_many(
    [(f"kernels.derivatives[{n}]", f) for n, f in _per_schedule(derivative_residual)],
    doc=derivative_residual.__doc__, area="kernels", kind="exact", tol=1e-10, case="33 t in (t_min, t_max), float64",
    reference="Kingma et al. 2021; Lu et al. 2022, Sec. 2",
)
register_many(
    [(f"kernels.f_g_consistency[{n}]", f) for n, f in _per_schedule(f_g_residual)],
    doc=f_g_residual.__doc__, area="kernels", kind="exact", tol=1e-10, case="33 t in (t_min, t_max), float64",
    reference="Kingma et al. 2021; Lu et al. 2022, Sec. 2",
)
register_many(
    [(f"kernels.lambda_roundtrip[{n}]", f) for n, f in _per_schedule(lambda_roundtrip_residual)],
    doc=lambda_roundtrip_residual.__doc__, area="kernels", kind="exact", tol=1e-10, case="33 t in (t_min, t_max), float64",
    reference="Lu et al. 2022 (NoiseScheduleVP.inverse_lambda)",
)
register_many(
    [(f"kernels.kernel_moments[{n}]", (lambda s=s: kernel_moment_residual(s)))
     for n, s in DEFAULT_SCHEDULES.items()],
    doc=kernel_moment_residual.__doc__, area="kernels", kind="quadrature", tol=1e-8, case="moment ODEs over [t_min, t_max], DOP853 rtol 1e-12",
    reference="Song et al. 2021, App. B; Karras et al. 2022; Liu et al. 2022",
)


@check("kernels.ddpm_posterior", area="kernels", kind="exact", tol=1e-10,
       case="N=1000, steps i in {2, 10, 500, 1000}, x0=0.7, x_i=-1.3", reference="Ho et al. 2020 eq. 7")
def _ddpm_posterior():
    """DDPM posterior mean and variance equal Bayes' rule by completing the square."""
    sch = S.DDPMDiscrete()
    return max(ddpm_posterior_residual(sch, i, 0.7, -1.3) for i in (2, 10, 500, 1000))


@check("kernels.ddpm_continuum_order", area="kernels", kind="order", tol=0.15,
       case="N in {50..1600}, linear betas beta(t_i)/N",
       reference="Song et al. 2021, App. B (DDPM as a discretised VP SDE)")
def _ddpm_order():
    """log abar_N + B(1) = O(1/N): measured slope vs expected order 1."""
    from .catalogue import Outcome

    slope = ddpm_continuum_order()
    return Outcome(abs(slope - 1.0), f"slope {slope:.3f} (expected 1)")
