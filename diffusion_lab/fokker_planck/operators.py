r"""Conservative finite-volume drift-diffusion operators dp/dt = L p for

    dp/dt = -div(b p) + D lap p = -div J,    J = b p - D grad p,

with a vector drift b(x) sampled on the faces and a scalar diffusion D >= 0, on a ``Grid``.

Face flux (per axis a, face j+1/2 between cells j and j+1, w = b_{j+1/2} dx / D the cell Peclet number):

    J_{j+1/2} = A_{j+1/2} p_j - C_{j+1/2} p_{j+1},
    dp_j/dt   = -(J_{j+1/2} - J_{j-1/2}) / dx,

``scheme="sg"`` (Scharfetter & Gummel 1969 / Chang & Cooper 1970 exponential fitting):

    A = (D/dx) Bern(-w) = b^+ + (D/dx) Bern(|w|),   C = (D/dx) Bern(w) = -b^- + (D/dx) Bern(|w|),
    Bern(w) = w / (e^w - 1),

i.e. J = (D/dx)[Bern(-w) p_j - Bern(w) p_{j+1}]. In Chang-Cooper's form d_t f = d_x F with F = -J, B = -b,
C = D it reads F = (D/dx)[Bern(-w') f_{j+1} - Bern(w') f_j] with w' = -w: the Chang-Cooper and
Scharfetter-Gummel fluxes are the same algebraic expression.
A, C >= 0 for every w, so L has non-negative off-diagonals and zero column sums: mass is conserved exactly
and (I - dt L)^{-1} >= 0 (backward Euler is positive for every dt). Zero flux gives p_{j+1}/p_j = e^{w}
exactly; for the OU/VP drift b = -x (D = 1) this is exp(-dx x_{j+1/2}) = N(x_{j+1}; 0, 1)/N(x_j; 0, 1): the
discrete Gaussian equilibrium is exact. With D = 0 the same formulas give first-order upwinding, the
scheme for the pure-advection PF-ODE continuity equation (Peclet = infinity).

``scheme="central"``: A = b/2 + D/dx, C = -b/2 + D/dx, second order but positive only for |w| <= 2: a larger
cell Peclet number raises ``ValueError`` naming the worst face.

Boundaries: ``"zero_flux"`` (J = 0 on the box faces) or ``"periodic"`` (the face at hi_a joins cell n_a - 1 to
cell 0; its drift is sampled at x_a = hi_a).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .grid import Grid

__all__ = ["bernoulli", "face_coefficients", "assemble", "assemble_1d", "BOUNDARIES", "SCHEMES", "check_peclet"]

BOUNDARIES = ("zero_flux", "periodic")
SCHEMES = ("sg", "central")


def bernoulli(w) -> np.ndarray:
    r"""Bern(w) = w / (e^w - 1), with Bern(0) = 1, evaluated stably: the series 1 - w/2 + w^2/12 - w^4/720 for
    |w| < 1e-3 (relative error < 1e-16), w / expm1(w) elsewhere (-> 0 for w -> +inf, -> -w for w -> -inf)."""
    w = np.asarray(w, dtype=np.float64)
    small = np.abs(w) < 1e-3
    ws = np.where(small, 1.0, w)
    with np.errstate(over="ignore"):
        big = ws / np.expm1(ws)
    w2 = w * w
    series = 1.0 - 0.5 * w + w2 / 12.0 - w2 * w2 / 720.0
    return np.where(small, series, big)


def check_peclet(b, D: float, dx: float, axis: int = 0, limit: float = 2.0) -> None:
    """Raise ValueError if the cell Peclet number |w| = |b| dx / D exceeds ``limit`` (central differences lose
    positivity and oscillate beyond 2; the positivity criterion in FiPy's documentation on
    convection schemes)."""
    bmax = float(np.max(np.abs(b))) if np.size(b) else 0.0
    if bmax == 0.0:
        return
    pe = float("inf") if D <= 0 else bmax * dx / D
    if pe > limit:
        raise ValueError(
            f"cell Peclet number |b| dx / D = {pe:.4g} on axis {axis} exceeds {limit:g} (max |b| = {bmax:.4g}, "
            f"dx = {dx:.4g}, D = {D:.4g}): the central scheme would oscillate and go negative; refine the grid to "
            f"dx < {limit * D / bmax:.4g} or use scheme='sg'" if D > 0 else
            f"cell Peclet number is infinite on axis {axis} (D = 0, max |b| = {bmax:.4g}): the central scheme cannot "
            f"be used for pure advection; use scheme='sg' (upwind when D = 0)"
        )


def face_coefficients(b, D: float, dx: float, scheme: str = "sg", axis: int = 0):
    """(A, C) of J_{j+1/2} = A p_j - C p_{j+1} for face drifts ``b`` (any shape), diffusion D >= 0, width dx."""
    b = np.asarray(b, dtype=np.float64)
    D = float(D)
    if not D >= 0 or not np.isfinite(D):
        raise ValueError(f"diffusion D must be finite and >= 0, got {D}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"face drift on axis {axis} has {int(np.sum(~np.isfinite(b)))} non-finite values")
    if scheme == "sg":
        bp, bm = np.maximum(b, 0.0), np.minimum(b, 0.0)
        if D == 0.0:
            return bp, -bm
        diff = (D / dx) * bernoulli(np.abs(b) * (dx / D))
        return bp + diff, -bm + diff
    if scheme == "central":
        check_peclet(b, D, dx, axis)
        return 0.5 * b + D / dx, -0.5 * b + D / dx
    raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")


def _neighbour_indices(grid: Grid, axis: int, periodic: bool):
    """Flat indices (lower, upper) of the two cells of every face normal to ``axis`` (face-array C order)."""
    idx = np.arange(grid.size).reshape(grid.shape)
    if periodic:
        lower = idx
        upper = np.roll(idx, -1, axis=axis)
    else:
        sl_lo = [slice(None)] * grid.dim
        sl_hi = [slice(None)] * grid.dim
        sl_lo[axis] = slice(0, -1)
        sl_hi[axis] = slice(1, None)
        lower, upper = idx[tuple(sl_lo)], idx[tuple(sl_hi)]
    return lower.reshape(-1), upper.reshape(-1)


def assemble(grid: Grid, face_drift, D: float, bc: str = "zero_flux", scheme: str = "sg") -> sp.csr_matrix:
    r"""The sparse matrix L (N x N, N = grid.size, C order) of dp/dt = -div(b p) + D lap p.

    ``face_drift[a]`` holds b_a on the faces normal to axis a, shaped ``grid.face_shape(a, periodic)`` (or
    flat): the n_a - 1 interior faces for zero flux, n_a faces (the last at hi_a) for periodic boundaries.
    Assembly is vectorised: per axis, face j+1/2 adds -A/dx, +C/dx to row j and +A/dx, -C/dx to row j+1.
    """
    if bc not in BOUNDARIES:
        raise ValueError(f"unknown boundary condition {bc!r}; choose one of {BOUNDARIES}")
    periodic = bc == "periodic"
    if len(face_drift) != grid.dim:
        raise ValueError(f"need one face-drift array per axis ({grid.dim}), got {len(face_drift)}")
    rows, cols, vals = [], [], []
    for a in range(grid.dim):
        dx = grid.dx[a]
        b = np.asarray(face_drift[a], dtype=np.float64)
        fshape = grid.face_shape(a, periodic)
        if b.size != int(np.prod(fshape)):
            raise ValueError(f"face drift on axis {a} has {b.size} values, expected shape {fshape}")
        A, C = face_coefficients(b.reshape(-1), D, dx, scheme, axis=a)
        lo, hi = _neighbour_indices(grid, a, periodic)
        A, C = A / dx, C / dx
        rows += [lo, lo, hi, hi]
        cols += [lo, hi, lo, hi]
        vals += [-A, C, A, -C]
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    return sp.csr_matrix((v, (r, c)), shape=(grid.size, grid.size))


def assemble_1d(centres_faces_b, D: float, dx: float, n: int, bc: str = "zero_flux", scheme: str = "sg") -> np.ndarray:
    """Dense n x n 1-D operator for face drifts ``centres_faces_b`` (n - 1 interior faces, or n if periodic);
    the building block of separable (Kronecker-sum) operators L = sum_a I (x) L_a (x) I."""
    g = Grid((0.0,), (n * dx,), (n,))
    return assemble(g, [centres_faces_b], D, bc, scheme).toarray()
