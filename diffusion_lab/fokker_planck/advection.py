r"""High-resolution finite volumes for advection-dominated densities: MUSCL reconstruction with TVD limiters,
strong-stability-preserving Runge-Kutta time stepping and an IMEX (Strang) split for drift-diffusion.

Semi-discrete advection (van Leer 1979, "Towards the ultimate conservative difference scheme V"). For
dp/ds = -div(b p) with face drifts b_{j+1/2} (``face_drifts`` of the coefficient objects), per axis a::

    sigma_j = phi(Delta_{j-1/2}, Delta_{j+1/2}),          Delta_{j+1/2} = p_{j+1} - p_j,
    p^L_{j+1/2} = p_j + sigma_j / 2,   p^R_{j+1/2} = p_{j+1} - sigma_{j+1} / 2,
    F_{j+1/2} = b^+_{j+1/2} p^L_{j+1/2} + b^-_{j+1/2} p^R_{j+1/2},     b^+ = max(b, 0), b^- = min(b, 0),
    dp_j/ds = -sum_a (F_{j+1/2} - F_{j-1/2}) / dx_a,

with the limited slope phi(a, b) = 0 when a b <= 0 and otherwise (Sweby 1984; LeVeque 2002, ch. 6)::

    minmod:   sign(a) min(|a|, |b|)
    van Leer: 2 a b / (a + b)                                  (van Leer 1974)
    MC:       sign(a) min(2|a|, 2|b|, |a + b|/2)               (van Leer 1977, monotonised central)
    none:     0 (first-order upwind, for comparison).

Every limiter satisfies |sigma_j| <= 2 min(|Delta_{j-1/2}|, |Delta_{j+1/2}|), so the face values of cell j lie
between the neighbouring cell averages: for p >= 0 they are in [0, 2 p_j] and sum to 2 p_j. Boundary cells of a
zero-flux box get sigma = 0 and the box faces carry F = 0 (mass exact); periodic boxes wrap.

Positivity (CFL) condition. A forward-Euler step p + h dp/ds keeps p >= 0 when h r_j <= 1 in every cell, with
the outflow rate::

    r_j = sum_a 2 max(b^+_{j+1/2}, -b^-_{j-1/2}) / dx_a

(the outflow b^+_{j+1/2} p^L_{j+1/2} - b^-_{j-1/2} p^R_{j-1/2} is at most max(.) (p^L + p^R) = 2 max(.) p_j, and
inflows are >= 0). For a constant speed in 1-D this is |b| h / dx <= 1/2, the classical MUSCL bound; under it the
1-D scheme is TVD and every new value is a convex combination of old neighbours (Harten 1983), so no new extrema
appear. The SSP Runge-Kutta methods (Shu & Osher 1988; Gottlieb, Shu & Tadmor 2001) are convex combinations of
forward-Euler steps with SSP coefficient 1, so the same bound (checked at every stage's drift) carries over::

    ssprk2:  p1 = p + h L(p, s);  p' = p/2 + (p1 + h L(p1, s + h))/2
    ssprk3:  p1 = p + h L(p, s);  p2 = 3p/4 + (p1 + h L(p1, s + h))/4;  p' = p/3 + 2(p2 + h L(p2, s + h/2))/3.

IMEX split for dp/ds = -div(b p) + D(s) lap p (``method="imex"``): Strang splitting
p' = H(h/2) A(h) H(h/2) p with the advection sub-step A by MUSCL + SSP-RK3 and the diffusion sub-steps H solved
exactly on the grid, H(h/2) = (x)_a exp(theta Lap_a), theta = D(s_mid) h/2 (midpoint rule) with Lap_a the
three-point finite-volume Laplacian of axis a (zero-flux or periodic). exp(theta Lap_a) is entry-wise
non-negative with unit column sums, so the split step is positive under the advection CFL bound for any
diffusion and conserves mass; it is second order in h.
"""
from __future__ import annotations

import math

import numpy as np

from .grid import Grid

__all__ = ["LIMITERS", "EXPLICIT_METHODS", "limited_slope", "muscl_rhs", "outflow_rate", "evolve_explicit"]

LIMITERS = ("minmod", "vanleer", "mc", "none")
EXPLICIT_METHODS = ("ssprk2", "ssprk3", "imex")


def limited_slope(a, b, limiter: str = "vanleer") -> np.ndarray:
    r"""The limited slope phi(a, b) of the one-sided differences a = Delta_{j-1/2}, b = Delta_{j+1/2}.

    Parameters
    ----------
    a, b : array_like
        Backward and forward differences p_j - p_{j-1} and p_{j+1} - p_j (same shape).
    limiter : str
        ``"minmod"``, ``"vanleer"``, ``"mc"`` or ``"none"`` (module docstring for the formulas).

    Returns
    -------
    numpy.ndarray
        sigma_j, zero where a b <= 0 (at extrema) and |sigma_j| <= 2 min(|a|, |b|) everywhere.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if limiter == "none":
        return np.zeros(np.broadcast(a, b).shape)
    same = a * b > 0
    if limiter == "minmod":
        s = np.sign(a) * np.minimum(np.abs(a), np.abs(b))
    elif limiter == "vanleer":
        with np.errstate(divide="ignore", invalid="ignore"):
            s = 2.0 * a * b / (a + b)
    elif limiter == "mc":
        s = np.sign(a) * np.minimum(np.minimum(2.0 * np.abs(a), 2.0 * np.abs(b)), 0.5 * np.abs(a + b))
    else:
        raise ValueError(f"unknown limiter {limiter!r}; choose one of {LIMITERS}")
    return np.where(same, s, 0.0)


def _slopes(p: np.ndarray, axis: int, limiter: str, periodic: bool) -> np.ndarray:
    """sigma_j along ``axis`` (shape of p); zero in the two boundary cells of a zero-flux box."""
    if limiter == "none":
        return np.zeros_like(p)
    if periodic:
        fwd = np.roll(p, -1, axis) - p
        return limited_slope(np.roll(fwd, 1, axis), fwd, limiter)
    d = np.diff(p, axis=axis)
    n = p.shape[axis]
    inner = limited_slope(np.take(d, range(0, n - 2), axis), np.take(d, range(1, n - 1), axis), limiter)
    pad = [(0, 0)] * p.ndim
    pad[axis] = (1, 1)
    return np.pad(inner, pad)


def _face_flux(p: np.ndarray, b: np.ndarray, axis: int, limiter: str, periodic: bool) -> np.ndarray:
    """F_{j+1/2} on the faces of ``axis`` (interior faces, or n faces with the wrap face last when periodic)."""
    sig = _slopes(p, axis, limiter, periodic)
    left = p + 0.5 * sig  # p^L at face j+1/2 from cell j
    right = p - 0.5 * sig  # p^R at face j-1/2 from cell j
    n = p.shape[axis]
    if periodic:
        pl, pr = left, np.roll(right, -1, axis)
    else:
        pl, pr = np.take(left, range(0, n - 1), axis), np.take(right, range(1, n), axis)
    return np.maximum(b, 0.0) * pl + np.minimum(b, 0.0) * pr


def _divergence(F: np.ndarray, axis: int, dx: float, periodic: bool) -> np.ndarray:
    """(F_{j+1/2} - F_{j-1/2}) / dx per cell (zero box-face fluxes unless periodic)."""
    if periodic:
        return (F - np.roll(F, 1, axis)) / dx
    pad = [(0, 0)] * F.ndim
    pad[axis] = (1, 1)
    return np.diff(np.pad(F, pad), axis=axis) / dx


def muscl_rhs(grid: Grid, p: np.ndarray, face_drift, limiter: str = "vanleer", bc: str = "zero_flux") -> np.ndarray:
    r"""dp/ds = -sum_a (F_{j+1/2} - F_{j-1/2}) / dx_a with the limited MUSCL upwind flux F (module docstring).

    Parameters
    ----------
    grid : Grid
        The cell-centred grid.
    p : numpy.ndarray
        Cell averages, shape ``grid.shape``.
    face_drift : sequence of numpy.ndarray
        b_a on the faces normal to axis a, shape ``grid.face_shape(a, periodic)``.
    limiter : str
        One of ``LIMITERS``.
    bc : str
        ``"zero_flux"`` or ``"periodic"``.

    Returns
    -------
    numpy.ndarray
        The time derivative, shape ``grid.shape``; its sum is zero to round-off (conservation).
    """
    periodic = bc == "periodic"
    out = np.zeros(grid.shape)
    for a in range(grid.dim):
        b = np.asarray(face_drift[a], dtype=np.float64).reshape(grid.face_shape(a, periodic))
        out -= _divergence(_face_flux(p, b, a, limiter, periodic), a, grid.dx[a], periodic)
    return out


def outflow_rate(grid: Grid, face_drift, bc: str = "zero_flux") -> float:
    r"""max_j r_j, r_j = sum_a 2 max(b^+_{j+1/2}, -b^-_{j-1/2}) / dx_a: a forward-Euler MUSCL step with
    h max_j r_j <= 1 keeps p >= 0 (module docstring).

    Parameters
    ----------
    grid : Grid
        The grid.
    face_drift : sequence of numpy.ndarray
        Face drifts per axis, shape ``grid.face_shape(a, periodic)``.
    bc : str
        ``"zero_flux"`` (box faces carry no flux) or ``"periodic"``.

    Returns
    -------
    float
        The largest outflow rate (1/time); 0 for a zero drift.
    """
    periodic = bc == "periodic"
    r = np.zeros(grid.shape)
    for a in range(grid.dim):
        b = np.asarray(face_drift[a], dtype=np.float64).reshape(grid.face_shape(a, periodic))
        if periodic:
            right = np.maximum(b, 0.0)
            left = np.maximum(-np.roll(b, 1, a), 0.0)
        else:
            pad_hi = [(0, 0)] * grid.dim
            pad_lo = [(0, 0)] * grid.dim
            pad_hi[a], pad_lo[a] = (0, 1), (1, 0)
            right = np.pad(np.maximum(b, 0.0), pad_hi)
            left = np.pad(np.maximum(-b, 0.0), pad_lo)
        r += 2.0 * np.maximum(right, left) / grid.dx[a]
    return float(r.max())


_EIG: dict = {}


def _laplacian_eig(length: float, n: int, bc: str):
    """(lambda, V) of the symmetric three-point finite-volume Laplacian on n cells of a box of the given length
    (zero-flux or periodic), cached per geometry."""
    key = (float(length), int(n), bc)
    if key not in _EIG:
        from .operators import assemble_1d

        nf = n if bc == "periodic" else n - 1
        lap = assemble_1d(np.zeros(nf), 1.0, length / n, n, bc, "sg")
        _EIG[key] = np.linalg.eigh(0.5 * (lap + lap.T))
        if len(_EIG) > 16:
            _EIG.pop(next(iter(_EIG)))
    return _EIG[key]


def _heat_exps(grid: Grid, theta: float, bc: str) -> list:
    """[exp(theta Lap_a)] per axis (three-point finite-volume Laplacian, unit diffusion) from the cached
    eigendecomposition Lap_a = V diag(lambda) V^T: E = V diag(e^{theta lambda}) V^T. Entries below 1e-14 times
    their column's largest (round-off noise of the eigenvectors, of either sign) are set to 0 and the column sums
    reset to 1 on the diagonal, so E >= 0 and 1^T E = 1^T as in exact arithmetic."""
    mats, seen = [], {}
    for a in range(grid.dim):
        geo = (grid.hi[a] - grid.lo[a], grid.n[a])
        if geo not in seen:
            lam, V = _laplacian_eig(geo[0], geo[1], bc)
            E = (V * np.exp(theta * lam)[None, :]) @ V.T
            E[E < 1e-14 * E.max(axis=0)[None, :]] = 0.0  # round-off noise of the eigenvectors (and negatives)
            E[np.diag_indices_from(E)] += 1.0 - E.sum(axis=0)
            seen[geo] = E
        mats.append(seen[geo])
    return mats


def evolve_explicit(grid: Grid, p: np.ndarray, s_out, coeffs, *, method: str = "ssprk3", limiter: str = "vanleer",
                    steps: int | None = None, dt: float | None = None, cfl: float | None = None,
                    bc: str = "zero_flux", stats=None, out: np.ndarray | None = None) -> np.ndarray:
    r"""Integrate dp/ds = -div(b p) (+ D lap p for ``method="imex"``) with MUSCL fluxes and SSP Runge-Kutta.

    Parameters
    ----------
    grid : Grid
        The grid.
    p : numpy.ndarray
        p(s_out[0]), shape ``grid.shape``.
    s_out : array_like
        Increasing solver times; densities are returned at each.
    coeffs : object
        ``face_drifts(grid, s, periodic)`` and ``diffusion(s)`` (LinearCoefficients / PointCoefficients).
    method : str
        ``"ssprk2"``, ``"ssprk3"`` (pure advection: D(s) must be 0) or ``"imex"`` (Strang split with exact
        diffusion sub-steps and SSP-RK3 advection).
    limiter : str
        One of ``LIMITERS``.
    steps, dt : int or float, optional
        Fixed steps (as in ``stepping.substeps``). A step above the positivity bound h max_j r_j <= 1 at any
        stage raises ``ValueError`` with the numbers.
    cfl : float, optional
        With neither ``steps`` nor ``dt``: choose h = cfl / max_j r_j(s) each step (default 0.9; 0 < cfl <= 1),
        shrinking and redoing the step when a later stage's drift needs it (counted in ``stats.rejected``).
    bc : str
        ``"zero_flux"`` or ``"periodic"``.
    stats : EvolveStats, optional
        Counters (steps, rejected steps, drift evaluations).
    out : numpy.ndarray, optional
        Output array (len(s_out), *grid.shape) with row 0 filled.

    Returns
    -------
    numpy.ndarray
        Densities at ``s_out``, shape (len(s_out), *grid.shape).
    """
    from .stepping import EvolveStats, _Cache, _apply_separable, substeps

    if method not in EXPLICIT_METHODS:
        raise ValueError(f"unknown explicit method {method!r}; choose one of {EXPLICIT_METHODS}")
    if limiter not in LIMITERS:
        raise ValueError(f"unknown limiter {limiter!r}; choose one of {LIMITERS}")
    stats = stats if stats is not None else EvolveStats()
    s_out = np.asarray(s_out, dtype=np.float64)
    if out is None:
        out = np.empty((len(s_out),) + grid.shape)
        out[0] = p
    if len(s_out) == 1:
        return out
    periodic = bc == "periodic"
    auto = steps is None and dt is None
    if auto:
        cfl = 0.9 if cfl is None else float(cfl)
        if not 0.0 < cfl <= 1.0:
            raise ValueError(f"cfl must be in (0, 1], got {cfl}")
        if np.any(np.diff(s_out) <= 0):
            raise ValueError(f"solver times must be strictly increasing, got {s_out.tolist()}")
    elif cfl is not None:
        raise ValueError(f"give cfl or steps/dt, not both (cfl={cfl}, steps={steps}, dt={dt})")
    rk = "ssprk3" if method == "imex" else method
    drifts = _Cache(4)

    def drift(s):
        def make():
            stats.operator_builds += 1
            b = [np.asarray(v, dtype=np.float64) for v in coeffs.face_drifts(grid, float(s), periodic)]
            return b, outflow_rate(grid, b, bc)

        return drifts.get(float(s), make)

    if method != "imex":
        s_chk = s_out[0] if len(s_out) < 2 else 0.5 * (s_out[0] + s_out[1])
        D = float(coeffs.diffusion(float(s_chk)))
        if D != 0.0:
            raise ValueError(f"method {method!r} is explicit pure advection but the diffusion is D = {D:.4g} at "
                             f"s = {s_chk:.4g}; use method='imex' (exact diffusion sub-steps) or an implicit method")

    def rk_step(x, s, h, s1):
        """One SSP-RK step from s to s1 = s + h; returns (x', None) or (None, worst h r) if the bound fails."""
        stage_times = [s, s1] if rk == "ssprk2" else [s, s1, s + 0.5 * h]
        worst = max(h * drift(t)[1] for t in stage_times)
        if worst > 1.0 + 1e-12:
            return None, worst
        stats.max_cfl = max(stats.max_cfl, worst)  # h max_j r_j of accepted stages
        b0, b1 = drift(s)[0], drift(s1)[0]
        x1 = x + h * muscl_rhs(grid, x, b0, limiter, bc)
        if rk == "ssprk2":
            return 0.5 * x + 0.5 * (x1 + h * muscl_rhs(grid, x1, b1, limiter, bc)), None
        x2 = 0.75 * x + 0.25 * (x1 + h * muscl_rhs(grid, x1, b1, limiter, bc))
        bm = drift(stage_times[2])[0]
        return x / 3.0 + (2.0 / 3.0) * (x2 + h * muscl_rhs(grid, x2, bm, limiter, bc)), None

    heat = _Cache(4)

    def diffuse(x, s, h):
        theta = float(coeffs.diffusion(float(s + 0.5 * h))) * h
        if theta < 0 or not math.isfinite(theta):
            raise ValueError(f"diffusion must be finite and >= 0, got D = {theta / h:.4g} at s = {s + 0.5 * h:.4g}")
        if theta == 0.0:
            return x
        return _apply_separable(heat.get(theta, lambda: _heat_exps(grid, theta, bc)), x)

    def step(x, s, h, s1):
        if method != "imex":
            return rk_step(x, s, h, s1)
        y, bad = rk_step(diffuse(x, s, 0.5 * h), s, h, s1)
        if y is None:
            return None, bad
        return diffuse(y, s + 0.5 * h, 0.5 * h), None

    name = {"ssprk2": "SSP-RK2", "ssprk3": "SSP-RK3", "imex": "IMEX (SSP-RK3 advection)"}[method]
    x = p
    if not auto:
        nsub = substeps(s_out, steps, dt)
        for k in range(len(s_out) - 1):
            h = (s_out[k + 1] - s_out[k]) / nsub[k]
            for i in range(nsub[k]):
                s = s_out[k] + i * h
                s1 = s_out[k + 1] if i == nsub[k] - 1 else s_out[k] + (i + 1) * h
                y, bad = step(x, s, h, s1)
                if y is None:
                    rate = bad / h
                    raise ValueError(
                        f"{name} MUSCL step h = {h:.4g} breaks the positivity (CFL) bound near s = {s:.4g}: need "
                        f"h <= 1/max_j r_j = {1.0 / rate:.4g}, r_j = sum_a 2 max(b+_(j+1/2), b-_(j-1/2))/dx_a "
                        f"(h max r = {bad:.4g} > 1); use more steps, a smaller dt, or cfl= to choose the step")
                x = y
                stats.steps += 1
            out[k + 1] = x
        return out
    prev = None  # (s, rate) of the previous step start: the rate at s + h is extrapolated linearly
    for k in range(len(s_out) - 1):
        s, end = float(s_out[k]), float(s_out[k + 1])
        while s < end:
            rate = drift(s)[1]
            h = end - s if rate == 0.0 else min(end - s, cfl / rate)
            if prev is not None and rate > prev[1] and s > prev[0]:
                slope = (rate - prev[1]) / (s - prev[0])
                h = min(h, 2.0 * cfl / (rate + math.sqrt(rate * rate + 4.0 * cfl * slope)))  # h (rate + slope h) = cfl
            prev = (s, rate)
            while True:
                s1 = end if h >= end - s else s + h
                y, bad = step(x, s, h, s1)
                if y is not None:
                    break
                stats.rejected += 1
                h *= cfl / bad
                if h <= 1e-14 * max(1.0, abs(s)):
                    raise RuntimeError(f"{name}: step size underflow at s = {s:.6g} (outflow rate {rate:.4g})")
            x, s = y, s1
            stats.steps += 1
        out[k + 1] = x
    return out
