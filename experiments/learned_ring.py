"""A learned score against the exact one on ring8: the same samplers, from the same x_T, through the same field wrapper.

An MLP (diffusion_lab.models.MLPScore) is trained on samples of the ring-of-8-Gaussians target under the VP schedule
with eps-prediction (DDPM's loss), and, as a second row, with EDM preconditioning on the same schedule. Each learned
field and the exact field are sampled by heun and dpmpp_2m at NFE 50 and by Euler-Maruyama (em, 200 steps) from the
same x_T and, for em, the same noise; the sliced W2 to fresh exact samples of p_0 is reported with the Monte-Carlo
floor, and the ratio learned / exact (target: within 2x). The learned field's generation is also run through the
Fokker-Planck grid solver (reverse SDE, gamma = 1, from the exact p_{t_max}) and its TV distance to the exact
data-side density p_{t_min} is reported next to the exact field's (the grid's own error).

    python -m experiments.learned_ring [--out results/experiments] [--quick]
"""
from __future__ import annotations

import time

import torch

from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.metrics import sliced_w2, sliced_w2_floor
from diffusion_lab.models import get_model
from diffusion_lab.samplers import sample
from diffusion_lab.targets import ring8

from . import _common

SAMPLERS = (("heun", 25), ("dpmpp_2m", 50), ("em", 200))


def train(prediction: str, quick: bool, seed: int):
    """Train an MLP on ring8 (VP schedule); returns (EMA network, objective, seconds, final loss)."""
    sch = S.VPLinear()
    g = torch.Generator().manual_seed(seed)
    data = ring8().sample(20_000 if quick else 100_000, g, dtype=torch.float32)
    torch.manual_seed(seed)
    net = get_model("mlp", data_shape=2, hidden=128, depth=3)
    obj = T.Objective(sch, prediction, sigma_data=round(float(data.std()), 4))
    tr = T.Trainer(net, obj, T.TensorLoader(data, batch_size=256 if quick else 1024, seed=seed), lr=2e-3,
                   ema_decay=0.999, seed=seed)
    t0 = time.perf_counter()
    tr.run(150 if quick else 3000, log_every=50)
    return tr.ema.module.eval(), obj, time.perf_counter() - t0, tr.history[-1]["loss"]


def fokker_planck_tv(field, quick: bool):
    """TV(grid density at t_min, exact p_{t_min}) of the reverse-SDE generation from the exact p_{t_max}; None if the
    Fokker-Planck package is missing."""
    try:
        from diffusion_lab.fokker_planck import Grid, solve_reverse
    except ImportError:
        return None
    sch = field.schedule
    grid = Grid.box(-5.0, 5.0, 48 if quick else 96, 2)
    sol = solve_reverse(field, ring8(), grid, [sch.t_max, sch.t_min], gamma=1.0, steps=30 if quick else 100,
                        target=ring8(), batch=1 << 15)
    return {"tv": float(sol.tv[-1]), "nfe": int(sol.nfe), "cells": grid.size, "steps": sol.steps,
            "mass_drift": sol.mass_drift}


def run(quick: bool = False, seed: int = 0):
    torch.set_num_threads(1)
    sch = S.VPLinear()
    tg = ring8()
    n = 1000 if quick else 4000
    g = torch.Generator().manual_seed(seed + 100)
    x_T = torch.randn(n, 2, dtype=torch.float64, generator=g) * float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    ref = tg.sample(n, g)
    floor, floor_se = sliced_w2_floor(lambda m, gg: tg.sample(m, gg), n, repeats=4, seed=seed + 7)
    exact = tg.field(sch)
    rows, trained, fp = [], {}, {}
    for prediction in (("eps",) if quick else ("eps", "edm")):
        net, obj, secs, loss = train(prediction, quick, seed)
        trained[prediction] = {"seconds": secs, "final_loss": loss, "sigma_data": obj.sigma_data}
        learned = T.learned_field(net, sch, prediction, sigma_data=obj.sigma_data)
        for method, steps in SAMPLERS:
            if quick and method == "em":
                steps = 50
            out = {}
            for name, f in (("learned", learned), ("exact", exact)):
                r = sample(f, x_T, method, steps=steps, final="denoise", generator=torch.Generator().manual_seed(seed + 1))
                out[name] = (sliced_w2(r.x, ref, generator=torch.Generator().manual_seed(seed + 3)), r.nfe, r.x)
            rows.append({"prediction": prediction, "sampler": method, "steps": steps, "nfe": out["learned"][1],
                         "sw2_learned": out["learned"][0], "sw2_exact": out["exact"][0],
                         "ratio": out["learned"][0] / out["exact"][0], "mc_floor": floor, "mc_floor_se": floor_se,
                         "train_seconds": secs})
            trained[prediction].setdefault("samples", {})[method] = out["learned"][2]
            trained["exact_samples_" + method] = out["exact"][2]
        fp[prediction] = fokker_planck_tv(learned, quick)
    fp["exact"] = fokker_planck_tv(exact, quick)
    eps_rows = [r for r in rows if r["prediction"] == "eps"]
    headline = {
        "ratio_eps_" + r["sampler"]: r["ratio"] for r in eps_rows
    }
    headline.update({"ratio_edm_" + r["sampler"]: r["ratio"] for r in rows if r["prediction"] == "edm"})
    headline["train_seconds"] = {k: v["seconds"] for k, v in trained.items() if isinstance(v, dict) and "seconds" in v}
    headline["fokker_planck_tv"] = {k: (v["tv"] if v else None) for k, v in fp.items()}
    settings = {"target": tg.settings(), "schedule": sch.settings(), "n_samples": n, "samplers": list(SAMPLERS),
                "final": "denoise", "model": "mlp(hidden=128, depth=3)", "train": {k: {kk: vv for kk, vv in v.items()
                                                                                       if kk != "samples"}
                                                                                   for k, v in trained.items()
                                                                                   if isinstance(v, dict) and "seconds" in v},
                "optimizer": "AdamW lr 2e-3, EMA 0.999, batch 1024 (256 quick), 3000 steps (150 quick)",
                "fokker_planck": fp, "seed": seed, "quick": quick}
    return rows, {"settings": settings, "headline": headline, "trained": trained, "ref": ref}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["prediction", "sampler", "nfe", "sw2_learned", "sw2_exact", "ratio", "mc_floor"]))
    fp = meta["settings"]["fokker_planck"]
    if fp.get("exact") is None:
        print("Fokker-Planck: diffusion_lab.fokker_planck not available; skipped")
    else:
        print("Fokker-Planck generation (reverse SDE from exact p_T), TV to exact p_{t_min}: "
              + ", ".join(f"{k} {v['tv']:.4f}" for k, v in fp.items() if v))
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in meta["headline"]["train_seconds"].items()))
    _common.write(args.out, "learned_ring", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import sample_panels

    tr = meta["trained"]
    panels = {"exact p_0 samples": meta["ref"], "exact field, heun": tr["exact_samples_heun"]}
    for pred in ("eps", "edm"):
        if pred in tr:
            for m in ("heun", "em"):
                panels[f"learned ({pred}), {m}"] = tr[pred]["samples"][m]
    with _common.figure_style(args):
        sample_panels(panels, _common.figure(args, "learned_ring"), lim=3.5)
    return meta["headline"]


if __name__ == "__main__":
    main()
