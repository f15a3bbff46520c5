r"""Embeddings of the conditioning inputs: noise level, class label, patch position.

* ``timestep_embedding`` / ``TimestepEmbedder``: GLIDE/DiT sinusoidal features [cos | sin] of the noise-level input
  followed by Linear -> SiLU -> Linear (Peebles & Xie 2023, ``TimestepEmbedder``).
* ``LabelEmbedder``: a table of num_classes + 1 rows whose last row is the null class used by classifier-free
  guidance; labels are replaced by the null id with probability ``dropout_prob`` in training mode only (Ho & Salimans
  2022; DiT ``token_drop``).
* ``sincos_pos_embed_2d``: MAE's fixed 2-D sin-cos position embedding, computed in float64 numpy.

How the noise level enters. DiT feeds integer DDPM steps t in [0, 1000) to frequencies omega_i = 10000^(-i/half)
(i = 0..half-1), i.e. arguments t omega_i spanning ~[0, 1000] radians. This package's networks receive EDM's
``c_noise = -lambda/4`` (lambda = log(alpha/sigma); on VE/EDM c_noise = log(sigma)/4), roughly in [-3, 3]: fed in
directly, every frequency below ~0.3 would be almost constant over the whole range (degenerate features). So the
input is multiplied by ``time_scale = 1000/6`` before the frequencies, which puts c_noise's range onto DiT's t-range
(the highest frequency then turns ~170 radians per unit c_noise, the lowest is monotone across the range);
``tests/test_models.py`` checks the embeddings of distinct c_noise values are well separated.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_TIME_SCALE",
    "timestep_embedding",
    "TimestepEmbedder",
    "LabelEmbedder",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
]

DEFAULT_TIME_SCALE = 1000.0 / 6.0  # maps c_noise in [-3, 3] onto a span of 1000, DiT's integer-step range


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, time_scale: float = 1.0,
                       freq_shift: float = 0.0):
    r"""Sinusoidal features [cos(s t omega_i) | sin(s t omega_i)], omega_i = max_period^(-i/(half - shift)),
    i < half = dim//2.

    GLIDE / DiT ``TimestepEmbedder.timestep_embedding`` (t may be fractional or negative), with an input scale
    s = ``time_scale``. An odd ``dim`` gets one zero column appended, as in DiT. ``freq_shift`` = 0 is DiT's
    spacing; diffusers' DiT port uses shift 1 (its ``downscale_freq_shift``).

    Args:
        t: (B,) real tensor.
    Returns:
        (B, dim) tensor in t's floating dtype (float32 for integer t).
    """
    if t.ndim != 1:
        raise ValueError(f"t must be a (batch,) tensor, got shape {tuple(t.shape)}")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    if half - freq_shift <= 0:
        raise ValueError(f"freq_shift={freq_shift} must be below half the embedding size {half}")
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device)
                      / (half - freq_shift))
    args = (t.to(dtype)[:, None] * time_scale) * freqs.to(dtype)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Noise level c_noise (B,) -> (B, hidden): sinusoidal features of ``frequency_embedding_size`` (256 in DiT),
    then Linear -> SiLU -> Linear (Peebles & Xie 2023; weights N(0, 0.02^2) as in DiT's ``initialize_weights``)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0,
                 time_scale: float = DEFAULT_TIME_SCALE, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.max_period = max_period
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def reset_parameters(self, std: float = 0.02) -> None:
        for lin in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        t_freq = timestep_embedding(t, self.frequency_embedding_size, self.max_period, self.time_scale,
                                    self.freq_shift)
        return self.mlp(t_freq.to(w.dtype))


class LabelEmbedder(nn.Module):
    """Class labels y in {0..K-1} -> (B, hidden), with a null class (row K) for classifier-free guidance.

    In training mode each label is replaced by the null id K with probability ``dropout_prob`` (DiT ``token_drop``);
    in eval mode only where ``force_drop_ids == 1``. With ``dropout_prob = 0`` there is no null row (DiT's
    ``use_cfg_embedding``), and dropping raises.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a label embedder, got {num_classes}")
        if not 0.0 <= dropout_prob < 1.0:
            raise ValueError(f"dropout_prob must be in [0, 1), got {dropout_prob}")
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.embedding_table.weight, std=std)

    def token_drop(self, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace labels by the null id: at random with probability ``dropout_prob`` (training), or where
        ``force_drop_ids == 1``."""
        if force_drop_ids is None:
            drop = torch.rand(y.shape[0], device=y.device, generator=generator) < self.dropout_prob
        else:
            drop = torch.as_tensor(force_drop_ids, device=y.device) == 1
        return torch.where(drop, torch.full_like(y, self.null_id), y)

    def forward(self, y: torch.Tensor, train: bool | None = None, force_drop_ids: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if y.ndim != 1:
            raise ValueError(f"labels must be a (batch,) integer tensor, got shape {tuple(y.shape)}")
        train = self.training if train is None else train
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if not self.has_null:
                raise ValueError("label dropout needs a null class: build the embedder with dropout_prob > 0")
            y = self.token_drop(y, force_drop_ids, generator)
        hi = self.num_classes + int(self.has_null)
        # checked on CPU only: on GPU the min/max would synchronise, and under torch.compile break the graph
        if y.device.type == "cpu" and y.numel() and not torch.compiler.is_compiling() and (
                int(y.min()) < 0 or int(y.max()) >= hi):
            raise ValueError(f"labels must lie in [0, {hi - 1}] (null id {self.num_classes}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        return self.embedding_table(y)


def sincos_pos_embed_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin(pos omega_i) | cos(pos omega_i)], omega_i = 10000^(-2i/embed_dim), i < embed_dim/2 (MAE; float64).

    Returns (M, embed_dim) for M = pos.size positions."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.einsum("m,d->md", np.asarray(pos, dtype=np.float64).reshape(-1), omega)  # (M, D/2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of a grid_h x grid_w token grid, shape (grid_h*grid_w, embed_dim), float64.

    MAE's ``get_2d_sincos_pos_embed`` as DiT uses it: tokens in row-major order (row i, column j); the first half
    of the channels encodes the column j, the second half the row i (MAE's meshgrid puts w first), each half laid
    out [sin | cos]. Every (sin, cos) pair has unit norm, so each row has squared norm embed_dim/2.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    gh, gw = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    grid_w, grid_h = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # (gh, gw)
    emb_w = sincos_pos_embed_1d(embed_dim // 2, grid_w)
    emb_h = sincos_pos_embed_1d(embed_dim // 2, grid_h)
    return np.concatenate([emb_w, emb_h], axis=1)
