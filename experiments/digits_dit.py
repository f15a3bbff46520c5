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


def split(seed: int = 0) -> dict:
    """The stratified 75/25 split of the digits, the judge fitted on the training part, its held-out accuracy and
    the real-vs-real Frechet floor: a dict with x_tr, y_tr, x_te, y_te, judge, judge_acc, fd_floor."""
    from sklearn.model_selection import train_test_split

    x, y = digits(return_labels=True)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=y.numpy())
    x_tr, y_tr, x_te, y_te = x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]
    judge = Judge(flat(x_tr), y_tr.numpy(), seed)
    return {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te, "judge": judge,
            "judge_acc": float((judge.predict(flat(x_te)) == y_te.numpy()).mean()),
            "fd_floor": frechet_distance(judge.features(flat(x_tr)), judge.features(flat(x_te)))}


def flat(a) -> np.ndarray:
    """(N, C, H, W) tensor -> (N, C*H*W) float64 array."""
    return a.reshape(a.shape[0], -1).double().numpy()


def train_teacher(x_tr, y_tr, quick: bool = False, seed: int = 0, model: str | None = None, cache: str | None = None,
                  log_every: int | None = None) -> dict:
    """The class-conditional DiT of this experiment trained on (x_tr, y_tr) (module docstring's recipe): a dict with
    ``net`` (the EMA network, eval mode), ``schedule``, ``sigma_data``, ``objective``, ``settings``, ``history``,
    ``train_seconds`` and ``train_cpu_seconds``. With ``cache`` (a folder) the EMA weights and the log are stored
    there under a hash of the recipe and the data and reused (read with ``weights_only=True``)."""
    import hashlib
    import json
    import os

    model = model or ("DiT-micro/2" if quick else "DiT-tiny/2")
    steps, batch = (60, 64) if quick else (2500, 128)
    lr, warmup, ema_decay = (2e-3, 0, 0.95) if quick else (1e-3, 100, 0.999)
    sch = S.VPLinear()
    sigma_data = round(float(x_tr.std()), 4)
    obj = T.Objective(sch, "edm", time_sampler="lognormal", sigma_data=sigma_data)
    settings = {"model": model, "schedule": sch.settings(), "objective": obj.settings(), "steps": steps,
                "batch": batch, "optimizer": "AdamW", "lr": lr, "warmup": warmup, "ema": ema_decay, "seed": seed,
                "train_size": int(x_tr.shape[0])}
    path = None
    if cache:
        key = json.dumps([settings, hashlib.sha1(x_tr.contiguous().numpy().tobytes()).hexdigest(),
                          hashlib.sha1(y_tr.contiguous().numpy().tobytes()).hexdigest()], sort_keys=True, default=str)
        path = os.path.join(cache, f"digits-dit-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
    torch.manual_seed(seed)
    net = get_model(model, num_classes=10)
    settings["params"] = sum(p.numel() for p in net.parameters())
    if path and os.path.isfile(path):
        saved = torch.load(path, weights_only=True)
        net.load_state_dict(saved["ema"])
        return {"net": net.eval(), "schedule": sch, "sigma_data": sigma_data, "objective": obj, "settings": settings,
                "history": saved["history"], "train_seconds": float(saved["train_seconds"]),
                "train_cpu_seconds": float(saved["train_cpu_seconds"]), "cached": path}
    tr = T.Trainer(net, obj, T.TensorLoader(x_tr, y_tr, batch, seed=seed), lr=lr, warmup=warmup, ema_decay=ema_decay,
                   seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    tr.run(steps, log_every=log_every or (20 if quick else 50))
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    ema = tr.ema.module.eval()
    settings["final_train_loss"] = tr.history[-1]["loss"]
    if path:
        from diffusion_lab._io import atomic_write

        os.makedirs(cache, exist_ok=True)
        saved = {"ema": ema.state_dict(), "history": [dict(r) for r in tr.history], "train_seconds": train_seconds,
                 "train_cpu_seconds": train_cpu_seconds}
        atomic_write(path, lambda f: torch.save(saved, f))
    return {"net": ema, "schedule": sch, "sigma_data": sigma_data, "objective": obj, "settings": settings,
            "history": tr.history, "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
            "cached": None}


def run(quick: bool = False, seed: int = 0, model: str | None = None):
    torch.set_num_threads(1)
    d = split(seed)
    x_tr, y_tr, x_te, y_te, judge = d["x_tr"], d["y_tr"], d["x_te"], d["y_te"], d["judge"]
    judge_acc, fd_floor = d["judge_acc"], d["fd_floor"]

    # -- train
    te = train_teacher(x_tr, y_tr, quick, seed, model)
    ema, sch, sigma_data = te["net"], te["schedule"], te["sigma_data"]
    train_seconds, train_cpu_seconds = te["train_seconds"], te["train_cpu_seconds"]

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
    settings = dict(te["settings"], heldout_size=int(x_te.shape[0]), sampler=method, sampler_steps=n_steps,
                    final="denoise", per_class=per_class,
                    judge="sklearn MLPClassifier(hidden_layer_sizes=(64,)), features = hidden ReLU layer",
                    w_values=[r["w"] for r in rows], quick=quick)
    return rows, {"settings": settings, "headline": headline, "grids": grids, "history": te["history"]}


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
