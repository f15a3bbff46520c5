r"""Learned flow maps: Psi_theta(x, s, t) ~ Phi_{s->t}(x), the PF-ODE map from time s down to time t <= s.

Parameterisation (the DDIM / Consistency Trajectory Models form). With alpha, sigma the schedule's coefficients,

    Psi_theta(x, s, t) = (sigma_t / sigma_s) x + (alpha_t - alpha_s sigma_t / sigma_s) g_theta(x, s, t),      (1)
    g_theta(x, s, t)   = c_skip(s) x + c_out(s) F_theta(c_in(s) x, c_noise(s), c_noise(t)),

with the EDM preconditioning (c_skip, c_out, c_in, c_noise) of ``training.edm_precond`` at the start time s.
Why this form:

- the boundary condition Psi(x, t, t) = x holds for every network F, exactly in floating point: at s = t the ratio
  sigma_t/sigma_s is 1.0 and alpha_t - alpha_s * 1.0 is 0.0;
- (1) is one DDIM step (Song, Meng & Ermon 2021, eq. 12 with eta = 0) from s to t with x_0-prediction g: a network
  g = D (the denoiser) makes Psi the DDIM map, and the exact map is reached by one g per (x, s, t). In the scaled
  variables xbar = x/alpha, sigmabar = sigma/alpha, (1) reads xbar_t = (sigmabar_t/sigmabar_s) xbar_s +
  (1 - sigmabar_t/sigmabar_s) g, which is CTM's G_theta(x_t, t, s) = (s/t) x_t + (1 - s/t) g_theta (Kim et al.
  2024) on EDM, where alpha = 1 and sigma = t;
- for t = t_min fixed it is a consistency function f_theta(x, s) = Psi_theta(x, s, t_min) with f(x, t_min) = x
  (Song, Dhariwal, Chen & Sutskever 2023, Sec. 3), so consistency distillation and the two-time (CTM) objective
  train the same object.

Training (``distill``): consistency distillation (Song et al. 2023, Algorithm 2) from a teacher ``VelocityField``
(an exact target's field or a learned one) on a grid t_min = tau_0 < ... < tau_N = t_max. For x_0 from the data,
n uniform in {1..N} and x = alpha_{tau_n} x_0 + sigma_{tau_n} z, one teacher ODE step gives xhat = Phi^solver_{tau_n
-> tau_{n-1}}(x) (DDIM: one teacher evaluation; Heun in (xbar, sigmabar): two), and the loss is

    CD:   || Psi_theta(x, tau_n, tau_0) - Psi_theta-(xhat, tau_{n-1}, tau_0) ||^2,
    CTM:  || Psi_theta(x, tau_n, tau_m) - Psi_theta-(xhat, tau_{n-1}, tau_m) ||^2,   m uniform in {0..n-1},

with theta- an EMA of theta (decay mu, Song et al. 2023, Algorithm 2) and no gradient through the target. CTM is the
two-time version (after Kim et al. 2024, with the teacher's ODE segment of one solver step, and without the
DSM and GAN terms): any s -> t is trained, so the deterministic multistep chain is meaningful. The training cost is
counted in teacher evaluations: batch calls of the teacher field and per-sample evaluations (calls x batch).

Consistency training (``distill(..., method="ct")``, no teacher; Song, Dhariwal, Chen & Sutskever 2023,
Algorithm 3, with the improved recipe of Song & Dhariwal 2023). The teacher step is replaced by the same noise z at
the adjacent level, xhat = alpha_{tau_{n-1}} x_0 + sigma_{tau_{n-1}} z (an unbiased one-sample estimate of the
PF-ODE step, exact as Delta tau -> 0), and the loss is

    CT:   lambda_n d(Psi_theta(x, tau_n, tau_0), Psi_theta-(xhat, tau_{n-1}, tau_0)),
          lambda_n = 1 / (sigmabar_n - sigmabar_{n-1}),   sigmabar = sigma/alpha,

on the Karras grid in sigmabar with N(k) = min(s_0 2^{floor(k/K')}, s_1) intervals at step k (K' = floor(K /
(log2 floor(s_1/s_0) + 1)), K the number of steps), n drawn with probability proportional to
erf((log sigmabar_n - P_mean)/(sqrt 2 P_std)) - erf((log sigmabar_{n-1} - P_mean)/(sqrt 2 P_std)), the pseudo-Huber
distance d and theta- = stopgrad(theta) (no EMA target).

Sampling (``flow_map_sample``): k network evaluations on a grid T = t_0 > t_1 > ... > t_k = t_min, either the
deterministic chain x <- Psi(x, t_i, t_{i+1}), or multistep consistency sampling (Song et al. 2023, Algorithm 1):
x0 <- Psi(x, t_i, t_min), then x <- alpha_{t_{i+1}} x0 + sigma_{t_{i+1}} z with fresh noise z.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field

import torch
from torch import nn

from ._tensor import as_tensor, bcast
from .field import VelocityField
from .guidance import bind_labels, label_tensor
from .models.embeddings import DEFAULT_TIME_SCALE, TimestepEmbedder
from .models.mlp import _ResBlock
from .samplers.base import SampleResult
from .samplers.grids import time_grid
from .schedules import Schedule
from .training import EMA, _check_sigma_data, c_noise, edm_precond

__all__ = ["TwoTimeMLP", "TwoTimeDiT", "FlowMap", "teacher_step", "DistillResult", "distill", "ConsistencyTrainer",
           "flow_map_sample", "TEACHER_SOLVERS", "DISTILL_METHODS", "DISTILL_LOSSES", "distance", "ct_steps",
           "ct_level_probabilities", "CT_NOISE_SAMPLINGS", "CT_WEIGHTINGS", "consistency_training_loss"]

TEACHER_SOLVERS = ("ddim", "heun")
DISTILL_METHODS = ("cd", "ctm", "ct")
CT_NOISE_SAMPLINGS = ("lognormal", "uniform")
CT_WEIGHTINGS = ("inverse_gap", "uniform")
DISTILL_LOSSES = ("l2", "pseudo_huber")


def distance(a: torch.Tensor, b: torch.Tensor, loss: str = "l2", c: float | None = None) -> torch.Tensor:
    r"""The per-sample distance d(a, b) of the consistency losses, (batch,):

        l2             ||a - b||^2                               (Song et al. 2023)
        pseudo_huber   sqrt(||a - b||^2 + c^2) - c,  c = 0.00054 sqrt(D) by default   (Song & Dhariwal 2023)

    with D the number of features of one sample. Pseudo-Huber is ~ ||a - b||^2 / (2c) near 0 and ~ ||a - b|| far
    from it, so large residuals weigh less than under l2. Evaluated as ||a - b||^2 / (sqrt(||a - b||^2 + c^2) + c),
    which keeps full relative precision for small residuals.

    Parameters
    ----------
    a, b : tensors of the same shape (batch, *data_shape)
    loss : "l2" | "pseudo_huber"
    c : float > 0, optional

    Returns
    -------
    tensor (batch,)
    """
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"unknown consistency loss {loss!r}; choose one of {DISTILL_LOSSES}")
    sq = (a - b).pow(2).reshape(a.shape[0], -1).sum(1)
    if loss == "l2":
        return sq
    if c is None:
        c = 0.00054 * math.sqrt(a[0].numel())
    if not c > 0:
        raise ValueError(f"the pseudo-Huber constant c must be > 0, got {c!r}")
    return sq / (torch.sqrt(sq + c * c) + c)  # = sqrt(sq + c^2) - c without its cancellation for sq << c^2


class TwoTimeMLP(nn.Module):
    r"""The residual MLP of ``models.mlp`` conditioned on two noise levels: ``forward(x, c_s, c_t)``.

        h_0 = W_in x,   c = E_s(c_s) + E_t(c_t)   (two sinusoidal TimestepEmbedders),
        h <- FiLM residual blocks (``models.mlp``),   out = W_out LN(h)   (W_out zero-initialised).

    Parameters
    ----------
    dim : int
        Number of features of one (flattened) sample.
    hidden, depth, expansion : int
        Width of the residual stream, number of blocks, inner width factor.
    """

    def __init__(self, dim: int = 2, hidden: int = 64, depth: int = 3, expansion: int = 2,
                 frequency_embedding_size: int = 64, time_scale: float = DEFAULT_TIME_SCALE):
        super().__init__()
        if dim < 1 or hidden < 1 or depth < 0 or expansion < 1:
            raise ValueError(f"need dim >= 1, hidden >= 1, depth >= 0, expansion >= 1; got {dim}, {hidden}, "
                             f"{depth}, {expansion}")
        self.dim = int(dim)
        self.inp = nn.Linear(dim, hidden)
        self.emb_s = TimestepEmbedder(hidden, frequency_embedding_size, time_scale=time_scale)
        self.emb_t = TimestepEmbedder(hidden, frequency_embedding_size, time_scale=time_scale)
        self.blocks = nn.ModuleList([_ResBlock(hidden, "film", expansion) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_s: torch.Tensor, c_t: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        c = self.emb_s(c_s.expand(n) if c_s.ndim == 0 else c_s) + self.emb_t(c_t.expand(n) if c_t.ndim == 0 else c_t)
        h = self.inp(x.reshape(n, -1))
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.norm_out(h)).reshape(x.shape)


class TwoTimeDiT(nn.Module):
    r"""A DiT (adaLN or adaLN-Zero conditioning) conditioned on two noise levels: ``forward(x, c_s, c_t, y=None)``.

        c = E_s(c_s) + E_y(y) + E_t(c_t),

    with E_s, E_y the DiT's own timestep and label embedders and E_t a second timestep embedder whose output layer
    is zero-initialised; c drives the DiT's adaLN modulations as usual. Adding an embedding of the second time is how
    Consistency Trajectory Models condition their network on the end time (Kim et al. 2024). Built from a trained
    denoiser DiT (``from_dit``), the network at initialisation is that DiT's F(x, c_s, y) for every t, so the
    ``FlowMap`` around it is the teacher's DDIM step from s to t: the student starts from the teacher, as in
    consistency distillation (Song et al. 2023, Sec. 5).

    Labels are never dropped here (a flow map is distilled per class); ``y=None`` is the DiT's null class.

    Parameters
    ----------
    dit : models.dit.DiT
        The backbone (used in place; ``from_dit`` copies it).
    """

    def __init__(self, dit):
        super().__init__()
        from .models.dit import DiT

        if not isinstance(dit, DiT):
            raise TypeError(f"dit must be a diffusion_lab DiT, got {type(dit).__name__}")
        if dit.config.norm_affine:
            raise ValueError(f"TwoTimeDiT needs adaLN conditioning (a condition vector); the DiT's conditioning is "
                             f"{dit.config.conditioning!r}")
        cfg = dit.config
        self.dit = dit
        self.emb_t = TimestepEmbedder(cfg.hidden_size, cfg.frequency_embedding_size, time_scale=cfg.time_scale,
                                      freq_shift=cfg.frequency_shift)
        self.emb_t.reset_parameters(0.02)
        nn.init.zeros_(self.emb_t.mlp[2].weight)
        nn.init.zeros_(self.emb_t.mlp[2].bias)
        self.emb_t.to(dit.x_embedder.weight.dtype)
        self.num_classes, self.data_shape = dit.num_classes, dit.data_shape

    @classmethod
    def from_dit(cls, dit) -> "TwoTimeDiT":
        """A TwoTimeDiT around a deep copy of ``dit`` (the teacher is left untouched)."""
        import copy

        return cls(copy.deepcopy(dit))

    def forward(self, x: torch.Tensor, c_s: torch.Tensor, c_t: torch.Tensor, y: torch.Tensor | None = None):
        from .models.dit import autocast_context

        dit = self.dit
        if x.ndim != 4 or tuple(x.shape[1:]) != dit.data_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, dit.data_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        c_s = (c_s.expand(n) if c_s.ndim == 0 else c_s).to(x.device)
        c_t = (c_t.expand(n) if c_t.ndim == 0 else c_t).to(x.device)
        wdtype = dit.x_embedder.weight.dtype
        keep = None if y is None or dit.y_embedder is None or not dit.y_embedder.has_null else \
            torch.zeros(n, dtype=torch.long, device=x.device)
        with autocast_context(x.device.type, dit.autocast_dtype):
            c = dit.embed_condition(c_s.to(wdtype), y, force_drop_ids=keep) + self.emb_t(c_t.to(wdtype))
            out = dit.unpatchify(dit.forward_tokens(x.to(wdtype), c))
        return out.to(x.dtype)


class FlowMap(nn.Module):
    r"""Psi_theta(x, s, t), s >= t, in the parameterisation (1) of the module docstring:

        Psi(x, s, t) = (sigma_t/sigma_s) x + (alpha_t - alpha_s sigma_t/sigma_s) [c_skip(s) x + c_out(s) F(c_in(s) x,
                       c_noise(s), c_noise(t))],

    so Psi(x, t, t) = x for every network F. Each call is one network evaluation, counted in ``nfe``.

    Parameters
    ----------
    net : nn.Module or callable
        F(x_in, c_s, c_t) -> tensor of x's shape (``TwoTimeMLP``, or any callable, e.g. an exact residual).
    schedule : Schedule
    sigma_data : float
        The data standard deviation of the EDM preconditioning (Karras et al. 2022, Table 1).
    labels : int or (batch,) tensor, optional
        Class labels bound to the map (``with_labels``), used when a call passes no ``y``; a class-conditional
        network is then called as F(x_in, c_s, c_t, y) (e.g. ``TwoTimeDiT``). Unlabelled calls use F(x_in, c_s, c_t).
    """

    def __init__(self, net, schedule: Schedule, sigma_data: float = 0.5, labels=None):
        super().__init__()
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffusion_lab Schedule, got {type(schedule).__name__}")
        if not callable(net):
            raise TypeError(f"net must be callable (x_in, c_s, c_t) -> tensor, got {type(net).__name__}")
        self.net = net
        self.schedule = schedule
        self.sigma_data = _check_sigma_data(sigma_data)
        self.labels = labels
        self.nfe = 0

    def with_labels(self, labels) -> "FlowMap":
        """The same map (shared network) bound to class labels: an int or a (batch,) tensor."""
        return FlowMap(self.net, self.schedule, self.sigma_data, labels)

    def _times(self, s, t, x):
        n = x.shape[0]
        # python floats go to float64 directly: through float32 x, t_max = 0.999 would round above t_max
        s = as_tensor(s).to(device=x.device, dtype=torch.float64)
        t = as_tensor(t).to(device=x.device, dtype=torch.float64)
        for name, v in (("s", s), ("t", t)):
            if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != n):
                raise ValueError(f"{name} must be a scalar or a (batch,) tensor with batch={n}; got shape "
                                 f"{tuple(v.shape)}")
            self.schedule.check_t(v, what=name)
        s, t = s.expand(n) if s.ndim == 0 else s, t.expand(n) if t.ndim == 0 else t
        if bool((t > s).any()):
            i = int(torch.nonzero(t > s)[0])
            raise ValueError(f"a flow map runs from s down to t <= s; got s={float(s[i])!r} < t={float(t[i])!r}")
        return s, t

    def coefficients(self, s, t, x):
        """(sigma_t/sigma_s, alpha_t - alpha_s sigma_t/sigma_s), (batch,) float64 tensors for times (batch,)."""
        sch = self.schedule
        ratio = sch.sigma(t) / sch.sigma(s)
        return ratio, sch.alpha(t) - sch.alpha(s) * ratio

    def g(self, x, s, t, y=None):
        r"""g_theta(x, s, t) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), c_noise(t)) (x_0-prediction of (1));
        with labels y (a (batch,) long tensor), F(c_in(s) x, c_noise(s), c_noise(t), y)."""
        c_skip, c_out, cin, cs = edm_precond(self.schedule, s, self.sigma_data)
        ct = c_noise(self.schedule, t)
        wdtype = _param_dtype(self.net, x.dtype)
        args = ((bcast(cin, x) * x).to(wdtype), cs.to(wdtype), ct.to(wdtype))
        F = self.net(*args) if y is None else self.net(*args, y)
        if not isinstance(F, torch.Tensor) or F.shape != x.shape:
            shape = tuple(F.shape) if isinstance(F, torch.Tensor) else type(F).__name__
            raise ValueError(f"flow-map network returned {shape}, expected x's shape {tuple(x.shape)}")
        return bcast(c_skip, x).to(x.dtype) * x + bcast(c_out, x).to(x.dtype) * F.to(x.dtype)

    def forward(self, x: torch.Tensor, s, t, y=None) -> torch.Tensor:
        """Psi_theta(x, s, t | y); s, t scalars or (batch,) tensors with s >= t; y class labels (an int or a
        (batch,) tensor; default the bound ``labels``, None for an unconditional network)."""
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"x must be a tensor of shape (batch, *data_shape), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        s, t = self._times(s, t, x)
        y = self.labels if y is None else y
        if y is not None:
            y = label_tensor(y, x.shape[0], x.device)
        ratio, b = self.coefficients(s, t, x)
        out = bcast(ratio, x).to(x.dtype) * x + bcast(b, x).to(x.dtype) * self.g(x, s, t, y)
        self.nfe += 1
        return out


def _param_dtype(net, default):
    if isinstance(net, nn.Module):
        for p in [*net.parameters(), *net.buffers()]:
            if p.is_floating_point():
                return p.dtype
    return default


def teacher_step(field: VelocityField, x: torch.Tensor, s, u, solver: str = "heun") -> torch.Tensor:
    r"""One ODE step of the teacher field from s down to u (per-sample (batch,) times allowed).

    ``ddim`` (one evaluation): x_u = (sigma_u/sigma_s) x + (alpha_u - alpha_s sigma_u/sigma_s) D(x, s)
    (Song, Meng & Ermon 2021, eq. 12). ``heun`` (two evaluations; Karras et al. 2022, Algorithm 1): in xbar = x/alpha,
    sigmabar = sigma/alpha with d(xbar)/d(sigmabar) = eps_hat,

        xbar' = xbar + h d_1,   xbar_u = xbar + h (d_1 + d_2)/2,   h = sigmabar_u - sigmabar_s,
        d_1 = eps_hat(x, s),    d_2 = eps_hat(alpha_u xbar', u).

    Parameters
    ----------
    field : VelocityField
        The teacher; its ``nfe`` grows by 1 (ddim) or 2 (heun).
    x : tensor (batch, *data_shape)
    s, u : float or (batch,) tensor, u <= s
    solver : "ddim" | "heun"

    Returns
    -------
    tensor
        The teacher's estimate of Phi_{s->u}(x).
    """
    if solver not in TEACHER_SOLVERS:
        raise ValueError(f"unknown teacher solver {solver!r}; choose one of {TEACHER_SOLVERS}")
    sch = field.schedule
    s, u = as_tensor(s, like=x).to(torch.float64), as_tensor(u, like=x).to(torch.float64)
    a_s, s_s, a_u, s_u = (bcast(c, x).to(x.dtype) for c in (sch.alpha(s), sch.sigma(s), sch.alpha(u), sch.sigma(u)))
    if solver == "ddim":
        x0, _ = field.x0_eps(x, s)
        ratio = s_u / s_s
        return ratio * x + (a_u - a_s * ratio) * x0
    _, d1 = field.x0_eps(x, s)
    h = s_u / a_u - s_s / a_s
    xbar = x / a_s
    x1 = xbar + h * d1
    _, d2 = field.x0_eps(a_u * x1, u)
    return a_u * (xbar + 0.5 * h * (d1 + d2))


def ct_steps(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    r"""The number of intervals N(k) of consistency training's exponential curriculum at step k of K = ``total``
    (Song & Dhariwal 2023, Sec. 3.4):

        N(k) = min(s_0 2^{floor(k / K')}, s_1),   K' = floor(K / (log2 floor(s_1/s_0) + 1))

    (the paper counts the N(k) + 1 points of the grid). K' is at least 1, so very short runs reach s_1 early.
    """
    for name, v in (("s0", s0), ("s1", s1), ("total", total)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if s1 < s0:
        raise ValueError(f"need s0 <= s1 for the step-count curriculum, got s0={s0}, s1={s1}")
    if int(k) != k or not 0 <= k < total:
        raise ValueError(f"step k must be an integer in [0, {total}), got {k!r}")
    k_prime = max(1, int(total) // (int(math.log2(int(s1) // int(s0))) + 1))
    return int(min(int(s0) * 2 ** (int(k) // k_prime), int(s1)))


def ct_level_probabilities(sigmabar: torch.Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> torch.Tensor:
    r"""Probabilities of the N intervals (sigmabar_{n-1}, sigmabar_n], n = 1..N, of an ascending grid of noise
    levels under the lognormal law log sigmabar ~ N(P_mean, P_std^2) (Song & Dhariwal 2023, Sec. 3.5):

        p(n) proportional to erf((log sigmabar_n - P_mean) / (sqrt 2 P_std)) - erf((log sigmabar_{n-1} - P_mean)
        / (sqrt 2 P_std)).

    Returns a float64 tensor (N,) summing to 1.
    """
    sb = torch.as_tensor(sigmabar, dtype=torch.float64)
    if sb.ndim != 1 or sb.numel() < 2 or not bool((sb[1:] > sb[:-1]).all()) or not bool((sb > 0).all()):
        raise ValueError(f"sigmabar must be a positive, strictly increasing 1-D grid of >= 2 levels, got {sb.tolist()}")
    if not (math.isfinite(p_mean) and p_std > 0):
        raise ValueError(f"need a finite P_mean and P_std > 0, got {p_mean!r}, {p_std!r}")
    e = torch.erf((torch.log(sb) - p_mean) / (math.sqrt(2.0) * p_std))
    w = e[1:] - e[:-1]
    if not float(w.sum()) > 0:  # every level far in one tail: fall back to the ends' nearest interval
        w = torch.zeros_like(w)
        w[0 if float(e[0]) > 0 else -1] = 1.0
    return w / w.sum()


def consistency_training_loss(psi, x0: torch.Tensor, z: torch.Tensor, s, u, t=None, *, target=None,
                              loss: str = "l2", huber_c: float | None = None, y=None) -> torch.Tensor:
    r"""The per-sample consistency-training loss (Song et al. 2023, Algorithm 3), (batch,):

        d(Psi_theta(x, s, t), stopgrad Psi_theta-(xhat, u, t)),   x = alpha_s x_0 + sigma_s z,
        xhat = alpha_u x_0 + sigma_u z   (the SAME z),   u < s,

    with t = t_min by default (the consistency function) and theta- = ``target`` (default: ``psi`` itself, the
    improved recipe's stopgrad theta). ``psi``/``target``: FlowMaps or any callables (x, s, t) -> tensor.
    Since E[z | x] = eps_hat(x, s), E[xhat | x] = alpha_u (x/alpha_s - (sigmabar_s - sigmabar_u) eps_hat(x, s)),
    sigmabar = sigma/alpha: exactly the DDIM step (Euler in (x/alpha, sigmabar)) with the exact eps_hat. For a
    smooth Psi the stop-gradient objective therefore matches consistency distillation with that teacher up to
    o(sigmabar_s - sigmabar_u) (Song et al. 2023, Theorem 2). ``y``: class labels passed to both maps (as their
    fourth argument) for a class-conditional map.
    """
    sch = psi.schedule if isinstance(psi, FlowMap) else None
    if sch is None:
        sch = getattr(psi, "schedule", None)
    if sch is None:
        raise TypeError("psi must be a FlowMap or a callable with a .schedule attribute")
    t = sch.t_min if t is None else t
    s64, u64 = as_tensor(s, like=x0).to(torch.float64), as_tensor(u, like=x0).to(torch.float64)
    if bool((u64 >= s64).any()):
        raise ValueError(f"consistency training needs u < s, got s={s64.tolist()}, u={u64.tolist()}")
    x = bcast(sch.alpha(s64), x0).to(x0.dtype) * x0 + bcast(sch.sigma(s64), x0).to(x0.dtype) * z
    xhat = bcast(sch.alpha(u64), x0).to(x0.dtype) * x0 + bcast(sch.sigma(u64), x0).to(x0.dtype) * z
    lab = () if y is None else (y,)
    with torch.no_grad():
        goal = (psi if target is None else target)(xhat, u, t, *lab)
    return distance(psi(x, s, t, *lab), goal, loss, huber_c)


@dataclass
class DistillResult:
    """What ``distill`` returns: the trained map ``psi`` (online weights), ``psi_ema`` (the evaluation EMA),
    the loss ``history`` (step, loss), and the training cost: ``teacher_calls`` (batch calls of the teacher field)
    and ``teacher_evals`` (per-sample teacher evaluations = calls x batch)."""

    psi: FlowMap
    psi_ema: FlowMap
    history: list = dc_field(default_factory=list)
    teacher_calls: int = 0
    teacher_evals: int = 0
    settings: dict = dc_field(default_factory=dict)


def distill(psi: FlowMap, teacher: VelocityField | None, data: torch.Tensor, *, steps: int = 1000, batch: int = 256,
            grid_steps: int = 16, grid_kind: str | None = None, method: str = "cd", solver: str = "heun",
            lr: float = 1e-3, target_decay: float | None = None, ema_decay: float = 0.999, seed: int = 0,
            loss: str | None = None, huber_c: float | None = None, log_every: int = 100,
            ct_s0: int = 10, ct_s1: int = 1280, p_mean: float | None = None, p_std: float = 2.0,
            noise_sampling: str = "lognormal", ct_weighting: str = "inverse_gap", labels=None) -> DistillResult:
    r"""Train ``psi`` (in place) by consistency distillation (``method="cd"``, Song et al. 2023, Algorithm 2), its
    two-time version (``"ctm"``, Kim et al. 2024), or consistency training without a teacher (``"ct"``, Song et al.
    2023, Algorithm 3, improved recipe of Song & Dhariwal 2023), with the losses of the module docstring.

    Parameters
    ----------
    psi : FlowMap
        The student, built on ``teacher.schedule`` (same schedule object or settings).
    teacher : VelocityField or None
        The teacher field (exact or learned); None for ``ct``, which uses none.
    data : tensor (N, *data_shape)
        Samples x_0 of the data; batches are drawn with replacement.
    steps, batch : int
        Optimiser steps (Adam, learning rate ``lr``) and batch size.
    grid_steps, grid_kind : int, str
        cd/ctm: the N intervals of the discretisation tau_0 = t_min < ... < tau_N = t_max (``samplers.time_grid``,
        default kind "logsnr"). ct: the grid kind (default "karras", rho = 7, the published grid); N follows the
        curriculum ``ct_steps(k, steps, ct_s0, ct_s1)`` and ``grid_steps`` is not used.
    solver : "heun" | "ddim"
        The one-step teacher solver (``teacher_step``; cd/ctm).
    target_decay : float, optional
        mu of the target network theta- <- mu theta- + (1 - mu) theta. Default 0.95 for cd/ctm (Song et al. 2023)
        and 0 for ct (theta- = stopgrad theta, Song & Dhariwal 2023); mu = 0 evaluates ``psi`` itself without
        gradient.
    ema_decay : float
        Decay of the separate evaluation EMA (with the package's EMA warm-up).
    loss, huber_c : str, float
        The distance d (``distance``). Default "l2" for cd/ctm and "pseudo_huber" for ct. For ct the default
        c is 0.00054 sqrt(D) sigma_data / 0.5: the published constant for data of standard deviation 0.5
        (images in [-1, 1]), rescaled to the map's ``sigma_data``.
    ct_s0, ct_s1 : int
        ct: the curriculum's initial and final number of intervals (published 10 and 1280).
    p_mean, p_std : float
        ct: the lognormal noise-level law log sigmabar ~ N(P_mean, P_std^2) (``ct_level_probabilities``).
        Published -1.1 and 2.0 for sigma_data = 0.5; the default P_mean is -1.1 + log(sigma_data / 0.5), the same
        law relative to the data's scale.
    noise_sampling : "lognormal" | "uniform"
        ct: the law of the interval index n ("uniform" is the original CT's, Song et al. 2023).
    ct_weighting : "inverse_gap" | "uniform"
        ct: lambda_n = 1/(sigmabar_n - sigmabar_{n-1}) (improved recipe) or 1 (original CT).
    labels : (N,) integer tensor, optional
        Class labels of ``data`` for a class-conditional map (e.g. around a ``TwoTimeDiT``): each step draws the
        labels y of its x_0, evaluates the teacher bound to y (``guidance.bind_labels``: a ``learned_field`` or a
        classifier-free-guided field) and both maps at y. The result is sampled per class with
        ``psi.with_labels(y)``.

    Returns
    -------
    DistillResult
        For ct, ``teacher_calls = teacher_evals = 0``.
    """
    trainer = ConsistencyTrainer(psi, teacher, data, method=method, solver=solver, batch=batch,
                                 grid_steps=grid_steps, grid_kind=grid_kind, lr=lr, target_decay=target_decay,
                                 ema_decay=ema_decay, seed=seed, loss=loss, huber_c=huber_c, log_every=log_every,
                                 total_steps=steps, ct_s0=ct_s0, ct_s1=ct_s1, p_mean=p_mean, p_std=p_std,
                                 noise_sampling=noise_sampling, ct_weighting=ct_weighting, labels=labels)
    trainer.run(int(steps))
    return trainer.result()


class ConsistencyTrainer:
    r"""The training loop of ``distill`` (method "cd", "ctm" or "ct") cut at step boundaries, with a state a
    checkpoint can hold: ``distill`` is ``ConsistencyTrainer(...).run(steps)`` followed by ``result()``, and
    ``diffusion-lab distill`` saves ``state_dict()`` between steps and resumes with ``load_state_dict`` bitwise as
    one uninterrupted run.

    Each step draws x_0 from ``data``, the interval index n (and m for ctm) and the noise z from one generator, in
    that order, and minimises (module docstring)

        cd/ctm:  d(Psi_theta(x, tau_n, tau_m), Psi_theta-(xhat, tau_{n-1}, tau_m)),   xhat one teacher step,
        ct:      lambda_n d(Psi_theta(x, tau_n, tau_0), stopgrad Psi(xhat, tau_{n-1}, tau_0)),  xhat with the same z,

    then updates Adam, the target EMA (theta- <- mu theta- + (1 - mu) theta; none for mu = 0) and the evaluation EMA.
    ct's curriculum N(k) depends on the total number of steps K = ``total_steps``, so a ct trainer runs only up to the
    K it was built with. Arguments as in ``distill``.
    """

    def __init__(self, psi: FlowMap, teacher: VelocityField | None, data: torch.Tensor, *, method: str = "cd",
                 solver: str = "heun", batch: int = 256, grid_steps: int = 16, grid_kind: str | None = None,
                 lr: float = 1e-3, target_decay: float | None = None, ema_decay: float = 0.999, seed: int = 0,
                 loss: str | None = None, huber_c: float | None = None, log_every: int = 100,
                 total_steps: int | None = None, ct_s0: int = 10, ct_s1: int = 1280, p_mean: float | None = None,
                 p_std: float = 2.0, noise_sampling: str = "lognormal", ct_weighting: str = "inverse_gap",
                 labels=None):
        if method not in DISTILL_METHODS:
            raise ValueError(f"unknown distillation method {method!r}; choose one of {DISTILL_METHODS}")
        if solver not in TEACHER_SOLVERS:
            raise ValueError(f"unknown teacher solver {solver!r}; choose one of {TEACHER_SOLVERS}")
        if not isinstance(psi, FlowMap) or not isinstance(psi.net, nn.Module):
            raise TypeError("psi must be a FlowMap around a torch.nn.Module network")
        ct = method == "ct"
        if teacher is None and not ct:
            raise ValueError(f"method {method!r} needs a teacher VelocityField; only method='ct' trains without one")
        if teacher is not None and psi.schedule.settings() != teacher.schedule.settings():
            raise ValueError(f"student schedule {psi.schedule!r} differs from the teacher's {teacher.schedule!r}")
        for name, v in (("batch", batch), ("grid_steps", grid_steps), ("log_every", log_every)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (data.shape[0],) or labels.is_floating_point() or labels.is_complex():
                raise ValueError(f"labels must be an integer tensor of shape ({data.shape[0]},) (one per data row), "
                                 f"got dtype {labels.dtype} and shape {tuple(labels.shape)}")
            labels = labels.long()
        if total_steps is not None and (int(total_steps) != total_steps or total_steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {total_steps!r}")
        loss = ("pseudo_huber" if ct else "l2") if loss is None else loss
        if loss not in DISTILL_LOSSES:
            raise ValueError(f"unknown consistency loss {loss!r}; choose one of {DISTILL_LOSSES}")
        target_decay = (0.0 if ct else 0.95) if target_decay is None else float(target_decay)
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {target_decay}")
        grid_kind = ("karras" if ct else "logsnr") if grid_kind is None else grid_kind
        if noise_sampling not in CT_NOISE_SAMPLINGS:
            raise ValueError(f"unknown noise_sampling {noise_sampling!r}; choose one of {CT_NOISE_SAMPLINGS}")
        if ct_weighting not in CT_WEIGHTINGS:
            raise ValueError(f"unknown ct_weighting {ct_weighting!r}; choose one of {CT_WEIGHTINGS}")
        if ct:
            if total_steps is None:
                raise ValueError("method 'ct' needs total_steps: its curriculum N(k) depends on the total K")
            ct_steps(0, int(total_steps), ct_s0, ct_s1)  # validates s0, s1
            if p_mean is None:
                p_mean = -1.1 + math.log(psi.sigma_data / 0.5)
            if huber_c is None and loss == "pseudo_huber":
                huber_c = 0.00054 * math.sqrt(data[0].numel()) * psi.sigma_data / 0.5
            ct_level_probabilities(torch.tensor([1.0, 2.0]), p_mean, p_std)  # validates P_mean, P_std
        self.psi, self.teacher, self.data, self.method, self.ct = psi, teacher, data, method, ct
        self.labels = labels
        self.solver, self.batch, self.grid_steps, self.grid_kind = solver, int(batch), int(grid_steps), grid_kind
        self.lr, self.target_decay, self.ema_decay, self.seed = lr, target_decay, ema_decay, int(seed)
        self.loss_kind, self.huber_c, self.log_every = loss, huber_c, int(log_every)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.ct_s0, self.ct_s1, self.p_mean, self.p_std = int(ct_s0), int(ct_s1), p_mean, float(p_std)
        self.noise_sampling, self.ct_weighting = noise_sampling, ct_weighting
        self.resolved = {"grid_kind": grid_kind, "target_decay": target_decay, "loss": loss, "huber_c": huber_c,
                         **({"p_mean": p_mean} if ct else {})}
        self._grids = {}
        self.generator = torch.Generator().manual_seed(int(seed))
        self.dtype = _param_dtype(psi.net, torch.float32)
        self.target = EMA(psi.net, target_decay, warmup=False) if target_decay > 0 else None
        self.ema = EMA(psi.net, ema_decay, warmup=True)
        self.psi_target = FlowMap(self.target.module, psi.schedule, psi.sigma_data) if self.target else psi
        self.opt = torch.optim.Adam(psi.net.parameters(), lr=lr)
        self.step, self.history, self.acc, self.acc_n, self.teacher_calls = 0, [], 0.0, 0, 0

    def _ascending(self, n_int: int):
        """tau_0 = t_min < ... < tau_N = t_max, the law of the interval index n and ct's weights lambda_n."""
        if n_int not in self._grids:
            sch = self.psi.schedule
            g = time_grid(sch, n_int, self.grid_kind).flip(0)
            sb = sch.sigma(g) / sch.alpha(g)
            if self.ct and self.noise_sampling == "lognormal":
                prob = ct_level_probabilities(sb, self.p_mean, self.p_std)
            else:
                prob = torch.full((n_int,), 1.0 / n_int, dtype=torch.float64)
            if self.ct and self.ct_weighting == "inverse_gap":
                lam = 1.0 / (sb[1:] - sb[:-1])
            else:
                lam = torch.ones(n_int, dtype=torch.float64)
            self._grids[n_int] = (g, prob, lam)
        return self._grids[n_int]

    def train_step(self) -> tuple[float, int]:
        """One optimiser step; returns the batch loss and the grid's N."""
        g, batch, sch, dtype = self.generator, self.batch, self.psi.schedule, self.dtype
        n_int = ct_steps(self.step, self.total_steps, self.ct_s0, self.ct_s1) if self.ct else self.grid_steps
        grid, prob, lam = self._ascending(n_int)
        idx = torch.randint(0, self.data.shape[0], (batch,), generator=g)
        x0 = self.data[idx].to(dtype)
        y = None if self.labels is None else self.labels[idx]
        lab = () if y is None else (y,)
        if self.ct and self.noise_sampling == "lognormal":
            n = torch.multinomial(prob, batch, replacement=True, generator=g) + 1
        else:
            n = torch.randint(1, n_int + 1, (batch,), generator=g)
        if self.method == "ctm":
            m = (torch.rand(batch, generator=g, dtype=torch.float64) * n).long()  # uniform in {0..n-1}
        else:
            m = torch.zeros_like(n)
        s, u, t = grid[n], grid[n - 1], grid[m]
        z = torch.randn(x0.shape, generator=g, dtype=dtype)
        if self.ct:  # the same z one level down: no teacher
            per = consistency_training_loss(self.psi, x0, z, s, u, t, target=self.psi_target, loss=self.loss_kind,
                                            huber_c=self.huber_c, y=y)
            loss = (lam[n - 1].to(per.dtype) * per).mean()
        else:
            x = bcast(sch.alpha(s), x0).to(dtype) * x0 + bcast(sch.sigma(s), x0).to(dtype) * z
            teacher = self.teacher if y is None else bind_labels(self.teacher, y)
            calls0 = teacher.nfe
            with torch.no_grad():
                xhat = teacher_step(teacher, x.to(torch.float64), s, u, self.solver).to(dtype)
                goal = self.psi_target(xhat, u, t, *lab)
            self.teacher_calls += teacher.nfe - calls0
            if teacher is not self.teacher:
                self.teacher.nfe += teacher.nfe - calls0
            loss = distance(self.psi(x, s, t, *lab), goal, self.loss_kind, self.huber_c).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.target is not None:
            self.target.update(self.psi.net)
        self.ema.update(self.psi.net)
        return float(loss.detach()), n_int

    def run(self, steps: int, *, on_log=None, ckpt_every: int = 0, on_checkpoint=None) -> None:
        """Train from ``self.step`` to ``steps``: ``on_log(record)`` after each log record (every ``log_every``
        steps and at the last), ``on_checkpoint(self)`` every ``ckpt_every`` steps before the last."""
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if self.ct and steps > self.total_steps:
            raise ValueError(f"a ct run built for {self.total_steps} steps (its curriculum) cannot run to {steps}")
        self.psi.net.train()
        try:
            while self.step < steps:
                loss, n_int = self.train_step()
                self.step += 1
                self.acc, self.acc_n = self.acc + loss, self.acc_n + 1
                if self.step % self.log_every == 0 or self.step == steps:
                    rec = {"step": self.step, "loss": self.acc / self.acc_n, "grid_steps": n_int}
                    self.history.append(rec)
                    self.acc, self.acc_n = 0.0, 0
                    if on_log is not None:
                        on_log(rec)
                if ckpt_every and self.step % ckpt_every == 0 and self.step < steps and on_checkpoint is not None:
                    on_checkpoint(self)
        finally:
            self.psi.net.eval()

    def flow_map(self) -> FlowMap:
        """The evaluation map: the EMA weights (``DistillResult.psi_ema``)."""
        return FlowMap(self.ema.module, self.psi.schedule, self.psi.sigma_data)

    def settings(self) -> dict:
        """The run's settings as ``DistillResult.settings`` records them."""
        ct = self.ct
        out = {"method": self.method, "solver": self.solver if not ct else None, "steps": self.step,
               "batch": self.batch, "grid_steps": self.grid_steps if not ct else None, "grid_kind": self.grid_kind,
               "lr": self.lr, "target_decay": self.target_decay, "ema_decay": self.ema_decay, "seed": self.seed,
               "loss": self.loss_kind, "huber_c": self.huber_c, "conditional": self.labels is not None}
        if ct:
            out.update({"ct_s0": self.ct_s0, "ct_s1": self.ct_s1, "p_mean": self.p_mean, "p_std": self.p_std,
                        "noise_sampling": self.noise_sampling, "ct_weighting": self.ct_weighting})
        return out

    def result(self) -> DistillResult:
        return DistillResult(psi=self.psi, psi_ema=self.flow_map(), history=list(self.history),
                             teacher_calls=self.teacher_calls, teacher_evals=self.teacher_calls * self.batch,
                             settings=self.settings())

    def state_dict(self) -> dict:
        """Tensors and plain containers only (loadable with ``torch.load(weights_only=True)``)."""
        from .training import rng_state

        return {"step": self.step, "net": self.psi.net.state_dict(),
                "target": self.target.state_dict() if self.target is not None else {},
                "ema": self.ema.state_dict(), "opt": self.opt.state_dict(), "generator": self.generator.get_state(),
                "rng": rng_state(), "history": [dict(r) for r in self.history], "acc": self.acc, "acc_n": self.acc_n,
                "teacher_calls": self.teacher_calls}

    def load_state_dict(self, sd: dict) -> None:
        from .training import set_rng_state

        self.psi.net.load_state_dict(sd["net"])
        if self.target is not None:
            self.target.load_state_dict(sd["target"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        self.generator.set_state(sd["generator"])
        set_rng_state(sd["rng"])
        self.step, self.history = int(sd["step"]), [dict(r) for r in sd["history"]]
        self.acc, self.acc_n, self.teacher_calls = float(sd["acc"]), int(sd["acc_n"]), int(sd["teacher_calls"])


def flow_map_sample(psi: FlowMap, x_T: torch.Tensor, steps: int = 1, *, grid=None, grid_kind: str = "logsnr",
                    t_min: float | None = None, t_max: float | None = None, noise_reinjection: bool = False,
                    generator: torch.Generator | None = None, labels=None) -> SampleResult:
    r"""Sample with a flow map in k = ``steps`` network evaluations on the grid T = t_0 > ... > t_k = t_min.

    Deterministic chain (default): x_{i+1} = Psi(x_i, t_i, t_{i+1}), so the result is
    Psi(...Psi(Psi(x_T, t_0, t_1), t_1, t_2)..., t_{k-1}, t_k), an approximation of Phi_{T -> t_min}(x_T).
    ``noise_reinjection=True`` is multistep consistency sampling (Song et al. 2023, Algorithm 1):

        xhat_0 = Psi(x_i, t_i, t_min),   x_{i+1} = alpha_{t_{i+1}} xhat_0 + sigma_{t_{i+1}} z,   z ~ N(0, I),

    returning the last xhat_0 (it samples the law, not the map of x_T).

    Parameters
    ----------
    psi : FlowMap
    x_T : tensor (batch, *data_shape)
        Samples of p_{t_max}.
    steps : int
        k >= 1, the number of network evaluations (``SampleResult.nfe``, counted as the change in ``psi.nfe``).
    grid : optional descending sequence of times (overrides steps / grid_kind / t_min / t_max).
    noise_reinjection : bool
    generator : torch.Generator, for z.
    labels : int or (batch,) tensor, optional
        Class labels for a class-conditional map (default: the map's bound ``labels``).

    Returns
    -------
    SampleResult
    """
    sch = psi.schedule
    if not isinstance(x_T, torch.Tensor) or not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor, got {type(x_T).__name__}")
    if grid is None:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        grid = time_grid(sch, int(steps), grid_kind, t_min=t_min, t_max=t_max)
    else:
        grid = time_grid(sch, kind=list(map(float, grid)))
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"the grid must be strictly decreasing, got {grid.tolist()}")
    nfe0 = psi.nfe
    x = x_T
    t_end = float(grid[-1])
    lab = () if labels is None else (labels,)
    with torch.no_grad():
        for i in range(len(grid) - 1):
            if noise_reinjection:
                x0 = psi(x, float(grid[i]), t_end, *lab)
                if i + 1 < len(grid) - 1:
                    tn = as_tensor(float(grid[i + 1]))
                    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                    x = float(sch.alpha(tn)) * x0 + float(sch.sigma(tn)) * z
                else:
                    x = x0
            else:
                x = psi(x, float(grid[i]), float(grid[i + 1]), *lab)
    settings = {"method": "flow_map", "steps": len(grid) - 1, "noise_reinjection": bool(noise_reinjection),
                "grid_kind": grid_kind, "schedule": sch.settings()}
    return SampleResult(x=x, nfe=psi.nfe - nfe0, grid=grid, method="flow_map", settings=settings)
