"""Score / denoiser networks: a residual MLP for low-dimensional data and the DiT backbone.

Every network has ``forward(x, c_noise, y=None) -> tensor`` (x: (N, *data_shape), c_noise: (N,) real noise-level
features such as EDM's log(sigma)/4, y: (N,) class labels or None for the null class) and the attributes
``data_shape`` and ``num_classes`` (0 if unconditional). ``get_model("mlp", ...)`` or ``get_model("DiT-tiny/2", ...)``.
"""
from __future__ import annotations

from torch import nn

from .dit import (DIT_CONFIGS, DiT, DiTBlock, DiTConfig, autocast_context, available_configs, build_model,
                  compile_model, get_config, patchify, set_tf32, tf32, unpatchify)
from .embeddings import LabelEmbedder, TimestepEmbedder, sincos_pos_embed_2d, timestep_embedding
from .flops import (PAPER_GFLOPS, PAPER_PARAMS_XL2, attention_macs, count_parameters, dit_flops,
                    dit_flops_breakdown, dit_param_formula, measured_flops)
from .mlp import MLPScore
from .norms import RMSNorm

__all__ = [
    "MLPScore", "DiT", "DiTBlock", "DiTConfig", "DIT_CONFIGS", "get_config", "build_model", "available_configs",
    "get_model", "model_names", "dit_flops", "dit_flops_breakdown", "dit_param_formula", "count_parameters",
    "measured_flops", "attention_macs", "PAPER_GFLOPS", "PAPER_PARAMS_XL2", "patchify", "unpatchify",
    "TimestepEmbedder", "LabelEmbedder", "timestep_embedding", "sincos_pos_embed_2d", "RMSNorm",
    "autocast_context", "set_tf32", "tf32", "compile_model",
]


def model_names() -> list[str]:
    """Names accepted by ``get_model``."""
    return ["mlp", *available_configs()]


def get_model(name: str, **kw) -> nn.Module:
    """Build a network by name.

    ``"mlp"``: ``MLPScore(**kw)`` (e.g. ``data_shape=2, hidden=256, depth=4, num_classes=0``).
    A DiT config name (``available_configs()``): ``DiT(get_config(name, **kw))``, kw overriding config fields
    (e.g. ``num_classes=10, grad_checkpointing=True, autocast="bf16"``).
    """
    if name.lower() == "mlp":
        return MLPScore(**kw)
    if name in DIT_CONFIGS:
        return build_model(get_config(name, **kw))
    raise KeyError(f"unknown model {name!r}; choose one of {model_names()}")
