"""Small tensor helpers shared by the numerical modules (no I/O, no state)."""
from __future__ import annotations

import torch


def as_tensor(t, like: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``t`` as a tensor; python numbers become float64 (or ``like``'s dtype/device)."""
    if isinstance(t, torch.Tensor):
        return t
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return torch.as_tensor(t, dtype=torch.float64)


def bcast(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or (batch,) coefficient so it broadcasts against x of shape (batch, *data)."""
    c = as_tensor(c, like=x)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x (xp increasing), linear extrapolation at the ends."""
    idx = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    f0, f1 = fp[idx - 1], fp[idx]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


def interp_slope(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Slope of the piecewise-linear interpolant of (xp, fp) at x (right-continuous at the knots)."""
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    return (fp[idx] - fp[idx - 1]) / (xp[idx] - xp[idx - 1])


def check_batch(x, what: str = "x", shape: bool = True) -> None:
    """Refuse what is not a batch of samples: a non-tensor, an integer tensor, and (``shape``) anything without a
    leading batch dimension of size >= 1 and a data dimension. ``what`` names the argument in the message."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (batch, *data_shape), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
    if shape and (x.ndim < 2 or x.shape[0] == 0):
        raise ValueError(f"{what} must have shape (batch >= 1, *data_shape), got {tuple(x.shape)}")
