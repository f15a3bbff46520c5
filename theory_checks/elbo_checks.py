"""Area "likelihood", the variational view: the continuous-time (VDM) ELBO and the discrete DDPM bound of exact fields
against their closed forms and against the exact log-likelihood of the data (``diffusion_lab.elbo``)."""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab import elbo as E
from diffusion_lab import schedules as S
from diffusion_lab.targets import bimodal_1d, gaussian_2d, ring8

from .catalogue import Outcome, check


def _batch_z(est, se, ref):
    """sum_i (est_i - ref_i) / sqrt(sum_i se_i^2): the batch mean's error in units of its Monte-Carlo SE."""
    return float((est - ref).sum() / torch.sqrt((se ** 2).sum()))


#: VP with its default ends, and a short VP range (t_min = 0.05, t_max = 0.5) where the decoder and prior
#: mismatches are O(0.1-1) nats and the closed-form gap is resolved by the Monte-Carlo ELBO
GAUSSIAN_CASES = (("vp", S.VPLinear()), ("vp[0.05,0.5]", S.VPLinear(t_min=0.05, t_max=0.5)))


def elbo_gaussian_z(n: int = 64, seed: int = 0) -> tuple[float, str]:
    """The continuous ELBO (Gauss-Legendre in log SNR, 32 nodes x 16 draws) of the exact field of gaussian_2d equals
    its closed form term by term, and the prior KL's closed form equals a Monte-Carlo estimate of its definition: the
    largest |batch z| over cases and terms, and the per-sample |z| extremes."""
    tg = gaussian_2d()
    worst, parts = 0.0, []
    for label, sch in GAUSSIAN_CASES:
        g = torch.Generator().manual_seed(seed)
        x = tg.sample(n, g)
        cf = E.gaussian_elbo_closed_form(tg, sch, x)
        r = E.continuous_elbo(tg.field(sch), x, generator=g)
        zs = {k: _batch_z(r.terms[k], r.term_se[k], cf[k]) for k in ("reconstruction", "diffusion")}
        zs["elbo"] = _batch_z(r.elbo, r.se, cf["elbo"])
        # the prior KL's closed form against Monte Carlo of its definition E[log q(z_T|x) - log p(z_T)]
        a, s = (float(c(torch.tensor(sch.t_max, dtype=torch.float64))) for c in (sch.alpha, sch.sigma))
        v = a * a + s * s
        log_prior = lambda z, v=v: -0.5 * (z ** 2).sum(1) / v - 0.5 * z.shape[1] * math.log(2 * math.pi * v)  # noqa: E731
        pk, pk_se = E.prior_kl(sch, x, log_prior, n_mc=1024, generator=g)
        zs["prior"] = _batch_z(pk, pk_se, cf["prior"])
        zmax = float(((r.elbo - cf["elbo"]) / r.se).abs().max())
        worst = max(worst, *(abs(v) for v in zs.values()))
        parts.append(f"{label}: gap {float(cf['gap'].mean()):.3g} nats, batch z " +
                     ", ".join(f"{k} {v:+.2f}" for k, v in zs.items()) + f", max per-sample |z| {zmax:.2f}")
    return worst, "; ".join(parts)


@check("likelihood.elbo_gaussian_closed_form", area="likelihood", kind="mc", tol=5.0,
       case="gaussian_2d, exact field, VP on [1e-3, 1] and on [0.05, 0.5]; 64 samples; 32 Gauss-Legendre nodes in "
            "log SNR x 16 draws",
       reference="Kingma et al. 2021 (VDM), eq. 11 and 17")
def _elbo_gaussian():
    """The continuous-time ELBO of the exact field of Gaussian data (prior KL + Gaussian decoder + (1/2) int
    ||eps - eps_hat||^2 dlogSNR) is within 5 batch SEs of its closed form, term by term (the prior KL against Monte
    Carlo of its definition)."""
    z, detail = elbo_gaussian_z()
    return Outcome(z, detail)


MIXTURE_CASES = (("ring8/vp", ring8, S.VPLinear()), ("bimodal_1d/vp[0.05,0.6]", bimodal_1d,
                                                     S.VPLinear(t_min=0.05, t_max=0.6)))


def elbo_mixture_z(n: int = 48, seed: int = 0) -> tuple[float, str]:
    """The continuous ELBO of a mixture's exact field against the exact decomposition log p_0 - Delta_dec -
    Delta_prior, and its diffusion term against KL(q(z_0|x)||p_{t_0}) - KL(q(z_T|x)||p_T): largest |batch z|."""
    worst, parts = 0.0, []
    for label, make, sch in MIXTURE_CASES:
        tg = make()
        g = torch.Generator().manual_seed(seed)
        x = tg.sample(n, g)
        ex = E.exact_elbo_terms(tg, sch, x, generator=g)
        r = E.continuous_elbo(tg.field(sch), x, generator=g)
        z_elbo = float((r.elbo - ex["elbo"][0]).sum() / torch.sqrt((r.se ** 2 + ex["elbo"][1] ** 2).sum()))
        z_diff = float((r.terms["diffusion"] - ex["diffusion"][0]).sum()
                       / torch.sqrt((r.term_se["diffusion"] ** 2 + ex["diffusion"][1] ** 2).sum()))
        worst = max(worst, abs(z_elbo), abs(z_diff))
        parts.append(f"{label}: exact gap {float(ex['gap'][0].mean()):.3g} nats, batch z elbo {z_elbo:+.2f}, "
                     f"diffusion {z_diff:+.2f}")
    return worst, "; ".join(parts)


@check("likelihood.elbo_mixture_exact_decomposition", area="likelihood", kind="mc", tol=5.0,
       case="ring8 under VP and bimodal_1d under VP on [0.05, 0.6], exact fields, 48 samples; exact terms by Monte "
            "Carlo over z (2048 draws)",
       reference="Kingma et al. 2021 (VDM); Guo, Shamai & Verdu 2005 (I-MMSE)")
def _elbo_mixture():
    """For an exact field, ELBO(x) = log p_0(x) - E_{z_0|x}[log q(x|z_0)/p(x|z_0)] - E_{z_T|x}[log p_T/p(z_T)] and
    L_inf(x) = KL(q(z_0|x)||p_{t_0}) - KL(q(z_T|x)||p_T), per sample: batch z within 5."""
    z, detail = elbo_mixture_z()
    return Outcome(z, detail)


def elbo_bound_z(n: int = 32, seed: int = 0, steps: int = 1000) -> tuple[float, str]:
    """log p_0(x) - ELBO(x) >= 0 up to Monte-Carlo error, per sample and for the batch mean, for the continuous ELBO
    and the discrete bound with N = ``steps`` (uniform grid): the largest -gap/SE."""
    worst, parts = -math.inf, []
    for label, make in (("ring8", ring8), ("bimodal_1d", bimodal_1d)):
        tg, sch = make(), S.VPLinear()
        g = torch.Generator().manual_seed(seed)
        x = tg.sample(n, g)
        log_p = tg.log_prob(x)
        f = tg.field(sch)
        for kind, r in (("continuous", E.continuous_elbo(f, x, generator=g)),
                        (f"ddpm N={steps}", E.ddpm_bound(f, x, steps, generator=g))):
            gap = log_p - r.elbo
            per = float((-gap / r.se).max())
            mean = float(-gap.sum() / torch.sqrt((r.se ** 2).sum()))
            worst = max(worst, per, mean)
            parts.append(f"{label} {kind}: mean gap {float(gap.mean()):+.4f} +- "
                         f"{float(torch.sqrt((r.se ** 2).sum())) / n:.4f} nats, min gap/SE {-per:+.2f}")
    return worst, "; ".join(parts)


@check("likelihood.elbo_below_log_likelihood", area="likelihood", kind="mc", tol=5.0,
       case="ring8 and bimodal_1d under VP, exact fields, 32 samples; continuous ELBO and the DDPM bound, N = 1000",
       reference="Ho et al. 2020, eq. 5; Kingma et al. 2021")
def _elbo_bound():
    """ELBO(x) <= log p_0(x): the gap log p_0 - ELBO is >= -5 SE on every sample and for the batch mean (the gap of
    an exact field is the decoder and prior mismatch, >= 0 in mean, plus O(1/N) for the discrete bound)."""
    z, detail = elbo_bound_z()
    return Outcome(z, detail)


def gaussian_gap_slope(sigma_mins=(0.1, 0.05, 0.025, 0.0125), sigma_max: float = 1e4) -> tuple[float, list]:
    """Mean gap E_x[log p_0(x) - ELBO(x)] of the exact field of gaussian_2d under VE (closed form, the mean over x
    exact: the 2d points mu +- sqrt(d e_j) U_j reproduce mean and covariance, and the gap is quadratic in x) against
    V = sigma_min^2: slope of log gap against log V; the predicted mean gap sum_j u_j^2/4 (u_j = V/e_j) gives 2."""
    tg = gaussian_2d()
    ev, U = torch.linalg.eigh(tg.cov)
    d = ev.numel()
    pts = torch.cat([tg.mu + s * math.sqrt(d * float(e)) * U[:, j][None] for j, e in enumerate(ev) for s in (1, -1)])
    gaps, V = [], []
    for sm in sigma_mins:
        sch = S.VE(sigma_min=sm, sigma_max=sigma_max, t_min=0.0)
        cf = E.gaussian_elbo_closed_form(tg, sch, pts)
        gaps.append(float(cf["gap"].mean()))
        V.append(float(1.0 / torch.exp(sch.log_snr(torch.tensor(0.0, dtype=torch.float64)))))
    slope = float(np.polyfit(np.log(V), np.log(gaps), 1)[0])
    return slope, gaps


@check("likelihood.elbo_gaussian_gap_vanishes", area="likelihood", kind="order", tol=0.15,
       case="gaussian_2d, exact field, VE with sigma_min in {0.1, 0.05, 0.025, 0.0125}, sigma_max = 1e4 (prior mismatch "
            "~1e-9)",
       reference="Kingma et al. 2021 (VDM), Sec. 3-4")
def _gap_vanishes():
    """The exact field's mean ELBO gap E[log p_0 - ELBO] = E KL(q(x|z_0)||p(x|z_0)) + KL(p_T||prior) vanishes as
    t_min -> 0, T -> infinity, at order 2 in the decoder variance V = 1/SNR(t_min) (mean gap sum_j u_j^2/4)."""
    slope, gaps = gaussian_gap_slope()
    return Outcome(abs(slope - 2.0), f"slope {slope:.3f} (expected 2); mean gaps " + ", ".join(f"{g:.3e}" for g in gaps))


def discrete_order(ns=(64, 128, 256, 512, 1024)) -> tuple[float, list]:
    """|discrete diffusion term (posterior variance, log-SNR grid of N steps) - L_inf| of the exact field of
    gaussian_2d under VP, exact in eps (closed form), mean over 16 samples: slope against log(1/N)."""
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.sample(16, torch.Generator().manual_seed(0))
    cont = E.gaussian_diffusion_term(tg, sch, x)
    errs = [float((E.gaussian_diffusion_term(tg, sch, x, n) - cont).mean()) for n in ns]
    slope = float(np.polyfit(np.log(1.0 / np.asarray(ns, dtype=float)), np.log(np.abs(errs)), 1)[0])
    return slope, errs


@check("likelihood.elbo_discrete_to_continuous_order", area="likelihood", kind="order", tol=0.15,
       case="gaussian_2d under VP, exact field, log-SNR grids N = 64..1024, terms exact in eps",
       reference="Kingma et al. 2021 (VDM), eq. 13 and 17")
def _discrete_order():
    """The discrete diffusion loss sum_i (1/2)(SNR_{i-1}/SNR_i - 1) E||eps - eps_hat(z_i)||^2 converges to the
    continuous L_inf at order 1 in the step (a Riemann sum in log SNR with the integrand at the noisier end)."""
    slope, errs = discrete_order()
    return Outcome(abs(slope - 1.0), f"slope {slope:.3f} (expected 1); errors " + ", ".join(f"{e:.3e}" for e in errs))


def ddpm_terms_z(n: int = 48, steps: int = 16, seed: int = 0) -> tuple[float, str]:
    """``ddpm_bound``'s per-step terms (both variances, log-SNR grid of ``steps`` steps, 32 draws each) against the
    closed form of the exact Gaussian field: largest |z| over the per-step batch means and the batch total."""
    tg, sch = gaussian_2d(), S.VPLinear()
    g = torch.Generator().manual_seed(seed)
    x = tg.sample(n, g)
    worst, parts = 0.0, []
    for variance in E.VARIANCES:
        r = E.ddpm_bound(tg.field(sch), x, steps, grid_kind="logsnr", variance=variance, n_eps=32, generator=g)
        ex = E.gaussian_diffusion_term(tg, sch, x, steps, variance=variance, per_step=True)
        z_steps = ((r.per_step - ex.mean(1)) / r.per_step_se).abs()
        z_tot = _batch_z(r.terms["diffusion"], r.term_se["diffusion"], ex.sum(0))
        worst = max(worst, float(z_steps.max()), abs(z_tot))
        parts.append(f"{variance}: max per-step |z| {float(z_steps.max()):.2f}, total z {z_tot:+.2f}")
    return worst, "; ".join(parts)


@check("likelihood.elbo_ddpm_terms_closed_form", area="likelihood", kind="mc", tol=5.0,
       case="gaussian_2d under VP, exact field, log-SNR grid N = 16, variance posterior and beta, 48 samples x 32 "
            "draws per step",
       reference="Ho et al. 2020, eq. 5-7; Nichol & Dhariwal 2021")
def _ddpm_terms():
    """Each DDPM term L_i = E KL(q(z_{i-1}|z_i,x) || p(z_{i-1}|z_i)) (model mean from x_hat, variance beta~ or
    beta) is within 5 SE of its closed form for Gaussian data."""
    z, detail = ddpm_terms_z()
    return Outcome(z, detail)


def matched(t_min: float = 1e-3) -> dict:
    """VP-linear on [t_min, 1] and cosine / rectified flow on the t-ranges with the same log-SNR end points."""
    vp = S.VPLinear(t_min=t_min, t_max=1.0)
    lo, hi = (torch.tensor(v, dtype=torch.float64) for v in vp.lam_range)
    out = {"vp": vp}
    for name, cls in (("cosine", S.VPCosine), ("rf", S.RectifiedFlow)):
        wide = cls(t_min=1e-9)
        out[name] = cls(t_min=float(wide.t_from_lam(hi)), t_max=float(wide.t_from_lam(lo)))
    return out


def schedule_invariance_residual(n: int = 24, seed: int = 0) -> tuple[float, str]:
    """The continuous ELBO (quadrature in log SNR) and the DDPM bound on the log-SNR grid (N = 50) of ring8's exact
    field under VP, cosine and rectified flow with the same SNR end points and the same random draws: max relative
    per-sample difference from VP's."""
    tg = ring8()
    x = tg.sample(n, torch.Generator().manual_seed(seed))
    res = {}
    for name, sch in matched().items():
        f = tg.field(sch)
        c = E.continuous_elbo(f, x, generator=torch.Generator().manual_seed(seed + 1))
        dd = E.ddpm_bound(f, x, 50, grid_kind="logsnr", n_eps=2, generator=torch.Generator().manual_seed(seed + 1))
        res[name] = (c.elbo, dd.elbo)
    worst, parts = 0.0, []
    for name in ("cosine", "rf"):
        for k, kind in enumerate(("continuous", "ddpm N=50")):
            rel = float(((res[name][k] - res["vp"][k]).abs() / res["vp"][k].abs().clamp_min(1.0)).max())
            worst = max(worst, rel)
            parts.append(f"{name} {kind}: {rel:.1e}")
    return worst, "; ".join(parts)


@check("likelihood.elbo_schedule_invariance", area="likelihood", kind="exact", tol=1e-9,
       case="ring8, exact fields, VP / cosine / rectified flow with matched log-SNR end points, 24 samples, the same "
            "draws",
       reference="Kingma et al. 2021 (VDM), Sec. 5.1")
def _invariance():
    """In log-SNR form the ELBO depends on the schedule only through SNR(t_min) and SNR(t_max): the same value, per
    sample and draw, under every schedule with those end points (exact field: x_hat is a function of z/alpha and SNR)."""
    r, detail = schedule_invariance_residual()
    return Outcome(r, detail)


__all__ = ["elbo_gaussian_z", "elbo_mixture_z", "elbo_bound_z", "gaussian_gap_slope", "discrete_order",
           "ddpm_terms_z", "schedule_invariance_residual", "matched"]
