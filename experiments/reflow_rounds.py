"""Reflow straightens the flow: straightness, transport cost and one-step error over reflow rounds 0-3
(Liu, Gong & Liu 2023, "Flow Straight and Fast").

On the rectified-flow schedule (x_t = (1 - t) x_0 + t z, t_min = 1e-3, t_max = 0.999), round 0 is the EXACT field of
the target (the rectified flow of the independent coupling, the paper's 1-rectified flow). Round k >= 1 couples 20,000
noise samples z ~ p_{t_max} with x = Phi^{k-1}(z) (RK4, 64 steps, ``reflow.couple``) and fits a fresh MLP velocity
network (``models.MLPScore``, Adam with cosine decay, EMA 0.999) to the straight line through (t_min, x) and
(t_max, z) (``reflow.train_rectified``). Each round is evaluated on 2,000 held-out z:

- straightness S = int E||(z - x)/(t_max - t_min) - v(Z_t, t)||^2 dt along the round's own trajectories (RK4 with 64
  steps, Simpson's rule; ``reflow.straightness``), and S with 128 steps as a check of its discretisation;
- the transport cost E||z - x||^2 of the round's coupling x = Phi^k(z);
- the one-step Euler sample (``samplers.sample(field, z, "euler", nfe=1)``, NFE 1): MMD^2 against the exact law
  p_{t_min} (``metrics.mmd2_exact``, with standard error) and mean error ||x_hat - Phi^k(z)|| against the round's
  own ODE solution; the same for two Euler steps (NFE 2);
- the MMD^2 of the round's ODE solution Phi^k(z) itself: what each learned round loses in accuracy.

The paper's claims, as measured verdicts: S decreases with k; one-step sampling improves with k; each learned round
costs a little accuracy (the ODE law's MMD^2 grows).

    python -m experiments.reflow_rounds [--out docs/figures] [--json PATH] [--quick] [--targets ring8 bimodal_1d]
"""
from __future__ import annotations

import json
import time

import torch

from diffusion_lab import targets as T
from diffusion_lab.metrics import mmd2_exact
from diffusion_lab.models import MLPScore
from diffusion_lab.reflow import couple, straightness, train_rectified
from diffusion_lab.samplers import sample
from diffusion_lab.schedules import RectifiedFlow

from . import _common

#: per target: network width/depth, training steps per round, learning rate
CONFIGS = {
    "ring8": {"hidden": 64, "depth": 3, "steps": 2000, "lr": 2e-3},
    "bimodal_1d": {"hidden": 32, "depth": 2, "steps": 1500, "lr": 2e-3},
}


def evaluate(field, z, law, pp):
    """The per-round figures of the module docstring for ``field`` on the held-out noise ``z``."""
    st = straightness(field, z, 64)
    st2 = straightness(field, z, 128)
    phi = st2.x
    row = {"S": st2.S, "S_64": st.S, "cost": st2.cost, "ode_vs_rk4_64": float((st.x - phi).norm(dim=1).mean())}
    ode = mmd2_exact(phi, law, pp=pp)
    row.update({"ode_mmd2": ode.mmd2, "ode_mmd2_se": ode.se})
    for nfe in (1, 2):
        res = sample(field, z.clone(), "euler", nfe=nfe, grid_kind="uniform")
        m = mmd2_exact(res.x, law, pp=pp)
        row.update({f"euler{nfe}_mmd2": m.mmd2, f"euler{nfe}_mmd2_se": m.se, f"euler{nfe}_nfe": res.nfe,
                    f"euler{nfe}_err": float((res.x - phi).norm(dim=1).mean())})
    return row


def run_target(name, cfg, rounds, n_train, n_eval, seed):
    sch = RectifiedFlow()
    tg = T.get_target(name)
    law = tg.marginal(sch, sch.t_min)
    pp = mmd2_exact(law.sample(64, generator=torch.Generator().manual_seed(seed + 9)), law).pp
    z_tr = tg.marginal(sch, sch.t_max).sample(n_train, generator=torch.Generator().manual_seed(seed + 1))
    z_ev = tg.marginal(sch, sch.t_max).sample(n_eval, generator=torch.Generator().manual_seed(seed + 2))
    exact = mmd2_exact(law.sample(n_eval, generator=torch.Generator().manual_seed(seed + 3)), law, pp=pp)
    sigma_data = float(tg.sample(20000, generator=torch.Generator().manual_seed(seed + 4)).std())
    field = tg.field(sch)
    rows = [{"target": name, "round": 0, "train_seconds": 0.0, "couple_nfe": 0, "final_loss": float("nan"),
             **evaluate(field, z_ev, law, pp)}]
    for k in range(1, rounds + 1):
        c = couple(field, z_tr, steps=64)
        torch.manual_seed(seed + 100 * k)
        net = MLPScore(tg.dim, hidden=cfg["hidden"], depth=cfg["depth"])
        t0 = time.perf_counter()
        field, hist = train_rectified(net, c, sch, steps=cfg["steps"], batch=256, lr=cfg["lr"], sigma_data=sigma_data,
                                      seed=seed + k)
        secs = time.perf_counter() - t0
        rows.append({"target": name, "round": k, "train_seconds": secs, "couple_nfe": c.nfe,
                     "final_loss": hist[-1]["loss"], **evaluate(field, z_ev, law, pp)})
    return rows, {"exact_mmd2": exact.mmd2, "exact_mmd2_se": exact.se}


def verdicts(rows):
    """The paper's three claims on one target's rows (round 0..K), with the standard errors of the MMD^2 estimates."""
    S = [r["S"] for r in rows]
    e1 = [r["euler1_mmd2"] for r in rows]
    se1 = [r["euler1_mmd2_se"] for r in rows]
    ode = [r["ode_mmd2"] for r in rows]
    return {
        "straightness_decreases": all(b < a for a, b in zip(S, S[1:])),
        "one_step_improves_round1": e1[1] < e1[0] - 2 * se1[0] if len(rows) > 1 else None,
        "one_step_monotone_within_2se": all(b <= a + 2 * max(sa, sb) for a, b, sa, sb in zip(e1, e1[1:], se1, se1[1:])),
        "ode_mmd2_grows_with_learned_rounds": all(b >= a for a, b in zip(ode[1:], ode[2:])) and ode[1] > ode[0],
    }


def figure(rows):
    """Straightness S, the MMD^2 of one Euler step and of each round's ODE solution against the exact law, and the
    one-step error against the round's own ODE, against the reflow round (0 = the exact field); returns the figure."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for name in names:
        rs = [r for r in rows if r["target"] == name]
        k = [r["round"] for r in rs]
        axes[0].semilogy(k, [max(r["S"], 1e-12) for r in rs], "o-", label=name)
        axes[1].semilogy(k, [max(r["euler1_mmd2"], 1e-6) for r in rs], "o-", label=f"{name}: Euler, NFE 1")
        axes[1].semilogy(k, [max(r["ode_mmd2"], 1e-6) for r in rs], "s--", label=f"{name}: ODE (RK4 x128)")
        axes[2].semilogy(k, [r["euler1_err"] for r in rs], "o-", label=name)
    axes[0].set_title("straightness S")
    axes[1].set_title("MMD$^2$ vs exact law (floor 1e-6)")
    axes[2].set_title("1-step error vs the round's own ODE")
    for ax in axes:
        ax.set_xlabel("reflow round k (0 = exact field)")
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return fig


def plot(args, rows, out_path):
    import matplotlib.pyplot as plt

    _common.figure_style(args)
    fig = figure(rows)
    fig.savefig(out_path)
    plt.close(fig)


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "docs/figures")
    p.add_argument("--json", metavar="PATH", help="also write the figures and settings as JSON to PATH")
    p.add_argument("--targets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    n_train, n_eval = (2000, 500) if args.quick else (20000, 2000)
    cfgs = {n: (dict(CONFIGS[n], steps=100) if args.quick else CONFIGS[n]) for n in args.targets}
    rows, floors, verdict = [], {}, {}
    t0 = time.perf_counter()
    for name in args.targets:
        r, fl = run_target(name, cfgs[name], args.rounds, n_train, n_eval, args.seed)
        rows += r
        floors[name] = fl
        verdict[name] = verdicts(r)
    cols = ["target", "round", "S", "cost", "euler1_mmd2", "euler1_mmd2_se", "euler1_err", "euler2_mmd2", "euler2_err",
            "ode_mmd2", "ode_mmd2_se", "train_seconds"]
    print(_common.table(rows, cols))
    for name in args.targets:
        print(f"{name}: exact samples MMD^2 {floors[name]['exact_mmd2']:.2e} +- {floors[name]['exact_mmd2_se']:.1e}; "
              f"verdicts {verdict[name]}")
    settings = {"schedule": RectifiedFlow().settings(), "configs": cfgs, "rounds": args.rounds, "n_train": n_train,
                "n_eval": n_eval, "seed": args.seed, "quick": args.quick, "batch": 256, "couple": "rk4 x64",
                "straightness": "rk4 x128, Simpson", "euler_grid": "uniform",
                "seconds": time.perf_counter() - t0}
    headline = {"verdicts": verdict, "exact_floor": floors, "rows": rows}  # the rows too: the gallery plots the JSON
    _common.write(args.out, "reflow_rounds", rows, settings, headline)
    plot(args, rows, _common.figure(args, "reflow_rounds"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": settings, "headline": headline, "rows": rows, "versions": _common.versions()}, fh,
                      indent=2, default=float)
    return headline


if __name__ == "__main__":
    main()
