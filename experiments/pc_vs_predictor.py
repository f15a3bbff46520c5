"""Predictor-corrector vs predictor-only at twice the steps vs corrector-only, at equal NFE (Song et al. 2021,
Table 1 shape), on an exact 2-D target (ring8, VP) with the exact score.

PC = one reverse-diffusion (DDPM ancestral) or Euler-Maruyama predictor step + one Langevin corrector step
(SNR rule, r = 0.16) per grid step, so N steps cost 2N NFE; predictor-only takes 2N steps; corrector-only is
annealed Langevin (SNR rule) over 2N levels. Error: sliced W2 to exact samples of p_{t_min}, mean +- SE over seeds.

    python -m experiments.pc_vs_predictor [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import torch

from diffusion_lab import schedules as S
from diffusion_lab.metrics import sliced_w2, sliced_w2_floor
from diffusion_lab.samplers import sample
from diffusion_lab.targets import ring8

from . import _common

CONFIGS = {
    "PC (ddpm_ancestral + corrector)": ("pc", {"predictor": "ddpm_ancestral"}, 2),
    "PC (em + corrector)": ("pc", {"predictor": "em"}, 2),
    "predictor only: ddpm_ancestral, 2x steps": ("ddpm_ancestral", {}, 1),
    "predictor only: em, 2x steps": ("em", {}, 1),
    "corrector only (annealed, SNR rule)": ("pc", {"predictor": "none"}, 1),
}


def run(quick: bool = False, seed: int = 0):
    tg, sch = ring8(), S.VPLinear()
    f = tg.field(sch)
    n = 800 if quick else 4000
    budgets = [20, 50] if quick else [20, 50, 100, 200]
    seeds = [seed, seed + 1] if quick else [seed + k for k in range(4)]
    law = tg.marginal(sch, sch.t_min)
    floor, floor_se = sliced_w2_floor(law.sample, n, seed=seed + 999)
    rows = []
    for nfe in budgets:
        for label, (method, opts, per_step) in CONFIGS.items():
            vals = []
            for s in seeds:
                g = torch.Generator().manual_seed(s)
                x_T = tg.marginal(sch, sch.t_max).sample(n, g)
                res = sample(f, x_T, method, steps=nfe // per_step, generator=g, **opts)
                vals.append(sliced_w2(res.x, law.sample(n, g), 128, g))
            t = torch.tensor(vals)
            rows.append({"nfe": res.nfe, "sampler": label, "sw2_mean": float(t.mean()),
                         "sw2_se": float(t.std() / math.sqrt(len(vals))), "mc_floor": floor})
    best = {nfe: min((r for r in rows if r["nfe"] == nfe), key=lambda r: r["sw2_mean"])["sampler"] for nfe in budgets}
    headline = {"best_at_nfe": best, "mc_floor": floor, "mc_floor_se": floor_se}
    settings = {"target": "ring8", "schedule": sch.settings(), "n": n, "nfe": budgets, "seeds": seeds, "snr": 0.16,
                "grid": "logsnr"}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["nfe", "sampler", "sw2_mean", "sw2_se", "mc_floor"]))
    _common.write(args.out, "pc_vs_predictor", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import metric_vs_nfe

    with _common.figure_style(args):
        h = meta["headline"]
        metric_vs_nfe(rows, _common.figure(args, "pc_vs_predictor"), "sw2_mean", "sw2_se",
                      floor=(h["mc_floor"], 2 * h["mc_floor_se"]), floor_label="Monte-Carlo floor (+-2 SE)",
                      ylabel="sliced W2 to exact samples of p_t_min (mean +- 2 SE over seeds)",
                      title="ring8 / VP: PC vs predictor-only (2x steps) vs corrector-only at equal NFE")
    return meta["headline"]


if __name__ == "__main__":
    main()
