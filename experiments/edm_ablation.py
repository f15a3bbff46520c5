"""EDM's sampler ablation in miniature: Euler vs Heun, VP / VE / EDM time discretisations and rho in {1, 3, 7} at
matched NFE on exact 2-D mixtures (Karras et al. 2022, Fig. 2 / Table 2 shape).

Every configuration integrates the same PF-ODE between the same noise levels sigmabar = sigma/alpha in
[0.002, 80] (EDM's range) from the same x_T, so all are compared on one law and one flow map. EDM's own grids map
onto (schedule, ``time_grid`` kind) as follows; the ODE is integrated in the schedule's own (x, t) (coords='t'):

    "VP, uniform t"   VPLinear (beta 0.1..20), uniform t grid: EDM's VP baseline t_i = 1 + i/(N-1) (eps_s - 1),
                      eps_s = 1e-3, here with t in [t(0.002), t(80)] = [4.0e-5, 0.934] so the end points match;
    "VE, geometric"   VE with sigma(t) = 0.002 (80/0.002)^t, uniform t grid = geometric sigma (EDM's VE grid); EDM's
                      VE baseline integrates in t = sigma^2, ours in t ~ log sigma (the ODE variable differs);
    "EDM, rho=R"      EDM schedule sigma(t) = t, s = 1, karras grid sigma_i^(1/R) uniform (EDM eq. 5), R in {1, 3, 7};
    "EDM, geometric"  EDM schedule with the log-SNR grid (geometric sigma, the rho -> inf limit): the VE grid with
                      EDM's ODE variable, which separates the grid's effect from the ODE parameterisation's.

Heun ends with an Euler step (EDM's Algorithm 1), so N Heun steps cost 2N - 1 NFE and Euler takes N = NFE steps:
NFE in {9, 17, 35, 71, 141} matches Heun's N in {5, 9, 18, 36, 71} (35 NFE = EDM's CIFAR-10 setting).
Errors, on the state xbar = x/alpha at sigmabar = 0.002: the mean terminal error ||xbar - Phi(xbar_T)|| against
the exact flow map (``reference.flow_map``, DOP853 at rtol 1e-10), and the sliced W2 to exact samples of p_0.002
with its Monte-Carlo floor. Two targets: ring8 with component std 0.3 (smooth) and 0.05 (sharp modes, closer to
the regime EDM tuned rho = 7 for: most of the curvature is at small sigma).

    python -m experiments.edm_ablation [--out results/experiments] [--quick]
"""
from __future__ import annotations

import math

import torch

from diffusion_lab import schedules as S
from diffusion_lab.metrics import mean_error, sliced_w2, sliced_w2_floor
from diffusion_lab.reference import flow_map
from diffusion_lab.samplers import sample, time_grid
from diffusion_lab.targets import ring8

from . import _common

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def schedules() -> dict:
    """The three schedules with matched noise range sigmabar in [SIGMA_MIN, SIGMA_MAX]."""
    wide = S.VPLinear(t_min=1e-6)

    def t_of(sbar):
        return float(wide.t_from_lam(torch.tensor(-math.log(sbar), dtype=torch.float64)))

    return {"VP": S.VPLinear(t_min=t_of(SIGMA_MIN), t_max=t_of(SIGMA_MAX)),
            "VE": S.VE(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, t_min=0.0, t_max=1.0),
            "EDM": S.EDM(t_min=SIGMA_MIN, t_max=SIGMA_MAX)}


# label -> (schedule key, grid kind, rho)
GRIDS = {
    "VP, uniform t": ("VP", "uniform", 7.0),
    "VE, geometric": ("VE", "uniform", 7.0),
    "EDM, rho=1": ("EDM", "karras", 1.0),
    "EDM, rho=3": ("EDM", "karras", 3.0),
    "EDM, rho=7": ("EDM", "karras", 7.0),
    "EDM, geometric": ("EDM", "logsnr", 7.0),
}


def steps_of(solver: str, nfe: int) -> int:
    return nfe if solver == "euler" else (nfe + 1) // 2


def run(quick: bool = False, seed: int = 0):
    torch.set_num_threads(1)
    sch = schedules()
    stds = [0.05] if quick else [0.3, 0.05]
    nfes = [9, 35] if quick else [9, 17, 35, 71, 141]
    n = 3000 if quick else 8000
    n_ref = 300 if quick else 1000
    rows = []
    f64 = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
    headline = {}
    for std in stds:
        tg = ring8(std=std)
        tname = f"ring8(std={std:g})"
        g = torch.Generator().manual_seed(seed)
        xb_T = tg.marginal(sch["EDM"], SIGMA_MAX).sample(n, g)
        ref, _ = flow_map(tg.field(sch["EDM"]), xb_T[:n_ref], SIGMA_MAX, SIGMA_MIN)
        law = tg.marginal(sch["EDM"], SIGMA_MIN)
        exact = law.sample(n, g)
        floor, floor_se = sliced_w2_floor(law.sample, n, seed=seed + 999, n_proj=128)
        for nfe in nfes:
            for solver in ("euler", "heun"):
                for label, (key, kind, rho) in GRIDS.items():
                    s = sch[key]
                    grid = time_grid(s, steps_of(solver, nfe), kind, rho=rho)
                    res = sample(tg.field(s), xb_T * s.alpha(f64(s.t_max)), solver, grid=grid, coords="t")
                    xb = res.x / s.alpha(f64(s.t_min))
                    rows.append({"target": tname, "nfe": res.nfe, "solver": solver, "grid": label,
                                 "sampler": f"{solver}, {label}", "steps": len(grid) - 1,
                                 "flow_error": mean_error(xb[:n_ref], ref),
                                 "sw2": sliced_w2(xb, exact, 128, torch.Generator().manual_seed(seed + 7)),
                                 "mc_floor": floor, "mc_floor_se": floor_se})
        rs = [r for r in rows if r["target"] == tname]
        best = {}
        for nfe in nfes:
            at = sorted((r for r in rs if r["nfe"] == nfe), key=lambda r: r["flow_error"])
            heun7 = next(r for r in at if r["solver"] == "heun" and r["grid"] == "EDM, rho=7")
            best[str(nfe)] = {"best": at[0]["sampler"], "best_flow_error": at[0]["flow_error"],
                              "heun_rho7_flow_error": heun7["flow_error"],
                              "heun_rho7_rank": at.index(heun7) + 1, "configs": len(at)}
        top = max(nfes)
        get = lambda solver, grid: next(r["flow_error"] for r in rs if r["nfe"] == top and r["solver"] == solver  # noqa: E731
                                        and r["grid"] == grid)
        headline[tname] = {
            "best_by_nfe": best, "max_nfe": top,
            "heun_rho7_wins_at_35": best["35"]["best"] == "heun, EDM, rho=7",
            "heun_over_euler_rho7_at_max_nfe": get("heun", "EDM, rho=7") / get("euler", "EDM, rho=7"),
            "rho1_over_rho7_heun_at_max_nfe": get("heun", "EDM, rho=1") / get("heun", "EDM, rho=7"),
            "sw2_mc_floor": floor, "sw2_mc_floor_se": floor_se,
        }
    settings = {"targets": [f"ring8(std={s:g})" for s in stds], "sigmabar_range": [SIGMA_MIN, SIGMA_MAX],
                "schedules": {k: v.settings() for k, v in sch.items()}, "grids": GRIDS, "nfe": nfes, "n": n,
                "n_flow_ref": n_ref, "flow_ref": "reference.flow_map DOP853 rtol 1e-10 in (xbar, sigmabar)",
                "coords": "t (each schedule's own ODE)", "heun_final_euler": True, "seed": seed}
    return rows, {"settings": settings, "headline": headline}


def main(argv=None):
    args = _common.parser(__doc__.split("\n")[0], "results/experiments").parse_args(argv)
    rows, meta = run(args.quick, args.seed)
    print(_common.table(rows, ["target", "nfe", "solver", "grid", "steps", "flow_error", "sw2", "mc_floor"]))
    for tname, h in meta["headline"].items():
        for nfe, b in h["best_by_nfe"].items():
            print(f"{tname} NFE {nfe}: best {b['best']} ({b['best_flow_error']:.3g}); Heun + rho=7 "
                  f"{b['heun_rho7_flow_error']:.3g}, rank {b['heun_rho7_rank']}/{b['configs']}")
    _common.write(args.out, "edm_ablation", rows, meta["settings"], meta["headline"])
    from diffusion_lab.plots import ablation_vs_nfe

    with _common.figure_style(args):
        ablation_vs_nfe(rows, _common.figure(args, "edm_ablation"),
                        title="EDM ablation: ODE solver x time grid at matched NFE, sigmabar in [0.002, 80]")
    return meta["headline"]


if __name__ == "__main__":
    main()
