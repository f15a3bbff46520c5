"""`diffusion-lab fokker-planck`: the density of an exact target evolved on a grid, forward and in generation."""
from __future__ import annotations

import os
import time

from . import _common as C


def add_parser(sub):
    from ..fokker_planck import METHODS

    p = sub.add_parser(
        "fokker-planck",
        help="evolve the density of an exact target on a grid (forward noising and generation runs)",
        description=(
            "Grid Fokker-Planck view of the exact field of a target: the forward (noising) equation "
            "dp/dt = -div(f x p) + g^2/2 lap p from the data density, and the generation run from p_{t_max} back "
            "to t_min with the reverse SDE family (gamma = 1: reverse SDE, gamma = 0: PF-ODE continuity), "
            "drift -f x + (1+gamma^2)/2 g^2 s from the field's score on the grid. Finite volumes with "
            "Scharfetter-Gummel fluxes and zero-flux boundaries. Prints mass, min, L1/TV and KL(grid || exact) "
            "against the exact p_t per time and the exact mass outside the box; writes results.csv, "
            "settings.json and fokker_planck.png (2-D targets; or --format) to --out, which must be new or empty "
            "unless --overwrite. The figure shows every run with time increasing to the right, one colour scale "
            "and colour bar per row, and the generation run's final TV at t_min."
        ),
    )
    C.add_target_schedule(p)
    p.add_argument("--n", type=int, default=128, help="cells per axis (default 128)")
    p.add_argument("--box", type=float, default=None, metavar="L",
                   help="half-width of the box [-L, L]^d (default: 6 for 2-D, 8 for 1-D)")
    p.add_argument("--times", type=float, nargs="+", default=None, metavar="T",
                   help="times to report (default 0.05 0.2 0.5 1 within the schedule's range)")
    p.add_argument("--steps", type=int, default=100, help="time steps per run (default 100)")
    p.add_argument("--method", default="trbdf2", choices=[m for m in METHODS if m != "expm"],
                   help="time stepping (default trbdf2; the forward run uses the exact exponential where it can)")
    p.add_argument("--gamma", type=float, default=1.0, help="generation run: reverse SDE family gamma (default 1)")
    C.add_out(p, "results/fokker_planck")
    C.add_no_plot(p)
    C.add_figure_options(p)
    C.add_threads(p)
    p.set_defaults(func=run)
    return p


def _report_times(args, parser, schedule) -> list:
    """--times sorted (default 0.05 0.2 0.5 1 within the schedule's range); an error for a time outside it."""
    t_min, t_max = schedule.t_min, schedule.t_max
    times = sorted(args.times) if args.times else [t for t in (0.05, 0.2, 0.5, 1.0) if t_min <= t <= t_max]
    bad = [t for t in times if not (t_min <= t <= t_max)]
    if bad:
        parser.error(f"time {bad[0]} is outside the schedule's range [{t_min}, {t_max}]")
    return times


def _print_rows(fwd, gen, fwd_method, gamma) -> list:
    """Print the per-time table of both runs; returns its rows (dicts with the run's name)."""
    hdr = f"{'run':22s} {'t':>7s} {'mass':>18s} {'min':>10s} {'L1':>10s} {'TV':>10s} {'KL':>10s} {'outside':>9s}"
    rows = []
    for sol, name in ((fwd, f"forward ({fwd_method})"), (gen, f"generation (gamma={gamma:g})")):
        print(hdr if not rows else "")
        if not rows:
            print("-" * len(hdr))
        for r in sol.rows():
            print(f"{name:22s} {r['t']:7.3f} {r['mass']:18.15f} {r['min']:10.2e} {r['l1']:10.2e} {r['tv']:10.2e} "
                  f"{r['kl']:10.2e} {r['mass_outside']:9.1e}")
            rows.append({"run": name, **r})
    return rows


def _heatmaps(args, target, schedule, grid, times, fwd, gen, L, path) -> None:
    """Rows exact p_t, forward FP, generation at the report times (and t_min, where the generation run ends), with
    the TV of each grid density to the exact one."""
    from ..fokker_planck import exact_density
    from ..plots import fokker_planck_heatmaps, style

    t_min = schedule.t_min
    shown = sorted({*times, t_min})
    panels = [{"row": "exact p_t", "t": t, "density": exact_density(target, schedule, grid, t)} for t in shown]
    for sol, name, ts in ((fwd, "forward FP", times), (gen, "generation FP", shown)):
        for i, t in enumerate(sol.times):
            if any(abs(t - u) < 1e-12 for u in ts):
                panels.append({"row": name, "t": float(t), "density": sol.densities[i],
                               "note": f"TV {sol.tv[i]:.1e}" + (" (final)" if name.startswith("gen") and
                                                                 abs(t - t_min) < 1e-12 else "")})
    with style(dpi=args.dpi):
        fokker_planck_heatmaps(panels, (-L, L, -L, L), path,
                               title=f"{args.target} / {args.schedule}: grid {args.n}^2, generation with gamma = "
                                     f"{args.gamma:g}")


def run(args, parser) -> int:
    import torch

    from ..fokker_planck import Grid, check_memory, schedule_ratio, solve_forward, solve_reverse
    from ..schedules import get_schedule
    from ..targets import get_target

    C.set_threads(args, parser)
    C.check_figure_options(args, parser)
    if args.n < 8:
        parser.error(f"--n must be >= 8, got {args.n}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.gamma >= 0:
        parser.error(f"--gamma must be >= 0, got {args.gamma}")
    target, schedule = get_target(args.target), get_schedule(args.schedule)
    if target.dim > 3:
        parser.error(f"target {args.target!r} has dimension {target.dim}; the grid solver handles d <= 3")
    try:  # refuse before allocating: estimated peak memory of both runs against half the physical memory
        check_memory((args.n,) * target.dim, args.method, n_times=2 * len(args.times or [0] * 4) + 4)
    except MemoryError as e:
        parser.error(str(e))
    L = args.box if args.box is not None else (8.0 if target.dim == 1 else 6.0)
    if not L > 0:
        parser.error(f"--box must be > 0, got {L}")
    try:  # the grid's own checks (a cell width below MIN_CELL_WIDTH makes the implicit steppers singular)
        grid = Grid.box(-L, L, args.n, target.dim)
    except ValueError as exc:
        parser.error(f"--box {L!r} with --n {args.n}: {exc}")
    times = _report_times(args, parser, schedule)
    C.prepare_out(args, parser, ["results.csv", "settings.json", *C.figure_names("fokker_planck")])
    t_min, t_max = schedule.t_min, schedule.t_max
    field = target.field(schedule)
    t0 = time.perf_counter()
    fwd_times = [0.0] + [t for t in times if t > 0]
    fwd_method = "expm" if schedule_ratio(schedule, 0.0, fwd_times[-1]) is not None else args.method
    fwd = solve_forward(schedule, target, grid, fwd_times, method=fwd_method, steps=args.steps)
    gen_times = [t_max] + sorted({*times, t_min} - {t_max}, reverse=True)
    gen = solve_reverse(field, target, grid, gen_times, gamma=args.gamma, method=args.method, steps=args.steps,
                        target=target)
    total = time.perf_counter() - t0
    print(f"target {args.target} (d={target.dim}), schedule {args.schedule}, grid {args.n}^{target.dim} on "
          f"[-{L:g}, {L:g}]^{target.dim}, {args.steps} steps")
    rows = _print_rows(fwd, gen, fwd_method, args.gamma)
    print(f"mass drift: forward {fwd.mass_drift:.1e}, generation {gen.mass_drift:.1e}; generation used {gen.nfe} NFE")
    worst = max(r["mass_outside"] for r in rows)
    if worst > 1e-8:
        print(f"note: the exact density has mass {worst:.1e} outside the box: widen --box to reduce truncation")
    C.write_csv(os.path.join(args.out, "results.csv"), rows)
    settings = {
        "command": "diffusion-lab fokker-planck", "target": target.settings(), "schedule": schedule.settings(),
        "grid": grid.settings(), "steps": args.steps, "method": args.method, "forward_method": fwd_method,
        "gamma": args.gamma, "times": times, "forward": fwd.settings, "generation": gen.settings,
        "nfe": gen.nfe, "seconds": total, "versions": C.versions(numpy=True),
    }
    C.write_json(os.path.join(args.out, "settings.json"), settings)
    written = ["results.csv", "settings.json"]
    if not args.no_plot and target.dim == 2:
        name = f"fokker_planck.{args.format}"
        _heatmaps(args, target, schedule, grid, times, fwd, gen, L, os.path.join(args.out, name))
        written.append(name)
    C.wrote(written, args.out, f"({total:.1f} s)")
    return 0
