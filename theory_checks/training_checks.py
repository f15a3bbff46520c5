"""Area "training": objectives, EDM preconditioning and classifier-free guidance (Karras et al. 2022;
Vincent 2011; Ho & Salimans 2022),
run through diffusion_lab.training and diffusion_lab.guidance themselves.

The exact network ``ExactNet`` answers the training code's call net(c_in x, c_noise, y) with a Gaussian mixture's
exact prediction (it inverts c_in and c_noise = -lambda/4), so the losses are computed by the same code path a
trained network goes through.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffusion_lab import param
from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.guidance import cfg_from_fields, classifier_free_guidance
from diffusion_lab.samplers import get_method, sample
from diffusion_lab.targets import Gaussian, GaussianMixture, ring8

from .catalogue import Outcome, check

SCHEDULES = (S.VPLinear(), S.VPCosine(), S.VE(), S.EDM(), S.RectifiedFlow(), S.SubVP())


class ExactNet(nn.Module):
    """A 'network' returning a mixture's exact prediction of type ``kind`` (optionally plus ``perturb(x, t)`` added to
    eps_hat): it recovers t = t_from_lam(-4 c_noise) and x = x_in / c_in. ``class_targets`` make it class-conditional
    (label k -> mixture k, the null label num_classes -> ``target``)."""

    def __init__(self, target: GaussianMixture, schedule, kind: str = "eps", sigma_data: float = 1.0, perturb=None,
                 class_targets: list | None = None):
        super().__init__()
        self.target, self.schedule, self.kind, self.sigma_data = target, schedule, kind, sigma_data
        self.perturb, self.class_targets = perturb, class_targets
        self.num_classes = len(class_targets) if class_targets else 0
        self.data_shape = target.data_shape
        self.register_buffer("_dummy", torch.zeros((), dtype=torch.float64))

    def _x0_eps(self, tg, x, t):
        x0 = tg.denoiser(x, t, self.schedule)
        eps = -self.schedule.sigma(t)[:, None] * tg.score(x, t, self.schedule)
        if self.perturb is not None:
            d = self.perturb(x, t)
            eps = eps + d
            x0 = x0 - (self.schedule.sigma(t) / self.schedule.alpha(t))[:, None] * d
        return x0, eps

    def forward(self, xin, noise, y=None):
        sch = self.schedule
        t = sch.t_from_lam(-4.0 * noise.to(torch.float64))
        x = xin / T.c_in(sch, t, self.sigma_data)[:, None]
        if y is None or not self.class_targets:
            x0, eps = self._x0_eps(self.target, x, t)
        else:
            x0, eps = torch.empty_like(x), torch.empty_like(x)
            for k, tg in enumerate([*self.class_targets, self.target]):
                m = y == k
                if m.any():
                    x0[m], eps[m] = self._x0_eps(tg, x[m], t[m])
        if self.kind == "edm":
            c_skip, c_out, _, _ = T.edm_precond(sch, t, self.sigma_data)
            return (x0 - c_skip[:, None] * x) / c_out[:, None]
        a, s, da, ds = (c[:, None] for c in (sch.alpha(t), sch.sigma(t), sch.dalpha(t), sch.dsigma(t)))
        return param.from_x0_eps(self.kind, x0, eps, a, s, da, ds)


def edm_precond_variance_residual(sigma_data: float = 0.5, n_t: int = 41) -> float:
    """EDM preconditioning (Karras et al. 2022, Table 1 and App. B.6), c_in = 1/sqrt(S), c_skip = alpha sigma_d^2/S,
    c_out = sigma sigma_d/sqrt(S), S = sigma^2 + alpha^2 sigma_d^2: with x = alpha x0 + sigma n, n independent of x0
    and Var x0 = sigma_d^2 (any law), Var(c_in x) = c_in^2 (alpha^2 sigma_d^2 + sigma^2) = 1 and the target
    (x0 - c_skip x)/c_out = a x0 + b n has variance a^2 sigma_d^2 + b^2 = 1; max |Var - 1| over schedules and a
    t-grid."""
    worst = 0.0
    for sch in SCHEDULES:
        t = torch.linspace(sch.t_min, sch.t_max, n_t, dtype=torch.float64)
        c_skip, c_out, cin, _ = T.edm_precond(sch, t, sigma_data)
        al, si = sch.alpha(t), sch.sigma(t)
        var_in = cin**2 * (al**2 * sigma_data**2 + si**2)
        a, b = (1 - c_skip * al) / c_out, -c_skip * si / c_out
        var_target = a**2 * sigma_data**2 + b**2
        worst = max(worst, float((var_in - 1).abs().max()), float((var_target - 1).abs().max()))
    return worst


def edm_precond_mc_zscore(n: int = 200_000, seed: int = 0) -> float:
    """Monte Carlo of the EDM unit-variance property on non-Gaussian data (ring8 rescaled to per-coordinate
    variance sigma_d^2 = 0.25) under VP at three times: max |z| of the sample variances of c_in x and of the target
    against 1."""
    tg = ring8()
    g = torch.Generator().manual_seed(seed)
    x0 = tg.sample(n, g)
    x0 = (x0 - x0.mean(0)) / x0.std(0) * 0.5
    sch, worst = S.VPLinear(), 0.0
    for t in (0.05, 0.3, 0.9):
        tt = torch.full((n,), t, dtype=torch.float64)
        eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
        x = sch.alpha(tt)[:, None] * x0 + sch.sigma(tt)[:, None] * eps
        c_skip, c_out, cin, _ = T.edm_precond(sch, tt, 0.5)
        for v in (cin[:, None] * x, (x0 - c_skip[:, None] * x) / c_out[:, None]):
            for j in range(2):
                u = v[:, j]
                se = float(((u - u.mean()) ** 2).std() / math.sqrt(n))
                worst = max(worst, abs(float(u.var()) - 1.0) / se)
    return worst


@check("training.edm_precond_unit_variance", area="training", kind="exact", tol=1e-12,
       case="VP, cosine, VE, EDM, RF, sub-VP; 41 times each; sigma_d = 0.5", reference="Karras et al. 2022 Table 1")
def _edm_exact():
    """EDM preconditioning for any schedule: Var(c_in x) = 1 and Var((x0 - c_skip x)/c_out) = 1 when Var x0 = sigma_d^2."""
    return edm_precond_variance_residual()


@check("training.edm_precond_unit_variance_mc", area="training", kind="mc", tol=5.0,
       case="ring8 rescaled to variance 0.25 per coordinate, VP, t in {0.05, 0.3, 0.9}, 200k samples",
       reference="Karras et al. 2022, App. B.6")
def _edm_mc():
    """The same on non-Gaussian data by Monte Carlo: sample variances of c_in x and of the target are 1 (max |z|)."""
    z = edm_precond_mc_zscore()
    return Outcome(z, f"max |z| = {z:.2f}")


def dsm_optimum(d: int = 4, s2: float = 0.7, t: float = 0.3, n: int = 200_000, seed: int = 0, delta: float = 0.3):
    """DSM at its optimum (Vincent 2011): data N(0, s2 I_d), VP at time t, score prediction through the training
    objective. J_DSM(s) = E||s(x_t) + eps/sigma||^2 = J_ESM(s) + C with C = d/sigma^2 - d/(alpha^2 s2 + sigma^2), so
    the exact score gives J = C, and s* + delta*1 gives J = C + d delta^2 (same samples, so the difference is nearly
    noise-free).
    Returns (z of J(s*) vs C, z of the increase vs d delta^2, J(s*), C)."""
    sch = S.VPLinear()
    tg = Gaussian(torch.zeros(d, dtype=torch.float64), s2)
    g = torch.Generator().manual_seed(seed)
    x0 = tg.sample(n, g)
    tt = torch.full((n,), t, dtype=torch.float64)
    eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
    al, si = float(sch.alpha(torch.tensor(t))), float(sch.sigma(torch.tensor(t)))
    obj = T.Objective(sch, "score", "uniform")
    exact = ExactNet(tg, sch, "score")
    j_star = d * obj.per_sample(exact, x0, t=tt, eps=eps)  # mean over dims -> sum
    pert = ExactNet(tg, sch, "score", perturb=lambda x, t_: -delta * sch.sigma(t_)[:, None] * torch.ones_like(x))
    j_pert = d * obj.per_sample(pert, x0, t=tt, eps=eps)
    C = d / si**2 - d / (al**2 * s2 + si**2)
    z1 = (float(j_star.mean()) - C) / float(j_star.std() / math.sqrt(n))
    diff = j_pert - j_star
    z2 = (float(diff.mean()) - d * delta**2) / float(diff.std() / math.sqrt(n))
    return z1, z2, float(j_star.mean()), C


@check("training.dsm_optimum_constant", area="training", kind="mc", tol=5.0,
       case="N(0, 0.7 I_4), VP t = 0.3, score prediction, 200k samples; perturbation s* + 0.3",
       reference="Vincent 2011")
def _dsm():
    """With the exact score the DSM loss equals C = d/sigma^2 - E||grad log p_t||^2, and a perturbed score s* + delta
    raises it by exactly E||delta||^2 = d delta^2 (max |z| of both)."""
    z1, z2, j, c = dsm_optimum()
    return Outcome(max(abs(z1), abs(z2)), f"J(s*) = {j:.5f}, C = {c:.5f} (z = {z1:.2f}); increase z = {z2:.2f}")


def loss_equivalence_residual(n: int = 512, seed: int = 1) -> float:
    """Item 49 generalised: for one network (eps_hat = exact eps + a perturbation) expressed in every prediction space,
    the per-sample loss in space k with uniform weight equals kappa_k^2 (``training.eps_weight``) times the
    eps-loss; in particular the eps-loss is the score loss weighted by sigma^2 (weighting "sigma2"). Max relative
    difference over schedules, kinds and samples."""
    tg = ring8()
    worst = 0.0
    g = torch.Generator().manual_seed(seed)
    x0 = tg.sample(n, g)
    for sch in (S.VPLinear(), S.VE(), S.EDM(), S.RectifiedFlow(), S.VPCosine()):
        t = T.sample_t(n, sch, generator=g, dtype=torch.float64)
        eps = torch.randn(x0.shape, dtype=torch.float64, generator=g)
        pert = lambda x, t_: 0.1 * torch.sin(3 * x)  # noqa: E731  (a smooth error of eps_hat)
        base = T.Objective(sch, "eps", sigma_data=1.3).per_sample(ExactNet(tg, sch, "eps", 1.3, pert), x0, t=t, eps=eps)
        kinds = [k for k in T.NET_PREDICTIONS if k != "v" or sch.variance_preserving]
        for k in kinds:
            lk = T.Objective(sch, k, sigma_data=1.3).per_sample(ExactNet(tg, sch, k, 1.3, pert), x0, t=t, eps=eps)
            pred = T.eps_weight(k, sch, t, 1.3) * base
            worst = max(worst, float(((lk - pred).abs() / pred.abs()).max()))
        ls = T.Objective(sch, "score", "sigma2").per_sample(ExactNet(tg, sch, "score", 1.0, pert), x0, t=t, eps=eps)
        le = T.Objective(sch, "eps").per_sample(ExactNet(tg, sch, "eps", 1.0, pert), x0, t=t, eps=eps)
        worst = max(worst, float(((ls - le).abs() / le.abs()).max()))
    return worst


@check("training.eps_loss_is_sigma2_score_loss", area="training", kind="exact", tol=1e-9,
       case="ring8, VP/VE/EDM/RF/cosine, 512 samples, eps_hat = exact + 0.1 sin(3x), all prediction types",
       reference="Kingma & Gao 2023 (weighted losses); Vincent 2011")
def _loss_equiv():
    """||s_hat + eps/sigma||^2 = ||eps_hat - eps||^2/sigma^2, and in general loss_k = kappa_k^2 loss_eps at fixed (x,t)."""
    return loss_equivalence_residual()


def _class_model(sch):
    """ring8 as 8 classes (one Gaussian each, prior 1/8) and its exact class-conditional ExactNet."""
    tg = ring8()
    comps = [Gaussian(tg.means[k], tg.covs[k]) for k in range(8)]
    return tg, comps, ExactNet(tg, sch, "eps", 1.0, class_targets=comps)


def cfg_residuals(n: int = 256, seed: int = 2) -> tuple[float, float, float]:
    """Classifier-free guidance on exact class conditionals (ring8 components as classes; Ho & Salimans 2022):
    (1) w = 0 returns the conditional field exactly (torch.equal on the guided eps in float64, batched pass);
    (2) w = -1 returns the unconditional field, and the guided score is (1+w) s(x|c) - w s(x), i.e.
    grad log p_t(x|c)^gamma p_t(x)^(1-gamma), for w in {0.5, 3};
    (3) guiding in x0 space (``cfg_from_fields`` of the exact fields) equals guiding eps (affine invariance).
    Returns (w=0 max abs difference, max relative error of (2), max relative error of (3))."""
    sch = S.VPLinear()
    tg, comps, net = _class_model(sch)
    g = torch.Generator().manual_seed(seed)
    x = tg.marginal(sch, 0.4).sample(n, g)
    t = 0.4
    y = torch.randint(0, 8, (n,), generator=g)
    f = T.learned_field(net, sch, "eps", labels=y)
    cond = f.eps(x, t)
    r0 = float((classifier_free_guidance(f, 0.0, y).eps(x, t) - cond).abs().max())
    uncond = tg.score(x, t, sch)
    r2 = 0.0
    s_c = torch.stack([comps[int(k)].score(x[i:i + 1], t, sch)[0] for i, k in enumerate(y)])
    for w in (-1.0, 0.5, 3.0):
        s_g = classifier_free_guidance(f, w, y).score(x, t)
        ref = (1 + w) * s_c - w * uncond
        r2 = max(r2, float((s_g - ref).abs().max() / ref.abs().max()))
    k = 3
    fc, fu = comps[k].field(sch, "x0"), tg.field(sch, "x0")
    r3 = 0.0
    for w in (0.5, 2.0):
        e_pair = cfg_from_fields(fc, fu, w).eps(x, t)
        e_ref = (1 + w) * comps[k].field(sch, "eps").eps(x, t) - w * tg.field(sch, "eps").eps(x, t)
        x0_pair = cfg_from_fields(fc, fu, w).denoiser(x, t)
        tt = torch.tensor(t, dtype=torch.float64)
        x0_ref = (x - sch.sigma(tt) * e_ref) / sch.alpha(tt)
        r3 = max(r3, float((e_pair - e_ref).abs().max() / e_ref.abs().max()),
                 float((x0_pair - x0_ref).abs().max() / x0_ref.abs().max()))
    return r0, r2, r3


@check("training.cfg_identities", area="training", kind="exact", tol=1e-10,
       case="ring8 components as 8 classes, VP t = 0.4, 256 points, w in {-1, 0, 0.5, 2, 3}",
       reference="Ho & Salimans 2022, eq. 6")
def _cfg():
    """CFG eps~ = (1+w) eps(x|c) - w eps(x|null): w = 0 is the conditional field exactly, w = -1 the unconditional
    one, the guided score is grad log p_t(x|c)^(1+w) p_t(x)^(-w), and guiding x0 equals guiding eps."""
    r0, r2, r3 = cfg_residuals()
    return Outcome(max(r0, r2, r3), f"w=0: max |diff| = {r0:.1e}; score form {r2:.1e}; x0 vs eps space {r3:.1e}")


def cfg_nfe_residual(steps: int = 6) -> float:
    """A guided field costs two model evaluations per call: a sampler that makes k field calls for N steps (its
    registered ``nfe_of_steps``) reports 2k; returns the total |counted - expected| over three samplers."""
    sch = S.VPLinear()
    tg, comps, net = _class_model(sch)
    f = classifier_free_guidance(T.learned_field(net, sch, "eps", labels=2), 1.5, 2)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    err = 0
    for method in ("heun", "ddim", "dpmpp_2m"):
        r = sample(f, x, method, steps=steps)
        err += abs(r.nfe - 2 * get_method(method).nfe_of_steps(steps))
    return float(err)


@check("training.cfg_nfe_counted_twice", area="training", kind="exact", tol=0.0,
       case="heun, ddim, dpmpp_2m with 6 steps on a guided exact conditional field",
       reference="Ho & Salimans 2022 (two passes per guided step)")
def _cfg_nfe():
    """One guided evaluation is a batched conditional + unconditional pass and counts as two NFE."""
    return cfg_nfe_residual()
