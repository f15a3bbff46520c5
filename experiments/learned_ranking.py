"""Does the ranking of samplers on the exact field survive on a learned one? Measured on ring8 and on an 8-D mixture.

Choices fixed in advance (before any ranking on a learned field was looked at):

- Targets: ring8 (2-D, 8 modes of std 0.3 on a circle of radius 2) and the benchmark suite's 8-D entry
  ``gmm_multiscale(dim=8, components=16)`` (16 components, widths over a factor 10, weights down to 0.01, mildly
  anisotropic); VP-linear schedule.
- Training: one fixed recipe, ``ring8_recipes.ring8_recipe()`` (an MLP 128 wide with 3 residual blocks,
  eps-prediction, 7,000 steps of batch 1,024, cosine learning rate from 2e-3 with 200 warm-up steps, EMA 0.999,
  training times half uniform and half by a 500-step pilot's sigma^2 e(t)), on 100,000 exact samples drawn with the
  seed; the EMA network at the last step is measured. The 8-D mixture's network runs the same recipe over 3,000
  steps (the cosine decay over 3,000): on a shared machine the 7,000-step run took 620 CPU seconds for ring8, and the
  budget of this experiment did not allow a second one; the cut was made before any ranking on a learned 8-D field
  at full size was seen.
- Samplers: heun, dpmpp_2m, unipc, em, ddim, dpm_solver_3 and ipndm at NFE budgets 10 and 50 (log-SNR grids), from
  the same 4,000 exact samples of p_{t_max} on both fields (em's noise is shared too).
- Error: the unbiased MMD^2 to the exact p_{t_min} with the exact law's kernel bandwidth, split into the network's part
  (the same field solved by adaptive Dormand-Prince at rtol 1e-6) and the discretisation part (paired two-sample MMD^2
  between the sampler and that solve; ``diagnostics.decompose_sampler_error``).
- Rankings: samplers ordered by their MMD^2 on each field; agreement by Kendall's tau-b (Kendall 1945) between the
  exact-field and learned-field orders, with a Monte-Carlo standard error from a paired bootstrap of the
  U-statistics' first-order projections (2,000 replicates; ``diagnostics.ranking_kendall``). ``tau_noise`` is the
  tau between two independent replicates of one field: what Monte-Carlo noise alone does to identical rankings.
  Every pair of samplers whose order changes is labelled "reversed" when the difference is beyond 2 standard errors
  (paired) on both fields, else "swapped within noise". The same for the discretisation column, where the learned
  field's own converged law is the reference.

    python -m experiments.learned_ranking [--out benchmarks/results] [--json PATH] [--cache DIR] [--quick]

The trained networks are cached in ``--cache`` (default results/cache, shared with experiments.score_error), so a
rerun costs only the sampling (about two minutes).
"""
from __future__ import annotations

import json
import time

import torch

from diffusion_lab import diagnostics as Dg
from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.targets import gmm_multiscale, ring8

from . import _common
from .ring8_recipes import RECIPE_STAGES, fit_stages, ring8_recipe

SAMPLERS = ("heun", "dpmpp_2m", "unipc", "em", "ddim", "dpm_solver_3", "ipndm")
NFES = (10, 50)
TARGETS = {"ring8": ring8, "multiscale_8d_k16": lambda: gmm_multiscale(dim=8, components=16)}
DEFAULT_CACHE = "results/cache"


#: Training steps per target (``ring8_recipe()`` otherwise); see the module docstring.
STEPS = {"multiscale_8d_k16": 3000}


def recipe(quick: bool, name: str = "ring8") -> dict:
    """The training recipe: ``ring8_recipe()`` with ``STEPS[name]`` steps where given (quick: 100 steps of batch
    256, 20 warm-up steps)."""
    if quick:
        return dict(ring8_recipe(), steps=100, batch=256, warmup=20)
    return dict(ring8_recipe(), steps=STEPS[name]) if name in STEPS else ring8_recipe()


def stages(quick: bool, name: str = "ring8") -> tuple:
    """The snapshot steps of the training run (the last one is measured here; experiments.score_error uses all of
    ring8's, so the one run serves both)."""
    if quick:
        return (100,)
    return (STEPS[name],) if name in STEPS else RECIPE_STAGES


def train(name: str, quick: bool, seed: int, cache):
    """The learned field of target ``name`` (cached), its training CPU seconds and its settings."""
    tg = TARGETS[name]()
    data = tg.sample(20_000 if quick else 100_000, torch.Generator().manual_seed(seed), dtype=torch.float32)
    r = recipe(quick, name)
    snaps, sd = fit_stages(r, data, seed, stages(quick, name), target=tg, cache=cache)
    step, net, cpu = snaps[-1]
    return T.learned_field(net, S.VPLinear(), r["prediction"], sigma_data=sd), cpu, step


def measure(name: str, quick: bool, seed: int, cache, n_boot: int = 2000, log=print) -> dict:
    """Train (or load) the network of target ``name`` and measure every sampler on the exact and the learned field;
    returns the target's block of the headline."""
    import hashlib
    import os

    sch = S.VPLinear()
    tg = TARGETS[name]()
    path = None
    if cache:  # the block of a finished measurement, reused as it is
        key = json.dumps([name, quick, seed, n_boot, recipe(quick, name), list(SAMPLERS), list(NFES)], sort_keys=True,
                         default=str)
        path = os.path.join(cache, f"block-{name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.json")
        if os.path.isfile(path):
            with open(path) as fh:
                return json.load(fh)
    c0 = time.process_time()
    learned, train_cpu, step = train(name, quick, seed, cache)
    log(f"{name}: network ready ({train_cpu:.0f} CPU s of training, {time.process_time() - c0:.0f} s here)")
    n = 300 if quick else 4000
    x_T = tg.marginal(sch, sch.t_max).sample(n, torch.Generator().manual_seed(seed + 1000))
    prof = Dg.score_error_profile(learned, tg, n_times=6 if quick else 16, n=200 if quick else 1000, seed=seed)
    lik, lik_se = prof.integral("likelihood")
    dec = {}
    for field_name, f in (("exact", tg.field(sch)), ("learned", learned)):
        c0 = time.process_time()
        dec[field_name] = Dg.decompose_sampler_error(f, tg, SAMPLERS, NFES, n=n, seed=seed, x_T=x_T)
        log(f"{name}, {field_name} field: {len(dec[field_name]['rows'])} rows in {time.process_time() - c0:.0f} s")
    rows = []
    ex = {(r["sampler"], r["nfe_budget"]): r for r in dec["exact"]["rows"]}
    for r in dec["learned"]["rows"]:
        e = ex[(r["sampler"], r["nfe_budget"])]
        rows.append({"target": name, "sampler": r["sampler"], "nfe_budget": r["nfe_budget"], "nfe": r["nfe"],
                     "exact_total": e["mmd2_total"], "exact_total_se": e["mmd2_total_se"],
                     "exact_discretisation": e["mmd2_discretisation"],
                     "exact_discretisation_se": e["mmd2_discretisation_se"],
                     "learned_total": r["mmd2_total"], "learned_total_se": r["mmd2_total_se"],
                     "learned_network": r["mmd2_network"], "learned_network_se": r["mmd2_network_se"],
                     "learned_discretisation": r["mmd2_discretisation"],
                     "learned_discretisation_se": r["mmd2_discretisation_se"]})
    agreement = {}
    for key, label in (("mmd2_total", "total"), ("mmd2_discretisation", "discretisation")):
        kt = Dg.ranking_kendall(dec["exact"]["rows"], dec["exact"]["projections"][key], dec["learned"]["rows"],
                                dec["learned"]["projections"][key], key, n_boot=n_boot, seed=seed)
        for budget, res in kt.items():
            agreement.setdefault(str(budget), {})[label] = res
    for r in rows:
        for label in ("total", "discretisation"):
            res = agreement[str(r["nfe_budget"])][label]
            r[f"rank_exact_{label}"] = res["order_a"].index(r["sampler"]) + 1
            r[f"rank_learned_{label}"] = res["order_b"].index(r["sampler"]) + 1
    ref = dec["learned"]["reference"]
    block = {"target": tg.settings(), "train_cpu_s": train_cpu, "train_steps": step,
            "kl_score_term": 0.5 * lik, "kl_score_term_se": 0.5 * lik_se,
            "mmd2_network": ref["mmd2_network"], "mmd2_network_se": ref["mmd2_network_se"],
            "mmd2_exact_adaptive": dec["exact"]["reference"]["mmd2_network"],
            "mmd2_exact_adaptive_se": dec["exact"]["reference"]["mmd2_network_se"],
            "adaptive_nfe": {"exact": dec["exact"]["reference"]["nfe"], "learned": ref["nfe"]},
            "mmd_bandwidth": ref["mmd_bandwidth"], "n": n, "rows": rows, "agreement": agreement,
            "recipe": dict(recipe(quick, name), importance=None)}
    if path:
        from diffusion_lab._io import atomic_write

        def write(tmp):
            with open(tmp, "w") as fh:
                json.dump(block, fh, default=float)

        os.makedirs(cache, exist_ok=True)
        atomic_write(path, write)
        with open(path) as fh:  # the same (JSON) numbers whether measured now or read back
            block = json.load(fh)
    return block


def verdict(block: dict, budget: str, label: str = "total") -> str:
    """One line: tau with its SE and noise level, and the pairs whose order changed."""
    a = block["agreement"][budget][label]
    changed = [p for p in a["pairs"] if p["label"] != "kept"]
    rev = [p["pair"].replace("|", " vs ") for p in changed if p["label"] == "reversed"]
    noise = [p["pair"].replace("|", " vs ") for p in changed if p["label"] != "reversed"]
    return (f"tau = {a['tau']:.2f} +- {a['tau_se']:.2f} (identical rankings under this noise: "
            f"{a['tau_noise_a']:.2f} exact, {a['tau_noise_b']:.2f} learned); "
            f"{len(rev)} pair(s) reversed beyond 2 SE{': ' + ', '.join(rev) if rev else ''}; "
            f"{len(noise)} swapped within noise")


def run(quick: bool = False, seed: int = 0, cache=DEFAULT_CACHE, targets=None, n_boot: int | None = None):
    torch.set_num_threads(1)
    n_boot = (400 if quick else 2000) if n_boot is None else n_boot
    names = list(targets or TARGETS)
    blocks = {name: measure(name, quick, seed, cache, n_boot) for name in names}
    rows = [r for b in blocks.values() for r in b["rows"]]
    headline = {"targets": blocks,
                "summary": {name: {b: {label: {k: blocks[name]["agreement"][b][label][k]
                                                for k in ("tau", "tau_se", "tau_ci", "tau_noise_a", "tau_noise_b",
                                                          "counts", "order_a", "order_b")}
                                       for label in ("total", "discretisation")}
                                   for b in blocks[name]["agreement"]}
                            for name in names},
                "verdict": {name: {b: {label: verdict(blocks[name], b, label)
                                       for label in ("total", "discretisation")}
                                   for b in blocks[name]["agreement"]}
                            for name in names}}
    settings = {"targets": names, "schedule": S.VPLinear().settings(),
                "recipes": {name: dict(recipe(quick, name), importance=None) for name in names},
                "stages": {name: list(stages(quick, name)) for name in names}, "samplers": list(SAMPLERS), "nfes": list(NFES),
                "n_train": 20_000 if quick else 100_000, "grid_kind": "logsnr", "reference": "adaptive rtol 1e-6",
                "metric": "unbiased MMD^2 to the exact p_t_min, the law's bandwidth", "n_boot": n_boot,
                "rank_margin_se": 2.0, "seed": seed, "quick": quick,
                "clock": "time.process_time, torch 1 thread"}
    return rows, {"settings": settings, "headline": headline}


COLS = ["target", "sampler", "nfe_budget", "exact_total", "exact_total_se", "rank_exact_total", "learned_total",
        "learned_total_se", "rank_learned_total", "learned_network", "learned_discretisation",
        "learned_discretisation_se", "rank_exact_discretisation", "rank_learned_discretisation"]


def figure(headline: dict, path: str | None = None):
    """One panel per (target, NFE budget): each sampler's MMD^2 to the exact law on the exact field and on the learned
    one (+-2 SE), samplers in the exact field's order, with the learned network's own error (the adaptive solve)
    as a band; Kendall's tau in the title. Returns the figure (saved to ``path`` when given)."""
    from diffusion_lab.plots import _mpl, _save

    plt = _mpl()
    blocks = headline["targets"]
    budgets = list(next(iter(blocks.values()))["agreement"])
    fig, axes = plt.subplots(len(blocks), len(budgets), figsize=(6.2 * len(budgets), 3.9 * len(blocks)),
                             squeeze=False)
    for i, (name, b) in enumerate(blocks.items()):
        for j, budget in enumerate(budgets):
            ax = axes[i][j]
            a = b["agreement"][budget]["total"]
            by = {r["sampler"]: r for r in b["rows"] if str(r["nfe_budget"]) == budget}
            order = a["order_a"]
            xs = range(len(order))
            ax.errorbar([x - 0.12 for x in xs], [by[s]["exact_total"] for s in order],
                        yerr=[2 * by[s]["exact_total_se"] for s in order], fmt="o", color="k", ms=5, capsize=2,
                        label="exact field")
            ax.errorbar([x + 0.12 for x in xs], [by[s]["learned_total"] for s in order],
                        yerr=[2 * by[s]["learned_total_se"] for s in order], fmt="s", color="C3", ms=5, capsize=2,
                        label="learned field")
            net, se = b["mmd2_network"], b["mmd2_network_se"]
            ax.axhspan(net - 2 * se, net + 2 * se, color="C3", alpha=0.15, label="learned network (adaptive solve)")
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.set_yscale("symlog", linthresh=1e-4)
            ax.set_xticks(list(xs), [f"{s}\n({a['order_b'].index(s) + 1})" for s in order], fontsize=7)
            ax.set_ylabel("MMD^2 to the exact p_t_min")
            ax.set_title(f"{name}, NFE {budget}: tau = {a['tau']:.2f} +- {a['tau_se']:.2f} "
                         f"(noise alone {a['tau_noise_a']:.2f})", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    fig.supxlabel("samplers in the exact field's order (rank on the learned field in brackets)", fontsize=9)
    fig.tight_layout()
    if path:
        _save(fig, path, dpi=120)
    return fig


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "benchmarks/results")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results (JSON) to PATH")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help=f"store the trained networks in DIR and reuse them (default {DEFAULT_CACHE}, none with "
                        f"--quick; '' for none)")
    p.add_argument("--targets", default=None, help=f"comma-separated subset of {','.join(TARGETS)}")
    args = p.parse_args(argv)
    targets = args.targets.split(",") if args.targets else None
    for t in targets or ():
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    cache = (None if args.quick else DEFAULT_CACHE) if args.cache is None else (args.cache or None)
    rows, meta = run(args.quick, args.seed, cache, targets)
    print(_common.table(rows, COLS))
    h = meta["headline"]
    for name, per in h["verdict"].items():
        b = h["targets"][name]
        print(f"\n{name}: network MMD^2 {b['mmd2_network']:.3g} +- {b['mmd2_network_se']:.2g}, 1/2 int g^2 e dt "
              f"{b['kl_score_term']:.3g}, {b['train_cpu_s']:.0f} CPU s of training")
        for budget, v in per.items():
            for label, line in v.items():
                s = h["summary"][name][budget][label]
                print(f"  NFE {budget}, {label}: exact {' < '.join(s['order_a'])}; learned "
                      f"{' < '.join(s['order_b'])}\n    {line}")
    _common.write(args.out, "learned_ranking", rows, meta["settings"], h)
    if args.json:
        from diffusion_lab._io import atomic_write

        doc = {"experiment": "learned_ranking", "settings": meta["settings"], "headline": h,
               "versions": _common.versions()}

        def write_json(tmp):
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=2, default=float)

        atomic_write(args.json, write_json)
    with _common.figure_style(args):
        figure(h, _common.figure(args, "learned_ranking"))
    return h


if __name__ == "__main__":
    main()
