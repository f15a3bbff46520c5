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
from typing import Callable

import torch

__all__ = ["sqrtm_psd", "gaussian_w2", "affine_pushforward", "sampler_gaussian_law", "sliced_w2", "sliced_w2_floor",
           "mean_error"]


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
