"""Score-error diagnostics: e(t) against closed forms, its parameterisations and weighted integrals, the KL bound
against the Fokker-Planck truth, the paired two-sample MMD and the error decomposition."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from diffusion_lab import diagnostics as Dg
from diffusion_lab import schedules as S
from diffusion_lab.metrics import mmd2_population
from diffusion_lab.targets import Gaussian, GaussianMixture, bimodal_1d, gaussian_2d, ring8

VP = S.VPLinear()


@pytest.mark.parametrize("target,sch", [(ring8(), S.VPLinear()), (bimodal_1d(), S.VE()), (gaussian_2d(), S.EDM())],
                         ids=["ring8-vp", "bimodal-ve", "gauss2d-edm"])
def test_exact_field_has_zero_error(target, sch):
    prof = Dg.score_error_profile(target.field(sch), target, n_times=8, n=400)
    # the size of the score itself at each time, to make "zero" relative
    g = torch.Generator().manual_seed(1)
    scale = torch.stack([target.score(target.marginal(sch, t).sample(400, g), t, sch).pow(2).sum(1).mean()
                         for t in prof.t.tolist()])
    # float64 round-off of two evaluations of the same closed form: relative squared error ~ (1e-15)^2
    assert torch.all(prof.e <= 1e-24 * scale), (prof.e / scale).max()


@settings(max_examples=25)
@given(c=st.floats(0.0, 3.0), u=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), dim=st.sampled_from([1, 2, 3]))
def test_linear_perturbation_error_matches_closed_form(c, u, seed, dim):
    """delta = c (A x + b) has e(t) = c^2 [tr(A M A^T) + 2 b^T A m + |b|^2]: the estimator lands within 4 SE."""
    g = torch.Generator().manual_seed(seed)
    K = 3
    w = torch.rand(K, dtype=torch.float64, generator=g) + 0.2
    target = GaussianMixture(w / w.sum(), 2.0 * torch.randn(K, dim, dtype=torch.float64, generator=g),
                             (0.1 + torch.rand(K, 1, 1, dtype=torch.float64, generator=g))
                             * torch.eye(dim, dtype=torch.float64))
    A = torch.randn(dim, dim, dtype=torch.float64, generator=g)
    b = torch.randn(dim, dtype=torch.float64, generator=g)
    lo, hi = VP.lam_range
    t = float(VP.t_from_lam(torch.tensor(hi + u * (lo - hi), dtype=torch.float64)).clamp(VP.t_min, VP.t_max))
    field = Dg.perturbed_field(target, VP, Dg.linear_perturbation(lambda tt: c * torch.ones_like(tt), A, b))
    prof = Dg.score_error_profile(field, target, times=[t], n=3000, seed=seed)
    exact = Dg.linear_perturbation_error(target, VP, t, c, A, b)
    assert abs(float(prof.e[0]) - exact) <= 4.0 * float(prof.se[0]) + 1e-12 * (1.0 + exact)


def test_eps_and_x0_parameterisations_are_the_stated_multiples():
    """e_eps = sigma^2 e and e_x0 = sigma^4/alpha^2 e: checked against the errors of field.eps and field.denoiser."""
    tg = ring8()
    delta = Dg.linear_perturbation(lambda t: 0.2 + t, torch.tensor([[1.0, 0.5], [0.0, -1.0]]), torch.tensor([0.3, 0.1]))
    field = Dg.perturbed_field(tg, VP, delta)
    exact = tg.field(VP)
    prof = Dg.score_error_profile(field, tg, times=[0.01, 0.3, 0.9], n=500, seed=3)
    g = torch.Generator().manual_seed(3)
    for i, t in enumerate(prof.t.tolist()):
        x = tg.marginal(VP, t).sample(500, g)  # the same draws as the profile's (same generator, same order)
        e_eps = (field.eps(x, t) - exact.eps(x, t)).pow(2).sum(1).mean()
        e_x0 = (field.denoiser(x, t) - exact.denoiser(x, t)).pow(2).sum(1).mean()
        assert torch.isclose(prof.e_eps[i], e_eps, rtol=1e-9)
        assert torch.isclose(prof.e_x0[i], e_x0, rtol=1e-9)


@pytest.mark.parametrize("weighting", ["likelihood", "score", "eps", "x0"])
def test_weighted_integrals_against_adaptive_quadrature(weighting):
    """A constant error (delta = c b, A = 0) has e(t) = c^2 |b|^2 with zero variance, so the integral is the
    Gauss-Legendre quadrature of c^2 |b|^2 w(t) alone: compared with scipy's adaptive quad."""
    tg = ring8()
    b = torch.tensor([0.6, -0.8], dtype=torch.float64)
    field = Dg.perturbed_field(tg, VP, Dg.linear_perturbation(lambda t: 0.5 * torch.ones_like(t),
                                                               torch.zeros(2, 2), b))
    prof = Dg.score_error_profile(field, tg, n_times=40, n=8)
    assert torch.allclose(prof.e, torch.full_like(prof.e, 0.25), rtol=1e-12)
    val, se = prof.integral(weighting)
    w = lambda t: float(Dg.score_weight(weighting, VP, torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    ref, _ = quad(lambda t: 0.25 * w(t), VP.t_min, VP.t_max, limit=200, epsabs=0, epsrel=1e-12)
    assert se < 1e-12 * max(1.0, abs(val))
    assert val == pytest.approx(ref, rel=1e-8)


def test_score_weight_rejects_unknown_names():
    with pytest.raises(ValueError, match="'elbo'"):
        Dg.score_weight("elbo", VP, 0.5)


def test_profile_rejects_a_field_of_another_dimension():
    with pytest.raises(ValueError, match="dimension 1"):
        Dg.score_error_profile(ring8().field(VP), bimodal_1d(), n=10)


# -------------------------------------------------------------------------------------------- the KL bound
def _shifted(tp: GaussianMixture) -> GaussianMixture:
    return GaussianMixture(tp.weights, 1.15 * tp.means + 0.2, 1.3 * tp.covs)


def test_kl_bound_is_an_equality_for_the_score_of_another_noised_law():
    """s_theta = grad log q_t with pi = q_{t_max}: KL(p_t_min || q_t_min) = KL(p_T || q_T) + 1/2 int g^2 e dt (de
    Bruijn-type identity), so the bound must equal the Fokker-Planck truth within its Monte-Carlo SE plus the grid's
    error (1.5e-4 between 400 and 1600 cells, measured), and the truth must equal a Monte-Carlo KL of the laws."""
    tp = bimodal_1d()
    tq = _shifted(tp)
    kb = Dg.kl_bound(tq.field(VP), tp, start=tq.marginal(VP, VP.t_max), cells=400, half_width=6.0, steps=100,
                     n=4000)
    assert abs(kb.bound - kb.truth) <= 4.0 * kb.bound_se + 5e-4, kb
    mc, mc_se = Dg.kl_monte_carlo(tp.marginal(VP, VP.t_min), tq.marginal(VP, VP.t_min), 100_000)
    assert abs(kb.truth - mc) <= 4.0 * mc_se + 5e-4
    assert 0.97 < kb.ratio < 1.03


def test_kl_bound_holds_for_a_perturbed_score():
    """A linear perturbation c x with c = 0.2 and the exact start: truth <= bound (not tight)."""
    tg = bimodal_1d()
    field = Dg.perturbed_field(tg, VP, Dg.linear_perturbation(lambda t: 0.2 * torch.ones_like(t)))
    kb = Dg.kl_bound(field, tg, cells=300, half_width=6.0, steps=80, n=2000)
    assert kb.kl_start == 0.0
    assert 0 < kb.truth <= kb.bound
    # the Monte-Carlo score term against the closed form of each node
    ex = sum(float(w) * float(g2) * Dg.linear_perturbation_error(tg, VP, float(t), 0.2)
             for t, w, g2 in zip(kb.profile.t, kb.profile.quad_weights, kb.profile.g2))
    assert abs(kb.score_term - 0.5 * ex) <= 4.0 * kb.score_term_se


def test_kl_bound_prior_start_adds_the_prior_kl():
    tg = bimodal_1d()
    kb = Dg.kl_bound(tg.field(VP), tg, start="prior", cells=200, half_width=6.0, steps=60, n=200, n_times=8)
    prior = Gaussian(torch.zeros(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64)
                     * float(VP.sigma(torch.tensor(VP.t_max, dtype=torch.float64))) ** 2)
    mc, se = Dg.kl_monte_carlo(tg.marginal(VP, VP.t_max), prior, 20000, seed=17)
    assert kb.kl_start == pytest.approx(mc) and kb.score_term < 1e-20
    assert kb.truth <= kb.bound + 4 * kb.bound_se


# -------------------------------------------------------------------------------------------- maps
def test_error_map_integrates_to_the_profile():
    tg = ring8()
    c = 0.4
    field = Dg.perturbed_field(tg, VP, Dg.linear_perturbation(lambda t: c * torch.ones_like(t)))
    m = Dg.error_map(field, tg, 0.2, extent=(-5, 5, -5, 5), cells=160)
    exact = Dg.linear_perturbation_error(tg, VP, 0.2, c)
    # midpoint rule on a smooth integrand decaying to ~1e-12 at the box: relative error O(dx^2) ~ 1e-3
    assert m.e_quadrature() == pytest.approx(exact, rel=5e-3)
    assert m.err.shape == (160, 160)
    with pytest.raises(ValueError, match="d=1"):
        Dg.error_map(bimodal_1d().field(VP), bimodal_1d(), 0.2)


# -------------------------------------------------------------------------------------------- MMD and decomposition
def test_two_sample_mmd_matches_the_population_value():
    p = Gaussian(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    q = Gaussian(torch.tensor([0.5, 0.0], dtype=torch.float64), 1.2 * torch.eye(2, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x, y = q.sample(2000, g), p.sample(2000, g)
    v, se = Dg.mmd2_two_sample(x, y, 1.0)
    assert abs(v - mmd2_population(q, p, 1.0)) <= 4 * se
    # paired sets from the same law (y_i depends on x_i): still unbiased for 0
    z = p.sample(2000, g)
    y2 = (0.8 * z + 0.6 * p.sample(2000, g))
    v0, se0 = Dg.mmd2_two_sample(z, y2, 1.0)
    assert abs(v0) <= 4 * se0


def test_decomposition_on_the_exact_field():
    """On the exact field the network column is an exact-sample MMD^2 (zero within its SE) and total <= network +
    discretisation holds for the MMDs (up to Monte Carlo)."""
    tg = ring8()
    out = Dg.decompose_sampler_error(tg.field(VP), tg, ["euler", "heun"], [5, 20], n=600, rtol=1e-5)
    ref = out["reference"]
    assert abs(ref["mmd2_network"]) <= 4 * ref["mmd2_network_se"]
    rows = {(r["sampler"], r["nfe_budget"]): r for r in out["rows"]}
    assert rows[("euler", 5)]["mmd2_discretisation"] > rows[("heun", 20)]["mmd2_discretisation"]
    assert rows[("heun", 20)]["flow_error"] < rows[("euler", 5)]["flow_error"]
    assert out["reference"]["ranking"][20][0] == "heun"
    for r in out["rows"]:
        slack = 4 * (r["mmd2_total_se"] + r["mmd2_network_se"] + r["mmd2_discretisation_se"]) ** 0.5
        assert r["mmd_total"] <= r["mmd_network"] + r["mmd_discretisation"] + slack


# -------------------------------------------------------------------------------------------- planted bugs
def _wrong_factor(factor):
    def term(self):
        v, se = self.integral("likelihood")
        return factor * v, factor * se
    return term


def _wrong_weight(self):  # g instead of g^2
    v, se = self.integral(lambda sch, t: sch.g2(t).sqrt())
    return 0.5 * v, 0.5 * se


@pytest.mark.parametrize("planted", [_wrong_factor(1.0), _wrong_factor(0.25), _wrong_weight],
                         ids=["factor 1", "factor 1/4", "weight g"])
def test_catalogue_check_catches_a_wrong_bound(monkeypatch, planted):
    """The catalogue's equality check fails when the bound's factor 1/2 or its weight g^2 is planted wrong."""
    from theory_checks.learned_checks import kl_bound_equality_z

    monkeypatch.setattr(Dg.ScoreErrorProfile, "kl_score_term", planted)
    z, kb = kl_bound_equality_z(n=1000, cells=200, steps=50)
    assert z > 5.0, kb



# -------------------------------------------------------------------------------------------- the command
TRAIN = ["train", "--steps", "20", "--log-every", "10", "--n-train", "1000", "--batch", "64", "--hidden", "16",
         "--depth", "1", "--device", "cpu", "--eval-n", "200", "--no-plot"]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from diffusion_lab.cli import main

    out = tmp_path_factory.mktemp("train")
    assert main([*TRAIN, "--out", str(out)]) == 0
    return str(out / "checkpoint.pt")


def test_diagnose_writes_profile_maps_and_summary(small_checkpoint, tmp_path, capsys):
    import json
    import os

    from diffusion_lab.cli import main

    out = tmp_path / "diag"
    args = ["diagnose", "--checkpoint", small_checkpoint, "--out", str(out), "--n", "100", "--n-times", "4",
            "--cells", "16", "--fp-steps", "5", "--map-times", "0.01", "0.5"]
    assert main(args) == 0
    assert sorted(os.listdir(out)) == ["error_maps.png", "profile.csv", "score_error.png", "summary.json"]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["target"] == "ring8" and len(doc["profile"]) == 4 and len(doc["maps"]) == 2
    kb = doc["kl_bound"]
    assert kb["bound"] == pytest.approx(0.5 * doc["integrals"]["likelihood"]["value"])  # exact start: no prior term
    assert math.isfinite(kb["truth"]) and kb["ratio"] == pytest.approx(kb["bound"] / kb["truth"])
    assert "KL bound" in capsys.readouterr().out
    # --no-kl --no-plot with --overwrite leaves no figure of the earlier run
    assert main([*args, "--overwrite", "--no-kl", "--no-plot"]) == 0
    assert sorted(os.listdir(out)) == ["profile.csv", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["kl_bound"] is None


def test_diagnose_refuses_a_target_of_another_dimension(small_checkpoint, tmp_path, capsys):
    from diffusion_lab.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["diagnose", "--checkpoint", small_checkpoint, "--target", "bimodal_1d", "--out", str(tmp_path / "d")])
    assert exc.value.code == 2
    assert "dimension 1" in capsys.readouterr().err


def test_compare_checkpoint_reports_network_and_discretisation(small_checkpoint, tmp_path):
    import csv
    import json

    from diffusion_lab import training as T
    from diffusion_lab.cli import main
    from diffusion_lab.distributed import initial_noise
    from diffusion_lab.metrics import mmd_bandwidth
    from diffusion_lab.samplers import sample

    out = tmp_path / "cmp"
    assert main(["compare", "--checkpoint", small_checkpoint, "--methods", "heun", "--nfe", "8", "--n", "64",
                 "--rtol", "1e-5", "--out", str(out), "--no-plot"]) == 0
    with open(out / "results.csv") as fh:
        row = next(csv.DictReader(fh))
    ref = json.loads((out / "settings.json").read_text())["reference"]
    assert float(row["mmd2_network"]) == pytest.approx(ref["mmd2_adaptive"], rel=1e-12)
    field = T.field_from_checkpoint(T.load_checkpoint(small_checkpoint))
    sch = field.schedule
    # compare's seeding (diffusion_lab.distributed): start i from (seed 0, i); 64 samples are one batch
    x_T = initial_noise(0, 0, 64, (2,), float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64))))
    flow = sample(field, x_T, "adaptive", rtol=1e-5, atol=1e-5).x
    heun = sample(field, x_T, "heun", nfe=8).x
    bw = mmd_bandwidth(ring8().marginal(sch, sch.t_min))
    assert float(row["mmd2_discretisation"]) == pytest.approx(Dg.mmd2_two_sample(heun, flow, bw)[0], rel=1e-9)


def test_guide_page_examples_run():
    import doctest
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "guide" / "score_error.md"
    text = re.sub(r"^\s*(```|~~~).*$", "", path.read_text(), flags=re.MULTILINE)
    test = doctest.DocTestParser().get_doctest(text, {}, path.stem, str(path), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.tries >= 8 and runner.failures == 0


def test_ranking_agreement_counts_kept_tied_and_reversed_pairs():
    a = [{"sampler": s, "nfe_budget": 10, "mmd_rank": r} for s, r in (("x", 1), ("y", 2), ("z", 3), ("w", 3))]
    b = [{"sampler": s, "nfe_budget": 10, "mmd_rank": r} for s, r in (("x", 1), ("y", 1), ("z", 4), ("w", 1))]
    got = Dg.ranking_agreement(a, b)[10]
    assert sorted(got["kept"]) == ["x<z", "y<z"]
    assert sorted(got["tied"]) == ["x<w", "x<y", "y<w"]
    assert got["reversed"] == [] and got["resolved_in_b_only"] == ["w<z"]
    b[0]["mmd_rank"] = 3
    assert "x<y" in Dg.ranking_agreement(a, b)[10]["reversed"]


@settings(max_examples=25)
@given(a=st.lists(st.integers(0, 4), min_size=2, max_size=9), seed=st.integers(0, 2**16))
def test_kendall_tau_matches_scipy_with_ties(a, seed):
    """tau-b with ties against scipy.stats.kendalltau (an independent implementation), and for replicates row by
    row; NaN when one side ties every pair."""
    from scipy.stats import kendalltau

    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 4, (len(a),), generator=g).double()
    ref = kendalltau(a, b.numpy()).statistic
    got = Dg.kendall_tau(a, b)
    assert (math.isnan(ref) and math.isnan(got)) or got == pytest.approx(ref, abs=1e-12)
    rows = Dg.kendall_tau(torch.tensor([a, a], dtype=torch.float64), torch.stack([b, -b]))
    assert rows.shape == (2,)
    assert (math.isnan(ref) and rows.isnan().all()) or (rows[0] == pytest.approx(ref, abs=1e-12)
                                                        and rows[1] == pytest.approx(-ref, abs=1e-12))
    assert Dg.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0


def _projections(means, sd, n, seed):
    """h1 vectors with exactly the given means and sample standard deviation sd (standardised Gaussian draws)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(len(means), n, generator=g, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, keepdim=True)
    return torch.tensor(means, dtype=torch.float64)[:, None] + sd * z


def test_ranking_kendall_bootstrap_matches_the_normal_approximation():
    """Two samplers whose paired difference is one standard error on b: the replicate order flips with probability
    Phi(-1) = 0.1587 (the linearised U-statistic bootstrap has variance 4 Var(h1)/n, the estimate's SE^2), so
    tau_se = 2 sqrt(p (1 - p)) = 0.731; the bootstrap estimate of p has SE sqrt(p(1-p)/4000) = 0.006 (0.011 in
    tau_se), and the replicate means of these Gaussian projections are normal: 0.03 is about 3 SE. On a, the same
    pair is 50 SE apart."""
    n, sd = 1000, 1.0
    rows = [{"sampler": s, "nfe_budget": 10} for s in ("x", "y")]
    # independent projections for x and y: SE of the difference = sqrt(2) 2 sd / sqrt(n)
    se_diff = math.sqrt(2) * 2 * sd / math.sqrt(n)
    pa = _projections([0.0, 50 * se_diff], sd, n, 1)
    pb = _projections([0.0, 1.0 * se_diff], sd, n, 2)
    out = Dg.ranking_kendall(rows, pa, rows, pb, n_boot=4000, seed=0, paired=False)[10]
    p = 0.5 * math.erfc(1 / math.sqrt(2))
    assert out["tau"] == 1.0 and out["order_a"] == ["x", "y"] == out["order_b"]
    assert out["tau_se"] == pytest.approx(2 * math.sqrt(p * (1 - p)), abs=0.03)
    assert out["tau_noise_a"] == 1.0
    # two independent replicates of b agree with probability (1-p)^2 + p^2: tau = 1 - 4 p (1 - p)
    assert out["tau_noise_b"] == pytest.approx(1 - 4 * p * (1 - p), abs=0.04)
    (pair,) = out["pairs"]
    assert pair["se_b"] == pytest.approx(se_diff, rel=0.05) and pair["label"] == "kept"
    assert pair["resolved_a"] and not pair["resolved_b"]


def test_ranking_kendall_labels_reversed_and_noise_swaps():
    n = 2000
    names = ("w", "x", "y", "z")
    rows = [{"sampler": s, "nfe_budget": 50} for s in names]
    se1 = 2.0 / math.sqrt(n)  # SE of one estimate with sd 1
    # a: w < x < y < z, all 20 SE apart; b: x and w reversed by 20 SE, y and z swapped by 0.1 SE (noise)
    pa = _projections([0.0, 20 * se1, 40 * se1, 60 * se1], 1.0, n, 3)
    pb = _projections([20 * se1, 0.0, 40.1 * se1, 40 * se1], 1.0, n, 3)
    out = Dg.ranking_kendall(rows, pa, rows, pb, n_boot=400)[50]
    labels = {p["pair"]: p["label"] for p in out["pairs"]}
    assert labels["w|x"] == "reversed" and labels["y|z"] == "swapped within noise"
    assert out["counts"] == {"kept": 4, "reversed": 1, "swapped within noise": 1}
    # point tau: 6 pairs, 2 discordant: (4 - 2)/6
    assert out["tau"] == pytest.approx(1 / 3)
    assert out["order_b"] == ["x", "w", "z", "y"]
    assert out["tau_ci"][0] <= out["tau"] + 1e-12 and out["tau_ci"][1] >= 1 / 3 - 1e-12
    with pytest.raises(ValueError, match="n_boot"):
        Dg.ranking_kendall(rows, pa, rows, pb, n_boot=3)
    with pytest.raises(ValueError, match="one row per row"):
        Dg.ranking_kendall(rows, pa[:2], rows, pb)
    with pytest.raises(ValueError, match="key must be"):
        Dg.ranking_kendall(rows, pa, rows, pb, key="flow_error")


def test_decomposition_projections_average_to_the_estimates():
    """Every MMD^2 of the decomposition is the mean of its Hoeffding projections (an identity of the U-statistic)."""
    tg = ring8()
    out = Dg.decompose_sampler_error(tg.field(VP), tg, ["euler", "heun"], [4], n=300, rtol=1e-4)
    pr = out["projections"]
    assert pr["mmd2_total"].shape == (2, 300) == pr["mmd2_discretisation"].shape
    for i, r in enumerate(out["rows"]):
        assert float(pr["mmd2_total"][i].mean()) == pytest.approx(r["mmd2_total"], rel=1e-12, abs=1e-15)
        assert float(pr["mmd2_discretisation"][i].mean()) == pytest.approx(r["mmd2_discretisation"], rel=1e-12,
                                                                           abs=1e-15)
        assert r["mmd2_total_se"] == pytest.approx(math.sqrt(4 / 300 * float(pr["mmd2_total"][i].var())), rel=1e-12)
    assert float(pr["mmd2_network"].mean()) == pytest.approx(out["reference"]["mmd2_network"], rel=1e-12, abs=1e-15)


@pytest.mark.slow
def test_score_error_experiment_quick_run():
    """The experiment's quick run: the bound holds at every stage and the exact field's grid KL is the floor."""
    from experiments import score_error

    rows, meta = score_error.run(quick=True, cache=None)
    stages = [r for r in rows if r["step"] >= 0]
    assert all(r["kl_truth"] <= r["kl_bound"] + 4 * r["kl_bound_se"] for r in stages)
    floor = [r for r in rows if r["step"] < 0][0]["kl_truth"]
    assert floor < 0.01 * min(r["kl_truth"] for r in stages)
    assert set(meta["headline"]["ranking_survives"]) == {10, 50}
