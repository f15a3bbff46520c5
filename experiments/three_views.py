"""Three views of one velocity field, cross-checked: the marginal p_t of an exact 2-D target
at several t computed (a) in closed form, (b) by the Fokker-Planck grid solver, (c) from reverse-SDE samples,
(d) from PF-ODE samples, (d') by the PF-ODE continuity equation on the grid (second-order MUSCL fluxes, MC limiter;
its TV at the smallest t is also reported as dx shrinks) and (e) from Langevin at fixed t, as heat maps on one grid
with the TV distance of each to (a) and the Monte-Carlo floor (the TV of a histogram of as many exact samples);
then the generation run on the grid from the prior back to the data, compared with the data density.

    python -m experiments.three_views [--out results/experiments] [--quick]
"""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import fokker_planck as fp
from diffusion_lab import langevin as L
from diffusion_lab import schedules as S
from diffusion_lab.samplers import sample, time_grid
from diffusion_lab.targets import ring8

from . import _common


def run(quick: bool = False, seed: int = 0):
    tg, sch = ring8(), S.VPLinear()
    field = tg.field(sch)
    n_cells = 64 if quick else 96
    grid = fp.Grid.box(-4.0, 4.0, n_cells, 2)
    n = 20_000 if quick else 50_000
    times = [0.05, 0.2, 0.5] if quick else [0.02, 0.1, 0.3, 0.6]
    steps = 100 if quick else 200
    g = torch.Generator().manual_seed(seed)
    x_T = tg.marginal(sch, sch.t_max).sample(n, g)
    forward = fp.solve_forward(sch, tg, grid, [sch.t_min, *times], steps=200, target=tg)
    rows, panels = [], []
    # the PF-ODE density on the grid: continuity equation from the exact p_{t_max}, MUSCL fluxes (van Leer 1979)
    pf_times = [sch.t_max, *sorted(times, reverse=True)]
    pf = fp.solve_continuity(field, tg, grid, pf_times, scheme="muscl", limiter="mc")
    for t in times:
        exact = fp.exact_density(tg, sch, grid, t)
        views = {"(a) closed form": exact, "(b) Fokker-Planck grid": forward.density(t)}
        sde = sample(field, x_T, "em", grid=time_grid(sch, steps, "logsnr", t_min=t), generator=g).x
        ode = sample(field, x_T, "heun", grid=time_grid(sch, steps // 2, "logsnr", t_min=t)).x
        # Langevin at fixed t from the prior N(0, I): h = 0.05 lambda_min-scale steps, run to equilibrium of the
        # local dynamics; the multimodal p_t at small t is where it mixes badly
        lang = L.ula(field, torch.randn(n, 2, dtype=torch.float64, generator=g), t, 0.02, 50 if quick else 150,
                     generator=g).x
        views["(c) reverse SDE samples"] = fp.density_from_samples(sde.numpy(), grid)
        views["(d) PF-ODE samples"] = fp.density_from_samples(ode.numpy(), grid)
        views["(d') PF-ODE continuity grid (MUSCL)"] = pf.density(t)
        views["(e) Langevin at fixed t"] = fp.density_from_samples(lang.numpy(), grid)
        floor = fp.tv(fp.density_from_samples(tg.marginal(sch, t).sample(n, g).numpy(), grid), exact, grid)
        for name, dens in views.items():
            d = fp.tv(dens, exact, grid)
            rows.append({"t": t, "view": name, "tv_to_closed_form": d, "mc_floor": floor})
            panels.append({"row": name, "t": t, "density": dens, "note": f"TV {d:.3f}" if name[1] != "a" else ""})
    # generation on the grid: reverse SDE from the exact prior back to t_min, shown at the same times as the other
    # views (time increasing to the right in every row) with its TV to the closed form at each, the last at t_min
    gen_times = [sch.t_max, *sorted(times, reverse=True), sch.t_min]
    gen = fp.solve_reverse(field, tg, grid, gen_times, steps=100 if quick else 200, target=tg)
    exact_min = fp.exact_density(tg, sch, grid, sch.t_min)
    panels.append({"row": "(a) closed form", "t": sch.t_min, "density": exact_min})
    for t in [*times, sch.t_min]:
        d = fp.tv(gen.density(t), exact_min if t == sch.t_min else fp.exact_density(tg, sch, grid, t), grid)
        panels.append({"row": "(f) generation on the grid", "t": t, "density": gen.density(t),
                       "note": f"TV {d:.3f}" + (" (final)" if t == sch.t_min else "")})
    tv_gen = fp.tv(gen.density(sch.t_min), exact_min, grid)
    rows.append({"t": sch.t_min, "view": "generation on the grid (reverse SDE FP)", "tv_to_closed_form": tv_gen,
                 "mc_floor": float("nan")})
    pf_tv = {}  # grid error of the PF-ODE density at the smallest t as dx shrinks
    for m in (n_cells // 4, n_cells // 2, n_cells):
        sm = pf if m == n_cells else fp.solve_continuity(field, tg, fp.Grid.box(-4.0, 4.0, m, 2), pf_times,
                                                         scheme="muscl", limiter="mc")
        pf_tv[m] = float(sm.tv[-1])
        rows.append({"t": times[0], "view": f"PF-ODE continuity grid (MUSCL) at {m}^2", "tv_to_closed_form": pf_tv[m],
                     "mc_floor": float("nan")})
    headline = {f"tv[{r['view']}@t={r['t']:g}]": r["tv_to_closed_form"] for r in rows}
    headline["pf_ode_grid_order"] = float(np.log2(pf_tv[n_cells // 2] / pf_tv[n_cells]))
    headline["generation_tv"] = tv_gen
    headline["grid_mass_drift"] = gen.mass_drift
    settings = {"target": "ring8", "schedule": sch.settings(), "grid": grid.settings(), "n_samples": n, "times": times,
                "sde": f"em, {steps} logsnr steps from t_max", "ode": f"heun, {steps // 2} logsnr steps",
                "langevin": "ula h=0.02 from N(0, I)", "seed": seed}
    return rows, {"settings": settings, "headline": headline}, panels, grid


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    torch.set_num_threads(1)
    rows, meta, panels, grid = run(args.quick, args.seed)
    print(_common.table(rows, ["t", "view", "tv_to_closed_form", "mc_floor"]))
    _common.write(args.out, "three_views", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import fokker_planck_heatmaps

    with _common.figure_style(args):
        fokker_planck_heatmaps(panels, (grid.lo[0], grid.hi[0], grid.lo[1], grid.hi[1]),
                               _common.figure(args, "three_views"),
                               title="ring8 / VP: one field, three views (TV to the closed form; time increases to "
                                     "the right in every row)")
    return meta["headline"]


if __name__ == "__main__":
    main()
