"""`diffusion-lab compare`: samplers on an exact target over NFE budgets, scored against the exact law (MMD with its
null band, exact W2 on Gaussian targets) and the exact flow map."""
from __future__ import annotations

import math
import os
import sys
import time

from . import _common as C


def add_parser(sub):
    from ..compare import DEFAULT_METHODS, DEFAULT_NFES, DEFAULT_SAMPLES
    from ..samplers.grids import GRID_KINDS

    p = sub.add_parser(
        "compare",
        help="compare samplers on an exact target over NFE budgets (the main job)",
        description=(
            "Run samplers from the same exact samples of p_{t_max} on an exact target at each NFE budget and report "
            "the unbiased MMD^2 to the exact target law (closed-form law terms, standard error, the null band of exact "
            "samples, a 'resolved' flag and SE-aware ranks per budget), the terminal error against the exact PF-ODE "
            "flow map (scipy DOP853, rtol 1e-10), the sliced W2 to exact samples with its Monte-Carlo floor "
            "(descriptive), the exact W2 of the output law (Gaussian targets, stochastic samplers through their "
            "noise) and wall time. "
            "Writes results.csv, settings.json and error_vs_nfe.png (or --format) to --out, which must be new or empty "
            "unless --overwrite. Methods take options as name:key=value,... (e.g. ddim:eta=0.5, heun:coords=edm, "
            "em:gamma=2); --list-methods shows each method's options, and a wrong one fails before any work."
        ),
    )
    C.add_target_schedule(p)
    p.add_argument("--dim", type=int, default=None, metavar="D",
                   help="dimension of targets built in any dimension (" + ", ".join(dimension_targets())
                        + "); default: the target's own")
    p.add_argument("--nfe", type=int, nargs="+", default=list(DEFAULT_NFES), metavar="N",
                   help=f"NFE budgets (default {' '.join(map(str, DEFAULT_NFES))})")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="samplers to compare (default: " + " ".join(DEFAULT_METHODS) + "); see --list-methods")
    p.add_argument("--grid", default="logsnr", choices=GRID_KINDS, help="time grid (default logsnr)")
    p.add_argument("--final", default="step", choices=("step", "denoise"),
                   help="last step: stop at t_min (compare with p_t_min) or return the denoiser (compare with p_0)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=DEFAULT_SAMPLES,
                   help=f"number of samples (default {DEFAULT_SAMPLES}: enough for the MMD to resolve em at NFE 20 "
                        "on ring8 by >= 3 standard errors); under torchrun write --num-samples (torchrun reads --n "
                        "as an abbreviation of its own options)")
    C.add_seed(p)
    C.add_out(p, "results/compare")
    C.add_no_plot(p)
    C.add_figure_options(p)
    C.add_threads(p)
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="compare the samplers on a `diffusion-lab train` checkpoint's network (EMA weights) instead, "
                        "against the adaptive Dormand-Prince solve of its PF-ODE from the same starts (--rtol); on a "
                        "network trained on an exact target the MMD^2 to that target's law is reported too "
                        "(--target, --schedule and --dim are then ignored)")
    p.add_argument("--batch", type=int, default=None, metavar="B",
                   help=f"--checkpoint: samples per batch (default {CHECKPOINT_BATCH}); part of the seeding: sample i "
                        "starts from noise seeded by (--seed, i) and batch b draws its sampler noise from (--seed, b), "
                        "so that several processes (torchrun --nproc_per_node N -m diffusion_lab.cli compare "
                        "--checkpoint ...) give the numbers of one process with the same --seed and --batch")
    p.add_argument("--rtol", type=float, default=1e-6,
                   help="--checkpoint: relative (and absolute) tolerance of the adaptive reference solve (default 1e-6)")
    p.add_argument("--flow-map", nargs="+", default=[], metavar="PATH",
                   help="also compare learned flow maps: `diffusion-lab distill` checkpoints (EMA weights), run by "
                        "method flow_map at the --flow-map-nfe budgets on the same starts and metrics (exact target "
                        "only; the map's schedule must be --schedule)")
    p.add_argument("--flow-map-nfe", type=int, nargs="+", default=[1, 2, 4, 8], metavar="K",
                   help="network calls of the flow maps (default 1 2 4 8)")
    p.add_argument("--flow-map-sampling", default="auto", choices=("auto", "chain", "multistep", "both"),
                   help="flow maps: the deterministic chain Psi(x, t_i, t_i+1), multistep consistency sampling "
                        "(re-noising with fresh noise), or both; auto: the chain for a two-time map (ctm), multistep "
                        "for a consistency model (cd) (default auto)")
    p.add_argument("--list-methods", action="store_true",
                   help="list the samplers with family, order, NFE/step and their options (name=default); run nothing")
    p.set_defaults(func=run)
    return p


def _dimension_keyword(name: str):
    """The keyword through which target ``name``'s builder takes its dimension ("dim", or "d" for
    aniso_gaussian), or None for a target of fixed dimension."""
    import inspect

    from ..targets import TARGETS

    params = inspect.signature(TARGETS[name]).parameters
    return next((k for k in ("dim", "d") if k in params), None)


def dimension_targets() -> list:
    """Names of the targets that take --dim."""
    from ..targets import TARGETS

    return [name for name in sorted(TARGETS) if _dimension_keyword(name)]


def _build_target(args, parser):
    """--target, in dimension --dim when given; a one-line error for a target of fixed dimension."""
    from ..targets import get_target

    if args.dim is None:
        return get_target(args.target)
    key = _dimension_keyword(args.target)
    if key is None:
        parser.error(f"target {args.target!r} has a fixed dimension and takes no --dim; "
                     f"targets that do: {', '.join(dimension_targets())}")
    if args.dim < 1:
        parser.error(f"--dim must be >= 1, got {args.dim}")
    try:
        return get_target(args.target, **{key: args.dim})
    except ValueError as exc:
        parser.error(f"--dim {args.dim} for target {args.target!r}: {exc}")


def _options_text(name: str) -> str:
    """A method's options as name=default (from its signature), "none", or a note that it forwards others."""
    import inspect

    from ..compare import method_options
    from ..samplers import get_method

    valid = method_options(name)
    params = inspect.signature(get_method(name).fn).parameters
    shown = [f"{k}={params[k].default!r}" if params[k].default is not inspect.Parameter.empty else k
             for k in (valid if valid is not None else [n for n in params if n not in _SKIP and
                                                         params[n].kind is not inspect.Parameter.VAR_KEYWORD])]
    text = ", ".join(shown) if shown else "none"
    if valid is None:
        text += " (other options are passed on to the predictor)"
    return text


_SKIP = {"field", "x", "grid", "generator", "callback", "progress"}


def list_methods() -> None:
    """One line per sampler (family, order, stochastic, NFE per step, description) and one with its options."""
    from ..samplers import available

    print(f"{'method':16s} {'family':12s} {'order':>5s} {'stochastic':>10s} {'NFE/step':>8s}  description")
    for m in available():
        nps = "adaptive" if math.isnan(m.nfe_per_step) else f"{m.nfe_per_step:g}"
        print(f"{m.name:16s} {m.family:12s} {m.order:5g} {str(m.stochastic):>10s} {nps:>8s}  {m.description}")
        print(f"{'':16s} options: {_options_text(m.name)}")
    print("give options as name:key=value,key=value (e.g. ddim:eta=0.5)")
    print("learned flow maps (method flow_map, needs a FlowMap): compare --flow-map PATH (a `diffusion-lab distill` "
          "checkpoint) at --flow-map-nfe K ..., sampled by --flow-map-sampling chain|multistep|both|auto")


def _flow_maps(args, parser, target, schedule) -> dict:
    """{label: (FlowMap, options)} of --flow-map, checked before any work: a readable `distill` checkpoint, on
    --schedule, distilled for --target's data when its teacher was an exact target (a map of another law would be
    scored against the wrong one)."""
    from .distill import flow_map_from_checkpoint

    if not args.flow_map:
        return {}
    if args.final != "step":
        parser.error("--flow-map: a flow map ends at t_min; compare it with --final step")
    if any(k < 1 for k in args.flow_map_nfe):
        parser.error(f"--flow-map-nfe must be >= 1, got {args.flow_map_nfe}")
    out, labels = {}, {}
    for path in args.flow_map:
        try:
            psi, meta = flow_map_from_checkpoint(path)
        except (ValueError, FileNotFoundError) as exc:
            parser.error(f"--flow-map: {exc}")
        if psi.schedule.settings() != schedule.settings():
            parser.error(f"--flow-map {path}: distilled on the schedule {meta['schedule']['name']}, this comparison "
                         f"runs on {args.schedule}; pass --schedule {meta['schedule']['name']}")
        if meta.get("data") != args.target or list(meta.get("data_shape", [])) != [target.dim]:
            parser.error(f"--flow-map {path}: distilled for the data {meta.get('data')!r}, this comparison's target is "
                         f"{args.target!r} (d={target.dim}); pass --target {meta.get('data')}")
        mode = args.flow_map_sampling
        if mode == "auto":
            mode = "chain" if meta["method"] == "ctm" else "multistep"
        base = f"flow_map {meta['method']} ({os.path.basename(os.path.dirname(os.path.abspath(path))) or path})"
        for variant in (("chain", "multistep") if mode == "both" else (mode,)):
            label = f"{base} {variant}"
            if label in out:
                parser.error(f"--flow-map {path}: two maps share the label {label!r}; give each its own folder")
            out[label] = (psi, {"noise_reinjection": variant == "multistep"})
            labels[label] = path
    args.flow_map_labels = labels
    return out


def _method_specs(args, parser) -> list:
    """Parsed --methods (default: the defaults that are registered), each checked at every budget before any work."""
    from ..compare import DEFAULT_METHODS, parse_method
    from ..samplers import available, get_method

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
    return specs


def _check_budgets(args, parser, specs) -> None:
    from ..compare import plan_row

    for s_ in specs:
        for n in args.nfe:
            try:
                plan_row(s_, n, args.final, args.grid)
            except ValueError as exc:
                parser.error(str(exc))


def _name(row) -> str:
    """The sampler label, with what a declared default ran: auto (ipndm/logsnr)."""
    return f"{row['sampler']} ({row['runs']})" if row.get("runs") else row["sampler"]


def _headline(rows, ref) -> None:
    """The declared default's line per budget: its distance and how many samplers it is resolved to beat / lose to."""
    for auto in ("auto", "auto_sde"):
        mine = [r for r in rows if r["sampler"] == auto]
        for r in mine:
            same = [o for o in rows if o["nfe_budget"] == r["nfe_budget"] and o is not r]
            better = [o["sampler"] for o in same if o["mmd_rank"] < r["mmd_rank"]]
            worse = sum(1 for o in same if o["mmd_rank"] > r["mmd_rank"])
            fe = "" if math.isnan(r["flow_error"]) else f", flow error {r['flow_error']:.2e}"
            print(f"  {auto} at NFE <= {r['nfe_budget']}: {r['runs']}, MMD^2 {r['mmd2']:.2e} +- {r['mmd2_se']:.1e}{fe}; "
                  f"rank {r['mmd_rank']}: resolved better than {worse} of {len(same)}"
                  + (f", resolved worse than {', '.join(better)}" if better else ""))


def _print_table(args, target, rows, ref) -> None:
    gauss = any(not math.isnan(r["w2_exact"]) for r in rows)
    w = max(22, *(len(_name(r)) for r in rows))
    hdr = (f"{'sampler':{w}s} {'NFE':>4s} {'MMD^2':>10s} {'SE':>8s} {'z':>6s} {'res':>3s} {'rank':>4s} "
           f"{'flow error':>11s} {'sliced W2':>10s}" + (f" {'exact W2':>10s}" if gauss else "") + f" {'time [s]':>9s}")
    print(f"target {args.target} (d={target.dim}), schedule {args.schedule}, grid {args.grid}, final={args.final}, "
          f"{args.n} samples, seed {args.seed}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        fe = "-" if math.isnan(r["flow_error"]) else f"{r['flow_error']:.3e}"
        line = (f"{_name(r):{w}s} {r['nfe']:4d} {r['mmd2']:10.3e} {r['mmd2_se']:8.1e} {r['mmd2_z']:6.1f} "
                f"{'yes' if r['resolved'] else 'no':>3s} {r['mmd_rank']:4d} {fe:>11s} {r['sw2']:10.4f}")
        if gauss:
            line += " " + ("-".rjust(10) if math.isnan(r["w2_exact"]) else f"{r['w2_exact']:10.3e}")
        print(line + f" {r['seconds']:9.3f}")
    print(f"MMD^2 to the exact {ref['law']} (kernel exp(-|x-y|^2/(2 l^2)), l = {ref['mmd_bandwidth']:.4g} from the "
          f"law): {ref['mmd2_null_repeats']} sets of {args.n} exact samples score {ref['mmd2_null_mean']:.2e} +- "
          f"{ref['mmd2_null_std']:.2e} (null band, expectation 0); the exact flow map scores "
          f"{ref['mmd2_exact_flow']:.2e} +- {ref['mmd2_exact_flow_se']:.1e}. z = (MMD^2 - null mean) / "
          f"sqrt(SE^2 + null std^2); res = z > 2; rank: 1 + samplers lower by > 2 SE of the paired difference")
    for budget, order in ref["ranking"].items():
        ranks = {r["sampler"]: r["mmd_rank"] for r in rows if r["nfe_budget"] == budget}
        groups = []
        for name in order:
            if groups and ranks[name] == ranks[groups[-1][0]]:
                groups[-1].append(name)
            else:
                groups.append([name])
        print(f"  NFE <= {budget}: " + " < ".join(" = ".join(g) for g in groups))
    if any(r["sampler"] in ("auto", "auto_sde") for r in rows):
        print("declared defaults (method='auto' / 'auto_sde': method and grid chosen from the budget by a fixed rule):")
        _headline(rows, ref)
    print(f"reference: PF-ODE flow map by {ref['solver']} (rtol {ref['rtol']:g}, {ref['nfe']} NFE). Sliced W2 against "
          f"{args.n} exact samples of {ref['law']} (descriptive, not ranked): the exact flow map scores "
          f"{ref['sw2_exact_flow']:.4f}; two independent exact sets score {ref['sw2_floor']:.4f} +- "
          f"{ref['sw2_floor_spread']:.4f} (Monte-Carlo floor, mean +- spread)")


def run(args, parser) -> int:
    from ..compare import run_comparison
    from ..schedules import get_schedule

    if args.list_methods:
        list_methods()
        return 0
    if args.n < 3:
        parser.error(f"--n must be >= 3, got {args.n}")
    C.set_threads(args, parser)
    if any(n < 1 for n in args.nfe):
        parser.error(f"--nfe budgets must be >= 1, got {args.nfe}")
    C.check_figure_options(args, parser)
    specs = _method_specs(args, parser)
    if args.flow_map and args.checkpoint is not None:
        parser.error("--flow-map compares on an exact target; it does not combine with --checkpoint")
    if args.checkpoint is not None:
        _check_budgets(args, parser, specs)
        return _run_checkpoint(args, parser, specs)
    if args.batch is not None:
        parser.error("--batch applies to --checkpoint only (the exact-target comparison runs all --n at once)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        parser.error("several processes (torchrun) run compare --checkpoint only; run the exact-target comparison "
                     "as one process")
    target, schedule = _build_target(args, parser), get_schedule(args.schedule)
    flow_maps = _flow_maps(args, parser, target, schedule)
    _check_budgets(args, parser, specs)
    _check_memory(args, parser, target.dim)
    C.prepare_out(args, parser, ["results.csv", "settings.json", *C.figure_names("error_vs_nfe")])
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(specs) * len(args.nfe) + len(flow_maps) * len(args.flow_map_nfe), desc="compare",
                   leave=False)
    progress = (lambda k, n, row: bar.update(1)) if bar is not None else None
    t0 = time.perf_counter()
    out = run_comparison(target, schedule, specs, args.nfe, n_samples=args.n, seed=args.seed, grid_kind=args.grid,
                         final=args.final, progress=progress, flow_maps=flow_maps,
                         flow_map_nfes=args.flow_map_nfe)
    total = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    rows, ref = out["rows"], out["reference"]
    _print_table(args, target, rows, ref)
    C.write_csv(os.path.join(args.out, "results.csv"), rows)
    settings = {
        "command": "diffusion-lab compare", "target": target.settings(), "dim": args.dim,
        "schedule": schedule.settings(),
        "methods": [s_.label for s_ in specs], "nfe": args.nfe, "grid": args.grid, "final": args.final,
        "n_samples": args.n, "seed": args.seed, "reference": ref, "seconds": total, "versions": C.versions(),
        "flow_maps": {label: os.path.abspath(path) for label, path in getattr(args, "flow_map_labels", {}).items()},
        "flow_map_nfe": args.flow_map_nfe if flow_maps else [],
    }
    C.write_json(os.path.join(args.out, "settings.json"), settings)
    written = ["results.csv", "settings.json"]
    if not args.no_plot:
        from ..plots import error_vs_nfe, style

        name = f"error_vs_nfe.{args.format}"
        with style(dpi=args.dpi):
            error_vs_nfe(rows, os.path.join(args.out, name),
                         title=f"{args.target}{'' if args.dim is None else f' (d={args.dim})'} / {args.schedule} / "
                               f"{args.grid} grid", floor=(ref["sw2_floor"], ref["sw2_floor_spread"]),
                         mmd_null=(ref["mmd2_null_mean"], ref["mmd2_null_std"]))
        written.append(name)
    C.wrote(written, args.out, f"({total:.1f} s)")
    return 0


# ------------------------------------------------------------------------------------------------
# --checkpoint: samplers on a trained network, against the adaptive solve of its own PF-ODE

def checkpoint_comparison(field, meta: dict, specs, nfes, *, n: int, seed: int, grid_kind: str, final: str,
                          rtol: float, batch: int | None = None, keep_samples: bool = False,
                          progress=None) -> dict | None:
    r"""Every (sampler, budget) on a learned ``field`` from the same starts x_T,i = sigma(t_max) z_i, on one process
    or on every process of a torch.distributed group.

    The samples are seeded as in ``diffusion-lab sample`` (``diffusion_lab.distributed``): z_i from a generator
    seeded by (``seed``, i), the samples cut into batches of ``batch`` (default: all n in one), and a stochastic
    sampler's noise in batch b drawn from a generator seeded by (``seed``, b), fresh for each (sampler, budget).
    Process r of W runs the batches b = r mod W; rank 0 gathers every batch (``distributed.gather_batches``) and
    computes the metrics on all n samples, so any W gives bitwise the samples and the metrics of one process with
    the same ``seed`` and ``batch``.

    Reference: the adaptive Dormand-Prince 5(4) solve of the learned PF-ODE from the same x_T (rtol = atol =
    ``rtol``, each batch with its own step-size control), so ``flow_error`` = mean_i ||x_i - Phi_theta(x_T,i)||
    measures the sampler alone, not the network. ``sw2``: sliced W2 to the reference's samples (descriptive).
    When the training data is an exact target, ``mmd2`` (+- ``mmd2_se``) is the unbiased MMD^2 to its exact law
    (p_0 with final='denoise', else p_t_min), which measures network and sampler together; the reference's own
    value is in the returned reference. ``seconds``: the sampler's time summed over the batches (compute time, not
    wall time, under several processes).

    Parameters
    ----------
    batch : int, optional
        Samples per batch (>= 1); part of the seeding.
    keep_samples : bool
        Also return the samples: ``"samples"`` = {"x_T", "reference", "rows"} (the terminal samples of every row,
        in the order of the rows).
    progress : callable, optional
        ``progress(done, total)`` after each (sampler, budget) on this process.

    Returns
    -------
    dict or None
        {"rows", "reference"} (and "samples") on rank 0, None on the other ranks.
    """
    import torch

    from .. import distributed as D
    from ..compare import plan_row
    from ..diagnostics import mmd2_two_sample
    from ..metrics import mean_error, mmd2_exact, sliced_w2
    from ..samplers import get_method, sample
    from ..targets import TARGETS, get_target

    schedule = field.schedule
    shape = tuple(meta["data_shape"])
    sigma_T = float(schedule.sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    bounds = D.batch_bounds(n, n if batch is None else batch)
    starts = {}

    def x_T(b):  # this process's batches only, drawn once
        if b not in starts:
            starts[b] = D.initial_noise(seed, *bounds[b], shape, sigma_T)
        return starts[b]

    def solve(b):
        nfe0 = field.nfe
        res = sample(field, x_T(b), "adaptive", rtol=rtol, atol=rtol, final=final)
        return {"x": res.x, "nfe": field.nfe - nfe0}

    plan = [(spec, nfe, plan_row(spec, nfe, final, grid_kind, schedule)) for spec in specs for nfe in nfes]

    def run(run_):
        def run_batch(b):
            g = torch.Generator().manual_seed(D.derived_seed(seed, D.SAMPLER_STREAM, b))
            res = sample(field, x_T(b), run_.method, steps=run_.steps, grid_kind=run_.grid_kind, final=final,
                         generator=g, **run_.options)
            return {"x": res.x, "nfe": int(res.nfe), "seconds": res.seconds}
        return run_batch

    parts = D.gather_batches(len(bounds), solve)
    root = parts is not None
    if root:
        ref = torch.cat([p["x"] for p in parts])
        ref_nfes = [p["nfe"] for p in parts]
    law = None
    if meta["data"] in TARGETS and not meta.get("num_classes"):
        target = get_target(meta["data"])
        law = target if final == "denoise" else target.marginal(schedule, schedule.t_min)

    def sw2(x):
        return sliced_w2(x.reshape(n, -1), ref.reshape(n, -1), 256, torch.Generator().manual_seed(seed + 3))

    rows, kept = [], []
    for k, (spec, nfe, run_) in enumerate(plan):
        parts = D.gather_batches(len(bounds), run(run_))
        if progress is not None:
            progress(k + 1, len(plan))
        if not root:
            continue
        x = torch.cat([p["x"] for p in parts])
        info = get_method(run_.method)
        deterministic = not info.stochastic and not dict(spec.options).get("eta", 0)
        row = {"sampler": spec.label, "family": info.family, "order": info.order, "stochastic": not deterministic,
               "nfe_budget": int(nfe), "steps": run_.steps, "nfe": max(p["nfe"] for p in parts),
               "grid_kind": run_.grid_kind, "runs": f"{run_.method}/{run_.grid_kind}" if run_.method != spec.name else "",
               "flow_error": mean_error(x, ref) if deterministic else math.nan, "sw2": sw2(x),
               "seconds": sum(p["seconds"] for p in parts)}
        if law is not None:
            m = mmd2_exact(x.reshape(n, -1), law)
            row["mmd2"], row["mmd2_se"] = m.mmd2, m.se
            # the split total = network + discretisation (diagnostics.decompose_sampler_error): the sampler against
            # the adaptive solve of the same network, paired two-sample MMD^2 with the law's kernel
            row["mmd2_discretisation"], row["mmd2_discretisation_se"] = mmd2_two_sample(x, ref, m.bandwidth)
        rows.append(row)
        if keep_samples:
            kept.append(x)
    if not root:
        return None
    # nfe: the most any batch took (the NFE of one sample's path); nfe_batches: each batch's
    reference = {"solver": "adaptive (Dormand-Prince 5(4))", "rtol": rtol, "atol": rtol, "nfe": max(ref_nfes),
                 "nfe_batches": ref_nfes, "batch": bounds[0][1], "n_batches": len(bounds),
                 "law": None if law is None else ("p_0" if final == "denoise" else "p_t_min")}
    if law is not None:
        m = mmd2_exact(ref.reshape(n, -1), law)
        reference["mmd2_adaptive"], reference["mmd2_adaptive_se"] = m.mmd2, m.se
        for row in rows:
            row["mmd2_network"], row["mmd2_network_se"] = m.mmd2, m.se
    out = {"rows": rows, "reference": reference}
    if keep_samples:
        out["samples"] = {"x_T": D.initial_noise(seed, 0, n, shape, sigma_T), "reference": ref, "rows": kept}
    return out


#: Default samples per batch of compare --checkpoint: large enough that the per-call overhead of a small network
#: stays small, small enough to deal the default --n over 4 processes.
CHECKPOINT_BATCH = 1000

#: Rough count of float64 arrays of --n samples alive at compare's peak: the initial noise, the exact reference
#: samples, the sampler's state, its stages (up to ~6 for the Runge-Kutta methods), noise and denoiser outputs, the
#: result and the metrics' working copies.
COMPARE_COPIES = 16


def _check_memory(args, parser, dim: int) -> None:
    """--n against memory: n x dim x 8 bytes x COMPARE_COPIES (``C.check_size``)."""
    C.check_size(parser, "--n", args.n, 8 * dim, COMPARE_COPIES, f"comparing samplers in dimension {dim}")


def _run_checkpoint(args, parser, specs) -> int:
    """--checkpoint on one process, or on every process torchrun starts (gloo group; rank 0 writes)."""
    from .. import distributed as D
    from .. import training as T

    if not os.path.exists(args.checkpoint):
        parser.error(f"no checkpoint at {args.checkpoint}")
    if not 0 < args.rtol < 1:
        parser.error(f"--rtol must be in (0, 1), got {args.rtol}")
    if args.batch is None:
        args.batch = CHECKPOINT_BATCH
    C.at_least(parser, "--batch", args.batch, 1)
    state = T.load_checkpoint(args.checkpoint)
    meta = state["meta"]
    if meta.get("num_classes"):
        parser.error("--checkpoint: a class-conditional network needs labels; compare takes unconditional ones")
    _check_memory(args, parser, math.prod(meta["data_shape"]))
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: the samplers run in float64 on the CPU
        import torch.distributed as dist

        started = not dist.is_initialized()
        T.init_distributed("gloo")
    rank, world = D.world()
    try:
        if rank == 0:
            C.prepare_out(args, parser, ["results.csv", "settings.json", *C.figure_names("error_vs_nfe")])
        else:
            C.check_out(args, parser)
        field = T.field_from_checkpoint(state)
        t0 = time.perf_counter()
        out = checkpoint_comparison(field, meta, specs, args.nfe, n=args.n, seed=args.seed, grid_kind=args.grid,
                                    final=args.final, rtol=args.rtol, batch=args.batch)
        total = time.perf_counter() - t0
        if rank != 0:
            return 0
        return _report_checkpoint(args, state, specs, out, total, world)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _report_checkpoint(args, state, specs, out, total: float, world: int) -> int:
    """Rank 0: the table, results.csv, settings.json and the figure of compare --checkpoint."""
    meta = state["meta"]
    rows, ref = out["rows"], out["reference"]
    has_mmd = ref["law"] is not None
    w = max(22, *(len(_name(r)) for r in rows))
    where = f" on {world} processes" if world > 1 else ""
    print(f"checkpoint {args.checkpoint} (step {state['step']}, {meta['model']} on {meta['data']}), grid {args.grid}, "
          f"final={args.final}, {args.n} samples in batches of {args.batch}{where}, seed {args.seed}")
    hdr = (f"{'sampler':{w}s} {'NFE':>4s} {'flow error':>11s} {'sliced W2':>10s}"
           + (f" {'MMD^2':>10s} {'SE':>8s} {'network':>10s} {'discret.':>10s} {'SE':>8s}" if has_mmd else "")
           + f" {'time [s]':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        fe = "-" if math.isnan(r["flow_error"]) else f"{r['flow_error']:.3e}"
        print(f"{_name(r):{w}s} {r['nfe']:4d} {fe:>11s} {r['sw2']:10.4f}"
              + (f" {r['mmd2']:10.3e} {r['mmd2_se']:8.1e} {r['mmd2_network']:10.3e} {r['mmd2_discretisation']:10.3e}"
                 f" {r['mmd2_discretisation_se']:8.1e}" if has_mmd else "") + f" {r['seconds']:9.3f}")
    print(f"reference: the network's PF-ODE solved adaptively (Dormand-Prince 5(4), rtol = atol = {args.rtol:g}, "
          f"{ref['nfe']} NFE at most in a batch of {args.batch}) from the same starts; flow error and sliced W2 are measured against it"
          + (f"; MMD^2 to the exact {ref['law']} of {meta['data']}: the reference scores "
             f"{ref['mmd2_adaptive']:.2e} +- {ref['mmd2_adaptive_se']:.1e} (the network's own error)" if has_mmd else ""))
    if has_mmd:
        print("MMD^2 split: network = the adaptive solve against the exact law; discretisation = the sampler against "
              "the adaptive solve (paired two-sample MMD^2, same kernel); as MMDs, total <= network + discretisation")
    C.write_csv(os.path.join(args.out, "results.csv"), rows)
    settings = {"command": "diffusion-lab compare --checkpoint", "checkpoint": os.path.abspath(args.checkpoint),
                "checkpoint_step": int(state["step"]), "train": meta, "methods": [s_.label for s_ in specs],
                "nfe": args.nfe, "grid": args.grid, "final": args.final, "n_samples": args.n, "seed": args.seed,
                "batch": args.batch, "world_size": world, "reference": ref, "seconds": total,
                "versions": C.versions()}
    C.write_json(os.path.join(args.out, "settings.json"), settings, default=str)
    written = ["results.csv", "settings.json"]
    if not args.no_plot:
        from ..plots import error_vs_nfe, style

        name = f"error_vs_nfe.{args.format}"
        with style(dpi=args.dpi):
            error_vs_nfe(rows, os.path.join(args.out, name),
                         title=f"checkpoint: {meta['model']} on {meta['data']} / {args.grid} grid (reference: adaptive "
                               f"solve of its PF-ODE)")
        written.append(name)
    C.wrote(written, args.out, f"({total:.1f} s)")
    return 0
