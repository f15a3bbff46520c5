r"""Time grids optimised for one sampler and one field, and the published Align Your Steps schedules.

``optimize_grid(field, N, method)`` chooses the N + 1 times t_max = t_0 > ... > t_N = t_min at which ``method``
is run, in two stages.

1. Dynamic programme over a candidate grid (the approach of GITS: Chen et al. 2024, "On the Trajectory Regularity
   of ODE-based Diffusion Sampling", sec. 4: a DP over a fine candidate grid with a one-step cost measured against a
   teacher trajectory). The candidates are M times uniform in log-SNR between t_max and t_min (both ends included;
   the ``logsnr`` grid of N steps is among them whenever N divides M - 1). The teacher is the accurate PF-ODE
   solution of a pilot batch, Dormand-Prince 5(4) in (x/alpha, sigma/alpha) at rtol 1e-8 (``method="adaptive"``,
   ``coords="edm"``), stopping exactly at every candidate: x*_m = x*(t_m). The cost of a step from t_j to t_k is
   the local error of the method's own step started on the teacher,

       c(j, k) = mean over the pilot of || step(x*_j; t_j -> t_k) - x*_k || / alpha(t_k),

   measured in the scaled state x/alpha (the variable of the EDM form of the ODE, in which a perturbation neither
   grows nor shrinks through alpha alone). For multistep methods the step also takes the previous grid point t_i,
   and the cost is their local truncation error with exact history (Hairer, Norsett & Wanner, Solving ODEs I,
   sec. III.2: the past values are those of the exact solution),

       c(i, j, k) = mean || step(x*_j, D*_j, D*_i; t_i, t_j -> t_k) - x*_k || / alpha(t_k),   D*_m = x0_hat(x*_m, t_m),

   so the DP runs over pairs (previous point, current point). Every step has the form the method uses at that
   position: the warm-up (first-order first step of multistep methods), ``lower_order_final``, Heun's final Euler
   step, the per-step orders of singlestep DPM-Solver (e.g. DPM-Solver-fast's [3, 3, 3, 1]). The DP minimises the
   sum (``objective="sum"``, GITS) or the largest (``"max"``) of the N step costs exactly, in O(N M^2) operations
   (O(N M^3) for the pair state).

   Step forms: single-step methods (euler, heun, midpoint, rk4, ddim with eta = 0, dpm_solver_1/2/3, dpmpp_2s)
   run their own sampler function over the two-point grid [t_j, t_k] (per-step options set as above); dpmpp_2m
   uses its second-order step from (D*_j, D*_i) (no model call beyond D*); unipc (order 1 or 2) uses UniP with the
   exact history and its UniC corrector with the model evaluated at the predictor's output, as in the method, one
   model call per (j, k) batched over i. The other multistep methods (dpmpp_3m, deis, ipndm, lms, plms, pndm,
   unipc order 3) have no cost form here: the DP then uses the first-order data-prediction step (DDIM) as a
   proxy for every step and the second stage does the method-specific work (reported in ``settings["step_cost"]``).

2. Refinement against the true terminal error (the end-to-end objective of Align Your Steps: Sabour, Fidler &
   Kreis 2024, sec. 3, there a KL upper bound, here the error itself, which the teacher gives): the start is
   whichever of the DP grid and the fixed grids (logsnr, karras, uniform, quadratic) has the smallest pilot
   terminal error E(grid) = mean || x_N - x*(t_min) || of the full method; then ``refine`` sweeps of coordinate
   descent move each interior point in lambda a fraction of the way (1/3, halved after a sweep without gain)
   towards either neighbour, keeping a move only if E decreases. The returned grid's pilot error is therefore
   never above that of any fixed grid or of the DP grid.

Only the field and the adaptive teacher are used: no closed form, so a learned field is optimised the same way as
an exact one. The pilot batch is its own sample: x_pilot if given, otherwise ``n_pilot`` draws of
N(0, sigma(t_max)^2 I) from a generator seeded with a fixed offset plus ``seed``, which is not the seed stream of
evaluation samples. Results, teachers and cost tables are cached per field object (``cache=True``; a hit reports
cost 0 and ``cached=True``; ``clear_cache()`` empties them).

``ays_grid(schedule, N, model)`` is the published 10-step Align Your Steps schedule (Sabour et al. 2024, NVIDIA's
project page; diffusers ``AysSchedules``), sigmabar values mapped to t by t = t(lambda = -log sigmabar), and
log-linearly interpolated for other N as the paper prescribes.
"""
from __future__ import annotations

import hashlib
import math
import time
import weakref
from dataclasses import dataclass, field as dc_field, replace

import numpy as np
import torch

from ..field import VelocityField
from .base import get_method, sample, step_iter
from .grids import GRID_KINDS, check_grid, time_grid

__all__ = ["OptimizedGrid", "optimize_grid", "clear_cache", "ays_grid", "AYS_SIGMAS", "dp_optimal_path",
           "path_value"]

#: Align Your Steps 10-step sigmabar schedules (Sabour et al. 2024; diffusers ``AysSchedules``, where the last
#: value 0.029 = sigma_min of Stable Diffusion is replaced by 0, i.e. a final denoising step).
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}

_EXACT_HISTORY = ("dpmpp_2m", "unipc")
_PROXY_MULTISTEP = ("dpmpp_3m", "deis", "ipndm", "lms", "plms", "pndm")
_PILOT_SEED_OFFSET = 0x6A17_0000  # pilot draws never share a seed stream with evaluation seeds 0, 1, 2, ...

_RESULTS: dict = {}
_TEACHERS: dict = {}
_TABLES: dict = {}


def clear_cache() -> None:
    """Forget every cached result, teacher trajectory and cost table."""
    _RESULTS.clear()
    _TEACHERS.clear()
    _TABLES.clear()


@dataclass(frozen=True)
class OptimizedGrid:
    """An optimised grid and how it was obtained.

    Fields::

        grid             descending float64 tensor of N + 1 times, grid[0] = t_max, grid[-1] = t_min
        cost_nfe         model evaluations this call spent (teacher, cost tables, refinement), from field.nfe; 0 if cached,
                         and without the teacher or tables when a call with the same field and pilot already made them
        seconds          wall time of this call
        objective        "sum" or "max" (the DP objective)
        dp_value         DP objective of the DP grid; dp_value_logsnr the same objective of the logsnr grid when it
                         lies on the candidates (N divides M - 1), else nan
        objective_before pilot terminal error mean ||x_N - x*(t_min)|| of the best fixed grid
        objective_after  the same for the returned grid (<= objective_before)
        terminal_dp      the same for the DP grid; fixed_terminal: per fixed grid kind
        start            where the refinement started ("dp" or a fixed grid kind)
    """

    grid: torch.Tensor
    method: str
    n: int
    cost_nfe: int
    seconds: float
    objective: str
    dp_value: float
    dp_value_logsnr: float
    objective_before: float
    objective_after: float
    terminal_dp: float
    fixed_terminal: dict
    start: str
    cached: bool = False
    settings: dict = dc_field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# the dynamic programme


def _combine(objective):
    return torch.add if objective == "sum" else torch.maximum


def dp_optimal_path(costs: list, objective: str = "sum") -> tuple[float, list[int]]:
    """The path 0 = p_0 < p_1 < ... < p_N = M - 1 minimising sum (or max) over n of the step costs.

    ``costs[n]`` is the cost of step n: an (M, M) tensor c[j, k] (step from candidate j to k) or an (M, M, M) tensor
    c[i, j, k] (step from j to k when the previous point was i; not allowed for n = 0). Entries with k <= j (or
    j <= i) are ignored. Exact dynamic programme: O(N M^2), or O(N M^3) with history. Returns (value, path)."""
    if objective not in ("sum", "max"):
        raise ValueError(f"objective must be 'sum' or 'max', got {objective!r}")
    if not costs:
        raise ValueError("need at least one step")
    M = costs[0].shape[-1]
    n_steps = len(costs)
    if n_steps > M - 1:
        raise ValueError(f"{n_steps} steps need at least {n_steps + 1} candidates, got M={M}")
    if costs[0].ndim != 2:
        raise ValueError("the first step has no previous point: costs[0] must be (M, M)")
    comb = _combine(objective)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    upper = torch.triu(torch.ones(M, M, dtype=torch.bool), diagonal=1)  # j < k
    clean = []
    for c in costs:
        c = c.to(torch.float64)
        if c.ndim == 2:
            c = torch.where(upper, c, inf)
        else:
            c = torch.where(upper[:, :, None] & upper[None, :, :], c, inf)
        clean.append(c)
    back = []
    if all(c.ndim == 2 for c in clean):
        V = torch.full((M,), math.inf, dtype=torch.float64)
        V[0] = 0.0 if objective == "sum" else -math.inf
        for c in clean:
            V, arg = comb(V[:, None], c).min(0)
            back.append(arg)
        path = [M - 1]
        for arg in reversed(back):
            path.append(int(arg[path[-1]]))
        path.reverse()
        return float(V[M - 1]), path
    W = torch.full((M, M), math.inf, dtype=torch.float64)  # W[j, k]: best value of a path ending ... -> j -> k
    W[0] = clean[0][0]
    for c in clean[1:]:
        c3 = c if c.ndim == 3 else c[None].expand(M, M, M)
        W, arg = comb(W[:, :, None], c3).min(0)  # over i
        back.append(arg)
    value, j = W[:, M - 1].min(0)
    path = [M - 1, int(j)]
    for arg in reversed(back):
        path.append(int(arg[path[-1], path[-2]]))
    path.reverse()
    return float(value), path


def path_value(costs: list, path, objective: str = "sum") -> float:
    """The objective of one path (indices into the candidates) under the step costs of ``dp_optimal_path``."""
    vals = []
    for n, c in enumerate(costs):
        j, k = path[n], path[n + 1]
        vals.append(float(c[j, k]) if c.ndim == 2 else float(c[path[n - 1], j, k]))
    return sum(vals) if objective == "sum" else max(vals)


# ------------------------------------------------------------------------------------------------
# step forms and their cost tables


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(u) for u in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(u)) for k, u in v.items()))
    if isinstance(v, torch.Tensor):
        return ("tensor", tuple(v.shape), hashlib.sha1(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
    return v


def _step_forms(method: str, n: int, options: dict) -> tuple[list, str]:
    """The form of each of the n steps (hashable keys of cost tables) and a description of the step cost."""
    from .exponential import _step_orders

    if method == "dpmpp_2m":
        orders = _step_orders(n, 2, options.get("lower_order_final", True))
        return [("dpm1",) if k == 1 else ("dpmpp_2m",) for k in orders], "exact-history local error"
    if method == "unipc":
        order = options.get("order", 2)
        rule = options.get("final_rule", "every_n")
        orders = _step_orders(n, order, options.get("lower_order_final", True),
                              final_below=None if rule == "every_n" else 10)
        if order <= 2:
            corr = bool(options.get("corrector", True))
            forms = []
            for i, k in enumerate(orders):
                c = corr and i < n - 1
                forms.append(("dpm1",) if (k == 1 and not c) else ("unipc", k, c))
            return forms, "exact-history local error (UniC evaluated at the predictor)"
    if method in _PROXY_MULTISTEP or method == "unipc":
        return [("dpm1",)] * n, "proxy: first-order data-prediction step (DDIM) for every step"
    # single-step methods: their own function on [t_j, t_k] with the per-step options
    forms = []
    orders = options.get("orders")
    if orders is not None and len(orders) != n:
        raise ValueError(f"{method}: orders has {len(orders)} entries for {n} steps")
    for i in range(n):
        o = dict(options)
        if orders is not None:
            o["orders"] = [orders[i]]
        if method == "heun":
            o["final_euler"] = bool(options.get("final_euler", True)) and i == n - 1
        forms.append(("run", _freeze(o)))
    return forms, "one step of the method from the teacher"


def _err(x, ref, a):
    return float(((x - ref).reshape(x.shape[0], -1).norm(dim=1) / a).mean())


def _errs(x, ref, a):
    """Per-leading-index mean error of x (L, B, ...) against ref (B, ...)."""
    L, B = x.shape[0], x.shape[1]
    return ((x - ref).reshape(L, B, -1).norm(dim=2) / a).mean(1)


def _table(form, field, method, teacher, progress):
    """The cost table (M, M) or (M, M, M) of one step form."""
    traj, D, cand, alpha, sigma, lam = (teacher[k] for k in ("traj", "D", "cand", "alpha", "sigma", "lam"))
    M = len(cand)
    C = torch.full((M, M), math.inf, dtype=torch.float64)
    kind = form[0]
    if kind == "run":
        fn = get_method(method).fn
        opts = dict(form[1])
        opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
        for j in step_iter(M - 1, progress, f"costs {method}"):
            for k in range(j + 1, M):
                x, _ = fn(field, traj[j], cand[[j, k]], **opts)
                C[j, k] = _err(x, traj[k], alpha[k])
        return C
    if kind == "dpm1":  # (sigma_k/sigma_j) x_j - alpha_k (e^{-h} - 1) D_j
        for j in range(M - 1):
            for k in range(j + 1, M):
                h = lam[k] - lam[j]
                x = (sigma[k] / sigma[j]) * traj[j] - (alpha[k] * math.expm1(-h)) * D[j]
                C[j, k] = _err(x, traj[k], alpha[k])
        return C
    if kind == "unipc" and form[1] == 1:  # UniP-1 + UniC-1 (rho_c = 1/2); one model call per (j, k)
        for j in step_iter(M - 1, progress, "costs unipc"):
            for k in range(j + 1, M):
                h = lam[k] - lam[j]
                b_h = math.expm1(-h)
                x_lin = (sigma[k] / sigma[j]) * traj[j] - (alpha[k] * b_h) * D[j]
                d_next = field.x0_eps(x_lin, cand[k])[0]
                x = x_lin - (alpha[k] * b_h * 0.5) * (d_next - D[j])
                C[j, k] = _err(x, traj[k], alpha[k])
        return C
    from .exponential import _unipc_coefficients

    T = torch.full((M, M, M), math.inf, dtype=torch.float64)
    for j in step_iter(M - 1, progress, f"costs {method}"):
        if j == 0:
            continue
        Di = D[:j]  # (j, B, ...) history at t_0 .. t_{j-1}
        shape = (j,) + (1,) * (D.ndim - 1)
        for k in range(j + 1, M):
            h = lam[k] - lam[j]
            r = torch.tensor([(lam[j] - lam[i]) / h for i in range(j)], dtype=torch.float64).reshape(shape)
            x_lin = (sigma[k] / sigma[j]) * traj[j] - (alpha[k] * math.expm1(-h)) * D[j]
            if kind == "dpmpp_2m":  # Lu et al. 2022b Alg. 2: D_j + (D_j - D_i)/(2 r)
                x = x_lin[None] - (alpha[k] * math.expm1(-h)) * (0.5 / r) * (D[j][None] - Di)
            else:  # UniP-2 (rho_p = 1/2) with r_1 = -(lam_j - lam_i)/h, then UniC-2
                b_h = math.expm1(-h)
                d1 = (Di - D[j][None]) / (-r)
                x = x_lin[None] - (alpha[k] * b_h * 0.5) * d1
                if form[2]:
                    d_next = field.x0_eps(x.reshape(-1, *x.shape[2:]), cand[k])[0].reshape(x.shape)
                    rho_c = torch.tensor([_unipc_coefficients([-(float(ri)), 1.0], h, 2)[2]
                                          for ri in r.reshape(-1)], dtype=torch.float64)
                    rc0 = rho_c[:, 0].reshape(shape)
                    rc1 = rho_c[:, 1].reshape(shape)
                    x = x_lin[None] - (alpha[k] * b_h) * (rc0 * d1 + rc1 * (d_next - D[j][None]))
            T[:j, j, k] = _errs(x, traj[k], alpha[k])
    return T


# ------------------------------------------------------------------------------------------------
# the optimiser


def _pilot(field, x_pilot, n_pilot, seed, t_hi):
    if x_pilot is not None:
        if not isinstance(x_pilot, torch.Tensor) or x_pilot.ndim < 2 or x_pilot.shape[0] < 1:
            raise ValueError(f"x_pilot must be a (batch, *data_shape) tensor, got "
                             f"{tuple(x_pilot.shape) if isinstance(x_pilot, torch.Tensor) else type(x_pilot).__name__}")
        x = x_pilot.detach().to(torch.float64)
        return x, ("x", _freeze(x))
    if field.data_shape is None:
        raise ValueError("the field has no data_shape: pass x_pilot (samples at t_max) to optimize_grid")
    if int(n_pilot) != n_pilot or n_pilot < 1:
        raise ValueError(f"n_pilot must be an integer >= 1, got {n_pilot!r}")
    g = torch.Generator().manual_seed(_PILOT_SEED_OFFSET + int(seed))
    s = float(field.schedule.sigma(torch.tensor(t_hi, dtype=torch.float64)))
    x = s * torch.randn((int(n_pilot), *field.data_shape), generator=g, dtype=torch.float64)
    return x, ("seed", int(n_pilot), int(seed))


def _get(store, key, field):
    hit = store.get(key)
    if hit is not None and hit[0]() is field:
        return hit[1]
    return None


def optimize_grid(field: VelocityField, n: int, method: str, *, x_pilot: torch.Tensor | None = None,
                  n_pilot: int = 128, candidates: int = 64, objective: str = "sum", refine: int = 2,
                  teacher_rtol: float = 1e-8, t_min: float | None = None, t_max: float | None = None, seed: int = 0,
                  cache: bool = True, progress: bool = False, **method_options) -> OptimizedGrid:
    """An N-step grid for ``method`` on ``field``: DP over ``candidates`` log-SNR-uniform times against an accurate
    teacher of a pilot batch, then ``refine`` sweeps of coordinate descent on the pilot's terminal error (see the
    module docstring). ``method_options`` are the sampler's own options (e.g. orders for dpm_solver_3 at an NFE
    budget: ``n, opts = plan_for_nfe("dpm_solver_3", 10)``; ``optimize_grid(field, n, "dpm_solver_3", **opts)``)."""
    t_start = time.perf_counter()
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField, got {type(field).__name__}")
    info = get_method(method)
    if info.stochastic or math.isnan(info.nfe_per_step) or float(method_options.get("eta", 0.0)) != 0.0:
        raise ValueError(f"optimize_grid needs a deterministic fixed-step method; {method!r} with options "
                         f"{method_options} is stochastic or adaptive")
    if n is None or int(n) != n or n < max(1, info.min_steps):
        raise ValueError(f"n must be an integer >= {max(1, info.min_steps)} for {method!r}, got {n!r}")
    n = int(n)
    if objective not in ("sum", "max"):
        raise ValueError(f"objective must be 'sum' or 'max', got {objective!r}")
    if int(candidates) != candidates or candidates < n + 1 or candidates < 2:
        raise ValueError(f"candidates must be an integer >= n + 1 = {n + 1}, got {candidates!r}")
    if int(refine) != refine or refine < 0:
        raise ValueError(f"refine must be an integer >= 0, got {refine!r}")
    if not (0 < teacher_rtol <= 1e-8):
        raise ValueError(f"teacher_rtol must be in (0, 1e-8], got {teacher_rtol!r}")
    sch = field.schedule
    t_lo = sch.t_min if t_min is None else float(t_min)
    t_hi = sch.t_max if t_max is None else float(t_max)
    M = int(candidates)
    cand = time_grid(sch, M - 1, "logsnr", t_min=t_lo, t_max=t_hi)
    x0, pilot_key = _pilot(field, x_pilot, n_pilot, seed, t_hi)
    forms, step_cost = _step_forms(method, n, method_options)
    teacher_key = (id(field), pilot_key, M, t_lo, t_hi, float(teacher_rtol))
    key = (teacher_key, method, n, _freeze(method_options), objective, int(refine))
    if cache:
        hit = _get(_RESULTS, key, field)
        if hit is not None:
            return replace(hit, grid=hit.grid.clone(), cost_nfe=0, seconds=time.perf_counter() - t_start, cached=True)
    nfe0 = field.nfe

    teacher = _get(_TEACHERS, teacher_key, field) if cache else None
    if teacher is None:
        r = sample(field, x0, "adaptive", grid=cand, rtol=teacher_rtol, atol=teacher_rtol, coords="edm",
                   return_trajectory=True)
        traj = r.trajectory
        D = torch.stack([field.x0_eps(traj[m], cand[m])[0] for m in range(M)])
        teacher = {"traj": traj, "D": D, "cand": cand, "alpha": sch.alpha(cand).tolist(),
                   "sigma": sch.sigma(cand).tolist(), "lam": sch.lam(cand).tolist(), "teacher_nfe": r.nfe + M}
        if cache:
            _TEACHERS[teacher_key] = (weakref.ref(field), teacher)
    tables = {}
    for form in dict.fromkeys(forms):
        tkey = (teacher_key, method if form[0] == "run" else None, form)
        tab = _get(_TABLES, tkey, field) if cache else None
        if tab is None:
            tab = _table(form, field, method, teacher, progress)
            if cache:
                _TABLES[tkey] = (weakref.ref(field), tab)
        tables[form] = tab
    costs = [tables[f] for f in forms]
    dp_value, path = dp_optimal_path(costs, objective)
    dp_grid = cand[path].clone()
    logsnr_value = math.nan
    if (M - 1) % n == 0:
        logsnr_value = path_value(costs, list(range(0, M, (M - 1) // n)), objective)

    x_ref = teacher["traj"][-1]

    def terminal(g):
        out = sample(field, x0, method, grid=g, **method_options).x
        return _err(out, x_ref, 1.0)

    fixed = {kind: time_grid(sch, n, kind, t_min=t_lo, t_max=t_hi) for kind in GRID_KINDS}
    fixed_terminal = {kind: terminal(g) for kind, g in fixed.items()}
    terminal_dp = terminal(dp_grid)
    best_fixed = min(fixed_terminal, key=fixed_terminal.get)
    start = "dp" if terminal_dp <= fixed_terminal[best_fixed] else best_fixed
    grid = dp_grid if start == "dp" else fixed[start]
    best = min(terminal_dp, fixed_terminal[best_fixed])
    grid, best = _coordinate_descent(sch, grid, best, terminal, int(refine))
    settings = {"method": method, "n": n, "method_options": {k: v for k, v in method_options.items()},
                "candidates": M, "candidate_spacing": "logsnr", "objective": objective, "refine": int(refine),
                "teacher": {"method": "adaptive", "rtol": teacher_rtol, "atol": teacher_rtol, "coords": "edm",
                            "nfe": teacher["teacher_nfe"]},
                "pilot": {"x_pilot": x_pilot is not None, "n": int(x0.shape[0]), "seed": int(seed)},
                "step_cost": step_cost, "t_min": t_lo, "t_max": t_hi, "dp_path": path}
    result = OptimizedGrid(grid=check_grid(sch, grid), method=method, n=n, cost_nfe=field.nfe - nfe0,
                           seconds=time.perf_counter() - t_start, objective=objective, dp_value=dp_value,
                           dp_value_logsnr=logsnr_value, objective_before=fixed_terminal[best_fixed],
                           objective_after=best, terminal_dp=terminal_dp, fixed_terminal=fixed_terminal, start=start,
                           cached=False, settings=settings)
    if cache:
        _RESULTS[key] = (weakref.ref(field), result)
    return result


def _coordinate_descent(sch, grid, best, terminal, sweeps):
    """Move interior points in lambda towards a neighbour by a fraction (1/3, halved after a sweep without gain),
    keeping a move only when the terminal error drops."""
    lam = sch.lam(grid).clone()
    frac = 1.0 / 3.0
    n = len(grid) - 1
    for _ in range(sweeps):
        improved = False
        for i in range(1, n):
            for nb in (i - 1, i + 1):
                trial = lam.clone()
                trial[i] = lam[i] + frac * (lam[nb] - lam[i])
                g = grid.clone()
                g[i] = sch.t_from_lam(trial[i])
                if not (g[i - 1] > g[i] > g[i + 1]):
                    continue
                e = terminal(g)
                if e < best:
                    best, grid, lam, improved = e, g, trial, True
                    break
        if not improved:
            frac *= 0.5
    return grid, best


# ------------------------------------------------------------------------------------------------
# Align Your Steps


def ays_grid(schedule, n: int, model: str = "sd15") -> torch.Tensor:
    """The Align Your Steps schedule of ``model`` ("sd15" or "sdxl"; Sabour et al. 2024) as a time grid of N steps.

    The published 10-step sigmabar list s_0 > ... > s_10 (``AYS_SIGMAS``) is used as is for N = 10; other N take
    log-linear interpolation, log s(u) piecewise linear in u on the 11 points u = 0, 1/10, ..., 1, sampled at
    u = i/N (the paper's rule for other step counts). Times are t_i = t(lambda = -log s_i) of ``schedule``; the
    grid runs from sigmabar 14.615 to 0.029 (Stable Diffusion's range), which must lie inside the schedule's."""
    if model not in AYS_SIGMAS:
        raise ValueError(f"unknown Align Your Steps model {model!r}; choose one of {sorted(AYS_SIGMAS)}")
    if n is None or int(n) != n or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")
    sig = np.asarray(AYS_SIGMAS[model], dtype=np.float64)
    if int(n) == len(sig) - 1:
        s = sig
    else:
        xs = np.linspace(0.0, 1.0, len(sig))
        s = np.exp(np.interp(np.linspace(0.0, 1.0, int(n) + 1), xs, np.log(sig[::-1])))[::-1]
    lam = -torch.log(torch.as_tensor(s.copy(), dtype=torch.float64))
    lam_lo, lam_hi = schedule.lam_range  # lambda(t_max), lambda(t_min)
    if lam[0] < lam_lo - 1e-12 or lam[-1] > lam_hi + 1e-12:
        raise ValueError(f"the Align Your Steps range sigmabar in [{s[-1]:.4g}, {s[0]:.4g}] is not inside "
                         f"{schedule!r}'s [{math.exp(-lam_hi):.4g}, {math.exp(-lam_lo):.4g}]")
    return check_grid(schedule, schedule.t_from_lam(lam))
