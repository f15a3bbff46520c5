"""The training options of the ring8 recipes: Fourier time features, log-SNR and importance time sampling, the cosine
learning-rate schedule, the recipe objective."""
import math

import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.models import get_model
from diffusion_lab.models.embeddings import TimestepEmbedder
from diffusion_lab.models.mlp import GaussianFourierEmbedder, MLPScore
from experiments import ring8_recipes as R


def test_mlp_default_time_embedding_unchanged():
    torch.manual_seed(0)
    a = MLPScore(2, hidden=16, depth=1)
    torch.manual_seed(0)
    b = MLPScore(2, hidden=16, depth=1, time_embedding="sinusoidal")
    assert isinstance(a.t_embedder, TimestepEmbedder)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_mlp_fourier_time_embedding():
    net = get_model("mlp", data_shape=2, hidden=16, depth=2, time_embedding="fourier", fourier_scale=2.0)
    assert isinstance(net.t_embedder, GaussianFourierEmbedder)
    emb = net.t_embedder
    assert emb.freqs.shape == (32,)
    # the frequencies are a fixed buffer: N(0, scale^2) drawn from seed 0, the same for every network
    assert torch.equal(emb.freqs, MLPScore(2, hidden=8, depth=0, time_embedding="fourier", fourier_scale=2.0)
                       .t_embedder.freqs)
    assert "t_embedder.freqs" in net.state_dict()
    x, c = torch.randn(7, 2), torch.linspace(-2, 2, 7)
    assert torch.equal(net(x, c), torch.zeros(7, 2))  # zero-initialised output layers, as with sinusoidal features
    # the features are [cos(2 pi b c), sin(2 pi b c)]: check them against the formula through the first layer
    arg = 2 * math.pi * c[:, None] * emb.freqs[None]
    feats = torch.cat([torch.cos(arg), torch.sin(arg)], -1)
    torch.testing.assert_close(emb(c), emb.mlp(feats))


@pytest.mark.parametrize("kw", [{"time_embedding": "gaussian"}, {"time_embedding": "fourier", "fourier_scale": 0.0},
                                {"time_embedding": "fourier", "frequency_embedding_size": 7}])
def test_mlp_time_embedding_bad_input(kw):
    with pytest.raises(ValueError, match="time_embedding|scale|frequency_embedding_size"):
        MLPScore(2, hidden=8, depth=1, **kw)


def test_loglsnr_times_are_uniform_in_lambda():
    sch = S.VPLinear()
    n = 40_000
    t = R.sample_t_loglsnr(n, sch, generator=torch.Generator().manual_seed(0))
    assert t.min() >= sch.t_min and t.max() <= sch.t_max
    lam = sch.lam(t)
    lo, hi = sch.lam_range
    # U[lo, hi]: mean (lo+hi)/2 with SE (hi-lo)/sqrt(12 n); variance (hi-lo)^2/12 within 3% (SE of the sample
    # variance of a uniform is sqrt(4/5/n) relative = 0.45% at this n)
    se = (hi - lo) / math.sqrt(12 * n)
    assert abs(float(lam.mean()) - (lo + hi) / 2) < 4 * se
    assert float(lam.var()) == pytest.approx((hi - lo) ** 2 / 12, rel=0.03)
    with pytest.raises(ValueError, match="n must be"):
        R.sample_t_loglsnr(0, sch)


def test_importance_times_sample_their_density():
    sch = S.VPLinear()
    tp = torch.linspace(sch.t_min, sch.t_max, 9, dtype=torch.float64)
    r = torch.exp(-5 * tp)  # error concentrated at small t
    q = R.ImportanceTimes(sch, tp, r, mix=0.5, reweight=True)
    # q is a density on [t_min, t_max]
    tg = torch.linspace(sch.t_min, sch.t_max, 2001, dtype=torch.float64)
    assert float(torch.trapezoid(q.density(tg), tg)) == pytest.approx(1.0, abs=1e-3)
    n = 100_000
    t = q.sample(n, torch.Generator().manual_seed(1))
    assert t.min() >= sch.t_min and t.max() <= sch.t_max
    # P(t < m) = int_{t_min}^m q: against its empirical frequency (binomial SE)
    m = 0.3
    mask = tg <= m
    p = float(torch.trapezoid(q.density(tg[mask]), tg[mask]))
    assert abs(float((t < m).double().mean()) - p) < 4 * math.sqrt(p * (1 - p) / n) + 2e-3
    # importance weights p/q: E_q[w f] = E_uniform[f], here f(t) = t, the mean (t_min + t_max)/2
    w = q.weight(t)
    est = float((w * t).mean())
    se = float((w * t).std()) / math.sqrt(n)
    assert abs(est - 0.5 * (sch.t_min + sch.t_max)) < 4 * se
    assert torch.equal(R.ImportanceTimes(sch, tp, r).weight(t[:5]), torch.ones(5, dtype=torch.float64))


@pytest.mark.parametrize("args", [([0.1], [1.0]), ([0.1, 0.5], [1.0, -1.0]), ([0.1, 0.5], [0.0, 0.0])])
def test_importance_times_bad_input(args):
    with pytest.raises(ValueError, match="t and r|r must"):
        R.ImportanceTimes(S.VPLinear(), *args)


def test_cosine_lr_closed_form():
    assert R.cosine_lr(0, 1.0, 100, warmup=10) == pytest.approx(0.1)
    assert R.cosine_lr(9, 1.0, 100, warmup=10) == pytest.approx(1.0)
    assert R.cosine_lr(10, 1.0, 100, warmup=10) == pytest.approx(1.0)
    assert R.cosine_lr(55, 1.0, 100, warmup=10) == pytest.approx(0.5)  # half way through the decay
    assert R.cosine_lr(100, 2.0, 100, warmup=10, final=0.1) == pytest.approx(0.2)
    assert R.cosine_lr(500, 2.0, 100) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="warmup=200"):
        R.cosine_lr(0, 1.0, 100, warmup=200)


def test_cosine_trainer_sets_the_learning_rate():
    sch = S.VPLinear()
    net = get_model("mlp", data_shape=2, hidden=8, depth=1)
    data = torch.randn(64, 2)
    tr = R.CosineTrainer(net, T.Objective(sch), T.TensorLoader(data, batch_size=16), lr=1e-2, warmup=2,
                         total_steps=10)
    tr.run(6)
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(R.cosine_lr(5, 1e-2, 10, 2))


def test_recipe_objective():
    sch = S.VPLinear()
    with pytest.raises(ValueError, match="unknown time sampler 'foo'"):
        R.RecipeObjective(sch, time_sampler="foo")
    with pytest.raises(ValueError, match="needs importance"):
        R.RecipeObjective(sch, time_sampler="importance")
    with pytest.raises(ValueError, match="prediction|unknown"):
        R.RecipeObjective(sch, prediction="bogus", time_sampler="loglsnr")
    x0 = torch.randn(8, 2)
    net = get_model("mlp", data_shape=2, hidden=8, depth=1)
    g = torch.Generator().manual_seed(3)
    obj = R.RecipeObjective(sch, time_sampler="loglsnr")
    t, eps = obj.draw(x0, g)
    assert t.shape == (8,) and eps.shape == x0.shape
    # the same (t, eps) give the plain objective's loss; importance multiplies it by p/q
    torch.testing.assert_close(obj.per_sample(net, x0, t=t, eps=eps), T.Objective(sch).per_sample(net, x0, t=t,
                                                                                                  eps=eps))
    tp = torch.linspace(sch.t_min, sch.t_max, 5, dtype=torch.float64)
    imp = R.ImportanceTimes(sch, tp, torch.ones(5, dtype=torch.float64) + tp, reweight=True)
    obj_i = R.RecipeObjective(sch, time_sampler="importance", importance=imp)
    torch.testing.assert_close(obj_i.per_sample(net, x0, t=t, eps=eps),
                               T.Objective(sch).per_sample(net, x0, t=t, eps=eps) * imp.weight(t).float())
    assert obj_i.settings()["time_sampler"] == "importance"


def test_ablation_rows_and_recipe():
    rows = R.ablation(quick=True)
    names = [r[0] for r in rows]
    assert len(set(names)) == len(names) and names[0] == "baseline"
    assert set(R.ring8_recipe()) <= set(R.BASE)


def test_fit_with_importance_pilot():
    from diffusion_lab.targets import ring8

    data = ring8().sample(256, torch.Generator().manual_seed(0), dtype=torch.float32)
    recipe = dict(R.BASE, steps=4, batch=64, hidden=16, depth=1, time_sampler="importance", lr_schedule="cosine",
                  warmup=1, time_embedding="fourier")
    net, sd, cpu = R.fit(recipe, data, seed=0)
    assert cpu > 0 and sd == pytest.approx(float(data.std()), abs=1e-4)
    field = T.learned_field(net, S.VPLinear(), "eps", sigma_data=sd)
    x = torch.randn(3, 2, dtype=torch.float64)
    assert torch.isfinite(field.score(x, torch.full((3,), 0.5, dtype=torch.float64))).all()


def test_fit_stages_snapshots_do_not_change_the_run_and_the_cache_returns_the_same_weights(tmp_path):
    """Copies of the EMA network at intermediate steps leave the run as it is (the last copy equals a run without
    them, bit for bit), and a cached fit returns the same weights and CPU seconds. Also on an 8-D mixture."""
    from diffusion_lab.targets import gmm_multiscale, ring8

    data = ring8().sample(256, torch.Generator().manual_seed(0), dtype=torch.float32)
    recipe = dict(R.BASE, steps=6, batch=64, hidden=16, depth=1, time_sampler="importance", lr_schedule="cosine",
                  warmup=1)
    snaps, sd = R.fit_stages(recipe, data, seed=0, stages=(2, 6), cache=str(tmp_path))
    assert [s for s, _, _ in snaps] == [2, 6] and 0 < snaps[0][2] <= snaps[1][2]
    net, sd1, _ = R.fit(recipe, data, seed=0)
    assert sd1 == sd
    for a, b in zip(snaps[1][1].state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(snaps[0][1].state_dict().values(), net.state_dict().values()))
    again, sd2 = R.fit_stages(recipe, data, seed=0, stages=(2, 6), cache=str(tmp_path))
    assert sd2 == sd and [c for _, _, c in again] == [c for _, _, c in snaps]
    for (_, a, _), (_, b, _) in zip(snaps, again):
        for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(pa, pb)
    assert len(list(tmp_path.iterdir())) == 1
    tg = gmm_multiscale(dim=8, components=4)
    data8 = tg.sample(256, torch.Generator().manual_seed(0), dtype=torch.float32)
    (step, net8, _), = R.fit_stages(recipe, data8, seed=0, target=tg)[0]
    field = T.learned_field(net8, S.VPLinear(), "eps", sigma_data=round(float(data8.std()), 4))
    assert step == 6 and field.score(torch.zeros(3, 8, dtype=torch.float64), torch.full((3,), 0.5,
                                                                                       dtype=torch.float64)).shape == (3, 8)
    with pytest.raises(ValueError, match="stages must be increasing"):
        R.fit_stages(recipe, data, stages=(6, 2))
