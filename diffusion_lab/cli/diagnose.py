"""`diffusion-lab diagnose`: where a trained network's score is wrong on an exact target (in t and in x), and what
that costs in KL."""
from __future__ import annotations

import math
import os
import time

from . import _common as C

PROFILE_FIG, MAPS_FIG = "score_error", "error_maps"


def add_parser(sub):
    from ..targets import TARGETS

    p = sub.add_parser(
        "diagnose",
        help="score-error diagnostics of a trained network against an exact target's score",
        description=(
            "Measure a `diffusion-lab train` checkpoint's score (EMA weights) against the exact score of an exact "
            "target: the time profile e(t) = E_{p_t} |s_theta(x, t) - grad log p_t(x)|^2 from exact samples of p_t "
            "(with its standard error, also in the eps and x0 parameterisations: sigma^2 e and sigma^4/alpha^2 e), "
            "its integrals under the likelihood (g^2), score (1), eps (sigma^2) and x0 (sigma^4/alpha^2) weightings, "
            "and, for 1-D and 2-D targets, the KL bound KL(p_t_min || q_theta) <= KL(p_t_max || pi) + "
            "1/2 int g^2 e dt (Song, Durkan, Murray & Ermon 2021) against the KL of the network's reverse SDE solved "
            "on a Fokker-Planck grid from the exact p_t_max. For 2-D targets, maps of the error over x at --map-times. "
            "Writes profile.csv, summary.json, score_error.png and (2-D) error_maps.png to --out, which must be new "
            "or empty unless --overwrite."
        ),
    )
    p.add_argument("--checkpoint", metavar="PATH", required=True, help="a `diffusion-lab train` checkpoint")
    p.add_argument("--target", default=None, choices=sorted(TARGETS), metavar="NAME",
                   help="the exact target to measure against (default: the checkpoint's training data, when it is an "
                        "exact target)")
    p.add_argument("--n", type=int, default=2000, help="exact samples of p_t per time (default 2000)")
    p.add_argument("--n-times", type=int, default=24,
                   help="times of the profile: Gauss-Legendre nodes in log-SNR on [t_min, t_max] (default 24)")
    p.add_argument("--map-times", type=float, nargs="+", default=None, metavar="T",
                   help="times of the 2-D error maps (default: t_min, 0.05, 0.2, 0.5 of the schedule's range)")
    p.add_argument("--extent", type=float, default=4.0, help="2-D maps and the Fokker-Planck box: [-E, E]^d "
                                                              "(default 4 for maps; the KL grid uses E + 1)")
    p.add_argument("--cells", type=int, default=96, help="cells per axis of the maps and the KL grid (default 96)")
    p.add_argument("--fp-steps", type=int, default=100, help="Fokker-Planck time steps of the KL truth (default 100)")
    p.add_argument("--no-kl", action="store_true", help="skip the KL bound and its Fokker-Planck truth")
    C.add_seed(p)
    C.add_out(p, "results/diagnose")
    C.add_no_plot(p, help="skip the figures")
    C.add_figure_options(p)
    C.add_threads(p)
    p.set_defaults(func=run)
    return p


def _target(args, parser, meta):
    from ..targets import TARGETS, get_target

    name = args.target or meta.get("data")
    if name not in TARGETS:
        parser.error(f"the checkpoint was trained on {meta.get('data')!r}, which has no exact score; pass --target "
                     f"NAME (one of {', '.join(sorted(TARGETS))})")
    target = get_target(name)
    dim = math.prod(meta["data_shape"])
    if target.dim != dim:
        parser.error(f"--target {name} has dimension {target.dim}, the checkpoint's data {dim}")
    return name, target


def _map_times(args, parser, schedule) -> list:
    if args.map_times is None:
        lo, hi = schedule.t_min, schedule.t_max
        return [lo] + [lo + f * (hi - lo) for f in (0.05, 0.2, 0.5)]
    bad = [t for t in args.map_times if not schedule.t_min <= t <= schedule.t_max]
    if bad:
        parser.error(f"--map-times {bad[0]} is outside [{schedule.t_min}, {schedule.t_max}] of the schedule")
    return list(args.map_times)


def run(args, parser) -> int:
    from .. import diagnostics as Dg
    from .. import training as T

    C.set_threads(args, parser)
    C.check_figure_options(args, parser)
    C.at_least(parser, "--n", args.n, 2)
    C.at_least(parser, "--n-times", args.n_times, 1)
    C.at_least(parser, "--cells", args.cells, 4)
    C.at_least(parser, "--fp-steps", args.fp_steps, 1)
    if not args.extent > 0:
        parser.error(f"--extent must be > 0, got {args.extent}")
    if not os.path.exists(args.checkpoint):
        parser.error(f"no checkpoint at {args.checkpoint}")
    state = T.load_checkpoint(args.checkpoint)
    meta = state["meta"]
    if meta.get("num_classes"):
        parser.error("diagnose takes unconditional networks; this checkpoint is class-conditional")
    name, target = _target(args, parser, meta)
    field = T.field_from_checkpoint(state)
    sch = field.schedule
    map_times = _map_times(args, parser, sch) if target.dim == 2 else []
    figs = C.figure_names(PROFILE_FIG, MAPS_FIG)
    C.prepare_out(args, parser, ["profile.csv", "summary.json", *figs])
    t0 = time.perf_counter()
    prof = Dg.score_error_profile(field, target, n_times=args.n_times, n=args.n, seed=args.seed)
    ints = prof.integrals()
    kb = None
    if not args.no_kl and target.dim <= 2:
        kb = Dg.kl_bound(field, target, profile=prof, cells=args.cells, half_width=args.extent + 1.0,
                         steps=args.fp_steps, seed=args.seed)
    maps = [Dg.error_map(field, target, t, (-args.extent, args.extent) * 2, args.cells) for t in map_times]
    total = time.perf_counter() - t0

    print(f"checkpoint {args.checkpoint} (step {state['step']}, {meta['model']} on {meta['data']}) against the exact "
          f"score of {name}; {args.n} exact samples of p_t at {args.n_times} times (Gauss-Legendre in log-SNR)")
    print(f"{'t':>10s} {'e(t)':>11s} {'SE':>9s} {'sigma^2 e':>11s} {'x0 error':>11s}")
    for r in prof.rows():
        print(f"{r['t']:10.4g} {r['e']:11.4e} {r['se']:9.2e} {r['e_eps']:11.4e} {r['e_x0']:11.4e}")
    print("weighted integrals int w(t) e(t) dt: " + ", ".join(
        f"{k} {v['value']:.4g} +- {v['se']:.2g}" for k, v in ints.items())
          + "  (w = g^2, 1, sigma^2, sigma^4/alpha^2)")
    if kb is not None:
        print(f"KL bound (Song, Durkan, Murray & Ermon 2021), reverse SDE from the exact p_t_max: KL(p_t_min || "
              f"q_theta) <= 1/2 int g^2 e dt = {kb.bound:.4g} +- {kb.bound_se:.2g}; Fokker-Planck truth {kb.truth:.4g} "
              f"(grid {args.cells}^"
              f"{target.dim}, {args.fp_steps} steps, TV {kb.tv:.3g}); bound / truth = {kb.ratio:.3g}")
    for m in maps:
        i = int(m.err.argmax())
        iy, ix = divmod(i, m.err.shape[1])
        print(f"map t={m.t:.4g}: largest error {m.err.max():.3g} at x=({m.x[ix]:.2f}, {m.y[iy]:.2f}); "
              f"int p_t |error|^2 dx = {m.e_quadrature():.4g} on the box")
    summary = {"command": "diffusion-lab diagnose", "checkpoint": os.path.abspath(args.checkpoint),
               "checkpoint_step": int(state["step"]), "train": meta, "target": name, "n": args.n,
               "n_times": args.n_times, "seed": args.seed, "quadrature": prof.quadrature, "integrals": ints,
               "weights": {"likelihood": "g^2", "score": "1", "eps": "sigma^2", "x0": "sigma^4/alpha^2"},
               "profile": prof.rows(), "kl_bound": None if kb is None else kb.summary(),
               "maps": [{"t": m.t, "max_error": float(m.err.max()), "e_on_box": m.e_quadrature(),
                         "extent": list(m.extent), "cells": args.cells} for m in maps],
               "seconds": total, "versions": C.versions()}
    C.write_csv(os.path.join(args.out, "profile.csv"), prof.rows())
    C.write_json(os.path.join(args.out, "summary.json"), summary, default=str)
    written = ["profile.csv", "summary.json"]
    if not args.no_plot:
        from ..plots import style

        with style(dpi=args.dpi):
            path = f"{PROFILE_FIG}.{args.format}"
            profile_figure(prof, os.path.join(args.out, path), f"{meta['model']} on {meta['data']} vs exact {name}",
                           kb)
            written.append(path)
            if maps:
                path = f"{MAPS_FIG}.{args.format}"
                maps_figure(maps, os.path.join(args.out, path))
                written.append(path)
    C.wrote(written, args.out, f"({total:.1f} s)")
    return 0


def profile_figure(prof, path: str, title: str = "", kb=None) -> None:
    """e(t), sigma^2 e(t) and sigma^4/alpha^2 e(t) against t (log-log) with +-2 SE bands."""
    from ..plots import _mpl, _save

    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    t = prof.t.numpy()
    for (y, se, lab), col in zip(((prof.e, prof.se, "score: e(t)"), (prof.e_eps, prof.se_eps, "eps: sigma^2 e(t)"),
                                  (prof.e_x0, prof.se_x0, "x0: sigma^4/alpha^2 e(t)")), ("C0", "C1", "C2")):
        ax.plot(t, y.numpy(), "o-", ms=3, color=col, label=lab)
        ax.fill_between(t, (y - 2 * se).clamp_min(1e-30).numpy(), (y + 2 * se).numpy(), color=col, alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("E_p_t |error|^2")
    if kb is not None:
        title += f"\nKL bound {kb.bound:.3g} vs Fokker-Planck truth {kb.truth:.3g}"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path, dpi=120)


def maps_figure(maps, path: str) -> None:
    """One panel per time: log10 |s_theta - grad log p_t|^2 over x, with contours of p_t."""
    import numpy as np

    from ..plots import _mpl, _save

    plt = _mpl()
    fig, axes = plt.subplots(1, len(maps), figsize=(3.6 * len(maps), 3.4), squeeze=False)
    for ax, m in zip(axes[0], maps):
        im = ax.imshow(np.log10(np.maximum(m.err, 1e-12)), origin="lower", extent=m.extent, cmap="magma",
                       aspect="equal")
        dens = np.exp(m.log_density)
        ax.contour(m.x, m.y, dens, levels=np.quantile(dens, [0.9, 0.97, 0.995]), colors="c", linewidths=0.6)
        ax.set_title(f"t = {m.t:.3g}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="log10 |error|^2")
    _save(fig, path, dpi=120)
