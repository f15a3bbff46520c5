"""The variational bounds of exact fields against the exact log-likelihood of the data: log p_0(x) - ELBO(x), per
sample and in mean, for the continuous-time ELBO (Kingma et al. 2021) and the discrete DDPM bound (Ho et al. 2020) with
N = 1000 steps, uniform in t (DDPM's chain) and uniform in log SNR.

For an exact field the continuous gap is the decoder mismatch plus the prior mismatch (``diffusion_lab.elbo``), a few
1e-5 nats here, which the table also estimates directly ("predicted gap", Monte Carlo over z); the discrete bound adds
the Riemann-sum error of its diffusion term, O(1/N) on a log-SNR grid, and much more on the uniform-t grid, whose first
steps near t_min are coarse in log SNR (t_1 = 2 t_min at N = 1000 on VP: SNR halves in one step).

    python -m experiments.elbo_gap [--quick] [--json PATH] [--seed S]

prints the table; --json writes the same figures (committed: benchmarks/results/elbo_gap.json).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from diffusion_lab import elbo as E
from diffusion_lab import schedules as S
from diffusion_lab import targets as T

#: (label, target factory, schedule)
CASES = (
    ("gaussian_2d", T.gaussian_2d, S.VPLinear()),
    ("bimodal_1d", T.bimodal_1d, S.VPLinear()),
    ("ring8", T.ring8, S.VPLinear()),
    ("ring8", T.ring8, S.VPCosine()),
    ("ring8", T.ring8, S.VE()),
    ("overlap_4d_k4", lambda: T.get_target("gmm_overlap", dim=4, components=4), S.VPLinear()),
)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std()) / math.sqrt(v.numel())


def run_case(label, make, sch, n: int, steps: int, seed: int) -> dict:
    tg = make()
    g = torch.Generator().manual_seed(seed)
    x = tg.sample(n, g)
    d = tg.dim
    ln2d = d * math.log(2.0)
    data_var = float(torch.diagonal(tg.covariance()).mean())
    f = tg.field(sch)
    log_p = tg.log_prob(x)
    row = {"target": label, "schedule": sch.name, "d": d, "n": n, "log_p0": float(log_p.mean()),
           "nll_bpd": -float(log_p.mean()) / ln2d}
    t0 = time.perf_counter()
    ex = E.exact_elbo_terms(tg, sch, x, data_var=data_var, n_mc=512, generator=g)
    row["predicted_gap"], row["predicted_gap_se"] = float(ex["gap"][0].mean()), \
        float(torch.sqrt((ex["gap"][1] ** 2).sum())) / n
    runs = {"continuous": E.continuous_elbo(f, x, data_var=data_var, generator=g),
            f"ddpm{steps}_uniform": E.ddpm_bound(f, x, steps, grid_kind="uniform", data_var=data_var, generator=g),
            f"ddpm{steps}_logsnr": E.ddpm_bound(f, x, steps, grid_kind="logsnr", data_var=data_var, generator=g)}
    for key, r in runs.items():
        gap = log_p - r.elbo
        row[f"elbo_{key}"] = float(r.elbo.mean())
        row[f"gap_{key}"], row[f"gap_{key}_se"] = _mean_se(gap)
        row[f"bpd_{key}"] = -float(r.elbo.mean()) / ln2d
        row[f"min_gap_over_se_{key}"] = float((gap / r.se).min())
        row[f"evaluations_{key}"] = r.extra["evaluations"]
        for k, v in r.terms.items():
            row[f"{k}_{key}"] = float(v.mean())
    row["seconds"] = time.perf_counter() - t0
    return row


def run(quick: bool = False, seed: int = 0) -> dict:
    n, steps = (32, 200) if quick else (256, 1000)
    cases = CASES[:3] if quick else CASES
    rows = [run_case(label, make, sch, n, steps, seed) for label, make, sch in cases]
    return {"experiment": "elbo_gap", "rows": rows,
            "settings": {"n": n, "steps": steps, "seed": seed, "continuous": "Gauss-Legendre in log SNR, 32 nodes x 16 "
                         "draws, control variate", "ddpm": "posterior variance, every term, max(2, 256 // N) draws "
                         "per term", "decoder": "Gaussian, variance 1/SNR(t_min)", "prior": "N(0, alpha_T^2 v + "
                         "sigma_T^2), v = the target's mean variance per coordinate", "quick": quick},
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def table(doc: dict) -> str:
    steps = doc["settings"]["steps"]
    keys = ["continuous", f"ddpm{steps}_uniform", f"ddpm{steps}_logsnr"]
    head = (f"{'target':<14}{'sched':<7}{'d':>3}{'log p_0':>10}{'pred. gap':>18}" +
            "".join(f"{'gap ' + k:>28}" for k in keys) + f"{'NLL bpd':>9}" + "".join(f"{'bpd ' + k[:10]:>16}" for k in keys))
    lines = [head]
    for r in doc["rows"]:
        s = (f"{r['target']:<14}{r['schedule']:<7}{r['d']:>3}{r['log_p0']:>10.4f}"
             f"{r['predicted_gap']:>10.2e} +- {r['predicted_gap_se']:.0e}")
        s += "".join(f"{r['gap_' + k]:>18.4f} +- {r['gap_' + k + '_se']:.4f}" for k in keys)
        s += f"{r['nll_bpd']:>9.4f}" + "".join(f"{r['bpd_' + k]:>16.4f}" for k in keys)
        lines.append(s)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 targets, 32 samples, N = 200 (a smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    doc = run(args.quick, args.seed)
    print(table(doc))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"wrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
