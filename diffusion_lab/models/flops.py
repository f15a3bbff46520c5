r"""Compute and size of a DiT: multiply-accumulates in the paper's convention, and parameter counts.

The DiT paper's "Gflops" (Peebles & Xie 2023, Table 4) are multiply-accumulates (MACs) of one forward pass of one
sample; real FLOPs are 2x (torch's ``FlopCounterMode`` counts 2 per MAC). With T tokens, width d, MLP width h = r d,
patch p, C in / C' out channels and F timestep frequencies, every matmul of the forward pass costs::

    patch embedding      T p^2 C d
    timestep MLP         F d + d^2                         (per sample, not per token)
    block (x depth)      attention 4 T d^2 + 2 T^2 d       (Q, K, V, out projections; Q K^T and A V)
                         MLP 2 T d h   (= 8 T d^2 for r = 4)
                         adaLN-Zero modulation 6 d^2        (per sample)
    final layer          2 d^2 + T d p^2 C'

The label embedding is a table lookup (0 MACs); norms, softmax and activations are not multiply-accumulates.

Parameters (biases included): per block attention 4d^2 + 4d, MLP 2dh + h + d (8d^2 + 5d for r = 4), modulation
6d^2 + 6d: 18 d^2 + 15 d for r = 4. Embedders: patch p^2 C d + d, timestep F d + d + d^2 + d, labels (K+1) d (the
null class; K d without label dropout), fixed position embedding T d (counted, as DiT's ``parameters()`` counts it),
final 2d^2 + 2d + d p^2 C' + p^2 C'.
"""
from __future__ import annotations

import torch
from torch import nn

from .dit import MODULATION_CHUNKS, DiTConfig

__all__ = ["attention_macs", "dit_flops", "dit_flops_breakdown", "dit_param_formula", "count_parameters",
           "PAPER_GFLOPS", "PAPER_PARAMS_XL2", "PAPER_CONDITIONING_XL2"]

# Peebles & Xie 2023, Table 4 (Gflops = GMACs of one 256x256 image = 32x32x4 latent, learn_sigma: 8 output channels)
PAPER_GFLOPS = {
    "DiT-S/8": 0.36, "DiT-S/4": 1.41, "DiT-S/2": 6.06,
    "DiT-B/8": 1.42, "DiT-B/4": 5.56, "DiT-B/2": 23.01,
    "DiT-L/8": 5.01, "DiT-L/4": 19.70, "DiT-L/2": 80.71,
    "DiT-XL/8": 7.39, "DiT-XL/4": 29.05, "DiT-XL/2": 118.64,
}
PAPER_PARAMS_XL2 = 675_129_632  # DiT-XL/2 (out_channels 8, 1000 classes), fast-DiT's logged count
# Peebles & Xie 2023, Table/Fig. 3 conditioning ablation, DiT-XL/2: (params in M, Gflops)
PAPER_CONDITIONING_XL2 = {"in-context": (449, 119.37), "cross-attention": (598, 137.62), "adaLN": (600, 118.56),
                          "adaLN-Zero": (675, 118.64)}


def attention_macs(num_tokens: int, dim: int) -> int:
    """MACs of one multi-head self-attention layer: 4 L D^2 (Q, K, V and output projections) + 2 L^2 D (Q K^T and
    A V, summed over heads)."""
    return 4 * num_tokens * dim * dim + 2 * num_tokens * num_tokens * dim


def dit_flops_breakdown(config: DiTConfig) -> dict[str, int]:
    """Forward MACs of one sample by part (see the module docstring), for every conditioning variant.

    With S condition tokens (``config.num_cond_tokens``, 2 for a class-conditional model):
    in-context runs every block on T + S tokens and has no modulation; cross-attention adds per block
    Q and output projections on T tokens (2 T d^2), K and V on S tokens (2 S d^2) and Q K^T, A V (2 T S d), and has
    no modulation; adaLN has a 4 d^2 modulation. Only adaLN(-Zero) has the final 2 d^2 modulation.
    Norm type and placement do not change the count.
    """
    config.check_implemented()
    t, d, h, p = config.num_patches, config.hidden_size, config.mlp_hidden, config.patch_size
    cond, s = config.conditioning, config.num_cond_tokens
    tb = t + s if cond == "in-context" else t  # tokens inside the blocks
    per_block = {
        "attention": attention_macs(tb, d),
        "mlp": 2 * tb * d * h,
        "modulation": MODULATION_CHUNKS[cond] * d * d,
        "cross_attention": (2 * t * d * d + 2 * s * d * d + 2 * t * s * d) if cond == "cross-attention" else 0,
    }
    out = {
        "patch_embed": t * p * p * config.in_channels * d,
        "timestep_embed": config.frequency_embedding_size * d + d * d,
        **{f"blocks.{k}": config.depth * v for k, v in per_block.items()},
        "final_layer": (0 if config.norm_affine else 2 * d * d) + t * d * p * p * config.out_channels,
    }
    out["total"] = sum(out.values())
    return out


def dit_flops(config: DiTConfig) -> int:
    """Forward multiply-accumulates of one sample (the DiT paper's "flops"; FLOPs = 2 x this)."""
    return dit_flops_breakdown(config)["total"]


def dit_param_formula(config: DiTConfig, include_pos_embed: bool = True) -> dict[str, int]:
    """Parameter count by part from the closed form depth (18 d^2 + 15 d) + embedders (module docstring), for every
    variant: adaLN has a (4 d^2 + 4 d) modulation per block, in-context and cross-attention none, cross-attention
    adds 4 d^2 + 4 d per block (Q, KV, output projection); without adaLN the norms are affine (2d per LayerNorm, d per
    RMSNorm: 2 per block, 3 with cross-attention, plus the final one) and the final layer has no modulation."""
    config.check_implemented()
    d, h, p, t = config.hidden_size, config.mlp_hidden, config.patch_size, config.num_patches
    chunks = MODULATION_CHUNKS[config.conditioning]
    cross = config.conditioning == "cross-attention"
    norm_params = (2 * d if config.norm == "layernorm" else d) if config.norm_affine else 0
    block = ((4 * d * d + 4 * d) + (2 * d * h + h + d) + (chunks * d * d + chunks * d)
             + ((4 * d * d + 4 * d) if cross else 0) + (3 if cross else 2) * norm_params)
    n_labels = config.num_classes + int(config.class_dropout_prob > 0) if config.num_classes > 0 else 0
    final_mod = 0 if config.norm_affine else 2 * d * d + 2 * d
    out = {
        "blocks": config.depth * block,
        "patch_embed": p * p * config.in_channels * d + d,
        "timestep_embed": config.frequency_embedding_size * d + d + d * d + d,
        "label_embed": n_labels * d,
        "pos_embed": t * d if include_pos_embed else 0,
        "final_layer": final_mod + norm_params + d * p * p * config.out_channels + p * p * config.out_channels,
    }
    out["total"] = sum(out.values())
    return out


def count_parameters(model: nn.Module, trainable_only: bool = False, include_fixed: bool = True) -> int:
    """Number of scalars in ``model.parameters()``, plus (``include_fixed``) the fixed position-embedding buffers,
    which DiT stores as a frozen Parameter and so counts (DiT-XL/2 -> 675,129,632). Works on "meta" models.

    ``trainable_only`` counts only parameters with ``requires_grad`` and no buffers.
    """
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if include_fixed and not trainable_only:
        n += sum(b.numel() for name, b in model.named_buffers() if name.split(".")[-1] == "pos_embed")
    return n


def measured_flops(model: nn.Module, *inputs, math_attention: bool = True, **kwargs) -> int:
    """FLOPs of one forward call counted by ``torch.utils.flop_counter.FlopCounterMode`` (2 per MAC).

    With ``math_attention`` the attention runs on SDPA's math backend, which decomposes into counted ``bmm`` calls;
    the fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no flop formula registered in torch
    and would drop the 2 T^2 d attention-matrix MACs from the count.
    """
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    backend = sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext()
    with torch.no_grad(), backend, FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())
