"""Same marginals, different paths: the reverse SDE family dx = [f x - (1+gamma^2)/2 g^2 s] dt + gamma g dW_bar for
gamma in {0, 0.5, 1, 2} on an exact 2-D mixture (Huang, Lim, Courville 2021;
Karras et al. 2022, eq. 6).

ring8 on the VP-linear schedule with the exact score; every gamma starts from the SAME samples x_T of p_{t_max} and is
integrated by Euler-Maruyama on one piecewise log-SNR grid that passes through the observation times. At each observed t
the histogram of the samples is compared with the closed-form p_t (cell averages on a 64 x 64 grid over [-4, 4]^2) by
total variation, next to the Monte-Carlo floor: the TV of a histogram of as many exact samples of p_t. Optionally the
Fokker-Planck grid solution of the reverse equation for each gamma > 0 (``fokker_planck.solve_reverse``) is compared the
same way: the density is gamma-independent because div(p grad log p) = lap p.

What differs is the coupling between x_T and x_{t_min}: the Pearson correlation of the coordinates of x_T and x_{t_min},
the fraction of samples that end in the same mixture component (nearest mean) as the gamma = 0 flow map sends their
x_T to, and the mean path length on this grid (for gamma > 0 it grows without bound as the grid is refined: Brownian
paths have infinite length; it is reported at this grid only).

    python -m experiments.same_marginals [--out results/experiments] [--quick]
"""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import fokker_planck as fp
from diffusion_lab import schedules as S
from diffusion_lab.samplers import sample, time_grid
from diffusion_lab.targets import ring8

from . import _common

GAMMAS = (0.0, 0.5, 1.0, 2.0)


def piecewise_grid(sch, times: list[float], steps_per_segment: int) -> torch.Tensor:
    """A descending grid from t_max through each of ``times`` (descending), log-SNR uniform within each segment."""
    knots = [sch.t_max, *times]
    parts = [time_grid(sch, steps_per_segment, "logsnr", t_max=hi, t_min=lo) for hi, lo in zip(knots[:-1], knots[1:])]
    return torch.cat([parts[0]] + [p[1:] for p in parts[1:]])


def _nearest_component(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, means).argmin(1)


def _coord_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over coordinates of the Pearson correlation between a[:, j] and b[:, j]."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    return float(((a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))).mean())


def run(quick: bool = False, seed: int = 0, with_fp: bool | None = None):
    torch.set_num_threads(1)
    tg, sch = ring8(), S.VPLinear()
    field = tg.field(sch)
    n = 10_000 if quick else 40_000
    times = [0.3, sch.t_min] if quick else [0.5, 0.2, 0.05, sch.t_min]
    per_seg = 80 if quick else 120
    with_fp = (not quick) if with_fp is None else with_fp
    box = fp.Grid.box(-4.0, 4.0, 64, 2)
    g = torch.Generator().manual_seed(seed)
    x_T = tg.marginal(sch, sch.t_max).sample(n, g)
    floors = {t: fp.tv(fp.density_from_samples(tg.marginal(sch, t).sample(n, g), box),
                       fp.exact_density(tg, sch, box, t), box) for t in times}
    exact = {t: fp.exact_density(tg, sch, box, t) for t in times}
    means = tg.means
    rows, paths, ends = [], {}, {}
    n_paths = 60
    full = piecewise_grid(sch, times, per_seg)
    for gamma in GAMMAS:
        x, knots = x_T, [sch.t_max, *times]
        gg = torch.Generator().manual_seed(seed + 1 + int(100 * gamma))
        for hi, lo in zip(knots[:-1], knots[1:]):
            seg = time_grid(sch, per_seg, "logsnr", t_max=hi, t_min=lo)
            x = sample(field, x, "em", grid=seg, gamma=gamma, generator=gg).x
            d = fp.tv(fp.density_from_samples(x, box), exact[lo], box)
            rows.append({"gamma": gamma, "t": lo, "view": "EM samples", "tv_to_closed_form": d, "mc_floor": floors[lo]})
        ends[gamma] = x
        traj = sample(field, x_T[:n_paths], "em", grid=full, gamma=gamma, generator=gg, return_trajectory=True).trajectory
        paths[gamma] = traj.numpy()
    if with_fp:
        for gamma in GAMMAS[1:]:  # gamma = 0 is pure advection (upwind, first-order diffusive): not a fair check
            sol = fp.solve_reverse(field, tg, box, [sch.t_max, *times], gamma=gamma, steps=100)
            for t in times:
                rows.append({"gamma": gamma, "t": t, "view": "Fokker-Planck grid", "mc_floor": floors[t],
                             "tv_to_closed_form": fp.tv(sol.density(t), exact[t], box)})
    ode_mode = _nearest_component(ends[0.0], means)
    path_rows = []
    for gamma in GAMMAS:
        tr = paths[gamma]
        length = float(np.linalg.norm(np.diff(tr, axis=0), axis=-1).sum(0).mean())
        path_rows.append({"gamma": gamma, "corr_xT_xtmin": _coord_corr(x_T, ends[gamma]),
                          "same_mode_as_ode": float((_nearest_component(ends[gamma], means) == ode_mode).double().mean()),
                          "mean_path_length": length, "grid_steps": len(full) - 1})
    em = [r for r in rows if r["view"] == "EM samples"]
    headline = {
        "max_tv_minus_floor": max(r["tv_to_closed_form"] - r["mc_floor"] for r in em),
        "max_tv_over_floor": max(r["tv_to_closed_form"] / r["mc_floor"] for r in em),
        "tv_at_t_min": {f"gamma={r['gamma']:g}": r["tv_to_closed_form"] for r in em if r["t"] == sch.t_min},
        "mc_floor_at_t_min": floors[sch.t_min],
        "paths": {f"gamma={p['gamma']:g}": {k: p[k] for k in ("corr_xT_xtmin", "same_mode_as_ode", "mean_path_length")}
                  for p in path_rows},
    }
    fpr = [r for r in rows if r["view"] == "Fokker-Planck grid"]
    if fpr:
        headline["fp_max_tv"] = max(r["tv_to_closed_form"] for r in fpr)
    settings = {"target": "ring8", "schedule": sch.settings(), "n": n, "gammas": GAMMAS, "times": times,
                "grid": f"piecewise logsnr, {per_seg} EM steps per segment", "hist_grid": box.settings(),
                "fokker_planck": "solve_reverse trbdf2, 100 steps per segment" if with_fp else "off", "seed": seed}
    return rows, path_rows, {"settings": settings, "headline": headline}, paths


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, path_rows, meta, paths = run(args.quick, args.seed)
    print(_common.table(rows, ["gamma", "t", "view", "tv_to_closed_form", "mc_floor"]))
    print(_common.table(path_rows, ["gamma", "corr_xT_xtmin", "same_mode_as_ode", "mean_path_length", "grid_steps"]))
    all_rows = [{**r, "corr_xT_xtmin": float("nan"), "same_mode_as_ode": float("nan"), "mean_path_length": float("nan")}
                for r in rows]
    all_rows += [{"gamma": p["gamma"], "t": float("nan"), "view": "paths", "tv_to_closed_form": float("nan"),
                  "mc_floor": float("nan"), **{k: p[k] for k in ("corr_xT_xtmin", "same_mode_as_ode",
                                                                 "mean_path_length")}} for p in path_rows]
    _common.write(args.out, "same_marginals", all_rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import same_marginals

    with _common.figure_style(args):
        same_marginals(paths, rows, path_rows, _common.figure(args, "same_marginals"),
                       title="ring8 / VP: SDE family from the same x_T - same marginals, different paths")
    return meta["headline"]


if __name__ == "__main__":
    main()
