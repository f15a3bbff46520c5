"""`diffusion-lab sample`: sample from a training checkpoint with any sampler, optionally with guidance."""
from __future__ import annotations

import os
import time

from . import _common as C
from ._learned import preview, save_preview


def add_parser(sub):
    from ..samplers.grids import GRID_KINDS

    p = sub.add_parser(
        "sample",
        help="sample from a training checkpoint with any sampler (optionally with classifier-free guidance)",
        description=(
            "Load a checkpoint written by `diffusion-lab train` (torch.load weights_only=True), wrap the EMA network "
            "in a velocity field and run a sampler of the samplers package from N(0, sigma(t_max)^2 I). --cfg W "
            "applies classifier-free guidance eps~ = (1+W) eps(x|c) - W eps(x|null) (W >= -1; 0 = conditional), "
            "counted as 2 NFE per call. Writes samples.pt (x, labels), samples.png (or --format) and settings.json to "
            "--out, which must be new or empty unless --overwrite. --method takes options as name:key=value,... "
            "(e.g. ddim:eta=0.5), checked before the checkpoint is loaded."
        ),
    )
    p.add_argument("checkpoint", help="path to checkpoint.pt")
    p.add_argument("--method", default="dpmpp_2m", metavar="METHOD[:KEY=VALUE,...]",
                   help="sampler with its options, e.g. ddim:eta=0.5 (default dpmpp_2m; see "
                        "`diffusion-lab compare --list-methods`)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25; ignored with --nfe)")
    p.add_argument("--nfe", type=int, default=None, metavar="K",
                   help="an NFE budget instead of --steps, spent by the method's budget rule (needed by auto, auto_sde)")
    p.add_argument("--grid", default="logsnr", choices=GRID_KINDS, help="time grid (default logsnr)")
    p.add_argument("--final", default="denoise", choices=("step", "denoise"),
                   help="return x(t_min) or the denoiser D(x(t_min)) (default denoise)")
    p.add_argument("--n", type=int, default=None, help="number of samples (default 2000 for 2-D, 100 for images)")
    p.add_argument("--cfg", type=float, default=0.0, metavar="W", help="classifier-free guidance weight w (default 0)")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="class label for a conditional model (default: all classes in turn)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    C.add_seed(p)
    C.add_device(p, "auto, cpu, cuda, cuda:N")
    C.add_threads(p, "torch intra-op threads on CPU (default 1)")
    C.add_out(p, "results/sample")
    C.add_no_plot(p, "skip samples.png")
    C.add_figure_options(p)
    p.set_defaults(func=run)
    return p


def _labels(args, parser, k: int, n: int):
    """Class labels for a model with k classes (None if unconditional): --class, or all classes in turn."""
    import torch

    if args.cfg != 0.0 and not k:
        parser.error(f"--cfg {args.cfg} needs a class-conditional model; this checkpoint is unconditional")
    if args.klass is not None:
        if not k:
            parser.error(f"--class {args.klass} needs a class-conditional model; this checkpoint is unconditional")
        if not 0 <= args.klass < k:
            parser.error(f"--class {args.klass} is outside [0, {k - 1}]")
    if not k:
        return None
    return torch.full((n,), args.klass, dtype=torch.long) if args.klass is not None else torch.arange(n) % k


def _method(args, parser):
    """--method parsed into (name, options), checked (name, option names, the step count or budget it can run)."""
    import math

    from ..compare import parse_method
    from ..samplers import get_method, plan_for_nfe

    try:
        spec = parse_method(args.method)
    except ValueError as exc:
        parser.error(f"--method: {exc}")
    info = get_method(spec.name)
    options = dict(spec.options)
    if info.family == "auto" and args.nfe is None:
        parser.error(f"--method {spec.name} chooses its method from an NFE budget: give --nfe K")
    if args.nfe is not None:
        if args.nfe < 1:
            parser.error(f"--nfe must be >= 1, got {args.nfe}")
        if info.family != "auto":
            try:
                plan_for_nfe(spec.name, args.nfe, args.final, **options)
            except ValueError as exc:
                parser.error(f"--nfe {args.nfe}: {exc}")
    elif not math.isnan(info.nfe_per_step) and args.steps < info.min_steps:
        parser.error(f"--method {spec.name} needs --steps >= {info.min_steps}, got {args.steps}")
    return spec.name, options


def run(args, parser) -> int:
    import torch

    from .. import training as T
    from ..guidance import check_guidance_weight
    from ..plots import style

    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    method, options = _method(args, parser)
    if args.n is not None and args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    C.set_threads(args, parser)
    C.check_figure_options(args, parser)
    try:
        check_guidance_weight(args.cfg)
    except ValueError as exc:
        parser.error(f"--cfg: {exc}")
    device = C.choose_device(args, parser)
    if not os.path.exists(args.checkpoint):
        parser.error(f"no checkpoint at {args.checkpoint}")
    state = T.load_checkpoint(args.checkpoint, map_location="cpu")
    meta = state["meta"]
    image = len(meta["data_shape"]) == 3
    n = args.n or (100 if image else 2000)
    labels = _labels(args, parser, int(meta.get("num_classes", 0)), n)  # checks --cfg/--class against the model
    C.prepare_out(args, parser, ["samples.pt", "settings.json", *C.figure_names("samples")])
    field = T.field_from_checkpoint(state, ema=not args.no_ema, device=device)
    t0 = time.perf_counter()
    res = preview(field, meta, n, args.seed, labels, args.cfg, method, args.steps, args.final, args.grid,
                  nfe=args.nfe, options=options)
    seconds = time.perf_counter() - t0
    C.atomic_write(os.path.join(args.out, "samples.pt"), lambda tmp: torch.save(
        {"x": res.x.float().cpu(), "labels": labels if labels is not None else torch.empty(0, dtype=torch.long)}, tmp))
    settings = {"command": "diffusion-lab sample", "checkpoint": os.path.abspath(args.checkpoint),
                "checkpoint_step": int(state["step"]), "train": meta, "method": args.method,
                "steps": res.settings.get("steps", args.steps), "nfe_budget": args.nfe, "options": options,
                "sampler_settings": res.settings, "grid": args.grid, "final": args.final, "n": n, "cfg_w": args.cfg,
                "class": args.klass, "ema": not args.no_ema, "seed": args.seed, "nfe": res.nfe, "seconds": seconds,
                "versions": C.versions()}
    C.write_json(os.path.join(args.out, "settings.json"), settings, default=str)
    written = ["samples.pt", "settings.json"]
    if not args.no_plot:
        name = f"samples.{args.format}"
        with style(dpi=args.dpi):
            save_preview(res.x, labels, meta, os.path.join(args.out, name),
                         f"{args.method}, {res.nfe} NFE, cfg w={args.cfg:g}")
        written.append(name)
    print(f"{n} samples from step {state['step']} ({meta['model']} on {meta['data']}) with {args.method}, "
          f"{res.nfe} NFE{f', CFG w={args.cfg:g}' if args.cfg else ''} in {seconds:.2f} s")
    C.wrote(written, args.out)
    return 0
