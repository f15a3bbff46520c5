r"""Probability-flow ODE solvers: explicit Runge-Kutta methods and an adaptive Dormand-Prince 5(4).

The ODE dx/dt = v(x, t) = f x - g^2/2 s (Song et al. 2021) is integrated from t_max to t_min in one of two
coordinate systems (option ``coords``)::

    "t"    the state x against time t, with the field's velocity v;
    "edm"  the scaled state xbar = x/alpha against the noise level sigmabar = sigma/alpha = e^{-lambda}:
           d xbar / d sigmabar = eps_hat(alpha xbar, t(sigmabar))   (Karras et al. 2022 eq. 4 with s = alpha;
           DDIM section 4.3). Euler in these coordinates is DDIM (Song, Meng & Ermon 2021 sec. 4.3).
"""
from __future__ import annotations

import math

import torch

from .base import register, step_iter

__all__ = ["rk_integrate", "TABLEAUS"]

# Butcher tableaus (a, b, c) of the explicit methods
TABLEAUS = {
    "euler": ([[]], [1.0], [0.0]),
    "midpoint": ([[], [0.5]], [0.0, 1.0], [0.0, 0.5]),
    "heun": ([[], [1.0]], [0.5, 0.5], [0.0, 1.0]),
    "rk4": ([[], [0.5], [0.0, 0.5], [0.0, 0.0, 1.0]], [1 / 6, 1 / 3, 1 / 3, 1 / 6], [0.0, 0.5, 0.5, 1.0]),
}


class _Coords:
    """Map between (x, t) and the integration variables (y, s) of the chosen coordinates."""

    def __init__(self, field, coords: str):
        if coords not in ("t", "edm"):
            raise ValueError(f"coords must be 't' or 'edm', got {coords!r}")
        self.field, self.kind, self.sch = field, coords, field.schedule

    def s_of_t(self, t):
        return t if self.kind == "t" else torch.exp(-self.sch.lam(t))

    def t_of_s(self, s):
        return s if self.kind == "t" else self.sch.t_from_lam(-torch.log(s))

    def y_of_x(self, x, t):
        return x if self.kind == "t" else x / float(self.sch.alpha(t))

    def x_of_y(self, y, t):
        return y if self.kind == "t" else y * float(self.sch.alpha(t))

    def deriv(self, y, s):
        t = self.t_of_s(s)
        if self.kind == "t":
            return self.field.velocity(y, t)
        return self.field.eps(self.x_of_y(y, t), t)


def rk_integrate(field, x, grid, tableau="heun", *, coords="t", final_euler=False, callback=None, progress=False):
    """Integrate the PF-ODE over ``grid`` with an explicit Runge-Kutta tableau; NFE = stages * N
    (minus stages - 1 when ``final_euler``: the last step is a plain Euler step, as in EDM's Heun)."""
    a, b, c = TABLEAUS[tableau]
    cs = _Coords(field, coords)
    s_grid = cs.s_of_t(grid)
    y = cs.y_of_x(x, grid[0])
    n = len(grid) - 1
    for i in step_iter(n, progress, tableau):
        s0, s1 = s_grid[i], s_grid[i + 1]
        h = float(s1 - s0)
        if final_euler and i == n - 1:
            y = y + h * cs.deriv(y, s0)
        else:
            k = []
            for j in range(len(b)):
                yj = y
                for l, alj in enumerate(a[j]):
                    if alj:
                        yj = yj + (h * alj) * k[l]
                # stage times: exact end points where c = 0 or 1, so no t_from_lam round-off at grid times
                sj = s0 if c[j] == 0 else (s1 if c[j] == 1 else s0 + c[j] * (s1 - s0))
                k.append(cs.deriv(yj, sj))
            y = y + h * sum(bj * kj for bj, kj in zip(b, k) if bj)
        if callback is not None:
            callback(i + 1, cs.x_of_y(y, grid[i + 1]))
    return cs.x_of_y(y, grid[-1]), {"coords": coords}


@register("euler", family="ode", order=1, stochastic=False, nfe_per_step=1)
def euler(field, x, grid, *, coords="t", generator=None, callback=None, progress=False):
    """Euler on the PF-ODE (coords='edm': Euler in (x/alpha, sigma/alpha), which is DDIM)."""
    return rk_integrate(field, x, grid, "euler", coords=coords, callback=callback, progress=progress)


@register("heun", family="ode", order=2, stochastic=False, nfe_per_step=2,
          nfe_of_steps=lambda n, final_euler=True: 2 * n - 1 if final_euler else 2 * n)
def heun(field, x, grid, *, coords="t", final_euler=True, generator=None, callback=None, progress=False):
    """Heun's second-order method (Karras et al. 2022 Alg. 1), last step Euler: NFE = 2N - 1
    (``final_euler=False``: Heun in the last step too, NFE = 2N)."""
    return rk_integrate(field, x, grid, "heun", coords=coords, final_euler=final_euler, callback=callback,
                        progress=progress)


@register("midpoint", family="ode", order=2, stochastic=False, nfe_per_step=2)
def midpoint(field, x, grid, *, coords="t", generator=None, callback=None, progress=False):
    """Explicit midpoint rule on the PF-ODE (2 NFE per step)."""
    return rk_integrate(field, x, grid, "midpoint", coords=coords, callback=callback, progress=progress)


@register("rk4", family="ode", order=4, stochastic=False, nfe_per_step=4)
def rk4(field, x, grid, *, coords="t", generator=None, callback=None, progress=False):
    """Classical fourth-order Runge-Kutta on the PF-ODE (4 NFE per step)."""
    return rk_integrate(field, x, grid, "rk4", coords=coords, callback=callback, progress=progress)


# Dormand & Prince (1980) 5(4) coefficients, FSAL
_DP_A = [
    [],
    [1 / 5],
    [3 / 40, 9 / 40],
    [44 / 45, -56 / 15, 32 / 9],
    [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
    [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
    [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84],
]
_DP_C = [0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0]
_DP_B5 = [35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0]
_DP_B4 = [5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40]


@register("adaptive", family="ode", order=5, stochastic=False, nfe_per_step=float("nan"),
          description="Dormand-Prince 5(4) with error control (rtol, atol); NFE reported")
def adaptive(field, x, grid, *, rtol=1e-5, atol=1e-5, coords="t", h0=None, max_steps=100_000,
             generator=None, callback=None, progress=False):
    r"""Adaptive Dormand-Prince 5(4) (FSAL) on the PF-ODE, stopping exactly at every grid time.

    One step size for the whole batch, accepted when max over samples of the RMS of
    err / (atol + rtol max(|y|, |y_new|)) is <= 1; the step is then scaled by 0.9 err^{-1/5} in [0.2, 5].
    """
    if rtol <= 0 or atol < 0:
        raise ValueError(f"need rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
    cs = _Coords(field, coords)
    s_grid = cs.s_of_t(grid)
    y = cs.y_of_x(x, grid[0])
    s = s_grid[0].clone()
    k1 = cs.deriv(y, s)
    direction = -1.0 if s_grid[-1] < s_grid[0] else 1.0
    span = float((s_grid[0] - s_grid[-1]).abs())
    h = abs(h0) if h0 else 1e-2 * span
    accepted = rejected = 0
    dims = tuple(range(1, y.ndim))
    for i in range(1, len(s_grid)):
        target = s_grid[i]
        while float((target - s) * direction) > 1e-14 * max(1.0, abs(float(target))):
            if accepted + rejected >= max_steps:
                raise RuntimeError(f"adaptive: exceeded max_steps={max_steps} at t={float(cs.t_of_s(s)):.6g}")
            h = min(h, float(abs(target - s)))
            hs = direction * h
            k = [k1]
            for j in range(1, 7):
                yj = y + hs * sum(a * kk for a, kk in zip(_DP_A[j], k) if a)
                sj = target if (j >= 5 and h >= float(abs(target - s))) else s + _DP_C[j] * hs
                k.append(cs.deriv(yj, sj))
            y_new = y + hs * sum(bb * kk for bb, kk in zip(_DP_B5, k) if bb)
            err = hs * sum((b5 - b4) * kk for b5, b4, kk in zip(_DP_B5, _DP_B4, k) if b5 != b4)
            scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            e = float(torch.sqrt(((err / scale) ** 2).mean(dim=dims)).max())
            if e <= 1.0:
                last = h >= float(abs(target - s))
                s = target.clone() if last else s + hs
                y, k1 = y_new, k[6]
                accepted += 1
            else:
                rejected += 1
            h *= min(5.0, max(0.2, 0.9 * (e if e > 0 else 1e-10) ** -0.2))
        if callback is not None:
            callback(i, cs.x_of_y(y, grid[i]))
    return cs.x_of_y(y, grid[-1]), {"accepted": accepted, "rejected": rejected, "rtol": rtol, "atol": atol}
