"""Where a learned ring8 score is wrong, what it costs in KL, and whether sampler rankings survive on it.

An MLP (diffusion_lab.models.MLPScore, hidden 128, 3 residual blocks) is trained on 100,000 ring8 samples under the
VP-linear schedule by the best measured recipe, ``experiments.ring8_recipes.ring8_recipe()`` (eps-prediction, 7,000
steps of batch 1,024, cosine learning rate with warm-up, training times half uniform and half drawn by a 500-step
pilot's eps-space error). At three stages of that one run (steps 1,000, 3,000 and 7,000; EMA weights):

- the score-error profile e(t) = E_{p_t} ||s_theta - grad log p_t||^2 with its Monte-Carlo SE (24 Gauss-Legendre nodes
  in log-SNR, exact samples of p_t; ``diagnostics.score_error_profile``), and its eps-space version sigma^2 e(t);
- the KL bound KL(p_{t_min} || q_theta) <= KL(p_{t_max} || pi) + 1/2 int g^2 e dt (Song, Durkan, Murray & Ermon
  2021, Thm 1) against the truth from the Fokker-Planck solution of the learned reverse SDE from the exact p_{t_max}
  (pi = p_{t_max}, so the first term is 0; ``diagnostics.kl_bound``), and the same truth for the exact field (the
  grid's own floor);
- for the final network, the sampler error split into network + discretisation (``decompose_sampler_error``) for
  heun, dpmpp_2m, unipc and em at NFE 10 and 50, next to the same samplers on the exact field: does the ranking
  survive? (``experiments.learned_ranking`` asks the same of seven samplers on two targets, with Kendall's tau.)

The trained networks are cached in ``--cache`` (default results/cache, shared with experiments.learned_ranking:
the same run serves both).

    python -m experiments.score_error [--out docs/figures] [--quick] [--checkpoint PATH] [--cache DIR]
"""
from __future__ import annotations

import torch

from diffusion_lab import diagnostics as Dg
from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.targets import ring8

from . import _common
from .ring8_recipes import RECIPE_STAGES, _model_kwargs, fit_stages, ring8_recipe

SAMPLERS = ("heun", "dpmpp_2m", "unipc", "em")
NFES = (10, 50)
DEFAULT_CACHE = "results/cache"


def recipe(quick: bool) -> dict:
    """``ring8_recipe()``; quick: 150 steps of batch 256 with 30 warm-up steps."""
    return dict(ring8_recipe(), steps=150, batch=256, warmup=30) if quick else ring8_recipe()


def train_stages(stages, quick: bool, seed: int, cache=None):
    """One run of ``recipe(quick)`` on ring8 samples with the EMA network kept at each stage; returns
    ([(step, net, CPU seconds up to it, pilot included)], sigma_data, recipe, data)."""
    data = ring8().sample(20_000 if quick else 100_000, torch.Generator().manual_seed(seed), dtype=torch.float32)
    r = recipe(quick)
    snaps, sd = fit_stages(r, data, seed, stages, target=ring8(), cache=cache)
    return snaps, sd, r, data


def save_checkpoint(path: str, net, sigma_data: float, r: dict, data, seed: int, step: int) -> None:
    """The final EMA network as a training checkpoint that ``diffusion-lab diagnose`` / ``compare --checkpoint`` read
    (``training.load_checkpoint``): the EMA weights stand for both the raw and the EMA model; it cannot be resumed."""
    sch = S.VPLinear()
    meta = {"data": "ring8", "data_desc": "ring8 samples", "n_train": int(data.shape[0]), "seed": seed,
            "conditional": False, "num_classes": 0, "data_shape": [2], "model": "mlp",
            "model_kwargs": _model_kwargs(dict(r), data), "schedule": sch.settings(), "prediction": r["prediction"],
            "weighting": r["weighting"], "time_sampler": r["time_sampler"], "sigma_data": sigma_data,
            "batch": r["batch"], "lr": r["lr"], "warmup": r["warmup"], "ema": r["ema"], "grad_clip": None,
            "bf16": False, "world_size": 1, "recipe": "experiments.ring8_recipes.ring8_recipe()"}
    state = net.state_dict()
    T.save_checkpoint(path, {"format": T.CHECKPOINT_FORMAT, "meta": meta, "step": int(step), "model": state,
                             "ema": {"module": state, "updates": int(step), "decay": float(r["ema"]),
                                     "warmup": True}})


def run(quick: bool = False, seed: int = 0, checkpoint: str | None = None, cache=DEFAULT_CACHE):
    torch.set_num_threads(1)
    sch = S.VPLinear()
    tg = ring8()
    stages = (50, 150) if quick else RECIPE_STAGES
    fp = dict(cells=48 if quick else 96, half_width=5.0, steps=30 if quick else 100)
    prof_kw = dict(n_times=12 if quick else 24, n=500 if quick else 2000, seed=seed)
    trained, sigma_data, r, data = train_stages(stages, quick, seed, cache)
    if checkpoint:
        save_checkpoint(checkpoint, trained[-1][1], sigma_data, r, data, seed, trained[-1][0])
    rows, profiles = [], {}
    for step, net, secs in trained:
        field = T.learned_field(net, sch, r["prediction"], sigma_data=sigma_data)
        prof = Dg.score_error_profile(field, tg, **prof_kw)
        kb = Dg.kl_bound(field, tg, profile=prof, **fp)
        ints = prof.integrals()
        rows.append({"stage": f"step {step}", "step": step, "train_cpu_s": secs, "kl_truth": kb.truth,
                     "kl_bound": kb.bound, "kl_bound_se": kb.bound_se, "ratio": kb.ratio, "fp_tv": kb.tv,
                     "I_likelihood": ints["likelihood"]["value"], "I_eps": ints["eps"]["value"],
                     "I_eps_se": ints["eps"]["se"], "e_t_min": float(prof.e[0]), "e_eps_t_min": float(prof.e_eps[0])})
        profiles[step] = prof
    exact_kb = Dg.kl_bound(tg.field(sch), tg, n_times=4, n=50, **fp)
    rows.append({"stage": "exact field", "step": -1, "train_cpu_s": 0.0, "kl_truth": exact_kb.truth,
                 "kl_bound": exact_kb.bound, "kl_bound_se": exact_kb.bound_se, "ratio": float("nan"),
                 "fp_tv": exact_kb.tv, "I_likelihood": 0.0, "I_eps": 0.0, "I_eps_se": 0.0, "e_t_min": 0.0,
                 "e_eps_t_min": 0.0})
    final = T.learned_field(trained[-1][1], sch, r["prediction"], sigma_data=sigma_data)
    n = 1000 if quick else 4000
    dec = {name: Dg.decompose_sampler_error(f, tg, SAMPLERS, NFES, n=n, seed=seed)
           for name, f in (("learned", final), ("exact", tg.field(sch)))}
    dec_rows = [dict(r, field=name) for name, d in dec.items() for r in d["rows"]]
    rank = {name: d["reference"]["ranking"] for name, d in dec.items()}
    rank_dis = {name: d["reference"]["ranking_discretisation"] for name, d in dec.items()}
    survives = Dg.ranking_agreement(dec["exact"]["rows"], dec["learned"]["rows"])
    survives_dis = Dg.ranking_agreement(dec["exact"]["rows"], dec["learned"]["rows"], "discretisation_rank")
    headline = {"kl": {r["stage"]: {"truth": r["kl_truth"], "bound": r["kl_bound"], "ratio": r["ratio"]}
                       for r in rows},
                "ranking_exact": rank["exact"], "ranking_learned": rank["learned"], "ranking_survives": survives,
                "discretisation_ranking_exact": rank_dis["exact"],
                "discretisation_ranking_learned": rank_dis["learned"],
                "discretisation_ranking_survives": survives_dis,
                "mmd2_network": dec["learned"]["reference"]["mmd2_network"],
                "mmd2_network_se": dec["learned"]["reference"]["mmd2_network_se"]}
    settings = {"target": tg.settings(), "schedule": sch.settings(), "model": _model_kwargs(dict(r), data),
                "recipe": dict(r, importance=None), "stages": list(stages), "n_train": int(data.shape[0]),
                "fokker_planck": fp, "profile": prof_kw, "decomposition": {"samplers": SAMPLERS, "nfes": NFES, "n": n},
                "clock": "time.process_time, torch 1 thread, pilot included", "seed": seed, "quick": quick}
    return rows, {"settings": settings, "headline": headline, "profiles": profiles, "decomposition": dec_rows,
                  "final_field": final}


def figure(rows, profiles, dec_rows, path: str) -> None:
    """Left: e(t) (score space) and sigma^2 e(t) (eps space) per stage with +-2 SE bands. Middle: the KL bound against
    the Fokker-Planck truth per stage. Right: total MMD of each sampler on the learned field split into the network's
    part (the adaptive solve) and the discretisation part, next to the exact field's total."""
    from diffusion_lab.plots import _mpl, _save, line_style

    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6), gridspec_kw={"width_ratios": [1.1, 0.8, 1.3]})
    ax = axes[0]
    for i, (step, p) in enumerate(profiles.items()):
        col, mk = line_style(i)
        t = p.t.numpy()
        for y, se, ls, lab in ((p.e, p.se, "-", "score"), (p.e_eps, p.se_eps, "--", "eps")):
            ax.plot(t, y.numpy(), ls, color=col, marker=mk, ms=3, label=f"step {step} ({lab})")
            ax.fill_between(t, (y - 2 * se).clamp_min(1e-12).numpy(), (y + 2 * se).numpy(), color=col, alpha=0.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("E_p_t |error|^2")
    ax.set_title("score error e(t) (solid) and sigma^2 e(t) (dashed)")
    ax.legend(fontsize=7)
    ax = axes[1]
    st = [r for r in rows if r["step"] >= 0]
    x = range(len(st))
    ax.bar([i - 0.2 for i in x], [r["kl_bound"] for r in st], 0.4, yerr=[2 * r["kl_bound_se"] for r in st],
           label="bound: 1/2 int g^2 e dt")
    ax.bar([i + 0.2 for i in x], [r["kl_truth"] for r in st], 0.4, label="truth: KL(p_t_min || q_theta), Fokker-Planck")
    floor = [r for r in rows if r["step"] < 0][0]["kl_truth"]
    top = max(max(r["kl_bound"], r["kl_truth"]) for r in st)
    for i, r in enumerate(st):
        ax.text(i, max(r["kl_bound"], r["kl_truth"]) + 0.03 * top, f"bound/truth {r['ratio']:.2f}", ha="center",
                fontsize=8)
    ax.set_xticks(list(x), [r["stage"] for r in st])
    ax.set_ylim(0, 1.3 * top)
    ax.set_ylabel("nats")
    ax.set_title(f"KL bound vs truth (exact field on the grid: {floor:.1e})")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[2]
    learned = [r for r in dec_rows if r["field"] == "learned"]
    exact = {(r["sampler"], r["nfe_budget"]): r for r in dec_rows if r["field"] == "exact"}
    labels = [f"{r['sampler']}\nNFE {r['nfe_budget']}" for r in learned]
    xs = range(len(learned))
    ax.bar([i - 0.27 for i in xs], [r["mmd_total"] for r in learned], 0.27, label="learned: total")
    ax.bar(list(xs), [r["mmd_network"] for r in learned], 0.27, label="learned: network (adaptive solve)")
    ax.bar([i + 0.27 for i in xs], [r["mmd_discretisation"] for r in learned], 0.27,
           label="learned: discretisation")
    ax.plot(list(xs), [exact[(r["sampler"], r["nfe_budget"])]["mmd_total"] for r in learned], "k_", ms=14, mew=2,
            label="exact field: total")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylim(0, 1.45 * max(r["mmd_total"] for r in learned))  # room for the legend above the bars
    ax.set_ylabel("MMD to the exact p_t_min")
    ax.set_title("learned field: total <= network + discretisation (MMD)")
    ax.legend(fontsize=7, loc="upper right")
    _save(fig, path, dpi=120)


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "docs/figures")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="also save the final EMA network as a checkpoint (for diffusion-lab diagnose / compare)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help=f"store the trained networks in DIR and reuse them (default {DEFAULT_CACHE}, none with "
                        f"--quick; '' for none)")
    args = p.parse_args(argv)
    cache = (None if args.quick else DEFAULT_CACHE) if args.cache is None else (args.cache or None)
    rows, meta = run(args.quick, args.seed, args.checkpoint, cache)
    print(_common.table(rows, ["stage", "train_cpu_s", "I_eps", "kl_bound", "kl_truth", "ratio", "fp_tv"]))
    print(_common.table(meta["decomposition"], ["field", "sampler", "nfe_budget", "mmd2_total", "mmd2_total_se",
                                                "mmd_rank", "mmd2_network", "mmd2_discretisation",
                                                "mmd2_discretisation_se", "discretisation_rank", "flow_error"]))
    h = meta["headline"]
    for what, key in (("total MMD^2", "ranking"), ("discretisation MMD^2", "discretisation_ranking")):
        for b in h[key + "_exact"]:
            agr = h[key + "_survives"][b]
            print(f"{what}, NFE {b}: exact field {' < '.join(h[key + '_exact'][b])}; learned "
                  f"{' < '.join(h[key + '_learned'][b])} (SE-aware). Pairs resolved on the exact field: kept "
                  f"{agr['kept']}, tied on the learned one {agr['tied']}, reversed {agr['reversed']}; resolved on the "
                  f"learned field only {agr['resolved_in_b_only']}")
    _common.write(args.out, "score_error", rows, meta["settings"], h)
    with _common.figure_style(args):
        figure(rows, meta["profiles"], meta["decomposition"], _common.figure(args, "score_error"))
    return h


if __name__ == "__main__":
    main()
