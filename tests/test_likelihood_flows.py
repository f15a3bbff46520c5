"""Likelihood, inversion, flow maps and exact classifier guidance: closed forms through the implementations."""
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab import flows
from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.likelihood import hutchinson_moments_exact, log_likelihood
from diffusion_lab.samplers import sample, time_grid
from theory_checks.likelihood_checks import (classifier_bayes_residual, loglik_exact_residual, loglik_hutchinson_z)
from theory_checks.strategies import mixtures


@settings(max_examples=8, deadline=None)
@given(mixtures(max_k=2, max_d=2), st.sampled_from(["vp", "ve", "rf", "cosine"]))
def test_loglik_exact_divergence_any_mixture(tg, name):
    assert loglik_exact_residual(tg, S.SCHEDULES[name](), n=8) <= 1e-6


def test_loglik_hutchinson_unbiased():
    assert loglik_hutchinson_z(T.ring8(), S.VPLinear(), "gaussian", seed=3) < 5


@given(st.integers(1, 7), st.integers(0, 1000))
def test_hutchinson_enumeration(d, seed):
    A = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    mean, var = hutchinson_moments_exact(A)
    As = 0.5 * (A + A.T)
    assert abs(mean - float(torch.trace(A))) <= 1e-12 * (1 + float(A.abs().sum()))
    assert abs(var - 2 * (float((As**2).sum()) - float((torch.diagonal(A) ** 2).sum()))) <= 1e-10 * (1 + var)


def test_loglik_result_fields_and_errors():
    tg, sch = T.gaussian_2d(), S.VE()
    x = tg.sample(4, torch.Generator().manual_seed(0))
    r = log_likelihood(tg.field(sch), x)
    assert r.latent.shape == x.shape and r.nfe > 10 and torch.allclose(r.bpd, -r.log_prob / (2 * 0.6931471805599453))
    with pytest.raises(ValueError, match="n_probes must be an integer >= 1, got 0"):
        log_likelihood(tg.field(sch), x, divergence="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="divergence must be"):
        log_likelihood(tg.field(sch), x, divergence="trace")
    with pytest.raises(ValueError, match="rtol"):
        log_likelihood(tg.field(sch), x, rtol=0.0)


@pytest.mark.parametrize("method,steps,tol", [("ddim", 200, 0.05), ("dpmpp_2m", 100, 1e-3), ("rk4", 50, 1e-5),
                                               ("adaptive", None, 1e-7)])
def test_inversion_reconstruction(method, steps, tol):
    tg, sch = T.ring8(), S.VPLinear()
    x = tg.marginal(sch, sch.t_min).sample(128, torch.Generator().manual_seed(0))
    kw = {"rtol": 1e-9, "atol": 1e-9} if method == "adaptive" else {}
    r = flows.reconstruction(tg.field(sch), x, method, steps or 1, **kw)
    assert r["mean_error"] < tol, r["mean_error"]


def test_increasing_grid_only_for_deterministic_methods():
    tg, sch = T.ring8(), S.VPLinear()
    x = tg.sample(4, torch.Generator().manual_seed(0))
    g = time_grid(sch, 5).flip(0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(tg.field(sch), x, "em", grid=g)
    with pytest.raises(ValueError, match="eta=0.5 > 0 needs a decreasing grid"):
        sample(tg.field(sch), x, "ddim", grid=g, eta=0.5)
    with pytest.raises(ValueError, match="final='denoise' needs a decreasing grid"):
        sample(tg.field(sch), x, "euler", grid=g, final="denoise")


def test_flow_map_matches_gaussian_closed_form_and_is_monotone_in_1d():
    tg, sch = T.Gaussian([0.5], [[0.3]]), S.VPCosine()
    x = torch.linspace(-3, 3, 50, dtype=torch.float64)[:, None]
    num = flows.flow_map(tg.field(sch), x, 0.9, 0.05)
    assert torch.allclose(num, flows.gaussian_flow_map(tg, sch, x, 0.9, 0.05), rtol=1e-8, atol=1e-10)
    assert (torch.diff(num[:, 0]) > 0).all()
    assert torch.equal(flows.flow_map(tg.field(sch), x, 0.4, 0.4), x)


def test_consistency_boundary_for_any_F():
    f = flows.consistency_parameterisation(lambda x, t: x**3 + 7.0, eps=0.01)
    x = torch.randn(10, 3, dtype=torch.float64)
    assert torch.equal(f(x, 0.01), x)
    assert not torch.equal(f(x, 0.5), x)


def test_classifier_guidance_is_bayes():
    assert classifier_bayes_residual(S.RectifiedFlow(), 0.4) <= 1e-10


def test_class_conditional_mixture_validation():
    with pytest.raises(ValueError, match="classes \\[1\\] have no component"):
        T.ClassConditionalMixture([0.5, 0.5], [[0.0], [1.0]], [[[1.0]], [[1.0]]], [0, 2])
    with pytest.raises(ValueError, match="class y must be in 0..1"):
        T.two_class_1d().conditional(2)


def test_likelihood_cli():
    p = subprocess.run([sys.executable, "-m", "diffusion_lab.cli", "likelihood", "--n", "16"], capture_output=True,
                       text=True)
    assert p.returncode == 0 and "bits/dim" in p.stdout and "NFE" in p.stdout
    p = subprocess.run([sys.executable, "-m", "diffusion_lab.cli", "likelihood", "--probes", "0"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1


def test_classifier_guidance_exact_and_learned():
    from diffusion_lab.classifier import classifier_guidance, exact_classifier, train_noisy_classifier

    tg, sch = T.two_class_1d(4.0, 0.7), S.VPLinear()
    f = tg.field(sch)
    x_T = tg.marginal(sch, sch.t_max).sample(4000, torch.Generator().manual_seed(1))
    exact = sample(classifier_guidance(f, exact_classifier(tg, sch), 1, 1.0), x_T, "heun", steps=40)
    # gamma = 1 with the exact classifier samples p(x | y=1) = N(2, 0.49): mean within 5 SE (+ solver error)
    assert abs(float(exact.x.mean()) - 2.0) < 5 * 0.7 / 4000**0.5 + 0.01
    assert exact.nfe == 79
    unguided = sample(classifier_guidance(f, exact_classifier(tg, sch), 1, 0.0), x_T, "heun", steps=40)
    assert torch.allclose(unguided.x, sample(f, x_T, "heun", steps=40).x)
    x0, k = tg.sample(8000, torch.Generator().manual_seed(0), return_labels=True)
    clf = train_noisy_classifier(x0, tg.labels[k], sch, steps=500)
    learned = sample(classifier_guidance(f, clf, 1, 1.0), x_T, "heun", steps=40)
    assert float((learned.x > 0).double().mean()) > 0.85  # unguided: 0.5
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0, got -1"):
        classifier_guidance(f, clf, 1, -1.0)


def test_likelihood_cli_from_checkpoint(tmp_path):
    cli = [sys.executable, "-m", "diffusion_lab.cli"]
    p = subprocess.run(cli + ["train", "--data", "ring8", "--steps", "30", "--batch", "128", "--out", str(tmp_path),
                              "--no-plot"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(cli + ["likelihood", "--checkpoint", str(tmp_path / "checkpoint.pt"), "--n", "8",
                              "--rtol", "1e-4"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "checkpoint" in p.stdout and "bits/dim" in p.stdout and "closed form" in p.stdout
