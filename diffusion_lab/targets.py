r"""Exact targets with closed-form noised marginals, and sample-only toy data.

For p_0 = sum_k pi_k N(mu_k, Sigma_k) and x_t = alpha x_0 + sigma eps (closed forms by Gaussian conjugacy):

    p_t       = sum_k pi_k N(alpha mu_k, C_k),   C_k = alpha^2 Sigma_k + sigma^2 I
    r_k(x)    = pi_k N(x; alpha mu_k, C_k) / p_t(x)                      (responsibilities)
    score     = sum_k r_k C_k^{-1} (alpha mu_k - x)
    m_k(x)    = mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)             (component posterior mean)
    P_k       = Sigma_k - alpha^2 Sigma_k C_k^{-1} Sigma_k                 (component posterior cov)
    E[x0|x]   = sum_k r_k m_k
    Cov[x0|x] = sum_k r_k (P_k + m_k m_k^T) - E[x0|x] E[x0|x]^T

A Gaussian is the one-component mixture. ``target.field(schedule)`` returns a VelocityField whose
model evaluates these formulas exactly.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ._tensor import as_tensor
from .field import VelocityField
from .schedules import Schedule

__all__ = [
    "GaussianMixture",
    "Gaussian",
    "ExactModel",
    "ClassConditionalMixture",
    "two_class_1d",
    "TARGETS",
    "get_target",
    "ring8",
    "bimodal_1d",
    "ncsn_two_mode",
    "aniso_gaussian",
    "aniso",
    "gaussian_mixture_family",
    "gmm_separated",
    "gmm_overlap",
    "gmm_multiscale",
    "SUITE",
    "suite",
    "moons",
    "swiss_roll",
    "checkerboard",
    "digits",
    "SAMPLE_ONLY",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _apply(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(M_k v_{b,k}) for per-component matrices M (K, d, d) or per-sample ones (B, K, d, d), v (B, K, d)."""
    if M.ndim == 3:  # one time for the whole batch
        B, K, d = v.shape
        if K * d <= 64:  # one (B, Kd) @ (Kd, Kd) block-diagonal product: ~3x faster than K small products
            return (v.reshape(B, K * d) @ torch.block_diag(*M.transpose(-1, -2))).reshape(B, K, d)
        return (v.transpose(0, 1) @ M.transpose(-1, -2)).transpose(0, 1)
    return (M @ v[..., None])[..., 0]


def _kdot(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(x_b . v_k) for x (B, d) and per-component vectors v (K, d) or per-sample ones (B, K, d) -> (B, K)."""
    return x @ v.T if v.ndim == 2 else torch.einsum("bd,bkd->bk", x, v)


def _kmix(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_k r[b, k] v_k for v (K, d) or v (B, K, d) -> (B, d)."""
    return r @ v if v.ndim == 2 else _mix(r, v)


def _mix(r: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_k r[b, k] v[b, k, :] as a batched matrix product (much faster than a broadcast-and-sum for small K, d)."""
    return torch.bmm(r[:, None, :], v).squeeze(1)


class GaussianMixture:
    """Gaussian mixture sum_k pi_k N(mu_k, Sigma_k) in R^d (full covariances), held in float64.

    weights (K,), means (K, d), covs (K, d, d) symmetric positive definite.
    """

    def __init__(self, weights, means, covs, name: str | None = None, diagonal: bool = False):
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        mu = torch.as_tensor(means, dtype=torch.float64)
        if mu.ndim == 1:
            mu = mu[:, None] if w.numel() > 1 else mu[None, :]
        cov = torch.as_tensor(covs, dtype=torch.float64)
        K, d = mu.shape
        if cov.ndim == 1 and d == 1:  # K variances of a 1-D mixture
            cov = cov.reshape(K, 1, 1)
        if cov.ndim == 2 and K == 1:
            cov = cov[None]
        if w.numel() != K:
            raise ValueError(f"weights has {w.numel()} entries but means has {K} components")
        for label, v in (("weights", w), ("means", mu), ("covs", cov)):
            if not torch.isfinite(v).all():
                k = int(torch.nonzero((~torch.isfinite(v.reshape(v.shape[0], -1))).any(1))[0])
                raise ValueError(f"{label} must be finite, got {v[k].tolist()} for component {k}")
        if cov.shape != (K, d, d):
            raise ValueError(f"covs must have shape {(K, d, d)}, got {tuple(cov.shape)}")
        if (w < 0).any() or not torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-12):
            raise ValueError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
        if not torch.allclose(cov, cov.transpose(-1, -2), atol=1e-12):
            raise ValueError("covariances must be symmetric")
        self.diagonal = bool(diagonal)
        if self.diagonal:  # opt-in O(K d) path: every per-component matrix is a vector of variances
            var = torch.diagonal(cov, dim1=-2, dim2=-1)
            if not (cov == torch.diag_embed(var)).all():
                k = int(torch.nonzero((cov != torch.diag_embed(var)).flatten(1).any(1))[0])
                raise ValueError(f"diagonal=True but the covariance of component {k} has non-zero off-diagonal entries")
            if not (var > 0).all():
                k = int(torch.nonzero((var <= 0).any(1))[0])
                raise ValueError(f"covariance of component {k} is not positive definite: variances {var[k].tolist()}")
            self.weights, self.means, self.covs = w, mu, cov
            self._chol = None
            self._ev, self._U = var, None
            self.name = name or ("gaussian" if K == 1 else f"gmm{K}")
            return
        chol, info = torch.linalg.cholesky_ex(cov)
        if (info > 0).any():
            k = int(torch.nonzero(info)[0])
            raise ValueError(f"covariance of component {k} is not positive definite: {cov[k].tolist()}")
        self.weights, self.means, self.covs = w, mu, cov
        self._chol = chol
        # Sigma_k = U_k diag(ev_k) U_k^T once, so every C_k = alpha^2 Sigma_k + sigma^2 I at any t is diagonal in
        # the same basis: no factorisation per call (LAPACK on tiny batched matrices costs ~10 ms under
        # OpenMP contention), and the result stays differentiable in t for the autograd checks.
        ev, U = torch.linalg.eigh(cov)
        self._ev, self._U = ev, U
        self.name = name or ("gaussian" if K == 1 else f"gmm{K}")

    # -- basic properties -----------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def data_shape(self) -> tuple:
        return (self.dim,)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def covariance(self) -> torch.Tensor:
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + torch.einsum("ki,kj->kij", self.means, self.means))
        return second - torch.outer(m, m)

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, K={self.n_components}, d={self.dim})"

    def settings(self) -> dict:
        out = {"name": self.name, "K": self.n_components, "d": self.dim}
        if self.diagonal:
            out["diagonal"] = True
        return out

    # -- data law (t = 0) ---------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64, return_labels=False):
        """n iid samples (and, optionally, their component labels)."""
        if int(n) != n or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        k = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        z = torch.randn(int(n), self.dim, dtype=torch.float64, generator=generator)
        if self.diagonal:
            x = self.means[k] + self._ev[k].sqrt() * z
        elif int(n) * self.dim * self.dim <= 1 << 26:
            x = self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], z)
        else:  # large batches in high d: one product per component instead of n gathered d x d factors
            x = self.means[k].clone()
            for j in torch.unique(k).tolist():
                sel = k == j
                x[sel] += z[sel] @ self._chol[j].T
        x = x.to(dtype)
        return (x, k) if return_labels else x

    def log_prob(self, x):
        """log p_0(x)."""
        return self._component_terms(x, 1.0, 0.0)["log_p"]

    # -- noised marginal p_t --------------------------------------------------------------------
    def _moments_t(self, alpha, sigma):
        """Means (.., K, d), precisions C_k^{-1}, log-dets and gains alpha Sigma_k C_k^{-1} of the components at t,
        from the eigendecomposition Sigma_k = U diag(ev) U^T: C_k^{-1} = U diag(1/(alpha^2 ev + sigma^2)) U^T."""
        a = as_tensor(alpha).to(torch.float64)
        s = as_tensor(sigma).to(torch.float64)
        a_ = a[..., None, None]
        c = a_ * a_ * self._ev + (s * s)[..., None, None]  # (.., K, d) eigenvalues of C_k
        if self.diagonal:  # C_k^{-1} and the gains as (.., K, d) vectors of diagonals
            return a_ * self.means, 1.0 / c, torch.log(c).sum(-1), a_ * self._ev / c
        U = self._U
        prec = (U * (1.0 / c)[..., None, :]) @ U.transpose(-1, -2)
        logdet = torch.log(c).sum(-1)
        gain = (U * (a_ * self._ev / c)[..., None, :]) @ U.transpose(-1, -2)
        means_t = a_ * self.means
        return means_t, prec, logdet, gain

    def _component_terms(self, x, alpha, sigma):
        x = as_tensor(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        xd = x.to(torch.float64)
        means_t, prec, logdet, gain = self._moments_t(alpha, sigma)
        if self.diagonal:
            # |x - m_k|^2_{C_k^{-1}} = x^2 . c_k^{-1} - 2 x . (m_k / c_k) + m_k . (m_k / c_k) as (B, d) x (d, K)
            # products: no (B, K, d) temporaries (allocating them costs more than the arithmetic at K d ~ 10^3)
            mp = means_t * prec
            maha = (_kdot(xd * xd, prec) - 2.0 * _kdot(xd, mp) + (means_t * mp).sum(-1)).clamp_min(0.0)
            log_comp = torch.log(self.weights) - 0.5 * (maha + logdet + self.dim * _LOG_2PI)
            log_p = torch.logsumexp(log_comp, dim=-1)
            return {"x": xd, "means_t": means_t, "log_r": log_comp - log_p[:, None], "log_p": log_p, "gain": gain,
                    "prec": prec}
        diff = xd[:, None, :] - means_t  # (B, K, d)
        prec_diff = _apply(prec, diff)
        maha = torch.einsum("bkd,bkd->bk", diff, prec_diff)  # einsum: ~5x faster than (a*b).sum(-1) for small d
        log_comp = torch.log(self.weights) - 0.5 * (maha + logdet + self.dim * _LOG_2PI)
        log_p = torch.logsumexp(log_comp, dim=-1)
        return {
            "x": xd, "diff": diff, "prec_diff": prec_diff, "log_r": log_comp - log_p[:, None],
            "log_p": log_p, "gain": gain, "prec": prec,
        }

    def _at(self, schedule: Schedule, t, x):
        t = as_tensor(t, like=x if isinstance(x, torch.Tensor) else None).to(torch.float64)
        return schedule.alpha(t), schedule.sigma(t)

    def log_prob_t(self, x, t, schedule: Schedule):
        """log p_t(x)."""
        return self._component_terms(x, *self._at(schedule, t, x))["log_p"].to(x.dtype)

    def responsibilities(self, x, t, schedule: Schedule):
        """r_k(x) = p_t(k | x), shape (batch, K) (Bayes' rule over the components)."""
        return self._component_terms(x, *self._at(schedule, t, x))["log_r"].exp().to(x.dtype)

    def score(self, x, t, schedule: Schedule):
        """grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - alpha mu_k)."""
        c = self._component_terms(x, *self._at(schedule, t, x))
        return -self._mixed_prec_diff(c, c["log_r"].exp()).to(x.dtype)

    def _posterior_means(self, c):
        if self.diagonal:
            return self.means + c["gain"] * (c["x"][:, None, :] - c["means_t"])
        return self.means + _apply(c["gain"], c["diff"])

    def _mixed_prec_diff(self, c, r):
        """sum_k r_k C_k^{-1} (x - alpha mu_k), shape (B, d)."""
        if not self.diagonal:
            return _mix(r, c["prec_diff"])
        return c["x"] * _kmix(r, c["prec"]) - _kmix(r, c["means_t"] * c["prec"])

    def _mixed_posterior_mean(self, c, r):
        """sum_k r_k m_k(x), m_k = mu_k + G_k (x - alpha mu_k) with the gains G_k, shape (B, d)."""
        if not self.diagonal:
            return _mix(r, self._posterior_means(c))
        return _kmix(r, self.means - c["gain"] * c["means_t"]) + c["x"] * _kmix(r, c["gain"])

    def denoiser(self, x, t, schedule: Schedule):
        """E[x_0 | x_t = x] = sum_k r_k m_k(x)."""
        c = self._component_terms(x, *self._at(schedule, t, x))
        return self._mixed_posterior_mean(c, c["log_r"].exp()).to(x.dtype)

    def posterior_cov(self, x, t, schedule: Schedule):
        """Cov[x_0 | x_t = x] = sum_k r_k (P_k + m_k m_k^T) - m m^T, shape (batch, d, d)."""
        a, _ = self._at(schedule, t, x)
        c = self._component_terms(x, *self._at(schedule, t, x))
        r = c["log_r"].exp()
        mk = self._posterior_means(c)
        a = as_tensor(a).to(torch.float64)
        # P_k = Sigma_k - alpha Sigma_k C_k^{-1} alpha Sigma_k = Sigma_k - gain_k alpha Sigma_k
        if self.diagonal:
            P = torch.diag_embed(self._ev - c["gain"] * (a[..., None, None] * self._ev))
        else:
            P = self.covs - c["gain"] @ (a[..., None, None, None] * self.covs)
        if P.ndim == 3:
            P = P.expand(x.shape[0], *P.shape)
        m = _mix(r, mk)
        second = torch.einsum("bk,bkij->bij", r, P + mk[..., :, None] * mk[..., None, :])
        return (second - m[:, :, None] * m[:, None, :]).to(x.dtype)

    def marginal(self, schedule: Schedule, t: float) -> "GaussianMixture":
        """p_t as a GaussianMixture (scalar t): components N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)."""
        a = float(schedule.alpha(as_tensor(float(t))))
        s = float(schedule.sigma(as_tensor(float(t))))
        covs = a * a * self.covs + s * s * torch.eye(self.dim, dtype=torch.float64)
        cls = Gaussian if isinstance(self, Gaussian) else GaussianMixture
        if cls is Gaussian:
            return Gaussian(a * self.means[0], covs[0], name=f"{self.name}@t={t:g}", diagonal=self.diagonal)
        return GaussianMixture(self.weights, a * self.means, covs, name=f"{self.name}@t={t:g}", diagonal=self.diagonal)

    def cdf_1d(self, x):
        """CDF of a 1-D mixture (used by the quantile-map flow: in 1-D the PF-ODE flow map is F_t^{-1} o F_s)."""
        if self.dim != 1:
            raise ValueError(f"cdf_1d needs a 1-D mixture, this one has d={self.dim}")
        x = as_tensor(x).to(torch.float64)
        std = torch.sqrt(self.covs[:, 0, 0])
        z = (x[..., None] - self.means[:, 0]) / std
        return (self.weights * 0.5 * torch.erfc(-z / math.sqrt(2.0))).sum(-1)

    # -- the field --------------------------------------------------------------------------------
    def field(self, schedule: Schedule, prediction: str = "x0") -> VelocityField:
        """The exact velocity field of this target under ``schedule``; the model returns ``prediction``."""
        return VelocityField(schedule, ExactModel(self, schedule, prediction), prediction, data_shape=self.data_shape)


class Gaussian(GaussianMixture):
    """N(mu, Sigma), the one-component mixture (oracle O1)."""

    def __init__(self, mean, cov, name: str | None = None, diagonal: bool = False):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        d = mean.shape[1]
        if cov.ndim == 0:
            cov = cov * torch.eye(d, dtype=torch.float64)
        super().__init__([1.0], mean, cov.reshape(1, d, d), name=name or "gaussian", diagonal=diagonal)

    @property
    def mu(self) -> torch.Tensor:
        return self.means[0]

    @property
    def cov(self) -> torch.Tensor:
        return self.covs[0]


class ClassConditionalMixture(GaussianMixture):
    """A Gaussian mixture whose components carry class labels: p(x) = sum_y p(y) p(x | y) with p(x | y) the mixture
    of the components labelled y. At any t, p_t(y | x) = sum_{k in y} r_k(x) (Bayes' rule over the components)."""

    def __init__(self, weights, means, covs, labels, name: str | None = None):
        super().__init__(weights, means, covs, name=name or "class_mixture")
        lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if lab.numel() != self.n_components or (lab < 0).any():
            raise ValueError(f"labels must be {self.n_components} non-negative integers, got {lab.tolist()}")
        self.labels = lab
        self.n_classes = int(lab.max()) + 1
        missing = sorted(set(range(self.n_classes)) - set(lab.tolist()))
        if missing:
            raise ValueError(f"labels must cover 0..{self.n_classes - 1}; classes {missing} have no component")

    @property
    def class_prior(self) -> torch.Tensor:
        return torch.zeros(self.n_classes, dtype=torch.float64).index_add_(0, self.labels, self.weights)

    def conditional(self, y: int) -> GaussianMixture:
        """p(x | y): the components labelled y with renormalised weights."""
        if not (0 <= int(y) < self.n_classes):
            raise ValueError(f"class y must be in 0..{self.n_classes - 1}, got {y!r}")
        keep = self.labels == int(y)
        w = self.weights[keep]
        return GaussianMixture(w / w.sum(), self.means[keep], self.covs[keep], name=f"{self.name}|y={int(y)}")

    def class_log_posterior_t(self, x, t, schedule: Schedule):
        """log p_t(y | x) for every class, shape (batch, n_classes); differentiable in x."""
        log_r = self._component_terms(x, *self._at(schedule, t, x))["log_r"]
        out = torch.full((x.shape[0], self.n_classes), -torch.inf, dtype=log_r.dtype)
        cols = [torch.logsumexp(log_r[:, self.labels == y], dim=1) for y in range(self.n_classes)]
        return torch.stack(cols, 1) if cols else out


def two_class_1d(separation: float = 2.0, std: float = 1.0) -> ClassConditionalMixture:
    """Two equally likely 1-D Gaussian classes N(-/+ separation/2, std^2), labels 0 and 1 (the CFG counterexample)."""
    h = separation / 2
    return ClassConditionalMixture([0.5, 0.5], [[-h], [h]], [[[std**2]], [[std**2]]], [0, 1], name="two_class_1d")


class ExactModel:
    """model(x, t) returning the exact prediction (eps, x0, score, v or velocity) of a Gaussian mixture."""

    def __init__(self, target: GaussianMixture, schedule: Schedule, prediction: str = "x0"):
        self.target, self.schedule, self.prediction = target, schedule, prediction

    def __repr__(self):
        return f"ExactModel({self.target.name}, {self.prediction})"

    def x0_eps(self, x, t):
        """Exact (E[x0|x_t], E[eps|x_t]) = (sum_k r_k m_k, sigma sum_k r_k C_k^{-1}(x - alpha mu_k)); eps in the
        score form -sigma s, which keeps full precision as sigma -> 0."""
        tg, sch = self.target, self.schedule
        c = tg._component_terms(x, sch.alpha(t), sch.sigma(t))
        r = c["log_r"].exp()
        x0 = tg._mixed_posterior_mean(c, r)
        sig = sch.sigma(t.to(torch.float64))
        sig = sig.reshape(sig.shape + (1,) * (x.ndim - sig.ndim))
        eps = sig * tg._mixed_prec_diff(c, r)
        return x0.to(x.dtype), eps.to(x.dtype)

    def __call__(self, x, t):
        from . import param

        x0, eps = self.x0_eps(x, t)
        sch = self.schedule
        tt = t.to(x.dtype)
        a, s, da, ds = (c_.reshape(c_.shape + (1,) * (x.ndim - c_.ndim)) for c_ in
                        (sch.alpha(tt), sch.sigma(tt), sch.dalpha(tt), sch.dsigma(tt)))
        return param.from_x0_eps(self.prediction, x0, eps, a, s, da, ds)


# ------------------------------------------------------------------------------------------------
# Named benchmark targets (exact scores)

def ring8(radius: float = 2.0, std: float = 0.3) -> GaussianMixture:
    """8 equal-weight isotropic Gaussians on a circle of the given radius (2-D)."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = radius * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    covs = (std**2) * torch.eye(2, dtype=torch.float64).expand(8, 2, 2).clone()
    return GaussianMixture(torch.full((8,), 1 / 8, dtype=torch.float64), means, covs, name="ring8")


def bimodal_1d() -> GaussianMixture:
    """Two-mode 1-D mixture 0.3 N(-1.5, 0.4^2) + 0.7 N(1.5, 0.6^2)."""
    return GaussianMixture([0.3, 0.7], [[-1.5], [1.5]], [[[0.16]], [[0.36]]], name="bimodal_1d")


def ncsn_two_mode() -> GaussianMixture:
    """NCSN's mixture 1/5 N((-5,-5), I) + 4/5 N((5,5), I) (Song & Ermon 2019, Fig. 3)."""
    eye = torch.eye(2, dtype=torch.float64)
    return GaussianMixture([0.2, 0.8], [[-5.0, -5.0], [5.0, 5.0]], torch.stack([eye, eye]), name="ncsn_two_mode")


def aniso_gaussian(d: int = 16, cond: float = 100.0, seed: int = 0) -> Gaussian:
    """N(m, Q diag(lambda) Q^T) in d dimensions, eigenvalues log-spaced in [2/cond, 2], seeded rotation Q."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    lam = torch.logspace(math.log10(2.0 / cond), math.log10(2.0), d, dtype=torch.float64)
    cov = q @ torch.diag(lam) @ q.T
    cov = 0.5 * (cov + cov.T)
    mean = 0.5 * torch.randn(d, dtype=torch.float64, generator=g)
    return Gaussian(mean, cov, name=f"aniso_gaussian{d}")


def gaussian_2d() -> Gaussian:
    """A correlated 2-D Gaussian, N((1, -0.5), [[1, 0.6], [0.6, 0.5]])."""
    return Gaussian([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]], name="gaussian_2d")


# ------------------------------------------------------------------------------------------------
# Families in any dimension (the benchmark suite)


def _check_family(name: str, dim, components=None, **positive):
    if int(dim) != dim or dim < 1:
        raise ValueError(f"{name}: dim must be an integer >= 1, got {dim!r}")
    if components is not None and (int(components) != components or components < 1):
        raise ValueError(f"{name}: components must be an integer >= 1, got {components!r}")
    for key, val in positive.items():
        if not (isinstance(val, (int, float)) and math.isfinite(val) and val > 0):
            raise ValueError(f"{name}: {key} must be a finite number > 0, got {val!r}")


def _rotation(d: int, g: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal d x d matrix (QR of a Gaussian matrix with the sign of diag(R) fixed)."""
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=g))
    return q * torch.sign(torch.diagonal(r))


def _spectrum(d: int, cond: float) -> torch.Tensor:
    """d eigenvalues log-spaced from 1 down to 1/cond, rescaled to mean 1 (so the trace is d)."""
    lam = torch.logspace(0.0, -math.log10(cond), d, dtype=torch.float64) if d > 1 else torch.ones(1, dtype=torch.float64)
    return lam * (d / lam.sum())


def _unit_spread(weights, means, covs):
    """Shift the mixture mean to 0 and scale so that tr(Cov_p) = d (per-coordinate spread 1 on average)."""
    d = means.shape[1]
    m = weights @ means
    centred = means - m
    tr = float(torch.einsum("k,kii->", weights, covs) + torch.einsum("k,ki->", weights, centred * centred))
    f = math.sqrt(d / tr)
    return centred * f, covs * (f * f)


def _spread_points(K: int, d: int, g: torch.Generator) -> torch.Tensor:
    """K points in R^d spread out by farthest-point selection among 32 K standard normal candidates."""
    cand = torch.randn(32 * K, d, dtype=torch.float64, generator=g)
    pick = [0]
    dist = (cand - cand[0]).norm(dim=1)
    for _ in range(K - 1):
        j = int(dist.argmax())
        pick.append(j)
        dist = torch.minimum(dist, (cand - cand[j]).norm(dim=1))
    return cand[pick]


def _weights(K: int, min_weight: float | None, g: torch.Generator) -> torch.Tensor:
    """Equal weights (min_weight None), or geometric weights w_k ~ r^k, r fixed by min_k w_k = min_weight,
    in a seeded random order."""
    if min_weight is not None and not (0 < min_weight <= 1.0 / K):
        raise ValueError(f"min_weight must be in (0, 1/components] = (0, {1.0 / K:g}], got {min_weight!r}")
    if min_weight is None or K == 1 or math.isclose(K * min_weight, 1.0):
        return torch.full((K,), 1.0 / K, dtype=torch.float64)
    lo, hi = 1e-12, 1.0  # smallest weight r^{K-1} / sum_k r^k increases with r from 0 to 1/K
    for _ in range(200):
        r = 0.5 * (lo + hi)
        w = r ** torch.arange(K, dtype=torch.float64)
        if float(w[-1] / w.sum()) < min_weight:
            lo = r
        else:
            hi = r
    w = w / w.sum()
    return w[torch.randperm(K, generator=g)]


def gaussian_mixture_family(dim: int = 2, components: int = 8, *, separation: float = 2.0, width_ratio: float = 1.0,
                            min_weight: float | None = None, cond: float = 1.0, diagonal: bool = False,
                            seed: int = 0, name: str | None = None) -> GaussianMixture:
    r"""A seeded random Gaussian mixture in R^dim with ``components`` = K components, scaled to unit spread.

    - Component k: Sigma_k = s_k^2 Q_k diag(lambda) Q_k^T with lambda log-spaced from 1 to 1/``cond`` (mean 1,
      permuted per component), Q_k Haar-random (identity with ``diagonal=True``: diagonal covariances, the O(K d)
      path of GaussianMixture); widths s_k log-spaced over [1/``width_ratio``, 1] in a random order (narrow and
      wide components).
    - Means: K spread-out points (farthest-point selection among Gaussian candidates), scaled so that the closest
      pair satisfies |mu_i - mu_j| = ``separation`` (r_i + r_j), r_k = s_k sqrt(max lambda) the widest standard
      deviation of component k: separation >= 3 gives well-separated modes, <= 1 overlapping ones.
    - Weights: equal, or geometric down to ``min_weight`` for the smallest (``_weights``).
    - Finally the mixture is centred and scaled so that tr(Cov_p) = dim (O(1) spread per coordinate, as ring8).

    Deterministic given its arguments.
    """
    _check_family("gaussian_mixture_family", dim, components, separation=separation, width_ratio=width_ratio,
                  cond=cond)
    d, K = int(dim), int(components)
    g = torch.Generator().manual_seed(int(seed))
    w = _weights(K, min_weight, g)
    widths = torch.logspace(0.0, -math.log10(width_ratio), K, dtype=torch.float64)[torch.randperm(K, generator=g)]
    lam = _spectrum(d, cond)
    covs = torch.empty(K, d, d, dtype=torch.float64)
    for k in range(K):
        ev = lam[torch.randperm(d, generator=g)] * widths[k] ** 2
        if diagonal:
            covs[k] = torch.diag(ev)
        else:
            Q = _rotation(d, g)
            c = (Q * ev) @ Q.T
            covs[k] = 0.5 * (c + c.T)
    means = _spread_points(K, d, g) if K > 1 else torch.zeros(1, d, dtype=torch.float64)
    if K > 1:
        r = widths * math.sqrt(float(lam.max()))
        dist = torch.cdist(means, means) / (r[:, None] + r[None, :])
        dist.fill_diagonal_(math.inf)
        means = means * (separation / float(dist.min()))
    means, covs = _unit_spread(w, means, covs)
    label = name or f"gmm_d{d}_k{K}"
    return GaussianMixture(w, means, covs, name=label, diagonal=diagonal)


def gmm_separated(dim: int = 2, components: int = 8, *, separation: float = 4.0, diagonal: bool = False,
                  seed: int = 0) -> GaussianMixture:
    """Well-separated equal-weight isotropic components: |mu_i - mu_j| >= 4 (s_i + s_j)."""
    return gaussian_mixture_family(dim, components, separation=separation, diagonal=diagonal, seed=seed,
                                   name=f"gmm_separated_d{int(dim)}_k{int(components)}")


def gmm_overlap(dim: int = 2, components: int = 4, *, separation: float = 0.5, cond: float = 10.0,
                diagonal: bool = False, seed: int = 0) -> GaussianMixture:
    """Overlapping equal-weight anisotropic components (condition number 10, random orientations):
    closest pair at |mu_i - mu_j| = 0.5 (r_i + r_j)."""
    return gaussian_mixture_family(dim, components, separation=separation, cond=cond, diagonal=diagonal, seed=seed,
                                   name=f"gmm_overlap_d{int(dim)}_k{int(components)}")


def gmm_multiscale(dim: int = 2, components: int = 8, *, width_ratio: float = 10.0, min_weight: float = 0.01,
                   separation: float = 2.0, cond: float = 3.0, diagonal: bool = False,
                   seed: int = 0) -> GaussianMixture:
    """Narrow and wide components (widths over a factor 10) with geometric weights down to 0.01, moderately
    separated (2 (r_i + r_j)) and mildly anisotropic (condition number 3)."""
    return gaussian_mixture_family(dim, components, separation=separation, width_ratio=width_ratio,
                                   min_weight=min_weight, cond=cond, diagonal=diagonal, seed=seed,
                                   name=f"gmm_multiscale_d{int(dim)}_k{int(components)}")


def aniso(dim: int = 16, cond: float = 1000.0, *, seed: int = 0) -> Gaussian:
    """N(m, Q diag(lambda) Q^T) in R^dim: eigenvalues log-spaced from 1 to 1/cond rescaled to mean 1 (so
    tr Sigma = dim; exact condition number ``cond``), Q Haar-random, m ~ N(0, 0.25 I); all from ``seed``."""
    _check_family("aniso", dim, cond=cond)
    d = int(dim)
    g = torch.Generator().manual_seed(int(seed))
    Q = _rotation(d, g)
    cov = (Q * _spectrum(d, cond)) @ Q.T
    cov = 0.5 * (cov + cov.T)
    mean = 0.5 * torch.randn(d, dtype=torch.float64, generator=g)
    return Gaussian(mean, cov, name=f"aniso_d{d}_cond{cond:g}")


#: The benchmark suite: (label, keyword arguments of get_target). Dimensions 1..256, 1..64 components,
#: separated / overlapping / multiscale mixtures and rotated Gaussians up to condition number 1e3; each entry's
#: exact model costs at most ~0.1 s per eps call at batch 2,000 on one CPU core (see ``suite``).
SUITE = (
    ("multiscale_1d_k2", "gmm_multiscale", dict(dim=1, components=2, min_weight=0.02)),
    ("aniso_2d_cond1e3", "aniso", dict(dim=2, cond=1e3)),
    ("separated_2d_k8", "gmm_separated", dict(dim=2, components=8)),
    ("overlap_4d_k4", "gmm_overlap", dict(dim=4, components=4)),
    ("multiscale_8d_k16", "gmm_multiscale", dict(dim=8, components=16)),
    ("aniso_16d_cond1e3", "aniso", dict(dim=16, cond=1e3)),
    ("separated_32d_k64", "gmm_separated", dict(dim=32, components=64, diagonal=True)),
    ("overlap_64d_k8", "gmm_overlap", dict(dim=64, components=8)),
    ("aniso_256d_cond1e3", "aniso", dict(dim=256, cond=1e3)),
    ("multiscale_256d_k16_diag", "gmm_multiscale", dict(dim=256, components=16, diagonal=True)),
)


def suite(seed: int = 0) -> list:
    """The benchmark suite as a list of (label, target), built from ``SUITE`` (fixed arguments); ``seed`` draws
    other instances of the same families (means, rotations, weights), e.g. a fresh held-out copy of the suite."""
    return [(label, get_target(name, **kw, seed=seed)) for label, name, kw in SUITE]


TARGETS: dict[str, Callable[[], GaussianMixture]] = {
    "ring8": ring8,
    "bimodal_1d": bimodal_1d,
    "ncsn_two_mode": ncsn_two_mode,
    "aniso_gaussian": aniso_gaussian,
    "gaussian_2d": gaussian_2d,
    "aniso": aniso,
    "gmm": gaussian_mixture_family,
    "gmm_separated": gmm_separated,
    "gmm_overlap": gmm_overlap,
    "gmm_multiscale": gmm_multiscale,
}


def get_target(name: str, **kwargs) -> GaussianMixture:
    """Build a named exact target."""
    try:
        return TARGETS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}") from None


# ------------------------------------------------------------------------------------------------
# Sample-only toy data (no closed-form score)

def moons(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """Two interleaved half circles (as sklearn's make_moons), (n, 2)."""
    n_out = n // 2
    theta = math.pi * torch.rand(n, dtype=torch.float64, generator=generator)
    upper = torch.arange(n) < n_out
    x = torch.where(upper, torch.cos(theta), 1.0 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x, y], 1)
    return pts + noise * torch.randn(n, 2, dtype=torch.float64, generator=generator)


def swiss_roll(n: int, generator: torch.Generator | None = None, noise: float = 0.05) -> torch.Tensor:
    """2-D swiss roll (t cos t, t sin t)/5 with t ~ U(1.5 pi, 4.5 pi), (n, 2)."""
    t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, dtype=torch.float64, generator=generator))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1) / 5.0
    return pts + noise * torch.randn(n, 2, dtype=torch.float64, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None, squares: int = 4) -> torch.Tensor:
    """Uniform on the black squares of a squares x squares board on [-2, 2]^2, (n, 2)."""
    size = 4.0 / squares
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    col = torch.randint(0, squares, (n,), generator=generator)
    row_half = torch.randint(0, squares // 2, (n,), generator=generator)
    row = 2 * row_half + (col % 2)
    cell = torch.stack([col, row], 1).to(torch.float64)
    return -2.0 + (cell + u) * size


def digits(return_labels: bool = False):
    """sklearn's bundled 8x8 digits (1797 images), scaled to [-1, 1], shape (N, 1, 8, 8); no download."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("digits() needs scikit-learn: pip install 'diffusion_lab[data]'") from e
    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    if return_labels:
        return x, torch.as_tensor(d.target, dtype=torch.long)
    return x


SAMPLE_ONLY = {"moons": moons, "swiss_roll": swiss_roll, "checkerboard": checkerboard}
