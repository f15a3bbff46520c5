"""NCSN's two-mode experiment (Song & Ermon 2019, Fig. 3).

p = 1/5 N((-5,-5), I) + 4/5 N((5,5), I). Langevin with the exact data score, started uniformly on [-8, 8]^2,
keeps the mode weights of its start (about 1:1): the modes are separated by a region of vanishing density the
chain cannot cross in any practical time. Annealed Langevin over geometric noise levels 20 -> 1 recovers 1:4.

    python -m experiments.ncsn_two_mode [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import torch

from diffusion_lab import langevin as L
from diffusion_lab import schedules as S
from diffusion_lab.targets import ncsn_two_mode

from . import _common


def run(quick: bool = False, seed: int = 0):
    tg = ncsn_two_mode()
    sch = S.VE(sigma_min=0.01, sigma_max=20.0)
    f = tg.field(sch)
    n = 2000 if quick else 10000
    g = torch.Generator().manual_seed(seed)
    x0 = 16 * torch.rand(n, 2, dtype=torch.float64, generator=g) - 8
    h = 0.1
    plain_steps = 500 if quick else 1000
    plain = L.ula(f, x0, sch.t_min, h, plain_steps, generator=g)
    levels = L.geometric_levels(sch, 20.0, 1.0, 10)
    each = 50 if quick else 100
    ann = L.annealed_langevin(f, x0, levels, h, each, generator=g)
    exact = tg.sample(n, g)
    se = math.sqrt(0.8 * 0.2 / n)
    rows = []
    for name, x, nfe in (("exact", exact, 0), ("plain Langevin", plain.x, plain.nfe), ("annealed Langevin", ann.x, ann.nfe)):
        w = float((x.sum(1) > 0).double().mean())
        rows.append({"sampler": name, "weight_mode_(5,5)": w, "weight_mode_(-5,-5)": 1 - w, "expected": 0.8,
                     "z": (w - 0.8) / se, "nfe": nfe})
    headline = {"plain_weight_55": rows[1]["weight_mode_(5,5)"], "annealed_weight_55": rows[2]["weight_mode_(5,5)"],
                "mc_se": se}
    settings = {"target": "ncsn_two_mode", "schedule": sch.settings(), "n": n, "h": h, "plain_steps": plain_steps,
                "levels": "geometric 20 -> 1, 10 levels", "steps_per_level": each,
                "step_rule": "h_i = h (sigma_i/sigma_L)^2, x' = x + h s + sqrt(2h) z", "init": "uniform [-8, 8]^2",
                "seed": seed}
    return rows, {"settings": settings, "headline": headline}, {"exact": exact, "plain": plain.x, "annealed": ann.x}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta, samples = run(args.quick, args.seed)
    print(_common.table(rows, ["sampler", "weight_mode_(5,5)", "weight_mode_(-5,-5)", "z", "nfe"]))
    _common.write(args.out, "ncsn_two_mode", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import sample_panels

    with _common.figure_style(args):
        sample_panels({k: v.numpy() for k, v in samples.items()}, _common.figure(args, "ncsn_two_mode"),
                      titles={k: f"{k}: w(5,5) = {float((v.sum(1) > 0).double().mean()):.3f}" for k, v in samples.items()},
                      lim=9)
    return meta["headline"]


if __name__ == "__main__":
    main()
