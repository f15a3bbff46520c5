r"""Conversions among the five prediction types of a diffusion model, for any schedule.

With x = alpha x0 + sigma eps (Tweedie / Efron 2011; Salimans & Ho 2022; Song et al. 2021):

    eps    = (x - alpha x0) / sigma                 x0 = (x - sigma eps) / alpha
    score  = -eps / sigma = (alpha x0 - x)/sigma^2   (Tweedie: x0 = (x + sigma^2 score)/alpha)
    v      = alpha eps - sigma x0                    (Salimans & Ho 2022; meaningful for VP, alpha^2+sigma^2 = 1)
    u      = alpha' x0 + sigma' eps = f x - g^2/2 score   (flow / PF-ODE velocity)

Every conversion goes through the pair (x0, eps): ``to_x0_eps`` maps a prediction to it and
``from_x0_eps`` maps it to any prediction. Coefficients are tensors already broadcast against x.
"""
from __future__ import annotations

import torch

__all__ = ["PREDICTIONS", "to_x0_eps", "from_x0_eps", "convert"]

PREDICTIONS = ("eps", "x0", "v", "score", "velocity")


def _check(kind: str) -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {kind!r}; choose one of {PREDICTIONS}")


def to_x0_eps(pred, kind, x, alpha, sigma, dalpha=None, dsigma=None):
    r"""Return (x0_hat, eps_hat) from a prediction of type ``kind`` at x.

    For ``v`` the inverse of [x; v] = [[alpha, sigma], [-sigma, alpha]] [x0; eps] is used,
    x0 = (alpha x - sigma v)/(alpha^2+sigma^2), eps = (sigma x + alpha v)/(alpha^2+sigma^2), which for VP
    reduces to Salimans & Ho's x0 = alpha x - sigma v, eps = sigma x + alpha v.
    For ``velocity`` u the 2x2 system x = alpha x0 + sigma eps, u = alpha' x0 + sigma' eps is solved with
    determinant alpha sigma' - sigma alpha' = -alpha sigma lambda' > 0.
    """
    _check(kind)
    if kind == "eps":
        return (x - sigma * pred) / alpha, pred
    if kind == "x0":
        return pred, (x - alpha * pred) / sigma
    if kind == "score":
        eps = -sigma * pred
        return (x - sigma * eps) / alpha, eps
    if kind == "v":
        r2 = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * pred) / r2, (sigma * x + alpha * pred) / r2
    if dalpha is None or dsigma is None:
        raise ValueError("velocity prediction needs the schedule derivatives dalpha and dsigma")
    det = alpha * dsigma - sigma * dalpha
    return (dsigma * x - sigma * pred) / det, (alpha * pred - dalpha * x) / det


def from_x0_eps(kind, x0, eps, alpha, sigma, dalpha=None, dsigma=None):
    """Return the prediction of type ``kind`` given (x0, eps) (the forward maps in the module docstring)."""
    _check(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "score":
        return -eps / sigma
    if kind == "v":
        return alpha * eps - sigma * x0
    if dalpha is None or dsigma is None:
        raise ValueError("velocity prediction needs the schedule derivatives dalpha and dsigma")
    return dalpha * x0 + dsigma * eps


def convert(pred, src, dst, x, alpha, sigma, dalpha=None, dsigma=None):
    """Convert a prediction of type ``src`` at x into type ``dst``."""
    if src == dst:
        _check(src)
        return pred
    x0, eps = to_x0_eps(pred, src, x, alpha, sigma, dalpha, dsigma)
    return from_x0_eps(dst, x0, eps, alpha, sigma, dalpha, dsigma)
