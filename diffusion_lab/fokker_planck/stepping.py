r"""Time stepping of the semi-discrete system dp/ds = L(s) p (``operators.assemble``) in a solver time s.

Coefficients are objects with ``face_drifts(grid, s, periodic) -> [b_0, .., b_{d-1}]``, ``diffusion(s) -> D``
and ``time_independent``. Methods (h = step, L_n = L(s_n)):

- ``"be"``  backward Euler  (I - h L_{n+1}) p_{n+1} = p_n: first order, L-stable, positive for every h with the
  "sg" scheme ((I - hL) is an M-matrix).
- ``"cn"``  Crank-Nicolson (I - h/2 L_{n+1}) p_{n+1} = (I + h/2 L_n) p_n: second order, A-stable (not L-stable:
  rough data ring, and p can go slightly negative).
- ``"trbdf2"`` TR-BDF2 (Bank et al. 1985; Hosea & Shampine 1996), gamma = 2 - sqrt 2, d = gamma/2::

      (I - d h L(s_n + gamma h)) p_g = (I + d h L_n) p_n,
      (I - d h L_{n+1}) p_{n+1} = [p_g - (1-gamma)^2 p_n] / (gamma (2 - gamma))

  second order and L-stable; both stages factor the same I - d h L when L does not depend on s.
- ``"euler"`` explicit Euler p_{n+1} = (I + h L_n) p_n, positive iff h <= 1 / max_i(-L_ii); a larger step is
  refused with the offending numbers.
- ``"expm"`` exponential integrator for separable operators L = sum_a I (x) L_a (x) I (linear drift b = f(s) x
  and scalar D(s)): p <- (E_0 (x) .. (x) E_{d-1}) p, E_a = exp(h L_a(s_mid)) (exponential midpoint rule, second
  order). When f(s) = k D(s) for a constant k, L(s) = D(s) L^{(k)} exactly and E_a = exp((int D ds) L_a^{(k)})
  integrates the semi-discrete system exactly in time (one step per output interval). exp of a matrix with
  non-negative off-diagonals is non-negative, and 1^T L_a = 0 gives 1^T E_a = 1^T (mass) up to round-off.

- ``"ssprk2"``, ``"ssprk3"`` explicit strong-stability-preserving Runge-Kutta with MUSCL fluxes and a TVD
  ``limiter`` for pure advection (D = 0, the PF-ODE continuity equation), and ``"imex"``: Strang splitting of
  MUSCL/SSP-RK3 advection with exact diffusion sub-steps; positive under the CFL bound h max_j r_j <= 1
  (``advection``), with the step chosen from ``cfl`` when neither ``steps`` nor ``dt`` is given.
- ``"split"`` dimension (Strang) splitting with one-axis TR-BDF2 sub-steps solved by batched tridiagonal
  (Thomas) solves: O(N) memory and work per step, for large 3-D grids (``splitting``).

Adaptive TR-BDF2 (``rtol`` given): the embedded error estimate of Hosea & Shampine (1996). Written as the
three-stage ESDIRK with k_i = L(s_i) Y_i, c = (0, gamma, 1), w = sqrt(2)/4,
y_{n+1} = y_n + h (w k_1 + w k_2 + d k_3), the estimate is::

    est = (I - d h L_{n+1})^{-1} h [ (4w - 1)/3 k_1 - 1/3 k_2 + 2d/3 k_3 ]

(the third-order companion b^ = ((1 - w)/3, (3w + 1)/3, d/3), filtered by the stage matrix for stiff
components). A step is accepted when the RMS of est / (atol + rtol max(|y_n|, |y_{n+1}|)) is <= 1 and the next h
is scaled by 0.9 err^{-1/3} in [0.2, 5]; a change within [1, 1.5] is skipped to re-use the LU factors.

Every implicit stage is a sparse LU solve (``scipy.sparse.linalg.splu``); factorisations are cached on
(coefficient of L, s) -- or on the coefficient alone for a time-independent operator -- and operators L(s) on s,
so e.g. Crank-Nicolson re-uses L_{n+1} of one step as L_n of the next (no extra field evaluations).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.linalg import expm

from .grid import Grid
from .operators import assemble, assemble_1d

__all__ = ["METHODS", "evolve", "substeps", "EvolveStats"]

METHODS = ("be", "cn", "trbdf2", "euler", "expm", "ssprk2", "ssprk3", "imex", "split")
_GAMMA = 2.0 - math.sqrt(2.0)
_D = _GAMMA / 2.0


_W = math.sqrt(2.0) / 4.0
# b - b^ of the embedded pair (Hosea & Shampine 1996), per stage derivative k_1, k_2, k_3
_E = ((4.0 * _W - 1.0) / 3.0, -1.0 / 3.0, 2.0 * _D / 3.0)


@dataclass
class EvolveStats:
    steps: int = 0
    factorizations: int = 0
    operator_builds: int = 0
    rejected: int = 0
    max_cfl: float = 0.0


def substeps(s_out, steps: int | None = None, dt: float | None = None) -> list[int]:
    """Number of uniform sub-steps in each interval of the increasing times ``s_out``: about ``steps`` in all
    (proportional to the interval lengths), or the fewest with h <= ``dt``; at least one per interval."""
    s_out = np.asarray(s_out, dtype=np.float64)
    lens = np.diff(s_out)
    if np.any(lens <= 0):
        raise ValueError(f"solver times must be strictly increasing, got {s_out.tolist()}")
    if (steps is None) == (dt is None):
        raise ValueError(f"give exactly one of steps and dt, got steps={steps}, dt={dt}")
    if dt is not None:
        if not dt > 0:
            raise ValueError(f"dt must be > 0, got {dt}")
        return [max(1, int(math.ceil(L / dt - 1e-9))) for L in lens]
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    span = float(s_out[-1] - s_out[0])
    return [max(1, int(round(steps * L / span))) for L in lens]


class _Cache:
    """A small LRU map (operators L(s) and LU factors)."""

    def __init__(self, size: int):
        self.size, self.d = size, OrderedDict()

    def get(self, key, make):
        if key in self.d:
            self.d.move_to_end(key)
            return self.d[key]
        val = make()
        self.d[key] = val
        if len(self.d) > self.size:
            self.d.popitem(last=False)
        return val


def _apply_separable(E: list, p: np.ndarray) -> np.ndarray:
    """(E_0 (x) .. (x) E_{d-1}) p for p shaped like the grid."""
    for a, Ea in enumerate(E):
        p = np.moveaxis(np.tensordot(Ea, p, axes=([1], [a])), 0, a)
    return p


def evolve(grid: Grid, p0, s_out, coeffs, *, method: str = "trbdf2", steps: int | None = None,
           dt: float | None = None, bc: str = "zero_flux", scheme: str = "sg", stats: EvolveStats | None = None,
           limiter: str = "vanleer", cfl: float | None = None, rtol: float | None = None, atol: float | None = None):
    """Integrate dp/ds = L(s) p from p(s_out[0]) = p0 and return the densities at every s in ``s_out`` as an
    array of shape (len(s_out), *grid.shape) (row 0 is p0). See the module docstring for the methods.

    ``limiter`` and ``cfl`` apply to the MUSCL methods ("ssprk2", "ssprk3", "imex"; ``scheme`` is then ignored);
    ``rtol`` (with ``atol``, default 0) turns "trbdf2" adaptive (``steps``/``dt`` give the first step only)."""
    if method not in METHODS:
        raise ValueError(f"unknown time-stepping method {method!r}; choose one of {METHODS}")
    stats = stats if stats is not None else EvolveStats()
    p = grid.check_density(p0, "p0").copy()
    s_out = np.asarray(s_out, dtype=np.float64)
    out = np.empty((len(s_out),) + grid.shape)
    out[0] = p
    if len(s_out) == 1:
        return out
    periodic = bc == "periodic"
    if method == "expm":
        return _evolve_expm(grid, p, s_out, coeffs, steps, dt, bc, scheme, stats, out)
    if method in ("ssprk2", "ssprk3", "imex"):
        from .advection import evolve_explicit

        return evolve_explicit(grid, p, s_out, coeffs, method=method, limiter=limiter, steps=steps, dt=dt, cfl=cfl,
                               bc=bc, stats=stats, out=out)
    if method == "split":
        from .splitting import evolve_split

        return evolve_split(grid, p, s_out, coeffs, steps=steps, dt=dt, bc=bc, scheme=scheme, stats=stats, out=out)
    adaptive = rtol is not None or atol is not None
    if adaptive:
        if method != "trbdf2":
            raise ValueError(f"rtol/atol need method='trbdf2' (embedded error estimate), got method={method!r}")
        rtol = 1e-3 if rtol is None else float(rtol)
        atol = 0.0 if atol is None else float(atol)
        if not (rtol > 0 and atol >= 0 and math.isfinite(rtol) and math.isfinite(atol)):
            raise ValueError(f"need rtol > 0 and atol >= 0, got rtol={rtol}, atol={atol}")
        if np.any(np.diff(s_out) <= 0):
            raise ValueError(f"solver times must be strictly increasing, got {s_out.tolist()}")
    else:
        nsub = substeps(s_out, steps, dt)
    ti = bool(getattr(coeffs, "time_independent", False))
    N = grid.size
    eye = sp.identity(N, format="csc")
    ops = _Cache(4)
    lus = _Cache(3)

    def op(s):
        key = None if ti else float(s)

        def make():
            stats.operator_builds += 1
            return assemble(grid, coeffs.face_drifts(grid, float(s), periodic), coeffs.diffusion(float(s)), bc, scheme).tocsc()

        return ops.get(key, make)

    def solve(c, s, rhs):
        key = (float(c),) if ti else (float(c), float(s))

        def make():
            stats.factorizations += 1
            return spla.splu((eye - c * op(s)).tocsc(), permc_spec="MMD_AT_PLUS_A")

        return lus.get(key, make).solve(rhs)

    x = p.reshape(-1)
    if adaptive:
        span = float(s_out[-1] - s_out[0])
        h = dt if dt is not None else (span / steps if steps is not None else 1e-2 * span)
        return _trbdf2_adaptive(grid, x, s_out, op, solve, h, rtol, atol, stats, out)
    for k in range(len(s_out) - 1):
        h0 = (s_out[k + 1] - s_out[k]) / nsub[k]
        for i in range(nsub[k]):
            s = s_out[k] + i * h0
            # same formula for s1 here and for s in the next sub-step, so the cached L(s1) is found again
            s1 = s_out[k + 1] if i == nsub[k] - 1 else s_out[k] + (i + 1) * h0
            h = h0  # not s1 - s: a round-off change of h would defeat the factorisation cache
            if method == "be":
                x = solve(h, s1, x)
            elif method == "cn":
                x = solve(0.5 * h, s1, x + 0.5 * h * (op(s) @ x))
            elif method == "trbdf2":
                xg = solve(_D * h, s + _GAMMA * h, x + _D * h * (op(s) @ x))
                x = solve(_D * h, s1, (xg - (1.0 - _GAMMA) ** 2 * x) / (_GAMMA * (2.0 - _GAMMA)))
            else:  # explicit Euler
                L = op(s)
                worst = float(-L.diagonal().min())
                if h * worst > 1.0:
                    raise ValueError(
                        f"explicit Euler step h = {h:.4g} breaks positivity at s = {s:.4g}: need h <= 1/max(-L_ii) = "
                        f"{1.0 / worst:.4g} (h max(-L_ii) = {h * worst:.4g} > 1); use more steps or an implicit method"
                    )
                x = x + h * (L @ x)
            stats.steps += 1
        out[k + 1] = x.reshape(grid.shape)
    return out


def _trbdf2_adaptive(grid, x, s_out, op, solve, h, rtol, atol, stats, out, max_steps: int = 100_000):
    """TR-BDF2 with the Hosea-Shampine error estimate and step-size control (module docstring)."""
    for k in range(len(s_out) - 1):
        s, end = float(s_out[k]), float(s_out[k + 1])
        while s < end:
            if stats.steps + stats.rejected >= max_steps:
                raise RuntimeError(f"adaptive TR-BDF2 exceeded {max_steps} steps at s = {s:.6g} (h = {h:.3g})")
            hs = min(h, end - s)
            s1 = end if hs >= end - s else s + hs
            k1 = op(s) @ x
            xg = solve(_D * hs, s + _GAMMA * hs, x + _D * hs * k1)
            xn = solve(_D * hs, s1, (xg - (1.0 - _GAMMA) ** 2 * x) / (_GAMMA * (2.0 - _GAMMA)))
            k2 = (xg - x) / (_D * hs) - k1
            k3 = (xn - x - hs * _W * (k1 + k2)) / (_D * hs)
            est = solve(_D * hs, s1, hs * (_E[0] * k1 + _E[1] * k2 + _E[2] * k3))
            scale = atol + rtol * np.maximum(np.abs(x), np.abs(xn))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(scale > 0, est / scale, np.where(est == 0, 0.0, np.inf))
            err = float(np.sqrt(np.mean(ratio * ratio)))
            fac = min(5.0, max(0.2, 0.9 * (err if err > 0 else 1e-10) ** (-1.0 / 3.0)))
            if err <= 1.0:
                x, s = xn, s1
                stats.steps += 1
                if fac > 1.5 and hs == h:
                    h *= fac
            else:
                stats.rejected += 1
                h = hs * fac
        out[k + 1] = x.reshape(grid.shape)
    return out


def _stochastic_expm(A: np.ndarray) -> np.ndarray:
    """exp(A) for A with zero column sums, with the round-off of its column sums (1^T exp(A) = 1^T in exact
    arithmetic; scaling-and-squaring leaves ~1e-13 at n = 256) moved onto the diagonal."""
    E = expm(A)
    E[np.diag_indices_from(E)] += 1.0 - E.sum(axis=0)
    return E


def _evolve_expm(grid, p, s_out, coeffs, steps, dt, bc, scheme, stats, out):
    if not hasattr(coeffs, "rate"):
        raise ValueError("method='expm' needs a separable linear drift b = f(s) x with scalar D(s) "
                         f"(LinearCoefficients), got {type(coeffs).__name__}")
    periodic = bc == "periodic"

    def exps(f, D, h):
        """[exp(h L_a)] per axis for b = f x, diffusion D; axes with the same geometry share one expm."""
        mats, seen = [], {}
        for a in range(grid.dim):
            geo = (grid.lo[a], grid.hi[a], grid.n[a])
            if geo not in seen:
                xf = grid.edges(a)[1:] if periodic else grid.interior_faces(a)
                La = assemble_1d(f * xf, D, grid.dx[a], grid.n[a], bc, scheme)
                seen[geo] = _stochastic_expm(h * La)
                stats.factorizations += 1
            mats.append(seen[geo])
        stats.operator_builds += 1
        return mats

    if coeffs.ratio is not None and coeffs.integral_D is not None:
        for k in range(len(s_out) - 1):
            p = _apply_separable(exps(coeffs.ratio, 1.0, float(coeffs.integral_D(s_out[k], s_out[k + 1]))), p)
            stats.steps += 1
            out[k + 1] = p
        return out
    nsub = substeps(s_out, steps, dt)
    cache = _Cache(2)
    ti = bool(getattr(coeffs, "time_independent", False))
    for k in range(len(s_out) - 1):
        h = (s_out[k + 1] - s_out[k]) / nsub[k]
        for i in range(nsub[k]):
            sm = s_out[k] + (i + 0.5) * h
            key = (h,) if ti else (h, sm)
            E = cache.get(key, lambda sm=sm, h=h: exps(float(coeffs.rate(sm)), float(coeffs.diffusion(sm)), h))
            p = _apply_separable(E, p)
            stats.steps += 1
        out[k + 1] = p
    return out
