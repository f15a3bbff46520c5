r"""Diffusion Transformer (DiT) with adaLN-Zero blocks, as facebookresearch/DiT ``models.py`` builds it.

Peebles & Xie 2023, "Scalable Diffusion Models with Transformers" (arXiv 2212.09748), Sec. 3 and Fig. 3::

    tokens   z_0 = PatchEmbed(x) + E_pos                      x: (N, C, H, W) -> (N, T, d), T = HW/p^2
    cond     c   = TimestepEmbedder(c_noise) + LabelEmbedder(y)                   (N, d)
    block    (b1, s1, a1, b2, s2, a2) = Linear(SiLU(c)), 6 chunks of d            (adaLN-Zero, zero-initialised)
             z <- z + a1 * Attn(LN(z) (1 + s1) + b1)
             z <- z + a2 * MLP (LN(z) (1 + s2) + b2)
    final    (b, s) = Linear(SiLU(c));  out = Linear(LN(z) (1 + s) + b)  -> unpatchify -> (N, out_channels, H, W)

LN has no affine parameters (eps 1e-6), attention is multi-head with qkv bias through
``torch.nn.functional.scaled_dot_product_attention``, the MLP is d -> 4d -> d with tanh-GELU. Every Linear is
xavier-uniform with zero bias; the last layer of each block's modulation, the final modulation and the final Linear
are zero, so at init every block is exactly the identity and the network output is exactly 0 (Peebles & Xie 2023,
Sec. 3.2).

Differences from the reference code: no ``learn_sigma`` (``out_channels`` is free; the paper's 8 = eps + variance
channels on 4-channel latents), the time input is the real noise-level feature ``c_noise`` (see
``embeddings.DEFAULT_TIME_SCALE``; ``time_scale=1`` feeds DDPM step indices as the reference code does, which is
how checkpoints converted by ``models.convert`` are configured), the fixed position embedding is a buffer rather than a frozen Parameter
(``count_parameters`` counts it as DiT's ``parameters()`` does), ``num_classes = 0`` builds an unconditional model, the
grid may be rectangular, and CFG is not in the model (a generic guidance wrapper does it on all channels).

Design space (paper Fig. 3 / Table 1), config fields ``conditioning``, ``norm`` and ``norm_placement``::

    adaLN-Zero (default)  as above: 6d modulation per block, gates a zero-initialised, final adaLN (2d)
    adaLN                 (b1, s1, b2, s2) = Linear(SiLU(c)) (4d outputs), no gates: z <- z + Attn(LN(z)(1+s1)+b1);
                          the modulation keeps the default xavier init (only the final Linear is zero)
    in-context            t_emb and y_emb appended as extra tokens [t, y, patches] (no position embedding, like
                          ViT's cls token), plain ViT blocks z <- z + Attn(LN z), z <- z + MLP(LN z) with affine
                          norms; the condition tokens are dropped after the last block; final layer LN + Linear
                          (no modulation)
    cross-attention       plain ViT blocks with an extra multi-head cross-attention between self-attention and MLP,
                          z <- z + XAttn(LN z, [t_emb, y_emb]) (queries from the T image tokens, keys/values from the
                          length-2 condition sequence); affine norms; final layer LN + Linear (no modulation)
    norm                  "layernorm" (nn.LayerNorm) or "rmsnorm" (norms.RMSNorm), same eps and affine setting
    norm_placement        "pre": z <- z + F(Norm z) (as above); "post" (Vaswani et al. 2017): z <- Norm(z + F(z)),
                          with adaLN modulation applied to the un-normalised z, F(z) = a Attn(z (1 + s) + b)

Every variant keeps the zero-initialised final Linear, so the output is 0 at init; only adaLN-Zero + pre makes every
block the identity. Parameter counts and MACs of each variant: ``flops.dit_param_formula`` / ``flops.dit_flops``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .embeddings import DEFAULT_TIME_SCALE, LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d
from .norms import make_norm

__all__ = [
    "CONDITIONINGS", "NORM_TYPES", "NORM_PLACEMENTS", "IMPLEMENTED",
    "DiTConfig", "DIT_CONFIGS", "get_config", "available_configs", "build_model",
    "DiT", "DiTBlock", "FinalLayer", "Attention", "modulate", "patchify", "unpatchify",
    "autocast_context", "set_tf32", "tf32", "compile_model",
]

CONDITIONINGS = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")  # paper Fig. 3 / Table 1
NORM_TYPES = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post")
IMPLEMENTED = {"conditioning": CONDITIONINGS, "norm": NORM_TYPES, "norm_placement": NORM_PLACEMENTS}
MODULATION_CHUNKS = {"adaLN-Zero": 6, "adaLN": 4, "cross-attention": 0, "in-context": 0}  # per-block d-outputs
AUTOCAST_DTYPES = {None: None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                   "fp16": torch.float16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# configs

@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a DiT (Peebles & Xie 2023, Table 1) plus runtime switches that do not change the weights."""

    input_size: int | tuple[int, int] = 32   # H = W (int) or (H, W); latent side for the paper's models
    patch_size: int = 2                      # p; T = HW / p^2 tokens
    in_channels: int = 4                     # C
    out_channels: int | None = None          # None -> in_channels; the paper's learn_sigma models have 2C = 8
    hidden_size: int = 1152                  # d
    depth: int = 28                          # number of DiT blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000                  # 0 -> unconditional (no label embedder)
    class_dropout_prob: float = 0.1          # CFG label dropout; > 0 adds the null class (row num_classes)
    conditioning: str = "adaLN-Zero"         # one of CONDITIONINGS
    norm: str = "layernorm"                  # one of NORM_TYPES
    norm_placement: str = "pre"              # one of NORM_PLACEMENTS
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    frequency_embedding_size: int = 256      # sinusoidal features fed to the timestep MLP
    time_scale: float = DEFAULT_TIME_SCALE   # c_noise multiplier before the frequencies
    frequency_shift: float = 0.0             # omega_i = 10000^(-i/(half - shift)); diffusers' DiT port: 1
    mlp_norm_eps: float | None = None        # eps of the norm before the MLP; None -> norm_eps (diffusers' DiT: 1e-5)
    grad_checkpointing: bool = False         # runtime: torch.utils.checkpoint around each block
    autocast: str | None = None              # runtime: None, "bf16" or "fp16" autocast inside forward

    def __post_init__(self):
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if isinstance(self.input_size, (list, tuple)):
            object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        h, w = self.image_size
        p = self.patch_size
        if p < 1 or h % p or w % p:
            raise ValueError(f"input size {(h, w)} is not divisible by patch size {p}")
        for name in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size must be divisible by 4 (2-D sin-cos embedding), got {self.hidden_size}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        for field, allowed in (("conditioning", CONDITIONINGS), ("norm", NORM_TYPES),
                               ("norm_placement", NORM_PLACEMENTS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {value!r}")
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {list(AUTOCAST_DTYPES)}, got {self.autocast!r}")

    @property
    def image_size(self) -> tuple[int, int]:
        s = self.input_size
        return (s, s) if isinstance(s, int) else s

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.image_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        """T = HW / p^2."""
        gh, gw = self.grid_size
        return gh * gw

    @property
    def data_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_cond_tokens(self) -> int:
        """Length of the condition sequence [t_emb, y_emb] (1 if unconditional) for in-context / cross-attention."""
        return 1 + int(self.num_classes > 0)

    @property
    def norm_affine(self) -> bool:
        """Norms carry affine parameters in the variants without adaLN (plain ViT blocks)."""
        return MODULATION_CHUNKS[self.conditioning] == 0

    def replace(self, **overrides) -> "DiTConfig":
        return dataclasses.replace(self, **overrides)

    def check_implemented(self) -> None:
        for field, ok in IMPLEMENTED.items():
            if getattr(self, field) not in ok:
                raise NotImplementedError(
                    f"{field}={getattr(self, field)!r} is part of the DiT design space (Peebles & Xie "
                    f"2023, Fig. 3) but not implemented yet; implemented: {ok}")


_PAPER_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

DIT_CONFIGS: dict[str, DiTConfig] = {
    f"DiT-{size}/{p}": DiTConfig(input_size=32, patch_size=p, in_channels=4, hidden_size=d, depth=depth,
                                 num_heads=heads, num_classes=1000)
    for size, (depth, d, heads) in _PAPER_SIZES.items() for p in (2, 4, 8)
}
DIT_CONFIGS.update({
    # CPU configs for sklearn's 8x8 digits (1 channel, 10 classes): p=2 gives 16 tokens
    "DiT-tiny/2": DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                            num_classes=10),
    "DiT-tiny/4": DiTConfig(input_size=8, patch_size=4, in_channels=1, hidden_size=128, depth=4, num_heads=4,
                            num_classes=10),
    "DiT-small-digits/2": DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=256, depth=6,
                                    num_heads=8, num_classes=10),
    # for tests: a few thousand parameters per block
    "DiT-micro/2": DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                             num_classes=10, frequency_embedding_size=32),
})


def available_configs() -> list[str]:
    """Names accepted by ``get_config``: the paper's DiT-{S,B,L,XL}/{2,4,8} (32x32x4 latents, 1000 classes) and
    small CPU configs."""
    return list(DIT_CONFIGS)


def get_config(name: str, **overrides) -> DiTConfig:
    """The named config with fields replaced by ``overrides`` (e.g. ``get_config("DiT-XL/2", out_channels=8)``)."""
    if name not in DIT_CONFIGS:
        raise KeyError(f"unknown DiT config {name!r}; available: {available_configs()}")
    return DIT_CONFIGS[name].replace(**overrides) if overrides else DIT_CONFIGS[name]


def build_model(config: DiTConfig) -> "DiT":
    """A freshly initialised DiT for ``config``."""
    return DiT(config)


# ---------------------------------------------------------------------------------------------
# patchify

def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, T, p*p*C) tokens, T = (H/p)(W/p) in row-major grid order, each token laid out (p, q, c)
    (the layout DiT's final Linear emits and ``unpatchify`` reads)."""
    n, c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"input size {(h, w)} is not divisible by patch size {p}")
    x = x.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, grid_size: tuple[int, int], channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, gh*p, gw*p): DiT's ``reshape(N,h,w,p,p,c)``, ``einsum('nhwpqc->nchpwq')``."""
    n, t, k = tokens.shape
    gh, gw = grid_size
    if t != gh * gw or k != p * p * channels:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match grid {grid_size}, patch {p}, "
                         f"{channels} channels (expected (N, {gh * gw}, {p * p * channels}))")
    x = tokens.reshape(n, gh, gw, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, channels, gh * p, gw * p)


# ---------------------------------------------------------------------------------------------
# layers

def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (1 + scale) + shift, with (N, d) shift/scale broadcast over the T tokens of x (N, T, d)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _Heads(nn.Module):
    """Shared head bookkeeping of the attention modules: d = h * d_h, and the output projection of the merged heads."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(N, h, T, d_h) attention output -> proj of the concatenated heads, (N, T, d)."""
        n, _, t, _ = x.shape
        return self.proj(x.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))


class Attention(_Heads):
    """Multi-head self-attention softmax(Q K^T / sqrt(d_h)) V (Vaswani et al. 2017) through
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU). No mask, no position term:
    permutation-equivariant in the tokens: Attn(P X) = P Attn(X) for every permutation P."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__(dim, num_heads)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, N, h, T, dh)
        q, k, v = qkv.unbind(0)
        return self._merge(F.scaled_dot_product_attention(q, k, v))


class CrossAttention(_Heads):
    """Multi-head cross-attention softmax(Q K^T / sqrt(d_h)) V with Q = x W_q (N, T, d) and K, V from a context
    sequence (N, S, d) (the DiT paper's cross-attention block, S = 2 condition tokens)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__(dim, num_heads)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        s = ctx.shape[1]
        q = self.q(x).reshape(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, h, T, dh)
        kv = self.kv(ctx).reshape(n, s, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, N, h, S, dh)
        k, v = kv.unbind(0)
        return self._merge(F.scaled_dot_product_attention(q, k, v))


class Mlp(nn.Module):
    """Linear(d, h) -> GELU(tanh) -> Linear(h, d) (timm ``Mlp`` as DiT uses it)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """DiT transformer block (Peebles & Xie 2023, Fig. 3); the default adaLN-Zero, pre-norm block is

        z <- z + a1 * Attn(modulate(LN z, b1, s1)),   z <- z + a2 * MLP(modulate(LN z, b2, s2)),
        (b1, s1, a1, b2, s2, a2) = Linear(SiLU(c)).

    ``config.conditioning`` / ``norm`` / ``norm_placement`` select the variants of the module docstring. The second
    argument of ``forward`` is c (N, d) for the adaLN variants, the condition sequence (N, S, d) for
    cross-attention, and ignored (None) for in-context, whose condition tokens are part of z.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        d = config.hidden_size
        self.conditioning = config.conditioning
        self.post_norm = config.norm_placement == "post"
        affine = config.norm_affine
        self.norm1 = make_norm(config.norm, d, eps=config.norm_eps, elementwise_affine=affine)
        self.attn = Attention(d, config.num_heads, qkv_bias=config.qkv_bias)
        eps2 = config.norm_eps if config.mlp_norm_eps is None else config.mlp_norm_eps
        self.norm2 = make_norm(config.norm, d, eps=eps2, elementwise_affine=affine)
        self.mlp = Mlp(d, config.mlp_hidden)
        if self.conditioning == "cross-attention":
            self.norm_cross = make_norm(config.norm, d, eps=config.norm_eps, elementwise_affine=affine)
            self.cross_attn = CrossAttention(d, config.num_heads, qkv_bias=config.qkv_bias)
        chunks = MODULATION_CHUNKS[self.conditioning]
        if chunks:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, chunks * d, bias=True))

    def _residual(self, x: torch.Tensor, norm: nn.Module, branch) -> torch.Tensor:
        """Pre-norm x + branch(Norm x), or post-norm Norm(x + branch(x))."""
        if self.post_norm:
            return norm(x + branch(x))
        return x + branch(norm(x))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.conditioning == "adaLN-Zero":
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            if not self.post_norm:  # the reference code, verbatim
                x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
                x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
                return x
            x = self._residual(x, self.norm1,
                               lambda h: gate_msa.unsqueeze(1) * self.attn(modulate(h, shift_msa, scale_msa)))
            return self._residual(x, self.norm2,
                                  lambda h: gate_mlp.unsqueeze(1) * self.mlp(modulate(h, shift_mlp, scale_mlp)))
        if self.conditioning == "adaLN":
            shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            x = self._residual(x, self.norm1, lambda h: self.attn(modulate(h, shift_msa, scale_msa)))
            return self._residual(x, self.norm2, lambda h: self.mlp(modulate(h, shift_mlp, scale_mlp)))
        x = self._residual(x, self.norm1, self.attn)
        if self.conditioning == "cross-attention":
            x = self._residual(x, self.norm_cross, lambda h: self.cross_attn(h, c))
        return self._residual(x, self.norm2, self.mlp)


class FinalLayer(nn.Module):
    """out = Linear(modulate(LN z, b, s)), (b, s) = Linear(SiLU(c)): (N, T, d) -> (N, T, p*p*out_channels).
    For in-context and cross-attention conditioning (no adaLN anywhere): out = Linear(LN z), LN affine."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.norm_final = make_norm(config.norm, d, eps=config.norm_eps, elementwise_affine=config.norm_affine)
        self.linear = nn.Linear(d, p * p * config.out_channels, bias=True)
        self.modulated = not config.norm_affine
        if self.modulated:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if not self.modulated:
            return self.linear(self.norm_final(x))
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------------------------
# the model

def _integer_labels(y: torch.Tensor) -> torch.Tensor:
    """Class labels as int64. Integer tensors pass unchanged in value; floating tensors are accepted only where every
    entry is an integer (e.g. 3.0, as a float64 pipeline may carry them) and refused otherwise, since ``long()`` would
    truncate 2.7 to class 2 silently; booleans and complex tensors are refused."""
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"labels y must be an integer tensor, got dtype {y.dtype}")
    if y.is_floating_point():
        bad = ~(torch.isfinite(y) & (y == torch.round(y)))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels y must be integer class ids, got {float(y[i]):.8g} at index {i} "
                             f"({int(bad.sum())} non-integer of {y.numel()}; dtype {y.dtype})")
    return y.long()


class DiT(nn.Module):
    """DiT backbone: ``forward(x, c_noise, y=None) -> (N, out_channels, H, W)``.

    Attributes used by the training code: ``data_shape`` = (C, H, W) of one sample, ``num_classes`` (0 if
    unconditional), ``config``. Runtime switches (also settable after construction): ``grad_checkpointing``,
    ``autocast_dtype``.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.check_implemented()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = p
        self.num_heads = config.num_heads
        self.data_shape = config.data_shape
        self.num_classes = config.num_classes
        self.grad_checkpointing = config.grad_checkpointing
        self.autocast_dtype = AUTOCAST_DTYPES[config.autocast]

        self.x_embedder = nn.Conv2d(config.in_channels, d, kernel_size=p, stride=p, bias=True)  # timm PatchEmbed
        self.t_embedder = TimestepEmbedder(d, config.frequency_embedding_size, time_scale=config.time_scale,
                                           freq_shift=config.frequency_shift)
        self.y_embedder = (LabelEmbedder(config.num_classes, d, config.class_dropout_prob)
                           if config.num_classes > 0 else None)
        self.register_buffer("pos_embed", torch.zeros(1, config.num_patches, d), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's ``initialize_weights``: xavier-uniform Linears with zero bias, the patch-embedding conv initialised
        like a Linear, N(0, 0.02^2) embedders, fixed sin-cos position embedding, and zero adaLN-Zero modulations and
        output layer (every block the identity, output 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if not self.pos_embed.is_meta:
            pe = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size)
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(pe).to(self.pos_embed.dtype).unsqueeze(0))
        self.t_embedder.reset_parameters(0.02)
        if self.y_embedder is not None:
            self.y_embedder.reset_parameters(0.02)
        if self.config.conditioning == "adaLN-Zero":  # adaLN keeps xavier modulations: no zero gates to open
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _apply(self, fn, recurse=True):
        # the sin-cos table is a function of the config: after a meta -> real move (to_empty), refill it
        was_meta = self.pos_embed.is_meta
        out = super()._apply(fn, recurse)
        if was_meta and not self.pos_embed.is_meta:
            pe = sincos_pos_embed_2d(self.config.hidden_size, self.config.grid_size)
            with torch.no_grad():
                self.pos_embed.copy_(torch.from_numpy(pe).to(self.pos_embed.dtype).unsqueeze(0))
        return out

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*out_channels) -> (N, out_channels, H, W)."""
        return unpatchify(tokens, self.patch_size, self.config.grid_size, self.out_channels)

    def embed_condition(self, c_noise: torch.Tensor, y: torch.Tensor | None = None,
                        force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """c = TimestepEmbedder(c_noise) + LabelEmbedder(y): (N, d). ``y=None`` on a class-conditional model means
        the null class (unconditional branch of CFG)."""
        c = self.t_embedder(c_noise)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=0) but labels y were given")
            return c
        if y is None:
            if not self.y_embedder.has_null:
                raise ValueError("labels y are required: this DiT has no null class (class_dropout_prob=0)")
            y = torch.full((c_noise.shape[0],), self.y_embedder.null_id, dtype=torch.long, device=c_noise.device)
        elif y.shape != c_noise.shape:
            raise ValueError(f"labels must have shape {tuple(c_noise.shape)}, got {tuple(y.shape)}")
        else:
            y = _integer_labels(y)
        return c + self.y_embedder(y, force_drop_ids=force_drop_ids)

    def embed_condition_tokens(self, c_noise: torch.Tensor, y: torch.Tensor | None = None,
                               force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The condition sequence [t_emb, y_emb]: (N, S, d), S = 2 (1 if unconditional), for in-context and
        cross-attention conditioning; ``y=None`` means the null class as in ``embed_condition``."""
        t = self.t_embedder(c_noise)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("this DiT is unconditional (num_classes=0) but labels y were given")
            return t.unsqueeze(1)
        if y is None:
            if not self.y_embedder.has_null:
                raise ValueError("labels y are required: this DiT has no null class (class_dropout_prob=0)")
            y = torch.full((c_noise.shape[0],), self.y_embedder.null_id, dtype=torch.long, device=c_noise.device)
        elif y.shape != c_noise.shape:
            raise ValueError(f"labels must have shape {tuple(c_noise.shape)}, got {tuple(y.shape)}")
        else:
            y = _integer_labels(y)
        return torch.stack([t, self.y_embedder(y, force_drop_ids=force_drop_ids)], dim=1)

    def condition(self, c_noise: torch.Tensor, y: torch.Tensor | None = None,
                  force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """What ``forward_tokens`` takes: c (N, d) for the adaLN variants, the sequence (N, S, d) otherwise."""
        if self.config.norm_affine:
            return self.embed_condition_tokens(c_noise, y, force_drop_ids)
        return self.embed_condition(c_noise, y, force_drop_ids)

    def forward_tokens(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position embedding + blocks + final layer: (N, C, H, W), c -> (N, T, p*p*C_out), with c
        from ``condition``: (N, d) for adaLN(-Zero), the condition sequence (N, S, d) for in-context /
        cross-attention."""
        z = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, d)
        block_c = c
        n_extra = 0
        if self.config.conditioning == "in-context":
            n_extra = c.shape[1]
            z = torch.cat([c, z], dim=1)  # (N, S + T, d)
            block_c = None
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            z = checkpoint(block, z, block_c, use_reentrant=False) if use_ckpt else block(z, block_c)
        if n_extra:
            z = z[:, n_extra:]  # drop the condition tokens before the final layer
        return self.final_layer(z, c)  # (N, T, p*p*C_out)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor | None = None,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Network output for inputs x (N, C, H, W) at noise-level features c_noise (N,) or scalar, labels y (N,).

        x is cast to the parameters' dtype and the output back to x's dtype (so a float64 sampler can call a float32
        model; with autocast the output is float32 for float32 inputs).
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape (N, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        n = x.shape[0]
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(n)
        if c_noise.shape != (n,):
            raise ValueError(f"c_noise must be a scalar or have shape ({n},), got {tuple(c_noise.shape)}")
        wdtype = self.x_embedder.weight.dtype
        with autocast_context(x.device.type, self.autocast_dtype):
            c = self.condition(c_noise.to(wdtype), y, force_drop_ids)
            out = self.forward_tokens(x.to(wdtype), c)
            out = self.unpatchify(out)
        return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# speed helpers

def autocast_context(device_type: str, dtype: torch.dtype | None):
    """``torch.autocast(device_type, dtype)`` or a null context for dtype None (fp32 / fp64 eager)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def set_tf32(enabled: bool = True) -> tuple[bool, bool]:
    """Allow TF32 in CUDA matmuls and cuDNN convolutions (DiT train.py: "makes A100 training a lot faster").
    Returns the previous (matmul, cudnn) flags; a no-op for CPU computation."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return prev


@contextlib.contextmanager
def tf32(enabled: bool = True):
    """Context manager form of ``set_tf32``, restoring the previous flags."""
    prev = set_tf32(enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


def compile_model(model: nn.Module, example_inputs: tuple | None = None, fallback: bool = True, **compile_kw):
    """``torch.compile(model, **compile_kw)``.

    torch.compile is lazy; given ``example_inputs`` the compiled model is run once (no grad) so that a missing
    compiler or an unsupported op shows up here. On failure, with ``fallback=True``, a warning is issued and the
    eager model is returned; otherwise the error propagates.
    """
    try:
        compiled = torch.compile(model, **compile_kw)
        if example_inputs is not None:
            with torch.no_grad():
                compiled(*example_inputs)
        return compiled
    except Exception as exc:  # noqa: BLE001 - any backend failure falls back to eager
        if not fallback:
            raise
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {exc}); using the eager model", RuntimeWarning)
        return model
