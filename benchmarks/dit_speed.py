"""Training-step and sampling throughput of diffusion_lab's DiT, with diffusers' ``DiTTransformer2DModel`` at the same
config for comparison.

Training: one forward + backward of ``out.square().mean()`` per step (no optimiser step) on 32x32x4 inputs (the
paper configs' latents, 1000 classes); ours and diffusers' repeats are interleaved (ours, diffusers, ours, ...) and
the median time per step is reported with images/s and achieved TFLOP/s (3 x forward FLOPs per training step,
forward FLOPs = 2 x ``dit_flops`` MACs). Sampling: our DiT as a field (``interop.dit_field``, eps on the discrete
DDPM schedule) under ``samplers.sample`` with ``--sample-method`` for ``--sample-steps`` steps, without gradients,
median time per run, images/s and TFLOP/s (2 x MACs per sample per NFE, the exact NFE of the run).
``--peak-tflops T`` adds model-FLOPs utilisation (MFU) = achieved / T to every row.

Defaults by device: on CUDA DiT-B/2 and DiT-XL/2, training batch 32, sampling batch 64; on the CPU DiT-S/2, batch 8,
sampling batch 4 with 4 steps. A GPU run, e.g. on an H100/H200 (bf16 dense peak 989 TFLOP/s):

    python benchmarks/dit_speed.py --device cuda --dtype bf16 --compile --peak-tflops 989 --json dit_speed_gpu.json

``--device cuda`` on a machine without CUDA stops with a one-line error (exit status 2).

Same architecture, different storage: diffusers' ``BasicTransformerBlock(norm_type="ada_norm_zero")`` gives each block
its own ``CombinedTimestepLabelEmbeddings`` (timestep MLP + label table) and the final layer reuses block 0's, so it
stores (depth - 1) extra copies of the embedders and computes the timestep/label embedding once per block; its
position embedding is a non-counted buffer. The script verifies

    params(diffusers) = params(ours, without the fixed position embedding) + (depth - 1) x params(embedders)

and prints both counts. ``--dtype bf16`` is autocast (both models), ``--tf32`` TF32 matmuls, ``--compile``
torch.compile of both models.

    python benchmarks/dit_speed.py [--quick] [--config DiT-S/2 ...] [--batch 8] [--repeats 5] [--steps 3]
                                   [--sample-batch 4] [--sample-steps 4] [--sample-method ddim] [--no-diffusers]
                                   [--device cpu|cuda|cuda:N] [--dtype fp32|bf16|fp16] [--tf32] [--compile]
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


def _median_time(fns: dict, repeats: int, steps: int, device) -> dict:
    """Median-ready lists of seconds per call of each function, the functions interleaved in every repeat."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def _row(ts: list, images: int, flops: float, peak_tflops: float | None) -> dict:
    med = statistics.median(ts)
    tflops = flops / med / 1e12
    return {"median_s": med, "min_s": min(ts), "all_s": ts, "images_per_s": images / med,
            "achieved_tflops": tflops, "mfu": (tflops / peak_tflops) if peak_tflops else None}


def run(config: str, batch: int, repeats: int, steps: int, device: str, dtype: str, tf32: bool, compile_: bool,
        peak_tflops: float | None, seed: int = 0, *, sample_batch: int = 4, sample_steps: int = 4,
        sample_method: str = "ddim", diffusers: bool = True) -> dict:
    """Training rows (ours, diffusers' unless ``diffusers=False``) and one sampling row of ``config``."""
    from diffusion_lab.interop import dit_field
    from diffusion_lab.samplers import sample

    dev = torch.device(device)
    if tf32:
        set_tf32(True)
    cfg = get_config(config)
    torch.manual_seed(seed)
    ours = build_model(cfg.replace(autocast=None if dtype == "fp32" else dtype)).to(dev).train()
    theirs = diffusers_dit(cfg).to(dev).train() if diffusers else None
    params = param_accounting(ours, theirs, cfg) if diffusers else {
        "ours_with_pos_embed": count_parameters(ours), "ours_trainable": count_parameters(ours, trainable_only=True)}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *cfg.data_shape, generator=g).to(dev)
    t_ours = (6 * torch.rand(batch, generator=g) - 3).to(dev)   # c_noise
    t_theirs = torch.randint(0, 1000, (batch,), generator=g).to(dev)  # diffusers' integer timesteps
    y = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(dev)
    models = {"ours": ours, **({"diffusers": theirs} if diffusers else {})}
    if compile_:
        models = {k: compile_model(m) for k, m in models.items()}
    steps_fn = {"ours": make_step(models["ours"], "ours", x, t_ours, y, DTYPES[dtype], dev.type)}
    if diffusers:
        steps_fn["diffusers"] = make_step(models["diffusers"], "diffusers", x, t_theirs, y, DTYPES[dtype], dev.type)
    for fn in steps_fn.values():  # warm-up (and compilation)
        fn()
        fn()
    _sync(dev)
    times = _median_time(steps_fn, repeats, steps, dev)
    macs = dit_flops(cfg)
    training = {name: _row(ts, batch, 3 * 2 * macs * batch, peak_tflops) for name, ts in times.items()}

    # sampling: the (compiled) network in eval mode as a field, a whole sampler run per timed call
    net = models["ours"]
    ours.eval()
    xs = torch.randn(sample_batch, *cfg.data_shape, generator=g).to(dev)
    ys = torch.randint(0, cfg.num_classes, (sample_batch,), generator=g).to(dev)
    field = dit_field(net, ys, check_finite=False)
    nfe = []

    def sample_run():
        with torch.no_grad():
            nfe.append(sample(field, xs, sample_method, steps=sample_steps, final="denoise",
                              generator=torch.Generator(device=dev).manual_seed(seed)).nfe)

    sample_run()  # warm-up (and compilation for the eval graph)
    _sync(dev)
    ts = _median_time({"sample": sample_run}, repeats, 1, dev)["sample"]
    sampling = {"method": sample_method, "steps": sample_steps, "nfe": nfe[-1], "batch": sample_batch,
                **_row(ts, sample_batch, 2 * macs * sample_batch * nfe[-1], peak_tflops)}
    sampling["s_per_nfe"] = sampling["median_s"] / nfe[-1]
    out = {
        "settings": {"config": config, "batch": batch, "repeats": repeats, "steps_per_repeat": steps,
                     "device": device, "dtype": dtype, "tf32": tf32, "compile": compile_, "seed": seed,
                     "input": list(cfg.data_shape), "gmacs_forward_per_sample": macs / 1e9,
                     "peak_tflops": peak_tflops, "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__ if diffusers else None,
                     "python": platform.python_version(), "machine": platform.machine(),
                     "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "params": params,
        "results": training,
        "sampling": sampling,
    }
    if diffusers:
        out["speedup_ours_over_diffusers"] = training["diffusers"]["median_s"] / training["ours"]["median_s"]
        out["speedup_min"] = training["diffusers"]["min_s"] / training["ours"]["min_s"]
    return out


def print_report(r: dict) -> None:
    s, p = r["settings"], r["params"]
    print(f"{s['config']} on {tuple(s['input'])} inputs, {s['device']} {s['dtype']}"
          f"{' tf32' if s['tf32'] else ''}{' compiled' if s['compile'] else ''}, median of {s['repeats']} "
          f"interleaved repeats, {s['threads']} threads, {s['gmacs_forward_per_sample']:.2f} GMAC per forward sample")
    if "diffusers" in p:
        print(f"parameters: ours {p['ours_with_pos_embed']:,} (incl. fixed pos-embed; {p['ours_trainable']:,} "
              f"trainable), diffusers {p['diffusers']:,} = ours trainable + {s_depth(r)} - 1 extra embedder copies x "
              f"{p['embedders_per_copy']:,} -> {p['diffusers_predicted']:,} "
              f"({'exact' if p['accounted'] else 'MISMATCH'})")
    else:
        print(f"parameters: ours {p['ours_with_pos_embed']:,} ({p['ours_trainable']:,} trainable)")
    print(f"{'':30s} {'median s':>10s} {'min s':>10s} {'img/s':>10s} {'TFLOP/s':>9s} {'MFU':>7s}")

    def line(label, row):
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "-"
        print(f"{label:30s} {row['median_s']:>10.4f} {row['min_s']:>10.4f} {row['images_per_s']:>10.2f} "
              f"{row['achieved_tflops']:>9.4f} {mfu:>7s}")

    for name, row in r["results"].items():
        line(f"train step {name} (batch {s['batch']})", row)
    sm = r["sampling"]
    line(f"sample {sm['method']} {sm['nfe']} NFE (batch {sm['batch']})", sm)
    print(f"sampling: {sm['s_per_nfe']:.4g} s per network evaluation of {sm['batch']} images")
    if "speedup_ours_over_diffusers" in r:
        print(f"training speed-up ours / diffusers (time ratio diffusers/ours): median "
              f"{r['speedup_ours_over_diffusers']:.3f}, min {r['speedup_min']:.3f}")


def s_depth(r: dict) -> int:
    return get_config(r["settings"]["config"]).depth


def _fail(message: str) -> int:
    """The one-line error of this script (exit status 2), no traceback."""
    sys.stderr.write(f"dit_speed.py: error: {message}\n")
    return 2


def main(argv=None) -> int:
    from diffusion_lab.models import available_configs

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", nargs="+", default=None,
                    help="DiT configs (default: DiT-B/2 DiT-XL/2 on CUDA, DiT-S/2 on the CPU)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 32 on CUDA, 8 on the CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="training steps per timed repeat")
    ap.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 64 on CUDA, 4 on the CPU)")
    ap.add_argument("--sample-steps", type=int, default=None,
                    help="sampler steps per timed run (default 50 on CUDA, 4 on the CPU)")
    ap.add_argument("--sample-method", default="ddim", help="sampler of samplers.sample (default ddim: 1 NFE a step)")
    ap.add_argument("--no-diffusers", action="store_true", help="time ours only (diffusers not needed)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype for both models")
    ap.add_argument("--tf32", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU (e.g. 989 for H100/H200 bf16 dense)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    ap.add_argument("--quick", action="store_true", help="batch 4, 3 repeats x 1 step, sampling batch 2 x 2 steps")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        return _fail(f"--device {args.device!r}: {exc}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return _fail(f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__}, "
                         f"CUDA build {torch.version.cuda}); run on a GPU machine or pass --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return _fail(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        return _fail(f"--device {args.device}: use cpu, cuda or cuda:N")
    gpu = dev.type == "cuda"
    configs = args.config or (["DiT-B/2", "DiT-XL/2"] if gpu else ["DiT-S/2"])
    bad = [c for c in configs if c not in available_configs()]
    if bad:
        return _fail(f"--config {' '.join(bad)}: unknown; choose from {', '.join(available_configs())}")
    batch = args.batch or (32 if gpu else 8)
    sample_batch = args.sample_batch or (64 if gpu else 4)
    sample_steps = args.sample_steps or (50 if gpu else 4)
    if args.quick:
        batch, args.repeats, args.steps, sample_batch, sample_steps = 4, 3, 1, 2, 2
    for name, v in (("--batch", batch), ("--repeats", args.repeats), ("--steps", args.steps),
                    ("--sample-batch", sample_batch), ("--sample-steps", sample_steps)):
        if v < 1:
            return _fail(f"{name} must be >= 1, got {v}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        return _fail(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    diffusers = not args.no_diffusers
    if diffusers:
        try:
            import diffusers as _  # noqa: F401
        except ImportError:
            return _fail("diffusers is not installed (pip install diffusers), or pass --no-diffusers")
    if args.threads:
        torch.set_num_threads(args.threads)
    reports = []
    for config in configs:
        r = run(config, batch, args.repeats, args.steps, args.device, args.dtype, args.tf32, args.compile,
                args.peak_tflops, sample_batch=sample_batch, sample_steps=sample_steps,
                sample_method=args.sample_method, diffusers=diffusers)
        print_report(r)
        print()
        reports.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports[0] if len(reports) == 1 else {"configs": reports}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
