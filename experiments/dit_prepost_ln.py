"""Pre-LN vs Post-LN on a real DiT: activation norms across depth and gradient norms near the output
(Xiong et al. 2020).

A published claim is "exponential growth for Post-LN". In fact the Post-LN forward norm is pinned (every
block ends in a LayerNorm, so each token has RMS |gamma| = 1 at init), Pre-LN's residual stream grows, and
linearly at init (Xiong et al. 2020: E||x_l||^2 grows linearly in l); Post-LN's real problem is large gradients
near the output at init, which makes warm-up-free training with a large learning rate unstable.

Model: DiT-tiny-like (d = 128, 4 heads) with ``conditioning="in-context"`` (plain ViT blocks with affine LayerNorm,
the standard Pre-LN / Post-LN transformer of Xiong et al.), depth L, ``norm_placement`` "pre" or "post" with the
same init. DiT zero-initialises the final Linear, which would make every block gradient exactly 0 at init; here it
is xavier-initialised like every other Linear (stated in the settings). Task: eps-prediction on noised 8x8 digits
(sklearn load_digits in [-1, 1]), x_t = cos(pi t/2) x_0 + sin(pi t/2) eps, t ~ U[0.02, 0.98], c_noise = log(sigma /
alpha)/4, loss = mean (eps_hat - eps)^2, written here.

Measured: the per-token RMS of the residual stream after each block (the stream entering block l+1), at init and
after training; the gradient norm of each block's parameters (and of the last block's MLP output weight, Xiong et
al.'s W^{2,L}) at init; and loss / grad-norm curves over a few hundred AdamW steps at lr 1e-3 without warm-up, and at
lr 1e-4.

    python -m experiments.dit_prepost_ln [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab.models import build_model, get_config

from . import _common
from .dit_norms import digits


def make_model(placement: str, depth: int, seed: int, width: int = 128) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = get_config("DiT-tiny/2", conditioning="in-context", norm_placement=placement, depth=depth,
                     hidden_size=width, num_heads=4)
    model = build_model(cfg)
    torch.manual_seed(seed + 1000)
    torch.nn.init.xavier_uniform_(model.final_layer.linear.weight)  # not DiT's zero init (see docstring)
    return model


def noised_batch(x0: torch.Tensor, g: torch.Generator):
    t = torch.rand(x0.shape[0], generator=g) * 0.96 + 0.02
    a, s = torch.cos(math.pi * t / 2), torch.sin(math.pi * t / 2)
    eps = torch.randn(x0.shape, generator=g)
    xt = a.view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
    return xt, torch.log(s / a) / 4, eps


def eps_loss(model, x0, y, g):
    xt, c_noise, eps = noised_batch(x0, g)
    return (model(xt, c_noise, y) - eps).square().mean()


def stream_rms(model, x0, y, g) -> list[float]:
    """Mean over tokens of the per-token RMS of the residual stream: entry (after embedding) and after each block."""
    xt, c_noise, _ = noised_batch(x0, g)
    rms = []
    with torch.no_grad():
        c = model.condition(c_noise, y)
        z = torch.cat([c, model.x_embedder(xt).flatten(2).transpose(1, 2) + model.pos_embed], dim=1)
        rms.append(float(z.square().mean(-1).sqrt().mean()))
        for block in model.blocks:
            z = block(z, None)
            rms.append(float(z.square().mean(-1).sqrt().mean()))
    return rms


def block_grad_norms(model) -> list[float]:
    return [float(torch.sqrt(sum(p.grad.square().sum() for p in b.parameters() if p.grad is not None)))
            for b in model.blocks]


def run(quick: bool = False, seed: int = 0) -> tuple[list[dict], dict]:
    torch.set_num_threads(1)
    x, y = digits()
    depths = [4, 8] if quick else [4, 8, 16, 24]
    steps = 15 if quick else 200
    train_depth = 4 if quick else 6
    batch = 64
    rows, init = [], {}
    # --- at init: stream RMS across depth, gradients per block
    for depth in depths:
        for placement in ("pre", "post"):
            model = make_model(placement, depth, seed)
            g = torch.Generator().manual_seed(seed)
            idx = torch.randint(0, x.shape[0], (256,), generator=g)
            rms = stream_rms(model, x[idx], y[idx], torch.Generator().manual_seed(seed + 1))
            model.zero_grad()
            eps_loss(model, x[idx], y[idx], torch.Generator().manual_seed(seed + 2)).backward()
            gn = block_grad_norms(model)
            w2 = float(model.blocks[-1].mlp.fc2.weight.grad.norm())
            init[(depth, placement)] = {"rms": rms, "grad": gn, "w2_last": w2}
            for layer in range(depth + 1):
                rows.append({"phase": "init", "placement": placement, "depth": depth, "layer": layer,
                             "step": 0, "stream_rms": rms[layer],
                             "block_grad_norm": gn[layer - 1] if layer else float("nan"), "loss": float("nan"),
                             "lr": float("nan")})
    # --- training: AdamW without warm-up at two learning rates
    curves = {}
    for lr in (1e-3, 1e-4):
        for placement in ("pre", "post"):
            model = make_model(placement, train_depth, seed)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
            g = torch.Generator().manual_seed(seed + 10)
            hist = []
            for step in range(1, steps + 1):
                idx = torch.randint(0, 1500, (batch,), generator=g)
                opt.zero_grad(set_to_none=True)
                loss = eps_loss(model, x[idx], y[idx], g)
                loss.backward()
                loss = loss.detach()
                gtot = float(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None)))
                glast = float(model.blocks[-1].mlp.fc2.weight.grad.norm())
                opt.step()
                hist.append((step, float(loss), gtot, glast))
            with torch.no_grad():
                ev = float(eps_loss(model, x[1500:], y[1500:], torch.Generator().manual_seed(99)))
            rms = stream_rms(model, x[1500:], y[1500:], torch.Generator().manual_seed(98))
            curves[(lr, placement)] = {"hist": hist, "eval": ev, "rms": rms}
            for step, loss, gtot, glast in hist:
                if step % max(1, steps // 30) == 0 or step == 1:
                    rows.append({"phase": "train", "placement": placement, "depth": train_depth, "layer": -1,
                                 "step": step, "stream_rms": float("nan"), "block_grad_norm": glast, "loss": loss,
                                 "lr": lr})
            for layer, r in enumerate(rms):
                rows.append({"phase": "trained", "placement": placement, "depth": train_depth, "layer": layer,
                             "step": steps, "stream_rms": r, "block_grad_norm": float("nan"), "loss": ev, "lr": lr})

    # --- headline
    dmax = depths[-1]
    pre, post = init[(dmax, "pre")], init[(dmax, "post")]
    ms = np.array(pre["rms"]) ** 2
    layers = np.arange(len(ms))
    lin = np.polyfit(layers, ms, 1)
    lin_r2 = 1 - np.sum((np.polyval(lin, layers) - ms) ** 2) / np.sum((ms - ms.mean()) ** 2)
    expo = np.polyfit(layers, np.log(ms), 1)
    exp_r2 = 1 - np.sum((np.polyval(expo, layers) - np.log(ms)) ** 2) / np.sum((np.log(ms) - np.log(ms).mean()) ** 2)
    headline = {
        "init_depth": dmax,
        "pre_ln_stream_rms_first_last": [pre["rms"][0], pre["rms"][-1]],
        "pre_ln_ms_linear_fit_slope_per_layer": float(lin[0]), "pre_ln_ms_linear_r2": float(lin_r2),
        "pre_ln_ms_exp_fit_rate_per_layer": float(expo[0]), "pre_ln_log_ms_linear_r2": float(exp_r2),
        "post_ln_stream_rms_max_abs_dev_from_1": float(max(abs(r - 1) for r in post["rms"][1:])),
        "w2_last_grad_post_over_pre_by_depth": {d: init[(d, "post")]["w2_last"] / init[(d, "pre")]["w2_last"]
                                                for d in depths},
        "last_over_first_block_grad_pre": pre["grad"][-1] / pre["grad"][0],
        "last_over_first_block_grad_post": post["grad"][-1] / post["grad"][0],
        "train_depth": train_depth, "train_steps": steps,
        "eval_loss": {f"{pl} lr={lr:g}": c["eval"] for (lr, pl), c in curves.items()},
        "final_train_loss_mean_last10pct": {
            f"{pl} lr={lr:g}": float(np.mean([h[1] for h in c["hist"][-max(1, steps // 10):]]))
            for (lr, pl), c in curves.items()},
        "max_grad_norm_first_10pct": {f"{pl} lr={lr:g}": float(max(h[2] for h in c["hist"][:max(1, steps // 10)]))
                                      for (lr, pl), c in curves.items()},
        "trained_stream_rms_last": {f"{pl} lr={lr:g}": c["rms"][-1] for (lr, pl), c in curves.items()},
    }
    settings = {"model": "DiT-tiny/2 (d=128, 4 heads), conditioning in-context, affine LayerNorm",
                "final_linear_init": "xavier (not zero)", "depths_at_init": depths, "train_depth": train_depth,
                "steps": steps, "batch": batch, "optimizer": "AdamW, wd 0, no warm-up", "lrs": [1e-3, 1e-4],
                "task": "eps-MSE on noised 8x8 digits, cosine schedule", "seed": seed, "threads": 1}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table([r for r in rows if r["phase"] == "init"],
                        ["placement", "depth", "layer", "stream_rms", "block_grad_norm"]))
    for k, v in meta["headline"].items():
        print(f"{k}: {v}")
    _common.write(args.out, "dit_prepost_ln", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import dit_prepost_ln

    with _common.figure_style(args):
        dit_prepost_ln(rows, _common.figure(args, "dit_prepost_ln"))
    return meta["headline"]


if __name__ == "__main__":
    main()
