r"""A residual MLP score network for low-dimensional data (2-D toy sets, small flattened images).

    h_0 = W_in x,    c = TimestepEmbedder(c_noise) [+ LabelEmbedder(y)]
    FiLM block      h <- h + W_2 SiLU(W_1 (LN(h) (1 + s_l) + b_l)),   (b_l, s_l) = A_l SiLU(c)   (Perez et al. 2018)
    additive block  h <- h + W_2 SiLU(W_1 LN(h) + A_l SiLU(c))
    out = W_out LN(h)     (W_out zero-initialised: the output is exactly 0 at init, as in DiT)

x has shape (N, *data_shape) and is flattened to D = prod(data_shape) features; the output has x's shape.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .embeddings import DEFAULT_TIME_SCALE, LabelEmbedder, TimestepEmbedder

__all__ = ["MLPScore", "MLP_CONDITIONINGS", "MLP_TIME_EMBEDDINGS", "GaussianFourierEmbedder"]

MLP_CONDITIONINGS = ("film", "add")
MLP_TIME_EMBEDDINGS = ("sinusoidal", "fourier")


class GaussianFourierEmbedder(nn.Module):
    r"""Noise level c_noise (B,) -> (B, hidden) through random Fourier features (Tancik et al. 2020; the time
    embedding of Song et al. 2021's NCSN++):

        gamma(c) = [cos(2 pi b c), sin(2 pi b c)],   b_k ~ N(0, scale^2) fixed at init (a buffer),

    then Linear -> SiLU -> Linear as in ``TimestepEmbedder``.

    Parameters
    ----------
    hidden : int
        Output width.
    frequency_embedding_size : int
        Number of features (even): frequency_embedding_size / 2 frequencies b_k.
    scale : float
        Standard deviation of the frequencies b_k (in cycles per unit of c_noise).
    """

    def __init__(self, hidden: int, frequency_embedding_size: int = 64, scale: float = 4.0):
        super().__init__()
        if frequency_embedding_size < 2 or frequency_embedding_size % 2:
            raise ValueError(f"frequency_embedding_size must be an even integer >= 2, got {frequency_embedding_size}")
        if not scale > 0:
            raise ValueError(f"fourier scale must be > 0, got {scale}")
        g = torch.Generator().manual_seed(0)  # fixed features: the same network for the same arguments
        self.register_buffer("freqs", torch.randn(frequency_embedding_size // 2, generator=g) * float(scale))
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = 2 * math.pi * c[:, None].to(self.freqs.dtype) * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1).to(self.mlp[0].weight.dtype))


class _ResBlock(nn.Module):
    def __init__(self, width: int, conditioning: str, expansion: int):
        super().__init__()
        self.conditioning = conditioning
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, expansion * width)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(expansion * width, width)
        n_mod = 2 * width if conditioning == "film" else expansion * width
        self.cond = nn.Sequential(nn.SiLU(), nn.Linear(width, n_mod))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.conditioning == "film":
            shift, scale = self.cond(c).chunk(2, dim=-1)
            u = self.fc1(self.norm(h) * (1 + scale) + shift)
        else:
            u = self.fc1(self.norm(h)) + self.cond(c)
        return h + self.fc2(self.act(u))


class MLPScore(nn.Module):
    """Residual MLP network ``forward(x, c_noise, y=None) -> tensor shaped like x``.

    Args::

        data_shape: shape of one sample (int D for vectors), e.g. 2 for the 2-D toy sets.
        hidden: width of the residual stream.
        depth: number of residual blocks.
        num_classes: 0 for an unconditional network; K > 0 adds a label embedder with a null class (id K) when
            ``class_dropout_prob > 0`` (classifier-free guidance; ``y=None`` then means the null class).
        conditioning: "film" (scale and shift of the normalised stream) or "add" (additive bias in each block).
        expansion: inner width factor of each block.
        time_embedding: "sinusoidal" (DiT's fixed frequencies, ``time_scale``) or "fourier" (random Gaussian
            frequencies of standard deviation ``fourier_scale``; ``GaussianFourierEmbedder``).

    Attributes ``data_shape`` and ``num_classes`` are read by the training code.
    """

    def __init__(self, data_shape: int | tuple[int, ...] = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0,
                 class_dropout_prob: float = 0.1, conditioning: str = "film", expansion: int = 2,
                 frequency_embedding_size: int = 64, time_scale: float = DEFAULT_TIME_SCALE,
                 data_dim: int | None = None, time_embedding: str = "sinusoidal", fourier_scale: float = 4.0):
        super().__init__()
        if data_dim is not None:
            data_shape = data_dim
        data_shape = (int(data_shape),) if isinstance(data_shape, int) else tuple(int(s) for s in data_shape)
        if conditioning not in MLP_CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {MLP_CONDITIONINGS}, got {conditioning!r}")
        if time_embedding not in MLP_TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {MLP_TIME_EMBEDDINGS}, got {time_embedding!r}")
        if hidden < 1 or depth < 0 or expansion < 1:
            raise ValueError(f"need hidden >= 1, depth >= 0, expansion >= 1; got {hidden}, {depth}, {expansion}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.data_shape = data_shape
        self.num_classes = num_classes
        self.conditioning = conditioning
        dim = math.prod(data_shape)
        self.inp = nn.Linear(dim, hidden)
        if time_embedding == "fourier":
            self.t_embedder = GaussianFourierEmbedder(hidden, frequency_embedding_size, fourier_scale)
        else:
            self.t_embedder = TimestepEmbedder(hidden, frequency_embedding_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden, class_dropout_prob) if num_classes > 0 else None
        self.blocks = nn.ModuleList([_ResBlock(hidden, conditioning, expansion) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # a conditioned linear path g(c) * x: the LayerNorm before ``out`` bounds the rest of the output, while exact
        # predictions grow linearly in x far from the data (eps ~ x/sigma at t_max); without it eps-prediction
        # saturates in the tails and the PF-ODE throws those samples far out (measured on ring8).
        self.skip = nn.Linear(hidden, dim)
        for lin in (self.out, self.skip):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        wdtype = self.inp.weight.dtype
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(n)
        if c_noise.shape != (n,):
            raise ValueError(f"c_noise must be a scalar or have shape ({n},), got {tuple(c_noise.shape)}")
        c = self.t_embedder(c_noise.to(wdtype))
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this MLPScore is unconditional (num_classes=0) but labels y were given")
        else:
            if y is None:
                if not self.y_embedder.has_null:
                    raise ValueError("labels y are required: no null class (class_dropout_prob=0)")
                y = torch.full((n,), self.y_embedder.null_id, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y.long(), force_drop_ids=force_drop_ids)
        xf = x.reshape(n, -1).to(wdtype)
        h = self.inp(xf)
        for block in self.blocks:
            h = block(h, c)
        return (self.out(self.norm_out(h)) + self.skip(c) * xf).reshape(x.shape).to(x.dtype)
