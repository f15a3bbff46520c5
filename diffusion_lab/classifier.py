r"""Classifier guidance (Dhariwal & Nichol 2021, Sec. 4; Song et al. 2021, Sec. 5) with an exact or a learned
noisy classifier.

By Bayes, grad log p_t(x|y) = grad log p_t(x) + grad log p_t(y|x); the guided score with scale gamma is

    s_gamma(x, t) = s(x, t) + gamma grad_x log p_t(y | x),

gamma = 1 the conditional score, gamma = 0 the unconditional one. The guided object is again a VelocityField
(prediction "score"), so every sampler, Langevin and the Fokker-Planck solver take it unchanged. One call makes one
evaluation of the score model (counted in the field's ``nfe``) and one classifier gradient (counted in
``model.classifier_calls``).

- exact classifier: ``exact_classifier(target, schedule)`` for a ``ClassConditionalMixture`` (p_t(y|x) are sums of
  responsibilities);
- learned classifier: ``NoisyClassifier`` (an MLP on (x, c_noise)) trained by cross-entropy on noised samples,
  ``train_noisy_classifier``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .field import VelocityField
from .schedules import Schedule

__all__ = ["ClassifierGuidedModel", "classifier_guidance", "exact_classifier", "NoisyClassifier",
           "train_noisy_classifier"]


def exact_classifier(target, schedule: Schedule) -> Callable:
    """log p_t(y|x) of an exact class-conditional mixture: (x, t) -> (batch, n_classes)."""
    return lambda x, t: target.class_log_posterior_t(x, t, schedule)


class ClassifierGuidedModel:
    """model(x, t) = s(x, t) + gamma grad_x log p_t(y|x) (a score prediction)."""

    def __init__(self, field: VelocityField, log_classifier: Callable, labels, gamma: float):
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"classifier guidance scale gamma must be a finite number >= 0, got {gamma!r}")
        self.field, self.log_classifier, self.labels, self.gamma = field, log_classifier, labels, float(gamma)
        self.classifier_calls = 0

    def __repr__(self):
        return f"ClassifierGuidedModel(gamma={self.gamma:g}, labels={self.labels!r})"

    def __call__(self, x, t):
        s = self.field.score(x, t)
        if self.gamma == 0:
            return s
        n = x.shape[0]
        y = torch.as_tensor(self.labels, dtype=torch.long).expand(n) if torch.as_tensor(self.labels).ndim == 0 \
            else torch.as_tensor(self.labels, dtype=torch.long)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            logp = self.log_classifier(xr, t)
            if logp.ndim != 2 or logp.shape[0] != n:
                raise ValueError(f"log_classifier must return (batch, n_classes), got {tuple(logp.shape)}")
            sel = logp.gather(1, y[:, None]).sum()
            (grad,) = torch.autograd.grad(sel, xr)
        self.classifier_calls += 1
        return s + self.gamma * grad.to(x.dtype)


def classifier_guidance(field: VelocityField, log_classifier: Callable, labels, gamma: float = 1.0) -> VelocityField:
    """The classifier-guided field s + gamma grad log p_t(y|x) of ``field`` (module docstring)."""
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField, got {type(field).__name__}")
    model = ClassifierGuidedModel(field, log_classifier, labels, gamma)
    guided = VelocityField(field.schedule, model, "score", field.data_shape, field.check_finite)
    return guided


class NoisyClassifier(nn.Module):
    """p_theta(y | x_t, t): an MLP on [x, sin/cos features of c_noise = -lambda(t)/4], returning log-probabilities."""

    def __init__(self, dim: int, n_classes: int, schedule: Schedule, hidden: int = 128, depth: int = 3,
                 n_freq: int = 8):
        super().__init__()
        self.schedule, self.n_classes, self.n_freq = schedule, n_classes, n_freq
        layers, width = [], dim + 2 * n_freq
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, n_classes))
        self.net = nn.Sequential(*layers)

    def features(self, t, n, dtype):
        t = torch.as_tensor(t, dtype=torch.float64)
        c = (-self.schedule.lam(t) / 4).to(dtype)
        c = c.expand(n) if c.ndim == 0 else c
        k = torch.arange(self.n_freq, dtype=dtype)
        ang = c[:, None] * (2.0 ** k) * math.pi / 4
        return torch.cat([torch.sin(ang), torch.cos(ang)], 1)

    def forward(self, x, t):
        dtype = next(self.parameters()).dtype
        h = torch.cat([x.reshape(x.shape[0], -1).to(dtype), self.features(t, x.shape[0], dtype)], 1)
        return torch.log_softmax(self.net(h), dim=1).to(x.dtype)


def train_noisy_classifier(x0: torch.Tensor, y: torch.Tensor, schedule: Schedule, *, steps: int = 2000,
                           batch: int = 512, lr: float = 3e-3, hidden: int = 128, seed: int = 0,
                           dtype=torch.float64) -> NoisyClassifier:
    """Fit p_theta(y | x_t, t) by cross-entropy on x_t = alpha x0 + sigma eps with t uniform in [t_min, t_max]."""
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = NoisyClassifier(x0[0].numel(), int(y.max()) + 1, schedule, hidden).to(dtype)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    for _ in range(steps):
        idx = torch.randint(0, x0.shape[0], (batch,), generator=g)
        t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(batch, dtype=torch.float64, generator=g)
        a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        xt = a * x0[idx].to(torch.float64) + s * torch.randn(batch, x0[0].numel(), dtype=torch.float64, generator=g)
        loss = -clf(xt.to(dtype), t).gather(1, y[idx][:, None]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()
