"""`diffusion-lab likelihood`: negative log-likelihood through the probability-flow ODE, and with --elbo the
variational bounds (the continuous-time VDM ELBO and the discrete DDPM bound, ``diffusion_lab.elbo``) beside it."""
from __future__ import annotations

import math
import os

from . import _common as C


def add_parser(sub):
    p = sub.add_parser(
        "likelihood",
        help="negative log-likelihood through the PF-ODE (exact divergence or Hutchinson)",
        description=(
            "Compute log p_{t_min}(x) by the instantaneous change of variables along the probability-flow ODE "
            "for samples of an exact target (compared with its closed form), printing the NLL in nats and bits/dim "
            "with its standard error and the NFE. With --out DIR, also writes results.csv (one row per sample: "
            "log p by the ODE, its estimator SE, the closed form where known) and settings.json (the summary, "
            "settings and versions). With --elbo, also the continuous-time ELBO (Kingma et al. 2021) of clean data "
            "x ~ p_0 (exact target) or of the clean training data (checkpoint), a lower bound on log p(x) with a "
            "Gaussian decoder at t_min, in nats and bits/dim with its standard error and terms; --elbo-steps N adds "
            "the discrete DDPM bound (Ho et al. 2020) with N steps; with --out, elbo.csv holds its per-sample rows."
        ),
    )
    C.add_target_schedule(p)
    p.add_argument("--checkpoint", metavar="PATH", default=None,
                   help="a `diffusion-lab train` checkpoint: evaluate its learned field (EMA weights) on noised "
                        "samples of its training data instead (--target/--schedule are then ignored)")
    p.add_argument("--n", type=int, default=256, help="number of samples of p_t_min (default 256)")
    p.add_argument("--divergence", default="exact", choices=("exact", "hutchinson"),
                   help="divergence of the velocity: exact (d backward passes) or Hutchinson's unbiased trace "
                        "estimate (default exact)")
    p.add_argument("--probe", default="rademacher", choices=("rademacher", "gaussian"),
                   help="Hutchinson probe law (default rademacher: the smaller variance)")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per sample (default 8, >= 2)")
    p.add_argument("--rtol", type=float, default=1e-8, help="ODE relative tolerance (default 1e-8; atol = rtol/100)")
    p.add_argument("--elbo", action="store_true",
                   help="also the continuous-time ELBO of clean data (Gauss-Legendre in log SNR) and its terms")
    p.add_argument("--elbo-nodes", type=int, default=32, metavar="K",
                   help="Gauss-Legendre nodes in log SNR for the ELBO's diffusion term (default 32)")
    p.add_argument("--elbo-draws", type=int, default=16, metavar="R",
                   help="noise draws per node (>= 2, for the standard error; default 16)")
    p.add_argument("--elbo-steps", type=int, default=0, metavar="N",
                   help="with --elbo, also the discrete DDPM bound with N steps (default 0: off)")
    p.add_argument("--elbo-grid", default="uniform", choices=("uniform", "logsnr"),
                   help="time grid of the DDPM bound: uniform in t (DDPM's chain; default) or uniform in log SNR")
    C.add_seed(p)
    C.add_out(p, None, help="also write results.csv and settings.json to this folder (default: print only); a "
                            "non-empty folder needs --overwrite")
    C.add_threads(p)
    p.set_defaults(func=run)
    return p


#: Rough count of float64 arrays of --n x (d + 1) numbers alive at the likelihood's peak, besides the Hutchinson
#: probes (one array of --n x d each): the data, the ODE state and the explicit Runge-Kutta stages of the adaptive
#: solver (~7 plus error and dense-output work), the latent, the exact and estimated log-densities.
LIKELIHOOD_COPIES = 16


def _checkpoint_samples(args, g, state):
    """(field, x, exact log p or None, label): the checkpoint's field on its training data noised to t_min."""
    import torch

    from ..targets import TARGETS, get_target
    from ..training import field_from_checkpoint
    from ._learned import train_data

    field = field_from_checkpoint(state)
    schedule, meta = field.schedule, state["meta"]
    x0, _, desc = train_data(meta["data"], args.n, args.seed, False)
    x0 = x0[torch.randperm(x0.shape[0], generator=g)[: args.n]].to(torch.float64)
    args._x0 = x0  # the clean data, for --elbo
    tt = torch.tensor(schedule.t_min, dtype=torch.float64)
    x = schedule.alpha(tt) * x0 + schedule.sigma(tt) * torch.randn(x0.shape, dtype=torch.float64, generator=g)
    label = f"checkpoint {args.checkpoint} ({meta['model']} on {desc})"
    exact = None
    if meta["data"] in TARGETS:
        target = get_target(meta["data"])
        exact = target.log_prob_t(x.reshape(x.shape[0], -1), schedule.t_min, schedule)
    return field, x, exact, label


def _target_samples(args, g, state=None):
    """(field, x, exact log p, label): the exact field of --target and samples of its p_t_min."""
    from ..schedules import get_schedule
    from ..targets import get_target

    target, schedule = get_target(args.target), get_schedule(args.schedule)
    field = target.field(schedule)
    x = target.marginal(schedule, schedule.t_min).sample(args.n, g)
    exact = target.log_prob_t(x, schedule.t_min, schedule)
    label = f"target {args.target} (d={target.dim}), schedule {args.schedule}"
    return field, x, exact, label


def run(args, parser) -> int:
    import torch

    from ..likelihood import log_likelihood

    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.probes < 1:
        parser.error(f"--probes must be >= 1, got {args.probes}")
    if args.divergence == "hutchinson" and args.probes < 2:
        parser.error(f"--probes must be >= 2 with --divergence hutchinson (the standard error is the spread "
                     f"between probes), got {args.probes}")
    if not 0 < args.rtol < 1:
        parser.error(f"--rtol must be in (0, 1), got {args.rtol}")
    if args.elbo_nodes < 1:
        parser.error(f"--elbo-nodes must be >= 1, got {args.elbo_nodes}")
    if args.elbo_draws < 2:
        parser.error(f"--elbo-draws must be >= 2 (the standard error is their spread), got {args.elbo_draws}")
    if args.elbo_steps < 0 or args.elbo_steps == 1:
        parser.error(f"--elbo-steps must be 0 (off) or >= 2, got {args.elbo_steps}")
    if args.elbo_steps and not args.elbo:
        parser.error("--elbo-steps needs --elbo")
    C.set_threads(args, parser)
    if args.checkpoint and not os.path.exists(args.checkpoint):
        parser.error(f"no checkpoint at {args.checkpoint}")
    state = None
    if args.checkpoint:
        from ..training import load_checkpoint

        try:
            state = load_checkpoint(args.checkpoint)
        except ValueError as exc:
            parser.error(str(exc))
        dim = math.prod(state["meta"]["data_shape"])
    else:
        from ..targets import get_target

        dim = get_target(args.target).dim
    probes = args.probes if args.divergence == "hutchinson" else 0
    C.check_size(parser, "--n", args.n, 8 * (dim + 1), LIKELIHOOD_COPIES + probes,
                 f"the likelihood ODE in dimension {dim}")
    artefacts = ["results.csv", "settings.json"] + (["elbo.csv"] if args.elbo else [])
    if args.out is not None:
        C.prepare_out(args, parser, artefacts)
    g = torch.Generator().manual_seed(args.seed)
    field, x, exact, label = (_checkpoint_samples if args.checkpoint else _target_samples)(args, g, state)
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
    elbo_summary, elbo_rows = (_elbo(args, field, state, g, d) if args.elbo else (None, None))
    if args.out is None:
        return 0
    rows = [{"sample": i, "log_prob": float(res.log_prob[i]), "estimator_se": float(res.se[i]),
             **({"log_prob_exact": float(exact[i])} if exact is not None else {})} for i in range(n)]
    C.write_csv(os.path.join(args.out, "results.csv"), rows)
    summary = {"nll_nats": nll, "nll_bits_per_dim": nll / (d * math.log(2)), "sampling_se": se_mc,
               "estimator_se": se_est, "nfe": res.nfe, "seconds": res.seconds, "t0": res.t0}
    if exact is not None:
        summary["nll_exact_nats"] = -float(exact.mean())
        summary["max_abs_error"] = float((res.log_prob - exact).abs().max())
    if elbo_summary is not None:
        summary["elbo"] = elbo_summary
        C.write_csv(os.path.join(args.out, "elbo.csv"), elbo_rows)
    settings = {"command": "diffusion-lab likelihood", "source": label,
                "checkpoint": os.path.abspath(args.checkpoint) if args.checkpoint else None,
                "target": None if args.checkpoint else args.target, "schedule": None if args.checkpoint else args.schedule,
                "n": n, "divergence": args.divergence, "probe": args.probe, "probes": args.probes, "rtol": args.rtol,
                "seed": args.seed, "summary": summary, "versions": C.versions()}
    if args.elbo:
        settings.update({"elbo_nodes": args.elbo_nodes, "elbo_draws": args.elbo_draws, "elbo_steps": args.elbo_steps})
    C.write_json(os.path.join(args.out, "settings.json"), settings)
    C.wrote(artefacts, args.out)
    return 0


def _elbo(args, field, state, g, d):
    """The continuous ELBO (and with --elbo-steps the DDPM bound) of clean data, printed; (summary, per-sample rows).

    Exact target: x0 ~ p_0 drawn after the PF-ODE's samples and probes, the exact marginal p_{t_max} as the prior
    (as for the PF-ODE), compared with the closed form log p_0(x0). Checkpoint: the clean training data whose noised
    copies the PF-ODE evaluated, prior N(0, (alpha_T^2 sigma_data^2 + sigma_T^2) I)."""
    import torch

    from ..elbo import continuous_elbo, ddpm_bound
    from ..targets import TARGETS, get_target

    sch = field.schedule
    if state is None:
        target = get_target(args.target)
        x0 = target.sample(args.n, g)
        prior = target.marginal(sch, sch.t_max).log_prob
        data_var = float(torch.diagonal(target.covariance()).mean())
        exact = target.log_prob(x0)
        what = f"{args.n} samples x0 of p_0, prior = exact p_t_max"
    else:
        meta = state["meta"]
        x0 = args._x0.reshape(-1, *meta["data_shape"])
        prior, data_var = None, float(meta["sigma_data"]) ** 2
        exact = get_target(meta["data"]).log_prob(x0.reshape(x0.shape[0], -1)) if meta["data"] in TARGETS else None
        what = f"{x0.shape[0]} clean training samples, prior N(0, alpha_T^2 sigma_data^2 + sigma_T^2)"
    n, ln2d = x0.shape[0], d * math.log(2.0)
    runs = [("continuous", continuous_elbo(field, x0, n_t=args.elbo_nodes, n_rep=args.elbo_draws, prior=prior,
                                           data_var=data_var, generator=g))]
    if args.elbo_steps:
        runs.append((f"ddpm N={args.elbo_steps}", ddpm_bound(field, x0, args.elbo_steps, grid_kind=args.elbo_grid,
                                                            prior=prior, data_var=data_var, generator=g)))
    print(f"ELBO of clean data ({what}; Gaussian decoder of variance sigma^2/alpha^2 at t_min):")
    summary, rows = {}, [{"sample": i} for i in range(n)]
    for kind, r in runs:
        s = r.summary()
        terms = ", ".join(f"{k} {float(v.mean()):.4f}" for k, v in r.terms.items())
        print(f"-ELBO {kind:<12} {-s['elbo_nats']:.6f} nats  ({s['neg_elbo_bits_per_dim']:.6f} bits/dim)  +- "
              f"{s['se']:.4f} (sampling SE), estimator SE {s['estimator_se']:.2e}; terms (nats): {terms}; "
              f"{r.extra['evaluations']:,} model evaluations per sample")
        s["terms"] = {k: float(v.mean()) for k, v in r.terms.items()}
        s["evaluations_per_sample"] = r.extra["evaluations"]
        for i in range(n):
            rows[i][f"elbo_{kind.split()[0]}"] = float(r.elbo[i])
            rows[i][f"elbo_{kind.split()[0]}_se"] = float(r.se[i])
        if exact is not None:
            gap = exact - r.elbo
            gse = float(gap.std()) / math.sqrt(n) if n > 1 else float("nan")
            s["gap_nats"], s["gap_se"] = float(gap.mean()), gse
            s["min_gap_over_se"] = float((gap / r.se).min())
            note = ("exact field: >= 0 per sample up to Monte-Carlo error" if state is None else
                    "learned field: >= 0 in mean (Gibbs); per sample the ELBO bounds the model's own log p, not log p_0")
            print(f"   gap log p_0 - ELBO {float(gap.mean()):+.6f} +- {gse:.4f} nats ({float(gap.mean()) / ln2d:+.6f} "
                  f"bits/dim); per sample min gap/SE {s['min_gap_over_se']:+.2f} ({note})")
        summary[kind.split()[0]] = s
    if exact is not None:
        nll0 = -float(exact.mean())
        summary["nll_exact_p0_nats"] = nll0
        print(f"closed form on the same x0: -log p_0 = {nll0:.6f} nats ({nll0 / ln2d:.6f} bits/dim)")
        for i in range(n):
            rows[i]["log_p0_exact"] = float(exact[i])
    return summary, rows
