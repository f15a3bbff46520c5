#!/usr/bin/env python
r"""Grid Fokker-Planck: diffusion_lab.fokker_planck against py-pde on the 2-D Ornstein-Uhlenbeck equation

    dp/dt = div(x p) + lap p  on [-6, 6]^2,   p(0) = N((1.5, -1), 0.3^2 I),   t in [0, 1],

whose exact solution is N(m e^{-t}, (0.09 e^{-2t} + 1 - e^{-2t}) I). Both start from the exact cell averages of
p(0) on the same cell-centred n x n grid and are scored by the L1 error against the exact cell averages of p(1)
and the mass drift |M(1) - M(0)|.

Ours: Scharfetter-Gummel fluxes, zero-flux boundaries, (a) "expm": the Kronecker exponential integrator
(p(1) = (E (x) E) p(0) with E = exp(L_1d), exact in time, so its error is the spatial one) and (b) "trbdf2":
TR-BDF2 with one sparse LU factorisation re-used for all steps (the general path).
py-pde (an optional dependency, ``pip install py-pde``): PDE("laplace(p) + 2*p + x*d_dx(p) + y*d_dy(p)") with
Neumann boundaries (second-order central differences, numba backend). Its "implicit" solvers are fixed-point
iterations (THEORY.md pitfall g), so we use (i) explicit Euler at a stable fixed dt and (ii) adaptive
Runge-Kutta (Fehlberg 5(4)) with a tight tolerance, whose error is then the spatial one. py-pde's numba JIT
compile time is excluded: its stepper is built with ``solver.make_stepper`` and called once on a short interval
before the timed call, which only steps.

Run:  python benchmarks/fokker_planck_vs_pypde.py [--n 256] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from diffusion_lab.fokker_planck import Grid, LinearCoefficients, gaussian_density, l1, solve  # noqa: E402

M0 = np.array([1.5, -1.0])
V0 = 0.09
T = 1.0
BOX = 6.0


def exact(grid: Grid, t: float) -> np.ndarray:
    m = M0 * math.exp(-t)
    v = V0 * math.exp(-2 * t) + 1.0 - math.exp(-2 * t)
    return gaussian_density(grid, m, v)


def run_ours(n: int, method: str, steps: int, repeats: int = 3) -> dict:
    g = Grid.box(-BOX, BOX, n, 2)
    p0, p1 = exact(g, 0.0), exact(g, T)
    co = LinearCoefficients(rate=lambda s: -1.0, diffusion=lambda s: 1.0, time_independent=True, ratio=-1.0,
                            integral_D=lambda a, b: b - a)
    best, sol = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        sol = solve(g, p0, [0.0, T], co, method=method, steps=steps)
        best = min(best, time.perf_counter() - t0)
    p = sol.densities[-1]
    return {"solver": f"diffusion_lab {method}", "config": f"{steps} step(s)" if method != "expm" else "exact in time",
            "n": n, "seconds": best, "l1": l1(p, p1, g), "mass_drift": abs(g.mass(p) - g.mass(p0)),
            "min": float(p.min()), "steps": sol.steps}


def run_pypde(n: int, config: str, dt: float | None = None, tol: float | None = None) -> dict:
    import pde

    warnings.simplefilter("ignore")
    grid = pde.CartesianGrid([[-BOX, BOX], [-BOX, BOX]], [n, n])
    g = Grid.box(-BOX, BOX, n, 2)
    p0, p1 = exact(g, 0.0), exact(g, T)
    eq = pde.PDE({"p": "laplace(p) + 2*p + x*d_dx(p) + y*d_dy(p)"}, bc={"derivative": 0})
    state = pde.ScalarField(grid, p0.copy())
    if config == "euler":
        solver = pde.EulerSolver(eq, backend="numba")
        label = f"explicit Euler dt={dt:g}"
    else:
        solver = pde.RungeKuttaSolver(eq, backend="numba", adaptive=True, tolerance=tol)
        dt = dt or 1e-4
        label = f"adaptive RK45 tol={tol:g}"
    stepper = solver.make_stepper(state, dt=dt)  # numba compile happens here ...
    warm = state.copy()
    stepper(warm, 0.0, 2 * dt)  # ... and in the first call; both excluded from the timing
    state = pde.ScalarField(grid, p0.copy())
    t0 = time.perf_counter()
    t_end = stepper(state, 0.0, T)
    seconds = time.perf_counter() - t0
    p = state.data
    return {"solver": "py-pde", "config": label, "n": n, "seconds": seconds, "l1": l1(p, p1, g),
            "mass_drift": abs(g.mass(p) - g.mass(p0)), "min": float(p.min()), "t_end": float(t_end),
            "steps": int(round(T / dt)) if config == "euler" else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="cells per axis (default 256)")
    ap.add_argument("--quick", action="store_true", help="n = 64, fewer configurations (a smoke run)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows and settings as JSON")
    ap.add_argument("--no-pypde", action="store_true", help="skip py-pde")
    args = ap.parse_args(argv)
    n = 64 if args.quick else args.n
    if n < 8:
        ap.error(f"--n must be >= 8, got {n}")
    dx = 2 * BOX / n
    rows = [run_ours(n, "expm", 1), run_ours(n, "trbdf2", 20)]
    if not args.quick:
        rows.append(run_ours(2 * n, "expm", 1))
    if not args.no_pypde:
        try:
            import pde  # noqa: F401
        except ImportError:
            print("py-pde is not installed (pip install py-pde): comparing nothing", file=sys.stderr)
        else:
            # explicit Euler on the central 5-point Laplacian is stable for dt <= dx^2/4 (D = 1), drift aside
            dt_euler = 0.9 * dx * dx / 4.0
            rows.append(run_pypde(n, "euler", dt=dt_euler))
            if not args.quick:
                rows.append(run_pypde(n, "euler", dt=dt_euler / 4))
                rows.append(run_pypde(n, "rk", tol=1e-6))
    hdr = f"{'solver':22s} {'config':28s} {'grid':>9s} {'wall [s]':>9s} {'L1 error':>10s} {'mass drift':>11s} {'min p':>10s}"
    print(f"2-D OU dp/dt = div(x p) + lap p on [-{BOX:g},{BOX:g}]^2, N((1.5,-1), 0.09 I) -> t = {T:g}; "
          f"L1 vs exact cell averages (best of 3 for ours; py-pde excludes JIT compile)")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['solver']:22s} {r['config']:28s} {r['n']:>4d}^2 {r['seconds']:9.3f} {r['l1']:10.2e} "
              f"{r['mass_drift']:11.1e} {r['min']:10.1e}")
    ours = [r for r in rows if r["solver"].startswith("diffusion_lab") and r["n"] == n]
    theirs = [r for r in rows if r["solver"] == "py-pde"]
    ratios = []
    for o in ours:
        for p in theirs:
            if p["l1"] >= o["l1"]:  # py-pde at equal or larger error
                ratios.append({"ours": o["solver"], "py-pde": p["config"], "speedup": p["seconds"] / o["seconds"],
                               "l1_ours": o["l1"], "l1_pypde": p["l1"]})
    for r in ratios:
        print(f"speed-up {r['ours']} vs py-pde {r['py-pde']}: {r['speedup']:.1f}x "
              f"(L1 {r['l1_ours']:.2e} vs {r['l1_pypde']:.2e})")
    if theirs and not ratios:
        print("no py-pde configuration reached an error >= ours: no matched-error ratio")
    if args.json:
        import numpy
        import scipy

        info = {"rows": rows, "ratios": ratios, "settings": {"n": n, "box": BOX, "t": T, "m0": M0.tolist(), "v0": V0,
                                                              "quick": args.quick},
                "versions": {"python": platform.python_version(), "numpy": numpy.__version__,
                             "scipy": scipy.__version__}}
        try:
            import pde

            info["versions"]["py-pde"] = pde.__version__
        except ImportError:
            pass
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
