"""VDM schedule invariance of the continuous-time diffusion loss for Gaussian data (Kingma et al. 2021,
continuous-time loss L_inf): same value for every schedule with the same SNR end points, different estimator variances.

Data N(0, s^2 I_d), optimal denoiser x_hat(z_t) = alpha s^2 / (alpha^2 s^2 + sigma^2) z_t, SNR = alpha^2/sigma^2 =
exp(log_snr) (VDM's full log-SNR, twice the schedules' lam). Then ||x - x_hat||^2 = v(t) chi^2_d with v = s^2/(1 + SNR s^2),
and the continuous-time loss is

    L_inf = -1/2 E int_{t0}^{t1} SNR'(t) ||x - x_hat||^2 dt = (d/2) ln[(1 + s^2 SNRmax)/(1 + s^2 SNRmin)].

Three schedules (VP-linear on t in [1e-3, 1]; cosine and rectified flow on the t-ranges with the same SNR end points,
found with ``t_from_lam``) are compared four ways: the closed form; quadrature in t of -1/2 SNR'(t) d v(t)
(scipy.integrate.quad); the Monte-Carlo estimator (t1 - t0) (-1/2 SNR'(t)) ||x - x_hat||^2 with t ~ U(t0, t1) and
(x, eps) drawn, with its SE; and that estimator's exact standard deviation from quadrature,
Var = (t1 - t0) int (1/2 SNR')^2 v^2 (d^2 + 2d) dt - L_inf^2. A fourth row samples u = log SNR uniformly instead of t
(estimator (u_max - u_min) 1/2 SNR ||x - x_hat||^2, the same for every schedule; its exact SD by quadrature in u):
VDM's point that the loss depends on the schedule only through its end points, while the schedule (equivalently the
t-sampler) sets the variance.

    python -m experiments.vdm_invariance [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import quad

from diffusion_lab import schedules as S

from . import _common


def matched_schedules(t_min: float = 1e-3) -> dict:
    """VP-linear on [t_min, 1] and cosine / rectified flow on the t-ranges with the same log-SNR end points."""
    vp = S.VPLinear(t_min=t_min, t_max=1.0)
    lam_lo, lam_hi = vp.lam_range  # lam(t_max), lam(t_min)
    out = {"vp_linear": vp}
    for name, cls, kw in (("cosine", S.VPCosine, {}), ("rectified_flow", S.RectifiedFlow, {})):
        wide = cls(t_min=1e-9, **kw)
        t0 = float(wide.t_from_lam(torch.tensor(lam_hi, dtype=torch.float64)))
        t1 = float(wide.t_from_lam(torch.tensor(lam_lo, dtype=torch.float64)))
        out[name] = cls(t_min=t0, t_max=t1, **kw)
    return out


def closed_form(d: int, s: float, snr_min: float, snr_max: float) -> float:
    return 0.5 * d * math.log((1 + s * s * snr_max) / (1 + s * s * snr_min))


def _snr_and_slope(sch, t: float):
    tt = torch.tensor(t, dtype=torch.float64)
    snr = torch.exp(sch.log_snr(tt))
    return float(snr), float(2.0 * sch.dlam(tt) * snr)  # SNR' = 2 lam' SNR


def quadrature(sch, d: int, s: float) -> tuple[float, float]:
    """(L_inf, exact SD of the t-uniform Monte-Carlo estimator), both by adaptive quadrature in t."""
    def v(t):
        snr, _ = _snr_and_slope(sch, t)
        return s * s / (1 + snr * s * s)

    def integrand(t):
        return -0.5 * _snr_and_slope(sch, t)[1] * d * v(t)

    def second(t):
        w = -0.5 * _snr_and_slope(sch, t)[1]
        return (w * v(t)) ** 2 * (d * d + 2 * d)

    # split at points geometric in t: the integrand varies like 1/t near a small t_min
    a, b = sch.t_min, sch.t_max
    pts = np.unique(np.concatenate([np.geomspace(a, b, 12), [a, b]]))
    loss = sum(quad(integrand, lo, hi, epsabs=0.0, epsrel=1e-13, limit=200)[0] for lo, hi in zip(pts[:-1], pts[1:]))
    m2 = sum(quad(second, lo, hi, epsabs=0.0, epsrel=1e-12, limit=200)[0] for lo, hi in zip(pts[:-1], pts[1:]))
    var = (b - a) * m2 - loss * loss
    return loss, math.sqrt(max(var, 0.0))


def monte_carlo(sch, d: int, s: float, n: int, g: torch.Generator, sampler: str = "t") -> tuple[float, float, float]:
    """(mean, SE, SD) of the single-sample estimator of L_inf over n draws of (t or u, x, eps)."""
    u = torch.rand(n, dtype=torch.float64, generator=g)
    x = s * torch.randn(n, d, dtype=torch.float64, generator=g)
    eps = torch.randn(n, d, dtype=torch.float64, generator=g)
    if sampler == "t":
        t = sch.t_min + (sch.t_max - sch.t_min) * u
        snr = torch.exp(sch.log_snr(t))
        weight = (sch.t_max - sch.t_min) * (-0.5) * 2.0 * sch.dlam(t) * snr
        alpha, sigma = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    else:  # u = log SNR uniform on [u_min, u_max]; alpha, sigma of the VP parameterisation of that SNR
        u_lo, u_hi = (2 * v for v in sch.lam_range)
        logsnr = u_lo + (u_hi - u_lo) * u
        snr = torch.exp(logsnr)
        weight = (u_hi - u_lo) * 0.5 * snr
        alpha, sigma = torch.sigmoid(logsnr).sqrt()[:, None], torch.sigmoid(-logsnr).sqrt()[:, None]
    z = alpha * x + sigma * eps
    x_hat = alpha * s * s / (alpha * alpha * s * s + sigma * sigma) * z
    est = weight * ((x - x_hat) ** 2).sum(1)
    sd = float(est.std())
    return float(est.mean()), sd / math.sqrt(n), sd


def run(quick: bool = False, seed: int = 0):
    d, s = 4, 0.5
    n = 200_000 if quick else 2_000_000
    scheds = matched_schedules()
    rows = []
    g = torch.Generator().manual_seed(seed)
    for name, sch in scheds.items():
        lam_lo, lam_hi = sch.lam_range
        snr_min, snr_max = math.exp(2 * lam_lo), math.exp(2 * lam_hi)
        exact = closed_form(d, s, snr_min, snr_max)
        q, sd_exact = quadrature(sch, d, s)
        m, se, sd = monte_carlo(sch, d, s, n, g)
        rows.append({"schedule": name, "t_min": sch.t_min, "t_max": sch.t_max, "log_snr_min": 2 * lam_lo,
                     "log_snr_max": 2 * lam_hi, "closed_form": exact, "quadrature": q,
                     "quad_rel_err": abs(q - exact) / exact, "mc_mean": m, "mc_se": se, "mc_z": (m - exact) / se,
                     "mc_sd": sd, "exact_sd": sd_exact})
    vp = scheds["vp_linear"]
    lam_lo, lam_hi = vp.lam_range
    exact = closed_form(d, s, math.exp(2 * lam_lo), math.exp(2 * lam_hi))
    m, se, sd = monte_carlo(vp, d, s, n, g, sampler="logsnr")
    u_lo, u_hi = 2 * lam_lo, 2 * lam_hi
    m2 = quad(lambda u: (0.5 * math.exp(u) * s * s / (1 + math.exp(u) * s * s)) ** 2 * (d * d + 2 * d), u_lo, u_hi,
              epsabs=0.0, epsrel=1e-12, limit=200)[0]
    sd_u = math.sqrt(max((u_hi - u_lo) * m2 - exact * exact, 0.0))
    rows.append({"schedule": "any (u = log SNR uniform)", "t_min": float("nan"), "t_max": float("nan"),
                 "log_snr_min": 2 * lam_lo, "log_snr_max": 2 * lam_hi, "closed_form": exact, "quadrature": float("nan"),
                 "quad_rel_err": float("nan"), "mc_mean": m, "mc_se": se, "mc_z": (m - exact) / se, "mc_sd": sd,
                 "exact_sd": sd_u})
    sds = {r["schedule"]: r["mc_sd"] for r in rows}
    headline = {"closed_form": exact,
                "per_schedule": {r["schedule"]: {k: r[k] for k in ("quadrature", "quad_rel_err", "mc_mean", "mc_se",
                                                                    "mc_z", "mc_sd", "exact_sd")} for r in rows},
                "max_quad_rel_err": max(r["quad_rel_err"] for r in rows[:3]),
                "max_abs_mc_z": max(abs(r["mc_z"]) for r in rows),
                "estimator_sd_ratio_max_over_min": max(sds.values()) / min(sds.values())}
    settings = {"data": f"N(0, {s}^2 I_{d})", "d": d, "s": s, "n_mc": n, "seed": seed,
                "schedules": {k: v.settings() for k, v in scheds.items()},
                "quadrature": "scipy.integrate.quad, epsrel 1e-13, split at 12 geometric points in t"}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    torch.set_num_threads(1)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["schedule", "t_min", "t_max", "closed_form", "quadrature", "quad_rel_err", "mc_mean",
                               "mc_se", "mc_z", "mc_sd", "exact_sd"]))
    h = meta["headline"]
    print(f"L_inf closed form {h['closed_form']:.6f}; max quadrature rel. error {h['max_quad_rel_err']:.2e}; "
          f"max |MC z| {h['max_abs_mc_z']:.2f}; estimator SD ratio {h['estimator_sd_ratio_max_over_min']:.2f}")
    _common.write(args.out, "vdm_invariance", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import vdm_invariance

    scheds = matched_schedules()
    curves = {}
    for name, sch in scheds.items():
        t = np.linspace(sch.t_min, sch.t_max, 400)
        tt = torch.as_tensor(t, dtype=torch.float64)
        d, s = meta["settings"]["d"], meta["settings"]["s"]
        snr = torch.exp(sch.log_snr(tt))
        w = (-0.5 * 2.0 * sch.dlam(tt) * snr * d * s * s / (1 + snr * s * s)).numpy()
        curves[name] = {"u": (t - sch.t_min) / (sch.t_max - sch.t_min), "log_snr": sch.log_snr(tt).numpy(),
                        "integrand": w * (sch.t_max - sch.t_min)}
    with _common.figure_style(args):
        vdm_invariance(rows, curves, _common.figure(args, "vdm_invariance"))
    return meta["headline"]


if __name__ == "__main__":
    main()
