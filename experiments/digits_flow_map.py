"""Flow maps distilled from a class-conditional DiT on the 8x8 digits: one and two network calls against the
teacher's multi-step sampler, judged by a held-out-trained classifier; and the teacher's ELBO beside its PF-ODE
likelihood.

Teacher: the class-conditional ``DiT-tiny/2`` of ``experiments.digits_dit`` (same split, same recipe, same judge;
the trained weights are cached in ``--cache``), evaluated as a conditional field without guidance (w = 0, the
default) or, with ``--guidance W``, as the classifier-free-guided field (1 + w) eps(x|c) - w eps(x|null) (Ho &
Salimans 2022; two network evaluations per call), for the teacher's own rows and as the distillation teacher alike
(the student then learns the guided map in one call per step, as in guided distillation, Meng et al. 2023).

Student: ``flowmap.FlowMap`` around ``flowmap.TwoTimeDiT.from_dit(teacher)``: the teacher's DiT plus an embedding
of the end time t with a zero-initialised output layer, so the student starts as the teacher's one-step DDIM map
(Song et al. 2023 initialise the consistency model from the teacher the same way). It is trained by consistency
distillation (``--methods cd``, Song et al. 2023, Algorithm 2: one Heun step of the teacher between adjacent times of
a log-SNR-uniform grid of N intervals, l2 distance, target EMA mu = 0.95) or its two-time version (``ctm``), with
class labels: every step draws the labels of its x_0 and evaluates teacher and student at them.

The configuration is fixed before any run (``DISTILL``): N = 18 intervals, Adam at 2e-4, batch 64, 2000 steps
(quick: a DiT-micro/2 teacher of 60 steps, 40 distillation steps). Sampling, on the same x_T for every row:

- teacher: dpmpp_2m with 30 steps and a final denoising step (the reference sampler of ``experiments.digits_dit``),
  and at the student's budgets: DDIM with 1 and 2 steps, DPM-Solver++(2M) with 2 steps (no final step);
- student: 1 call, Psi(x_T, T, t_min); 2 calls, multistep consistency sampling (Song et al. 2023, Algorithm 1:
  back to t_min, re-noised to the log-SNR midpoint, back to t_min) and, for the two-time map, also the
  deterministic chain Psi(Psi(x_T, T, u), u, t_min);
- scores: the fraction of samples the judge assigns to the requested class, its minimum over classes, and the
  Frechet distance between Gaussian fits of the judge's hidden features of the samples and of the held-out digits
  (the real-vs-real distance is the floor).

Variational view: on ``n_likelihood`` held-out digits, the teacher's unconditional branch (null class; the DiT was
trained with label dropout) gives the continuous-time ELBO (Kingma et al. 2021; ``elbo.continuous_elbo``, Gaussian
decoder at t_min, prior N(0, alpha_T^2 sigma_data^2 + sigma_T^2)) and the PF-ODE log-likelihood of the same digits
noised to t_min (``likelihood.log_likelihood``, Hutchinson divergence), in bits/dim.

    python -m experiments.digits_flow_map [--out results/experiments] [--quick] [--cache DIR] [--methods "cd ctm"]
                                          [--guidance W]
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from diffusion_lab import training as T
from diffusion_lab.flowmap import ConsistencyTrainer, FlowMap, TwoTimeDiT, flow_map_sample
from diffusion_lab.samplers import sample, time_grid

from . import _common
from . import digits_dit as DD

DEFAULT_CACHE = "results/cache"

#: the distillation recipe, fixed before any run
DISTILL = {
    False: {"steps": 2000, "batch": 64, "grid_steps": 18, "lr": 2e-4, "solver": "heun", "target_decay": 0.95,
            "ema_decay": 0.999, "per_class": 50, "n_likelihood": 100, "log_every": 50},
    True: {"steps": 40, "batch": 32, "grid_steps": 8, "lr": 2e-4, "solver": "heun", "target_decay": 0.95,
           "ema_decay": 0.9, "per_class": 5, "n_likelihood": 8, "log_every": 10},
}
METHODS = ("cd", "ctm")


def _score(judge, xs: torch.Tensor, labels: torch.Tensor, feats_te: np.ndarray) -> dict:
    pred = judge.predict(DD.flat(xs))
    lab = labels.numpy()
    per_cls = [float((pred[lab == c] == c).mean()) for c in np.unique(lab)]
    return {"accuracy": float((pred == lab).mean()), "min_class_accuracy": min(per_cls),
            "frechet": DD.frechet_distance(judge.features(DD.flat(xs)), feats_te)}


def distill_student(method: str, teacher_field, teacher_net, sch, sigma_data: float, x_tr, y_tr, cfg: dict,
                    seed: int, log=print):
    """The class-conditional flow map distilled from ``teacher_field`` (module docstring); (EMA map, trainer, CPU s)."""
    torch.manual_seed(seed)
    psi = FlowMap(TwoTimeDiT.from_dit(teacher_net).train(), sch, sigma_data)
    tr = ConsistencyTrainer(psi, teacher_field, x_tr, labels=y_tr, method=method, solver=cfg["solver"],
                            batch=cfg["batch"], grid_steps=cfg["grid_steps"], lr=cfg["lr"],
                            target_decay=cfg["target_decay"], ema_decay=cfg["ema_decay"], seed=seed,
                            log_every=cfg["log_every"])
    c0 = time.process_time()
    tr.run(cfg["steps"], on_log=lambda r: log(f"  {method} step {r['step']:>5}  loss {r['loss']:.3e}"))
    return tr.flow_map(), tr, time.process_time() - c0


def variational(net, sch, sigma_data: float, x_te: torch.Tensor, n: int, seed: int) -> dict:
    """-ELBO and the PF-ODE NLL (bits/dim, with standard errors) of the teacher's unconditional branch on n held-out
    digits (module docstring)."""
    from diffusion_lab.elbo import continuous_elbo
    from diffusion_lab.likelihood import log_likelihood

    field = T.learned_field(net, sch, "edm", sigma_data=sigma_data)  # no labels: the null class
    g = torch.Generator().manual_seed(seed + 7)
    x0 = x_te[torch.randperm(x_te.shape[0], generator=g)[:n]].to(torch.float64)
    d = x0[0].numel()
    bpd = d * math.log(2.0)
    c0 = time.process_time()
    el = continuous_elbo(field, x0, n_t=32, n_rep=4, data_var=sigma_data ** 2, generator=g)
    elbo_cpu = time.process_time() - c0
    tt = torch.tensor(sch.t_min, dtype=torch.float64)
    x = sch.alpha(tt) * x0 + sch.sigma(tt) * torch.randn(x0.shape, dtype=torch.float64, generator=g)
    c0 = time.process_time()
    ll = log_likelihood(field, x, divergence="hutchinson", n_probes=4, rtol=1e-5, atol=1e-7, generator=g)
    nll_cpu = time.process_time() - c0
    neg_elbo = -el.elbo
    nll = -ll.log_prob
    return {"n": n, "neg_elbo_bits_per_dim": float(neg_elbo.mean()) / bpd,
            "neg_elbo_se": float(neg_elbo.std() / math.sqrt(n)) / bpd,
            "elbo_terms_nats": {k: float(v.mean()) for k, v in el.terms.items()},
            "nll_bits_per_dim": float(nll.mean()) / bpd, "nll_se": float(nll.std() / math.sqrt(n)) / bpd,
            "gap_bits_per_dim": float((neg_elbo - nll).mean()) / bpd,
            "gap_se": float((neg_elbo - nll).std() / math.sqrt(n)) / bpd,
            "elbo_evaluations_per_sample": el.extra["evaluations"], "nll_nfe": ll.nfe,
            "elbo_cpu_seconds": elbo_cpu, "nll_cpu_seconds": nll_cpu}


def _teacher_field(net, sch, sd, w: float, labels=None):
    from diffusion_lab.guidance import classifier_free_guidance

    field = T.learned_field(net, sch, "edm", sigma_data=sd, labels=labels)
    return field if w == 0 else classifier_free_guidance(field, w, 0 if labels is None else labels)


def run(quick: bool = False, seed: int = 0, cache: str | None = DEFAULT_CACHE, methods=("cd",), log=print,
        guidance: float = 0.0):
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown distillation method {m!r}; choose from {METHODS}")
    torch.set_num_threads(1)
    cfg = DISTILL[bool(quick)]
    d = DD.split(seed)
    judge, x_te = d["judge"], d["x_te"]
    feats_te = judge.features(DD.flat(x_te))
    te = DD.train_teacher(d["x_tr"], d["y_tr"], quick, seed, None, cache)
    net, sch, sd = te["net"], te["schedule"], te["sigma_data"]
    log(f"teacher {te['settings']['model']}: {te['train_cpu_seconds']:.0f} CPU s"
        + (f" (cached {te['cached']})" if te["cached"] else ""))

    labels = torch.arange(10).repeat_interleave(cfg["per_class"])
    g = torch.Generator().manual_seed(seed + 1)
    x_T = torch.randn(len(labels), *net.data_shape, dtype=torch.float64, generator=g) * \
        float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    field = _teacher_field(net, sch, sd, guidance, labels)
    rows, grids = [], {}

    def add(who, how, xs, nfe, secs, **extra):
        xs = xs.clamp(-1, 1).float()
        rows.append({"model": who, "sampler": how, "nfe": nfe, **_score(judge, xs, labels, feats_te),
                     "sample_seconds": secs, **extra})
        grids[f"{who}: {how}"] = xs

    for method, steps, final in (("dpmpp_2m", 30, "denoise"), ("ddim", 1, "step"), ("ddim", 2, "step"),
                                 ("dpmpp_2m", 2, "step")):
        t1 = time.perf_counter()
        r = sample(field, x_T, method, steps=steps, final=final)
        add("teacher", f"{method} {steps} steps" + (" + denoise" if final == "denoise" else ""), r.x, r.nfe,
            time.perf_counter() - t1)

    train_info = {}
    mid = time_grid(sch, 2, "logsnr")
    for m in methods:
        psi, tr, cpu = distill_student(m, _teacher_field(net, sch, sd, guidance), net, sch, sd,
                                       d["x_tr"], d["y_tr"], cfg, seed, log)
        train_info[m] = {"cpu_seconds": cpu, "teacher_calls": tr.teacher_calls,
                         "teacher_evals": tr.teacher_calls * tr.batch, "final_loss": tr.history[-1]["loss"],
                         "history": tr.history, "settings": tr.settings()}
        gen = torch.Generator().manual_seed(seed + 2)
        runs = [("1 call", {"steps": 1}), ("2 calls, re-noised (Alg. 1)", {"steps": 2, "noise_reinjection": True,
                                                                         "generator": gen})]
        if m == "ctm":
            runs.append(("2 calls, chain", {"steps": 2}))
        for how, kw in runs:
            t1 = time.perf_counter()
            r = flow_map_sample(psi, x_T, labels=labels, **kw)
            add(f"{m} map", how, r.x, r.nfe, time.perf_counter() - t1)
    var = variational(net, sch, sd, x_te, cfg["n_likelihood"], seed)

    ref = rows[0]
    by = {(r["model"], r["sampler"]): r for r in rows}
    headline = {"teacher_accuracy": ref["accuracy"], "teacher_frechet": ref["frechet"], "teacher_nfe": ref["nfe"],
                "frechet_floor_real_train_vs_heldout": d["fd_floor"], "judge_heldout_accuracy": d["judge_acc"],
                "teacher_ddim_1_accuracy": by[("teacher", "ddim 1 steps")]["accuracy"],
                "teacher_ddim_1_frechet": by[("teacher", "ddim 1 steps")]["frechet"],
                "teacher_train_cpu_seconds": te["train_cpu_seconds"], "variational": var}
    for m in methods:
        one, two = by[(f"{m} map", "1 call")], by[(f"{m} map", "2 calls, re-noised (Alg. 1)")]
        headline[m] = {"accuracy_1": one["accuracy"], "frechet_1": one["frechet"], "accuracy_2": two["accuracy"],
                       "frechet_2": two["frechet"], "distill_cpu_seconds": train_info[m]["cpu_seconds"],
                       "teacher_evals": train_info[m]["teacher_evals"]}
    settings = {"teacher": te["settings"], "distill": dict(cfg, methods=list(methods)),
                "student": "FlowMap(TwoTimeDiT.from_dit(teacher)), EDM preconditioning, sigma_data %.4f" % sd,
                "two_call_midpoint": float(mid[1]), "guidance": "none (w = 0, conditional)" if guidance == 0 else f"classifier-free, w = {guidance:g}",
                "judge": "sklearn MLPClassifier(hidden_layer_sizes=(64,)), features = hidden ReLU layer",
                "seed": seed, "quick": quick,
                "distill_runs": {m: {k: v for k, v in i.items() if k != "history"} for m, i in train_info.items()}}
    return rows, {"settings": settings, "headline": headline, "grids": grids, "train": train_info}


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "results/experiments")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help=f"where the teacher's weights are cached (default {DEFAULT_CACHE}; none with --quick; '' = off)")
    p.add_argument("--methods", default="cd", help=f"distillation methods, from {' '.join(METHODS)} (default cd)")
    p.add_argument("--guidance", type=float, default=0.0, metavar="W",
                   help="classifier-free guidance weight w of the teacher (default 0: conditional, unguided)")
    args = p.parse_args(argv)
    if not args.guidance >= 0:
        p.error(f"--guidance must be >= 0, got {args.guidance}")
    cache = (None if args.quick else DEFAULT_CACHE) if args.cache is None else (args.cache or None)
    rows, meta = run(args.quick, args.seed, cache, tuple(args.methods.split()), guidance=args.guidance)
    print(_common.table(rows, ["model", "sampler", "nfe", "accuracy", "min_class_accuracy", "frechet",
                               "sample_seconds"]))
    h, v = meta["headline"], meta["headline"]["variational"]
    print(f"Frechet floor (real vs real) {h['frechet_floor_real_train_vs_heldout']:.3f}; judge held-out accuracy "
          f"{h['judge_heldout_accuracy']:.3f}")
    for m in meta["train"]:
        t = meta["train"][m]
        print(f"{m}: {t['settings']['steps']} steps, {t['cpu_seconds']:.0f} CPU s, {t['teacher_evals']:,} teacher "
              f"evaluations")
    print(f"teacher (null class) on {v['n']} held-out digits: -ELBO {v['neg_elbo_bits_per_dim']:.4f} +- "
          f"{v['neg_elbo_se']:.4f} bits/dim, PF-ODE NLL {v['nll_bits_per_dim']:.4f} +- {v['nll_se']:.4f} bits/dim, "
          f"gap {v['gap_bits_per_dim']:+.4f} +- {v['gap_se']:.4f}")
    name = "digits_flow_map" if args.guidance == 0 else f"digits_flow_map_w{args.guidance:g}"
    _common.write(args.out, name, rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import image_grid, loss_curve

    names = list(meta["grids"])
    per = 3
    grid_rows = []
    for c in range(10):
        row = []
        for key in names:
            xs = meta["grids"][key]
            k = len(xs) // 10
            row.extend(xs[c * k: c * k + min(k, per)])
        grid_rows.append(row)
    n_per = len(grid_rows[0]) // len(names)
    col_titles = [key.replace(" steps", "").replace(", re-noised (Alg. 1)", " +noise") if j == 0 else ""
                  for key in names for j in range(n_per)]
    with _common.figure_style(args):
        image_grid(grid_rows, _common.figure(args, name), row_titles=[f"class {c}" for c in range(10)],
                   col_titles=col_titles, title="digits: teacher samplers and distilled flow maps (same x_T)")
    for m, t in meta["train"].items():
        with _common.figure_style(args):
            loss_curve(t["history"], _common.figure(args, f"{name}_{m}_loss"),
                       title=f"{m} distillation of the digits DiT: loss")
    return h


if __name__ == "__main__":
    main()
