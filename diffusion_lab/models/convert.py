r"""DiT weights from elsewhere: the reference implementation's checkpoints and diffusers' DiTTransformer2DModel,
into ``diffusion_lab.models.DiT`` and back. Pure dictionary and tensor work (reading files is the caller's).

Reference layout (facebookresearch/DiT ``models.py``, Peebles & Xie 2023; e.g. ``DiT-XL-2-256x256.pt``)
---------------------------------------------------------------------------------------------------------
The same module tree as ours except the patch embedding (timm ``PatchEmbed``: ``x_embedder.proj``; ours is the
Conv2d itself, ``x_embedder``) and the fixed sin-cos table, a frozen Parameter ``pos_embed`` there and a
non-persistent buffer here (recomputed from the config; the loader checks the stored table against it).
``learn_sigma=True`` gives 2C = 8 output channels: the first C are the noise prediction, the last C the
variance interpolation (Nichol & Dhariwal 2021), kept as output channels of our model. The network is fed the
integer DDPM step t in [0, 1000) directly, so the converted config has ``time_scale=1``. The checkpoint does not
store the number of heads: it is read from the paper's table by width (S 384: 6, B 768: 12, L 1024: 16,
XL 1152: 16) unless given.

diffusers layout (``DiTTransformer2DModel``)
---------------------------------------------
    pos_embed.proj                                       -> x_embedder
    transformer_blocks.i.norm1.emb.timestep_embedder.linear_{1,2} -> t_embedder.mlp.{0,2}   (copies in every block)
    transformer_blocks.i.norm1.emb.class_embedder.embedding_table -> y_embedder.embedding_table (copies)
    transformer_blocks.i.norm1.linear                    -> blocks.i.adaLN_modulation.1
    transformer_blocks.i.attn1.to_{q,k,v}                -> blocks.i.attn.qkv  (rows [q; k; v], heads contiguous)
    transformer_blocks.i.attn1.to_out.0                  -> blocks.i.attn.proj
    transformer_blocks.i.ff.net.0.proj, ff.net.2         -> blocks.i.mlp.fc1, fc2
    proj_out_1, proj_out_2                               -> final_layer.adaLN_modulation.1, final_layer.linear

Every block of a diffusers DiT owns a copy of the condition embedder, and its final layer uses block 0's; ours
has one shared embedder, so the copies are folded only when they are identical (a checkpoint converted from the
reference code has identical copies; a model fine-tuned in diffusers may not, and is refused with the first
differing block and tensor named). Two numerical conventions of the port are carried as config fields:
timestep frequencies omega_i = 10000^(-i/(half - 1)) (``frequency_shift=1``; the reference uses -i/half) and the
norm before the MLP with eps = ``norm_eps`` of the diffusers config (1e-5 by default; ``mlp_norm_eps``), the
other norms with 1e-6.
"""
from __future__ import annotations

import re

import torch

from .dit import DiT, DiTConfig

__all__ = [
    "PAPER_HEADS", "config_from_reference", "dit_from_reference", "reference_state_dict",
    "config_from_diffusers", "dit_from_diffusers", "diffusers_config", "diffusers_state_dict",
]

#: number of heads of the paper's DiT sizes, by hidden width (Peebles & Xie 2023, Table 1)
PAPER_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def _unwrap(state) -> dict:
    """A state dict from a checkpoint object: the dict itself, or its "ema" / "model" / "state_dict" entry
    (the reference training script saves {"model", "ema", "opt", "args"}; its sampling scripts load "ema")."""
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict, got {type(state).__name__}")
    for key in ("ema", "model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            return state[key]
    return state


def _depth(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))}
    if not idx:
        raise ValueError(f"no '{prefix}.<i>.' keys in the state dict")
    if idx != set(range(len(idx))):
        raise ValueError(f"'{prefix}' indices are not 0..{len(idx) - 1}: {sorted(idx)}")
    return len(idx)


def _require(sd: dict, keys) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise KeyError(f"state dict lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")


# ---------------------------------------------------------------------------------------------
# reference layout


def config_from_reference(state_dict: dict, *, num_heads: int | None = None, num_classes: int | None = None,
                          **overrides) -> DiTConfig:
    """The DiTConfig of a reference-layout state dict (shapes give d, C, p, T, depth, out channels, MLP width,
    classes; the heads come from ``PAPER_HEADS`` unless given). ``num_classes`` given: the label table has
    num_classes + 1 rows (with the CFG null row) or num_classes rows (without). ``overrides`` replace fields."""
    sd = _unwrap(state_dict)
    _require(sd, ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "final_layer.linear.weight",
                  "blocks.0.mlp.fc1.weight"])
    d, c, p, _ = sd["x_embedder.proj.weight"].shape
    depth = _depth(sd, "blocks")
    if "pos_embed" in sd:
        t = sd["pos_embed"].shape[1]
        side = int(round(t ** 0.5))
        if side * side != t:
            raise ValueError(f"pos_embed has {t} tokens, not a square grid")
        input_size = side * p
    elif "input_size" in overrides:
        input_size = overrides["input_size"]
    else:
        raise ValueError("the state dict has no pos_embed: give input_size=")
    heads = num_heads if num_heads is not None else PAPER_HEADS.get(int(d))
    if heads is None:
        raise ValueError(f"hidden size {d} is not one of the paper's widths {sorted(PAPER_HEADS)}: give num_heads=")
    out_c = sd["final_layer.linear.weight"].shape[0] // (p * p)
    rows = sd["y_embedder.embedding_table.weight"].shape[0] if "y_embedder.embedding_table.weight" in sd else 0
    if rows == 0:
        n_cls, drop = 0, 0.0
    elif num_classes is None or rows == num_classes + 1:
        n_cls, drop = rows - 1, 0.1  # the reference always builds the null row (class_dropout_prob = 0.1)
    elif rows == num_classes:
        n_cls, drop = num_classes, 0.0
    else:
        raise ValueError(f"label table has {rows} rows; num_classes={num_classes} needs {num_classes} or "
                         f"{num_classes + 1}")
    cfg = dict(input_size=int(input_size), patch_size=int(p), in_channels=int(c), out_channels=int(out_c),
               hidden_size=int(d), depth=depth, num_heads=int(heads),
               mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / d, num_classes=n_cls, class_dropout_prob=drop,
               frequency_embedding_size=int(sd["t_embedder.mlp.0.weight"].shape[1]), time_scale=1.0)
    cfg.update(overrides)
    return DiTConfig(**cfg)


def _check_pos_embed(model: DiT, stored: torch.Tensor) -> None:
    ours = model.pos_embed.detach().to(torch.float64).cpu()
    theirs = stored.detach().to(torch.float64).cpu().reshape(ours.shape)
    err = float((ours - theirs).abs().max())
    if err > 1e-5:
        raise ValueError(f"the stored pos_embed differs from the 2-D sin-cos table by {err:.3g}: not a DiT "
                         f"position table for grid {model.config.grid_size}")


def dit_from_reference(state_dict: dict, config: DiTConfig | None = None, **config_kw) -> DiT:
    """A DiT with the weights of a reference-layout state dict (strict: every tensor used, none missing).

    Parameters
    ----------
    state_dict : dict
        ``torch.load`` of a reference checkpoint (a plain state dict, or the training script's {"ema", ...}).
    config : DiTConfig, optional
        Default ``config_from_reference(state_dict, **config_kw)``.

    Returns
    -------
    DiT
        In float32 (the checkpoint's dtype), eval mode; its forward(x, t, y) equals the reference ``DiT.forward``.
    """
    sd = _unwrap(state_dict)
    config = config or config_from_reference(sd, **config_kw)
    model = DiT(config)
    ours = {}
    for k, v in sd.items():
        if k == "pos_embed":
            continue
        ours["x_embedder." + k[len("x_embedder.proj."):] if k.startswith("x_embedder.proj.") else k] = v
    model.load_state_dict(ours, strict=True)
    if "pos_embed" in sd:
        _check_pos_embed(model, sd["pos_embed"])
    return model.eval()


def _reference_compatible(cfg: DiTConfig) -> list[str]:
    bad = []
    for name, want in (("conditioning", "adaLN-Zero"), ("norm", "layernorm"), ("norm_placement", "pre"),
                       ("qkv_bias", True), ("frequency_shift", 0.0), ("norm_eps", 1e-6)):
        if getattr(cfg, name) != want:
            bad.append(f"{name}={getattr(cfg, name)!r} (needs {want!r})")
    if cfg.mlp_norm_eps not in (None, cfg.norm_eps):
        bad.append(f"mlp_norm_eps={cfg.mlp_norm_eps!r} (needs None)")
    if cfg.image_size[0] != cfg.image_size[1]:
        bad.append(f"input_size={cfg.input_size} (needs a square)")
    return bad


def reference_state_dict(model: DiT) -> dict:
    """The reference layout of our DiT's weights (``torch.save`` it to get a reference-style checkpoint).

    The reference network feeds the time input at scale 1 (``time_scale=1``); a model with another time scale is
    saved as is, and the reference code then needs the same scaling of t (a warning is not raised: the scale is
    part of how the weights were trained). Models outside the reference architecture are refused."""
    bad = _reference_compatible(model.config)
    if bad:
        raise ValueError(f"this DiT is not in the reference architecture: {', '.join(bad)}")
    out = {}
    for k, v in model.state_dict().items():
        out["x_embedder.proj." + k[len("x_embedder."):] if k.startswith("x_embedder.") else k] = v.detach().clone()
    out["pos_embed"] = model.pos_embed.detach().clone()
    return out


# ---------------------------------------------------------------------------------------------
# diffusers layout


def config_from_diffusers(config: dict, **overrides) -> DiTConfig:
    """Our DiTConfig of a diffusers ``DiTTransformer2DModel`` config dict."""
    cfg = dict(config)
    for name, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                       ("norm_elementwise_affine", False)):
        if cfg.get(name, want) != want:
            raise ValueError(f"diffusers DiT with {name}={cfg[name]!r} has no counterpart (needs {want!r})")
    heads = int(cfg.get("num_attention_heads", 16))
    d = heads * int(cfg.get("attention_head_dim", 72))
    n_cls = cfg.get("num_embeds_ada_norm", 1000)
    in_c = int(cfg.get("in_channels", 4))
    out = dict(input_size=int(cfg.get("sample_size", 32)), patch_size=int(cfg.get("patch_size", 2)),
               in_channels=in_c, out_channels=int(cfg.get("out_channels") or in_c), hidden_size=d,
               depth=int(cfg.get("num_layers", 28)), num_heads=heads, mlp_ratio=4.0, num_classes=int(n_cls),
               class_dropout_prob=0.1, qkv_bias=bool(cfg.get("attention_bias", True)), norm_eps=1e-6,
               mlp_norm_eps=float(cfg.get("norm_eps", 1e-5)), frequency_embedding_size=256, time_scale=1.0,
               frequency_shift=1.0)
    out.update(overrides)
    return DiTConfig(**out)


_EMB = "transformer_blocks.{i}.norm1.emb."
_EMB_KEYS = {"timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
             "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
             "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
             "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
             "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight"}
_BLOCK_KEYS = {"norm1.linear.{p}": "adaLN_modulation.1.{p}", "attn1.to_out.0.{p}": "attn.proj.{p}",
               "ff.net.0.proj.{p}": "mlp.fc1.{p}", "ff.net.2.{p}": "mlp.fc2.{p}"}
_TOP_KEYS = {"pos_embed.proj.{p}": "x_embedder.{p}", "proj_out_1.{p}": "final_layer.adaLN_modulation.1.{p}",
             "proj_out_2.{p}": "final_layer.linear.{p}"}


def dit_from_diffusers(model_or_state_dict, config: dict | DiTConfig | None = None) -> DiT:
    """Our DiT with the weights of a diffusers ``DiTTransformer2DModel`` (an instance, or its state dict with its
    config dict), in the source's dtype, eval mode; ``DiT(x, t, y)`` then equals the diffusers model's
    ``forward(x, timestep=t, class_labels=y).sample``.

    Raises ValueError when the per-block embedder copies differ (naming the first block and tensor), KeyError
    for missing tensors and ValueError for tensors left over."""
    if isinstance(model_or_state_dict, dict):
        sd = dict(model_or_state_dict)
        if config is None:
            raise ValueError("a diffusers state dict needs its config (the model's .config) to be converted")
    else:
        sd = dict(model_or_state_dict.state_dict())
        config = config if config is not None else dict(model_or_state_dict.config)
    cfg = config if isinstance(config, DiTConfig) else config_from_diffusers(config)
    depth = _depth(sd, "transformer_blocks")
    if depth != cfg.depth:
        raise ValueError(f"the state dict has {depth} blocks, the config {cfg.depth}")
    used, ours = set(), {}

    def take(src, dst):
        _require(sd, [src])
        ours[dst] = sd[src]
        used.add(src)

    for src, dst in _EMB_KEYS.items():
        take(_EMB.format(i=0) + src, dst)
        for i in range(1, depth):
            key = _EMB.format(i=i) + src
            _require(sd, [key])
            if not torch.equal(sd[key], ours[dst]):
                raise ValueError(f"block {i}'s condition embedder differs from block 0's ({key}): the copies must "
                                 f"be identical to fold them into one embedder")
            used.add(key)
    for p in ("weight", "bias"):
        for src, dst in _TOP_KEYS.items():
            take(src.format(p=p), dst.format(p=p))
        for i in range(depth):
            pre = f"transformer_blocks.{i}."
            for src, dst in _BLOCK_KEYS.items():
                take(pre + src.format(p=p), f"blocks.{i}." + dst.format(p=p))
            qkv = [pre + f"attn1.to_{n}.{p}" for n in "qkv"]
            if p == "bias" and not cfg.qkv_bias:
                continue
            _require(sd, qkv)
            ours[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[k] for k in qkv], 0)
            used.update(qkv)
    left = [k for k in sd if k not in used and not k.endswith("pos_embed.pos_embed")]
    if left:
        raise ValueError(f"tensors with no counterpart in our DiT: {left[:5]}{' ...' if len(left) > 5 else ''}")
    model = DiT(cfg)
    dtype = ours["x_embedder.weight"].dtype
    model.to(dtype).load_state_dict(ours, strict=True)
    return model.eval()


def diffusers_config(cfg: DiTConfig) -> dict:
    """The diffusers ``DiTTransformer2DModel`` config of our DiTConfig (refused where the port has no counterpart)."""
    bad = []
    for name, want in (("conditioning", "adaLN-Zero"), ("norm", "layernorm"), ("norm_placement", "pre"),
                       ("frequency_shift", 1.0), ("time_scale", 1.0), ("norm_eps", 1e-6),
                       ("frequency_embedding_size", 256), ("mlp_ratio", 4.0)):
        if getattr(cfg, name) != want:
            bad.append(f"{name}={getattr(cfg, name)!r} (needs {want!r})")
    if cfg.num_classes < 1 or cfg.class_dropout_prob <= 0:
        bad.append("a class-conditional model with the null class (num_classes >= 1, class_dropout_prob > 0)")
    if cfg.image_size[0] != cfg.image_size[1]:
        bad.append(f"input_size={cfg.input_size} (needs a square)")
    if bad:
        raise ValueError(f"diffusers' DiTTransformer2DModel cannot express this DiT: {', '.join(bad)}")
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
                attention_bias=cfg.qkv_bias, sample_size=cfg.image_size[0], patch_size=cfg.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero",
                norm_elementwise_affine=False,
                norm_eps=cfg.norm_eps if cfg.mlp_norm_eps is None else cfg.mlp_norm_eps)


def diffusers_state_dict(model: DiT) -> tuple[dict, dict]:
    """(state dict, config dict) of a diffusers ``DiTTransformer2DModel`` with our DiT's weights; load with
    ``DiTTransformer2DModel(**config).load_state_dict(state_dict)`` (the embedder is copied into every block)."""
    cfg = diffusers_config(model.config)
    sd = model.state_dict()
    out = {}
    for i in range(model.config.depth):
        for src, dst in _EMB_KEYS.items():
            out[_EMB.format(i=i) + src] = sd[dst].detach().clone()
    for p in ("weight", "bias"):
        for src, dst in _TOP_KEYS.items():
            out[src.format(p=p)] = sd[dst.format(p=p)].detach().clone()
        for i in range(model.config.depth):
            pre = f"transformer_blocks.{i}."
            for src, dst in _BLOCK_KEYS.items():
                out[pre + src.format(p=p)] = sd[f"blocks.{i}." + dst.format(p=p)].detach().clone()
            key = f"blocks.{i}.attn.qkv.{p}"
            if key in sd:
                for n, part in zip("qkv", sd[key].chunk(3, 0)):
                    out[pre + f"attn1.to_{n}.{p}"] = part.detach().clone()
    return out, cfg
