"""A class-conditional DiT on sklearn's 8x8 digits, trained on CPU, sampled with classifier-free guidance.

The digits are split into a training and a held-out set (stratified, 75/25). The DiT (the package's
``DiT-tiny/2``: d = 128, depth 4, patch 2 -> 16 tokens, label dropout 0.1 for the null class) is trained on the
training split with EDM preconditioning on the VP schedule (log-normal training times), AdamW and an EMA. A classifier
fitted in the experiment on the same training split (scikit-learn MLP, one hidden ReLU layer of 64 units) then judges
samples drawn with a deterministic sampler (dpmpp_2m, final denoise) from the same x_T for several CFG weights w
(eps~ = (1+w) eps(x|c) - w eps(x|null); w = 0 is plain conditional sampling): the fraction of samples assigned to the
requested class, and the Frechet distance between Gaussian fits of the classifier's hidden features of the samples
and of the held-out real digits (the distance between the training and held-out real sets is the floor).

    python -m experiments.digits_dit [--out results/experiments] [--quick]
"""
from __future__ import annotations

import time

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.guidance import classifier_free_guidance
from diffusion_lab.models import get_model
from diffusion_lab.samplers import sample
from diffusion_lab.targets import digits

from . import _common

W_VALUES = (0.0, 0.5, 1.0, 2.0, 4.0)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu_1 - mu_2||^2 + tr(C_1 + C_2 - 2 (C_1 C_2)^{1/2}) between Gaussian fits of two feature sets (Heusel et
    al. 2017's FID formula, here in the experiment classifier's feature space)."""
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    # tr (C1 C2)^{1/2} = tr (C1^{1/2} C2 C1^{1/2})^{1/2}: symmetric PSD eigenproblems, stable for singular covariances
    ev, U = np.linalg.eigh(c1)
    s1 = (U * np.sqrt(np.clip(ev, 0, None))) @ U.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(s1 @ c2 @ s1), 0, None)).sum()
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2.0 * tr_sqrt)


class Judge:
    """An sklearn MLP classifier on flattened digits in [-1, 1]; ``features`` = its hidden ReLU activations."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int):
        from sklearn.neural_network import MLPClassifier

        self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=600, random_state=seed).fit(x, y)

    def features(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.clf.predict(x)


def run(quick: bool = False, seed: int = 0, model: str | None = None):
    from sklearn.model_selection import train_test_split

    torch.set_num_threads(1)
    x, y = digits(return_labels=True)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y.numpy())
    x_tr, y_tr, x_te, y_te = x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]
    flat = lambda a: a.reshape(a.shape[0], -1).double().numpy()  # noqa: E731
    judge = Judge(flat(x_tr), y_tr.numpy(), seed)
    judge_acc = float((judge.predict(flat(x_te)) == y_te.numpy()).mean())
    fd_floor = frechet_distance(judge.features(flat(x_tr)), judge.features(flat(x_te)))

    # -- train
    model = model or ("DiT-micro/2" if quick else "DiT-tiny/2")
    steps, batch = (60, 64) if quick else (2500, 128)
    sch = S.VPLinear()
    torch.manual_seed(seed)
    net = get_model(model, num_classes=10)
    sigma_data = round(float(x_tr.std()), 4)
    obj = T.Objective(sch, "edm", time_sampler="lognormal", sigma_data=sigma_data)
    tr = T.Trainer(net, obj, T.TensorLoader(x_tr, y_tr, batch, seed=seed), lr=1e-3 if not quick else 2e-3,
                   warmup=0 if quick else 100, ema_decay=0.999 if not quick else 0.95, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    tr.run(steps, log_every=50 if not quick else 20)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ema = tr.ema.module.eval()

    # -- sample with CFG from the same x_T for every w
    per_class = 5 if quick else 50
    labels = torch.arange(10).repeat_interleave(per_class)
    g = torch.Generator().manual_seed(seed + 1)
    x_T = torch.randn(len(labels), 1, 8, 8, dtype=torch.float64, generator=g) * float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    method, n_steps = "dpmpp_2m", (10 if quick else 30)
    field = T.learned_field(ema, sch, "edm", sigma_data=sigma_data, labels=labels)
    rows, grids = [], {}
    feats_te = judge.features(flat(x_te))
    for w in W_VALUES if not quick else (0.0, 2.0):
        f = classifier_free_guidance(field, w, labels)
        t1 = time.perf_counter()
        r = sample(f, x_T, method, steps=n_steps, final="denoise")
        secs = time.perf_counter() - t1
        xs = r.x.clamp(-1, 1).float()
        pred = judge.predict(flat(xs))
        acc = float((pred == labels.numpy()).mean())
        per_cls = [float((pred[labels.numpy() == c] == c).mean()) for c in range(10)]
        rows.append({"w": w, "gamma": 1 + w, "accuracy": acc, "min_class_accuracy": min(per_cls),
                     "frechet": frechet_distance(judge.features(flat(xs)), feats_te), "nfe": r.nfe,
                     "sample_seconds": secs})
        grids[w] = xs
    best = max(rows, key=lambda r: r["accuracy"])
    headline = {"accuracy_no_guidance": rows[0]["accuracy"], "best_accuracy": best["accuracy"], "best_w": best["w"],
                "frechet_no_guidance": rows[0]["frechet"], "frechet_at_best_w": best["frechet"],
                "frechet_floor_real_train_vs_heldout": fd_floor, "judge_heldout_accuracy": judge_acc,
                "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "target_met": best["accuracy"] >= 0.9}
    settings = {"model": model, "params": sum(p.numel() for p in net.parameters()), "schedule": sch.settings(),
                "objective": obj.settings(), "steps": steps, "batch": batch, "optimizer": "AdamW",
                "lr": tr.base_lr, "ema": tr.ema.decay, "train_size": len(idx_tr), "heldout_size": len(idx_te),
                "sampler": method, "sampler_steps": n_steps, "final": "denoise", "per_class": per_class,
                "judge": "sklearn MLPClassifier(hidden_layer_sizes=(64,)), features = hidden ReLU layer",
                "w_values": [r["w"] for r in rows], "seed": seed, "quick": quick,
                "final_train_loss": tr.history[-1]["loss"]}
    return rows, {"settings": settings, "headline": headline, "grids": grids, "history": tr.history}


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "results/experiments")
    p.add_argument("--model", default=None, help="DiT config (default DiT-tiny/2; DiT-micro/2 with --quick)")
    args = p.parse_args(argv)
    rows, meta = run(args.quick, args.seed, args.model)
    print(_common.table(rows, ["w", "accuracy", "min_class_accuracy", "frechet", "nfe", "sample_seconds"]))
    h = meta["headline"]
    print(f"{meta['settings']['model']} trained {h['train_seconds']:.0f} s wall ({h['train_cpu_seconds']:.0f} s CPU); accuracy without guidance "
          f"{h['accuracy_no_guidance']:.3f}, best {h['best_accuracy']:.3f} at w={h['best_w']:g}; judge held-out accuracy "
          f"{h['judge_heldout_accuracy']:.3f}; Frechet floor (real vs real) {h['frechet_floor_real_train_vs_heldout']:.3f}")
    _common.write(args.out, "digits_dit", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import image_grid, loss_curve

    per_w = 4  # rows: classes; blocks of columns: CFG weights
    ws = list(meta["grids"])
    grid_rows = []
    for c in range(10):
        row = []
        for w in ws:
            xs = meta["grids"][w]
            per = len(xs) // 10
            row.extend(xs[c * per: c * per + min(per, per_w)])
        grid_rows.append(row)
    n_per = len(grid_rows[0]) // len(ws)
    col_titles = [f"w={w:g}" if j == 0 else "" for w in ws for j in range(n_per)]
    with _common.figure_style(args):
        image_grid(grid_rows, _common.figure(args, "digits_dit"), row_titles=[f"class {c}" for c in range(10)],
                   col_titles=col_titles,
                   title=f"{meta['settings']['model']}, {meta['settings']['sampler']}: rows = requested class, column blocks "
                         f"= CFG weight w")
    with _common.figure_style(args):
        loss_curve(meta["history"], _common.figure(args, "digits_dit_loss"), title="DiT on digits: training loss")
    return h


if __name__ == "__main__":
    main()
