"""Throughput of the reverse SDE (gamma = 1): native batched Euler-Maruyama ("em") against torchsde.sdeint
(method "torchsde", sde_solver="euler"), side by side, with checks that both produce the same law of results.

Setting: the exact ring8 mixture (8 Gaussians on a circle) under VPLinear, x_T ~ p_{t_max}, a uniform t grid,
float32 and float64. Each method runs in its ordinary mode (em draws its normals with a torch.Generator,
torchsde builds its own BrownianInterval); repeats are interleaved (em, torchsde, em, torchsde, ...) and the
median wall time is reported. Checks:

- same law: the final sample sets of the two methods (independent noise) agree in mean and covariance
  within 5 Monte-Carlo standard errors of the difference (SE from the sample fourth moments, not assuming
  Gaussianity);
- the N model evaluations alone are timed too (same repeats), so each method's solver overhead
  (its time minus the model-only time) is reported next to the speed ratio;
- same path: driven by one BrownianInterval (torchsde's ``bm`` option; em's ``noise`` = the increments
  (W(u_{i+1}) - W(u_i))/sqrt(du)), the float64 results agree to ~1e-10.

    python benchmarks/sde_throughput.py [--quick] [--batch B] [--steps N] [--repeats R] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))  # run from a plain checkout too

from diffusion_lab import schedules as S  # noqa: E402
from diffusion_lab import targets as T  # noqa: E402
from diffusion_lab.samplers import sample, time_grid  # noqa: E402
from diffusion_lab.samplers.sde import brownian_increments, make_brownian


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def law_agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max |difference|/SE over the mean entries and the covariance entries of two independent sample sets."""
    a, b = a.double(), b.double()

    def stats(x):
        m = x.mean(0)
        xc = x - m
        prod = xc[:, :, None] * xc[:, None, :]
        n = x.shape[0]
        return m, x.var(0) / n, prod.mean(0), prod.var(0) / n

    ma, vma, ca, vca = stats(a)
    mb, vmb, cb, vcb = stats(b)
    z_mean = float(((ma - mb).abs() / (vma + vmb).sqrt()).max())
    z_cov = float(((ca - cb).abs() / (vca + vcb).sqrt()).max())
    return {"z_mean_max": z_mean, "z_cov_max": z_cov, "pass": max(z_mean, z_cov) <= 5.0}


def run(batch: int, steps: int, repeats: int, seed: int, dtypes=(torch.float32, torch.float64)) -> dict:
    sch = S.VPLinear()
    target = T.ring8()
    field = target.field(sch)
    grid = time_grid(sch, steps, "uniform")
    prior = target.marginal(sch, sch.t_max)
    rows = []
    for dtype in dtypes:
        x0 = prior.sample(batch, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        times = {"em": [], "torchsde": [], "model": []}
        finals = {}
        tgrid = grid.tolist()

        def model_only():  # the N model evaluations alone, at the grid times: the floor for both methods
            for t in tgrid[:-1]:
                field.eps(x0, torch.tensor(t, dtype=torch.float64))

        for r in range(repeats):
            times["model"].append(_timed(model_only)[0])
            for method in ("em", "torchsde"):
                gen = torch.Generator().manual_seed(seed + 1 + 2 * r + (method == "torchsde"))
                opts = {"sde_solver": "euler"} if method == "torchsde" else {}
                sec, res = _timed(lambda: sample(field, x0, method, grid=grid, gamma=1.0, generator=gen, **opts))
                assert res.nfe == steps, (method, res.nfe)
                times[method].append(sec)
                finals[method] = res.x
        law = law_agreement(finals["em"], finals["torchsde"])
        # pathwise: one Brownian path drives both
        bm = make_brownian(grid, x0.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 99))
        a = sample(field, x0, "torchsde", grid=grid, bm=bm).x
        b = sample(field, x0, "em", grid=grid, noise=brownian_increments(bm, grid, x0.shape)).x
        path_diff = float((a - b).abs().max())
        med = {m: statistics.median(v) for m, v in times.items()}
        for m in ("em", "torchsde"):
            rows.append({"method": m if m == "em" else "torchsde(euler)", "dtype": str(dtype).replace("torch.", ""),
                         "seconds_median": med[m], "seconds_all": times[m], "steps_per_s": steps / med[m],
                         "speed_ratio_native_over_torchsde": med["torchsde"] / med["em"],
                         "model_only_seconds_median": med["model"],
                         "solver_overhead_seconds": med[m] - med["model"],
                         "same_law": law, "pathwise_max_abs_diff": path_diff})
    return {"rows": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=20000)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small run: batch 2000, 100 steps")
    p.add_argument("--json", metavar="PATH", help="write the figures and settings as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.steps = 2000, 100
    if args.batch < 2 or args.steps < 1 or args.repeats < 1:
        p.error(f"need batch >= 2, steps >= 1, repeats >= 1; got {args.batch}, {args.steps}, {args.repeats}")
    out = run(args.batch, args.steps, args.repeats, args.seed)
    print(f"reverse SDE (gamma=1), ring8 + VPLinear, uniform t grid, batch {args.batch}, {args.steps} steps, "
          f"median of {args.repeats} interleaved repeats, torch threads {torch.get_num_threads()}")
    head = (f"{'method':<16} {'dtype':<8} {'seconds':>9} {'steps/s':>9} {'native/torchsde':>16} {'model-only s':>12} "
            f"{'overhead s':>10} {'law z(mean,cov)':>16} {'path diff':>10}")
    print(head)
    print("-" * len(head))
    for r in out["rows"]:
        law = r["same_law"]
        print(f"{r['method']:<16} {r['dtype']:<8} {r['seconds_median']:>9.3f} {r['steps_per_s']:>9.1f} "
              f"{r['speed_ratio_native_over_torchsde']:>15.2f}x {r['model_only_seconds_median']:>12.3f} "
              f"{r['solver_overhead_seconds']:>10.3f} {law['z_mean_max']:>7.2f},{law['z_cov_max']:>7.2f}  "
              f"{r['pathwise_max_abs_diff']:>10.2e}")
    ok = all(r["same_law"]["pass"] for r in out["rows"])
    path64 = [r["pathwise_max_abs_diff"] for r in out["rows"] if r["dtype"] == "float64"]
    ok_path = all(d <= 1e-10 for d in path64)
    print(f"same law (5 SE): {'yes' if ok else 'NO'};  same path in float64 (<= 1e-10): {'yes' if ok_path else 'NO'}")
    if args.json:
        import torchsde

        settings = {"benchmark": "sde_throughput", "target": "ring8", "schedule": S.VPLinear().settings(),
                    "grid": "uniform", "gamma": 1.0, "batch": args.batch, "steps": args.steps,
                    "repeats": args.repeats, "seed": args.seed, "torch": torch.__version__,
                    "torchsde": torchsde.__version__, "python": sys.version.split()[0],
                    "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
        with open(args.json, "w") as fh:
            json.dump({"settings": settings, **out, "same_law": ok, "same_path_float64": ok_path}, fh, indent=2)
    return 0 if (ok and ok_path) else 1


if __name__ == "__main__":
    sys.exit(main())
