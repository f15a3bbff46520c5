"""The variational bounds (``diffusion_lab.elbo``): closed forms of the exact Gaussian field, the Monte-Carlo estimators
against them, DDPM's chain and weights, schedule invariance, the decoders, bad input, and `diffusion-lab likelihood
--elbo` on an exact target and on a learned checkpoint.

Monte-Carlo comparisons use the batch z-score sum_i (est_i - ref_i) / sqrt(sum_i se_i^2) with |z| <= 5 (the catalogue's
mc class): a biased estimator or a wrong factor moves z by tens to hundreds (see theory_checks/elbo_checks.py)."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from diffusion_lab import elbo as E
from diffusion_lab import schedules as S
from diffusion_lab.cli import main
from diffusion_lab.field import VelocityField
from diffusion_lab.targets import Gaussian, gaussian_2d, ring8


def _z(est, se, ref):
    return float((est - ref).sum() / torch.sqrt((se ** 2).sum()))


def _gaussian(theta, e1, e2, m1, m2):
    c, s = math.cos(theta), math.sin(theta)
    U = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return Gaussian([m1, m2], U @ torch.diag(torch.tensor([e1, e2], dtype=torch.float64)) @ U.T)


@settings(deadline=None)
@given(theta=st.floats(0, math.pi), e1=st.floats(0.01, 4.0), e2=st.floats(0.01, 4.0), m1=st.floats(-2, 2),
       m2=st.floats(-2, 2), t_min=st.floats(1e-3, 0.3), t_max=st.floats(0.35, 1.0))
def test_gaussian_gap_is_decoder_plus_prior_mismatch(theta, e1, e2, m1, m2, t_min, t_max):
    """log p_0 - ELBO (closed-form terms) = Delta_dec + Delta_prior identically (two independent routes: the first from
    the three terms of the ELBO, the second from the posterior q(x|z_0) and the marginal p_T); with the exact prior the
    ELBO is below the exact model's own log-density log p_theta(x) on every x, by a gap that does not depend on x
    (the Gaussian model's posterior equals the forward process's except at the decoder)."""
    tg, sch = _gaussian(theta, e1, e2, m1, m2), S.VPLinear(t_min=t_min, t_max=t_max)
    x = tg.sample(32, torch.Generator().manual_seed(0))
    x = torch.cat([x, tg.mu + 4 * (x - tg.mu)])  # far tails too
    for prior in (None, "exact"):
        cf = E.gaussian_elbo_closed_form(tg, sch, x, prior=prior)
        scale = 1.0 + float(cf["reconstruction"].abs().max() + cf["diffusion"].abs().max() + cf["prior"].abs().max())
        assert float((cf["gap"] - cf["decoder_mismatch"] - cf["prior_mismatch"]).abs().max()) < 1e-11 * scale
    model_gap = cf["log_p_model"] - cf["elbo"]
    assert float(model_gap.min()) >= -1e-11 * scale


def test_decoder_mismatch_order_two_and_sign():
    """Delta_dec(x) = sum_j (u_j^2/2)(3/2 - dx_j^2/e_j) + O(u^3): negative beyond 1.22 standard deviations, positive
    in mean (sum_j u_j^2/4) -- the per-sample inequality against log p_0 is only up to O(u^2)."""
    tg = Gaussian([0.0], [[1.0]])
    sch = S.VE(sigma_min=0.01, sigma_max=1e4, t_min=0.0)  # V = 1e-4, u = 1e-4
    x = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    dec = E.gaussian_elbo_closed_form(tg, sch, x)["decoder_mismatch"]
    u = 1e-4
    pred = 0.5 * u * u * (1.5 - x[:, 0] ** 2)
    assert torch.allclose(dec, pred, rtol=1e-3, atol=0)  # relative O(u) remainder
    assert dec[2] < 0 < dec[0]


def test_continuous_closed_form_equals_quadrature_of_its_integrand():
    """gaussian_diffusion_term (antiderivative in SNR) = (1/2) int E||eps - eps_hat||^2 d logSNR by scipy quad of the
    closed-form integrand sum_j [(r e_j/w_j)^2 + r dx_j^2/w_j^2] (independent of the antiderivative)."""
    tg, sch = gaussian_2d(), S.VPCosine()
    x = tg.sample(4, torch.Generator().manual_seed(1))
    ev, U = torch.linalg.eigh(tg.cov)
    dx = ((x - tg.mu) @ U).numpy()
    ev = ev.numpy()
    u0, uT = (float(sch.log_snr(torch.tensor(t, dtype=torch.float64))) for t in (sch.t_min, sch.t_max))
    got = E.gaussian_diffusion_term(tg, sch, x)
    for i in range(4):
        def f(u, i=i):
            r = math.exp(u)
            w = 1 + r * ev
            return 0.5 * float(((r * ev / w) ** 2).sum() + (r * dx[i] ** 2 / w ** 2).sum())

        ref = quad(f, uT, u0, epsabs=0, epsrel=1e-12, limit=200)[0]
        assert abs(float(got[i]) - ref) < 1e-9 * abs(ref)


@pytest.mark.parametrize("t_sampling,control_variate", [("quadrature", True), ("quadrature", False),
                                                        ("logsnr", True), ("uniform", False)])
def test_continuous_elbo_matches_closed_form(t_sampling, control_variate):
    """Every estimator of the continuous ELBO (published plain form and the control variate) is unbiased for the
    closed form of the exact Gaussian field, term by term (the prior term is closed form on both sides)."""
    tg, sch = gaussian_2d(), S.VPLinear(t_min=0.02, t_max=0.7)
    g = torch.Generator().manual_seed(3)
    x = tg.sample(48, g)
    cf = E.gaussian_elbo_closed_form(tg, sch, x)
    r = E.continuous_elbo(tg.field(sch), x, t_sampling=t_sampling, n_t=32 if t_sampling == "quadrature" else 256,
                          control_variate=control_variate, generator=g)
    for k in ("reconstruction", "diffusion"):
        assert abs(_z(r.terms[k], r.term_se[k], cf[k])) < 5, k
    assert abs(_z(r.elbo, r.se, cf["elbo"])) < 5
    assert torch.equal(r.terms["prior"], cf["prior"])
    assert r.extra["evaluations"] == (32 * 16 + 32 if t_sampling == "quadrature" else 2 * 256)
    assert torch.allclose(r.bpd, -r.elbo / (2 * math.log(2)))


def test_control_variate_cuts_the_reconstruction_error():
    """The control variate beta (||eps||^2 - d) removes the chi^2_d noise of the decoder term at high SNR (>= 10x)."""
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.sample(16, torch.Generator().manual_seed(0))
    se = {cv: E.continuous_elbo(tg.field(sch), x, n_t=8, n_rep=4, control_variate=cv,
                                generator=torch.Generator().manual_seed(1)).term_se["reconstruction"].mean()
          for cv in (True, False)}
    assert se[False] > 10 * se[True]


class _ZeroEps:
    """An eps-prediction model that always predicts 0: ||eps - eps_hat||^2 = ||eps||^2, of mean d."""

    def __call__(self, x, t):
        return torch.zeros_like(x)


def test_ddpm_chain_and_weights_are_ho_et_al():
    """DDPMDiscrete(n_steps=N') with the uniform grid of N' - 1 steps is Ho et al.'s chain t_i = i/N'; with the
    posterior variance each term is beta_i/(2 alpha_i (1 - alphabar_{i-1})) E||eps - eps_hat||^2 (Ho et al. 2020,
    eq. 12 with sigma_t^2 = beta~_t), here with eps_hat = 0 so E||eps||^2 = d = 2."""
    Np = 50
    sch = S.DDPMDiscrete(n_steps=Np, t_min=1.0 / Np)
    f = VelocityField(sch, _ZeroEps(), "eps")
    x = torch.zeros(16, 2, dtype=torch.float64)
    r = E.ddpm_bound(f, x, Np - 1, n_eps=64, control_variate=False, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r.grid, torch.arange(1, Np + 1, dtype=torch.float64) / Np, atol=1e-15)
    b, ab = sch.betas, sch.alphas_cumprod
    ho = b[1:] / (2 * (1 - b[1:]) * (1 - ab[:-1])) * 2.0  # terms L_1 .. L_{N'-1}: steps x_{i+1} -> x_i
    z = (r.per_step - ho) / r.per_step_se
    assert float(z.abs().max()) < 5, z
    assert r.extra["evaluations"] == (Np - 1) * 64 + 64


def test_ddpm_bound_converges_to_the_continuous_elbo():
    """N = 16 -> 1024 log-SNR steps: the discrete bound decreases to the continuous one, the gap halving with N."""
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.sample(8, torch.Generator().manual_seed(0))
    cont = E.gaussian_diffusion_term(tg, sch, x)
    gaps = [float((E.gaussian_diffusion_term(tg, sch, x, n) - cont).mean()) for n in (16, 64, 256, 1024)]
    assert all(a > b > 0 for a, b in zip(gaps, gaps[1:]))
    assert 3.5 < gaps[-2] / gaps[-1] < 4.5  # 4x fewer steps: 4x the gap (order 1)


def test_schedule_invariance_of_the_uniform_t_estimator():
    """Uniform t: the estimator differs between schedules with the same SNR end points, its mean does not."""
    from theory_checks.elbo_checks import matched

    tg = ring8()
    x = tg.sample(32, torch.Generator().manual_seed(0))
    res = {k: E.continuous_elbo(tg.field(s), x, t_sampling="uniform", n_t=512, generator=torch.Generator().manual_seed(1))
           for k, s in matched().items()}
    for k in ("cosine", "rf"):
        d = res[k].elbo - res["vp"].elbo
        z = float(d.sum() / torch.sqrt((res[k].se ** 2 + res["vp"].se ** 2).sum()))
        assert abs(z) < 5, (k, z)
        assert float(d.abs().max()) > 1e-3  # not the same numbers: the t-draws map to different log SNRs


def test_discretised_decoder_tends_to_the_density():
    """Bins much narrower than the decoder's sd sqrt(V): -log P(bin) = -log N(x) - d log(width) + O((width/sd)^2); bins
    much wider: P -> 1."""
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.sample(8, torch.Generator().manual_seed(0))
    f = tg.field(sch)

    def rec(**kw):
        return E.continuous_elbo(f, x, n_t=2, n_rep=2, n_dec=8, control_variate=False,
                                 generator=torch.Generator().manual_seed(5), **kw).terms["reconstruction"]

    width = 1e-5  # sd = sqrt(V) ~ 1e-2
    assert torch.allclose(rec(decoder="discretised", bin_width=width), rec() - 2 * math.log(width), atol=1e-6)
    assert float(rec(decoder="discretised", bin_width=10.0).abs().max()) < 1e-12
    edge = E._log_bin_mass(torch.tensor([[-1.0, 1.0]]), torch.tensor([[-5.0, 5.0]]), 0.1, 0.01, (-1.0, 1.0))
    assert float(edge.abs().max()) < 1e-12  # the outermost bins extend to -/+ infinity (Ho et al. 2020, eq. 13)


@pytest.mark.parametrize("call,match", [
    (lambda f, x: E.continuous_elbo(f, x, t_sampling="sobol"), "t_sampling"),
    (lambda f, x: E.continuous_elbo(f, x, n_rep=1), "n_rep"),
    (lambda f, x: E.continuous_elbo(f, x, decoder="discretised"), "bin_width"),
    (lambda f, x: E.continuous_elbo(f, x, data_var=-1.0), "data_var"),
    (lambda f, x: E.ddpm_bound(f, x, 10, variance="learned"), "variance"),
    (lambda f, x: E.ddpm_bound(f, x, 10, n_eps=1), "n_eps"),
    (lambda f, x: E.continuous_elbo(f, x[0]), "shape"),
    (lambda f, x: E.continuous_elbo(f, x * math.nan), "non-finite"),
    (lambda f, x: E.prior_kl(f.schedule, x, prior=-2.0), "prior variance"),
])
def test_bad_input_is_named(call, match):
    tg = gaussian_2d()
    with pytest.raises(ValueError, match=match):
        call(tg.field(S.VPLinear()), tg.sample(4, torch.Generator().manual_seed(0)))


def test_cli_elbo_on_an_exact_target(tmp_path, capsys):
    """`likelihood --elbo`: the PF-ODE log-likelihood equals the closed form; the continuous ELBO of the exact field is
    within Monte-Carlo error of log p_0 (its gap, the decoder mismatch, is ~1e-5 nats), >= it up to 5 SE on every
    sample; the DDPM bound with N = 100 uniform steps is far below (first steps coarse in log SNR)."""
    out = tmp_path / "lik"
    assert main(["likelihood", "--n", "32", "--target", "gaussian_2d", "--elbo", "--elbo-steps", "100",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "-ELBO continuous" in text and "-ELBO ddpm N=100" in text and "bits/dim" in text
    s = json.loads((out / "settings.json").read_text())["summary"]
    with open(out / "elbo.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert s["max_abs_error"] < 1e-5  # PF-ODE log p_t_min = closed form
    c, dd = s["elbo"]["continuous"], s["elbo"]["ddpm"]
    assert abs(c["gap_nats"]) < 5 * c["estimator_se"] and c["min_gap_over_se"] > -5
    assert dd["gap_nats"] > 10 * dd["estimator_se"] > 0
    assert dd["elbo_nats"] < c["elbo_nats"] <= -s["elbo"]["nll_exact_p0_nats"] + 5 * c["estimator_se"]
    assert len(rows) == 32 and math.isclose(np.mean([float(r["elbo_continuous"]) for r in rows]), c["elbo_nats"],
                                            rel_tol=1e-12)
    assert math.isclose(-np.mean([float(r["log_p0_exact"]) for r in rows]), s["elbo"]["nll_exact_p0_nats"],
                        rel_tol=1e-12)


@pytest.mark.slow  # trains a network and solves the PF-ODE: ~15 s on an idle core
def test_cli_elbo_on_a_learned_checkpoint(tmp_path):
    """A briefly trained MLP: the ELBO is finite, its mean is below the exact mean log p_0 of the data (Gibbs:
    E log p_theta <= E log p_0, and ELBO <= log p_theta), and JSON carries the same figures as the printout."""
    cli = [sys.executable, "-m", "diffusion_lab.cli"]
    p = subprocess.run(cli + ["train", "--data", "ring8", "--steps", "30", "--batch", "128", "--out", str(tmp_path),
                              "--no-plot"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(cli + ["likelihood", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--n", "32", "--rtol",
                              "1e-4", "--elbo", "--elbo-nodes", "16", "--elbo-draws", "4", "--out",
                              str(tmp_path / "lik")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    c = json.loads((tmp_path / "lik" / "settings.json").read_text())["summary"]["elbo"]["continuous"]
    assert math.isfinite(c["elbo_nats"]) and c["gap_nats"] > -5 * c["gap_se"]
    assert f"{-c['elbo_nats']:.6f} nats" in p.stdout and "learned field" in p.stdout


@pytest.mark.parametrize("argv,msg", [(["--elbo-steps", "10"], "needs --elbo"), (["--elbo", "--elbo-draws", "1"],
                                                                                  "--elbo-draws")])
def test_cli_elbo_refuses_bad_options(argv, msg, capsys):
    with pytest.raises(SystemExit):
        main(["likelihood", "--n", "4", *argv])
    assert msg in capsys.readouterr().err


@pytest.mark.slow  # three exact targets, 32 samples, N = 200: ~15 s
def test_elbo_gap_experiment_quick(tmp_path):
    """experiments.elbo_gap --quick: the continuous gap of every exact field within 5 SE of 0 (its predicted value is
    ~1e-5 nats), the DDPM bound on DDPM's uniform-t chain looser than on the log-SNR grid of the same N, both > 0."""
    from experiments import elbo_gap

    doc = elbo_gap.main(["--quick", "--json", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["rows"] == doc["rows"]
    for r in doc["rows"]:
        assert abs(r["gap_continuous"] - r["predicted_gap"]) < 5 * r["gap_continuous_se"], r
        assert r["gap_ddpm200_uniform"] > r["gap_ddpm200_logsnr"] > 3 * r["gap_ddpm200_logsnr_se"], r  # ~4-9 SE here


def test_ddpm_bound_takes_a_grid_in_either_order():
    tg, sch = gaussian_2d(), S.VPLinear()
    x = tg.sample(4, torch.Generator().manual_seed(0))
    grid = [sch.t_min, 0.1, 0.4, sch.t_max]
    a, b = (E.ddpm_bound(tg.field(sch), x, g, generator=torch.Generator().manual_seed(1)) for g in (grid, grid[::-1]))
    assert torch.equal(a.elbo, b.elbo) and a.per_step.shape == (3,) and a.settings["grid_kind"] == "given"
