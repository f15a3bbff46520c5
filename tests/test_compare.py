"""run_comparison: the MMD to the exact law for every sampler, the null band, SE-aware ranks, exact W2 of
stochastic samplers on Gaussian targets, and the separation of em at NFE 20 on ring8 at the default sample count.

Statistical assertions use fixed seeds and margins of >= 3 standard errors, so they fail only if a formula or
the pairing is wrong (or, for the em claim, if the default sample count stops resolving the sampler).
"""
import math

import pytest
import torch

from diffusion_lab import compare as C
from diffusion_lab import metrics as M
from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.samplers import sample, steps_for_nfe


@pytest.fixture(scope="module")
def ring_run():
    return C.run_comparison(T.ring8(), S.VPLinear(), ["euler", "dpmpp_3m", "em"], (5, 50), n_samples=600, seed=0,
                            null_repeats=6)


def test_every_row_has_the_mmd_and_a_rank(ring_run):
    rows, ref = ring_run["rows"], ring_run["reference"]
    assert len(rows) == 6
    for r in rows:
        assert math.isfinite(r["mmd2"]) and r["mmd2_se"] > 0 and r["mmd_rank"] >= 1
        z = (r["mmd2"] - ref["mmd2_null_mean"]) / math.hypot(r["mmd2_se"], ref["mmd2_null_std"])
        assert math.isclose(r["mmd2_z"], z, rel_tol=1e-12) and r["resolved"] == (z > 2)
    assert ref["mmd_bandwidth"] == M.mmd_bandwidth(T.ring8().marginal(S.VPLinear(), S.VPLinear().t_min))
    assert len(ref["mmd2_null_values"]) == 6 and ref["n_samples"] == 600


def test_null_band_and_exact_flow_map(ring_run):
    ref = ring_run["reference"]
    # expectation 0 under the null: the band's mean within 4 of its standard errors
    assert abs(ref["mmd2_null_mean"]) < 4 * ref["mmd2_null_std"] / math.sqrt(6)
    # the exact flow map's samples are exact samples of p_t_min: inside the band
    assert abs(ref["mmd2_exact_flow_z"]) < 3


def test_coarse_samplers_resolved_and_ranked(ring_run):
    rows = {(r["sampler"], r["nfe_budget"]): r for r in ring_run["rows"]}
    assert rows[("euler", 5)]["resolved"] and rows[("em", 5)]["resolved"]
    assert rows[("em", 5)]["mmd_rank"] > 1  # em's 5-step error (2e-2) is resolved against euler's (9e-3)
    assert not rows[("dpmpp_3m", 50)]["resolved"]  # 50 NFE of a third-order solver: indistinguishable from exact
    # euler's first-order error at 50 NFE is below the null's noise, yet the PAIRED comparison with dpmpp_3m
    # (same starts) resolves it
    assert not rows[("euler", 50)]["resolved"] and rows[("euler", 50)]["mmd_rank"] > rows[("dpmpp_3m", 50)]["mmd_rank"]
    ranking = ring_run["reference"]["ranking"]
    assert set(ranking) == {5, 50}
    for budget, order in ranking.items():
        ranks = [rows[(s, budget)]["mmd_rank"] for s in order]
        assert ranks == sorted(ranks) and ranks[0] == 1


def test_mmd_ranks_share_unresolved_ties():
    law = T.ring8()
    x = law.sample(800, torch.Generator().manual_seed(0))
    exact = M.mmd2_exact(x, law)
    nudged = M.mmd2_exact(x * 1.002, law)  # far below the noise
    wide = M.mmd2_exact(x * 1.3, law)  # far above it
    assert C.mmd_ranks([exact, nudged, wide]) == [1, 1, 3]
    # paired SE of a difference is below the unpaired one for strongly correlated sets
    assert M.mmd2_diff_se(exact, nudged) < 0.1 * math.hypot(exact.se, nudged.se)


def test_exact_w2_for_stochastic_samplers_on_gaussian():
    out = C.run_comparison(T.gaussian_2d(), S.VPLinear(), ["euler", "em"], (10, 40), n_samples=200, null_repeats=3)
    w2 = {(r["sampler"], r["nfe_budget"]): r["w2_exact"] for r in out["rows"]}
    assert all(math.isfinite(v) for v in w2.values())
    assert w2[("em", 40)] < w2[("em", 10)] and w2[("euler", 40)] < w2[("euler", 10)]
    # em's law at NFE 10: its mean and covariance against a large Monte Carlo run with the same grid
    tg, s = T.gaussian_2d(), S.VPLinear()
    pT, law = tg.marginal(s, s.t_max), tg.marginal(s, s.t_min)
    x = sample(tg.field(s), pT.sample(100_000, torch.Generator().manual_seed(1)), "em", steps=10,
               grid_kind="logsnr", generator=torch.Generator().manual_seed(2)).x
    w2_mc = M.gaussian_w2(x.mean(0), torch.cov(x.T), law.mu, law.cov)
    assert abs(w2_mc - w2[("em", 10)]) < 0.02  # MC error of the moments at n = 1e5 is ~5e-3


def test_stochastic_sampler_without_noise_count_gives_nan(monkeypatch):
    real = C.sample

    def no_count(*args, **kwargs):
        res = real(*args, **kwargs)
        res.info.pop("noise_draws", None)
        return res

    monkeypatch.setattr(C, "sample", no_count)
    out = C.run_comparison(T.gaussian_2d(), S.VPLinear(), ["em"], (10,), n_samples=100, null_repeats=2)
    assert math.isnan(out["rows"][0]["w2_exact"]) and math.isfinite(out["rows"][0]["mmd2"])


def test_em_nfe20_separated_at_default_sample_count():
    """The MMD resolves em at NFE 20 on ring8 (too-wide modes) at the default sample count: >= 3 SE."""
    tg, s = T.ring8(), S.VPLinear()
    law = tg.marginal(s, s.t_min)
    x_T = tg.marginal(s, s.t_max).sample(C.DEFAULT_SAMPLES, torch.Generator().manual_seed(0))
    x = sample(tg.field(s), x_T, "em", steps=steps_for_nfe("em", 20, "step"), grid_kind="logsnr",
               generator=torch.Generator().manual_seed(1)).x
    r = M.mmd2_exact(x, law)
    assert r.mmd2 > 3 * r.se, (r.mmd2, r.se)


def test_bad_sample_count():
    with pytest.raises(ValueError, match="n_samples must be >= 3"):
        C.run_comparison(T.ring8(), S.VPLinear(), ["euler"], (5,), n_samples=2)


def test_unknown_method_option_fails_before_any_work(tmp_path):
    """A misspelt option (ddim:et=0.5) is refused when the method list is parsed, naming the valid options;
    the command exits 2 with one line and writes nothing."""
    import subprocess
    import sys

    from diffusion_lab.compare import parse_method

    with pytest.raises(ValueError, match="has no option 'et'.*its options: eta, noise"):
        parse_method("ddim:et=0.5")
    assert parse_method("pc:predictor=em,snr=0.2").options == (("predictor", "em"), ("snr", 0.2))
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "diffusion_lab.cli", "compare", "--methods", "ddim:et=0.5",
                        "--nfe", "5", "--n", "16", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "no option 'et'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
