"""ULA vs MALA bias against the step size on a Gaussian (Roberts & Tweedie 1996).

ULA's stationary variance on N(0, v) is v / (1 - h/(2v)): its bias h v / (2v - h) ~ h/2 is O(h) (slope 1 on a
log-log plot); MALA's is zero. Both are measured by Monte Carlo (chains started in the target, run to
stationarity) next to ULA's closed form.

    python -m experiments.langevin_bias [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import torch

from diffusion_lab import langevin as L
from diffusion_lab import schedules as S
from diffusion_lab.targets import Gaussian

from . import _common


def run(quick: bool = False, seed: int = 0) -> tuple[list[dict], dict]:
    v0 = 1.0
    tg, sch = Gaussian([0.0], [[v0]]), S.VE(sigma_min=1e-3)
    f = tg.field(sch)
    t = sch.t_min
    v = v0 + 1e-6  # the marginal at t_min
    n_chains = 2000 if quick else 20000
    hs = [0.05, 0.1, 0.2, 0.4] if quick else [0.025, 0.05, 0.1, 0.2, 0.4, 0.8]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for h in hs:
        n_steps = int(math.ceil(10 * v / h)) + 20  # contraction (1 - h/v)^n well below MC error
        x0 = tg.marginal(sch, t).sample(n_chains, g)
        xu = L.ula(f, x0, t, h, n_steps, generator=g).x
        m = L.mala(f, x0, t, h, n_steps, generator=g)
        se = v * math.sqrt(2.0 / (n_chains - 1))
        rows.append({"h": h, "ula_bias_exact": v / (1 - h / (2 * v)) - v, "ula_bias_mc": float(xu.var()) - v,
                     "mala_bias_mc": float(m.x.var()) - v, "mc_se": se, "mala_acceptance": m.acceptance_rate,
                     "steps": n_steps})
    import numpy as np

    slope = float(np.polyfit(np.log(hs), np.log([r["ula_bias_mc"] for r in rows]), 1)[0])
    worst_mala = max(abs(r["mala_bias_mc"]) / r["mc_se"] for r in rows)
    headline = {"ula_bias_slope": slope, "mala_max_abs_z": worst_mala}
    settings = {"target": "N(0, 1)", "schedule": sch.settings(), "t": t, "n_chains": n_chains, "h": hs, "seed": seed}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["h", "ula_bias_exact", "ula_bias_mc", "mala_bias_mc", "mc_se", "mala_acceptance"]))
    print(f"ULA bias slope {meta['headline']['ula_bias_slope']:.3f} (theory 1 as h -> 0); "
          f"MALA max |bias|/SE {meta['headline']['mala_max_abs_z']:.2f}")
    _common.write(args.out, "langevin_bias", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import langevin_bias

    with _common.figure_style(args):
        langevin_bias(rows, _common.figure(args, "langevin_bias"))
    return meta["headline"]


if __name__ == "__main__":
    main()
