"""Hypothesis strategies for the universal identities: schedules, mixtures, points and times."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from diffusion_lab import schedules as S
from diffusion_lab.targets import GaussianMixture

_f = dict(allow_nan=False, allow_infinity=False)


@st.composite
def schedules(draw, names=None):
    """Any schedule of the package with drawn parameters."""
    name = draw(st.sampled_from(sorted(names or S.SCHEDULES)))
    if name in ("vp", "subvp"):
        b0 = draw(st.floats(0.01, 2.0, **_f))
        b1 = draw(st.floats(max(b0, 1.0), 40.0, **_f))
        return S.SCHEDULES[name](beta_min=b0, beta_max=b1)
    if name == "cosine":
        return S.VPCosine(s=draw(st.floats(1e-3, 0.05, **_f)))
    if name == "ve":
        lo = draw(st.floats(1e-3, 0.1, **_f))
        return S.VE(sigma_min=lo, sigma_max=draw(st.floats(5.0, 200.0, **_f)))
    if name == "edm":
        return S.EDM(t_min=draw(st.floats(1e-3, 0.01, **_f)), t_max=draw(st.floats(10.0, 100.0, **_f)))
    if name == "rf":
        return S.RectifiedFlow(t_min=draw(st.floats(1e-4, 1e-2, **_f)))
    return S.DDPMDiscrete(n_steps=draw(st.integers(50, 2000)))


def times(schedule, n: int = 1):
    """Times in [t_min, t_max] as a float64 tensor of shape (n,), spread in log-SNR."""
    lo, hi = schedule.lam_range
    return st.lists(st.floats(0.0, 1.0, **_f), min_size=n, max_size=n).map(
        lambda u: schedule.t_from_lam(hi + torch.tensor(u, dtype=torch.float64) * (lo - hi)).clamp(
            schedule.t_min, schedule.t_max)
    )


def _array(draw, shape, lo: float, hi: float) -> torch.Tensor:
    """A float64 tensor of the given shape whose entries Hypothesis draws one by one in [lo, hi] (so that it shrinks
    them towards 0 and reaches degenerate values: zeros, repeated entries, the interval's ends)."""
    n = 1
    for k in shape:
        n *= k
    vals = draw(st.lists(st.floats(lo, hi, **_f), min_size=n, max_size=n))
    return torch.tensor(vals, dtype=torch.float64).reshape(shape)


@st.composite
def mixtures(draw, max_k: int = 3, max_d: int = 3):
    """Gaussian mixtures with K <= max_k components in d <= max_d dimensions, full covariances: weights in
    [0.1, 1.1] (renormalised), means m * u with u in [-2, 2]^d, covariances a^2 B B^T + c I with B in
    [-1, 1]^{d x d}; every entry is drawn, so shrinking reaches coincident means and isotropic covariances."""
    K = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    w = _array(draw, (K,), 0.1, 1.1)
    mu = draw(st.floats(0.1, 4.0, **_f)) * _array(draw, (K, d), -2.0, 2.0)
    A = draw(st.floats(0.1, 1.5, **_f)) * _array(draw, (K, d, d), -1.0, 1.0)
    cov = A @ A.transpose(-1, -2) + draw(st.floats(0.02, 1.0, **_f)) * torch.eye(d, dtype=torch.float64)
    return GaussianMixture(w / w.sum(), mu, cov)


@st.composite
def points(draw, d: int, n: int = 4, scale: float = 3.0):
    """n points in R^d, float64, each coordinate drawn in [-3 scale, 3 scale]."""
    return scale * _array(draw, (n, d), -3.0, 3.0)


@st.composite
def geometric_mixtures(draw, max_k: int = 8, max_d: int = 8, max_cond: float = 1e6, min_weight: float = 1e-4):
    """Gaussian mixtures whose geometry is drawn directly, so that Hypothesis shrinks it and reaches degenerate
    cases: K <= max_k components in d <= max_d dimensions; weights drawn in [min_weight, 1] (renormalised);
    means drawn coordinate by coordinate, with an option that makes all components share one mean (coincident
    means); each covariance R diag(lambda) R^T with eigenvalues lambda between s and s * cond (cond up to
    ``max_cond``) and R a product of drawn Givens rotations."""
    K = draw(st.integers(1, max_k))
    d = draw(st.integers(1, max_d))
    w = torch.tensor(draw(st.lists(st.floats(min_weight, 1.0, **_f), min_size=K, max_size=K)), dtype=torch.float64)
    coincident = draw(st.booleans())
    coord = st.floats(-4.0, 4.0, **_f)
    if coincident:
        mu = torch.tensor(draw(st.lists(coord, min_size=d, max_size=d)), dtype=torch.float64).expand(K, d).clone()
    else:
        mu = torch.tensor(draw(st.lists(coord, min_size=K * d, max_size=K * d)), dtype=torch.float64).reshape(K, d)
    covs = []
    for _ in range(K):
        scale = draw(st.floats(0.05, 2.0, **_f))
        log_cond = draw(st.floats(0.0, float(torch.log10(torch.tensor(max_cond))), **_f))
        u = torch.tensor(draw(st.lists(st.floats(0.0, 1.0, **_f), min_size=d, max_size=d)), dtype=torch.float64)
        lam = scale * 10.0 ** (log_cond * u)
        if d > 1:  # pin the extremes so the drawn condition number is reached
            lam[0], lam[-1] = scale, scale * 10.0 ** log_cond
        R = torch.eye(d, dtype=torch.float64)
        for i in range(d - 1):
            a = draw(st.floats(0.0, 3.14159, **_f))
            G = torch.eye(d, dtype=torch.float64)
            c, s = torch.cos(torch.tensor(a, dtype=torch.float64)), torch.sin(torch.tensor(a, dtype=torch.float64))
            G[i, i], G[i, i + 1], G[i + 1, i], G[i + 1, i + 1] = c, -s, s, c
            R = G @ R
        C = R @ torch.diag(lam) @ R.T
        covs.append(0.5 * (C + C.T))
    return GaussianMixture(w / w.sum(), mu, torch.stack(covs))
