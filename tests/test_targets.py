"""The target families in any dimension and the benchmark suite: closed-form identities (score = -eps/sigma,
Tweedie, score = autograd of log p_t), the diagonal-covariance path against the full one, determinism, scaling
and the documented structure (condition number, separation, weights).

Tolerances: identities hold in float64 algebra, checked at 1e-9 relative as in tests/test_param_targets.py;
diagonal vs full path: the same formulas with different round-off, 1e-10 relative.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from theory_checks.parameterisation import score_residual, tweedie_residual, velocity_residual
from theory_checks.strategies import points, schedules, times

FAMILIES = ["aniso", "gmm", "gmm_separated", "gmm_overlap", "gmm_multiscale"]


def _build(name, dim, diagonal=False, seed=0):
    kw = {} if name == "aniso" else {"components": 3, "diagonal": diagonal}
    return T.get_target(name, dim=dim, seed=seed, **kw)


@given(st.data())
@settings(max_examples=30)
def test_family_identities(data):
    name = data.draw(st.sampled_from(FAMILIES))
    dim = data.draw(st.sampled_from([1, 2, 3]))
    tg = _build(name, dim, diagonal=data.draw(st.booleans()), seed=data.draw(st.integers(0, 5)))
    s = data.draw(schedules(["vp", "ve", "edm", "rf", "cosine"]))
    t = data.draw(times(s, 1))[0]
    x = data.draw(points(tg.dim, 4, 2.0))
    assert score_residual(tg, s, x, t) <= 1e-9
    assert tweedie_residual(tg, s, x, t) <= 1e-9
    # the drift f x - g^2/2 s cancels two large terms near the clipped end of the cosine schedule (g^2 up to 999):
    # the reference itself carries a relative error eps * (|f x| + |g^2 s|/2) / |drift|, so scale the tolerance
    tt_ = torch.as_tensor(t, dtype=torch.float64)
    terms = (s.f(tt_) * x).abs() + (0.5 * s.g2(tt_) * tg.score(x, t, s)).abs()
    drift = s.f(tt_) * x - 0.5 * s.g2(tt_) * tg.score(x, t, s)
    cancel = float(terms.max() / drift.abs().max().clamp_min(1e-300))
    assert velocity_residual(tg, s, x, t) <= 1e-9 * max(1.0, cancel)
    # score = -eps / sigma through the exact field
    f = tg.field(s)
    tt = torch.as_tensor(t, dtype=torch.float64)
    sc = f.score(x, tt)
    assert torch.allclose(sc, -f.eps(x, tt) / s.sigma(tt), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["gmm", "gmm_separated", "gmm_overlap", "gmm_multiscale"])
def test_diagonal_path_equals_full_path(name):
    """The opt-in diagonal path gives the full-covariance answers for the same (diagonal) covariances,
    per-time and per-sample t alike."""
    dg = _build(name, 5, diagonal=True, seed=3)
    full = T.GaussianMixture(dg.weights, dg.means, dg.covs)
    assert dg.diagonal and not full.diagonal
    s = S.VPCosine()
    x = dg.marginal(s, 0.4).sample(16, torch.Generator().manual_seed(0))
    for t in (0.02, 0.4, torch.linspace(0.05, 0.95, 16, dtype=torch.float64)):
        for fn in ("score", "denoiser", "log_prob_t", "posterior_cov", "responsibilities"):
            a, b = getattr(dg, fn)(x, t, s), getattr(full, fn)(x, t, s)
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (fn, t)
        tt = torch.as_tensor(t, dtype=torch.float64)
        for a, b in zip(dg.field(s).x0_eps(x, tt), full.field(s).x0_eps(x, tt)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    m = dg.marginal(s, 0.3)
    assert m.diagonal and torch.allclose(m.covs, full.marginal(s, 0.3).covs, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    assert torch.allclose(dg.sample(50, torch.Generator().manual_seed(1)), full.sample(50, g), rtol=1e-14, atol=1e-14)


def test_diagonal_flag_rejects_full_covariance():
    with pytest.raises(ValueError, match="component 1 has non-zero off-diagonal"):
        T.GaussianMixture([0.5, 0.5], [[0.0, 0.0], [1.0, 1.0]], [torch.eye(2).tolist(), [[1.0, 0.1], [0.1, 1.0]]],
                          diagonal=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_deterministic_and_unit_spread(name):
    for dim in (1, 7):
        a, b = _build(name, dim), _build(name, dim)
        assert torch.equal(a.means, b.means) and torch.equal(a.covs, b.covs) and torch.equal(a.weights, b.weights)
        c = _build(name, dim, seed=1)
        assert not (torch.equal(c.covs, a.covs) and torch.equal(c.means, a.means))
        tr = float(torch.diagonal(a.covariance()).sum())
        if name == "aniso":
            assert math.isclose(float(torch.diagonal(a.cov).sum()), dim, rel_tol=1e-12)
        else:
            assert math.isclose(tr, dim, rel_tol=1e-12)
            assert float(a.mean().abs().max()) < 1e-12


def test_aniso_spectrum():
    for dim, cond in ((2, 1e3), (16, 1e3), (64, 10.0)):
        g = T.get_target("aniso", dim=dim, cond=cond)
        ev = torch.linalg.eigvalsh(g.cov)
        assert math.isclose(float(ev.max() / ev.min()), cond, rel_tol=1e-8)
        assert math.isclose(float(ev.mean()), 1.0, rel_tol=1e-12)
    assert T.TARGETS["aniso_gaussian"] is T.aniso_gaussian  # the old target is kept as it was


def test_mixture_structure():
    sep = T.get_target("gmm_separated", dim=3, components=10)
    r = torch.sqrt(torch.linalg.eigvalsh(sep.covs)[:, -1])
    dist = torch.cdist(sep.means, sep.means) / (r[:, None] + r[None, :])
    dist.fill_diagonal_(math.inf)
    assert math.isclose(float(dist.min()), 4.0, rel_tol=1e-10)
    ms = T.get_target("gmm_multiscale", dim=4, components=16)
    assert math.isclose(float(ms.weights.min()), 0.01, rel_tol=1e-6)
    widths = torch.linalg.eigvalsh(ms.covs).mean(1).sqrt()
    assert math.isclose(float(widths.max() / widths.min()), 10.0, rel_tol=1e-8)
    ov = T.get_target("gmm_overlap", dim=6, components=4)
    ev = torch.linalg.eigvalsh(ov.covs)
    assert torch.allclose(ev[:, -1] / ev[:, 0], torch.full((4,), 10.0, dtype=torch.float64), rtol=1e-8)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        T.get_target("gmm_overlap", dim=0)
    with pytest.raises(ValueError, match="min_weight must be in"):
        T.get_target("gmm_multiscale", dim=2, components=4, min_weight=0.3)


def test_suite_covers_dims_and_components():
    suite = T.suite()
    labels = [lab for lab, _ in suite]
    assert len(set(labels)) == len(labels) >= 8
    dims = {tg.dim for _, tg in suite}
    ks = {tg.n_components for _, tg in suite}
    assert min(dims) == 1 and max(dims) == 256 and 2 in ks and 64 in ks
    for lab, tg in suite:
        assert isinstance(tg, T.GaussianMixture)
        x = tg.sample(4, torch.Generator().manual_seed(0))
        assert torch.isfinite(tg.log_prob(x)).all(), lab
    assert all(name in T.TARGETS for _, name, _ in T.SUITE)
