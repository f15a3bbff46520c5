"""DiT conditioning variants (in-context, cross-attention, adaLN, adaLN-Zero) on 8x8 digits at equal training budget.

Peebles & Xie 2023 (Fig. 5 / ablation table, DiT-XL/2 on ImageNet 256, 400K steps) order the variants by FID as
adaLN-Zero (19.47) < adaLN (25.21) < cross-attention (26.14) < in-context (35.24). Here each variant of the same
small DiT (``--model``, default DiT-tiny/2: d = 128, depth 4, patch 2) is trained with the same recipe as
experiments/digits_dit.py (EDM preconditioning on VPLinear, log-normal times, AdamW, EMA, label dropout 0.1 through
the model's null class) for the same number of steps, over several seeds, and judged like digits_dit: samples drawn
with CFG (dpmpp_2m, final denoise, the same x_T for every variant) are classified by an sklearn MLP fitted on the
training split; reported are the class accuracy and the Frechet distance between Gaussian fits of the classifier's
hidden features of samples and of the held-out digits, plus the held-out training loss (fixed t, eps).

How sure: per-variant mean and standard deviation over seeds, and for each adjacent pair of the paper's order the
difference of means in units of its standard error; the order "holds" only where every adjacent difference has the
paper's sign, and is "resolved" only where each is > 2 SE.

    python -m experiments.dit_conditioning [--out results/experiments] [--quick] [--model DiT-tiny/2]
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.guidance import classifier_free_guidance
from diffusion_lab.models import count_parameters, dit_flops, get_config, get_model
from diffusion_lab.samplers import sample
from diffusion_lab.targets import digits

from . import _common
from .digits_dit import Judge, frechet_distance

PAPER_ORDER = ("adaLN-Zero", "adaLN", "cross-attention", "in-context")  # best to worst FID
PAPER_FID = {"adaLN-Zero": 19.47, "adaLN": 25.21, "cross-attention": 26.14, "in-context": 35.24}


def run(quick: bool = False, seed: int = 0, model: str | None = None, steps: int | None = None,
        seeds: int | None = None) -> tuple[list[dict], dict]:
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(1)
    x, y = digits(return_labels=True)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y.numpy())
    x_tr, y_tr, x_te, y_te = x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]
    flat = lambda a: a.reshape(a.shape[0], -1).double().numpy()  # noqa: E731
    judge = Judge(flat(x_tr), y_tr.numpy(), 0)
    feats_te = judge.features(flat(x_te))
    fd_floor = frechet_distance(judge.features(flat(x_tr)), feats_te)

    model = model or ("DiT-micro/2" if quick else "DiT-tiny/2")
    steps = steps or (40 if quick else 200)
    n_seeds = seeds or (1 if quick else 2)
    batch, w_cfg = 64, 1.0
    per_class = 3 if quick else 20
    sch = S.VPLinear()
    sigma_data = round(float(x_tr.std()), 4)
    obj = T.Objective(sch, "edm", time_sampler="lognormal", sigma_data=sigma_data)
    ge = torch.Generator().manual_seed(777)
    t_eval, eps_eval = obj.draw(x_te.double(), ge)
    labels = torch.arange(10).repeat_interleave(per_class)
    rows = []
    for s in range(seed, seed + n_seeds):
        g = torch.Generator().manual_seed(10_000 + s)
        x_T = torch.randn(len(labels), 1, 8, 8, dtype=torch.float64, generator=g) * float(
            sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
        for cond in PAPER_ORDER:
            torch.manual_seed(s)
            net = get_model(model, num_classes=10, conditioning=cond)
            tr = T.Trainer(net, obj, T.TensorLoader(x_tr, y_tr, batch, seed=s), lr=1e-3,
                           warmup=0 if quick else 50, ema_decay=0.95 if quick else 0.99, seed=s)
            t0 = time.perf_counter()
            tr.run(steps, log_every=max(1, steps // 10))
            secs = time.perf_counter() - t0
            ema = tr.ema.module.eval()
            with torch.no_grad():
                ev = float(obj(ema, x_te.float(), y_te, t=t_eval.float(), eps=eps_eval.float()))
            field = T.learned_field(ema, sch, "edm", sigma_data=sigma_data, labels=labels)
            r = sample(classifier_free_guidance(field, w_cfg, labels), x_T, "dpmpp_2m", steps=10 if quick else 20,
                       final="denoise")
            xs = r.x.clamp(-1, 1).float()
            pred = judge.predict(flat(xs))
            losses = [h["loss"] for h in tr.history]
            rows.append({"seed": s, "conditioning": cond, "params": count_parameters(net),
                         "macs": dit_flops(get_config(model, num_classes=10, conditioning=cond)),
                         "train_loss_last": float(np.mean(losses[-max(1, len(losses) // 5):])),
                         "heldout_loss": ev, "accuracy": float((pred == labels.numpy()).mean()),
                         "frechet": frechet_distance(judge.features(flat(xs)), feats_te), "train_seconds": secs})

    def stats(key):
        out = {}
        for c in PAPER_ORDER:
            v = np.array([r[key] for r in rows if r["conditioning"] == c])
            out[c] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan"), len(v))
        return out

    fd, acc, hl = stats("frechet"), stats("accuracy"), stats("heldout_loss")
    pairs = []
    for a, b in zip(PAPER_ORDER[:-1], PAPER_ORDER[1:]):
        se = math.sqrt(fd[a][1] ** 2 / fd[a][2] + fd[b][1] ** 2 / fd[b][2]) if n_seeds > 1 else float("nan")
        pairs.append({"better": a, "worse": b, "fd_diff": fd[b][0] - fd[a][0],
                      "z": (fd[b][0] - fd[a][0]) / se if se and se == se else float("nan")})
    holds = all(p["fd_diff"] > 0 for p in pairs)
    resolved = all(p["z"] > 2 for p in pairs)
    headline = {
        "frechet_mean_sd": {c: fd[c][:2] for c in PAPER_ORDER},
        "accuracy_mean_sd": {c: acc[c][:2] for c in PAPER_ORDER},
        "heldout_loss_mean_sd": {c: hl[c][:2] for c in PAPER_ORDER},
        "order_by_frechet": sorted(PAPER_ORDER, key=lambda c: fd[c][0]),
        "order_by_heldout_loss": sorted(PAPER_ORDER, key=lambda c: hl[c][0]),
        "paper_order": list(PAPER_ORDER), "paper_fid": PAPER_FID, "adjacent_pairs": pairs,
        "paper_order_holds_in_means": holds, "paper_order_resolved_2se": resolved,
        "frechet_floor_real_train_vs_heldout": fd_floor, "seeds": n_seeds, "steps": steps,
    }
    settings = {"model": model, "steps": steps, "batch": batch, "seeds": list(range(seed, seed + n_seeds)),
                "objective": obj.settings(), "optimizer": "AdamW lr 1e-3", "cfg_w": w_cfg, "per_class": per_class,
                "sampler": "dpmpp_2m", "judge": "experiments.digits_dit.Judge", "quick": quick}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "results/experiments")
    p.add_argument("--model", default=None, help="DiT config (default DiT-tiny/2; DiT-micro/2 with --quick)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None)
    args = p.parse_args(argv)
    rows, meta = run(args.quick, args.seed, args.model, args.steps, args.seeds)
    print(_common.table(rows, ["seed", "conditioning", "params", "train_loss_last", "heldout_loss", "accuracy",
                               "frechet", "train_seconds"]))
    for k, v in meta["headline"].items():
        print(f"{k}: {v}")
    _common.write(args.out, "dit_conditioning", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import dit_conditioning

    with _common.figure_style(args):
        dit_conditioning(rows, _common.figure(args, "dit_conditioning"))
    return meta["headline"]


if __name__ == "__main__":
    main()
