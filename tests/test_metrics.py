"""MMD against an exact Gaussian-mixture law: the closed-form terms, unbiasedness, the standard error, the
population value for two Gaussians, and the high-dimensional / many-component paths.

Tolerances: closed-form against quadrature to 1e-9 (quad's own error); closed form against an independent
closed form (mixture densities of the convolved law) to 1e-10 relative; Monte Carlo checks at 4-5 standard
errors of the Monte-Carlo estimate they are compared with (false-alarm rate < 1e-4 per check).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab import metrics as M
from diffusion_lab import targets as T
from theory_checks.strategies import mixtures

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def _convolved(law, l):
    """p * N(0, l^2 I) as a GaussianMixture (an independent route to g: g(x) = (2 pi l^2)^{d/2} (p * N)(x))."""
    eye = torch.eye(law.dim, dtype=torch.float64)
    return T.GaussianMixture(law.weights, law.means, law.covs + l * l * eye)


def _brute_mmd2(x, law, l):
    """The unbiased estimate with the full n x n kernel matrix (no blocks) and g, c from the convolved law."""
    n, d = x.shape
    k = torch.exp(-torch.cdist(x, x) ** 2 / (2 * l * l))
    xx = (k.sum() - k.diagonal().sum()) / (n * (n - 1))
    g = (2 * math.pi * l * l) ** (d / 2) * _convolved(law, l).log_prob(x).exp()
    return float(xx - 2 * g.mean()), g


def _pp_closed(law, l):
    """E_{y,y'~p} k(y, y') = (2 pi l^2)^{d/2} sum_{j,k} pi_j pi_k N(mu_j; mu_k, Sigma_j + Sigma_k + l^2 I)."""
    d = law.dim
    tot = 0.0
    for j in range(law.n_components):
        comp = T.GaussianMixture(law.weights, law.means, law.covs + law.covs[j] + l * l * torch.eye(d, dtype=torch.float64))
        # sum_k pi_k N(mu_j; mu_k, Sigma_j + Sigma_k + l^2 I)
        tot += float(law.weights[j]) * float(comp.log_prob(law.means[j][None]).exp())
    return (2 * math.pi * l * l) ** (d / 2) * tot


# -- closed-form terms --------------------------------------------------------------------------------------


def test_mean_embedding_1d_quadrature():
    from scipy.integrate import quad

    law = T.bimodal_1d()
    l = 0.7
    xs = torch.tensor([[-3.0], [-1.0], [0.2], [1.5], [4.0]], dtype=torch.float64)
    g = M.mmd_mean_embedding(xs, law, l)
    dens = lambda y: float(law.log_prob(torch.tensor([[y]], dtype=torch.float64)).exp())  # noqa: E731
    for xi, gi in zip(xs[:, 0].tolist(), g.tolist()):
        ref, _ = quad(lambda y: math.exp(-(xi - y) ** 2 / (2 * l * l)) * dens(y), -15, 15, epsabs=1e-13, limit=200)
        assert abs(gi - ref) < 1e-9


def test_pp_term_1d_quadrature():
    from scipy.integrate import quad

    law = T.bimodal_1d()
    l = 0.5
    dens = lambda y: float(law.log_prob(torch.tensor([[y]], dtype=torch.float64)).exp())  # noqa: E731
    # c = int p(y) g(y) dy, with g itself checked against quadrature above
    ref, _ = quad(lambda y: dens(y) * float(M.mmd_mean_embedding(torch.tensor([[y]], dtype=torch.float64), law, l)),
                  -15, 15, epsabs=1e-13, limit=200)
    assert abs(M.mmd_law_cross(law, law, l) - ref) < 1e-9


def test_terms_2d_monte_carlo():
    """g(x) and c against plain Monte Carlo over exact samples of a full-covariance 2-D mixture."""
    law = T.GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.2]],
                            [[[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.1], [-0.1, 0.4]]])
    l = 0.8
    y = law.sample(400_000, G(0))
    xs = torch.tensor([[0.0, 0.0], [1.5, -1.0], [-2.0, 1.0]], dtype=torch.float64)
    g = M.mmd_mean_embedding(xs, law, l)
    for i in range(3):
        kv = torch.exp(-((y - xs[i]) ** 2).sum(1) / (2 * l * l))
        assert abs(float(kv.mean()) - float(g[i])) < 5 * float(kv.std()) / math.sqrt(y.shape[0])
    y2 = law.sample(400_000, G(1))
    kv = torch.exp(-((y - y2) ** 2).sum(1) / (2 * l * l))
    c = M.mmd_law_cross(law, law, l)
    assert abs(float(kv.mean()) - c) < 5 * float(kv.std()) / math.sqrt(y.shape[0])


@given(st.data())
@settings(max_examples=25)
def test_terms_match_convolved_mixture_density(data):
    """g and c against the densities of the convolved law p * N(0, l^2 I) (GaussianMixture.log_prob: an
    eigendecomposition route, independent of the Cholesky factors used by the metric)."""
    law = data.draw(mixtures(max_k=4, max_d=3))
    l = data.draw(st.floats(0.2, 3.0))
    x = law.sample(7, G(data.draw(st.integers(0, 1000)))) + 0.5
    g = M.mmd_mean_embedding(x, law, l)
    ref = (2 * math.pi * l * l) ** (law.dim / 2) * _convolved(law, l).log_prob(x).exp()
    assert torch.allclose(g, ref, rtol=1e-10, atol=1e-300)
    assert math.isclose(M.mmd_law_cross(law, law, l), _pp_closed(law, l), rel_tol=1e-10)
    # population MMD is a squared RKHS norm: zero on p = p, symmetric and non-negative
    q = data.draw(mixtures(max_k=3, max_d=law.dim).filter(lambda m: m.dim == law.dim))
    assert abs(M.mmd2_population(law, law, l)) < 1e-12
    a, b = M.mmd2_population(q, law, l), M.mmd2_population(law, q, l)
    assert a > -1e-12 and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-14)


@given(st.data())
@settings(max_examples=20)
def test_estimate_equals_brute_force(data):
    """The blocked, symmetric kernel sum and the closed-form terms give the brute-force n x n estimate."""
    law = data.draw(mixtures(max_k=3, max_d=3))
    n = data.draw(st.integers(3, 60))
    x = law.sample(n, G(data.draw(st.integers(0, 1000)))) * data.draw(st.floats(0.5, 1.5))
    l = M.mmd_bandwidth(law)
    r = M.mmd2_exact(x, law, block=data.draw(st.integers(1, 17)))
    raw, _ = _brute_mmd2(x, law, l)
    assert math.isclose(r.mmd2, raw + _pp_closed(law, l), rel_tol=1e-9, abs_tol=1e-12)
    assert r.bandwidth == l and r.n == n and r.se >= 0


def test_diagonal_path_equals_cholesky_path(monkeypatch):
    g0 = G(3)
    d, K = 5, 4
    var = 0.1 + torch.rand(K, d, dtype=torch.float64, generator=g0)
    law = T.GaussianMixture(torch.full((K,), 1 / K, dtype=torch.float64),
                            torch.randn(K, d, dtype=torch.float64, generator=g0), torch.diag_embed(var))
    x = law.sample(300, G(4)) * 1.1
    fast = M.mmd2_exact(x, law)
    monkeypatch.setattr(M, "_is_diagonal", lambda covs: False)
    slow = M.mmd2_exact(x, law)
    assert math.isclose(fast.mmd2, slow.mmd2, rel_tol=1e-10) and math.isclose(fast.se, slow.se, rel_tol=1e-8)
    assert math.isclose(fast.pp, slow.pp, rel_tol=1e-12)


# -- statistical behaviour ------------------------------------------------------------------------------------


def test_unbiased_on_exact_samples():
    """Mean over 200 seeds of MMD^2_u on exact samples is 0 within 3 standard errors of that mean, and the
    per-set SE is of the size of the spread (it over-states the degenerate null variance by up to sqrt 2)."""
    law = T.ring8()
    c = M.mmd_law_cross(law, law, M.mmd_bandwidth(law))
    res = [M.mmd2_exact(law.sample(150, G(s)), law, pp=c) for s in range(200)]
    v = torch.tensor([r.mmd2 for r in res], dtype=torch.float64)
    assert abs(float(v.mean())) < 3 * float(v.std()) / math.sqrt(len(v))
    ratio = sum(r.se for r in res) / len(res) / float(v.std())
    assert 0.9 < ratio < 1.8, ratio


def _mmd2_gauss_iso(a, s1, b, s2, l, d):
    """Closed form for N(a, s1^2 I) vs N(b, s2^2 I) in R^d (product over coordinates of the 1-D integrals)."""
    def e(v, delta2):  # E k for y - y' ~ N(delta, v I)
        return (l * l / (l * l + v)) ** (d / 2) * math.exp(-delta2 / (2 * (l * l + v)))
    return e(2 * s1 * s1, 0.0) + e(2 * s2 * s2, 0.0) - 2 * e(s1 * s1 + s2 * s2, sum((ai - bi) ** 2 for ai, bi in zip(a, b)))


def test_population_two_gaussians_closed_form():
    a, b = [0.3, -0.2, 1.0], [0.8, 0.1, 0.4]
    p, q = T.Gaussian(a, 0.49), T.Gaussian(b, 0.81)
    for l in (0.3, 1.0, 2.5):
        assert math.isclose(M.mmd2_population(q, p, l), _mmd2_gauss_iso(b, 0.9, a, 0.7, l, 3), rel_tol=1e-12)


def test_shifted_law_estimates_population_value():
    """Samples of a shifted, wider Gaussian: the estimate agrees with the closed-form population MMD^2 within
    4 of its standard errors (over 20 seeds: mean within 4 SE / sqrt(20), spread close to the reported SE)."""
    p = T.gaussian_2d()
    q = T.Gaussian(p.mu + torch.tensor([0.15, -0.1], dtype=torch.float64), 1.1 * p.cov)
    pop = M.mmd2_population(q, p)
    assert pop > 0
    res = [M.mmd2_exact(q.sample(1000, G(s)), p) for s in range(20)]
    v = torch.tensor([r.mmd2 for r in res], dtype=torch.float64)
    se = sum(r.se for r in res) / len(res)
    assert all(abs(r.mmd2 - pop) < 4 * r.se for r in res)
    assert abs(float(v.mean()) - pop) < 4 * se / math.sqrt(len(res))
    assert 0.6 < float(v.std()) / se < 1.5
    assert float(v.mean()) > 5 * se  # this shift is resolved at n = 1000


def test_null_band_and_resolution():
    law = T.ring8()
    band = M.mmd2_null(law, 500, repeats=10, seed=7)
    assert len(band["values"]) == 10 and band["std"] > 0
    assert abs(band["mean"]) < 4 * band["std"] / math.sqrt(10)
    # a ring with 1.5x wider modes is far outside the band (at n = 500: 4.3 to 6.1 SE over 5 seeds)
    wide = T.GaussianMixture(law.weights, law.means, 2.25 * law.covs)
    r = M.mmd2_exact(wide.sample(500, G(1)), law)
    assert r.mmd2 - band["mean"] > 3 * math.hypot(r.se, band["std"])


def test_bandwidth_rule():
    assert math.isclose(M.mmd_bandwidth(T.gaussian_2d()), math.sqrt(1.5), rel_tol=1e-14)  # tr(Cov) of one Gaussian
    assert math.isclose(M.mmd_bandwidth(T.ring8()), math.sqrt(2 * 0.09), rel_tol=1e-14)  # mean within-mode trace
    law = T.bimodal_1d()
    x = law.sample(50, G(0))
    assert M.mmd2_exact(x, law, 0.3).bandwidth == 0.3


def test_bad_inputs():
    law = T.gaussian_2d()
    with pytest.raises(ValueError, match="at least 2 samples"):
        M.mmd2_exact(torch.zeros(1, 2), law)
    with pytest.raises(ValueError, match="3 coordinates but the law has d=2"):
        M.mmd2_exact(torch.zeros(5, 3), law)
    with pytest.raises(ValueError, match="bandwidth must be finite and > 0"):
        M.mmd2_exact(torch.zeros(5, 2), law, -1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        M.mmd2_exact(torch.full((5, 2), math.nan), law)


# -- size ----------------------------------------------------------------------------------------------------


def test_high_dimension_many_components():
    """d = 256 with K = 64 diagonal components and K = 4 full ones: finite, unbiased-looking on exact samples
    and clearly positive on a law with 1.2x wider components."""
    g0 = G(0)
    d, K = 256, 64
    var = 0.2 + 0.8 * torch.rand(K, d, dtype=torch.float64, generator=g0)
    diag = T.GaussianMixture(torch.full((K,), 1 / K, dtype=torch.float64),
                             torch.randn(K, d, dtype=torch.float64, generator=g0) / math.sqrt(d) * 4,
                             torch.diag_embed(var), diagonal=True)
    A = torch.randn(4, d, d, dtype=torch.float64, generator=g0) / math.sqrt(d)
    full = T.GaussianMixture([0.1, 0.2, 0.3, 0.4], torch.randn(4, d, dtype=torch.float64, generator=g0) / 4,
                             A @ A.transpose(-1, -2) + 0.3 * torch.eye(d, dtype=torch.float64))
    for law in (diag, full):
        band = M.mmd2_null(law, 300, repeats=3, seed=1)
        assert all(math.isfinite(v) for v in band["values"])
        assert abs(band["mean"]) < 5 * band["mean_se"]
        wide = T.GaussianMixture(law.weights, law.means, 1.44 * law.covs, diagonal=law.diagonal)
        r = M.mmd2_exact(wide.sample(300, G(2)), law)
        assert r.mmd2 > 5 * r.se


def test_large_n_blocks():
    """n = 5,000 in blocks of 512 equals one block of 5,000 (same sums in a different order)."""
    law = T.ring8()
    x = law.sample(5000, G(0))
    a, b = M.mmd2_exact(x, law, block=512), M.mmd2_exact(x, law, block=5000)
    assert math.isclose(a.xx, b.xx, rel_tol=1e-12) and math.isclose(a.se, b.se, rel_tol=1e-9)
