"""Training-step throughput of diffusion_lab's DiT against diffusers' ``DiTTransformer2DModel`` at the same config.

Setting (default): DiT-S/2 on 32x32x4 inputs (depth 12, d 384, 6 heads, 1000 classes, 4 output channels), batch 8,
one forward + backward of ``out.square().mean()`` per step (no optimiser step). Repeats are interleaved
(ours, diffusers, ours, ...) and the median time per step is reported, with images/s and achieved TFLOP/s
(3 x forward FLOPs per training step, forward FLOPs = 2 x ``dit_flops`` MACs).

Same architecture, different storage: diffusers' ``BasicTransformerBlock(norm_type="ada_norm_zero")`` gives each block
its own ``CombinedTimestepLabelEmbeddings`` (timestep MLP + label table) and the final layer reuses block 0's, so it
stores (depth - 1) extra copies of the embedders and computes the timestep/label embedding once per block; its
position embedding is a non-counted buffer. The script verifies

    params(diffusers) = params(ours, without the fixed position embedding) + (depth - 1) x params(embedders)

and prints both counts. On a GPU (``--device cuda``) use ``--dtype bf16`` for autocast (both models) and ``--tf32``;
``--peak-tflops`` adds model-FLOPs utilisation (MFU) of the step.

    python benchmarks/dit_speed.py [--quick] [--config DiT-S/2] [--batch 8] [--repeats 5] [--steps 3]
                                   [--device cpu|cuda] [--dtype fp32|bf16|fp16] [--tf32] [--compile]
                                   [--peak-tflops T] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusion_lab.models import (build_model, compile_model, count_parameters, dit_flops, get_config,  # noqa: E402
                                  set_tf32)

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_dit(cfg):
    """diffusers' DiTTransformer2DModel with the same architecture as ``cfg``."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.image_size[0], patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
        norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=cfg.norm_eps,
        activation_fn="gelu-approximate", attention_bias=True,
    )


def param_accounting(ours, theirs, cfg) -> dict:
    n_ours = count_parameters(ours)
    n_ours_trainable = count_parameters(ours, trainable_only=True)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    emb = sum(p.numel() for p in ours.t_embedder.parameters()) + sum(p.numel() for p in ours.y_embedder.parameters())
    predicted = n_ours_trainable + (cfg.depth - 1) * emb
    return {"ours_with_pos_embed": n_ours, "ours_trainable": n_ours_trainable, "diffusers": n_theirs,
            "embedders_per_copy": emb, "diffusers_predicted": predicted, "accounted": predicted == n_theirs}


def make_step(model, kind: str, x, t, y, autocast_dtype, device_type):
    def step():
        model.zero_grad(set_to_none=True)
        if kind == "ours":
            out = model(x, t, y)
        else:
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(x, timestep=t, class_labels=y).sample
        out.float().square().mean().backward()
    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(config: str, batch: int, repeats: int, steps: int, device: str, dtype: str, tf32: bool, compile_: bool,
        peak_tflops: float | None, seed: int = 0) -> dict:
    dev = torch.device(device)
    if tf32:
        set_tf32(True)
    cfg = get_config(config)
    torch.manual_seed(seed)
    ours = build_model(cfg.replace(autocast=None if dtype == "fp32" else dtype)).to(dev).train()
    theirs = diffusers_dit(cfg).to(dev).train()
    params = param_accounting(ours, theirs, cfg)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *cfg.data_shape, generator=g).to(dev)
    t_ours = (6 * torch.rand(batch, generator=g) - 3).to(dev)   # c_noise
    t_theirs = torch.randint(0, 1000, (batch,), generator=g).to(dev)  # diffusers' integer timesteps
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(dev)
    models = {"ours": ours, "diffusers": theirs}
    if compile_:
        models = {k: compile_model(m) for k, m in models.items()}
    steps_fn = {
        "ours": make_step(models["ours"], "ours", x, t_ours, y, DTYPES[dtype], dev.type),
        "diffusers": make_step(models["diffusers"], "diffusers", x, t_theirs, y, DTYPES[dtype], dev.type),
    }
    for fn in steps_fn.values():  # warm-up (and compilation)
        fn()
        fn()
    _sync(dev)
    times = {k: [] for k in steps_fn}
    for _ in range(repeats):
        for name, fn in steps_fn.items():
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(dev)
            times[name].append((time.perf_counter() - t0) / steps)
    macs = dit_flops(cfg)
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        tflops = 3 * 2 * macs * batch / med / 1e12
        rows[name] = {"median_s_per_step": med, "min_s_per_step": min(ts), "all_s_per_step": ts, "images_per_s": batch / med,
                      "achieved_tflops": tflops, "mfu": (tflops / peak_tflops) if peak_tflops else None}
    ratio = rows["diffusers"]["median_s_per_step"] / rows["ours"]["median_s_per_step"]
    return {
        "settings": {"config": config, "batch": batch, "repeats": repeats, "steps_per_repeat": steps,
                     "device": device, "dtype": dtype, "tf32": tf32, "compile": compile_, "seed": seed,
                     "input": list(cfg.data_shape), "gmacs_forward_per_sample": macs / 1e9,
                     "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "python": platform.python_version(), "machine": platform.machine(),
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "params": params,
        "results": rows,
        "speedup_ours_over_diffusers": ratio,
        "speedup_min": rows["diffusers"]["min_s_per_step"] / rows["ours"]["min_s_per_step"],
    }


def print_report(r: dict) -> None:
    s, p = r["settings"], r["params"]
    print(f"{s['config']} on {tuple(s['input'])} inputs, batch {s['batch']}, {s['device']} {s['dtype']}"
          f"{' tf32' if s['tf32'] else ''}{' compiled' if s['compile'] else ''}, forward+backward, "
          f"median of {s['repeats']} interleaved repeats x {s['steps_per_repeat']} steps, {s['threads']} threads")
    print(f"parameters: ours {p['ours_with_pos_embed']:,} (incl. fixed pos-embed; {p['ours_trainable']:,} trainable), "
          f"diffusers {p['diffusers']:,} = ours trainable + {s_depth(r)} - 1 extra embedder copies x "
          f"{p['embedders_per_copy']:,} -> {p['diffusers_predicted']:,} ({'exact' if p['accounted'] else 'MISMATCH'})")
    print(f"{'model':<10} {'median s/step':>14} {'min s/step':>11} {'img/s':>9} {'TFLOP/s':>9} {'MFU':>7}")
    for name, row in r["results"].items():
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        print(f"{name:<10} {row['median_s_per_step']:>14.4f} {row['min_s_per_step']:>11.4f} "
              f"{row['images_per_s']:>9.2f} {row['achieved_tflops']:>9.4f} {mfu:>7}")
    print(f"speed-up ours / diffusers (time ratio diffusers/ours): median {r['speedup_ours_over_diffusers']:.3f}, "
          f"min {r['speedup_min']:.3f}")


def s_depth(r: dict) -> int:
    return get_config(r["settings"]["config"]).depth


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="DiT-S/2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype for both models")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--quick", action="store_true", help="batch 4, 3 repeats x 1 step")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.repeats, args.steps = 4, 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.config, args.batch, args.repeats, args.steps, args.device, args.dtype, args.tf32, args.compile,
            args.peak_tflops)
    print_report(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
