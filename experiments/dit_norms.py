"""RMSNorm vs LayerNorm on CPU: the normalisation's own time, a whole DiT training step, and loss at equal steps.

Zhang & Sennrich (2019) report RMSNorm "7%-64% faster" than LayerNorm with equal quality. Here:

  A. the normalisation alone (no affine, as in DiT), rows x width inputs, forward and forward+backward, for
     nn.LayerNorm, diffusion_lab's RMSNorm (a composite of pow / mean / rsqrt / mul) and torch's F.rms_norm;
  B. one whole AdamW training step (eps-loss, batch 64) of DiT-tiny/2 and DiT-small-digits/2 with norm = layernorm
     vs rmsnorm (same init seed);
  C. quality at equal steps: the eval eps-loss on held-out 8x8 digits after the same number of AdamW steps, with
     ``diffusion_lab.training.Objective`` (VPCosine, eps prediction), over seeds.

Timing: single thread, repeats interleaved (ABAB...) so that machine load hits both arms alike; each repeat gives a
time ratio, reported as median and [min, max] over repeats. speedup = t_LN / t_RMS - 1 ("x% faster").

    python -m experiments.dit_norms [--out results/experiments] [--quick]
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from diffusion_lab.models import RMSNorm, build_model, get_config

from . import _common

SEED_CLAIM = (0.07, 0.64)  # "7%-64% faster" (Zhang & Sennrich 2019)


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits scaled to [-1, 1]: (1797, 1, 8, 8) float32 and labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return x, torch.tensor(d.target, dtype=torch.long)


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _summary(ratios: list[float]) -> dict:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def norm_op_timing(widths, rows: int, repeats: int, inner: int, seed: int = 0) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(seed)
    for d in widths:
        impls = {"layernorm": torch.nn.LayerNorm(d, eps=1e-6, elementwise_affine=False),
                 "rmsnorm": RMSNorm(d, eps=1e-6, elementwise_affine=False),
                 "rmsnorm_torch": lambda x, d=d: F.rms_norm(x, (d,), eps=1e-6)}
        x = torch.randn(rows, d, generator=g)
        xg = x.clone().requires_grad_(True)
        gy = torch.randn(rows, d, generator=g)
        for mode in ("forward", "forward+backward"):
            def make(f):
                if mode == "forward":
                    def run():
                        with torch.no_grad():
                            f(x)
                else:
                    def run():
                        xg.grad = None
                        f(xg).backward(gy)
                return run
            fns = {k: make(f) for k, f in impls.items()}
            for f in fns.values():  # warm-up
                f()
            times = {k: [] for k in fns}
            for r in range(repeats):
                order = list(fns) if r % 2 == 0 else list(fns)[::-1]
                for k in order:
                    times[k].append(_time(fns[k], inner))
            ln = times["layernorm"]
            for k in ("rmsnorm", "rmsnorm_torch"):
                ratios = [a / b for a, b in zip(ln, times[k])]  # t_LN / t_RMS per interleaved repeat
                s = _summary(ratios)
                out.append({"part": "norm_op", "case": f"width {d}", "width": d, "rows": rows, "mode": mode,
                            "rms_impl": k, "t_layernorm_us": 1e6 * statistics.median(ln),
                            "t_rmsnorm_us": 1e6 * statistics.median(times[k]),
                            "speedup_median": s["median"] - 1, "speedup_min": s["min"] - 1,
                            "speedup_max": s["max"] - 1})
    return out


def _eps_step_fns(cfg_name: str, batch: int, seed: int):
    from diffusion_lab import schedules, training

    obj = training.Objective(schedules.VPCosine(), prediction="eps")
    x, y = digits()
    fns, nets = {}, {}
    for norm in ("layernorm", "rmsnorm"):
        torch.manual_seed(seed)
        net = build_model(get_config(cfg_name, norm=norm))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(seed)

        def step(net=net, opt=opt, g=g):
            idx = torch.randint(0, x.shape[0], (batch,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = obj(net, x[idx], y[idx], generator=g)
            loss.backward()
            opt.step()
            return loss
        fns[norm], nets[norm] = step, net
    return fns, nets, obj


def train_step_timing(configs, batch: int, repeats: int, inner: int, seed: int = 0) -> list[dict]:
    out = []
    for name in configs:
        fns, _, _ = _eps_step_fns(name, batch, seed)
        for f in fns.values():
            f(), f()
        times = {k: [] for k in fns}
        for r in range(repeats):
            order = list(fns) if r % 2 == 0 else list(fns)[::-1]
            for k in order:
                times[k].append(_time(fns[k], inner))
        ratios = [a / b for a, b in zip(times["layernorm"], times["rmsnorm"])]
        s = _summary(ratios)
        out.append({"part": "train_step", "case": name, "width": get_config(name).hidden_size, "rows": batch,
                    "mode": "AdamW step", "rms_impl": "rmsnorm",
                    "t_layernorm_us": 1e6 * statistics.median(times["layernorm"]),
                    "t_rmsnorm_us": 1e6 * statistics.median(times["rmsnorm"]),
                    "speedup_median": s["median"] - 1, "speedup_min": s["min"] - 1, "speedup_max": s["max"] - 1})
    return out


def quality_at_equal_steps(cfg_name: str, steps: int, batch: int, seeds) -> list[dict]:
    """Eval eps-loss on the last 297 digits (fixed t, eps) after ``steps`` AdamW steps on the first 1500."""
    x, y = digits()
    xe, ye = x[1500:], y[1500:]
    ge = torch.Generator().manual_seed(12345)
    te = torch.rand(xe.shape[0], generator=ge, dtype=torch.float64) * 0.96 + 0.02
    ee = torch.randn(xe.shape, generator=ge)
    out = []
    from diffusion_lab import schedules, training

    obj = training.Objective(schedules.VPCosine(), prediction="eps")
    for seed in seeds:
        for norm in ("layernorm", "rmsnorm"):
            torch.manual_seed(seed)
            net = build_model(get_config(cfg_name, norm=norm))
            opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
            g = torch.Generator().manual_seed(seed)
            for _ in range(steps):
                idx = torch.randint(0, 1500, (batch,), generator=g)
                opt.zero_grad(set_to_none=True)
                obj(net, x[idx], y[idx], generator=g).backward()
                opt.step()
            net.eval()
            with torch.no_grad():
                ev = float(obj(net, xe, ye, t=te, eps=ee))
            out.append({"part": "quality", "case": cfg_name, "seed": seed, "norm": norm, "steps": steps,
                        "eval_eps_loss": ev})
    return out


def run(quick: bool = False, seed: int = 0) -> tuple[list[dict], dict]:
    torch.set_num_threads(1)
    widths = [128, 512] if quick else [128, 256, 512, 1024]
    op_rows = norm_op_timing(widths, rows=1024 if quick else 4096, repeats=3 if quick else 7,
                             inner=10 if quick else 20, seed=seed)
    configs = ["DiT-tiny/2"] if quick else ["DiT-tiny/2", "DiT-small-digits/2"]
    step_rows = train_step_timing(configs, batch=64, repeats=2 if quick else 8, inner=2 if quick else 3, seed=seed)
    q_rows = quality_at_equal_steps("DiT-tiny/2", steps=20 if quick else 200, batch=64,
                                    seeds=[seed] if quick else [seed, seed + 1])
    sp = [r["speedup_median"] for r in op_rows if r["rms_impl"] == "rmsnorm"]
    sp_t = [r["speedup_median"] for r in op_rows if r["rms_impl"] == "rmsnorm_torch"]
    ql = {n: [r["eval_eps_loss"] for r in q_rows if r["norm"] == n] for n in ("layernorm", "rmsnorm")}
    diffs = [b - a for a, b in zip(ql["layernorm"], ql["rmsnorm"])]
    headline = {
        "norm_op_speedup_range_diffusion_lab_rmsnorm": [min(sp), max(sp)],
        "norm_op_speedup_range_torch_rms_norm": [min(sp_t), max(sp_t)],
        "train_step_speedup": {r["case"]: [r["speedup_median"], r["speedup_min"], r["speedup_max"]]
                               for r in step_rows},
        "claimed_speedup_range": list(SEED_CLAIM),
        "quality_eval_loss_layernorm": ql["layernorm"],
        "quality_eval_loss_rmsnorm": ql["rmsnorm"],
        "quality_rms_minus_ln_mean": float(np.mean(diffs)),
        "quality_rms_minus_ln_sd": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan"),
    }
    settings = {"threads": 1, "widths": widths, "configs": configs, "batch": 64, "quality_config": "DiT-tiny/2",
                "quality_steps": q_rows[0]["steps"], "objective": "training.Objective(VPCosine(), eps), AdamW 3e-4",
                "seed": seed, "timing": "interleaved repeats, ratio per repeat, median [min, max]"}
    rows = op_rows + step_rows
    for r in q_rows:
        rows.append({"part": "quality", "case": f"{r['case']} seed {r['seed']}", "width": 128, "rows": r["steps"],
                     "mode": "eval eps-loss", "rms_impl": r["norm"], "t_layernorm_us": float("nan"),
                     "t_rmsnorm_us": float("nan"), "speedup_median": r["eval_eps_loss"], "speedup_min": float("nan"),
                     "speedup_max": float("nan")})
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table([r for r in rows if r["part"] != "quality"],
                        ["part", "case", "mode", "rms_impl", "t_layernorm_us", "t_rmsnorm_us", "speedup_median",
                         "speedup_min", "speedup_max"]))
    h = meta["headline"]
    print(f"eval eps-loss at equal steps: LN {h['quality_eval_loss_layernorm']}, RMS {h['quality_eval_loss_rmsnorm']}"
          f" (RMS - LN mean {h['quality_rms_minus_ln_mean']:.4f} sd {h['quality_rms_minus_ln_sd']:.4f})")
    _common.write(args.out, "dit_norms", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import dit_norms

    with _common.figure_style(args):
        dit_norms(rows, _common.figure(args, "dit_norms"))
    return meta["headline"]


if __name__ == "__main__":
    main()
