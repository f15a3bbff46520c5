r"""The velocity field: the one object every view (sample paths, Langevin, Fokker-Planck) consumes.

A ``VelocityField`` couples a schedule with a model(x, t) that predicts one of eps / x0 / v / score /
velocity, and exposes:

    score      s(x,t) = grad log p_t(x) = (alpha D(x,t) - x)/sigma^2 = -eps_hat/sigma
    denoiser   D(x,t) = E[x_0 | x_t = x]
    PF-ODE     v(x,t) = f x - g^2/2 s = alpha' D + sigma' eps_hat
    SDE family dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW_bar   (gamma = 0: ODE, gamma = 1: reverse SDE)

Each method makes exactly one model evaluation, counted in ``field.nfe``.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import param
from ._tensor import as_tensor, bcast
from .schedules import Schedule

__all__ = ["VelocityField"]


class VelocityField:
    """Wrap ``model(x, t) -> prediction`` (prediction in ``param.PREDICTIONS``) under ``schedule``.

    Parameters
    ----------
    schedule : Schedule
    model : callable (x, t) -> tensor shaped like x; t is a 0-d or (batch,) tensor of x's dtype
    prediction : "eps" | "x0" | "v" | "score" | "velocity"
    data_shape : optional shape of one sample; x must then be (batch, *data_shape)
    check_finite : raise if the model returns NaN/inf (one reduction per call)
    """

    def __init__(
        self,
        schedule: Schedule,
        model: Callable,
        prediction: str = "eps",
        data_shape: tuple | None = None,
        check_finite: bool = True,
    ):
        if not isinstance(schedule, Schedule):
            raise TypeError(f"schedule must be a diffusion_lab Schedule, got {type(schedule).__name__}")
        if prediction not in param.PREDICTIONS:
            raise ValueError(f"unknown prediction type {prediction!r}; choose one of {param.PREDICTIONS}")
        if prediction == "v" and not schedule.variance_preserving:
            raise ValueError(
                f"v-prediction is defined for variance-preserving schedules only (Salimans & Ho 2022); "
                f"{schedule.name!r} has alpha^2 + sigma^2 != 1"
            )
        if not callable(model):
            raise TypeError(f"model must be callable (x, t) -> tensor, got {type(model).__name__}")
        self.schedule = schedule
        self.model = model
        self.prediction = prediction
        self.data_shape = tuple(data_shape) if data_shape is not None else None
        self.check_finite = check_finite
        self.nfe = 0

    def __repr__(self):
        return f"VelocityField({self.schedule!r}, prediction={self.prediction!r}, model={self.model!r})"

    # -- input handling ---------------------------------------------------------------------
    def _prepare(self, x, t):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (batch, *data_shape), got {type(x).__name__}")
        if x.ndim < 2:
            raise ValueError(f"x must have shape (batch, *data_shape); got shape {tuple(x.shape)}")
        if self.data_shape is not None and tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"x has data shape {tuple(x.shape[1:])}, but this field expects {self.data_shape}"
            )
        t = as_tensor(t)  # python numbers -> float64: the range check must not see float32 rounding
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
            raise ValueError(
                f"t must be a scalar or a (batch,) tensor with batch={x.shape[0]}; got shape {tuple(t.shape)}"
            )
        self.schedule.check_t(t)
        return t.to(dtype=x.dtype, device=x.device)

    def coefficients(self, t, x):
        """(alpha, sigma, alpha', sigma') at t, broadcast against x."""
        s = self.schedule
        return tuple(bcast(c, x) for c in (s.alpha(t), s.sigma(t), s.dalpha(t), s.dsigma(t)))

    def _validated(self, out, x, t, what="model output"):
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model returned {shape}, expected a tensor of x's shape {tuple(x.shape)}")
        out = out.to(x.dtype)
        if self.check_finite and not torch.isfinite(out).all():
            n_bad = int((~torch.isfinite(out)).sum())
            raise FloatingPointError(
                f"{what} has {n_bad} non-finite values (NaN/inf) at t in "
                f"[{float(t.min()):.6g}, {float(t.max()):.6g}]"
            )
        return out

    def raw(self, x, t):
        """One model evaluation (counted): the model's own prediction, with shape and finiteness checks."""
        t = self._prepare(x, t)
        out = self._validated(self.model(x, t), x, t)
        self.nfe += 1
        return out, t

    # -- predictions (one NFE each) ---------------------------------------------------------------
    def x0_eps(self, x, t):
        """(D(x,t), eps_hat(x,t)) from one model evaluation.

        A model that offers ``model.x0_eps(x, t)`` (the exact targets do) gives both directly, which avoids
        the conversion's loss of digits (e.g. eps = (x - alpha x0)/sigma cancels as sigma -> 0)."""
        pair = getattr(self.model, "x0_eps", None)
        if pair is None:
            out, t = self.raw(x, t)
            a, s, da, ds = self.coefficients(t, x)
            return param.to_x0_eps(out, self.prediction, x, a, s, da, ds)
        t = self._prepare(x, t)
        x0, eps = pair(x, t)
        self.nfe += 1
        return self._validated(x0, x, t, "model x0"), self._validated(eps, x, t, "model eps")

    def predict(self, kind, x, t):
        """The prediction of type ``kind`` (eps, x0, v, score, velocity) at (x, t)."""
        if kind == self.prediction and not hasattr(self.model, "x0_eps"):
            return self.raw(x, t)[0]
        if kind == "v" and not self.schedule.variance_preserving:
            raise ValueError(f"v-prediction is defined for variance-preserving schedules only, not {self.schedule.name!r}")
        x0, eps = self.x0_eps(x, t)
        tt = as_tensor(t, like=x)
        a, s, da, ds = self.coefficients(tt, x)
        return param.from_x0_eps(kind, x0, eps, a, s, da, ds)

    def denoiser(self, x, t):
        """D(x, t) = E[x_0 | x_t = x]."""
        return self.predict("x0", x, t)

    def eps(self, x, t):
        """eps_hat(x, t) = (x - alpha D)/sigma."""
        return self.predict("eps", x, t)

    def score(self, x, t):
        """s(x, t) = -eps_hat / sigma."""
        return self.predict("score", x, t)

    def velocity(self, x, t):
        """PF-ODE velocity v = alpha' D + sigma' eps_hat = f x - g^2 s / 2 (Song et al. 2021, eq. 13)."""
        return self.predict("velocity", x, t)

    def sde_drift(self, x, t, gamma=1.0):
        """Drift of the marginal-preserving family, f x - (1+gamma^2)/2 g^2 s (reverse time; Karras et al. 2022, eq. 6;
        Huang, Lim & Courville 2021). Every gamma >= 0 gives the same marginals p_t."""
        s = self.score(x, t)
        tt = as_tensor(t, like=x)
        f = bcast(self.schedule.f(tt), x)
        g2 = bcast(self.schedule.g2(tt), x)
        return f * x - 0.5 * (1.0 + gamma * gamma) * g2 * s

    def sde_diffusion(self, t, gamma=1.0):
        """Diffusion coefficient gamma g(t) of the marginal-preserving family (no model call)."""
        return gamma * torch.sqrt(self.schedule.g2(as_tensor(t)))
