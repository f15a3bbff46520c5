"""Area "likelihood": likelihood, inversion, guidance and flow maps (change of variables, Hutchinson's
trace estimator, classifier guidance by Bayes, PF-ODE flow maps and consistency parameterisations)."""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import flows
from diffusion_lab import schedules as S
from diffusion_lab.likelihood import hutchinson_moments_exact, log_likelihood
from diffusion_lab.samplers import sample, time_grid
from diffusion_lab.targets import bimodal_1d, gaussian_2d, ring8, two_class_1d

from .catalogue import Outcome, check
from .parameterisation import random_mixture

CASES = (("ring8", ring8, S.VPLinear), ("gaussian_2d", gaussian_2d, S.VE), ("bimodal_1d", bimodal_1d, S.DDPMDiscrete))


def loglik_exact_residual(target, schedule, n: int = 32, seed: int = 0) -> float:
    """log p_{t_min}(x) through the PF-ODE with the exact divergence equals the closed form (Chen et al. 2018, Thm 1):
    max abs error."""
    x = target.marginal(schedule, schedule.t_min).sample(n, torch.Generator().manual_seed(seed))
    res = log_likelihood(target.field(schedule), x, rtol=1e-10, atol=1e-12)
    return float((res.log_prob - target.log_prob_t(x, schedule.t_min, schedule)).abs().max())


def loglik_hutchinson_z(target, schedule, probe: str, n: int = 64, n_probes: int = 8, seed: int = 0) -> float:
    """Hutchinson's PF-ODE log-likelihood is unbiased: z = sum_i (est_i - exact_i) / sqrt(sum_i se_i^2) over the
    batch (per-sample standard errors from the probes), plus the 1e-6 solver floor where se = 0 (1-D Rademacher
    probes are exact)."""
    g = torch.Generator().manual_seed(seed)
    x = target.marginal(schedule, schedule.t_min).sample(n, g)
    res = log_likelihood(target.field(schedule), x, divergence="hutchinson", probe=probe, n_probes=n_probes,
                         generator=g)
    err = res.log_prob - target.log_prob_t(x, schedule.t_min, schedule)
    return float(err.sum().abs() / torch.sqrt((res.se**2).sum() + n * 1e-12))


@check("likelihood.pf_ode_loglik_exact_divergence", area="likelihood", kind="quadrature", tol=1e-6,
       case="ring8/VP, gaussian_2d/VE, bimodal_1d/DDPM; 32 exact samples of p_t_min; DOP853 rtol 1e-10",
       reference="Chen et al. 2018; Song et al. 2021, Sec. 4.3")
def _loglik_exact():
    """PF-ODE log-likelihood (exact divergence) = closed-form log p_{t_min}(x), max abs error in nats."""
    return max(loglik_exact_residual(tg(), sch()) for _, tg, sch in CASES)


@check("likelihood.pf_ode_loglik_hutchinson", area="likelihood", kind="mc", tol=5.0,
       case="ring8/VP and gaussian_2d/VE, 64 samples x 8 probes, Rademacher and Gaussian",
       reference="Hutchinson 1989; Grathwohl et al. 2019 (FFJORD)")
def _loglik_hutch():
    """Hutchinson PF-ODE log-likelihood is within 5 standard errors of the closed form (batch z-score)."""
    zs = [loglik_hutchinson_z(tg(), sch(), probe) for _, tg, sch in CASES[:2] for probe in ("rademacher", "gaussian")]
    return Outcome(max(zs), "z = " + ", ".join(f"{z:.2f}" for z in zs))


def hutchinson_enumeration_residual(d: int = 6, seed: int = 0, n: int = 3) -> float:
    """The package's Hutchinson divergence estimator (``likelihood._divergence``, the one ``log_likelihood`` integrates)
    run on all 2^d Rademacher probes z: the mean of its estimates z^T A z is tr A and their variance is
    2(||A_s||_F^2 - sum_i A_ii^2) (Hutchinson 1989), with A = d eps_hat / dx at each point from autograd's full
    Jacobian (computed independently of the estimator). Max relative error over n points."""
    import itertools as it

    from diffusion_lab.likelihood import _divergence

    tg, sch = random_mixture(3, d, seed=seed), S.VPLinear()
    f = tg.field(sch)
    x = torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    probes = torch.tensor(list(it.product((-1.0, 1.0), repeat=d)), dtype=torch.float64)  # (2^d, d)
    _, est = _divergence(f, x, 0.3, "hutchinson", probes[:, None, :].expand(-1, n, -1).contiguous())  # (n, 2^d)
    worst = 0.0
    for i in range(n):
        A = torch.autograd.functional.jacobian(lambda z: f.eps(z[None], 0.3)[0], x[i])
        As = 0.5 * (A + A.T)
        tr = float(torch.trace(A))
        var_th = 2 * (float((As**2).sum()) - float((torch.diagonal(A) ** 2).sum()))
        mean, var = float(est[i].mean()), float(est[i].var(unbiased=False))
        worst = max(worst, abs(mean - tr) / abs(tr), abs(var - var_th) / var_th)
    return worst


@check("likelihood.hutchinson_rademacher_enumeration", area="likelihood", kind="exact", tol=1e-12,
       case="the package's Hutchinson divergence estimator, d = 6, all 64 Rademacher probes at 3 points; A = Jacobian "
            "of eps_hat (random 3-component GMM, VP, t=0.3)",
       reference="Hutchinson 1989")
def _hutch_enum():
    """The package's Hutchinson estimator over all Rademacher probes: E[z^T A z] = tr A and
    Var[z^T A z] = 2(||A_s||_F^2 - sum A_ii^2) exactly."""
    return hutchinson_enumeration_residual()


@check("likelihood.flow_map_gaussian_closed_form", area="likelihood", kind="quadrature", tol=1e-8,
       case="gaussian_2d under VP, cosine, VE; (s, t) = (t_max, 0.1), (0.1, 0.7), (t_min, t_max)",
       reference="PF-ODE flow map of Gaussian data in closed form")
def _flow_closed():
    """The reference PF-ODE flow map equals the closed form alpha_t mu + C_t^{1/2} C_s^{-1/2}(x - alpha_s mu)."""
    tg = gaussian_2d()
    worst = 0.0
    for sch in (S.VPLinear(), S.VPCosine(), S.VE()):
        x = tg.marginal(sch, 0.5).sample(64, torch.Generator().manual_seed(0))
        for s, t in ((sch.t_max, 0.1), (0.1, 0.7), (sch.t_min, sch.t_max)):
            exact = flows.gaussian_flow_map(tg, sch, x, s, t)
            num = flows.flow_map(tg.field(sch), x, s, t)
            worst = max(worst, float((num - exact).abs().max() / exact.abs().max()))
    return worst


@check("likelihood.flow_map_semigroup_closed_form", area="likelihood", kind="exact", tol=1e-12,
       case="gaussian_2d under VP; (s, u, t) = (0.9, 0.4, 0.05) and (0.05, 0.6, 0.95)",
       reference="flow-map semigroup Phi_{u->t} o Phi_{s->u} = Phi_{s->t}")
def _semigroup_exact():
    """Phi_{u->t} o Phi_{s->u} = Phi_{s->t} and Phi_{s->s} = id for the closed-form Gaussian flow map."""
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.marginal(sch, 0.5).sample(16, torch.Generator().manual_seed(1))
    phi = lambda z, a, b: flows.gaussian_flow_map(tg, sch, z, a, b)  # noqa: E731
    worst = float((phi(x, 0.3, 0.3) - x).abs().max())
    for s, u, t in ((0.9, 0.4, 0.05), (0.05, 0.6, 0.95)):
        worst = max(worst, flows.semigroup_defect(phi, x, s, u, t) / float(x.abs().max()))
    return worst


def semigroup_order(method: str = "heun", ns=(4, 8, 16, 32), seed: int = 0, **options) -> tuple[float, list]:
    """Semigroup defect of a numerical flow map (``method`` with N log-SNR steps per sub-interval) shrinks at the
    solver's order: slope of log defect against log(1/N) on bimodal_1d under VP, (s, u, t) = (t_max, 0.3, 0.02)."""
    tg, sch = bimodal_1d(), S.VPLinear()
    f = tg.field(sch)
    x = tg.marginal(sch, sch.t_max).sample(128, torch.Generator().manual_seed(seed))
    defects = []
    for n in ns:
        def phi(z, a, b, n=n):
            return sample(f, z, method, grid=time_grid(sch, n, "logsnr", t_min=b, t_max=a), **options).x

        defects.append(flows.semigroup_defect(phi, x, sch.t_max, 0.3, 0.02))
    slope = float(np.polyfit(np.log(1.0 / np.asarray(ns, dtype=float)), np.log(defects), 1)[0])
    return slope, defects


@check("likelihood.flow_map_semigroup_order", area="likelihood", kind="order", tol=0.15,
       case="heun (final step Euler off), bimodal_1d/VP, N in {32..256} steps per sub-interval "
            "(N = 4..32 is pre-asymptotic: 1.79)",
       reference="flow-map semigroup; Heun order 2 (Karras et al. 2022)")
def _semigroup_order():
    """The semigroup defect ||Phi_{u->t} Phi_{s->u} - Phi_{s->t}|| of Heun's flow map shrinks at order 2."""
    slope, d = semigroup_order("heun", ns=(32, 64, 128, 256), final_euler=False)
    return Outcome(abs(slope - 2), f"slope {slope:.3f} (expected 2); defects " + ", ".join(f"{v:.2e}" for v in d))


@check("likelihood.consistency_boundary", area="likelihood", kind="exact", tol=0.0,
       case="random F (a fixed random nonlinear map), eps = 0.002, sigma_d = 0.5, 2-D",
       reference="Song et al. 2023 (consistency models), Sec. 3")
def _consistency():
    """f(x, t) = c_skip x + c_out F satisfies f(x, eps) = x exactly (bitwise) for any F."""
    W = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = flows.consistency_parameterisation(lambda x, t: torch.tanh(x @ W) * 1e3, eps=0.002)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return float((f(x, 0.002) - x).abs().max())


def inversion_closed_form_residual(method: str = "adaptive", n: int = 256, **options) -> tuple[float, float]:
    """PF-ODE inversion of Gaussian data against the closed-form flow map written here, not the package's:
    Phi_{s->t}(x) = alpha_t mu + C_t^{1/2} C_s^{-1/2} (x - alpha_s mu), C_t = alpha_t^2 Sigma + sigma_t^2 I (the
    matrices commute; square roots by eigendecomposition). ``flows.encode`` (t_min -> t_max) is compared with
    Phi_{t_min -> t_max}(x), and ``flows.decode`` of the exact latent with Phi_{t_max -> t_min}; returns the two
    max relative errors."""
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.marginal(sch, sch.t_min).sample(n, torch.Generator().manual_seed(2))

    def cov_and_mean(t):
        tt = torch.tensor(t, dtype=torch.float64)
        a, s = float(sch.alpha(tt)), float(sch.sigma(tt))
        return a * tg.mu, a * a * tg.cov + s * s * torch.eye(2, dtype=torch.float64)

    def mpow(C, p):
        w, U = torch.linalg.eigh(C)
        return U @ torch.diag(w**p) @ U.T

    def phi(z, s, t):
        (ms, Cs), (mt, Ct) = cov_and_mean(s), cov_and_mean(t)
        return mt + (z - ms) @ (mpow(Ct, 0.5) @ mpow(Cs, -0.5)).T

    f = tg.field(sch)
    z_exact = phi(x, sch.t_min, sch.t_max)
    z = flows.encode(f, x, method, **options).x
    back = flows.decode(f, z_exact, method, **options).x
    return (float((z - z_exact).abs().max() / z_exact.abs().max()), float((back - x).abs().max() / x.abs().max()))


@check("likelihood.inversion_reconstruction", area="likelihood", kind="quadrature", tol=1e-7,
       case="gaussian_2d/VP, 256 samples of p_t_min, adaptive DP5 rtol 1e-9 each way, against the closed-form map",
       reference="PF-ODE inversion (Song, Meng & Ermon 2021, DDIM encoding); Gaussian flow map in closed form")
def _inversion():
    """Encoding data to the prior along the PF-ODE gives the closed-form latent Phi_{t_min->t_max}(x), and decoding
    that latent gives x back (Gaussian data; the map is written in the check): max relative error of each."""
    e_enc, e_dec = inversion_closed_form_residual("adaptive", rtol=1e-9, atol=1e-9)
    return Outcome(max(e_enc, e_dec), f"encode vs closed form {e_enc:.2e}, decode vs closed form {e_dec:.2e}")


def classifier_bayes_residual(schedule, t: float, seed: int = 0) -> float:
    """grad log p_t(x|y) = grad log p_t(x) + grad log p_t(y|x) (Bayes; Song et al. 2021, Sec. 5) with p_t(y|x) the
    exact responsibilities: the conditional mixture's closed-form score against the unconditional score + autograd
    of log p_t(y|x)."""
    tg = two_class_1d(3.0, 0.7)
    x = 2.5 * torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    worst = 0.0
    for y in range(tg.n_classes):
        xr = x.clone().requires_grad_(True)
        (gy,) = torch.autograd.grad(tg.class_log_posterior_t(xr, t, schedule)[:, y].sum(), xr)
        guided = tg.score(x, t, schedule) + gy
        cond = tg.conditional(y).score(x, t, schedule)
        worst = max(worst, float((guided - cond).abs().max() / cond.abs().max()))
    return worst


@check("likelihood.classifier_guidance_bayes", area="likelihood", kind="exact", tol=1e-10,
       case="two 1-D classes N(-/+1.5, 0.7^2), VP and VE at t = 0.3, 32 points",
       reference="Song et al. 2021, Sec. 5; Dhariwal & Nichol 2021")
def _bayes():
    """Classifier guidance with the exact classifier p_t(y|x) (responsibilities) and weight 1 is the conditional score."""
    return max(classifier_bayes_residual(s, 0.3) for s in (S.VPLinear(), S.VE()))
