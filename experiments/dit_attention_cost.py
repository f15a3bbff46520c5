"""Attention cost vs sequence length L = HW/p^2: measured MACs against 4LD^2 + 2L^2D, stored activations with and
without activation checkpointing, math vs fused (flash) SDPA on CPU (Peebles & Xie 2023;
Dao et al. 2022 for the fused kernel).

MACs: torch's FlopCounterMode (2 FLOPs per MAC) over one forward pass with SDPA's math backend, for one attention
layer and for a whole DiT (``flops.dit_flops``); the fused CPU kernel has no registered flop formula, so the
counter drops the 2 L^2 D term there (shown as ``macs_counted_fused``).

Memory: a CPU run has no allocator statistics, so "activation memory" is measured as the bytes of the distinct
tensors autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``, parameters excluded), plus, with
``grad_checkpointing``, the block inputs each checkpointed block keeps for its recomputation (inside a checkpointed
block the saves go to checkpoint's own hooks and are dropped). Peak training memory is about stored + the largest
single block's activations during the backward recompute (both are reported). The math backend stores the
softmax matrix (N h L^2 floats per layer): O(L^2); checkpointing keeps O(L d) per block and recomputes the rest;
the fused kernel stores only O(L) statistics (log-sum-exp) even without checkpointing.

Model: a DiT on 32x32x4 latents (the paper's input), d = 128, 4 heads, depth 4, batch 4, 10 classes, patch
p in {8, 4, 2, 1} -> L = 16, 64, 256, 1024. Step times with / without checkpointing are interleaved repeats.

    python -m experiments.dit_attention_cost [--out results/experiments] [--quick]
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_lab.models import DiTConfig, attention_macs, build_model, dit_flops
from diffusion_lab.models.dit import Attention
from diffusion_lab.models.flops import measured_flops

from . import _common

BACKENDS = {"math": SDPBackend.MATH, "fused": SDPBackend.FLASH_ATTENTION}


def config(p: int, grad_checkpointing: bool = False, d: int = 128, depth: int = 4) -> DiTConfig:
    return DiTConfig(input_size=32, patch_size=p, in_channels=4, hidden_size=d, depth=depth, num_heads=4,
                     num_classes=10, grad_checkpointing=grad_checkpointing)


def _inputs(cfg: DiTConfig, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, *cfg.data_shape, generator=g), torch.randn(batch, generator=g),
            torch.randint(0, cfg.num_classes, (batch,), generator=g))


def stored_activation_bytes(model, inputs, backend: str) -> tuple[int, int]:
    """(bytes of distinct non-parameter tensors saved for backward + checkpointed block inputs, bytes of the largest
    single block's saved tensors) for one forward pass; the backward is run to check the graph is complete."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}
    per_block: list[dict] = []
    current: list = [None]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
            if current[0] is not None:
                current[0].setdefault(ptr, t.untyped_storage().nbytes())
        return t

    def pre_hook(module, args):
        z = args[0]
        if model.grad_checkpointing:  # checkpoint keeps the block input for the recompute
            seen.setdefault(z.untyped_storage().data_ptr(), z.untyped_storage().nbytes())
        current[0] = {}
        per_block.append(current[0])

    def post_hook(module, args, out):
        current[0] = None

    handles = [b.register_forward_pre_hook(pre_hook) for b in model.blocks]
    handles += [b.register_forward_hook(post_hook) for b in model.blocks]
    try:
        with sdpa_kernel(BACKENDS[backend]):  # the recompute must use the forward's backend
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(*inputs)
            out.square().mean().backward()
    finally:
        for h in handles:
            h.remove()
    block_max = max((sum(b.values()) for b in per_block), default=0)
    return sum(seen.values()), block_max


def _step_time(model, inputs, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        model.zero_grad(set_to_none=True)
        model(*inputs).square().mean().backward()
    return (time.perf_counter() - t0) / inner


def run(quick: bool = False, seed: int = 0) -> tuple[list[dict], dict]:
    torch.set_num_threads(1)
    patches = [8, 4, 2] if quick else [8, 4, 2, 1]
    batch, d, depth, heads = 4, 128, 4, 4
    rows = []
    mac_dev, model_dev = 0.0, 0.0
    for p in patches:
        cfg = config(p, d=d, depth=depth)
        L = cfg.num_patches
        # one attention layer: measured vs 4 L D^2 + 2 L^2 D
        torch.manual_seed(seed)
        attn = Attention(d, heads)
        z = torch.randn(1, L, d)
        m_math = measured_flops(attn, z) // 2
        m_fused = measured_flops(attn, z, math_attention=False) // 2
        formula = attention_macs(L, d)
        mac_dev = max(mac_dev, abs(m_math - formula) / formula)
        # whole DiT: measured vs dit_flops
        torch.manual_seed(seed)
        model = build_model(cfg)
        inputs = _inputs(cfg, batch, seed)
        m_model = measured_flops(model, *inputs) // 2
        model_dev = max(model_dev, abs(m_model - batch * dit_flops(cfg)) / (batch * dit_flops(cfg)))
        softmax_bytes = depth * batch * heads * L * L * 4
        for backend in ("math", "fused"):
            for ck in (False, True):
                model.grad_checkpointing = ck
                stored, block_max = stored_activation_bytes(model, inputs, backend)
                if ck:  # the recompute makes one block's activations (as saved without checkpointing) alive on top
                    block_max = nock_block
                else:
                    nock_block = block_max
                rows.append({"p": p, "L": L, "backend": backend, "checkpointing": ck,
                             "macs_attention_formula": formula, "macs_attention_measured": m_math,
                             "macs_counted_fused": m_fused, "macs_model_measured": m_model,
                             "macs_model_formula": batch * dit_flops(cfg),
                             "stored_bytes": stored, "block_bytes": block_max,
                             "peak_estimate_bytes": stored + (block_max if ck else 0),
                             "softmax_matrix_bytes": softmax_bytes, "step_time_s": float("nan"),
                             "ckpt_time_ratio_median": float("nan"), "ckpt_time_ratio_min": float("nan"),
                             "ckpt_time_ratio_max": float("nan")})
        model.grad_checkpointing = False
    # step time with / without checkpointing (math backend), interleaved, at the two largest L
    reps, inner = (3, 1) if quick else (5, 2)
    for p in patches[-2:]:
        cfg = config(p, d=d, depth=depth)
        torch.manual_seed(seed)
        model = build_model(cfg)
        inputs = _inputs(cfg, batch, seed)
        times = {False: [], True: []}
        with sdpa_kernel(SDPBackend.MATH):
            _step_time(model, inputs, 1)
            for r in range(reps):
                for ck in ((False, True) if r % 2 == 0 else (True, False)):
                    model.grad_checkpointing = ck
                    times[ck].append(_step_time(model, inputs, inner))
        ratios = [b / a for a, b in zip(times[False], times[True])]
        for r in rows:
            if r["p"] == p and r["backend"] == "math":
                r["step_time_s"] = statistics.median(times[r["checkpointing"]])
                r["ckpt_time_ratio_median"] = statistics.median(ratios)
                r["ckpt_time_ratio_min"], r["ckpt_time_ratio_max"] = min(ratios), max(ratios)

    def get(backend, ck, key):
        return {r["L"]: r[key] for r in rows if r["backend"] == backend and r["checkpointing"] == ck}

    Ls = sorted(get("math", False, "stored_bytes"))
    math_nock, fused_nock = get("math", False, "stored_bytes"), get("fused", False, "stored_bytes")
    math_ck = get("math", True, "stored_bytes")
    sm = {r["L"]: r["softmax_matrix_bytes"] for r in rows}
    # the L^2 part of the math backend's storage: (math - fused) / softmax matrix bytes
    l2_ratio = {L: (math_nock[L] - fused_nock[L]) / sm[L] for L in Ls}
    slope = lambda ys: float(np.polyfit(np.log(Ls[-2:]), np.log([ys[L] for L in Ls[-2:]]), 1)[0])  # noqa: E731
    ratio_rows = [r for r in rows if r["backend"] == "math" and not r["checkpointing"]
                  and not np.isnan(r["ckpt_time_ratio_median"])]
    headline = {
        "attention_macs_max_rel_dev": mac_dev,
        "model_macs_max_rel_dev": model_dev,
        "fused_kernel_uncounted_macs_at_Lmax": int(attention_macs(Ls[-1], d) - [r["macs_counted_fused"] for r in rows
                                                                                if r["L"] == Ls[-1]][0]),
        "two_L2_D_at_Lmax": 2 * Ls[-1] ** 2 * d,
        "L": Ls,
        "stored_MB_math_no_ckpt": [math_nock[L] / 2 ** 20 for L in Ls],
        "stored_MB_math_ckpt": [math_ck[L] / 2 ** 20 for L in Ls],
        "stored_MB_fused_no_ckpt": [fused_nock[L] / 2 ** 20 for L in Ls],
        "math_minus_fused_over_softmax_bytes": [l2_ratio[L] for L in Ls],
        "loglog_slope_last_two_L": {"math_no_ckpt": slope(math_nock), "math_ckpt": slope(math_ck),
                                    "fused_no_ckpt": slope(fused_nock)},
        "ckpt_storage_reduction_at_Lmax": math_nock[Ls[-1]] / math_ckpt_or_one(math_ck[Ls[-1]]),
        "ckpt_step_time_ratio": {r["L"]: [r["ckpt_time_ratio_median"], r["ckpt_time_ratio_min"],
                                          r["ckpt_time_ratio_max"]] for r in ratio_rows},
    }
    settings = {"input": "32x32x4", "d": d, "heads": heads, "depth": depth, "batch": batch, "patches": patches,
                "dtype": "float32", "threads": 1, "memory": "saved_tensors_hooks bytes (+ checkpoint block inputs)",
                "seed": seed}
    return rows, {"settings": settings, "headline": headline}


def math_ckpt_or_one(x):
    return x if x else 1


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["p", "L", "backend", "checkpointing", "macs_attention_formula",
                               "macs_attention_measured", "macs_counted_fused", "stored_bytes", "softmax_matrix_bytes",
                               "peak_estimate_bytes", "step_time_s"]))
    for k, v in meta["headline"].items():
        print(f"{k}: {v}")
    _common.write(args.out, "dit_attention_cost", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import dit_attention_cost

    with _common.figure_style(args):
        dit_attention_cost(rows, _common.figure(args, "dit_attention_cost"))
    return meta["headline"]


if __name__ == "__main__":
    main()
