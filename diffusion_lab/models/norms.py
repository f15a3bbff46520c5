r"""Normalisation layers over the last (feature) dimension.

LayerNorm (Ba et al. 2016):  y = gamma * (x - mean x) / sqrt(var x + eps) + beta
RMSNorm (Zhang & Sennrich 2019):  y = g * x / sqrt(mean x^2 + eps)

Properties checked in theory_checks/dit_checks.py: with eps = 0, RMSNorm(c x) = sign(c) RMSNorm(x) and its output
has RMS 1 for g = 1; it is not shift-invariant, whereas LayerNorm is invariant to x -> c x + b 1 (c > 0).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "make_norm", "NORMS"]

NORMS = ("layernorm", "rmsnorm")


class RMSNorm(nn.Module):
    """y = g * x / sqrt(mean(x^2) + eps) over the last dimension (Zhang & Sennrich 2019, eq. 4).

    The mean square is accumulated in float32 (or the input's dtype if wider) and the result cast back, so bf16
    inputs do not lose the normaliser. ``elementwise_affine=False`` drops g (as DiT drops LayerNorm's affine).
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNorm({self.dim}) got last dimension {x.shape[-1]}")
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(acc)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


def make_norm(kind: str, dim: int, eps: float = 1e-6, elementwise_affine: bool = False) -> nn.Module:
    """The normalisation named ``kind`` ("layernorm" or "rmsnorm") over ``dim`` features."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")
