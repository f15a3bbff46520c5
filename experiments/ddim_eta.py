"""DDIM's eta sweep: eta in {0, 0.2, 0.5, 1} x steps S in {10, 20, 50, 100, 1000} on an exact 2-D mixture (Song, Meng,
Ermon 2021, Table 1 trend; eta = 0 is DPM-Solver-1 (Lu et al. 2022), eta = 1 is DDPM ancestral sampling).

ring8 (component std 0.3) on the VP-linear schedule with the exact eps, t in [1e-3, 1], DDIM's "linear" time
skipping (a uniform t grid). eta = 0 is the deterministic DDIM (the PF-ODE's exponential integrator), eta = 1 is DDPM
ancestral sampling with the posterior variance. Error: sliced W2 between the S-step output and exact samples of
p_{t_min}, mean +- SE over seeds. Within a seed all etas share x_T, the exact reference sample and the projection
directions (common random numbers), so the eta = 1 - eta = 0 difference is also reported with its paired SE. The
Monte-Carlo floor is the sliced W2 between two exact sample sets of the same size.

    python -m experiments.ddim_eta [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import torch

from diffusion_lab import schedules as S
from diffusion_lab.metrics import sliced_w2, sliced_w2_floor
from diffusion_lab.samplers import sample
from diffusion_lab.targets import ring8

from . import _common

ETAS = (0.0, 0.2, 0.5, 1.0)


def _mean_se(v):
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def run(quick: bool = False, seed: int = 0):
    torch.set_num_threads(1)
    tg, sch = ring8(), S.VPLinear()
    f = tg.field(sch)
    steps_list = [10, 50] if quick else [10, 20, 50, 100, 1000]
    n = 4000 if quick else 8000
    seeds = [seed + k for k in range(3 if quick else 4)]
    grid_kind = "uniform"
    law = tg.marginal(sch, sch.t_min)
    floor, floor_se = sliced_w2_floor(law.sample, n, repeats=len(seeds), seed=seed + 999, n_proj=128)
    vals = {(s, e): [] for s in steps_list for e in ETAS}
    for sd in seeds:
        g = torch.Generator().manual_seed(sd)
        x_T = tg.marginal(sch, sch.t_max).sample(n, g)
        exact = law.sample(n, g)
        for steps in steps_list:
            for eta in ETAS:
                res = sample(f, x_T, "ddim", steps=steps, grid_kind=grid_kind, eta=eta, generator=g)
                vals[steps, eta].append(sliced_w2(res.x, exact, 128, torch.Generator().manual_seed(sd + 12345)))
    rows = []
    for steps in steps_list:
        for eta in ETAS:
            m, se = _mean_se(vals[steps, eta])
            dm, dse = _mean_se([a - b for a, b in zip(vals[steps, eta], vals[steps, 0.0])])
            rows.append({"steps": steps, "eta": eta, "sw2_mean": m, "sw2_se": se, "minus_eta0_mean": dm,
                         "minus_eta0_se": dse, "mc_floor": floor, "mc_floor_se": floor_se})
    best = {}
    for steps in steps_list:
        rs = [r for r in rows if r["steps"] == steps]
        b = min(rs, key=lambda r: r["sw2_mean"])
        e1 = next(r for r in rs if r["eta"] == 1.0)
        e0 = next(r for r in rs if r["eta"] == 0.0)
        best[str(steps)] = {"best_eta": b["eta"], "sw2_eta0": e0["sw2_mean"], "sw2_eta0_se": e0["sw2_se"],
                            "sw2_eta1": e1["sw2_mean"], "sw2_eta1_se": e1["sw2_se"],
                            "eta1_minus_eta0": e1["minus_eta0_mean"], "eta1_minus_eta0_se": e1["minus_eta0_se"],
                            "eta0_within_2se_of_best": e0["sw2_mean"] - b["sw2_mean"]
                            <= 2 * math.hypot(e0["sw2_se"], b["sw2_se"])}
    headline = {"by_steps": best, "mc_floor": floor, "mc_floor_se": floor_se}
    settings = {"target": "ring8", "schedule": sch.settings(), "grid": grid_kind, "steps": steps_list, "eta": ETAS,
                "n": n, "seeds": seeds, "metric": "sliced W2 (128 directions) to exact samples of p_{t_min}",
                "final": "step (x at t_min, no denoising)"}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["steps", "eta", "sw2_mean", "sw2_se", "minus_eta0_mean", "minus_eta0_se", "mc_floor"]))
    for steps, b in meta["headline"]["by_steps"].items():
        print(f"S = {steps}: best eta {b['best_eta']:g}; eta=1 - eta=0 = {b['eta1_minus_eta0']:.4f} "
              f"+- {b['eta1_minus_eta0_se']:.4f}")
    _common.write(args.out, "ddim_eta", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import eta_sweep

    with _common.figure_style(args):
        eta_sweep(rows, _common.figure(args, "ddim_eta"),
                  floor=(meta["headline"]["mc_floor"], 2 * meta["headline"]["mc_floor_se"]),
                  title="DDIM eta sweep on ring8 / VP (exact eps): sliced W2 vs steps")
    return meta["headline"]


if __name__ == "__main__":
    main()
