"""The ``diffusion-lab`` command. All of the package's terminal and file output for users starts here."""
from __future__ import annotations

import argparse
import sys
import time


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump, no traceback) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _add_check(sub):
    p = sub.add_parser(
        "check",
        help="run the theory-check catalogue and print it as a table",
        description=(
            "Run the catalogue of theory checks: each verifies an identity of diffusion-model theory on a "
            "closed-form case (or gives the verdict on a claim from the seed notes) and compares its residual "
            "with the tolerance of its class (exact: float64 rtol <= 1e-10; quadrature; mc: 5 standard errors; "
            "order: measured slope within 0.15). Exits 1 if any check fails."
        ),
    )
    p.add_argument("--json", metavar="PATH", help="also write the table (with settings and versions) as JSON")
    p.add_argument("-k", "--filter", metavar="PATTERN", help="only checks whose name contains PATTERN")
    p.add_argument("--area", metavar="AREA", help="only checks of this area (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks with their identities, run nothing")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=_cmd_check)
    return p


def _cmd_check(args, parser) -> int:
    import torch

    from theory_checks import catalogue

    torch.set_num_threads(1)  # small tensors throughout: intra-op threads only add OpenMP wake-up latency
    from theory_checks.report import table, to_json

    cat = catalogue()
    areas = sorted({c.area for c in cat.checks})
    if args.area and args.area not in areas:
        parser.error(f"unknown area {args.area!r}; choose one of {areas}")
    cat = cat.select(args.filter, args.area)
    if not cat.checks:
        parser.error(f"no check matches filter {args.filter!r}")
    if args.list:
        for c in cat.checks:
            print(f"{c.name}  [{c.area}, {c.kind}, tol {c.tol:g}]  {c.identity.splitlines()[0] if c.identity else ''}")
        return 0
    t0 = time.perf_counter()
    results = cat.run(progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    text = table(results)
    print(text.splitlines()[-1] if args.quiet else text)
    print(f"{len(results)} checks in {seconds:.1f} s")
    if args.json:
        to_json(results, args.json, seconds)
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1


def _add_compare(sub):
    from .compare import DEFAULT_METHODS, DEFAULT_NFES
    from .samplers.grids import GRID_KINDS
    from .schedules import SCHEDULES
    from .targets import TARGETS

    p = sub.add_parser(
        "compare",
        help="compare samplers on an exact target over NFE budgets (the main job)",
        description=(
            "Run samplers from the same exact samples of p_{t_max} on an exact target at each NFE budget and report "
            "the terminal error against the exact PF-ODE flow map (scipy DOP853, rtol 1e-10), the sliced W2 to exact "
            "samples with its Monte-Carlo floor, the exact W2 of the output law (Gaussian targets) and wall time. "
            "Writes results.csv, settings.json and error_vs_nfe.png to --out. Methods take options as "
            "name:key=value,... (e.g. ddim:eta=0.5, heun:coords=edm, em:gamma=2)."
        ),
    )
    p.add_argument("--target", default="ring8", choices=sorted(TARGETS), help="exact target (default ring8)")
    p.add_argument("--schedule", default="vp", choices=sorted(SCHEDULES), help="noise schedule (default vp)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES), metavar="N",
                   help=f"NFE budgets (default {' '.join(map(str, DEFAULT_NFES))})")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="samplers to compare (default: " + " ".join(DEFAULT_METHODS) + "); see --list-methods")
    p.add_argument("--grid", default="logsnr", choices=GRID_KINDS, help="time grid (default logsnr)")
    p.add_argument("--final", default="step", choices=("step", "denoise"),
                   help="last step: stop at t_min (compare with p_t_min) or return the denoiser (compare with p_0)")
    p.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--out", default="results/compare", metavar="DIR", help="output folder (default results/compare)")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: at these batch sizes OpenMP wake-ups cost more than they save)")
    p.add_argument("--list-methods", action="store_true", help="list the samplers with order, NFE/step; run nothing")
    p.set_defaults(func=_cmd_compare)
    return p


def _cmd_compare(args, parser) -> int:
    import csv
    import json
    import math
    import os
    import platform

    import torch

    import diffusion_lab

    from .compare import DEFAULT_METHODS, _nfe_options, parse_method, run_comparison
    from .samplers import available, get_method
    from .schedules import get_schedule
    from .targets import get_target

    if args.list_methods:
        print(f"{'method':16s} {'family':12s} {'order':>5s} {'stochastic':>10s} {'NFE/step':>8s}  description")
        for m in available():
            nps = "adaptive" if math.isnan(m.nfe_per_step) else f"{m.nfe_per_step:g}"
            print(f"{m.name:16s} {m.family:12s} {m.order:5g} {str(m.stochastic):>10s} {nps:>8s}  {m.description}")
        return 0
    if args.n < 2:
        parser.error(f"--n must be >= 2, got {args.n}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if any(n < 1 for n in args.nfe):
        parser.error(f"--nfe budgets must be >= 1, got {args.nfe}")
    if args.methods is None:
        names = [m for m in DEFAULT_METHODS if m in {i.name for i in available()}]
    else:
        names = args.methods
    try:
        specs = [parse_method(m) for m in names]
    except ValueError as exc:
        parser.error(str(exc))
    if any(math.isnan(get_method(s.name).nfe_per_step) for s in specs):
        parser.error("adaptive methods take rtol/atol, not an NFE budget; leave them out of compare")
    target, schedule = get_target(args.target), get_schedule(args.schedule)
    # validate every (method, budget) before any work
    from .samplers import steps_for_nfe

    for s_ in specs:
        for n in args.nfe:
            try:
                steps_for_nfe(s_.name, n, args.final, **_nfe_options(s_))
            except ValueError as exc:
                parser.error(str(exc))
    os.makedirs(args.out, exist_ok=True)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(specs) * len(args.nfe), desc="compare", leave=False)
    progress = (lambda k, n, row: bar.update(1)) if bar is not None else None
    t0 = time.perf_counter()
    out = run_comparison(target, schedule, specs, args.nfe, n_samples=args.n, seed=args.seed, grid_kind=args.grid,
                         final=args.final, progress=progress)
    total = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    rows, ref = out["rows"], out["reference"]
    gauss = any(not math.isnan(r["w2_exact"]) for r in rows)
    w = max(22, *(len(r["sampler"]) for r in rows))
    hdr = f"{'sampler':{w}s} {'NFE':>4s} {'flow error':>11s} {'sliced W2':>10s}" + (f" {'exact W2':>10s}" if gauss else "") + f" {'time [s]':>9s}"
    print(f"target {args.target} (d={target.dim}), schedule {args.schedule}, grid {args.grid}, final={args.final}, "
          f"{args.n} samples, seed {args.seed}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        fe = "-" if math.isnan(r["flow_error"]) else f"{r['flow_error']:.3e}"
        line = f"{r['sampler']:{w}s} {r['nfe']:4d} {fe:>11s} {r['sw2']:10.4f}"
        if gauss:
            line += " " + ("-".rjust(10) if math.isnan(r["w2_exact"]) else f"{r['w2_exact']:10.3e}")
        print(line + f" {r['seconds']:9.3f}")
    print(f"reference: PF-ODE flow map by {ref['solver']} (rtol {ref['rtol']:g}, {ref['nfe']} NFE). Sliced W2 against "
          f"{args.n} exact samples of {ref['law']}: the exact flow map scores {ref['sw2_exact_flow']:.4f}; two independent "
          f"exact sets score {ref['sw2_floor']:.4f} +- {ref['sw2_floor_se']:.4f} (Monte-Carlo floor)")
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    settings = {
        "command": "diffusion-lab compare", "target": target.settings(), "schedule": schedule.settings(),
        "methods": [s_.label for s_ in specs], "nfe": args.nfe, "grid": args.grid, "final": args.final,
        "n_samples": args.n, "seed": args.seed, "reference": ref, "seconds": total,
        "versions": {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    with open(os.path.join(args.out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=2)
    written = ["results.csv", "settings.json"]
    if not args.no_plot:
        from .plots import error_vs_nfe

        error_vs_nfe(rows, os.path.join(args.out, "error_vs_nfe.png"),
                     title=f"{args.target} / {args.schedule} / {args.grid} grid", floor=ref["sw2_exact_flow"])
        written.append("error_vs_nfe.png")
    print(f"wrote {', '.join(written)} to {args.out} ({total:.1f} s)")
    return 0


def _add_fokker_planck(sub):
    from .fokker_planck import METHODS
    from .schedules import SCHEDULES
    from .targets import TARGETS

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
            "settings.json and fokker_planck.png to --out."
        ),
    )
    p.add_argument("--target", default="ring8", choices=sorted(TARGETS), help="exact target (default ring8)")
    p.add_argument("--schedule", default="vp", choices=sorted(SCHEDULES), help="noise schedule (default vp)")
    p.add_argument("--n", type=int, default=128, help="cells per axis (default 128)")
    p.add_argument("--box", type=float, default=None, metavar="L",
                   help="half-width of the box [-L, L]^d (default: 6 for 2-D, 8 for 1-D)")
    p.add_argument("--times", type=float, nargs="+", default=None, metavar="T",
                   help="times to report (default 0.05 0.2 0.5 1 within the schedule's range)")
    p.add_argument("--steps", type=int, default=100, help="time steps per run (default 100)")
    p.add_argument("--method", default="trbdf2", choices=[m for m in METHODS if m != "expm"],
                   help="time stepping (default trbdf2; the forward run uses the exact exponential where it can)")
    p.add_argument("--gamma", type=float, default=1.0, help="generation run: reverse SDE family gamma (default 1)")
    p.add_argument("--out", default="results/fokker_planck", metavar="DIR", help="output folder")
    p.add_argument("--no-plot", action="store_true", help="skip the figure")
    p.set_defaults(func=_cmd_fokker_planck)
    return p


def _cmd_fokker_planck(args, parser) -> int:
    import csv
    import json
    import os
    import platform

    import numpy as np
    import torch

    import diffusion_lab

    from .fokker_planck import Grid, schedule_ratio, solve_forward, solve_reverse
    from .schedules import get_schedule
    from .targets import get_target

    torch.set_num_threads(1)
    if args.n < 8:
        parser.error(f"--n must be >= 8, got {args.n}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if not args.gamma >= 0:
        parser.error(f"--gamma must be >= 0, got {args.gamma}")
    target, schedule = get_target(args.target), get_schedule(args.schedule)
    if target.dim > 3:
        parser.error(f"target {args.target!r} has dimension {target.dim}; the grid solver handles d <= 3")
    if target.dim == 3 and args.n > 48:
        parser.error(f"--n {args.n} gives {args.n ** 3} cells in 3-D; use --n <= 48")
    L = args.box if args.box is not None else (8.0 if target.dim == 1 else 6.0)
    if not L > 0:
        parser.error(f"--box must be > 0, got {L}")
    t_min, t_max = schedule.t_min, schedule.t_max
    times = sorted(args.times) if args.times else [t for t in (0.05, 0.2, 0.5, 1.0) if t_min <= t <= t_max]
    bad = [t for t in times if not (t_min <= t <= t_max)]
    if bad:
        parser.error(f"time {bad[0]} is outside the schedule's range [{t_min}, {t_max}]")
    grid = Grid.box(-L, L, args.n, target.dim)
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
    hdr = f"{'run':22s} {'t':>7s} {'mass':>18s} {'min':>10s} {'L1':>10s} {'TV':>10s} {'KL':>10s} {'outside':>9s}"
    rows = []
    for sol, name in ((fwd, f"forward ({fwd_method})"), (gen, f"generation (gamma={args.gamma:g})")):
        print(hdr if not rows else "")
        if not rows:
            print("-" * len(hdr))
        for r in sol.rows():
            print(f"{name:22s} {r['t']:7.3f} {r['mass']:18.15f} {r['min']:10.2e} {r['l1']:10.2e} {r['tv']:10.2e} "
                  f"{r['kl']:10.2e} {r['mass_outside']:9.1e}")
            rows.append({"run": name, **r})
    print(f"mass drift: forward {fwd.mass_drift:.1e}, generation {gen.mass_drift:.1e}; generation used {gen.nfe} NFE")
    worst = max(r["mass_outside"] for r in rows)
    if worst > 1e-8:
        print(f"note: the exact density has mass {worst:.1e} outside the box: widen --box to reduce truncation")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    settings = {
        "command": "diffusion-lab fokker-planck", "target": target.settings(), "schedule": schedule.settings(),
        "grid": grid.settings(), "steps": args.steps, "method": args.method, "forward_method": fwd_method,
        "gamma": args.gamma, "times": times, "forward": fwd.settings, "generation": gen.settings,
        "nfe": gen.nfe, "seconds": total,
        "versions": {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    with open(os.path.join(args.out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=2)
    written = ["results.csv", "settings.json"]
    if not args.no_plot and target.dim == 2:
        from .fokker_planck import exact_density
        from .plots import fokker_planck_heatmaps

        panels = []
        for t in times:
            panels.append({"row": "exact p_t", "t": t, "density": exact_density(target, schedule, grid, t)})
        for sol, name in ((fwd, "forward FP"), (gen, "generation")):
            for i, t in enumerate(sol.times):
                if any(abs(t - u) < 1e-12 for u in times):
                    panels.append({"row": name, "t": float(t), "density": sol.densities[i],
                                   "note": f"TV {sol.tv[i]:.1e}"})
        fokker_planck_heatmaps(panels, (-L, L, -L, L), os.path.join(args.out, "fokker_planck.png"),
                               title=f"{args.target} / {args.schedule}: grid {args.n}^2")
        written.append("fokker_planck.png")
    print(f"wrote {', '.join(written)} to {args.out} ({total:.1f} s)")
    return 0


def _add_likelihood(sub):
    from .schedules import SCHEDULES
    from .targets import TARGETS

    p = sub.add_parser(
        "likelihood",
        help="negative log-likelihood through the PF-ODE (exact divergence or Hutchinson)",
        description=(
            "Compute log p_{t_min}(x) by the instantaneous change of variables along the probability-flow ODE "
            "for samples of an exact target (compared with its closed form), printing the NLL in nats and bits/dim "
            "with its standard error and the NFE."
        ),
    )
    p.add_argument("--target", default="ring8", choices=sorted(TARGETS), help="exact target (default ring8)")
    p.add_argument("--schedule", default="vp", choices=sorted(SCHEDULES), help="noise schedule (default vp)")
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="a `diffusion-lab train` checkpoint: evaluate its learned field (EMA weights) on noised "
                        "samples of its training data instead (--target/--schedule are then ignored)")
    p.add_argument("--n", type=int, default=256, help="number of samples of p_t_min (default 256)")
    p.add_argument("--divergence", default="exact", choices=("exact", "hutchinson"))
    p.add_argument("--probe", default="rademacher", choices=("rademacher", "gaussian"))
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per sample (default 8, >= 1)")
    p.add_argument("--rtol", type=float, default=1e-8, help="ODE relative tolerance (default 1e-8)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_likelihood)
    return p


def _cmd_likelihood(args, parser) -> int:
    import math

    import torch

    from .likelihood import log_likelihood
    from .schedules import get_schedule
    from .targets import TARGETS, get_target

    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.probes < 1:
        parser.error(f"--probes must be >= 1, got {args.probes}")
    if not 0 < args.rtol < 1:
        parser.error(f"--rtol must be in (0, 1), got {args.rtol}")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(args.seed)
    exact = None
    if args.checkpoint:
        from .training import field_from_checkpoint, load_checkpoint

        state = load_checkpoint(args.checkpoint)
        field = field_from_checkpoint(state)
        schedule, meta = field.schedule, state["meta"]
        x0, _, desc = _train_data(meta["data"], args.n, args.seed, False)
        x0 = x0[torch.randperm(x0.shape[0], generator=g)[: args.n]].to(torch.float64)
        tt = torch.tensor(schedule.t_min, dtype=torch.float64)
        x = schedule.alpha(tt) * x0 + schedule.sigma(tt) * torch.randn(x0.shape, dtype=torch.float64, generator=g)
        label = f"checkpoint {args.checkpoint} ({meta['model']} on {desc})"
        if meta["data"] in TARGETS:
            target = get_target(meta["data"])
            exact = target.log_prob_t(x.reshape(x.shape[0], -1), schedule.t_min, schedule)
    else:
        target, schedule = get_target(args.target), get_schedule(args.schedule)
        field = target.field(schedule)
        x = target.marginal(schedule, schedule.t_min).sample(args.n, g)
        exact = target.log_prob_t(x, schedule.t_min, schedule)
        label = f"target {args.target} (d={target.dim}), schedule {args.schedule}"
    res = log_likelihood(field, x, divergence=args.divergence, probe=args.probe,
                         n_probes=args.probes, rtol=args.rtol, atol=args.rtol * 1e-2, generator=g)
    n, d = x.shape[0], x[0].numel()
    nll = -float(res.log_prob.mean())
    se_mc = float(res.log_prob.std() / math.sqrt(n)) if n > 1 else float("nan")
    se_est = float(torch.sqrt((res.se**2).sum())) / n
    print(f"{label}, t0 = {res.t0:g}, {n} samples of p_t0, "
          f"divergence {args.divergence}" + (f" ({args.probe}, {args.probes} probes)" if args.divergence == "hutchinson" else ""))
    print(f"NLL      {nll:.6f} nats  ({nll / (d * math.log(2)):.6f} bits/dim)  +- {se_mc:.4f} (sampling SE of the mean)")
    print(f"estimator SE of the mean (probes): {se_est:.2e} nats")
    if exact is not None:
        print(f"closed form on the same samples: {-float(exact.mean()):.6f} nats; max |error| per sample "
              f"{float((res.log_prob - exact).abs().max()):.2e}; mean error {float((res.log_prob - exact).mean()):+.2e}")
    print(f"NFE {res.nfe}, {res.seconds:.1f} s")
    return 0


_TRAIN_DATA_HELP = "ring8 and the other exact targets (samples), moons / swiss_roll / checkerboard, digits (sklearn 8x8)"


def _train_data(name: str, n: int, seed: int, conditional: bool):
    """(x, labels or None, description) of a training set; raises ValueError naming a bad choice."""
    import torch

    from .targets import SAMPLE_ONLY, TARGETS, digits, get_target

    g = torch.Generator().manual_seed(seed)
    if name == "digits":
        x, y = digits(return_labels=True)
        return x, y, "sklearn digits (1797 images, 8x8, scaled to [-1, 1])"
    if name in TARGETS:
        x, k = get_target(name).sample(n, g, dtype=torch.float32, return_labels=True)
        return x, (k if conditional else None), f"{n} samples of the exact target {name}"
    if name in SAMPLE_ONLY:
        if conditional:
            raise ValueError(f"--conditional needs class labels; {name!r} has none (use an exact target or digits)")
        return SAMPLE_ONLY[name](n, g).to(torch.float32), None, f"{n} samples of {name}"
    raise ValueError(f"unknown data {name!r}; choose one of {_train_data_choices()}")


def _train_data_choices() -> list:
    from .targets import SAMPLE_ONLY, TARGETS

    return sorted(TARGETS) + sorted(SAMPLE_ONLY) + ["digits"]


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    return torch.device(name)


def _preview(field, meta: dict, n: int, seed: int, labels=None, w: float = 0.0, method: str = "dpmpp_2m",
             steps: int = 25, final: str = "denoise", grid_kind: str = "logsnr"):
    """Samples of a learned field from p_{t_max} (standard normal times sigma(t_max)), optionally with CFG."""
    import torch

    from .guidance import classifier_free_guidance
    from .samplers import sample

    sch = field.schedule
    g = torch.Generator().manual_seed(seed)
    shape = tuple(meta["data_shape"])
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64) * float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    if labels is not None:
        field.model.labels = labels
        if w != 0.0:
            field = classifier_free_guidance(field, w, labels)
    return sample(field, x, method, steps=steps, final=final, generator=g, grid_kind=grid_kind)


def _save_preview(x, labels, meta: dict, path: str, title: str) -> None:
    from .plots import image_grid, sample_panels

    if len(meta["data_shape"]) == 1 and meta["data_shape"][0] == 2:
        sample_panels({"samples": x.cpu()}, path, {"samples": title})
    elif len(meta["data_shape"]) == 3:
        x = x.clamp(-1, 1).cpu()
        if labels is not None:
            k = int(labels.max()) + 1
            rows = [x[labels == c][:10] for c in range(k)]
            image_grid(rows, path, row_titles=[f"class {c}" for c in range(k)], title=title)
        else:
            image_grid([x[i:i + 10] for i in range(0, min(len(x), 80), 10)], path, title=title)


def _add_train(sub):
    from .samplers.grids import GRID_KINDS  # noqa: F401
    from .schedules import SCHEDULES
    from .training import NET_PREDICTIONS, TIME_SAMPLERS, WEIGHTINGS

    p = sub.add_parser(
        "train",
        help="train a score network (MLP or DiT) on toy data, exact-target samples or digits",
        description=(
            "Train a network by denoising score matching / flow matching (diffusion_lab.training): AdamW, EMA of the "
            "weights, time sampler and loss weighting of choice, EDM preconditioning with --prediction edm. Writes "
            "checkpoint.pt (model, EMA, optimiser, RNG states, data position; loads with torch.load(weights_only=True)), "
            "train_log.csv, settings.json, loss.png and samples.png (EMA weights, dpmpp_2m, 25 steps) to --out. "
            "--resume continues from --out/checkpoint.pt to --steps; on CPU the result is bitwise that of one "
            "uninterrupted run. Multi-GPU: launch with torchrun --nproc_per_node N -m diffusion_lab.cli train ..."
        ),
    )
    p.add_argument("--data", default="ring8", metavar="DATA", help=f"training data: {_TRAIN_DATA_HELP} (default ring8)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional on the mixture component (exact targets); digits are always conditional")
    p.add_argument("--n-train", type=int, default=50000, help="training samples drawn from 2-D data (default 50000)")
    p.add_argument("--model", default="mlp", metavar="NAME",
                   help="mlp or a DiT config (DiT-tiny/2, DiT-micro/2, ...; 8x8x1 configs for digits)")
    p.add_argument("--hidden", type=int, default=128, help="MLP width (default 128)")
    p.add_argument("--depth", type=int, default=3, help="MLP residual blocks (default 3)")
    p.add_argument("--schedule", default="vp", choices=sorted(SCHEDULES), help="noise schedule (default vp)")
    p.add_argument("--prediction", default="eps", choices=NET_PREDICTIONS,
                   help="what the network predicts (velocity = flow matching; edm = EDM preconditioning)")
    p.add_argument("--weighting", default="uniform", choices=WEIGHTINGS, help="loss weighting w(t) (default uniform)")
    p.add_argument("--time-sampler", default="uniform", choices=TIME_SAMPLERS, help="training-time law (default uniform)")
    p.add_argument("--sigma-data", default="auto", help="data standard deviation for c_in / EDM (default: measured)")
    p.add_argument("--steps", type=int, default=2000, help="total optimiser steps (default 2000)")
    p.add_argument("--batch", type=int, default=512, help="global batch size (default 512)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=0, help="linear warm-up steps (default 0)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay (default 0.999)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (default: off)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--log-every", type=int, default=100, help="log interval in steps (default 100)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval in steps (default 1000)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (default 1: small tensors, OpenMP wake-ups cost more than they save)")
    p.add_argument("--out", default="results/train", metavar="DIR", help="output folder (default results/train)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png and samples.png")
    p.set_defaults(func=_cmd_train)
    return p


def _cmd_train(args, parser) -> int:
    import csv
    import json
    import math
    import os
    import platform

    import torch

    import diffusion_lab

    from . import training as T
    from .models import model_names
    from .schedules import get_schedule

    for name in ("steps", "batch", "log_every", "n_train", "hidden", "depth"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.ckpt_every < 0:
        parser.error(f"--ckpt-every must be >= 0, got {args.ckpt_every}")
    if args.data not in _train_data_choices():
        parser.error(f"unknown --data {args.data!r}; choose one of {_train_data_choices()}")
    if args.model not in model_names():
        parser.error(f"unknown --model {args.model!r}; choose one of {model_names()}")
    if not (0 <= args.ema < 1):
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        device = _device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    rank, world, dist_device = T.init_distributed()
    if world > 1:
        device = dist_device
    schedule = get_schedule(args.schedule)
    if args.prediction == "v" and not schedule.variance_preserving:
        parser.error(f"--prediction v needs a variance-preserving schedule (vp, cosine, ddpm), not {args.schedule!r}")
    try:
        x, y, data_desc = _train_data(args.data, args.n_train, args.seed, args.conditional or args.data == "digits")
    except ValueError as exc:
        parser.error(str(exc))
    num_classes = int(y.max()) + 1 if y is not None else 0
    data_shape = list(x.shape[1:])
    if args.sigma_data == "auto":
        sigma_data = round(float(x.std()), 6)
    else:
        try:
            sigma_data = float(args.sigma_data)
        except ValueError:
            parser.error(f"--sigma-data must be 'auto' or a number > 0, got {args.sigma_data!r}")
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            parser.error(f"--sigma-data must be > 0, got {args.sigma_data!r}")
    if args.model == "mlp":
        model_kwargs = {"data_shape": data_shape, "hidden": args.hidden, "depth": args.depth, "num_classes": num_classes}
    else:
        model_kwargs = {"num_classes": num_classes}
    meta = {"data": args.data, "data_desc": data_desc, "n_train": int(x.shape[0]), "seed": args.seed,
            "conditional": y is not None, "num_classes": num_classes, "data_shape": data_shape,
            "model": args.model, "model_kwargs": model_kwargs, "schedule": schedule.settings(),
            "prediction": args.prediction, "weighting": args.weighting, "time_sampler": args.time_sampler,
            "sigma_data": sigma_data, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
            "grad_clip": args.grad_clip, "bf16": bool(args.bf16), "world_size": world}
    torch.manual_seed(args.seed)
    try:
        net = T.build_network(meta)
    except (ValueError, TypeError) as exc:
        parser.error(f"--model {args.model}: {exc}")
    if list(getattr(net, "data_shape", data_shape)) != data_shape:
        parser.error(f"--model {args.model} takes data of shape {tuple(net.data_shape)}, but --data {args.data} has "
                     f"shape {tuple(data_shape)}")
    net = net.to(device)
    objective = T.Objective(schedule, args.prediction, args.weighting, args.time_sampler, sigma_data)
    try:
        loader = T.TensorLoader(x, y, args.batch, seed=args.seed, rank=rank, world_size=world, device=device)
    except ValueError as exc:
        parser.error(str(exc))
    trainer = T.Trainer(net, objective, loader, lr=args.lr, warmup=args.warmup, ema_decay=args.ema,
                        grad_clip=args.grad_clip, seed=args.seed,
                        autocast_dtype=torch.bfloat16 if args.bf16 else None, meta=meta)
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        if not os.path.exists(ckpt):
            parser.error(f"--resume: no checkpoint at {ckpt}")
        state = T.load_checkpoint(ckpt, map_location=device)
        keys = ("data", "n_train", "seed", "model", "model_kwargs", "schedule", "prediction", "weighting",
                "time_sampler", "sigma_data", "batch")
        diff = [k for k in keys if state["meta"].get(k) != meta[k]]
        if diff:
            k = diff[0]
            parser.error(f"--resume: the checkpoint was trained with {k}={state['meta'].get(k)!r}, this run asks for "
                         f"{meta[k]!r}")
        if state["step"] > args.steps:
            parser.error(f"--resume: the checkpoint is at step {state['step']}, beyond --steps {args.steps}")
        trainer.load_state_dict(state)
        trainer.meta = meta
    main_rank = rank == 0
    if main_rank:
        os.makedirs(args.out, exist_ok=True)
        n_par = sum(p.numel() for p in net.parameters())
        print(f"train {args.model} ({n_par:,} parameters) on {data_desc}; schedule {args.schedule}, prediction "
              f"{args.prediction}, weighting {args.weighting}, times {args.time_sampler}, sigma_data {sigma_data:g}; "
              f"device {device}, world size {world}; from step {trainer.step} to {args.steps}")

    def log(rec):
        if not sys.stderr.isatty():
            print(f"step {rec['step']:6d}  loss {rec['loss']:.5f}  lr {rec['lr']:.2e}  "
                  f"{rec['samples_per_s']:,.0f} samples/s  {rec['seconds']:.1f} s")

    t0 = time.perf_counter()
    trainer.run(args.steps, callback=log, log_every=args.log_every, ckpt_every=args.ckpt_every,
                on_checkpoint=lambda tr: T.save_checkpoint(ckpt, tr.state_dict()), progress=sys.stderr.isatty())
    total = time.perf_counter() - t0
    if not main_rank:
        return 0
    written = ["checkpoint.pt"]
    if trainer.history:
        with open(os.path.join(args.out, "train_log.csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(trainer.history[0]))
            w.writeheader()
            w.writerows(trainer.history)
        written.append("train_log.csv")
    settings = {"command": "diffusion-lab train", **meta, "steps": args.steps, "seconds_this_run": total,
                "objective": objective.settings(),
                "versions": {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__,
                             "python": platform.python_version()}}
    with open(os.path.join(args.out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=2, default=str)
    written.append("settings.json")
    if not args.no_plot:
        from .plots import loss_curve

        if trainer.history:
            loss_curve(trainer.history, os.path.join(args.out, "loss.png"),
                       title=f"{args.model} on {args.data} ({args.schedule}, {args.prediction})")
            written.append("loss.png")
        field = T.learned_field(trainer.ema.module.eval(), schedule, args.prediction, sigma_data=sigma_data)
        labels = None
        if y is not None:
            labels = torch.arange(num_classes).repeat_interleave(10 if len(data_shape) == 3 else 200)
        n = len(labels) if labels is not None else (2000 if len(data_shape) == 1 else 80)
        res = _preview(field, meta, n, args.seed, labels)
        _save_preview(res.x, labels, meta, os.path.join(args.out, "samples.png"),
                      f"EMA samples, dpmpp_2m {res.nfe} NFE, step {trainer.step}")
        written.append("samples.png")
    last = trainer.history[-1] if trainer.history else {}
    print(f"step {trainer.step}: loss {last.get('loss', float('nan')):.5f}; wrote {', '.join(written)} to {args.out} "
          f"({total:.1f} s training)")
    return 0


def _add_sample(sub):
    from .samplers.grids import GRID_KINDS

    p = sub.add_parser(
        "sample",
        help="sample from a training checkpoint with any sampler (optionally with classifier-free guidance)",
        description=(
            "Load a checkpoint written by `diffusion-lab train` (torch.load weights_only=True), wrap the EMA network "
            "in a velocity field and run a sampler of the samplers package from N(0, sigma(t_max)^2 I). --cfg W "
            "applies classifier-free guidance eps~ = (1+W) eps(x|c) - W eps(x|null) (W >= -1; 0 = conditional), "
            "counted as 2 NFE per call. Writes samples.pt (x, labels), samples.png and settings.json to --out."
        ),
    )
    p.add_argument("checkpoint", help="path to checkpoint.pt")
    p.add_argument("--method", default="dpmpp_2m", help="sampler (see `diffusion-lab compare --list-methods`)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25)")
    p.add_argument("--grid", default="logsnr", choices=GRID_KINDS, help="time grid (default logsnr)")
    p.add_argument("--final", default="denoise", choices=("step", "denoise"),
                   help="return x(t_min) or the denoiser D(x(t_min)) (default denoise)")
    p.add_argument("--n", type=int, default=None, help="number of samples (default 2000 for 2-D, 100 for images)")
    p.add_argument("--cfg", type=float, default=0.0, metavar="W", help="classifier-free guidance weight w (default 0)")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="class label for a conditional model (default: all classes in turn)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (default 1)")
    p.add_argument("--out", default="results/sample", metavar="DIR", help="output folder (default results/sample)")
    p.add_argument("--no-plot", action="store_true", help="skip samples.png")
    p.set_defaults(func=_cmd_sample)
    return p


def _cmd_sample(args, parser) -> int:
    import json
    import os
    import platform

    import torch

    import diffusion_lab

    from . import training as T
    from .guidance import check_guidance_weight
    from .samplers import available

    methods = sorted(m.name for m in available())
    if args.method not in methods:
        parser.error(f"unknown --method {args.method!r}; choose one of {methods}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.n is not None and args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    try:
        check_guidance_weight(args.cfg)
    except ValueError as exc:
        parser.error(f"--cfg: {exc}")
    try:
        device = _device(args.device)
    except ValueError as exc:
        parser.error(str(exc))
    if not os.path.exists(args.checkpoint):
        parser.error(f"no checkpoint at {args.checkpoint}")
    state = T.load_checkpoint(args.checkpoint, map_location="cpu")
    meta = state["meta"]
    k = int(meta.get("num_classes", 0))
    if args.cfg != 0.0 and not k:
        parser.error(f"--cfg {args.cfg} needs a class-conditional model; this checkpoint is unconditional")
    if args.klass is not None:
        if not k:
            parser.error(f"--class {args.klass} needs a class-conditional model; this checkpoint is unconditional")
        if not 0 <= args.klass < k:
            parser.error(f"--class {args.klass} is outside [0, {k - 1}]")
    image = len(meta["data_shape"]) == 3
    n = args.n or (100 if image else 2000)
    labels = None
    if k:
        labels = (torch.full((n,), args.klass, dtype=torch.long) if args.klass is not None
                  else torch.arange(n) % k)
    field = T.field_from_checkpoint(state, ema=not args.no_ema, device=device)
    t0 = time.perf_counter()
    res = _preview(field, meta, n, args.seed, labels, args.cfg, args.method, args.steps, args.final, args.grid)
    seconds = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    torch.save({"x": res.x.float().cpu(), "labels": labels if labels is not None else torch.empty(0, dtype=torch.long)},
               os.path.join(args.out, "samples.pt"))
    settings = {"command": "diffusion-lab sample", "checkpoint": os.path.abspath(args.checkpoint),
                "checkpoint_step": int(state["step"]), "train": meta, "method": args.method, "steps": args.steps,
                "grid": args.grid, "final": args.final, "n": n, "cfg_w": args.cfg, "class": args.klass,
                "ema": not args.no_ema, "seed": args.seed, "nfe": res.nfe, "seconds": seconds,
                "versions": {"diffusion_lab": diffusion_lab.__version__, "torch": torch.__version__,
                             "python": platform.python_version()}}
    with open(os.path.join(args.out, "settings.json"), "w") as fh:
        json.dump(settings, fh, indent=2, default=str)
    written = ["samples.pt", "settings.json"]
    if not args.no_plot:
        _save_preview(res.x, labels, meta, os.path.join(args.out, "samples.png"),
                      f"{args.method}, {res.nfe} NFE, cfg w={args.cfg:g}")
        written.append("samples.png")
    print(f"{n} samples from step {state['step']} ({meta['model']} on {meta['data']}) with {args.method}, "
          f"{res.nfe} NFE{f', CFG w={args.cfg:g}' if args.cfg else ''} in {seconds:.2f} s; wrote {', '.join(written)} "
          f"to {args.out}")
    return 0


def build_parser(prog: str = "diffusion-lab") -> argparse.ArgumentParser:
    import diffusion_lab

    parser = _Parser(
        prog=prog,
        description=(
            "diffusion_lab: numerical experiments on diffusion-model theory with exact scores. "
            "One velocity field, three views: sample-path solvers, Langevin, Fokker-Planck."
        ),
    )
    parser.add_argument("--version", action="version", version=f"diffusion_lab {diffusion_lab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_check(sub)
    _add_compare(sub)
    _add_likelihood(sub)
    _add_fokker_planck(sub)
    _add_train(sub)
    _add_sample(sub)
    return parser


def main(argv=None, prog: str = "diffusion-lab") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]
    try:
        return args.func(args, sub_parser)
    except (ValueError, TypeError, OSError) as exc:
        sys.stderr.write(f"{prog} {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
