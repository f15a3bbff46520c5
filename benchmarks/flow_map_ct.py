"""Consistency training without a teacher (CT, improved recipe of Song & Dhariwal 2023) next to consistency
distillation from the exact field (CD, Song et al. 2023) on ring8 under VPLinear: the same ``TwoTimeMLP``, the same
number of optimiser steps, batch and learning rate; evaluated against the exact PF-ODE map and the exact law.

- CD: ``distill(method="cd")``, Heun teacher on the exact field, 18-step log-SNR grid, EMA target 0.95, l2;
- CT: ``distill(teacher=None, method="ct")`` with the published defaults: Karras grid in sigma/alpha, step-count
  curriculum s0 = 10 -> s1 = 1280, lognormal level sampling (P_std = 2, P_mean = -1.1 + log(sigma_data / 0.5)),
  weights 1/(sigmabar_n - sigmabar_{n-1}), pseudo-Huber c = 0.00054 sqrt(D) sigma_data / 0.5, theta- = stopgrad
  theta; ``--ct-s1`` adds a second CT run with a shorter curriculum end s1.

Figures on held-out x_T ~ p_{t_max} (the EMA network, float32): error = mean and 90th percentile of
||Psi(x_T, T, t_min) - Phi_{T -> t_min}(x_T)|| (Phi: ``reference.flow_map``, DOP853); MMD^2 against p_{t_min}
(``metrics.mmd2_exact``) at 1 step and for multistep consistency sampling (noise re-injection) at 2 and 4 steps;
training cost in teacher calls and wall seconds.

    python benchmarks/flow_map_ct.py [--steps S] [--samples N] [--ct-s1 K] [--seed S] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from diffusion_lab import VPLinear, set_threads, targets  # noqa: E402
from diffusion_lab import __version__ as dl_version  # noqa: E402
from diffusion_lab.flowmap import FlowMap, TwoTimeMLP, distill, flow_map_sample  # noqa: E402
from diffusion_lab.metrics import mmd2_exact  # noqa: E402
from diffusion_lab.reference import flow_map  # noqa: E402


def run(args):
    sch, tg = VPLinear(), targets.get_target(args.target)
    field, law = tg.field(sch), tg.marginal(sch, sch.t_min)
    data = tg.sample(20000, generator=torch.Generator().manual_seed(args.seed + 1)).float()
    xT = tg.marginal(sch, sch.t_max).sample(args.samples, generator=torch.Generator().manual_seed(args.seed + 2))
    phi, _ = flow_map(field, xT, sch.t_max, sch.t_min)
    pp = mmd2_exact(phi, law).pp
    runs = [("cd", dict(method="cd", solver="heun", grid_steps=18)), ("ct", dict(method="ct"))]
    if args.ct_s1:
        runs.append((f"ct s1={args.ct_s1}", dict(method="ct", ct_s1=args.ct_s1)))
    rows = []
    for label, kw in runs:
        torch.manual_seed(args.seed)
        psi = FlowMap(TwoTimeMLP(tg.dim, args.hidden, args.depth), sch, sigma_data=float(data.std()))
        t0 = time.perf_counter()
        res = distill(psi, field if kw["method"] == "cd" else None, data, steps=args.steps, batch=args.batch,
                      lr=args.lr, seed=args.seed, **kw)
        secs = time.perf_counter() - t0
        row = {"method": label, "teacher_calls": res.teacher_calls, "seconds": secs,
               "final_loss": res.history[-1]["loss"], "settings": res.settings}
        for k in (1, 2, 4):
            out = flow_map_sample(res.psi_ema, xT.float(), k, noise_reinjection=k > 1,
                                  generator=torch.Generator().manual_seed(args.seed + 3)).x.double()
            m = mmd2_exact(out, law, pp=pp)
            row[f"mmd2_{k}"], row[f"mmd2_se_{k}"] = m.mmd2, m.se
            if k == 1:
                e = (out - phi).norm(dim=1)
                row["err_mean"], row["err_p90"] = float(e.mean()), float(e.quantile(0.9))
        rows.append(row)
    exact = mmd2_exact(phi, law, pp=pp)
    return rows, {"mmd2": exact.mmd2, "se": exact.se}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="ring8")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ct-s1", type=int, default=0, help="also run CT with this final number of intervals")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    if args.steps < 1 or args.samples < 2:
        p.error(f"need steps >= 1 and samples >= 2, got {args.steps}, {args.samples}")
    set_threads(1)
    rows, exact = run(args)
    print(f"{args.target} under VPLinear, {args.steps} steps x batch {args.batch}, TwoTimeMLP({args.hidden}, "
          f"{args.depth}); exact samples MMD^2 {exact['mmd2']:.1e} +- {exact['se']:.1e}")
    head = (f"{'method':<12} {'err 1':>8} {'p90 1':>8} {'MMD2 1':>9} {'MMD2 2+n':>9} {'MMD2 4+n':>9} {'+-SE':>8} "
            f"{'teacher':>8} {'sec':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:<12} {r['err_mean']:>8.4f} {r['err_p90']:>8.4f} {r['mmd2_1']:>9.2e} {r['mmd2_2']:>9.2e} "
              f"{r['mmd2_4']:>9.2e} {r['mmd2_se_1']:>8.1e} {r['teacher_calls']:>8} {r['seconds']:>6.0f}")
    if args.json:
        settings = {"benchmark": "flow_map_ct", **{k: v for k, v in vars(args).items() if k != "json"},
                    "torch": torch.__version__, "diffusion_lab": dl_version, "python": sys.version.split()[0],
                    "platform": platform.platform()}
        with open(args.json, "w") as fh:
            json.dump({"settings": settings, "exact": exact, "rows": rows}, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
