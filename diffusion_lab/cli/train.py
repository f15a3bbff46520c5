"""`diffusion-lab train`: train a score network on toy data, exact-target samples or digits."""
from __future__ import annotations

import math
import os
import sys
import time

from . import _common as C
from ._learned import TRAIN_DATA_HELP, preview, save_preview, train_data, train_data_choices

# checkpoint settings that must match for --resume to continue the same run
_RESUME_KEYS = ("data", "n_train", "seed", "model", "model_kwargs", "schedule", "prediction", "weighting",
                "time_sampler", "sigma_data", "batch")


def add_parser(sub):
    from ..schedules import SCHEDULES
    from ..training import NET_PREDICTIONS, TIME_SAMPLERS, WEIGHTINGS

    p = sub.add_parser(
        "train",
        help="train a score network (MLP or DiT) on toy data, exact-target samples or digits",
        description=(
            "Train a network by denoising score matching / flow matching (diffusion_lab.training): AdamW, EMA of the "
            "weights, time sampler and loss weighting of choice, EDM preconditioning with --prediction edm. Writes "
            "checkpoint.pt (model, EMA, optimiser, RNG states, data position; loads with torch.load(weights_only=True)), "
            "train_log.csv, settings.json, loss.png and samples.png (EMA weights, dpmpp_2m, 25 steps; or --format) to "
            "--out, which must be new or empty unless --overwrite. On an exact target every log line (and "
            "train_log.csv) also reports the MMD^2 of EMA samples to the exact law, with its standard error "
            "(--eval-n). --resume continues from --out/checkpoint.pt to --steps; on CPU the result is bitwise that "
            "of one uninterrupted run. Multi-GPU: launch with torchrun --nproc_per_node N -m diffusion_lab.cli "
            "train ..."
        ),
    )
    p.add_argument("--data", default="ring8", metavar="DATA", help=f"training data: {TRAIN_DATA_HELP} (default ring8)")
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
    C.add_device(p, "auto (cuda if available), cpu, cuda, cuda:N")
    C.add_seed(p)
    p.add_argument("--log-every", type=int, default=100, help="log interval in steps (default 100)")
    p.add_argument("--ckpt-every", type=int, default=1000, help="checkpoint interval in steps (default 1000)")
    p.add_argument("--eval-n", type=int, default=1000, metavar="N",
                   help="exact targets: EMA samples (dpmpp_2m, 25 steps) scored by MMD^2 to the exact law at each log "
                        "step (default 1000; 0: off)")
    C.add_threads(p)
    C.add_out(p, "results/train")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.pt (the folder's other files of this command are rewritten)")
    C.add_no_plot(p, "skip loss.png and samples.png")
    C.add_figure_options(p)
    p.set_defaults(func=run)
    return p


#: Rough count of arrays of --n-train items (float64 coordinates while drawn, then float32, plus int64 labels) alive
#: at the peak of building the training set and its loader: the draw, its float32 copy, the labels and the loader's
#: permutation.
TRAIN_COPIES = 4


def _data_dim(name: str) -> int:
    """Coordinates of one sample of the exact target or sample-only set ``name`` (drawn once for the latter)."""
    import torch

    from ..targets import SAMPLE_ONLY, TARGETS, get_target

    if name in TARGETS:
        return get_target(name).dim
    return int(SAMPLE_ONLY[name](2, torch.Generator().manual_seed(0))[0].numel())


def _check_options(args, parser) -> None:
    """Errors for out-of-range numbers and unknown --data / --model, before anything is built."""
    from ..models import model_names

    for name in ("steps", "batch", "log_every", "n_train", "hidden", "depth"):
        C.at_least(parser, f"--{name.replace('_', '-')}", getattr(args, name), 1)
    C.at_least(parser, "--ckpt-every", args.ckpt_every, 0)
    C.at_least(parser, "--eval-n", args.eval_n, 0)
    if args.eval_n == 1:
        parser.error("--eval-n must be 0 (off) or >= 2, got 1")
    if args.data not in train_data_choices():
        parser.error(f"unknown --data {args.data!r}; choose one of {train_data_choices()}")
    if args.model not in model_names():
        parser.error(f"unknown --model {args.model!r}; choose one of {model_names()}")
    if args.data != "digits":  # digits is a fixed set of 1797 images; the others draw --n-train samples
        C.check_size(parser, "--n-train", args.n_train, 8 * _data_dim(args.data) + 8, TRAIN_COPIES,
                     f"a training set of {args.data}")
    if not (0 <= args.ema < 1):
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be > 0, got {args.lr}")


def _sigma_data(args, parser, x) -> float:
    """--sigma-data: measured from the data (auto, rounded to 6 digits) or a given number > 0."""
    if args.sigma_data == "auto":
        return round(float(x.std()), 6)
    try:
        sigma_data = float(args.sigma_data)
    except ValueError:
        parser.error(f"--sigma-data must be 'auto' or a number > 0, got {args.sigma_data!r}")
    if not (sigma_data > 0 and math.isfinite(sigma_data)):
        parser.error(f"--sigma-data must be > 0, got {args.sigma_data!r}")
    return sigma_data


def _meta(args, x, y, data_desc, schedule, sigma_data, world) -> dict:
    """The run's settings stored in the checkpoint (what the network and objective are rebuilt from)."""
    num_classes = int(y.max()) + 1 if y is not None else 0
    data_shape = list(x.shape[1:])
    if args.model == "mlp":
        model_kwargs = {"data_shape": data_shape, "hidden": args.hidden, "depth": args.depth, "num_classes": num_classes}
    else:
        model_kwargs = {"num_classes": num_classes}
    return {"data": args.data, "data_desc": data_desc, "n_train": int(x.shape[0]), "seed": args.seed,
            "conditional": y is not None, "num_classes": num_classes, "data_shape": data_shape,
            "model": args.model, "model_kwargs": model_kwargs, "schedule": schedule.settings(),
            "prediction": args.prediction, "weighting": args.weighting, "time_sampler": args.time_sampler,
            "sigma_data": sigma_data, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
            "grad_clip": args.grad_clip, "bf16": bool(args.bf16), "world_size": world}


def _network(args, parser, meta, device):
    """The network of meta (seeded with --seed) on device; an error if it does not take the data's shape."""
    import torch

    from .. import training as T

    data_shape = meta["data_shape"]
    torch.manual_seed(args.seed)
    try:
        net = T.build_network(meta)
    except (ValueError, TypeError) as exc:
        parser.error(f"--model {args.model}: {exc}")
    if list(getattr(net, "data_shape", data_shape)) != data_shape:
        parser.error(f"--model {args.model} takes data of shape {tuple(net.data_shape)}, but --data {args.data} has "
                     f"shape {tuple(data_shape)}")
    return net.to(device)


def _resume(args, parser, trainer, ckpt, meta, device) -> None:
    """Load ckpt into trainer after checking it was trained with the same settings and is not past --steps."""
    from .. import training as T

    if not os.path.exists(ckpt):
        parser.error(f"--resume: no checkpoint at {ckpt}")
    state = T.load_checkpoint(ckpt, map_location=device)
    missing = [k for k in ("optimizer", "loader") if k not in state]
    if missing:
        how = (" (it was written by `diffusion-lab distill --method reflow`: continue that run with distill --resume)"
               if "distill" in state else "")
        parser.error(f"--resume: {ckpt} holds no training state to continue ({', '.join(missing)} missing){how}")
    diff = [k for k in _RESUME_KEYS if state["meta"].get(k) != meta[k]]
    if diff:
        k = diff[0]
        parser.error(f"--resume: the checkpoint was trained with {k}={state['meta'].get(k)!r}, this run asks for "
                     f"{meta[k]!r}")
    if state["step"] > args.steps:
        parser.error(f"--resume: the checkpoint is at step {state['step']}, beyond --steps {args.steps}")
    trainer.load_state_dict(state)
    trainer.meta = meta


class _ExactScore:
    """MMD^2 of the EMA network's samples to the exact law of an exact-target training set (``metrics.mmd2_exact``:
    closed-form law terms, so its mean is 0 for exact samples), at every log step."""

    def __init__(self, args, meta, schedule):
        from ..metrics import mmd_bandwidth
        from ..targets import get_target

        self.law = get_target(meta["data"])
        self.meta, self.schedule, self.n, self.seed = meta, schedule, args.eval_n, args.seed
        self.bandwidth = mmd_bandwidth(self.law)
        self.labels = None
        if meta["num_classes"]:  # labels drawn from the mixture weights: the class-averaged law is the target
            import torch

            _, self.labels = self.law.sample(self.n, torch.Generator().manual_seed(args.seed + 1), return_labels=True)

    def __call__(self, trainer) -> tuple[float, float]:
        from .. import training as T
        from ..metrics import mmd2_exact

        module = trainer.ema.module
        mode = module.training
        module.eval()
        try:
            field = T.learned_field(module, self.schedule, self.meta["prediction"], sigma_data=self.meta["sigma_data"])
            res = preview(field, self.meta, self.n, self.seed + 2, self.labels)
        finally:
            module.train(mode)
        m = mmd2_exact(res.x.cpu(), self.law, self.bandwidth)
        return m.mmd2, m.se


def _log_line(rec) -> None:
    """One training-log line: on stdout when stderr is not a terminal; on a terminal (with the progress bar) only
    lines that carry the distance to the exact law."""
    mmd = f"  MMD^2 to exact law {rec['mmd2']:.2e} +- {rec['mmd2_se']:.1e}" if "mmd2" in rec else ""
    line = (f"step {rec['step']:6d}  loss {rec['loss']:.5f}  lr {rec['lr']:.2e}  "
            f"{rec['samples_per_s']:,.0f} samples/s  {rec['seconds']:.1f} s{mmd}")
    if not sys.stderr.isatty():
        print(line, flush=True)
    elif mmd:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)


def _callback(score, trainer):
    """The per-log-step callback: the exact-law distance (when ``score``) added to the record, then its line.

    The trainer's samples/s covers the wall time since its previous record, which includes this callback's own
    evaluation; that time is taken out again, so samples/s stays the training throughput."""
    import time

    state = {"seconds": None, "eval": 0.0}

    def callback(rec):
        interval = rec["seconds"] - state["seconds"] if state["seconds"] is not None else None
        if interval is not None and state["eval"] and interval > state["eval"]:
            rec["samples_per_s"] *= interval / (interval - state["eval"])
        state["seconds"], state["eval"] = rec["seconds"], 0.0
        if score is not None:
            t0 = time.perf_counter()
            rec["mmd2"], rec["mmd2_se"] = score(trainer)
            state["eval"] = time.perf_counter() - t0
        _log_line(rec)

    return callback


def _write_log_and_settings(args, trainer, meta, objective, total) -> list:
    """train_log.csv (if anything was logged) and settings.json; returns the names written."""
    written = []
    if trainer.history:
        C.write_csv(os.path.join(args.out, "train_log.csv"), trainer.history)
        written.append("train_log.csv")
    settings = {"command": "diffusion-lab train", **meta, "steps": args.steps, "seconds_this_run": total,
                "objective": objective.settings(), "versions": C.versions()}
    C.write_json(os.path.join(args.out, "settings.json"), settings, default=str)
    written.append("settings.json")
    return written


def _write_figures(args, trainer, meta, schedule, y) -> list:
    """loss.png (if anything was logged) and samples.png from the EMA weights; returns the names written."""
    import torch

    from .. import training as T
    from ..plots import loss_curve

    written = []
    loss_name, samples_name = f"loss.{args.format}", f"samples.{args.format}"
    if trainer.history:
        loss_curve(trainer.history, os.path.join(args.out, loss_name),
                   title=f"{args.model} on {args.data} ({args.schedule}, {args.prediction})")
        written.append(loss_name)
    field = T.learned_field(trainer.ema.module.eval(), schedule, args.prediction, sigma_data=meta["sigma_data"])
    data_shape = meta["data_shape"]
    labels = None
    if y is not None:
        labels = torch.arange(meta["num_classes"]).repeat_interleave(10 if len(data_shape) == 3 else 200)
    n = len(labels) if labels is not None else (2000 if len(data_shape) == 1 else 80)
    res = preview(field, meta, n, args.seed, labels)
    save_preview(res.x, labels, meta, os.path.join(args.out, samples_name),
                 f"EMA samples, dpmpp_2m {res.nfe} NFE, step {trainer.step}")
    written.append(samples_name)
    return written


def run(args, parser) -> int:
    import torch

    from .. import training as T
    from ..schedules import get_schedule

    _check_options(args, parser)
    C.set_threads(args, parser)
    C.check_figure_options(args, parser)
    device = C.choose_device(args, parser)
    rank, world, dist_device = T.init_distributed()
    if world > 1:
        device = dist_device
    schedule = get_schedule(args.schedule)
    if args.prediction == "v" and not schedule.variance_preserving:
        parser.error(f"--prediction v needs a variance-preserving schedule (vp, cosine, ddpm), not {args.schedule!r}")
    try:
        x, y, data_desc = train_data(args.data, args.n_train, args.seed, args.conditional or args.data == "digits")
    except ValueError as exc:
        parser.error(str(exc))
    sigma_data = _sigma_data(args, parser, x)
    meta = _meta(args, x, y, data_desc, schedule, sigma_data, world)
    net = _network(args, parser, meta, device)
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
        _resume(args, parser, trainer, ckpt, meta, device)
    main_rank = rank == 0
    if main_rank:
        C.prepare_out(args, parser, ["checkpoint.pt", "checkpoint.pt.tmp", "train_log.csv", "settings.json",
                                     *C.figure_names("loss", "samples")], keep=("checkpoint.pt",) if args.resume else ())
        n_par = sum(p.numel() for p in net.parameters())
        print(f"train {args.model} ({n_par:,} parameters) on {data_desc}; schedule {args.schedule}, prediction "
              f"{args.prediction}, weighting {args.weighting}, times {args.time_sampler}, sigma_data {sigma_data:g}; "
              f"device {device}, world size {world}; from step {trainer.step} to {args.steps}")
    from ..targets import TARGETS

    score = _ExactScore(args, meta, schedule) if (args.eval_n and args.data in TARGETS and main_rank) else None
    t0 = time.perf_counter()
    trainer.run(args.steps, callback=_callback(score, trainer), log_every=args.log_every, ckpt_every=args.ckpt_every,
                on_checkpoint=lambda tr: T.save_checkpoint(ckpt, tr.state_dict()), progress=sys.stderr.isatty())
    total = time.perf_counter() - t0
    if not main_rank:
        return 0
    written = ["checkpoint.pt", *_write_log_and_settings(args, trainer, meta, objective, total)]
    if not args.no_plot:
        from ..plots import style

        with style(dpi=args.dpi):
            written += _write_figures(args, trainer, meta, schedule, y)
    last = trainer.history[-1] if trainer.history else {}
    mmd = f", MMD^2 to the exact law {last['mmd2']:.2e} +- {last['mmd2_se']:.1e}" if "mmd2" in last else ""
    print(f"step {trainer.step}: loss {last.get('loss', float('nan')):.5f}{mmd} ({total:.1f} s training)")
    C.wrote(written, args.out)
    return 0
