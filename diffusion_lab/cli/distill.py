"""`diffusion-lab distill`: distil a teacher field (an exact target's or a `train` checkpoint's) into a learned flow
map Psi_theta(x, s, t) (``diffusion_lab.flowmap``, ``diffusion_lab.meanflow``) or, by reflow (``diffusion_lab.reflow``),
into a straighter rectified-flow velocity field, with checkpoints that resume bitwise, and measure it at 1, 2 and 4
network calls."""
from __future__ import annotations

import math
import os
import sys
import time

from . import _common as C

#: The format tag of a distillation checkpoint (``load_distill_checkpoint``).
DISTILL_FORMAT = "diffusion_lab.distill/1"

#: checkpoint settings that must match for --resume to continue the same run
_RESUME_KEYS = ("method", "teacher", "schedule", "data", "n_train", "seed", "network", "sigma_data", "batch",
                "grid_steps", "grid_kind", "solver", "lr", "target_decay", "ema_decay", "loss", "huber_c",
                "total_steps", "ct_s0", "ct_s1", "rounds", "resolved")

#: methods whose trainers this version does not have; named here so that asking for one gets a clear refusal
PENDING: dict = {}

#: RK4 steps of reflow's coupling Phi(z) (``reflow.couple``'s default)
REFLOW_COUPLE_STEPS = 64

QUICK_STEPS, QUICK_EVAL_N = 400, 1000
#: the defaults of a DiT teacher (a FlowMap(TwoTimeDiT) fine-tuned from it, ~0.6 ms per sample and network call on
#: one CPU thread for DiT-tiny/2): batch 64 and Adam at 2e-4 (the recipe of ``experiments.digits_flow_map``), and
#: for --quick 200 steps of batch 32 and 200 evaluation samples
DIT_DEFAULTS = {"batch": 64, "lr": 2e-4}
DIT_QUICK = {"steps": 200, "batch": 32, "eval_n": 200}
EVAL_STEPS = (1, 2, 4)


# ------------------------------------------------------------------------------------------------
# the trainers behind the methods, all resumable: builder(psi, teacher, data, settings, log_every)

def _consistency(method):
    def build(psi, teacher, data, settings, log_every, labels=None):
        from ..flowmap import ConsistencyTrainer

        keys = ("solver", "batch", "grid_steps", "grid_kind", "lr", "target_decay", "ema_decay", "seed", "loss",
                "huber_c")
        extra = ({k: settings[k] for k in ("total_steps", "ct_s0", "ct_s1")} if method == "ct" else {})
        return ConsistencyTrainer(psi, teacher if method != "ct" else None, data, method=method, log_every=log_every,
                                  labels=labels, **{k: settings[k] for k in keys}, **extra)

    return build


def _meanflow(method):
    def build(psi, teacher, data, settings, log_every):
        from .. import meanflow as M

        common = {k: settings[k] for k in ("batch", "lr", "ema_decay", "seed")}
        if method == "meanflow":
            return M.MeanFlowTrainer(psi, teacher, data, log_every=log_every, **common)
        if settings.get("target_decay") is not None:
            common["target_decay"] = settings["target_decay"]  # 0: the online network as the self-consistency target
        return M.ShortcutTrainer(psi, teacher, data, log_every=log_every, **common)

    return build


def _reflow(psi, teacher, data, settings, log_every):
    """A ``reflow.ReflowTrainer`` from the teacher (RectifiedFlow) on the noise samples z = alpha_T x + sigma_T eps of
    the data x (exact draws of p_{t_max}); ``psi`` is the train-format meta of the network each round builds."""
    import torch

    from ..reflow import ReflowTrainer
    from ..training import build_network

    sch = teacher.schedule
    g = torch.Generator().manual_seed(settings["seed"] + 5)
    x = data.to(torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t_max = torch.tensor(sch.t_max, dtype=torch.float64)
    z = float(sch.alpha(t_max)) * x + float(sch.sigma(t_max)) * eps
    rounds = settings["rounds"]
    return ReflowTrainer(teacher, z, lambda: build_network(psi), rounds=rounds,
                         steps_per_round=settings["total_steps"] // rounds, batch=settings["batch"], lr=settings["lr"],
                         ema_decay=settings["ema_decay"], sigma_data=settings["sigma_data"], seed=settings["seed"],
                         couple_steps=REFLOW_COUPLE_STEPS, log_every=log_every)


#: method name -> builder(psi, teacher, data, settings, log_every) of a run with the interface of
#: ``flowmap.ConsistencyTrainer`` (cd / ctm / ct also take ``labels=``, one class label per data row)
TRAINERS = {"cd": _consistency("cd"), "ctm": _consistency("ctm"), "ct": _consistency("ct"),
            "meanflow": _meanflow("meanflow"), "shortcut": _meanflow("shortcut"), "reflow": _reflow}
#: methods that distil a DiT teacher (class-conditional or not) into FlowMap(TwoTimeDiT)
DIT_METHODS = ("cd", "ctm", "ct")
#: what each method trains: FlowMap(TwoTimeMLP) (FlowMap(TwoTimeDiT) for a DiT teacher), the average-velocity maps
#: of ``diffusion_lab.meanflow``, or (reflow) a velocity field, written as a `diffusion-lab train` checkpoint
MAP_KIND = {"cd": "flowmap", "ctm": "flowmap", "ct": "flowmap", "meanflow": "meanflow", "shortcut": "shortcut",
            "reflow": "field"}


# ------------------------------------------------------------------------------------------------
# checkpoints

def load_distill_checkpoint(path: str) -> dict:
    """torch.load(path, weights_only=True) of a `distill` checkpoint; ValueError naming the path and what is wrong
    for a file that is not one, FileNotFoundError for a missing file."""
    import warnings

    import torch

    if not os.path.exists(path):
        raise FileNotFoundError(f"no distillation checkpoint at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or a pickle of other objects
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path} is not a readable diffusion_lab distillation checkpoint ({type(exc).__name__}"
                         f"{': ' + reason if reason else ''})") from None
    if isinstance(sd, dict) and "distill" in sd and "meta" in sd:
        raise ValueError(f"{path} is the velocity field of a `distill --method reflow` run (a `diffusion-lab train` "
                         f"checkpoint), not a flow map: read it with --checkpoint")
    if not isinstance(sd, dict) or sd.get("format") != DISTILL_FORMAT:
        raise ValueError(f"{path} is not a diffusion_lab distillation checkpoint (expected format {DISTILL_FORMAT!r}; "
                         f"a `diffusion-lab train` checkpoint is a teacher, not a flow map)")
    missing = [k for k in ("meta", "state") if k not in sd]
    if missing:
        raise ValueError(f"{path}: distillation checkpoint without {', '.join(missing)}")
    return sd


def load_resume_state(path: str) -> dict:
    """{"format", "meta", "state"} of a `distill` run for --resume: a distillation checkpoint, or the "distill" entry
    of the `train`-format checkpoint a reflow run writes. ValueError naming the path for anything else."""
    from ..training import load_checkpoint

    try:
        return load_distill_checkpoint(path)
    except ValueError as first:
        try:
            sd = load_checkpoint(path)
        except ValueError:
            raise first from None
        inner = sd.get("distill")
        if not isinstance(inner, dict) or inner.get("format") != DISTILL_FORMAT or "state" not in inner:
            raise ValueError(f"{path} is a `diffusion-lab train` checkpoint without the state of a distill run") \
                from None
        return inner


def reflow_train_meta(meta: dict) -> dict:
    """The `diffusion-lab train` meta of the velocity network reflow trains (what ``training.field_from_checkpoint``,
    `sample --checkpoint` and `compare --checkpoint` rebuild it from): an MLP of --hidden / --depth predicting the
    velocity on RectifiedFlow, with the data's sigma_data."""
    shape = list(meta["data_shape"])
    return {"data": meta["data"], "data_desc": f"reflow of {meta['data']} ({meta['rounds']} round(s))",
            "n_train": meta["n_train"], "seed": meta["seed"], "conditional": False, "num_classes": 0,
            "data_shape": shape, "model": "mlp",
            "model_kwargs": {"data_shape": shape, "hidden": meta["network"]["hidden"],
                             "depth": meta["network"]["depth"], "num_classes": 0},
            "schedule": meta["schedule"], "prediction": "velocity", "weighting": "uniform", "time_sampler": "uniform",
            "sigma_data": meta["sigma_data"], "batch": meta["batch"], "lr": meta["lr"], "warmup": 0,
            "ema": meta["ema_decay"], "grad_clip": None, "bf16": False, "world_size": 1,
            "reflow": {"teacher": meta["teacher"], "rounds": meta["rounds"], "steps": meta["total_steps"]}}


def flow_map_from_checkpoint(sd_or_path, ema: bool = True, labelled: bool = False):
    """(FlowMap with the EMA weights (or the online ones), meta) of a `distill` checkpoint (path or loaded dict).

    A class-conditional map (FlowMap(TwoTimeDiT) distilled from a class-conditional DiT, meta["num_classes"] > 0)
    is sampled with class labels, psi(x, s, t, y) or ``psi.with_labels(y)``; it is returned unbound only with
    ``labelled=True``, else refused with a ValueError naming the path, for callers that pass no labels."""
    from ..training import schedule_from_settings

    sd = load_distill_checkpoint(sd_or_path) if isinstance(sd_or_path, str) else sd_or_path
    meta = sd["meta"]
    k = int(meta.get("num_classes") or 0)
    if k and not labelled:
        where = sd_or_path if isinstance(sd_or_path, str) else "the checkpoint"
        raise ValueError(f"{where} is a class-conditional flow map ({k} classes, distilled from a "
                         f"{meta['network'].get('model')} on {meta.get('data')!r}): sampling it needs class labels, "
                         f"which compare --flow-map does not pass (it compares unconditional maps on exact targets); "
                         f"load it with flow_map_from_checkpoint(path, labelled=True)")
    weights = sd["state"]["ema"]["module"] if ema else sd["state"]["net"]
    psi = _new_map(meta, schedule_from_settings(meta["schedule"]))
    psi.net.load_state_dict(weights)
    psi.net.eval()
    return psi, meta


def _new_map(meta: dict, schedule, teacher_net=None):
    """A fresh map of meta's kind on ``schedule``: FlowMap(TwoTimeMLP) with the EDM preconditioning at sigma_data,
    FlowMap(TwoTimeDiT) for a DiT teacher (meta["network"]["kind"] == "dit": ``TwoTimeDiT.from_dit(teacher_net)``,
    the teacher's DiT with a zero-initialised end-time embedding, when ``teacher_net`` is given, else the DiT rebuilt
    from meta["network"]'s "model" and "model_kwargs" for its weights to be loaded), or a MeanFlow / shortcut map
    (``meanflow.meanflow_map`` / ``shortcut_map``)."""
    from ..flowmap import FlowMap, TwoTimeDiT, TwoTimeMLP

    kind = meta.get("map", "flowmap")
    net = meta["network"]
    if kind == "flowmap" and net.get("kind") == "dit":
        from ..training import build_network

        core = TwoTimeDiT.from_dit(teacher_net) if teacher_net is not None else \
            TwoTimeDiT(build_network({"model": net["model"], "model_kwargs": net["model_kwargs"]}))
        return FlowMap(core, schedule, sigma_data=float(meta["sigma_data"]))
    if kind == "flowmap":
        return FlowMap(TwoTimeMLP(**net), schedule, sigma_data=float(meta["sigma_data"]))
    from .. import meanflow as M

    build = M.meanflow_map if kind == "meanflow" else M.shortcut_map
    return build(net["dim"], schedule, hidden=net["hidden"], depth=net["depth"])


# ------------------------------------------------------------------------------------------------
# the command

def add_parser(sub):
    from ..flowmap import DISTILL_LOSSES, TEACHER_SOLVERS
    from ..samplers.grids import GRID_KINDS
    from ..schedules import SCHEDULES

    p = sub.add_parser(
        "distill",
        help="distil a teacher field into a few-step flow map (consistency, MeanFlow, shortcut) or reflow it",
        description=(
            "Distil the PF-ODE of a teacher into a learned flow map Psi(x, s, t) (diffusion_lab.flowmap): "
            "--teacher is an exact target (its exact field) or a `diffusion-lab train` checkpoint (its EMA network). "
            f"Methods: {', '.join(TRAINERS)} (consistency distillation, Song et al. 2023; its two-time version after "
            "Kim et al. 2024; consistency training without a teacher, Song et al. 2023 with the improved recipe of "
            "Song & Dhariwal 2023: the teacher then only supplies the data and the reference; MeanFlow, Geng et al. "
            "2025, and shortcut models, Frans et al. 2024, on the teacher's velocity; reflow, Liu et al. 2023: "
            "--rounds rounds that couple noise samples with the previous flow's map, by RK4, and fit a fresh MLP "
            "velocity field to the straight lines, on the rectified-flow schedule only (an exact target's field on rf, or a "
            "checkpoint trained with --schedule rf; other schedules are refused). Writes checkpoint.pt (the map, "
            "both EMAs, Adam, every RNG state; loads with torch.load(weights_only=True); `diffusion-lab compare "
            "--flow-map` reads it; for reflow a `diffusion-lab train` checkpoint of the last round's velocity network "
            "that `sample --checkpoint` and `compare --checkpoint` read, with the run's state inside), "
            "distill_log.csv, summary.json (settings, teacher evaluations, the 1/2/4-call errors against the exact "
            "flow map when the teacher is exact, or against the teacher's own PF-ODE, MMD^2 to the exact law on "
            "exact-target data; reflow: 1/2/4 Euler steps of the field and of the teacher) and loss.png (+ "
            "samples.png for 2-D data) to --out, which must be new or empty unless --overwrite. Checkpoints are "
            "written atomically every --ckpt-every steps; --resume continues from --out/checkpoint.pt to --steps and "
            "the result is bitwise that of one uninterrupted run (ct and reflow keep their --steps: ct's curriculum "
            "and reflow's rounds and learning-rate decay depend on it). --quick: 400 steps, 1000 evaluation samples. "
            "A DiT checkpoint teacher (cd, ctm, ct only) is distilled into FlowMap(TwoTimeDiT): its own DiT plus a "
            "zero-initialised embedding of the end time, so the student starts as the teacher's DDIM step (an "
            "--prediction edm teacher); a class-conditional one (digits) with the label of each x_0, evaluated on "
            "balanced labels against the teacher's PF-ODE for the same labels (defaults: batch 64, lr 2e-4; --quick "
            "200 steps of batch 32, 200 evaluation samples)."
        ),
    )
    p.add_argument("--teacher", default="ring8", metavar="TARGET_OR_CHECKPOINT",
                   help="an exact target name (ring8, ...: the exact field, data drawn from it) or the path of a "
                        "`train` checkpoint (default ring8)")
    p.add_argument("--method", default="cd", metavar="METHOD",
                   help=f"distillation method: {', '.join(TRAINERS)} (default cd)")
    p.add_argument("--schedule", default=None, choices=sorted(SCHEDULES),
                   help="noise schedule of an exact-target teacher (default vp; reflow: rf, the only one it takes); a "
                        "checkpoint teacher has its own")
    p.add_argument("--steps", type=int, default=None,
                   help="total optimiser steps (default 3000; --quick 400); reflow: over all rounds, a multiple of "
                        "--rounds")
    p.add_argument("--rounds", type=int, default=1,
                   help="reflow: rounds, each coupling --n-train noise samples with the previous flow's map by RK4 "
                        f"x{REFLOW_COUPLE_STEPS} and training a fresh MLP for --steps / --rounds steps (default 1)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size (default 256; a DiT teacher: {DIT_DEFAULTS['batch']}, --quick "
                        f"{DIT_QUICK['batch']})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default 1e-3; a DiT teacher: {DIT_DEFAULTS['lr']:g})")
    p.add_argument("--grid-steps", type=int, default=18, help="N intervals of the distillation grid (default 18)")
    p.add_argument("--grid-kind", default=None, choices=GRID_KINDS,
                   help="distillation grid (default logsnr; ct: karras)")
    p.add_argument("--solver", default="heun", choices=TEACHER_SOLVERS,
                   help="one teacher step: heun (2 evaluations) or ddim (1) (default heun)")
    p.add_argument("--target-decay", type=float, default=None,
                   help="mu of the target network theta- (default 0.95, Song et al. 2023; ct: 0, theta- = stopgrad "
                        "theta, Song & Dhariwal 2023; shortcut: 0.999, the published EMA target, where 0 (the online "
                        "network) measured far better in short runs)")
    p.add_argument("--ct-s0", type=int, default=10, help="ct: initial intervals of the curriculum (default 10)")
    p.add_argument("--ct-s1", type=int, default=1280, help="ct: final intervals of the curriculum (default 1280)")
    p.add_argument("--ema", type=float, default=0.999, help="evaluation EMA decay (default 0.999)")
    p.add_argument("--loss", default=None, choices=DISTILL_LOSSES,
                   help="consistency distance (default l2; ct: pseudo_huber)")
    p.add_argument("--huber-c", type=float, default=None, help="pseudo-Huber constant c (default 0.00054 sqrt(D))")
    p.add_argument("--hidden", type=int, default=64,
                   help="TwoTimeMLP width (reflow: the MLP's; unused with a DiT teacher, whose map is its DiT; "
                        "default 64)")
    p.add_argument("--depth", type=int, default=3, help="TwoTimeMLP residual blocks (reflow: the MLP's; default 3)")
    p.add_argument("--n-train", type=int, default=20000,
                   help="data samples drawn from 2-D data (reflow: also the coupled noise samples; default 20000)")
    C.add_seed(p)
    p.add_argument("--log-every", type=int, default=100, help="log interval in steps (default 100)")
    p.add_argument("--ckpt-every", type=int, default=500, help="checkpoint interval in steps (default 500; 0: end only)")
    p.add_argument("--eval-n", type=int, default=None, metavar="N",
                   help="held-out samples x_T of the evaluation (default 2000; --quick 1000)")
    p.add_argument("--ref-rtol", type=float, default=None, metavar="RTOL",
                   help="tolerance of the reference map the errors are measured against (default 1e-8 for the exact "
                        "map by DOP853, 1e-6 for a learned teacher's PF-ODE by adaptive Dormand-Prince)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps and {QUICK_EVAL_N} evaluation samples "
                                                        f"unless given (a DiT teacher: {DIT_QUICK['steps']} steps of "
                                                        f"batch {DIT_QUICK['batch']}, {DIT_QUICK['eval_n']} samples; "
                                                        "under 2 minutes on one CPU thread)")
    C.add_threads(p)
    C.add_out(p, "results/distill")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint.pt to --steps (the folder's other files are rewritten)")
    C.add_no_plot(p, "skip loss.png and samples.png")
    C.add_figure_options(p)
    p.set_defaults(func=run)
    return p


def _check_options(args, parser) -> None:
    from ..targets import TARGETS

    if args.method in PENDING:
        parser.error(f"--method {args.method}: {PENDING[args.method]} is not available in this version (no trainer); "
                     f"available: {', '.join(TRAINERS)}")
    if args.method not in TRAINERS:
        parser.error(f"unknown --method {args.method!r}; choose one of {', '.join(TRAINERS)}")
    # what was left to its default (a DiT teacher has its own, ``_resolve_defaults``)
    args.defaulted = {k for k in ("steps", "eval_n", "batch", "lr") if getattr(args, k) is None}
    args.batch = 256 if args.batch is None else args.batch
    args.lr = 1e-3 if args.lr is None else args.lr
    C.at_least(parser, "--rounds", args.rounds, 1)
    if args.rounds != 1 and args.method != "reflow":
        parser.error(f"--rounds applies to --method reflow only, not {args.method}")
    if args.method == "shortcut" and args.batch // 8 < 7:  # train_shortcut's 1/8 self-consistency share, 7 levels
        parser.error(f"--method shortcut needs --batch >= 56 (an eighth of the batch covers its 7 step-size levels), "
                     f"got {args.batch}")
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else 3000
    if args.eval_n is None:
        args.eval_n = QUICK_EVAL_N if args.quick else 2000
    if args.method == "reflow" and args.steps % args.rounds:
        parser.error(f"--method reflow: --steps ({args.steps}) must be a multiple of --rounds ({args.rounds}), the "
                     "same number of steps in every round")
    for name in ("steps", "batch", "grid_steps", "hidden", "depth", "n_train", "log_every"):
        C.at_least(parser, f"--{name.replace('_', '-')}", getattr(args, name), 1)
    C.at_least(parser, "--ckpt-every", args.ckpt_every, 0)
    C.at_least(parser, "--eval-n", args.eval_n, 2)
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be > 0, got {args.lr}")
    for name in ("target_decay", "ema"):
        v = getattr(args, name)
        if v is not None and not 0 <= v < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1), got {v}")
    if args.ref_rtol is not None and not 0 < args.ref_rtol < 1:
        parser.error(f"--ref-rtol must be in (0, 1), got {args.ref_rtol}")
    if args.huber_c is not None and not (args.huber_c > 0 and math.isfinite(args.huber_c)):
        parser.error(f"--huber-c must be > 0, got {args.huber_c}")
    if args.teacher not in TARGETS and not os.path.isfile(args.teacher):
        parser.error(f"--teacher {args.teacher!r} is neither an exact target ({', '.join(sorted(TARGETS))}) nor a "
                     f"checkpoint file")


def _resolve_defaults(args, student) -> None:
    """A DiT teacher's defaults (``DIT_DEFAULTS``, with --quick ``DIT_QUICK``) for the options left unset."""
    if student is None:
        return
    for k, v in {**DIT_DEFAULTS, **(DIT_QUICK if args.quick else {})}.items():
        if k in args.defaulted:
            setattr(args, k, v)


def _teacher(args, parser):
    """(teacher field, data, teacher description dict, exact target or None, data name, DiT student or None) of
    --teacher; the last is, for a DiT teacher, {"network" (meta["network"] of the map), "sigma_data", "num_classes",
    "labels" (of the data rows, None when unconditional), "teacher_net" (the EMA DiT), "prediction"}."""
    from .. import training as T
    from ..models import DIT_CONFIGS
    from ..schedules import get_schedule
    from ..targets import TARGETS, get_target
    from ._learned import train_data

    reflow = args.method == "reflow"
    if reflow and args.schedule not in (None, "rf"):
        parser.error(f"--method reflow works on the rectified-flow schedule only (--schedule rf), not "
                     f"{args.schedule!r}: its coupling lines x_t = (1 - t) X_0 + t X_1 are that schedule's paths")
    if args.teacher in TARGETS:
        schedule = get_schedule(args.schedule or ("rf" if reflow else "vp"))
        tg = get_target(args.teacher)
        x, _, _ = train_data(args.teacher, args.n_train, args.seed, False)
        desc = {"kind": "exact", "target": args.teacher, "schedule": schedule.settings()}
        return tg.field(schedule), x, desc, tg, args.teacher, None
    try:
        state = T.load_checkpoint(args.teacher)
    except ValueError as exc:
        parser.error(f"--teacher: {exc}")
    meta = state["meta"]
    k = int(meta.get("num_classes") or 0)
    dit = meta["model"] in DIT_CONFIGS
    if dit and args.method not in DIT_METHODS:
        parser.error(f"--method {args.method}: the teacher {args.teacher} is a {'class-conditional ' if k else ''}"
                     f"{meta['model']}, distilled by --method {', '.join(DIT_METHODS)} only (into a FlowMap around "
                     f"the teacher's DiT{', with the class labels of its data' if k else ''}); meanflow, shortcut and "
                     "reflow train MLPs from unconditional MLP teachers")
    if k and not dit:
        parser.error(f"--teacher {args.teacher}: a class-conditional {meta['model']} ({k} classes): its labels reach "
                     f"FlowMap(TwoTimeDiT) students only, distilled from a DiT teacher (train --model DiT-...); the "
                     "TwoTimeMLP student takes no labels")
    field = T.field_from_checkpoint(state)
    if reflow and meta["schedule"].get("name") != "rf":
        parser.error(f"--method reflow: the teacher checkpoint was trained on {meta['schedule'].get('name')!r}; reflow "
                     "needs a rectified-flow (rf) teacher. Its field is not converted: rf's noise levels sigma/alpha "
                     "span 1e-3..999, beyond what a network trained on another schedule has seen, and the coupling "
                     "reflow learns from would rest on that extrapolation. Train the teacher with --schedule rf")
    if args.schedule is not None and field.schedule.settings() != get_schedule(args.schedule).settings():
        parser.error(f"--schedule {args.schedule}: the teacher checkpoint was trained on {meta['schedule']}; "
                     "leave --schedule out")
    try:
        x, y, _ = train_data(meta["data"], args.n_train, args.seed, bool(k))
    except ValueError as exc:
        parser.error(f"--teacher {args.teacher}: its data {meta['data']!r}: {exc}")
    desc = {"kind": "checkpoint", "path": os.path.abspath(args.teacher), "step": int(state["step"]),
            "model": meta["model"], "prediction": meta["prediction"], "data": meta["data"],
            "schedule": meta["schedule"]}
    tg = get_target(meta["data"]) if meta["data"] in TARGETS else None
    student = None
    if dit:  # the student is the teacher's DiT with an end-time embedding, at the teacher's sigma_data
        student = {"network": {"kind": "dit", "model": meta["model"], "model_kwargs": dict(meta["model_kwargs"])},
                   "sigma_data": float(meta["sigma_data"]), "num_classes": k, "labels": y if k else None,
                   "teacher_net": field.model.net, "prediction": meta["prediction"]}
    return field, x, desc, tg, meta["data"], student


def _meta(args, field, x, teacher_desc, data_name, student=None) -> dict:
    """The run's settings (checkpoint meta, summary.json). Options a method does not use are recorded as None, so
    that --resume compares only what the run depends on. A DiT teacher (``student``, see ``_teacher``) makes the
    map a FlowMap(TwoTimeDiT) at the teacher's sigma_data; --hidden / --depth do not apply to it."""
    grid = args.method in ("cd", "ctm", "ct")  # the consistency grid, teacher solver and distance
    network = student["network"] if student else {"dim": int(math.prod(x.shape[1:])), "hidden": args.hidden,
                                                   "depth": args.depth}
    return {"method": args.method, "teacher": teacher_desc, "schedule": field.schedule.settings(), "data": data_name,
            "data_shape": list(x.shape[1:]), "n_train": int(x.shape[0]), "seed": args.seed, "network": network,
            "num_classes": student["num_classes"] if student else 0,
            "sigma_data": student["sigma_data"] if student else round(float(x.std()), 6), "batch": args.batch,
            "grid_steps": args.grid_steps if grid else None, "grid_kind": args.grid_kind if grid else None,
            "solver": args.solver if grid else None, "lr": args.lr,
            "target_decay": args.target_decay if grid or args.method == "shortcut" else None,
            "ema_decay": args.ema, "loss": args.loss if grid else None, "huber_c": args.huber_c if grid else None,
            "total_steps": args.steps if args.method in ("ct", "reflow") else None,
            "ct_s0": args.ct_s0 if args.method == "ct" else None, "ct_s1": args.ct_s1 if args.method == "ct" else None,
            "rounds": args.rounds if args.method == "reflow" else None, "map": MAP_KIND[args.method]}


def _build_run(meta, field, x, log_every, student=None):
    import torch

    torch.manual_seed(meta["seed"])
    if meta["method"] == "reflow":  # each round builds its network (seeded by the round) from the train meta
        return TRAINERS["reflow"](reflow_train_meta(meta), field, x, meta, log_every)
    if student is not None:  # FlowMap(TwoTimeDiT.from_dit(teacher)): it starts as the teacher's DDIM step
        psi = _new_map(meta, field.schedule, teacher_net=student["teacher_net"])
        return TRAINERS[meta["method"]](psi, field, x, meta, log_every, labels=student["labels"])
    psi = _new_map(meta, field.schedule)
    return TRAINERS[meta["method"]](psi, field, x, meta, log_every)


def _resume(args, parser, run_, meta, ckpt) -> None:
    if not os.path.exists(ckpt):
        parser.error(f"--resume: no checkpoint at {ckpt}")
    try:
        sd = load_resume_state(ckpt)
    except ValueError as exc:
        parser.error(f"--resume: {exc}")
    diff = [k for k in _RESUME_KEYS if sd["meta"].get(k) != meta[k]]
    if diff:
        k = diff[0]
        parser.error(f"--resume: the checkpoint was distilled with {k}={sd['meta'].get(k)!r}, this run asks for "
                     f"{meta[k]!r}")
    if sd["state"]["step"] > args.steps:
        parser.error(f"--resume: the checkpoint is at step {sd['state']['step']}, beyond --steps {args.steps}")
    try:
        run_.load_state_dict(sd["state"])
    except (KeyError, ValueError) as exc:
        parser.error(f"--resume: {ckpt}: the saved state does not fit this run ({type(exc).__name__}: {exc})")


def _save(path, meta, run_) -> None:
    """The checkpoint, atomically (``training.save_checkpoint``). A reflow run writes a `diffusion-lab train`
    checkpoint of its current round's velocity network (read by ``training.load_checkpoint`` /
    ``field_from_checkpoint``, `sample --checkpoint`, `compare --checkpoint`) with the run's own state under
    "distill"; the other methods a distillation checkpoint."""
    from ..training import CHECKPOINT_FORMAT, save_checkpoint

    inner = {"format": DISTILL_FORMAT, "meta": meta, "state": run_.state_dict()}
    if meta["method"] != "reflow":
        save_checkpoint(path, inner)
        return
    tr = run_.trainer
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "meta": reflow_train_meta(meta), "step": run_.step,
                           "model": tr.net.state_dict(), "ema": tr.ema.state_dict(),
                           "history": [dict(r) for r in run_.history], "distill": inner})


def evaluate(psi, field, target, meta: dict, n: int, seed: int, rtol: float | None = None) -> dict:
    """The flow map (EMA weights) at k = 1, 2, 4 calls on n held-out x_T ~ p_{t_max}: the deterministic chain's
    mean / 90th-percentile ||x_hat - Phi(x_T)|| against the reference map (the exact PF-ODE map by DOP853, rtol =
    ``rtol`` (default 1e-8), atol = rtol / 100, for an exact teacher; the teacher's own PF-ODE by adaptive
    Dormand-Prince at rtol = atol = ``rtol`` (default 1e-6) for a learned one),
    and, on exact-target data, the MMD^2 to the exact law p_{t_min} of the chain and of multistep consistency
    sampling; the same for the teacher's own chain of solver steps over the distillation grid (the map distillation
    converges to), and the teacher's DDIM and DPM-Solver++(2M) at the map's budgets of k = 1, 2, 4 calls. For reflow
    ``psi`` is the learned velocity field: its Euler chain at k = 1, 2, 4 steps on the uniform t-grid (x <- x +
    (t_{i+1} - t_i) v(x, t_i); one step is ``reflow.one_step``) beside the teacher's.

    A class-conditional map (meta["num_classes"] = K > 0) is evaluated on balanced labels y_i = i mod K: the
    reference, the teacher's rows and the map are all conditioned on y_i (``guidance.bind_labels``,
    ``FlowMap.with_labels``), so the errors are those of Psi(x_T, T, t | y) against Phi(x_T | y)."""
    import torch

    from ..flowmap import teacher_step
    from ..guidance import bind_labels
    from ..metrics import mmd2_exact
    from ..reference import flow_map
    from ..samplers import sample
    from ..samplers.grids import time_grid

    sch = field.schedule
    g = torch.Generator().manual_seed(seed + 2)
    exact = meta["teacher"]["kind"] == "exact"
    if target is not None:
        x_T = target.marginal(sch, sch.t_max).sample(n, g)
    else:
        sigma_T = float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
        x_T = torch.randn((n, *meta["data_shape"]), generator=g, dtype=torch.float64) * sigma_T
    k_cls = int(meta.get("num_classes") or 0)
    labels = torch.arange(n) % k_cls if k_cls else None
    if labels is not None:
        field, psi = bind_labels(field, labels), psi.with_labels(labels)
    nfe0 = field.nfe
    if exact:
        rtol = 1e-8 if rtol is None else rtol
        ref, _ = flow_map(field, x_T, sch.t_max, sch.t_min, rtol=rtol, atol=rtol / 100)
        ref_desc = f"the exact PF-ODE flow map (DOP853, rtol {rtol:g})"
    else:
        rtol = 1e-6 if rtol is None else rtol
        ref = sample(field, x_T, "adaptive", rtol=rtol, atol=rtol).x
        ref_desc = f"the teacher's PF-ODE (adaptive Dormand-Prince 5(4), rtol = atol = {rtol:g})"
    ref_nfe = field.nfe - nfe0
    law = target.marginal(sch, sch.t_min) if target is not None else None
    pp = mmd2_exact(ref.reshape(n, -1), law).pp if law is not None else None

    def err(x):
        e = (x.double() - ref).reshape(n, -1).norm(dim=1)
        return float(e.mean()), float(e.quantile(0.9))

    def mmd(x):
        if law is None:
            return {}
        m = mmd2_exact(x.double().reshape(n, -1), law, pp=pp)
        return {"mmd2": m.mmd2, "mmd2_se": m.se}

    rows = [{"sampler": "reference", "nfe": ref_nfe, "err_mean": 0.0, "err_p90": 0.0, **mmd(ref)}]
    if meta["method"] in ("cd", "ctm"):  # the chain a consistency distillation converges to
        grid = time_grid(sch, meta["grid_steps"], meta["resolved"]["grid_kind"])
        chain = x_T.clone()
        calls0 = field.nfe
        for i in range(meta["grid_steps"]):
            chain = teacher_step(field, chain, float(grid[i]), float(grid[i + 1]), meta["solver"])
        em, e90 = err(chain)
        rows.append({"sampler": f"teacher {meta['solver']} x{meta['grid_steps']}", "nfe": field.nfe - calls0,
                     "err_mean": em, "err_p90": e90, **mmd(chain)})
    if meta["method"] != "reflow":  # the teacher at the map's budgets
        for solver in ("ddim", "dpmpp_2m"):
            for k in EVAL_STEPS:
                res = sample(field, x_T, solver, nfe=k, final="step")
                em, e90 = err(res.x)
                rows.append({"sampler": f"teacher {solver}", "nfe": res.nfe, "err_mean": em, "err_p90": e90,
                             **mmd(res.x)})
    samples = {}
    if meta["method"] == "reflow":
        for k in EVAL_STEPS:
            for who, f in (("teacher", field), ("reflow", psi)):
                res = sample(f, x_T, "euler", steps=k, grid_kind="uniform")
                em, e90 = err(res.x)
                rows.append({"sampler": f"{who} euler", "nfe": res.nfe, "err_mean": em, "err_p90": e90,
                             **mmd(res.x)})
                if who == "reflow":
                    samples[k] = res.x
        return {"reference": ref_desc, "reference_nfe": ref_nfe, "n": n, "rows": rows, "samples": samples,
                "x_T": x_T, "ref": ref, "labels": labels}
    for k in EVAL_STEPS:
        for variant, noise in (("chain", False), ("multistep", True)):
            if noise and k == 1:
                continue
            res = sample(psi, x_T, "flow_map", steps=k, noise_reinjection=noise,
                         generator=torch.Generator().manual_seed(seed + 3))
            row = {"sampler": f"flow map {variant}", "nfe": res.nfe, "err_mean": math.nan, "err_p90": math.nan}
            if not noise:
                row["err_mean"], row["err_p90"] = err(res.x)
                samples[k] = res.x
            rows.append({**row, **mmd(res.x)})
    return {"reference": ref_desc, "reference_nfe": ref_nfe, "n": n, "rows": rows, "samples": samples, "x_T": x_T,
            "ref": ref, "labels": labels}


def _figures(args, meta, run_, ev) -> list:
    from ..plots import loss_curve, sample_panels

    written = []
    if run_.history:
        name = f"loss.{args.format}"
        loss_curve(run_.history, os.path.join(args.out, name),
                   title=f"distill {meta['method']} from {args.teacher}"
                         + (f" ({meta['solver']} teacher)" if meta["method"] in ("cd", "ctm") else ""))
        written.append(name)
    if meta["data_shape"] == [2]:
        name = f"samples.{args.format}"
        panels = {"reference": ev["ref"], **{f"{k}": ev["samples"][k] for k in EVAL_STEPS}}
        what = "reflow field, {k} Euler step{s}" if meta["method"] == "reflow" else "flow map, {k} call{s} (chain)"
        titles = {"reference": "reference map Phi(x_T)",
                  **{f"{k}": what.format(k=k, s="s" if k > 1 else "") for k in EVAL_STEPS}}
        sample_panels(panels, os.path.join(args.out, name), titles)
        written.append(name)
    return written


def run(args, parser) -> int:
    _check_options(args, parser)
    C.set_threads(args, parser)
    C.check_figure_options(args, parser)
    field, x, teacher_desc, target, data_name, student = _teacher(args, parser)
    _resolve_defaults(args, student)
    meta = _meta(args, field, x, teacher_desc, data_name, student)
    try:
        run_ = _build_run(meta, field, x, args.log_every, student)
    except ValueError as exc:
        parser.error(str(exc))
    meta["resolved"] = run_.resolved
    ckpt = os.path.join(args.out, "checkpoint.pt")
    if args.resume:
        _resume(args, parser, run_, meta, ckpt)
    C.prepare_out(args, parser, ["checkpoint.pt", "checkpoint.pt.tmp", "distill_log.csv", "summary.json",
                                 *C.figure_names("loss", "samples")], keep=("checkpoint.pt",) if args.resume else ())
    if meta["method"] == "reflow":
        import torch

        from ..training import build_network

        with torch.random.fork_rng(devices=[]):  # a network built to be counted leaves the random state alone
            net_name, n_par = "MLPScore (velocity)", sum(p.numel() for p in build_network(reflow_train_meta(meta))
                                                         .parameters())
    elif student is not None:
        net_name = (f"TwoTimeDiT (the teacher's {student['network']['model']} + an end-time embedding"
                    + (f", {student['num_classes']} classes" if student["num_classes"] else "") + ")")
        n_par = sum(p.numel() for p in run_.psi.net.parameters())
    else:
        net_name, n_par = "TwoTimeMLP", sum(p.numel() for p in run_.psi.net.parameters())
    how = {"ct": f"no teacher: data and reference only, curriculum {meta['ct_s0']}..{meta['ct_s1']} intervals, "
                 f"{getattr(run_, 'grid_kind', None)} grid",
           "meanflow": "MeanFlow distillation: v = the teacher's velocity, one call per step",
           "shortcut": "shortcut model, flow matching on the teacher's velocity",
           "reflow": f"{meta['rounds']} round(s) of {args.steps // (meta['rounds'] or 1)} steps, each coupling "
                     f"{meta['n_train']:,} noise samples by RK4 x{REFLOW_COUPLE_STEPS}"}.get(
        meta["method"], f"{meta['solver']} step, {meta['grid_steps']}-step {getattr(run_, 'grid_kind', None)} grid")
    print(f"distill {meta['method']} from {args.teacher} ({teacher_desc['kind']} teacher, {how}) into {net_name} "
          f"({n_par:,} parameters); schedule {meta['schedule']['name']}; from step {run_.step} to {args.steps}",
          flush=True)
    if student is not None:
        print(f"the student starts as {_student_init(student)}"
              + (f"; each x_0 is distilled with its class label ({meta['num_classes']} classes)"
                 if meta["num_classes"] else ""), flush=True)
    t0 = time.perf_counter()

    def on_log(rec):
        rnd = f"  round {rec['round']}" if "round" in rec else ""
        print(f"step {rec['step']:6d}{rnd}  loss {rec['loss']:.6f}  teacher calls {run_.teacher_calls}  "
              f"{time.perf_counter() - t0:.1f} s", flush=True)

    run_.run(args.steps, on_log=on_log, ckpt_every=args.ckpt_every, on_checkpoint=lambda r: _save(ckpt, meta, r))
    _save(ckpt, meta, run_)
    train_s = time.perf_counter() - t0
    learned = run_.field() if meta["method"] == "reflow" else run_.flow_map()
    ev = evaluate(learned, field, target, meta, args.eval_n, args.seed, args.ref_rtol)
    rows = ev["rows"]
    _print_evaluation(args, meta, run_, ev, train_s)
    written = ["checkpoint.pt"]
    if run_.history:
        C.write_csv(os.path.join(args.out, "distill_log.csv"), run_.history)
        written.append("distill_log.csv")
    summary = {"command": "diffusion-lab distill", "settings": {**meta, "steps": args.steps, "quick": args.quick,
                                                                 "eval_n": args.eval_n, "ref_rtol": args.ref_rtol},
               "student_init": _student_init(student),
               "teacher_calls": run_.teacher_calls, "teacher_evals": _teacher_evals(run_, meta),
               "teacher_calls_per_step": run_.teacher_calls / max(run_.step, 1),
               "final_loss": run_.history[-1]["loss"] if run_.history else None,
               "evaluation": {"reference": ev["reference"], "reference_nfe": ev["reference_nfe"], "n": ev["n"],
                              "law": "exact p_t_min" if target is not None else None,
                              "labels": (f"balanced, y_i = i mod {meta['num_classes']}" if ev["labels"] is not None
                                         else None), "rows": rows},
               "seconds_this_run": train_s, "versions": C.versions()}
    C.write_json(os.path.join(args.out, "summary.json"), summary, default=str)
    written.append("summary.json")
    if not args.no_plot:
        from ..plots import style

        with style(dpi=args.dpi):
            written += _figures(args, meta, run_, ev)
    C.wrote(written, args.out, f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _student_init(student) -> str | None:
    """How a DiT student starts: FlowMap(TwoTimeDiT.from_dit(teacher)) is the teacher's DDIM step when the teacher
    predicts with the EDM preconditioning (the map's own), else only the teacher's weights."""
    if student is None:
        return None
    if student["prediction"] == "edm":
        return "the teacher's DDIM step (its DiT, EDM preconditioning, zero end-time embedding)"
    return (f"the teacher's weights; not its DDIM step: the teacher predicts {student['prediction']!r}, the map's "
            "network the EDM-preconditioned F")


def _teacher_evals(run_, meta) -> int:
    """Per-sample teacher evaluations: the trainer's count where it keeps one (MeanFlow: calls x batch; shortcut:
    calls x its flow-matching rows; reflow: calls x coupled samples), else calls x batch."""
    return int(getattr(run_, "teacher_evals", run_.teacher_calls * meta["batch"]))


def _print_evaluation(args, meta, run_, ev, train_s) -> None:
    rows = ev["rows"]
    has_mmd = "mmd2" in rows[0]
    print(f"step {run_.step}: {run_.teacher_calls} teacher calls ({_teacher_evals(run_, meta):,} teacher "
          f"evaluations), {train_s:.1f} s; evaluated on {ev['n']} x_T against {ev['reference']}")
    hdr = f"{'sampler':22s} {'NFE':>4s} {'err mean':>10s} {'err p90':>10s}" + (
        f" {'MMD^2':>10s} {'SE':>8s}" if has_mmd else "")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        em = "-" if math.isnan(r["err_mean"]) else f"{r['err_mean']:.4f}"
        e9 = "-" if math.isnan(r["err_p90"]) else f"{r['err_p90']:.4f}"
        print(f"{r['sampler']:22s} {r['nfe']:4d} {em:>10s} {e9:>10s}"
              + (f" {r['mmd2']:10.2e} {r['mmd2_se']:8.1e}" if has_mmd else ""))
    sys.stdout.flush()
