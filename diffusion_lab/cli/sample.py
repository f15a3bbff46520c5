"""`diffusion-lab sample`: sample from a checkpoint (this package's, a reference DiT ``.pt`` or a diffusers DiT
directory) with any sampler, optionally with guidance, a VAE decoder and several processes (torchrun)."""
from __future__ import annotations

import math
import os
import time

from . import _common as C
from ._learned import save_preview


def add_parser(sub):
    from ..samplers.grids import GRID_KINDS

    p = sub.add_parser(
        "sample",
        help="sample from a training checkpoint with any sampler (optionally with classifier-free guidance)",
        description=(
            "Load a checkpoint written by `diffusion-lab train` (torch.load weights_only=True), wrap the EMA network "
            "in a velocity field and run a sampler of the samplers package from N(0, sigma(t_max)^2 I). --cfg W "
            "applies classifier-free guidance eps~ = (1+W) eps(x|c) - W eps(x|null) (W >= -1; 0 = conditional), "
            "counted as 2 NFE per call. Writes samples.pt (x, labels), samples.npz, samples.png (or --format) and "
            "settings.json to --out, which must be new or empty unless --overwrite. --method takes options as "
            "name:key=value,... "
            "(e.g. ddim:eta=0.5), checked before the checkpoint is loaded. The checkpoint may also be a reference DiT "
            "checkpoint (facebookresearch/DiT layout, e.g. DiT-XL-2-256x256.pt) or a diffusers DiTTransformer2DModel "
            "directory, sampled as eps prediction on the linear 1000-step DDPM schedule; --vae DIR decodes latents "
            "with a local diffusers AutoencoderKL. samples.npz holds x, labels and, with --vae, arr_0 (uint8 images "
            "N x H x W x 3). Several processes: torchrun --nproc_per_node N -m diffusion_lab.cli sample ...; sample "
            "i starts from noise seeded by (--seed, i) and batch b of --batch samples draws its sampler noise from "
            "(--seed, b), so any number of processes gives the samples of one process with the same --seed and "
            "--batch."
        ),
    )
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="path to checkpoint.pt (or give --checkpoint)")
    p.add_argument("--checkpoint", dest="checkpoint_opt", default=None, metavar="PATH",
                   help="a checkpoint of diffusion-lab train, a reference DiT .pt file or a diffusers DiT directory")
    p.add_argument("--vae", default=None, metavar="DIR",
                   help="decode the samples (latents) with this local diffusers AutoencoderKL directory")
    p.add_argument("--num-heads", type=int, default=None, metavar="H",
                   help="attention heads of a reference DiT checkpoint whose width is not one of the paper's")
    p.add_argument("--batch", type=int, default=256, metavar="B",
                   help="samples per sampler batch on each process (default 256); part of the seeding")
    p.add_argument("--method", default="dpmpp_2m", metavar="METHOD[:KEY=VALUE,...]",
                   help="sampler with its options, e.g. ddim:eta=0.5 (default dpmpp_2m; see "
                        "`diffusion-lab compare --list-methods`)")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (default 25; ignored with --nfe)")
    p.add_argument("--nfe", type=int, default=None, metavar="K",
                   help="an NFE budget instead of --steps, spent by the method's budget rule (needed by auto, auto_sde)")
    p.add_argument("--grid", default="logsnr", choices=GRID_KINDS, help="time grid (default logsnr)")
    p.add_argument("--final", default="denoise", choices=("step", "denoise"),
                   help="return x(t_min) or the denoiser D(x(t_min)) (default denoise)")
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=None,
                   help="number of samples (default 2000 for 2-D, 100 for images); under torchrun write --num-samples "
                        "(torchrun reads --n as an abbreviation of its own options)")
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


class _Loaded:
    """What sampling needs from a checkpoint of any kind: its description, data shape, classes and fields."""

    def __init__(self, kind, meta, step, make_field):
        self.kind, self.meta, self.step, self.make_field = kind, meta, step, make_field


def _dit(net, kind: str, device):
    """A DiT of ours (converted from a reference or diffusers checkpoint) as a _Loaded."""
    from dataclasses import asdict

    from .. import interop

    net = net.to(device).eval()
    cfg = net.config
    meta = {"model": kind, "config": asdict(cfg), "data_shape": list(cfg.data_shape),
            "num_classes": int(cfg.num_classes), "schedule": "DDPMDiscrete (linear betas 1e-4..0.02, N = 1000)",
            "prediction": "eps"}
    return _Loaded(kind, meta, None, lambda labels: interop.dit_field(net, labels))


def _is_reference_dit(path: str):
    """The state dict of a reference-layout DiT file, or None for anything else (left to load_checkpoint)."""
    import warnings

    import torch

    from ..training import CHECKPOINT_FORMAT

    state = None
    for mmap in (True, False):  # memory-mapped where the file allows it (not the legacy non-zip format)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            break
        except Exception:  # unreadable: load_checkpoint says why
            continue
    if not isinstance(state, dict) or state.get("format") == CHECKPOINT_FORMAT:
        return None
    from ..models.convert import _unwrap

    sd = _unwrap(state)
    return sd if "x_embedder.proj.weight" in sd else None


def _load(args, parser, device) -> _Loaded:
    """The checkpoint of --checkpoint: a directory is a diffusers DiT, a file a reference DiT (recognised by its
    x_embedder.proj weights) or else one of this package's training checkpoints."""
    from .. import training as T

    path = args.checkpoint
    if not os.path.exists(path):
        parser.error(f"no checkpoint at {path}")
    if os.path.isdir(path):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            parser.error(f"{path} is a directory (a diffusers DiT); reading it needs diffusers (pip install diffusers)")
        from .. import interop

        if args.no_ema:
            parser.error("--no-ema applies to this package's training checkpoints only")
        return _dit(interop.load_dit_checkpoint(path), "diffusers DiT", device)
    ref = _is_reference_dit(path)
    if ref is not None:
        from ..models import convert

        if args.no_ema:
            parser.error("--no-ema applies to this package's training checkpoints only")
        try:
            net = convert.dit_from_reference(ref, num_heads=args.num_heads)
        except (ValueError, KeyError) as exc:
            parser.error(f"{path}: {exc}")
        return _dit(net, "reference DiT", device)
    state = T.load_checkpoint(path, map_location="cpu")
    field = T.field_from_checkpoint(state, ema=not args.no_ema, device=device)

    def make_field(labels):
        if labels is not None:
            field.model.labels = labels
        return field

    return _Loaded("diffusion_lab", state["meta"], int(state["step"]), make_field)


def _to_uint8(images):
    """Images in [-1, 1] (N, 3, H, W) as uint8 (N, H, W, 3): clamp(127.5 x + 128, 0, 255) truncated, the
    reference DiT sampling script's conversion."""
    import torch

    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def run(args, parser) -> int:
    from .. import distributed as D
    from .. import training as T
    from ..guidance import check_guidance_weight

    if args.checkpoint is not None and args.checkpoint_opt is not None and args.checkpoint != args.checkpoint_opt:
        parser.error(f"two checkpoints given ({args.checkpoint} and --checkpoint {args.checkpoint_opt}); give one")
    args.checkpoint = args.checkpoint or args.checkpoint_opt
    if args.checkpoint is None:
        parser.error("give a checkpoint: diffusion-lab sample PATH or --checkpoint PATH")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    C.at_least(parser, "--batch", args.batch, 1)
    if args.num_heads is not None:
        C.at_least(parser, "--num-heads", args.num_heads, 1)
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
    if args.vae is not None:
        if not os.path.isdir(args.vae):
            parser.error(f"--vae {args.vae}: no such directory (a local diffusers AutoencoderKL)")
        try:
            import diffusers  # noqa: F401
        except ImportError:
            parser.error("--vae needs diffusers (pip install diffusers)")
    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun
        import torch.distributed as dist

        started = not dist.is_initialized()
        _, _, dist_device = T.init_distributed("gloo" if device.type == "cpu" else None)
        if device.type != "cpu":
            device = dist_device
    rank, world = D.world()
    try:
        return _run(args, parser, device, rank, world, method, options)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, parser, device, rank, world, method, options) -> int:
    import numpy as np
    import torch

    from .. import distributed as D
    from ..guidance import classifier_free_guidance
    from ..plots import style
    from ..samplers import sample

    loaded = _load(args, parser, device)
    meta = loaded.meta
    shape = tuple(meta["data_shape"])
    image = len(shape) == 3
    n = args.n or (100 if image else 2000)
    # the samples are kept as float32 twice at the end (the per-batch parts and their concatenation), with int64
    # labels; one batch's working arrays are bounded by --batch, and --vae's decoded images are not counted
    C.check_size(parser, "--n", n, 4 * math.prod(shape) + 8, 2, f"{n:,} samples of shape {shape}")
    labels = _labels(args, parser, int(meta.get("num_classes", 0)), n)  # checks --cfg/--class against the model
    vae = None
    if args.vae is not None:
        from .. import interop

        vae = interop.load_vae(args.vae).to(device)
        want = int(getattr(vae.config, "latent_channels", 4))
        if not image or shape[0] != want:
            parser.error(f"--vae decodes latents of {want} channels; this model's samples have shape {shape}")
    artefacts = ["samples.pt", "samples.npz", "settings.json", *C.figure_names("samples")]
    if rank == 0:
        C.prepare_out(args, parser, artefacts)
    else:
        C.check_out(args, parser)
    field0 = loaded.make_field(None)
    sch = field0.schedule
    sigma_max = float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    bounds = D.batch_bounds(n, args.batch)
    first = {}

    def run_batch(b):
        start, stop = bounds[b]
        x = D.initial_noise(args.seed, start, stop, shape, sigma_max).to(device)
        y = labels[start:stop].to(device) if labels is not None else None
        field = loaded.make_field(y)
        if y is not None and args.cfg != 0.0:
            field = classifier_free_guidance(field, args.cfg, y)
        g = torch.Generator(device=device).manual_seed(D.derived_seed(args.seed, D.SAMPLER_STREAM, b))
        with torch.no_grad():
            res = sample(field, x, method, steps=None if args.nfe is not None else args.steps, nfe=args.nfe,
                         final=args.final, generator=g, grid_kind=args.grid, **options)
        if b == 0:
            first["settings"] = res.settings
        out = {"x": res.x.float().cpu(), "nfe": int(res.nfe)}
        if vae is not None:
            from .. import interop

            out["images"] = _to_uint8(interop.decode_latents(vae, res.x.float()))
        return out

    t0 = time.perf_counter()
    parts = D.gather_batches(len(bounds), run_batch)
    seconds = time.perf_counter() - t0
    if rank != 0:
        return 0
    x = torch.cat([p["x"] for p in parts])
    nfes = [p["nfe"] for p in parts]
    lab = labels if labels is not None else torch.empty(0, dtype=torch.long)
    C.atomic_write(os.path.join(args.out, "samples.pt"), lambda tmp: torch.save({"x": x, "labels": lab}, tmp))
    arrays = {"x": x.numpy(), "labels": lab.numpy()}
    if vae is not None:
        arrays["arr_0"] = np.concatenate([p["images"] for p in parts])

    def write_npz(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    C.atomic_write(os.path.join(args.out, "samples.npz"), write_npz)
    res_settings = first.get("settings", {})
    settings = {"command": "diffusion-lab sample", "checkpoint": os.path.abspath(args.checkpoint),
                "checkpoint_kind": loaded.kind, "checkpoint_step": loaded.step, "train": meta, "method": args.method,
                "steps": res_settings.get("steps", args.steps), "nfe_budget": args.nfe, "options": options,
                "sampler_settings": res_settings, "grid": args.grid, "final": args.final, "n": n, "cfg_w": args.cfg,
                "class": args.klass, "ema": not args.no_ema, "seed": args.seed, "batch": args.batch,
                "world_size": world, "vae": os.path.abspath(args.vae) if args.vae else None,
                "nfe": max(nfes), "seconds": seconds, "versions": C.versions()}
    C.write_json(os.path.join(args.out, "settings.json"), settings, default=str)
    written = ["samples.pt", "samples.npz", "settings.json"]
    title = f"{args.method}, {max(nfes)} NFE, cfg w={args.cfg:g}"
    name = f"samples.{args.format}"
    if not args.no_plot and vae is None and (shape == (2,) or (image and shape[0] == 1)):
        with style(dpi=args.dpi):
            save_preview(x, labels, meta, os.path.join(args.out, name), title)
        written.append(name)
    where = f" on {world} processes" if world > 1 else ""
    what = f"step {loaded.step} ({meta['model']} on {meta['data']})" if loaded.step is not None else \
        f"a {loaded.kind} checkpoint"
    print(f"{n} samples from {what} with {args.method}, {max(nfes)} NFE{f', CFG w={args.cfg:g}' if args.cfg else ''}"
          f"{where} in {seconds:.2f} s")
    C.wrote(written, args.out)
    return 0
