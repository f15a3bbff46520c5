"""One, two or four network calls of a distilled consistency model on ring8: does the second step help?

Song, Dhariwal, Chen & Sutskever (2023) report that multistep consistency sampling (their Algorithm 1: denoise to
t_min with the consistency function, re-noise to the next time with fresh noise, denoise again) improves the FID of
one-step sampling at two steps. Here the same question is asked where the answer can be measured exactly: ring8 (an
8-component 2-D mixture) on VP-linear, consistency distillation (CD, Song et al. 2023, Algorithm 2) and its two-time
version (CTM-style, Kim et al. 2024) from the EXACT field (Heun teacher step on an 18-step log-SNR grid, EMA target
0.95, TwoTimeMLP(64, 3), 3000 steps of batch 256; ``diffusion_lab.flowmap.distill``), two training seeds.

Measured on held-out x_T ~ p_{t_max} shared by every row (float64 reference, float32 maps):

- ``err_mean``: mean ||x_hat(x_T) - Phi_{T -> t_min}(x_T)||, Phi by DOP853 at rtol 1e-10 (``reference.flow_map``);
  only for deterministic samplers (the deterministic chain Psi(x, t_i, t_{i+1}) and the ODE samplers). Multistep
  consistency sampling re-noises with fresh noise, so it samples the law and has no terminal error;
- ``mmd2`` +- ``mmd2_se``: unbiased MMD^2 to the exact law p_{t_min} (``metrics.mmd2_exact``; exact samples give 0);
  the 2-step - 1-step difference of one map carries the SE of the paired difference (``metrics.mmd2_diff_se``).

Verdict on the claim, per method and seed: "2-step better" when MMD^2(1) - MMD^2(2) > 2 paired SE, "2-step worse"
when < -2 SE, otherwise "not resolved". And the two ring8 targets: a 2-step learned map within 2x the terminal error
of the best ODE sampler at NFE 10, a 1-step map below DDIM at NFE 5.

    python -m experiments.consistency_steps [--out results/experiments] [--quick] [--seed S] [--json PATH]
                                            [--steps 3000] [--grid-steps 18] [--methods cd ctm]
                                            [--n-seeds 2] [--name consistency_steps]
"""
from __future__ import annotations

import json
import math
import time

import torch

from diffusion_lab import VPLinear, targets
from diffusion_lab.flowmap import FlowMap, TwoTimeMLP, distill, flow_map_sample
from diffusion_lab.metrics import mmd2_diff_se, mmd2_exact
from diffusion_lab.reference import flow_map
from diffusion_lab.samplers import sample

from . import _common

ODE_METHODS = ("euler", "heun", "ddim", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis")
ODE_NFE = (5, 10)
STEPS = (1, 2, 4)


def _err(x, phi) -> float:
    return float((x.double() - phi).reshape(x.shape[0], -1).norm(dim=1).mean())


def run(quick: bool = False, seed: int = 0, steps: int | None = None, grid_steps: int = 18,
        methods=("cd", "ctm"), n_seeds: int | None = None):
    sch, tg = VPLinear(), targets.ring8()
    field = tg.field(sch)
    law = tg.marginal(sch, sch.t_min)
    n = 1000 if quick else 4000
    steps = steps or (200 if quick else 3000)
    seeds = [seed + i for i in range(n_seeds or (1 if quick else 2))]
    hidden, depth, batch, lr = 64, 3, 256, 1e-3
    x_T = tg.marginal(sch, sch.t_max).sample(n, torch.Generator().manual_seed(seed + 10_000))
    phi, _ = flow_map(field, x_T, sch.t_max, sch.t_min)
    pp = mmd2_exact(phi, law).pp
    rows, results = [], {}
    exact = mmd2_exact(phi, law, pp=pp)
    rows.append({"sampler": "exact map", "method": "exact", "seed": "", "nfe": 0, "variant": "DOP853",
                 "err_mean": 0.0, "mmd2": exact.mmd2, "mmd2_se": exact.se})
    for m in ODE_METHODS:
        for nfe in ODE_NFE:
            res = sample(field, x_T, m, nfe=nfe)
            mm = mmd2_exact(res.x, law, pp=pp)
            rows.append({"sampler": m, "method": m, "seed": "", "nfe": res.nfe, "variant": "ode",
                         "err_mean": _err(res.x, phi), "mmd2": mm.mmd2, "mmd2_se": mm.se})
    training = {}
    data_all = {}
    for method in methods:
        for sd in seeds:
            if sd not in data_all:
                data_all[sd] = tg.sample(20000, torch.Generator().manual_seed(sd + 1)).float()
            data = data_all[sd]
            torch.manual_seed(sd)
            psi = FlowMap(TwoTimeMLP(2, hidden, depth), sch, sigma_data=float(data.std()))
            t0 = time.perf_counter()
            dr = distill(psi, field, data, steps=steps, batch=batch, grid_steps=grid_steps, method=method,
                         solver="heun", lr=lr, seed=sd)
            training[f"{method}/{sd}"] = {"seconds": time.perf_counter() - t0, "teacher_calls": dr.teacher_calls,
                                          "teacher_evals": dr.teacher_evals, "final_loss": dr.history[-1]["loss"]}
            P, x32 = dr.psi_ema, x_T.float()
            for k in STEPS:
                for variant, noise in (("chain", False), ("multistep", True)):
                    if noise and k == 1:
                        continue  # one step: both variants are Psi(x_T, T, t_min)
                    out = flow_map_sample(P, x32, k, noise_reinjection=noise,
                                          generator=torch.Generator().manual_seed(sd + 20_000))
                    assert out.nfe == k
                    mm = mmd2_exact(out.x.double(), law, pp=pp)
                    results[method, sd, k, variant] = mm
                    rows.append({"sampler": f"{method} {variant}", "method": method, "seed": sd, "nfe": k,
                                 "variant": variant, "err_mean": math.nan if noise else _err(out.x, phi),
                                 "mmd2": mm.mmd2, "mmd2_se": mm.se})
    verdicts = []
    for method in methods:
        for sd in seeds:
            one = results[method, sd, 1, "chain"]
            for k in (2, 4):
                for variant in ("multistep", "chain"):
                    other = results[method, sd, k, variant]
                    gain = one.mmd2 - other.mmd2
                    se = mmd2_diff_se(one, other)
                    verdict = ("2-step better" if gain > 2 * se else "2-step worse" if gain < -2 * se
                               else "not resolved").replace("2-step", f"{k}-step")
                    verdicts.append({"method": method, "seed": sd, "steps": k, "variant": variant,
                                     "mmd2_1": one.mmd2, "mmd2_k": other.mmd2, "gain": gain, "gain_se": se,
                                     "gain_z": gain / se if se > 0 else math.nan, "verdict": verdict})
    ode = [r for r in rows if r["variant"] == "ode"]
    best10 = min((r for r in ode if r["nfe"] == 10), key=lambda r: r["err_mean"])
    ddim5 = next(r for r in ode if r["method"] == "ddim" and r["nfe"] == 5)
    maps = [r for r in rows if r["variant"] == "chain"]
    two = min((r for r in maps if r["nfe"] == 2), key=lambda r: r["err_mean"])
    one = min((r for r in maps if r["nfe"] == 1), key=lambda r: r["err_mean"])
    one_all = [r["err_mean"] for r in maps if r["nfe"] == 1]
    two_all = {f"{r['method']}/{r['seed']}": r["err_mean"] for r in maps if r["nfe"] == 2}
    headline = {
        "claim": "Song et al. 2023: 2-step consistency sampling improves on 1-step",
        "multistep_2_vs_1": [v for v in verdicts if v["steps"] == 2 and v["variant"] == "multistep"],
        "verdicts": verdicts,
        "best_ode_nfe10": {"method": best10["method"], "err_mean": best10["err_mean"]},
        "ddim_nfe5_err": ddim5["err_mean"],
        "best_2step_map": {"map": f"{two['method']}/{two['seed']}", "err_mean": two["err_mean"]},
        "all_2step_chain_err": two_all,
        "two_step_within_2x_best_ode10": two["err_mean"] <= 2 * best10["err_mean"],
        "best_1step_map": {"map": f"{one['method']}/{one['seed']}", "err_mean": one["err_mean"]},
        "worst_1step_map_err": max(one_all),
        "one_step_below_ddim5": one["err_mean"] < ddim5["err_mean"],
        "every_1step_below_ddim5": max(one_all) < ddim5["err_mean"],
        "exact_map_mmd2": exact.mmd2, "exact_map_mmd2_se": exact.se, "training": training,
    }
    settings = {"target": "ring8", "methods": list(methods), "schedule": sch.settings(), "teacher": "exact field, Heun step", "n": n,
                "distill_steps": steps, "batch": batch, "grid_steps": grid_steps, "grid_kind": "logsnr",
                "network": f"TwoTimeMLP(2, hidden={hidden}, depth={depth})", "lr": lr, "target_decay": 0.95,
                "ema_decay": 0.999, "seeds": seeds, "ode_methods": ODE_METHODS, "ode_nfe": ODE_NFE,
                "flow_map_steps": STEPS, "sampling_grid": "logsnr", "map_dtype": "float32",
                "reference": "reference.flow_map, DOP853 rtol 1e-10"}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "results/experiments")
    p.add_argument("--json", metavar="PATH", help="also write the rows, settings and headline to PATH")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default 3000; --quick 200)")
    p.add_argument("--grid-steps", type=int, default=18, help="N of the distillation grid (default 18)")
    p.add_argument("--methods", nargs="+", default=["cd", "ctm"], choices=["cd", "ctm"],
                   help="distillation methods (default cd ctm)")
    p.add_argument("--n-seeds", type=int, default=None, help="training seeds (default 2; --quick 1)")
    p.add_argument("--name", default="consistency_steps", help="stem of the output files (default consistency_steps)")
    args = p.parse_args(argv)
    if (args.steps is not None and args.steps < 1) or args.grid_steps < 1:
        p.error(f"--steps and --grid-steps must be >= 1, got {args.steps}, {args.grid_steps}")
    if args.n_seeds is not None and args.n_seeds < 1:
        p.error(f"--n-seeds must be >= 1, got {args.n_seeds}")
    rows, meta = run(args.quick, args.seed, args.steps, args.grid_steps, tuple(args.methods), args.n_seeds)
    print(_common.table(rows, ["sampler", "seed", "nfe", "err_mean", "mmd2", "mmd2_se"]))
    h = meta["headline"]
    for v in h["verdicts"]:
        print(f"{v['method']}/{v['seed']} {v['variant']} {v['steps']} vs 1 step: MMD^2 {v['mmd2_1']:.2e} -> "
              f"{v['mmd2_k']:.2e}, gain {v['gain']:.2e} +- {v['gain_se']:.1e} (paired SE): {v['verdict']}")
    print(f"best 2-step map {h['best_2step_map']['map']} {h['best_2step_map']['err_mean']:.4f} vs 2 x best ODE at "
          f"NFE 10 ({h['best_ode_nfe10']['method']}) {2 * h['best_ode_nfe10']['err_mean']:.4f}: "
          f"{'within' if h['two_step_within_2x_best_ode10'] else 'NOT within'}")
    print(f"best 1-step map {h['best_1step_map']['map']} {h['best_1step_map']['err_mean']:.4f} (worst "
          f"{h['worst_1step_map_err']:.4f}) vs DDIM at NFE 5 {h['ddim_nfe5_err']:.4f}: "
          f"{'below' if h['one_step_below_ddim5'] else 'NOT below'}")
    _common.write(args.out, args.name, [{k: r[k] for k in rows[0]} for r in rows], meta["settings"], h)
    if args.json:
        from diffusion_lab._io import atomic_write

        doc = {"experiment": args.name, **meta, "rows": rows, "versions": _common.versions()}
        atomic_write(args.json, lambda tmp: json.dump(doc, open(tmp, "w"), indent=2, default=float))
    from diffusion_lab.plots import metric_vs_nfe

    det = [{**r, "sampler": r["sampler"] + (f" (seed {r['seed']})" if r["seed"] != "" else "")}
           for r in rows if r["variant"] in ("ode", "chain") and r["method"] in ("cd", "ctm", "ddim", "dpmpp_2m",
                                                                                  "unipc", best10_name(h))]
    mmd = [{**r, "sampler": r["sampler"] + (f" (seed {r['seed']})" if r["seed"] != "" else "")}
           for r in rows if r["method"] in ("cd", "ctm") and r["mmd2"] > 0]
    with _common.figure_style(args):
        metric_vs_nfe(det, _common.figure(args, f"{args.name}_error"), "err_mean",
                      title="ring8 / VP: terminal error vs the exact map (deterministic samplers)",
                      ylabel="mean ||x - Phi(x_T)||")
        metric_vs_nfe(mmd, _common.figure(args, f"{args.name}_mmd"), "mmd2", "mmd2_se",
                      floor=(h["exact_map_mmd2"], 2 * h["exact_map_mmd2_se"]), floor_label="exact map (+- 2 SE)",
                      title="ring8 / VP: MMD^2 to p_t_min, distilled maps (positive values)", ylabel="MMD^2")
    return h


def best10_name(h) -> str:
    return h["best_ode_nfe10"]["method"]


if __name__ == "__main__":
    main()
