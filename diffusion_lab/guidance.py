r"""Guidance: fields built from other fields, which are again VelocityFields (so every sampler, Langevin and the
Fokker-Planck solver take them unchanged), with their model evaluations counted.

Classifier-free guidance (CFG; Ho & Salimans 2022, eq. 6). With guidance weight w (gamma = 1 + w the
"guidance scale" of DiT/diffusers, cfg-scale = gamma),

::

    eps_tilde(x, t) = (1 + w) eps(x, t | c) - w eps(x, t | null)
                    = gamma eps(x, t | c) + (1 - gamma) eps(x, t | null),
    s_tilde = grad log [ p_t(x|c)^gamma p_t(x)^(1-gamma) ].

w = 0 (gamma = 1) is the conditional field, w = -1 (gamma = 0) the unconditional one; w > 0 extrapolates away from
the unconditional model. Weights below -1 or non-finite weights are refused. Every prediction type (eps, x0, v,
score, velocity) is an affine function of eps_hat at fixed (x, t) with the same offset, and the combination's
coefficients sum to one, so CFG in any prediction space is the same field: the wrapper combines the model's own
output on all channels (unlike DiT's ``forward_with_cfg``, which guides only 3 of 4 latent channels). The tilted
law is NOT what the samplers then sample: p_t(x|c)^gamma p_t(x)^(1-gamma) is not the noised
p_0(x|c)^gamma p_0(x)^(1-gamma) (Bradley & Nakkiran 2024; Chidambaram et al. 2024).

NFE: one guided call is one batched network pass over [x; x] with labels [c; null] (or two passes with
``batched=False``) and is counted as TWO model evaluations (``GuidedField.evals_per_call = 2``).

``GuidedField`` is the general base: a VelocityField whose model call costs ``evals_per_call`` evaluations of
underlying models (classifier guidance on exact mixtures, nabla log p_t(x) + w nabla log p_t(y|x), fits the same
mould).
"""
from __future__ import annotations

import copy
import math

import torch

from .field import VelocityField

__all__ = ["GuidedField", "check_guidance_weight", "cfg_combine", "CFGModel", "bind_labels", "CFGPairModel",
           "classifier_free_guidance", "cfg_from_fields"]


class GuidedField(VelocityField):
    """A VelocityField whose model is a combination of ``evals_per_call`` model evaluations; ``nfe`` counts them
    all (a guided call adds evals_per_call to ``nfe``)."""

    def __init__(self, schedule, model, prediction="eps", data_shape=None, check_finite=True,
                 evals_per_call: int = 2, guidance: dict | None = None):
        super().__init__(schedule, model, prediction, data_shape, check_finite)
        if int(evals_per_call) != evals_per_call or evals_per_call < 1:
            raise ValueError(f"evals_per_call must be an integer >= 1, got {evals_per_call!r}")
        self.evals_per_call = int(evals_per_call)
        self.guidance = dict(guidance or {})

    def __repr__(self):
        return f"GuidedField({self.schedule!r}, {self.guidance}, model={self.model!r})"

    def raw(self, x, t):
        out = super().raw(x, t)
        self.nfe += self.evals_per_call - 1
        return out

    def x0_eps(self, x, t):
        if getattr(self.model, "x0_eps", None) is None:
            return super().x0_eps(x, t)  # through self.raw, which counts
        out = super().x0_eps(x, t)
        self.nfe += self.evals_per_call - 1
        return out


def check_guidance_weight(w) -> float:
    """w as a float; ValueError naming the value unless it is a finite number >= -1 (gamma = 1 + w >= 0)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"guidance weight w must be a finite number >= -1 (gamma = 1 + w >= 0), got {w!r}")
    if w < -1:
        raise ValueError(f"guidance weight w={w!r} is below -1 (gamma = 1 + w = {1 + w!r} < 0): that extrapolates past "
                         f"the unconditional model; use w >= -1 (w = 0: conditional, w = -1: unconditional)")
    return float(w)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, w: float) -> torch.Tensor:
    """(1 + w) cond - w uncond (Ho & Salimans 2022, eq. 6), in any prediction space (module docstring)."""
    return (1.0 + w) * cond - w * uncond


def label_tensor(y, n: int, device) -> torch.Tensor:
    """An int or a (batch,) tensor of class labels as a (n,) long tensor; ValueError on a wrong shape."""
    if isinstance(y, int):
        return torch.full((n,), y, dtype=torch.long, device=device)
    y = torch.as_tensor(y, device=device).long()
    if y.ndim == 0:
        return y.expand(n)
    if y.shape != (n,):
        raise ValueError(f"labels must be an int or a (batch,) tensor with batch={n}; got shape {tuple(y.shape)}")
    return y


def bind_labels(field: VelocityField, labels) -> VelocityField:
    """A copy of a class-conditional field bound to other class labels (an int or a (batch,) tensor), through its
    model's ``with_labels`` (``training.LearnedModel``, ``CFGModel``). The copy shares the network and counts its
    own ``nfe`` from 0; ``field`` is unchanged. TypeError for a model that cannot bind labels."""
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField, got {type(field).__name__}")
    with_labels = getattr(field.model, "with_labels", None)
    if with_labels is None:
        raise TypeError(f"the field's model {type(field.model).__name__} cannot bind class labels (no with_labels); "
                        f"build the field with training.learned_field or guidance.classifier_free_guidance")
    new = copy.copy(field)
    new.model = with_labels(labels)
    new.nfe = 0
    return new


class CFGModel:
    r"""model(x, t) = (1 + w) m(x, t, y=labels) - w m(x, t, y=null_label) for a conditional model m(x, t, y=...)
    (e.g. ``training.LearnedModel``); one batched call over [x; x] unless ``batched=False``."""

    def __init__(self, model, w: float, labels, null_label: int, batched: bool = True):
        self.model, self.w = model, check_guidance_weight(w)
        if labels is None:
            raise ValueError("classifier-free guidance needs class labels (an int or a (batch,) tensor)")
        self.labels, self.null_label, self.batched = labels, int(null_label), bool(batched)

    def __repr__(self):
        return f"CFGModel(w={self.w:g}, labels={self.labels!r}, null={self.null_label}, {self.model!r})"

    def with_labels(self, labels) -> "CFGModel":
        """The same guided model (shared network, same w) for other class labels."""
        return CFGModel(self.model, self.w, labels, self.null_label, self.batched)

    def __call__(self, x, t):
        n = x.shape[0]
        y = label_tensor(self.labels, n, x.device)
        null = torch.full((n,), self.null_label, dtype=torch.long, device=x.device)
        if self.batched:
            tt = torch.cat([t, t]) if t.ndim == 1 else t
            out = self.model(torch.cat([x, x]), tt, y=torch.cat([y, null]))
            cond, uncond = out[:n], out[n:]
        else:
            cond, uncond = self.model(x, t, y=y), self.model(x, t, y=null)
        return cfg_combine(cond, uncond, self.w)


class CFGPairModel:
    r"""CFG from two fields, a conditional p_t(x|c) and an unconditional p_t(x) one (e.g. exact mixtures):
    (x0, eps) = (1 + w) (x0, eps)_cond - w (x0, eps)_uncond, both fields evaluated once (their own ``nfe`` counts
    that too)."""

    def __init__(self, cond: VelocityField, uncond: VelocityField, w: float):
        self.cond, self.uncond, self.w = cond, uncond, check_guidance_weight(w)

    def __repr__(self):
        return f"CFGPairModel(w={self.w:g}, cond={self.cond!r}, uncond={self.uncond!r})"

    def x0_eps(self, x, t):
        x0c, ec = self.cond.x0_eps(x, t)
        x0u, eu = self.uncond.x0_eps(x, t)
        return cfg_combine(x0c, x0u, self.w), cfg_combine(ec, eu, self.w)

    def __call__(self, x, t):
        return self.x0_eps(x, t)[0]


def classifier_free_guidance(field: VelocityField, w: float, labels, null_label: int | None = None,
                             batched: bool = True) -> GuidedField:
    r"""The CFG field of a conditional field (whose model takes ``y=``, as ``training.learned_field`` builds):
    eps_tilde = (1 + w) eps(x|c) - w eps(x|null), counted as two NFE per call.

    ``labels``: an int or a (batch,) tensor of classes c; ``null_label``: the null class id (default the model's
    ``num_classes``, DiT's convention)."""
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField, got {type(field).__name__}")
    if null_label is None:
        null_label = getattr(field.model, "num_classes", 0)
        if not null_label:
            raise ValueError("the field's model is not class-conditional (num_classes = 0); CFG needs a conditional "
                             "model, or pass null_label")
    model = CFGModel(field.model, w, labels, null_label, batched)
    return GuidedField(field.schedule, model, field.prediction, field.data_shape, field.check_finite,
                       evals_per_call=2, guidance={"kind": "cfg", "w": model.w, "gamma": 1.0 + model.w})


def cfg_from_fields(cond: VelocityField, uncond: VelocityField, w: float) -> GuidedField:
    """The CFG field (1 + w) cond - w uncond of two fields on the same schedule (two NFE per call)."""
    if cond.schedule != uncond.schedule:
        raise ValueError(f"the two fields have different schedules: {cond.schedule!r} and {uncond.schedule!r}")
    model = CFGPairModel(cond, uncond, w)
    return GuidedField(cond.schedule, model, "x0", cond.data_shape, cond.check_finite, evals_per_call=2,
                       guidance={"kind": "cfg", "w": model.w, "gamma": 1.0 + model.w})
