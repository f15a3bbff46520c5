r"""Time grids as data: descending float64 tensors t_0 = t_max > t_1 > ... > t_N = t_min.

Builders (N steps -> N + 1 points)::

    uniform     t_i = t_max + i/N (t_min - t_max)
    logsnr      lambda_i uniform between lambda(t_max) and lambda(t_min), t_i = t(lambda_i)   (DPM-Solver 'logSNR')
    karras      sigma_i = (s_max^{1/rho} + i/N (s_min^{1/rho} - s_max^{1/rho}))^rho on sigma/alpha = e^{-lambda},
                t_i = t(lambda = -log sigma_i)                                                    (EDM eq. 5, rho = 7)
    quadratic   t_i = (sqrt(t_max) + i/N (sqrt(t_min) - sqrt(t_max)))^2           (DPM-Solver 'time_quadratic', official code)
    a user list, which must be strictly decreasing and inside [t_min, t_max].

The karras grid is spaced in the EDM noise level sigma/alpha of the given schedule, so on the EDM schedule it
is exactly Karras et al.'s grid (without the appended sigma = 0: ending with the denoiser is the sampler's
``final="denoise"`` option).
"""
from __future__ import annotations

import torch

from ..schedules import Schedule

GRID_KINDS = ("uniform", "logsnr", "karras", "quadratic")
MAX_STEPS = 10**8  # a larger grid is a mistyped size, not a sampler setting

__all__ = ["time_grid", "GRID_KINDS", "check_grid"]


def time_grid(schedule: Schedule, n: int | None = None, kind="logsnr", *, rho: float = 7.0,
              t_min: float | None = None, t_max: float | None = None, field=None, method: str | None = None,
              **kw) -> torch.Tensor:
    """A descending float64 grid of ``n`` steps from t_max to t_min (or ``kind`` = a user list of times).

    kind="optimized" needs ``field`` and ``method``: the grid of ``samplers.optimize.optimize_grid(field, n,
    method, **kw)``; kind="ays" (optional ``model`` "sd15" or "sdxl") is the Align Your Steps schedule
    (``samplers.optimize.ays_grid``)."""
    if isinstance(kind, str) and kind == "optimized":
        missing = [name for name, v in (("field", field), ("method", method)) if v is None]
        if missing:
            raise ValueError(f"kind='optimized' needs the keyword argument(s) {' and '.join(missing)} "
                             f"(the VelocityField and the sampler the grid is optimised for)")
        if field.schedule is not schedule and field.schedule.settings() != schedule.settings():
            raise ValueError(f"kind='optimized': field.schedule {field.schedule!r} is not {schedule!r}")
        from .optimize import optimize_grid
        return optimize_grid(field, n, method, t_min=t_min, t_max=t_max, **kw).grid
    if isinstance(kind, str) and kind == "ays":
        if t_min is not None or t_max is not None or field is not None or method is not None:
            raise ValueError("kind='ays' is a published schedule: it takes no t_min, t_max, field or method")
        from .optimize import ays_grid
        return ays_grid(schedule, n, **kw)
    if field is not None or method is not None or kw:
        raise TypeError(f"time_grid(kind={kind!r}) takes no field, method or {sorted(kw)}; "
                        f"those are for kind='optimized'")
    if not isinstance(kind, str):
        return check_grid(schedule, torch.as_tensor(kind, dtype=torch.float64))
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind {kind!r}; choose one of {GRID_KINDS}, 'optimized' (with field= "
                         f"and method=), 'ays' or pass a list of times")
    if n is None or int(n) != n or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}")
    if n > MAX_STEPS:
        raise ValueError(f"number of steps must be <= {MAX_STEPS:,} (a grid of n + 1 float64 times), got {n!r}")
    t_lo = schedule.t_min if t_min is None else float(t_min)
    t_hi = schedule.t_max if t_max is None else float(t_max)
    if not (schedule.t_min <= t_lo < t_hi <= schedule.t_max):
        raise ValueError(f"need {schedule.t_min} <= t_min < t_max <= {schedule.t_max}, got t_min={t_lo}, t_max={t_hi}")
    u = torch.arange(n + 1, dtype=torch.float64) / n
    lo = torch.tensor(t_lo, dtype=torch.float64)
    hi = torch.tensor(t_hi, dtype=torch.float64)
    if kind == "uniform":
        t = hi + u * (lo - hi)
    elif kind == "quadratic":  # official DPM-Solver get_time_steps('time_quadratic'): linspace in sqrt(t), squared
        t = (hi.sqrt() + u * (lo.sqrt() - hi.sqrt())) ** 2
    elif kind == "logsnr":
        l_hi, l_lo = schedule.lam(hi), schedule.lam(lo)
        t = schedule.t_from_lam(l_hi + u * (l_lo - l_hi))
    else:
        if rho <= 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        s_max, s_min = torch.exp(-schedule.lam(hi)), torch.exp(-schedule.lam(lo))
        sig = (s_max ** (1 / rho) + u * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        t = schedule.t_from_lam(-torch.log(sig))
    t[0], t[-1] = hi, lo  # exact end points (t_from_lam round-off)
    return check_grid(schedule, t)


def check_grid(schedule: Schedule, grid: torch.Tensor, allow_increasing: bool = False) -> torch.Tensor:
    """Validate a grid: 1-D, >= 2 points, strictly decreasing (or, with ``allow_increasing``, strictly monotone:
    an increasing grid runs a deterministic sampler from data to noise, i.e. inversion), inside [t_min, t_max];
    returned as float64."""
    g = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if g.numel() < 2:
        raise ValueError(f"a time grid needs at least 2 points, got {g.tolist()}")
    if not torch.isfinite(g).all():
        i = int(torch.nonzero(~torch.isfinite(g))[0])
        raise ValueError(f"time grid must be finite; t[{i}]={g[i].item()!r}")
    d = torch.diff(g)
    if allow_increasing and (d > 0).all():
        schedule.check_t(g, what="grid time")
        return g
    if not (d < 0).all():
        i = int(torch.nonzero(d >= 0)[0])
        raise ValueError(f"time grid must be strictly decreasing (data at t=0, noise at t_max); "
                         f"t[{i}]={g[i].item()!r} <= t[{i + 1}]={g[i + 1].item()!r}")
    schedule.check_t(g, what="grid time")
    return g
