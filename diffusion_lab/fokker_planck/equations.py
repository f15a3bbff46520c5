r"""The three density equations of one velocity field (Song et al. 2021; Anderson 1982)::

    forward (noising) Fokker-Planck, t increasing            dp/dt = -div(f(t) x p) + g^2(t)/2 lap p
    PF-ODE continuity, t increasing or decreasing             dp/dt = -div(v p),  v = f x - g^2/2 s
    generation, tau = t_start - t increasing (t decreasing)    dq/dtau = -div(b q) + gamma^2 g^2/2 lap q,
                                                                b(x, t) = -f(t) x + (1 + gamma^2)/2 g^2(t) s(x, t)

Derivation of the last one: q(tau) = p_{T - tau} solves
dq/dtau = div(f x q) - g^2/2 lap q; writing lap q = div(q grad log q) = div(s q) with the score s of p_t,
-g^2/2 lap q = -(1 + gamma^2)/2 g^2 div(s q) + gamma^2 g^2/2 lap q, which is the equation above. gamma = 1 is the
reverse SDE (Anderson 1982: drift -f x + g^2 s, diffusion g^2/2 in tau), gamma = 0 the reverse PF-ODE
continuity equation. With the exact score the solution is p_t at every t, whatever gamma.

The score and velocity come from the field on the cell faces, in batches (one NFE per batch, counted by
the field and reported). Times: the equations run in a solver time s = t (forward) or s = -t (generation), so
``times`` are the physical t at which densities are returned, increasing or decreasing.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable

import numpy as np
import torch

from ..field import VelocityField
from ..schedules import Schedule
from .densities import exact_density, kl, l1, log_exact_density, mass_outside
from .grid import Grid
from .stepping import EvolveStats, evolve

__all__ = [
    "LinearCoefficients", "PointCoefficients", "FPSolution", "solve_forward", "solve_continuity",
    "solve_reverse", "solve", "initial_density", "schedule_ratio",
]


# --------------------------------------------------------------------------------------------------
# coefficients in solver time s

@dataclass(frozen=True)
class LinearCoefficients:
    """b(x, s) = rate(s) x (every axis), D(s) = diffusion(s). ``ratio`` k: rate = k D for every s (then
    L(s) = D(s) L^{(k)} and ``integral_D(s0, s1)`` = int D ds makes method="expm" exact in time)."""

    rate: Callable[[float], float]
    diffusion: Callable[[float], float]
    time_independent: bool = False
    ratio: float | None = None
    integral_D: Callable[[float, float], float] | None = None

    def face_drifts(self, grid: Grid, s: float, periodic: bool):
        f = float(self.rate(s))
        out = []
        for a in range(grid.dim):
            xf = grid.edges(a)[1:] if periodic else grid.interior_faces(a)
            shape = [1] * grid.dim
            shape[a] = -1
            out.append(np.broadcast_to(f * xf.reshape(shape), grid.face_shape(a, periodic)))
        return out


@dataclass
class PointCoefficients:
    """b(x, s) from ``drift(points (M, d), s) -> (M, d)`` evaluated on all face points of all axes in one
    call per s; D(s) = diffusion(s)."""

    drift: Callable[[np.ndarray, float], np.ndarray]
    diffusion: Callable[[float], float]
    time_independent: bool = False
    _points: dict = dc_field(default_factory=dict, init=False, repr=False, compare=False)

    def face_drifts(self, grid: Grid, s: float, periodic: bool):
        key = (grid, periodic)
        if key not in self._points:  # the face points of the latest grid, built once
            self._points.clear()
            pts = [grid.face_points(a, periodic) for a in range(grid.dim)]
            self._points[key] = (pts, np.concatenate(pts, axis=0))
        pts, allpts = self._points[key]
        b = np.asarray(self.drift(allpts, s), dtype=np.float64)
        out, i = [], 0
        for a in range(grid.dim):
            m = pts[a].shape[0]
            out.append(b[i:i + m, a].reshape(grid.face_shape(a, periodic)))
            i += m
        return out


def _field_eval(field: VelocityField, kind: str, x: np.ndarray, t: float, batch: int) -> np.ndarray:
    """field.<kind>(x, t) in batches of ``batch`` points (one NFE each), float64 numpy."""
    out = np.empty_like(x)
    for i in range(0, x.shape[0], batch):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))
        out[i:i + batch] = getattr(field, kind)(xb, t).detach().cpu().numpy()
    return out


def _sched(obj) -> Schedule:
    if isinstance(obj, VelocityField):
        return obj.schedule
    if isinstance(obj, Schedule):
        return obj
    raise TypeError(f"need a VelocityField or a Schedule, got {type(obj).__name__}")


def _f(schedule: Schedule, t: float) -> float:
    return float(schedule.f(torch.tensor(float(t), dtype=torch.float64)))


def _g2(schedule: Schedule, t: float) -> float:
    return float(schedule.g2(torch.tensor(float(t), dtype=torch.float64)))


def schedule_ratio(schedule: Schedule, t0: float, t1: float, n: int = 65) -> float | None:
    """k with f(t) = k g^2(t)/2 on [t0, t1] (VP-type: k = -1; VE/EDM: k = 0), or None (sub-VP, RF)."""
    ts = np.linspace(min(t0, t1), max(t0, t1), n)
    f = np.array([_f(schedule, t) for t in ts])
    D = np.array([0.5 * _g2(schedule, t) for t in ts])
    if np.all(f == 0):
        return 0.0
    k = f / D
    if np.max(np.abs(k - k[0])) <= 1e-12 * max(1.0, abs(k[0])):
        return float(k[0])
    return None


def _integral_D(schedule: Schedule, k: float):
    """int_{t0}^{t1} g^2/2 dt in closed form when f = k g^2/2: (log alpha(t1) - log alpha(t0))/k for k != 0, and
    (sigma^2(t1) - sigma^2(t0))/2 for f = 0 (then g^2 = d sigma^2/dt)."""
    def T(t):
        return torch.tensor(float(t), dtype=torch.float64)

    if k == 0.0:
        return lambda t0, t1: 0.5 * float(schedule.sigma(T(t1)) ** 2 - schedule.sigma(T(t0)) ** 2)
    return lambda t0, t1: float(schedule.log_alpha(T(t1)) - schedule.log_alpha(T(t0))) / k


# --------------------------------------------------------------------------------------------------
# the solution object

@dataclass(frozen=True)
class FPSolution:
    """Densities (len(times), *grid.shape) at the physical ``times`` with per-time ``mass`` and ``min``; when
    a target was given also ``l1``, ``tv``, ``kl`` (KL(grid || exact)) against the exact cell averages of p_t
    and ``mass_outside`` (exact p_t's mass outside the box; ``mass_outside_exact`` False = union bound)."""

    grid: Grid
    times: np.ndarray
    densities: np.ndarray
    equation: str
    settings: dict
    mass: np.ndarray
    min: np.ndarray
    nfe: int = 0
    steps: int = 0
    factorizations: int = 0
    seconds: float = 0.0
    l1: np.ndarray | None = None
    tv: np.ndarray | None = None
    kl: np.ndarray | None = None
    mass_outside: np.ndarray | None = None
    mass_outside_exact: bool | None = None

    def density(self, t: float) -> np.ndarray:
        """The density at the requested time t (must be one of ``times``)."""
        i = int(np.argmin(np.abs(self.times - t)))
        if abs(self.times[i] - t) > 1e-12 * max(1.0, abs(t)):
            raise ValueError(f"t={t} is not one of the solution times {self.times.tolist()}")
        return self.densities[i]

    @property
    def mass_drift(self) -> float:
        """max_t |mass(t) - mass(t_0)|."""
        return float(np.max(np.abs(self.mass - self.mass[0])))

    def rows(self) -> list[dict]:
        """One dict per time (for CSV)."""
        rows = []
        for i, t in enumerate(self.times):
            r = {"equation": self.equation, "t": float(t), "mass": float(self.mass[i]), "min": float(self.min[i])}
            if self.l1 is not None:
                r.update(l1=float(self.l1[i]), tv=float(self.tv[i]), kl=float(self.kl[i]),
                         mass_outside=float(self.mass_outside[i]))
            rows.append(r)
        return rows


def initial_density(p0, grid: Grid, schedule: Schedule | None, t: float) -> np.ndarray:
    """p0 as a grid density: an array (checked), a Gaussian-mixture target (its exact p_t cell averages), or
    "prior" (N(0, sigma(t)^2 I) cell averages, the Gaussian prior at t without the alpha x_0 part)."""
    if isinstance(p0, str):
        if p0 != "prior":
            raise ValueError(f"p0 must be an array, a target or 'prior', got {p0!r}")
        from .densities import gaussian_density

        s = float(schedule.sigma(torch.tensor(float(t), dtype=torch.float64)))
        return gaussian_density(grid, 0.0, s * s)
    if hasattr(p0, "log_prob_t"):
        return exact_density(p0, schedule, grid, t)
    return grid.check_density(p0, "p0")


def _finish(grid, times, dens, equation, settings, stats, nfe, seconds, target, schedule):
    vol = grid.volume
    mass = dens.reshape(len(times), -1).sum(1) * vol
    mn = dens.reshape(len(times), -1).min(1)
    extra = {}
    if target is not None:
        L1, KL, out, ex = [], [], [], True
        for i, t in enumerate(times):
            lq = log_exact_density(target, schedule, grid, float(t))
            q = np.exp(lq)
            L1.append(l1(dens[i], q, grid))
            KL.append(kl(dens[i], q, grid, log_q=lq))
            mo, e = mass_outside(target, schedule, grid, float(t))
            out.append(mo)
            ex = ex and e
        L1 = np.array(L1)
        extra = dict(l1=L1, tv=0.5 * L1, kl=np.array(KL), mass_outside=np.array(out), mass_outside_exact=ex)
    return FPSolution(grid, np.asarray(times, dtype=np.float64), dens, equation, settings, mass, mn, nfe=nfe,
                      steps=stats.steps, factorizations=stats.factorizations, seconds=seconds, **extra)


def _check_times(times, schedule: Schedule | None, increasing: bool | None, need_field: bool):
    times = np.asarray(times, dtype=np.float64).reshape(-1)
    if times.size < 1:
        raise ValueError("times must contain at least one time")
    d = np.diff(times)
    if times.size > 1 and not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"times must be strictly monotone, got {times.tolist()}")
    if increasing is not None and times.size > 1 and (d[0] > 0) != increasing:
        raise ValueError(f"times must be {'increasing' if increasing else 'decreasing'} for this equation, got "
                         f"{times.tolist()}")
    if schedule is not None:
        lo = schedule.t_min if need_field else schedule.domain()[0]
        hi = schedule.t_max
        bad = [t for t in times if t < lo - 1e-12 or t > hi + 1e-12]
        if bad:
            raise ValueError(f"time t={bad[0]!r} is outside [{lo}, {hi}] of {schedule!r}")
    return times


# --------------------------------------------------------------------------------------------------
# the equations

def solve(grid: Grid, p0, times, coeffs, *, equation: str = "custom", method: str = "trbdf2",
          steps: int | None = 100, dt: float | None = None, bc: str = "zero_flux", scheme: str = "sg",
          target=None, schedule=None, reverse: bool = False, limiter: str = "vanleer", cfl: float | None = None,
          rtol: float | None = None, atol: float | None = None) -> FPSolution:
    """Solve dp/ds = L(s) p with ``coeffs`` (LinearCoefficients / PointCoefficients, in s = t or s = -t when
    ``reverse``) from p(times[0]) = p0 and return an FPSolution at ``times``.

    ``limiter``/``cfl`` configure the MUSCL methods ("ssprk2", "ssprk3", "imex"), whose step is chosen from the
    CFL bound when ``cfl`` is given or ``steps`` and ``dt`` are both None; ``rtol``/``atol`` make "trbdf2" adaptive
    (``stepping.evolve``)."""
    times = np.asarray(times, dtype=np.float64)
    if dt is not None or cfl is not None:
        steps = None
    s_out = -times if reverse else times
    stats = EvolveStats()
    t0 = time.perf_counter()
    dens = evolve(grid, p0, s_out, coeffs, method=method, steps=steps, dt=dt, bc=bc, scheme=scheme, stats=stats,
                  limiter=limiter, cfl=cfl, rtol=rtol, atol=atol)
    seconds = time.perf_counter() - t0
    settings = {"equation": equation, "grid": grid.settings(), "method": method, "steps": steps, "dt": dt,
                "bc": bc, "scheme": scheme, "times": times.tolist()}
    if method in ("ssprk2", "ssprk3", "imex"):
        settings.update(scheme="muscl", limiter=limiter, cfl=cfl, max_cfl=stats.max_cfl, rejected=stats.rejected)
    if rtol is not None or atol is not None:
        settings.update(rtol=rtol, atol=atol, rejected=stats.rejected)
    return _finish(grid, times, dens, equation, settings, stats, 0, seconds, target, schedule)


def solve_forward(field_or_schedule, p0, grid: Grid, times, *, method: str = "trbdf2", steps: int | None = 100,
                  dt: float | None = None, bc: str = "zero_flux", scheme: str = "sg", target=None,
                  rtol: float | None = None, atol: float | None = None, limiter: str = "vanleer",
                  cfl: float | None = None) -> FPSolution:
    r"""Forward (noising) Fokker-Planck dp/dt = -div(f(t) x p) + g^2(t)/2 lap p (the Fokker-Planck equation of
    dx = f x dt + g dw) from
    p(times[0]) = p0 (array, or a Gaussian-mixture target: its exact p_{times[0]}) to increasing ``times``.

    Needs only the schedule (no NFE). ``target`` (default: p0 when p0 is a target) adds L1/TV/KL against the
    exact p_t. method="expm" is exact in time for schedules with f = k g^2/2 (VP, cosine, DDPM: k = -1;
    VE, EDM: k = 0). ``scheme="fv4"`` is fourth order in space (``operators``); ``rtol``/``atol`` make "trbdf2"
    adaptive; ``limiter``/``cfl`` configure method="imex" (``stepping.evolve``)."""
    schedule = _sched(field_or_schedule)
    times = _check_times(times, schedule, True, need_field=False)
    if target is None and hasattr(p0, "log_prob_t"):
        target = p0
    p_init = initial_density(p0, grid, schedule, times[0])
    k = schedule_ratio(schedule, times[0], times[-1]) if method == "expm" else None
    coeffs = LinearCoefficients(rate=lambda t: _f(schedule, t), diffusion=lambda t: 0.5 * _g2(schedule, t),
                                ratio=k, integral_D=None if k is None else _integral_D(schedule, k))
    sol = solve(grid, p_init, times, coeffs, equation="forward", method=method, steps=steps, dt=dt, bc=bc,
                scheme=scheme, target=target, schedule=schedule, rtol=rtol, atol=atol, limiter=limiter, cfl=cfl)
    sol.settings["schedule"] = schedule.settings()
    return sol


def solve_continuity(field: VelocityField, p0, grid: Grid, times, *, method: str | None = None,
                     steps: int | None = None, dt: float | None = None, bc: str = "zero_flux", target=None,
                     batch: int = 1 << 16, scheme: str = "upwind", limiter: str = "vanleer",
                     cfl: float | None = None) -> FPSolution:
    r"""PF-ODE continuity equation dp/dt = -div(v p), v = field.velocity = f x - g^2/2 s (Song et al. 2021,
    eq. 13), pure advection. ``times`` increasing runs the noising direction, decreasing the generation direction
    (dq/dtau = div(v q)). v is evaluated on the faces in batches of ``batch`` points (NFE counted).

    ``scheme="upwind"`` (default): the "sg" fluxes with D = 0 (first-order upwinding, positive), implicit
    ``method`` (default "trbdf2", 100 ``steps`` unless given). ``scheme="muscl"``: second-order MUSCL fluxes with
    the TVD ``limiter`` ("vanleer", "mc", "minmod") and SSP Runge-Kutta ``method`` ("ssprk3" default, or
    "ssprk2"), positive under the CFL bound of ``advection``; the step is chosen from ``cfl`` (default 0.9) unless
    ``steps``/``dt`` are given, which are then checked against the bound."""
    if not isinstance(field, VelocityField):
        raise TypeError(f"solve_continuity needs a VelocityField, got {type(field).__name__}")
    if scheme not in ("upwind", "muscl"):
        raise ValueError(f"scheme must be 'upwind' or 'muscl', got {scheme!r}")
    if scheme == "muscl":
        method = "ssprk3" if method is None else method
        if method not in ("ssprk2", "ssprk3"):
            raise ValueError(f"scheme='muscl' runs an explicit SSP Runge-Kutta method ('ssprk2' or 'ssprk3'), "
                             f"got method={method!r}")
        if steps is None and dt is None and cfl is None:
            cfl = 0.9
    else:
        method = "trbdf2" if method is None else method
        if method in ("ssprk2", "ssprk3", "imex"):
            raise ValueError(f"method {method!r} uses MUSCL fluxes: pass scheme='muscl'")
        if steps is None and dt is None:
            steps = 100
    schedule = field.schedule
    times = _check_times(times, schedule, None, need_field=True)
    reverse = times.size > 1 and times[1] < times[0]
    if target is None and hasattr(p0, "log_prob_t"):
        target = p0
    p_init = initial_density(p0, grid, schedule, times[0])
    sign = -1.0 if reverse else 1.0

    def drift(x, s):
        t = -s if reverse else s
        return sign * _field_eval(field, "velocity", x, t, batch)

    nfe0 = field.nfe
    sol = solve(grid, p_init, times, PointCoefficients(drift, lambda s: 0.0), equation="continuity",
                method=method, steps=steps, dt=dt, bc=bc, scheme="sg", target=target, schedule=schedule,
                reverse=reverse, limiter=limiter, cfl=cfl)
    sol.settings["schedule"] = schedule.settings()
    return _with_nfe(sol, field.nfe - nfe0)


def solve_reverse(field: VelocityField, p_start, grid: Grid, times, *, gamma: float = 1.0, method: str = "trbdf2",
                  steps: int | None = 100, dt: float | None = None, bc: str = "zero_flux", target=None,
                  batch: int = 1 << 16, limiter: str = "vanleer", cfl: float | None = None, rtol: float | None = None,
                  atol: float | None = None) -> FPSolution:
    r"""Generation direction: from p(times[0]) = p_start back to decreasing ``times`` (the prior at t_max to the data
    side) with the reverse SDE family in tau = times[0] - t (module docstring; Anderson 1982;
    Karras et al. 2022, eq. 6):

        dq/dtau = -div((-f x + (1+gamma^2)/2 g^2 s) q) + gamma^2 g^2/2 lap q.

    gamma = 1: reverse SDE; gamma = 0: reverse PF-ODE (pure advection, upwind). s = field.score on the faces, in
    batches (NFE counted). ``p_start``: an array, a target (its exact p_{times[0]}) or "prior". method="imex"
    (MUSCL advection with ``limiter``, exact diffusion sub-steps, step from ``cfl``) suits advection-dominated
    runs, "split" large 3-D grids; ``rtol``/``atol`` make "trbdf2" adaptive."""
    if not isinstance(field, VelocityField):
        raise TypeError(f"solve_reverse needs a VelocityField, got {type(field).__name__}")
    if not (gamma >= 0 and math.isfinite(gamma)):
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    schedule = field.schedule
    times = _check_times(times, schedule, False, need_field=True)
    p_init = initial_density(p_start, grid, schedule, times[0])
    c = 0.5 * (1.0 + gamma * gamma)

    def drift(x, s):
        t = -s
        sc = _field_eval(field, "score", x, t, batch)
        return -_f(schedule, t) * x + c * _g2(schedule, t) * sc

    nfe0 = field.nfe
    coeffs = PointCoefficients(drift, lambda s: 0.5 * gamma * gamma * _g2(schedule, -s))
    sol = solve(grid, p_init, times, coeffs, equation=f"reverse(gamma={gamma:g})", method=method, steps=steps,
                dt=dt, bc=bc, scheme="sg", target=target, schedule=schedule, reverse=True, limiter=limiter, cfl=cfl,
                rtol=rtol, atol=atol)
    sol.settings.update(schedule=schedule.settings(), gamma=gamma)
    return _with_nfe(sol, field.nfe - nfe0)


def _with_nfe(sol: FPSolution, nfe: int) -> FPSolution:
    from dataclasses import replace

    sol.settings["nfe"] = nfe
    return replace(sol, nfe=nfe)
