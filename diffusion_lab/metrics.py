r"""Distances between sample sets and laws, with their Monte-Carlo floors.

- ``gaussian_w2``: W2(N(m1, C1), N(m2, C2))^2 = |m1 - m2|^2 + tr(C1 + C2 - 2 (C2^{1/2} C1 C2^{1/2})^{1/2}).
- ``affine_pushforward``: a deterministic sampler run with an exact Gaussian score is an affine map
  x -> A x + b (every step is linear in x and in the affine score), so pushing N(m, C) through it gives
  N(S(m), A C A^T) exactly: run it on m and on m + e_j (j = 1..d). No Monte Carlo.
- ``sliced_w2``: sliced 2-Wasserstein between equal-size sample sets (sorted projections on random
  directions); ``sliced_w2_floor`` is its value between two independent sets of exact samples, the
  level below which a sampler's error cannot be resolved with that many samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["sqrtm_psd", "gaussian_w2", "affine_pushforward", "sampler_gaussian_law", "sliced_w2", "sliced_w2_floor",
           "mean_error", "MMDResult", "mmd_bandwidth", "mmd_mean_embedding", "mmd_law_cross", "mmd2_population",
           "mmd2_exact", "mmd2_diff_se", "mmd2_null"]


def sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh, negative round-off clipped)."""
    w, v = torch.linalg.eigh(0.5 * (c + c.T))
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_w2(m1, c1, m2, c2) -> float:
    """Exact 2-Wasserstein distance between two Gaussians."""
    r2 = sqrtm_psd(c2)
    cross = sqrtm_psd(r2 @ c1 @ r2)
    val = float(((m1 - m2) ** 2).sum() + torch.trace(c1 + c2 - 2 * cross))
    return math.sqrt(max(val, 0.0))


def affine_pushforward(run: Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor, cov: torch.Tensor):
    """(mean, cov) of the image of N(mean, cov) under an affine map ``run`` (a batched sampler call)."""
    d = mean.shape[0]
    pts = torch.cat([mean[None], mean[None] + torch.eye(d, dtype=mean.dtype)], 0)
    out = run(pts)
    b = out[0]
    A = (out[1:] - b).T  # column j = S(m + e_j) - S(m)
    return b, A @ cov @ A.T


def sampler_gaussian_law(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mean: torch.Tensor,
                         cov: torch.Tensor, n_draws: int):
    r"""Exact law N(b, A C A^T + B B^T) of a sampler's output when the start is x_T ~ N(mean, cov = C).

    With an exact Gaussian score every step of a sampler (deterministic or stochastic) is affine in the state
    and in the standard normals it draws, so its output is S(x_T, z_1..z_K) = b + A x_T + B z with
    z ~ N(0, I_{K d}) independent of x_T. ``run(x, noise)`` must run the sampler on a batch x of shape (M, d)
    with ``noise`` of shape (K, M, d) (the K = ``n_draws`` normals it consumes, in order). One call on a
    batch of M = 1 + d + K d rows reads off b, the columns of A (x = mean + e_j) and of B (a unit normal in
    one coordinate of one draw), so the law is exact up to round-off: no Monte Carlo.
    """
    d = mean.shape[0]
    k = int(n_draws)
    if k < 0:
        raise ValueError(f"n_draws must be >= 0, got {n_draws!r}")
    m = 1 + d + k * d
    x = mean.expand(m, d).clone()
    x[1:d + 1] += torch.eye(d, dtype=mean.dtype)
    noise = torch.zeros(k, m, d, dtype=mean.dtype)
    rows = torch.arange(d + 1, m)
    noise[rows.sub(d + 1).div(d, rounding_mode="floor"), rows, rows.sub(d + 1).remainder(d)] = 1.0
    out = run(x, noise).reshape(m, d).to(torch.float64)
    b = out[0]
    A = (out[1:d + 1] - b).T
    B = (out[d + 1:] - b).T
    return b, A @ cov.to(torch.float64) @ A.T + B @ B.T


def sliced_w2(x: torch.Tensor, y: torch.Tensor, n_proj: int = 256, generator: torch.Generator | None = None) -> float:
    """Sliced W2: sqrt(mean over random unit directions theta of W2^2(theta.x, theta.y)), equal sizes."""
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2 needs equal-size sample sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    d = x.shape[1]
    if d == 1:
        theta = torch.ones(1, 1, dtype=torch.float64)
    else:
        theta = torch.randn(d, n_proj, dtype=torch.float64, generator=generator)
        theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def sliced_w2_floor(sample: Callable[[int, torch.Generator], torch.Tensor], n: int, repeats: int = 4,
                    seed: int = 12345, n_proj: int = 256) -> tuple[float, float]:
    """Mean and standard error of sliced_w2 between two independent exact sample sets of size n."""
    vals = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(seed + r)
        vals.append(sliced_w2(sample(n, g), sample(n, g), n_proj, g))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(repeats)) if repeats > 1 else float("nan")


def mean_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over samples of the Euclidean error ||x_i - ref_i||."""
    return float((x - ref).reshape(x.shape[0], -1).to(torch.float64).norm(dim=1).mean())


# ------------------------------------------------------------------------------------------------
# MMD against an exact Gaussian-mixture law


def mmd_bandwidth(law) -> float:
    r"""The default kernel bandwidth l of the MMD against a Gaussian mixture p = sum_k pi_k N(mu_k, Sigma_k):

        l^2 = tr(W),    W = sum_k pi_k Sigma_k   (the mean within-component covariance),

    which is tr(Cov_p) for a single Gaussian. The rule is fixed in advance and reads the law only (never the
    samples being scored), so every sampler of a comparison is measured with the same kernel. Two independent
    draws from one component are at E|y - y'|^2 = 2 tr(Sigma_k), so k ~ e^{-1} within a mode of average size:
    the kernel neither saturates nor vanishes as d grows (a per-coordinate rule would send every k(x, y) to
    e^{-O(d)}), and it resolves the shape of each mode, where a sampler's discretisation error shows (too wide
    or too narrow modes), besides the mode weights. The median heuristic (Gretton et al. 2012, Sec. 8) on a
    mixture picks the between-mode distance instead and is nearly blind to within-mode errors (ring8 at
    t_min: tr(Cov_p) = 4.2, l^2 = tr(W) = 0.18). Override with ``bandwidth=`` where another scale matters.
    """
    W = torch.einsum("k,kii->", law.weights, law.covs)
    tr = float(W)
    if not (math.isfinite(tr) and tr > 0):
        raise ValueError(f"mmd_bandwidth: the mean component covariance has trace {tr!r}; need finite and > 0")
    return math.sqrt(tr)


def _is_diagonal(covs: torch.Tensor) -> bool:
    """True when every covariance in the stack (K, d, d) is exactly diagonal."""
    return bool((covs == torch.diag_embed(torch.diagonal(covs, dim1=-2, dim2=-1))).all())


def _gauss_expect_factors(covs: torch.Tensor, l2: float):
    r"""For each covariance S_k (K, d, d): (log det(I + S_k/l^2)^{-1/2}, whitening factor) of S_k + l^2 I.

    Diagonal S_k: the factor is the vector (s_kk + l^2)^{-1/2}; otherwise the lower Cholesky factor L_k of
    S_k + l^2 I (condition number <= 1 + lambda_max / l^2, so the factorisation is always well posed)."""
    d = covs.shape[-1]
    if _is_diagonal(covs):
        v = torch.diagonal(covs, dim1=-2, dim2=-1) + l2  # (K, d)
        return -0.5 * torch.log(v / l2).sum(-1), ("diag", v.rsqrt())
    eye = torch.eye(d, dtype=torch.float64)
    L, info = torch.linalg.cholesky_ex(covs + l2 * eye)
    if (info > 0).any():  # pragma: no cover - S_k is PSD and l^2 > 0
        raise ValueError(f"MMD: S_k + l^2 I is not positive definite for component {int(torch.nonzero(info)[0])}")
    logdet = 2.0 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1) - d * math.log(l2)
    return -0.5 * logdet, ("chol", L)


def _maha(factor, diff: torch.Tensor) -> torch.Tensor:
    """diff^T (S_k + l^2 I)^{-1} diff for diff (K, n, d) -> (K, n)."""
    kind, F = factor
    if kind == "diag":
        return ((diff * F[:, None, :]) ** 2).sum(-1)
    z = torch.linalg.solve_triangular(F, diff.transpose(-1, -2), upper=False)  # (K, d, n)
    return (z * z).sum(-2)


def mmd_mean_embedding(x: torch.Tensor, law, bandwidth: float, chunk: int = 4096) -> torch.Tensor:
    r"""g(x_i) = E_{y~p} k(x_i, y) for the Gaussian kernel k(x, y) = exp(-|x - y|^2 / (2 l^2)) and
    p = sum_k pi_k N(mu_k, Sigma_k), in closed form by the Gaussian convolution identity

        E_{y~N(m, S)} k(x, y) = det(I + S/l^2)^{-1/2} exp(-1/2 (x - m)^T (S + l^2 I)^{-1} (x - m)),

    (the kernel is (2 pi l^2)^{d/2} N(x - y; 0, l^2 I), and N(.; m, S) * N(.; 0, l^2 I) = N(.; m, S + l^2 I)).
    One Cholesky factor per component (a vector for diagonal covariances); x is processed ``chunk`` rows at a time.
    Returns float64 of shape (n,).
    """
    x = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    if x.shape[1] != law.dim:
        raise ValueError(f"mmd: samples have {x.shape[1]} coordinates but the law has d={law.dim}")
    l2 = float(bandwidth) ** 2
    logc, factor = _gauss_expect_factors(law.covs, l2)
    logw = torch.log(law.weights) + logc  # (K,)
    out = torch.empty(x.shape[0], dtype=torch.float64)
    K = law.n_components
    step = max(1, min(int(chunk), (1 << 24) // max(1, K * law.dim)))
    for a in range(0, x.shape[0], step):
        diff = x[None, a:a + step] - law.means[:, None, :]  # (K, b, d)
        out[a:a + step] = torch.logsumexp(logw[:, None] - 0.5 * _maha(factor, diff), dim=0).exp()
    return out


def mmd_law_cross(p, q, bandwidth: float, pair_chunk: int = 256) -> float:
    r"""E_{y~p, y'~q} k(y, y') for two Gaussian mixtures (closed form):

        sum_{j,k} pi_j rho_k det(I + (Sigma_j + S_k)/l^2)^{-1/2} exp(-1/2 Delta^T (Sigma_j + S_k + l^2 I)^{-1} Delta),
        Delta = mu_j - m_k,

    the convolution identity applied twice (y - y' ~ N(mu_j - m_k, Sigma_j + S_k) for a pair of components).
    With p = q it is the p-p term c = E_{y,y'~p} k(y, y'). Pairs of components are factorised ``pair_chunk``
    at a time (memory (pair_chunk, d, d)); diagonal covariances take a vector path."""
    if p.dim != q.dim:
        raise ValueError(f"mmd_law_cross: laws of dimension {p.dim} and {q.dim}")
    l2 = float(bandwidth) ** 2
    J, K = p.n_components, q.n_components
    jj, kk = torch.meshgrid(torch.arange(J), torch.arange(K), indexing="ij")
    jj, kk = jj.reshape(-1), kk.reshape(-1)
    if p is q:  # symmetric: each unordered pair once, off-diagonal pairs counted twice
        keep = jj <= kk
        jj, kk = jj[keep], kk[keep]
    diag = _is_diagonal(p.covs) and _is_diagonal(q.covs)
    if diag:
        vp, vq = (torch.diagonal(m.covs, dim1=-2, dim2=-1) for m in (p, q))
    step = int(pair_chunk) if not diag else max(1, (1 << 22) // p.dim)
    terms = []
    for a in range(0, jj.numel(), step):
        j, k = jj[a:a + step], kk[a:a + step]
        delta = p.means[j] - q.means[k]  # (P, d)
        if diag:
            v = vp[j] + vq[k] + l2
            lt = -0.5 * torch.log(v / l2).sum(-1) - 0.5 * (delta * delta / v).sum(-1)
        else:
            logc, factor = _gauss_expect_factors(p.covs[j] + q.covs[k], l2)
            lt = logc - 0.5 * _maha(factor, delta[:, None, :])[:, 0]
        lw = torch.log(p.weights[j]) + torch.log(q.weights[k])
        if p is q:
            lw = lw + (j != k).to(torch.float64) * math.log(2.0)
        terms.append(lw + lt)
    return float(torch.logsumexp(torch.cat(terms), 0).exp())


def mmd2_population(q, p, bandwidth: float | None = None) -> float:
    r"""The population MMD^2(q, p) = E_qq k + E_pp k - 2 E_qp k between two Gaussian mixtures, in closed form
    (``mmd_law_cross``); the bandwidth defaults to ``mmd_bandwidth(p)``."""
    l = mmd_bandwidth(p) if bandwidth is None else float(bandwidth)
    return mmd_law_cross(q, q, l) + mmd_law_cross(p, p, l) - 2.0 * mmd_law_cross(q, p, l)


@dataclass(frozen=True)
class MMDResult:
    """An unbiased MMD^2 estimate against an exact law: ``mmd2`` with its standard error ``se``, the bandwidth
    ``bandwidth`` (l), the sample count ``n`` and the three terms (``xx``: the U-statistic mean of k(x_i, x_j) over
    i != j; ``xp``: mean_i E_p k(x_i, .); ``pp``: E_pp k). ``h1`` holds the n projections h1_i, from which
    ``mmd2_diff_se`` forms the standard error of a paired difference."""

    mmd2: float
    se: float
    bandwidth: float
    n: int
    xx: float
    xp: float
    pp: float
    h1: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def mmd(self) -> float:
        """sqrt(max(MMD^2, 0)): the (Gaussian-weighted) L2 distance between characteristic functions."""
        return math.sqrt(max(self.mmd2, 0.0))


def _kernel_row_sums(x: torch.Tensor, l2: float, block: int) -> torch.Tensor:
    """sum_{j != i} k(x_i, x_j) for every i, by symmetric blocks (each off-diagonal block computed once)."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    rows = torch.zeros(n, dtype=torch.float64)
    scale = -0.5 / l2
    for a in range(0, n, block):
        xa, sa = x[a:a + block], sq[a:a + block]
        for b in range(a, n, block):
            d2 = (sa[:, None] + sq[None, b:b + block]).addmm_(xa, x[b:b + block].T, alpha=-2.0).clamp_min_(0.0)
            k = d2.mul_(scale).exp_()
            if b == a:
                k.fill_diagonal_(0.0)
                rows[a:a + block] += k.sum(1)
            else:
                rows[a:a + block] += k.sum(1)
                rows[b:b + block] += k.sum(0)
    return rows


def mmd2_exact(x: torch.Tensor, law, bandwidth: float | None = None, *, block: int = 512,
               pp: float | None = None) -> MMDResult:
    r"""Unbiased MMD^2 between the samples x (n, d) and an exact Gaussian-mixture law p, with its standard error.

    Kernel k(x, y) = exp(-|x - y|^2 / (2 l^2)), l = ``bandwidth`` (default ``mmd_bandwidth(law)``, a rule that
    depends on the law only). With g(x) = E_{y~p} k(x, y) and c = E_{y,y'~p} k(y, y') both in closed form
    (``mmd_mean_embedding``, ``mmd_law_cross``), only the sample-sample term is Monte Carlo:

        MMD^2_u = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) - 2/n sum_i g(x_i) + c
                = mean_{i != j} h(x_i, x_j),    h(x, x') = k(x, x') - g(x) - g(x') + c,

    the one-sample form of Gretton et al.'s (2012, Lemma 6) unbiased estimate with the p-sample expectations taken
    exactly. E[MMD^2_u] = MMD^2(q, p) exactly for x ~ q iid, so for exact samples its mean is 0 and it takes
    negative values. Standard error from the first-order (Hoeffding) projection of the U-statistic:
    SE^2 = 4/n Var_i(h1_i), h1_i = 1/(n-1) sum_{j != i} h(x_i, x_j) (Hoeffding 1948; Serfling 1980, Sec. 5.5).
    Under the null this estimates 4 E h^2 / n^2, twice the exact variance 2 E h^2 / n^2 of the degenerate
    statistic, so it errs on the safe side.

    Interpretation: by Bochner's theorem k(x, y) = E_{w~N(0, I/l^2)} cos(w.(x - y)), so
    MMD^2(q, p) = E_{w~N(0, I/l^2)} |phi_q(w) - phi_p(w)|^2 and sqrt(MMD^2) is the L2 distance between the
    characteristic functions weighted by the Gaussian N(0, I/l^2); the Gaussian kernel is characteristic, so it
    vanishes only for q = p (Sriperumbudur et al. 2010, Corollary 4 and Theorem 9).

    Cost: O(n^2 d) for the kernel sum, in blocks of ``block`` x ``block`` that stay in cache (ring8, n = 20,000:
    2-6 s on one shared core), O(n K d^2) for g (O(n K d) with diagonal covariances), O(K^2 d^3) for c (pass
    ``pp`` to reuse it across sample sets).
    """
    x = x.detach().reshape(x.shape[0], -1).to("cpu", torch.float64)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"mmd2_exact needs at least 2 samples, got {n}")
    if not torch.isfinite(x).all():
        raise ValueError("mmd2_exact: the samples contain NaN or inf")
    l = mmd_bandwidth(law) if bandwidth is None else float(bandwidth)
    if not (math.isfinite(l) and l > 0):
        raise ValueError(f"mmd2_exact: bandwidth must be finite and > 0, got {bandwidth!r}")
    g = mmd_mean_embedding(x, law, l)
    c = mmd_law_cross(law, law, l) if pp is None else float(pp)
    rows = _kernel_row_sums(x, l * l, int(block))
    xx = float(rows.sum()) / (n * (n - 1))
    xp = float(g.mean())
    mmd2 = xx - 2.0 * xp + c
    h1 = rows / (n - 1) - g - (g.sum() - g) / (n - 1) + c
    se = math.sqrt(4.0 / n * float(h1.var())) if n > 2 else float("nan")
    return MMDResult(mmd2, se, l, n, xx, xp, c, h1)


def mmd2_diff_se(a: MMDResult, b: MMDResult) -> float:
    r"""Standard error of MMD^2_a - MMD^2_b for two sample sets PAIRED by index (x^a_i and x^b_i from the same
    start x_T,i, e.g. two samplers run on one batch): the difference is a U-statistic in the pairs, with
    projection h1^a_i - h1^b_i, so SE^2 = 4/n Var_i(h1^a_i - h1^b_i). Smaller than the unpaired
    sqrt(SE_a^2 + SE_b^2) when the two sets are positively correlated."""
    if a.h1 is None or b.h1 is None or a.n != b.n:
        raise ValueError("mmd2_diff_se needs two results of mmd2_exact on paired sets of the same size")
    return math.sqrt(4.0 / a.n * float((a.h1 - b.h1).var()))


def mmd2_null(law, n: int, repeats: int = 8, seed: int = 0, bandwidth: float | None = None) -> dict:
    """The null band: ``mmd2_exact`` on ``repeats`` independent sets of n exact samples of ``law`` (seeds seed,
    seed+1, ...). Its expectation is exactly 0; returns {"mean", "std" (across seeds), "se_mean", "values",
    "mean_se" (the average per-set SE), "bandwidth"}."""
    if repeats < 2:
        raise ValueError(f"mmd2_null needs repeats >= 2 for a spread, got {repeats}")
    l = mmd_bandwidth(law) if bandwidth is None else float(bandwidth)
    c = mmd_law_cross(law, law, l)
    res = [mmd2_exact(law.sample(n, torch.Generator().manual_seed(seed + r)), law, l, pp=c) for r in range(repeats)]
    v = torch.tensor([r.mmd2 for r in res], dtype=torch.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "se_mean": float(v.std()) / math.sqrt(repeats),
            "values": v.tolist(), "mean_se": sum(r.se for r in res) / repeats, "bandwidth": l}
