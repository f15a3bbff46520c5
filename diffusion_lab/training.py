r"""Training a network to be the model of a velocity field: objectives, preconditioning, EMA, the loop,
checkpoints and data parallelism.

Objectives (data at t = 0, noise at t_max, x_t = alpha x_0 + sigma eps, as everywhere in the package).
A network F sees the scaled input c_in x_t and the noise level c_noise(t) = -lambda(t)/4 (``c_noise``), plus an
optional class label y, and its output is one prediction type (``NET_PREDICTIONS``):

    eps, x0, v, score   the targets eps, x_0, alpha eps - sigma x_0, -eps/sigma        (v: Salimans & Ho 2022)
    velocity            u = alpha' x_0 + sigma' eps: conditional flow matching; on RectifiedFlow u = eps - x_0
    edm                 F with D = c_skip x + c_out F (Karras et al. 2022, Table 1), target (x_0 - c_skip x)/c_out

The loss is the weighted denoising score matching (DSM) regression (Vincent 2011)

    L = E_{t ~ p(t), x_0, eps} [ w(t) * mean_dims (F - target)^2 ],

where p(t) is the time sampler and w(t) the weighting. All these losses are one loss: at fixed (x, t) every
prediction is an affine function of eps_hat with the same offset as its target, pred - target = kappa(t)
(eps_hat - eps), so the loss in prediction space ``kind`` with weight w equals the eps-loss with weight
w kappa_kind^2 (``eps_weight``; Kingma & Gao 2023):

    kappa^2:  eps 1,  x0 sigma^2/alpha^2 = e^{-2 lambda},  score 1/sigma^2,  v ((alpha^2 + sigma^2)/alpha)^2,
              velocity (sigma lambda')^2,  edm (sigma^2 + alpha^2 sigma_d^2)/(alpha sigma_d)^2.

So a uniform eps-loss is the score loss weighted by sigma^2, the x0-loss is the eps-loss weighted by
1/SNR, and, in Kingma & Gao's (2023, arXiv:2303.00848) form L_w = 1/2 E_t[w(lambda_KG) (-d lambda_KG/dt)
||eps - eps_hat||^2] with lambda_KG = 2 lambda the log-SNR, a (time sampler p, eps-weight W) pair has
Kingma-Gao weight w(lambda_KG) = 2 p(t) W(t) / (-d lambda_KG/dt). The ELBO (VDM) is w = 1, i.e. W = -lambda'(t) / p(t).

EDM preconditioning for any schedule (Karras et al. 2022, Table 1, applied to the scaled variable x/alpha =
x_0 + (sigma/alpha) n; on EDM alpha = 1 and these are Karras's formulas), with S = sigma^2 + alpha^2 sigma_d^2:

    c_in = 1/sqrt(S),  c_skip = alpha sigma_d^2 / S,  c_out = sigma sigma_d / sqrt(S),  c_noise = -lambda/4 = log(sigma/alpha)/4,

so Var(c_in x) = 1 and Var((x_0 - c_skip x)/c_out) = 1 when Var x_0 = sigma_d^2 (Karras et al. 2022, App. B.6).
Every prediction type uses the same input scaling c_in (on VP with sigma_d = 1, c_in = 1); EDM's loss weight
lambda(sigma) = 1/c_out^2 on ||D - x_0||^2 is exactly the unweighted loss on F.

Time samplers: ``uniform`` in [t_min, t_max]; ``lognormal`` in the EDM noise level sigma/alpha = e^{-lambda}
(log sigma ~ N(P_mean, P_std^2), EDM's P_mean = -1.2, P_std = 1.2), mapped to t = t_from_lam(-log sigma) and
clamped to the schedule's lambda range.

The learned field. ``learned_field(net, schedule, prediction)`` wraps a trained network in the same
``VelocityField`` as the exact targets, so every sampler, the Langevin samplers and the Fokker-Planck solver take
it unchanged. Class labels: bound at construction (``labels=``; an int or a (batch,) tensor; the model's ``labels``
attribute, replaceable with ``field.model.with_labels(y)``), or passed per call as ``field.model(x, t, y=...)``,
which is what classifier-free guidance (``diffusion_lab.guidance``) does.

The loop (``Trainer``): AdamW, EMA of the weights, optional linear warm-up, gradient clipping and bf16 autocast;
progress bar and logging through a callback; checkpoints that hold everything (model, EMA, optimiser, step, the
torch / CUDA / numpy / python RNG states, the objective's generator and the data position) as tensors and
primitive types only, so they load with ``torch.load(path, weights_only=True)`` and a resumed run is bitwise
identical to an uninterrupted one on CPU. Data parallelism through torch.distributed: ``init_distributed``
(torchrun's environment), ``TensorLoader(rank=, world_size=)`` shards each global batch, and the trainer wraps the
network in DistributedDataParallel, whose averaged gradient is the gradient of the full batch's mean loss. A
multi-process checkpoint keeps every rank's RNG states (gathered to rank 0, ``Trainer.gather_rng_states``) and
each rank restores its own on resume, so every rank continues its own streams of t and noise.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
from torch import nn

from . import param
from ._tensor import as_tensor, bcast
from .field import VelocityField
from .guidance import label_tensor
from .schedules import Schedule, get_schedule

__all__ = [
    "NET_PREDICTIONS", "WEIGHTINGS", "TIME_SAMPLERS", "c_noise", "c_in", "edm_precond", "prediction_target",
    "eps_weight", "loss_weight", "weighted_loss", "sample_t", "Objective", "LearnedModel", "learned_field",
    "EMA", "TensorLoader", "Trainer", "save_checkpoint", "load_checkpoint", "init_distributed", "wrap_ddp",
    "rng_state", "set_rng_state", "CHECKPOINT_FORMAT", "build_network", "field_from_checkpoint",
    "schedule_from_settings", "apply_net",
]

NET_PREDICTIONS = ("eps", "x0", "v", "score", "velocity", "edm")
CHECKPOINT_FORMAT = "diffusion_lab.training/1"


def _check_prediction(prediction: str, schedule: Schedule) -> None:
    if prediction not in NET_PREDICTIONS:
        raise ValueError(f"unknown network prediction {prediction!r}; choose one of {NET_PREDICTIONS}")
    if prediction == "v" and not schedule.variance_preserving:
        raise ValueError(f"v-prediction needs a variance-preserving schedule (Salimans & Ho 2022); "
                         f"{schedule.name!r} has alpha^2 + sigma^2 != 1")


def _check_sigma_data(sigma_data) -> float:
    if not (isinstance(sigma_data, (int, float)) and math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
    return float(sigma_data)


# ------------------------------------------------------------------------------------------------
# coefficients

def c_noise(schedule: Schedule, t):
    r"""The network's noise-level input c_noise(t) = -lambda(t)/4 = log(sigma/alpha)/4, lambda = log(alpha/sigma).

    On VE/EDM (alpha = 1) this is EDM's c_noise = log(sigma)/4 (Karras et al. 2022, Table 1); on any schedule it is
    the same function of the noise level sigma/alpha, so a network trained under one schedule sees the same input
    for the same signal-to-noise ratio."""
    return -0.25 * schedule.lam(as_tensor(t))


def c_in(schedule: Schedule, t, sigma_data: float = 1.0):
    r"""Input scaling c_in = 1/sqrt(alpha^2 sigma_d^2 + sigma^2): the inverse standard deviation of x_t when
    Var x_0 = sigma_d^2, so the network always sees unit-variance input (EDM's c_in applied to x/alpha)."""
    t = as_tensor(t)
    a, s = schedule.alpha(t), schedule.sigma(t)
    return torch.rsqrt(a * a * sigma_data**2 + s * s)


def edm_precond(schedule: Schedule, t, sigma_data: float = 0.5):
    r"""EDM preconditioning (c_skip, c_out, c_in, c_noise) acting on x_t, for any schedule (Karras et al. 2022,
    Table 1 and eq. 7, in the scaled variable x/alpha = x_0 + (sigma/alpha) n):

        S = sigma^2 + alpha^2 sigma_d^2,  c_skip = alpha sigma_d^2 / S,  c_out = sigma sigma_d / sqrt(S),
        c_in = 1/sqrt(S),  c_noise = -lambda/4,   D(x) = c_skip x + c_out F(c_in x, c_noise).

    With alpha = 1, sigma = t (EDM) these are Karras's c_skip = sigma_d^2/(sigma^2+sigma_d^2),
    c_out = sigma sigma_d/sqrt(sigma^2+sigma_d^2), c_in = 1/sqrt(sigma^2+sigma_d^2), c_noise = log(sigma)/4."""
    t = as_tensor(t)
    a, s = schedule.alpha(t), schedule.sigma(t)
    sd2 = sigma_data**2
    S = s * s + a * a * sd2
    rS = torch.rsqrt(S)
    return a * sd2 / S, s * sigma_data * rS, rS, c_noise(schedule, t)


def prediction_target(kind: str, x0, eps, x, schedule: Schedule, t, sigma_data: float = 1.0):
    r"""The regression target of a network predicting ``kind`` at x = alpha x_0 + sigma eps: the
    ``param.from_x0_eps`` maps (eps, x_0, v = alpha eps - sigma x_0, score = -eps/sigma, velocity
    u = alpha' x_0 + sigma' eps), and for ``edm`` the preconditioned target (x_0 - c_skip x)/c_out."""
    _check_prediction(kind, schedule)
    t = as_tensor(t, like=x)
    if kind == "edm":
        c_skip, c_out, _, _ = edm_precond(schedule, t, sigma_data)
        return (x0 - bcast(c_skip, x) * x) / bcast(c_out, x)
    a, s, da, ds = (bcast(c, x) for c in (schedule.alpha(t), schedule.sigma(t), schedule.dalpha(t),
                                           schedule.dsigma(t)))
    return param.from_x0_eps(kind, x0, eps, a, s, da, ds)


def eps_weight(kind: str, schedule: Schedule, t, sigma_data: float = 1.0):
    r"""kappa_kind(t)^2 with pred - target = kappa (eps_hat - eps) at fixed (x, t): the squared error of a
    ``kind`` prediction is kappa^2 times that of the eps it implies, so a loss with weight w in ``kind`` space is
    the eps-loss with weight w kappa^2 (for ``score``: ||s + eps/sigma||^2 = ||eps_hat - eps||^2/sigma^2; the
    table is in the module docstring)."""
    _check_prediction(kind, schedule)
    t = as_tensor(t)
    a, s = schedule.alpha(t), schedule.sigma(t)
    if kind == "eps":
        return torch.ones_like(s)
    if kind == "x0":  # x0 = (x - sigma eps)/alpha
        return (s / a) ** 2
    if kind == "score":  # score = -eps/sigma
        return 1.0 / (s * s)
    if kind == "v":  # v = (alpha^2 + sigma^2)/alpha eps - sigma x/alpha
        return ((a * a + s * s) / a) ** 2
    if kind == "velocity":  # u = alpha' x0 + sigma' eps = (sigma' - alpha' sigma/alpha) eps + ..., = -sigma lambda' eps
        return (s * schedule.dlam(t)) ** 2
    return (s * s + a * a * sigma_data**2) / (a * sigma_data) ** 2  # edm: F = x0/c_out + ...


WEIGHTINGS = ("uniform", "snr", "sigma2", "likelihood", "edm")


def loss_weight(weighting, schedule: Schedule, t, sigma_data: float = 1.0):
    r"""The weight w(t) multiplying the squared error in the network's own prediction space:

        uniform      1 (the "simple" loss of that parameterisation: Ho et al. 2020 for eps)
        snr          alpha^2/sigma^2 = e^{2 lambda} (an x0-loss weighted by SNR is the uniform eps-loss)
        sigma2       sigma^2 (a score loss weighted by sigma^2 is the uniform eps-loss)
        likelihood   g(t)^2 (with score prediction: Song, Durkan, Murray & Ermon 2021, Thm 1)
        edm          (sigma^2 + alpha^2 sigma_d^2)/(sigma sigma_d)^2 = 1/c_out^2 (EDM's lambda(sigma) on ||D - x_0||^2)

    or a callable (schedule, t) -> weights of t's shape."""
    t = as_tensor(t)
    if callable(weighting):
        return weighting(schedule, t)
    if weighting == "uniform":
        return torch.ones_like(schedule.sigma(t))
    if weighting == "snr":
        return torch.exp(2.0 * schedule.lam(t))
    if weighting == "sigma2":
        return schedule.sigma(t) ** 2
    if weighting == "likelihood":
        return schedule.g2(t)
    if weighting == "edm":
        a, s = schedule.alpha(t), schedule.sigma(t)
        return (s * s + a * a * sigma_data**2) / (s * sigma_data) ** 2
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS} or pass a callable")


def weighted_loss(pred, target, weight):
    r"""Per-sample loss w(t) * mean over data dimensions of (pred - target)^2 (DiT/ADM's ``mean_flat``); (batch,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction has shape {tuple(pred.shape)}, target {tuple(target.shape)}")
    err = (pred - target).pow(2).reshape(pred.shape[0], -1).mean(1)
    return as_tensor(weight, like=err).to(err.dtype) * err


TIME_SAMPLERS = ("uniform", "lognormal")


def sample_t(n: int, schedule: Schedule, sampler: str = "uniform", *, generator: torch.Generator | None = None,
             dtype=torch.float32, device=None, P_mean: float = -1.2, P_std: float = 1.2):
    r"""n training times: ``uniform`` on [t_min, t_max], or ``lognormal``: log(sigma/alpha) ~ N(P_mean, P_std^2)
    (EDM, Karras et al. 2022 Table 1), t = t_from_lam(-log sigma), lambda clamped to the schedule's range."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if sampler == "uniform":
        u = torch.rand(int(n), generator=generator, dtype=torch.float64, device=device)
        t = schedule.t_min + (schedule.t_max - schedule.t_min) * u
    elif sampler == "lognormal":
        if not P_std > 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        z = torch.randn(int(n), generator=generator, dtype=torch.float64, device=device)
        lo, hi = schedule.lam_range
        lam = (-(P_mean + P_std * z)).clamp(lo, hi)
        t = schedule.t_from_lam(lam).clamp(schedule.t_min, schedule.t_max)
    else:
        raise ValueError(f"unknown time sampler {sampler!r}; choose one of {TIME_SAMPLERS}")
    return t.to(dtype)


# ------------------------------------------------------------------------------------------------
# network <-> prediction

def _labels_for(y, n: int, device):
    """None, or the labels as a (n,) long tensor (see guidance.label_tensor)."""
    return None if y is None else label_tensor(y, n, device)


def _param_dtype(net: nn.Module, default=torch.float32):
    """dtype of the first floating parameter (or buffer) of net; ``default`` if it has none."""
    for p in [*net.parameters(), *net.buffers()]:
        if p.is_floating_point():
            return p.dtype
    return default


def apply_net(net: nn.Module, schedule: Schedule, prediction: str, x, t, y=None, sigma_data: float = 1.0,
              autocast_dtype=None):
    r"""(F, pred): the network output F = net(c_in x, c_noise(t), y) in the network's dtype, and the prediction it
    makes in x's dtype (F itself, or D = c_skip x + c_out F for ``edm``). t: scalar or (batch,)."""
    n = x.shape[0]
    t = as_tensor(t, like=x)
    tb = t.expand(n) if t.ndim == 0 else t
    dt = _param_dtype(getattr(net, "module", net), x.dtype)  # DDP keeps the network in .module
    cin = bcast(c_in(schedule, tb, sigma_data), x)
    noise = c_noise(schedule, tb).to(dt)
    xin = (cin * x).to(dt)
    y = _labels_for(y, n, x.device)
    if autocast_dtype is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
            F = net(xin, noise, y)
        F = F.to(dt)
    else:
        F = net(xin, noise, y)
    if F.shape != x.shape:
        raise ValueError(f"network returned shape {tuple(F.shape)}, expected x's shape {tuple(x.shape)}")
    if prediction != "edm":
        return F, F.to(x.dtype)
    c_skip, c_out, _, _ = edm_precond(schedule, tb, sigma_data)
    return F, bcast(c_skip, x) * x + bcast(c_out, x) * F.to(x.dtype)


@dataclass(frozen=True)
class Objective:
    r"""A training objective: E_{t ~ time_sampler, x_0, eps}[w(t) mean_dims (F(c_in x_t, c_noise, y) - target)^2]
    with target ``prediction_target(prediction, ...)`` and w = ``loss_weight(weighting, ...)`` (module docstring).

    ``prediction="velocity"`` is conditional flow matching (Lipman et al. 2023; Liu et al. 2022) for the
    schedule's interpolant; on ``RectifiedFlow`` (alpha = 1 - t, sigma = t, data at t = 0) the target is
    u = eps - x_0, the negative of the noise-at-zero codes' x_1 - x_0 velocity. ``label_dropout`` replaces labels
    by ``null_label`` with that probability (for networks that do not drop labels themselves; the DiT's label
    embedder does, in training mode)."""

    schedule: Schedule
    prediction: str = "eps"
    weighting: str = "uniform"
    time_sampler: str = "uniform"
    sigma_data: float = 1.0
    P_mean: float = -1.2
    P_std: float = 1.2
    label_dropout: float = 0.0
    null_label: int | None = None

    def __post_init__(self):
        _check_prediction(self.prediction, self.schedule)
        _check_sigma_data(self.sigma_data)
        if not callable(self.weighting) and self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; choose one of {WEIGHTINGS} or a callable")
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time sampler {self.time_sampler!r}; choose one of {TIME_SAMPLERS}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if self.label_dropout > 0 and self.null_label is None:
            raise ValueError("label_dropout > 0 needs null_label (the null class id, e.g. num_classes)")

    def settings(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "schedule"}
        if callable(out["weighting"]):
            out["weighting"] = getattr(out["weighting"], "__name__", "callable")
        return {"schedule": self.schedule.settings(), **out}

    def draw(self, x0, generator=None):
        """(t, eps) for a batch of data x0, from ``generator``: t in float64 on x0's device, eps like x0."""
        t = sample_t(x0.shape[0], self.schedule, self.time_sampler, generator=generator, dtype=torch.float64,
                     device=x0.device, P_mean=self.P_mean, P_std=self.P_std)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return t, eps

    def per_sample(self, net, x0, y=None, *, t=None, eps=None, generator=None, autocast_dtype=None):
        """The (batch,) weighted losses; t and eps are drawn from ``generator`` unless given."""
        if (t is None) != (eps is None):
            raise ValueError("give both t and eps, or neither")
        if t is None:
            t, eps = self.draw(x0, generator)
        t = as_tensor(t, like=x0).to(x0.dtype)
        if t.ndim == 0:
            t = t.expand(x0.shape[0])
        sch = self.schedule
        x = bcast(sch.alpha(t), x0) * x0 + bcast(sch.sigma(t), x0) * eps
        if y is not None and self.label_dropout > 0:
            drop = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=torch.float64) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        F, _ = apply_net(net, sch, self.prediction, x, t, y, self.sigma_data, autocast_dtype)
        target = prediction_target(self.prediction, x0, eps, x, sch, t, self.sigma_data).to(F.dtype)
        w = loss_weight(self.weighting, sch, t, self.sigma_data).to(F.dtype)
        return weighted_loss(F, target, w)

    def __call__(self, net, x0, y=None, **kw):
        """The mean loss over the batch (a scalar tensor with the graph)."""
        return self.per_sample(net, x0, y, **kw).mean()


# ------------------------------------------------------------------------------------------------
# a trained network as a field

class LearnedModel:
    """model(x, t, y=None) -> the network's prediction (``field_prediction``: the net's kind, or x0 for ``edm``).

    Evaluated in eval mode (no label dropout; the net's mode is restored afterwards) and without an autograd graph
    unless gradients are enabled and x requires grad (so divergences by autograd, e.g. for likelihoods, still work). x is cast to the network's dtype and the output back to x's.
    ``labels`` (int, (batch,) tensor or None) is used when ``y`` is not given."""

    def __init__(self, net: nn.Module, schedule: Schedule, prediction: str = "eps", sigma_data: float = 1.0,
                 labels=None, autocast_dtype=None):
        _check_prediction(prediction, schedule)
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.sigma_data = _check_sigma_data(sigma_data)
        self.labels = labels
        self.autocast_dtype = autocast_dtype

    @property
    def field_prediction(self) -> str:
        return "x0" if self.prediction == "edm" else self.prediction

    @property
    def num_classes(self) -> int:
        return int(getattr(self.net, "num_classes", 0) or 0)

    def with_labels(self, labels) -> "LearnedModel":
        """A copy bound to other labels (the network is shared)."""
        new = copy.copy(self)
        new.labels = labels
        return new

    def __repr__(self):
        return f"LearnedModel({type(self.net).__name__}, {self.prediction}, labels={self.labels!r})"

    def __call__(self, x, t, y=None):
        y = self.labels if y is None else y
        if self.num_classes and y is not None:
            yl = _labels_for(y, x.shape[0], x.device)
            if ((yl < 0) | (yl > self.num_classes)).any():
                bad = int(yl[(yl < 0) | (yl > self.num_classes)][0])
                raise ValueError(f"class label {bad} is outside [0, {self.num_classes}] "
                                 f"({self.num_classes} = the null class)")
        dev = next(iter(self.net.parameters())).device if any(True for _ in self.net.parameters()) else x.device
        xd = x.to(dev)
        grad = torch.is_grad_enabled() and x.requires_grad
        was_training = self.net.training
        self.net.eval()  # a field is evaluated, never trained: no label dropout (or other train-mode noise) here
        try:
            with torch.set_grad_enabled(grad):
                _, pred = apply_net(self.net, self.schedule, self.prediction, xd, as_tensor(t, like=xd), y,
                                    self.sigma_data, self.autocast_dtype)
        finally:
            self.net.train(was_training)
        return pred.to(device=x.device, dtype=x.dtype)


def learned_field(net: nn.Module, schedule: Schedule, prediction: str = "eps", *, sigma_data: float = 1.0,
                  labels=None, autocast_dtype=None, check_finite: bool = True) -> VelocityField:
    r"""The VelocityField of a trained network: the same wrapper as the exact targets (field.py), so every sampler,
    Langevin and the Fokker-Planck solver accept it. ``labels`` binds class labels (see ``LearnedModel``); the
    data shape is the network's ``data_shape`` when it has one."""
    model = LearnedModel(net, schedule, prediction, sigma_data, labels, autocast_dtype)
    shape = getattr(net, "data_shape", None)
    return VelocityField(schedule, model, model.field_prediction, data_shape=tuple(shape) if shape else None,
                         check_finite=check_finite)


# ------------------------------------------------------------------------------------------------
# EMA, data, RNG

class EMA:
    r"""Exponential moving average of a network's parameters, theta_ema <- beta theta_ema + (1 - beta) theta
    (buffers copied), with beta_n = min(decay, (1 + n)/(10 + n)) when ``warmup`` (n = updates so far), which lets
    short runs forget the initialisation. ``module`` is the averaged copy (eval mode, no grad)."""

    def __init__(self, net: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.module = copy.deepcopy(net).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, net: nn.Module) -> None:
        beta = self.current_decay()
        for e, p in zip(self.module.parameters(), net.parameters()):
            e.lerp_(p.detach(), 1.0 - beta)
        for e, b in zip(self.module.buffers(), net.buffers()):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, sd: dict) -> None:
        self.module.load_state_dict(sd["module"])
        self.updates, self.decay, self.warmup = int(sd["updates"]), float(sd["decay"]), bool(sd["warmup"])


class TensorLoader:
    r"""Shuffled mini-batches of a fixed data set, epoch after epoch, with a resumable position.

    Epoch e's order is randperm(N) from a generator seeded with (seed, e), the same on every process; the global
    batch of ``batch_size`` rows perm[pos : pos + batch_size] is split into ``world_size`` contiguous shards and
    process ``rank`` gets its own (batch_size must be divisible by world_size). An incomplete last batch of an
    epoch is dropped. State = (epoch, pos): two integers."""

    def __init__(self, data: torch.Tensor, labels: torch.Tensor | None = None, batch_size: int = 256, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device=None):
        if labels is not None and labels.shape[0] != data.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows, data has {data.shape[0]}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        if batch_size > data.shape[0]:
            raise ValueError(f"batch_size {batch_size} exceeds the data set size {data.shape[0]}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.data, self.labels = data, labels
        self.batch_size, self.seed, self.rank, self.world_size = int(batch_size), int(seed), rank, world_size
        self.device = device
        self.epoch, self.pos = 0, 0
        self._perm, self._perm_epoch = None, -1

    def __len__(self) -> int:
        return self.data.shape[0] // self.batch_size

    def _permutation(self):
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.data.shape[0], generator=g), self.epoch
        return self._perm

    def next(self):
        """(x, y) of this process's shard of the next global batch (y None without labels)."""
        if self.pos + self.batch_size > self.data.shape[0]:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = self._permutation()
        b = self.batch_size // self.world_size
        idx = perm[self.pos + self.rank * b: self.pos + (self.rank + 1) * b]
        self.pos += self.batch_size
        x = self.data[idx]
        y = self.labels[idx] if self.labels is not None else None
        if self.device is not None:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True) if y is not None else None
        return x, y

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "batch_size": self.batch_size,
                "n": int(self.data.shape[0])}

    def load_state_dict(self, sd: dict) -> None:
        if int(sd["n"]) != self.data.shape[0] or int(sd["batch_size"]) != self.batch_size:
            raise ValueError(f"loader state is for {sd['n']} rows in batches of {sd['batch_size']}, this loader has "
                             f"{self.data.shape[0]} rows in batches of {self.batch_size}")
        self.epoch, self.pos, self.seed = int(sd["epoch"]), int(sd["pos"]), int(sd["seed"])


def rng_state() -> dict:
    """The global torch, CUDA, numpy and python RNG states, as tensors and ints only (weights_only-loadable)."""
    np_state = np.random.get_state()
    py_version, py_key, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"kind": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "key": torch.tensor(py_key, dtype=torch.int64),
                   "gauss": py_gauss if py_gauss is None else float(py_gauss)},
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["key"].tolist()), p["gauss"]))


# ------------------------------------------------------------------------------------------------
# distributed

def init_distributed(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment); returns (rank, world_size, device). Without those variables: (0, 1, cuda or cpu), no group.
    Backend: nccl on CUDA, gloo otherwise."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return dist.get_rank(), dist.get_world_size(), device


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_ddp(net: nn.Module, device=None) -> nn.Module:
    """DistributedDataParallel(net) when a process group of size > 1 exists, else net. DDP broadcasts rank 0's
    parameters at construction and all-reduces (averages) gradients in backward."""
    rank, world = _world()
    if world <= 1:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = torch.device(device) if device is not None else next(net.parameters()).device
    return DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)


# ------------------------------------------------------------------------------------------------
# the loop

class Trainer:
    r"""AdamW on ``objective`` over ``loader`` with an EMA of the weights (the DiT recipe: AdamW, constant lr,
    no weight decay, EMA; Peebles & Xie 2023), an optional linear warm-up of ``warmup`` steps and gradient-norm
    clipping. The objective's (t, eps) come from the trainer's own generator (seeded ``seed`` + rank), the data
    order from the loader; the global RNGs (used e.g. by a network's label dropout) are checkpointed too.

    ``run(steps)`` trains until ``self.step == steps``; ``callback(record)`` receives a dict every ``log_every``
    steps and at the end (step, loss = mean since the previous record, lr, samples_per_s, seconds; records on the
    log grid are kept in ``history``) and ``on_checkpoint(trainer)`` is called every ``ckpt_every``
    steps and at the end (on rank 0 only). Nothing is printed or written here."""

    def __init__(self, net: nn.Module, objective: Objective, loader: TensorLoader, *, lr: float = 1e-3,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), warmup: int = 0, ema_decay: float = 0.999,
                 ema_warmup: bool = True, grad_clip: float | None = None, seed: int = 0, autocast_dtype=None,
                 meta: dict | None = None):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {grad_clip}")
        self.net = net
        self.rank, self.world_size = _world()
        self.model = wrap_ddp(net)
        self.objective, self.loader = objective, loader
        self.base_lr, self.warmup, self.grad_clip = float(lr), int(warmup), grad_clip
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=tuple(betas), weight_decay=weight_decay)
        self.ema = EMA(net, ema_decay, ema_warmup)
        self.device = next(net.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed) + 1_000_003 * self.rank)
        self.autocast_dtype = autocast_dtype
        self.step = 0
        self.history: list[dict] = []
        self.meta = dict(meta or {})
        self._acc, self._acc_n = None, 0  # loss sum and count since the last log record (checkpointed)
        self._rank_rng = None  # (step, every rank's RNG state) gathered on rank 0 at the last checkpoint point

    def lr_at(self, step: int) -> float:
        return self.base_lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.base_lr

    def train_step(self) -> torch.Tensor:
        """One optimiser step; returns the (detached) batch loss."""
        self.net.train()
        x0, y = self.loader.next()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        loss = self.objective(self.model, x0, y, generator=self.generator, autocast_dtype=self.autocast_dtype)
        if self.device.type == "cpu" and not torch.isfinite(loss):  # on GPU checked at log time (no sync per step)
            raise FloatingPointError(f"training loss is {float(loss)} at step {self.step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.opt.step()
        self.ema.update(self.net)
        self.step += 1
        return loss.detach()

    def run(self, steps: int, *, callback: Callable[[dict], None] | None = None, log_every: int = 100,
            ckpt_every: int = 0, on_checkpoint: Callable[["Trainer"], None] | None = None,
            progress: bool = False) -> list[dict]:
        """Train until ``self.step == steps`` (a no-op if already there); returns the log records of this call."""
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        main = self.rank == 0
        bar = None
        if progress and main and steps > self.step:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, initial=self.step, desc="training", leave=False)
        records, n_run = [], 0
        t_last = t_start = time.perf_counter()
        while self.step < steps:
            loss = self.train_step()
            self._acc = loss if self._acc is None else self._acc + loss
            self._acc_n += 1
            n_run += 1
            if bar is not None:
                bar.update(1)
            on_grid = self.step % log_every == 0
            if on_grid or self.step == steps:
                # a record on the log grid enters the history; the end of a run off the grid is only reported (its
                # partial sums stay in the checkpoint), so an interrupted run logs exactly what one run would
                now = time.perf_counter()
                samples = n_run * self.loader.batch_size
                if not math.isfinite(float(self._acc)):
                    raise FloatingPointError(f"training loss is {float(self._acc)} in the steps up to {self.step}")
                rec = {"step": self.step, "loss": float(self._acc) / self._acc_n, "lr": self.opt.param_groups[0]["lr"],
                       "samples_per_s": samples / max(now - t_last, 1e-9), "seconds": now - t_start}
                t_last, n_run = now, 0
                if on_grid:
                    self._acc, self._acc_n = None, 0
                    self.history.append(rec)
                    records.append(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}")
                if callback is not None and main:
                    callback(rec)
            if (ckpt_every and self.step % ckpt_every == 0) or self.step == steps:
                if self.world_size > 1:  # collective: every rank's RNG state to rank 0, for its state_dict
                    self._rank_rng = (self.step, self.gather_rng_states())
                if on_checkpoint is not None and main:
                    on_checkpoint(self)
        if bar is not None:
            bar.close()
        return records

    # -- checkpoints ------------------------------------------------------------------------------
    def gather_rng_states(self) -> list | None:
        """Every rank's RNG state ({"generator": the trainer's generator, "rng": ``rng_state()``}), gathered on
        rank 0 (a list indexed by rank; None on the other ranks). Collective: every rank must call it. ``run``
        calls it at each checkpoint point, before ``on_checkpoint``, when the world size is > 1."""
        mine = {"generator": self.generator.get_state(), "rng": rng_state()}
        if self.world_size <= 1:
            return [mine]
        import torch.distributed as dist

        got = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        return got

    def state_dict(self) -> dict:
        """Everything needed to continue bitwise: tensors, numbers, strings, lists and dicts only.

        "generator" and "rng" are this rank's states; under DDP, "rank_rng" adds every rank's, when they were
        gathered at this step (``run`` does so at each checkpoint point), so that each rank resumes its own
        streams of t, noise and label dropout."""
        sd = {
            "format": CHECKPOINT_FORMAT, "meta": self.meta, "step": self.step,
            "model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
            "loader": self.loader.state_dict(), "generator": self.generator.get_state(), "rng": rng_state(),
            "history": [dict(r) for r in self.history], "world_size": self.world_size,
            "log_acc": {"sum": self._acc.detach().cpu() if self._acc is not None else None, "n": self._acc_n},
        }
        if self.world_size > 1 and self._rank_rng is not None and self._rank_rng[0] == self.step:
            sd["rank_rng"] = self._rank_rng[1]
        return sd

    def _restore_rng(self, sd: dict) -> None:
        """This rank's RNG states from a checkpoint: its own entry of "rank_rng" when there is one; otherwise
        (a single-process checkpoint, one written before per-rank states were saved, or one from fewer
        processes) rank 0 takes the saved state, and any other rank fresh streams derived from it and its rank
        (the saved state alone would give every rank the same t and noise), with a warning."""
        states = sd.get("rank_rng")
        if states is not None and self.rank < len(states):
            self.generator.set_state(states[self.rank]["generator"])
            set_rng_state(states[self.rank]["rng"])
            return
        self.generator.set_state(sd["generator"])
        set_rng_state(sd["rng"])
        if self.rank == 0:
            return
        import warnings

        warnings.warn(f"the checkpoint holds no RNG state for rank {self.rank} (world size {self.world_size}); this "
                      "rank continues from fresh streams derived from rank 0's saved state", RuntimeWarning,
                      stacklevel=3)
        import hashlib

        digest = hashlib.sha256(sd["generator"].cpu().numpy().tobytes() + self.rank.to_bytes(4, "little")).digest()
        base = int.from_bytes(digest[:7], "little")
        self.generator.manual_seed(base + 1_000_003 * self.rank)
        torch.manual_seed(base + 2_000_003 * self.rank)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a diffusion_lab training checkpoint (format {sd.get('format')!r}, expected "
                             f"{CHECKPOINT_FORMAT!r})")
        self.net.load_state_dict(sd["model"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["optimizer"])
        self.loader.load_state_dict(sd["loader"])
        self._restore_rng(sd)
        self.step = int(sd["step"])
        self.history = [dict(r) for r in sd["history"]]
        self.meta = dict(sd.get("meta", {}))
        acc = sd.get("log_acc", {"sum": None, "n": 0})
        self._acc = acc["sum"].to(self.device) if acc["sum"] is not None else None
        self._acc_n = int(acc["n"])


def save_checkpoint(path: str, state: dict) -> None:
    """torch.save ``state`` (a Trainer.state_dict()) to ``path`` atomically (write to path.tmp, then rename).

    A stale path.tmp (left by a process killed mid-save) is removed before writing, and a save that fails (an
    exception or Ctrl-C during torch.save) removes its partial path.tmp, so only whole checkpoints stay behind.
    Readers (``load_checkpoint``) never touch path.tmp: a sampler may read the checkpoint while training writes."""
    tmp = f"{path}.tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load(path, weights_only=True): tensors and primitive containers only, no code from the file.

    A file torch cannot read (empty, truncated, random bytes, a pickle of other objects) or a checkpoint without
    the entries sampling needs raises ValueError naming the path and the reason; a missing file raises
    FileNotFoundError."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    import warnings

    try:
        with warnings.catch_warnings():  # torch warns about legacy (non-zip) files before failing on them
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError (zip), ...: the file is not a checkpoint
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        if "Weights only load failed" in reason:
            reason = "not a file of tensors and plain containers"
        raise ValueError(f"{path} is not a readable diffusion_lab training checkpoint "
                         f"({type(exc).__name__}{': ' + reason if reason else ''})") from None
    if not isinstance(sd, dict) or sd.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a diffusion_lab training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in ("meta", "model", "ema") if k not in sd]
    missing += [f"meta.{k}" for k in ("model", "schedule", "prediction", "sigma_data", "data_shape")
                if isinstance(sd.get("meta"), dict) and k not in sd["meta"]]
    missing += ["ema.module"] if isinstance(sd.get("ema"), dict) and "module" not in sd["ema"] else []
    if missing:
        raise ValueError(f"{path} is an incomplete diffusion_lab checkpoint: missing {', '.join(missing)}")
    return sd


def schedule_from_settings(settings: dict) -> Schedule:
    """Rebuild a schedule from ``Schedule.settings()``."""
    kw = dict(settings)
    return get_schedule(kw.pop("name"), **kw)


def build_network(meta: dict) -> nn.Module:
    """The network a checkpoint's ``meta`` describes: ``diffusion_lab.models.get_model(meta["model"],
    **meta["model_kwargs"])``."""
    from .models import get_model

    try:
        return get_model(meta["model"], **dict(meta.get("model_kwargs", {})))
    except KeyError as exc:
        raise ValueError(str(exc).strip("'\"")) from None


def field_from_checkpoint(state: dict, *, ema: bool = True, labels=None, device="cpu") -> VelocityField:
    """The learned field of a training checkpoint (``load_checkpoint``), with the EMA weights by default."""
    meta = state["meta"]
    net = build_network(meta)
    net.load_state_dict(state["ema"]["module"] if ema else state["model"])
    net = net.to(device).eval()
    return learned_field(net, schedule_from_settings(meta["schedule"]), meta["prediction"],
                         sigma_data=float(meta["sigma_data"]), labels=labels)
