#!/usr/bin/env python
r"""Optimised time grids against the best fixed grid, per sampler, target and NFE budget.

For each target (exact fields under the VP-linear schedule, t from 1 to 1e-3) and each method at NFE 5, 10, 20
(``plan_for_nfe``: heun's last step is Euler, dpm_solver_3 takes DPM-Solver-fast's orders), the terminal error

    E(grid) = mean over held-out x_T of || x_N(grid) - Phi_{t_max -> t_min}(x_T) ||

against the exact flow map (``reference.flow_map``: DOP853, rtol 1e-10) is measured for the four fixed grids
(logsnr, karras, uniform, quadratic), for the DP grid alone and for the grid ``optimize_grid`` returns (DP, then
terminal-error refinement on the pilot batch). The held-out x_T (N(0, sigma(t_max)^2 I), seed 12345) are not the
pilot. gain = E(best fixed grid) / E(optimised). The optimiser's cost is its exact NFE (model calls; each on the
pilot batch) and seconds; the teacher and the step-cost tables are computed once per (target, method) and reused
for the other budgets (cache), so the first budget of each pair carries them. Column ays: the Align Your Steps
SD1.5 schedule interpolated to N steps (it starts at sigmabar = 14.615, so its x_init is the exact flow of x_T to
that time; its error is over the same terminal reference).

With --learned, the same for an MLP trained on ring8 (eps prediction, a few hundred steps; under two minutes of
CPU), whose reference is the accurate flow map of the learned field itself; with --dit, the same for a DiT-tiny/2
trained on the 8x8 digits (1, 8, 8), sampled unconditionally (the null label).

Run:  python benchmarks/grid_optimizer.py [--quick] [--learned] [--dit] [--learned-only] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

try:
    from diffusion_lab import samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from diffusion_lab import samplers, schedules, targets
from diffusion_lab.reference import flow_map
from diffusion_lab.samplers import GRID_KINDS, optimize as O

METHODS = ("dpmpp_2m", "unipc", "dpm_solver_3", "heun")
NFES = (5, 10, 20)


def exact_targets():
    suite = dict(targets.suite())
    return [("ring8", targets.ring8()), ("bimodal_1d", targets.bimodal_1d()), ("gaussian_2d", targets.gaussian_2d()),
            ("aniso_16d", targets.get_target("aniso", dim=16)), ("multiscale_8d_k16", suite["multiscale_8d_k16"])]


def train_learned(steps: int, seed: int = 0):
    """A small MLP on ring8 (as experiments/learned_ring.py, fewer steps), returned as a float64 field."""
    from diffusion_lab import training as T
    from diffusion_lab.models import get_model

    sch = schedules.VPLinear()
    g = torch.Generator().manual_seed(seed)
    data = targets.ring8().sample(20_000, g, dtype=torch.float32)
    torch.manual_seed(seed)
    net = get_model("mlp", data_shape=2, hidden=128, depth=3)
    obj = T.Objective(sch, "eps", sigma_data=round(float(data.std()), 4))
    tr = T.Trainer(net, obj, T.TensorLoader(data, batch_size=512, seed=seed), lr=2e-3, ema_decay=0.999, seed=seed)
    t0 = time.perf_counter()
    tr.run(steps, log_every=max(steps // 4, 1))
    secs = time.perf_counter() - t0
    ema = tr.ema.module.eval().double()
    return T.learned_field(ema, sch, "eps", sigma_data=obj.sigma_data), secs, float(tr.history[-1]["loss"])


def train_digits_dit(steps: int, seed: int = 0):
    """A DiT-tiny/2 on the 8x8 digits (the recipe of experiments/digits_dit.py: EDM preconditioning on VP-linear,
    log-normal times, AdamW, EMA 0.999), returned as the float64 field of the unconditional (null-label) model."""
    from diffusion_lab import training as T
    from diffusion_lab.models import get_model

    sch = schedules.VPLinear()
    x, y = targets.digits(return_labels=True)
    torch.manual_seed(seed)
    net = get_model("DiT-tiny/2", num_classes=10)
    sigma_data = round(float(x.std()), 4)
    obj = T.Objective(sch, "edm", time_sampler="lognormal", sigma_data=sigma_data)
    tr = T.Trainer(net, obj, T.TensorLoader(x, y, 128, seed=seed), lr=1e-3, warmup=100, ema_decay=0.999, seed=seed)
    t0 = time.perf_counter()
    tr.run(steps, log_every=max(steps // 4, 1))
    secs = time.perf_counter() - t0
    ema = tr.ema.module.eval().double()
    field = T.learned_field(ema, sch, "edm", sigma_data=sigma_data, labels=net.num_classes)  # the null class
    return field, secs, float(tr.history[-1]["loss"])


def run_field(label, field, methods, nfes, opt_kw, n_eval, seed, log):
    sch = field.schedule
    shape = field.data_shape
    g = torch.Generator().manual_seed(seed)
    s_max = float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    x_T = s_max * torch.randn((n_eval, *shape), generator=g, dtype=torch.float64)
    ref, _ = flow_map(field, x_T, sch.t_max, sch.t_min)

    def err(x):
        return float((x - ref).reshape(n_eval, -1).norm(dim=1).mean())

    ays_start = {}
    rows = []
    for method in methods:
        for nfe in nfes:
            n, opts = samplers.plan_for_nfe(method, nfe)
            run = lambda grid, x0=x_T: samplers.sample(field, x0, method, grid=grid, **opts)  # noqa: E731
            fixed = {k: err(run(samplers.time_grid(sch, n, k)).x) for k in GRID_KINDS}
            best_kind = min(fixed, key=fixed.get)
            res = O.optimize_grid(field, n, method, **opt_kw, **opts)
            cand = samplers.time_grid(sch, opt_kw.get("candidates", 64) - 1, "logsnr")
            e_dp = err(run(cand[res.settings["dp_path"]]).x)
            e_opt = err(run(res.grid).x)
            g_ays = samplers.time_grid(sch, n, "ays")
            t0 = float(g_ays[0])
            if t0 not in ays_start:
                ays_start[t0] = flow_map(field, x_T, sch.t_max, t0)[0]
            e_ays = err(run(g_ays, ays_start[t0]).x)
            row = {"target": label, "method": method, "nfe": nfe, "steps": n,
                   **{f"err_{k}": v for k, v in fixed.items()}, "best_fixed": best_kind,
                   "err_best_fixed": fixed[best_kind], "err_dp": e_dp, "err_opt": e_opt, "err_ays": e_ays,
                   "gain": fixed[best_kind] / e_opt, "gain_dp": fixed[best_kind] / e_dp,
                   "pilot_before": res.objective_before, "pilot_after": res.objective_after, "start": res.start,
                   "cost_nfe": res.cost_nfe, "cost_seconds": res.seconds,
                   "grid_opt": [round(float(t), 6) for t in res.grid]}
            rows.append(row)
            log(f"{label:>18} {method:>12} nfe {nfe:>2}: best fixed {best_kind:>9} {fixed[best_kind]:.3e}  "
                f"dp {e_dp:.3e}  opt {e_opt:.3e}  ays {e_ays:.3e}  gain {row['gain']:.2f}  "
                f"cost {res.cost_nfe} NFE {res.seconds:.1f}s")
    return rows


def print_table(rows):
    cols = ["target", "method", "nfe", "err_best_fixed", "best_fixed", "err_dp", "err_opt", "gain", "err_ays",
            "cost_nfe", "cost_seconds"]

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    w = {c: max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.rjust(w[c]) for c in cols))
    for r in rows:
        print("  ".join(fmt(r[c]).rjust(w[c]) for c in cols))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="32 candidates, 64 pilot samples, 200 held-out samples")
    p.add_argument("--learned", action="store_true", help="also the learned MLP ring field")
    p.add_argument("--learned-only", action="store_true", help="only the learned fields (--learned, --dit)")
    p.add_argument("--dit", action="store_true", help="also a DiT-tiny/2 trained on the 8x8 digits (null label)")
    p.add_argument("--dit-steps", type=int, default=1500)
    p.add_argument("--train-steps", type=int, default=1500)
    p.add_argument("--targets", nargs="*", default=None)
    p.add_argument("--methods", nargs="*", default=list(METHODS))
    p.add_argument("--nfe", nargs="*", type=int, default=list(NFES))
    p.add_argument("--candidates", type=int, default=None)
    p.add_argument("--n-pilot", type=int, default=None)
    p.add_argument("--n-eval", type=int, default=None)
    p.add_argument("--refine", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    opt_kw = {"candidates": a.candidates or (32 if a.quick else 64), "n_pilot": a.n_pilot or (64 if a.quick else 128),
              "refine": a.refine, "seed": 0}
    n_eval = a.n_eval or (200 if a.quick else 500)
    log = lambda s: print(s, flush=True)  # noqa: E731
    sch = schedules.VPLinear()
    rows, meta = [], {"settings": {"schedule": sch.settings(), "optimizer": opt_kw, "n_eval": n_eval,
                                   "eval_seed": 12345, "methods": a.methods, "nfe": a.nfe,
                                   "reference": "flow_map DOP853 rtol 1e-10 (edm coords)"}}
    t_all = time.perf_counter()
    if not a.learned_only:
        for label, tg in exact_targets():
            if a.targets and label not in a.targets:
                continue
            rows += run_field(label, tg.field(sch), a.methods, a.nfe, opt_kw, n_eval, 12345, log)
    if a.learned or (a.learned_only and not a.dit):
        field, secs, loss = train_learned(a.train_steps)
        log(f"learned ring8 MLP: {a.train_steps} steps, {secs:.0f} s, final loss {loss:.4f}")
        meta["learned"] = {"train_steps": a.train_steps, "train_seconds": secs, "final_loss": loss,
                           "model": "mlp(hidden=128, depth=3), eps prediction, EMA 0.999, batch 512, lr 2e-3"}
        rows += run_field("learned_ring8", field, a.methods, a.nfe, opt_kw, n_eval, 12345, log)
    if a.dit:
        field, secs, loss = train_digits_dit(a.dit_steps)
        log(f"digits DiT-tiny/2: {a.dit_steps} steps, {secs:.0f} s, final loss {loss:.4f}")
        meta["dit"] = {"train_steps": a.dit_steps, "train_seconds": secs, "final_loss": loss,
                       "model": "DiT-tiny/2 on sklearn 8x8 digits (all 1797), EDM preconditioning, null label, "
                                "EMA 0.999, batch 128, lr 1e-3"}
        rows += run_field("digits_dit", field, a.methods, a.nfe, opt_kw, n_eval, 12345, log)
    meta["seconds"] = time.perf_counter() - t_all
    print_table(rows)
    gains = [r["gain"] for r in rows]
    if gains:
        import math

        geo = math.exp(sum(math.log(x) for x in gains) / len(gains))
        print(f"geometric-mean gain {geo:.3f} (min {min(gains):.3f}, max {max(gains):.3f}) over {len(gains)} cells; "
              f"DP grid alone better than the best fixed grid in {sum(r['gain_dp'] > 1 for r in rows)}/{len(rows)}")
        meta["summary"] = {"geomean_gain": geo, "min_gain": min(gains), "max_gain": max(gains),
                           "dp_alone_wins": sum(r["gain_dp"] > 1 for r in rows), "cells": len(rows)}
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, **meta}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
