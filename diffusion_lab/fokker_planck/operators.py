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

``scheme="fv4"`` (fourth-order finite volumes on uniform grids): the face value and face derivative of p are
reconstructed from four cell averages to O(dx^4)::

    p_{j+1/2}  = (-p_{j-1} + 7 p_j + 7 p_{j+1} - p_{j+2}) / 12,
    p'_{j+1/2} = (p_{j-1} - 15 p_j + 15 p_{j+1} - p_{j+2}) / (12 dx),
    J_{j+1/2}  = b_{j+1/2} p_{j+1/2} - D p'_{j+1/2},

so the flux difference is O(dx^4) accurate for smooth p. On a tensor grid this is fourth order when b_a depends
on x_a only (linear OU / VP drifts: the cell-averaged equation is then the Kronecker sum of 1-D cell-average
equations); a drift varying across the face keeps the transverse O(dx^2) face-averaging error. The two faces next
to a zero-flux wall use the SG flux (the stencil would leave the box). Conservative (zero column sums, mass
exact) but not an M-matrix: positivity is not guaranteed, so it is meant for smooth, resolved densities; the
cell Peclet number must be <= 2 as for "central".

Boundaries: ``"zero_flux"`` (J = 0 on the box faces) or ``"periodic"`` (the face at hi_a joins cell n_a - 1 to
cell 0; its drift is sampled at x_a = hi_a).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .grid import Grid

__all__ = ["bernoulli", "face_coefficients", "assemble", "assemble_1d", "BOUNDARIES", "SCHEMES", "check_peclet"]

BOUNDARIES = ("zero_flux", "periodic")
SCHEMES = ("sg", "central", "fv4")


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
    if scheme == "fv4":
        raise ValueError("scheme 'fv4' has a four-cell stencil, not a two-point flux A p_j - C p_{j+1}; "
                         "use assemble(..., scheme='fv4')")
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
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    rows, cols, vals = [], [], []
    for a in range(grid.dim):
        dx = grid.dx[a]
        b = np.asarray(face_drift[a], dtype=np.float64)
        fshape = grid.face_shape(a, periodic)
        if b.size != int(np.prod(fshape)):
            raise ValueError(f"face drift on axis {a} has {b.size} values, expected shape {fshape}")
        if scheme == "fv4":
            r4, c4, v4 = _fv4_entries(grid, b.reshape(fshape), float(D), a, periodic)
            rows += r4
            cols += c4
            vals += v4
            continue
        A, C = face_coefficients(b.reshape(-1), D, dx, scheme, axis=a)
        lo, hi = _neighbour_indices(grid, a, periodic)
        A, C = A / dx, C / dx
        rows += [lo, lo, hi, hi]
        cols += [lo, hi, lo, hi]
        vals += [-A, C, A, -C]
    r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
    return sp.csr_matrix((v, (r, c)), shape=(grid.size, grid.size))


def _fv4_entries(grid: Grid, b: np.ndarray, D: float, axis: int, periodic: bool):
    """COO entries of the fourth-order flux differences on ``axis`` (module docstring): face j+1/2 with flux
    J = sum_{k=-1..2} w_k p_{j+k} adds -w/dx to row j and +w/dx to row j+1; SG weights next to zero-flux walls."""
    if not D > 0:
        raise ValueError(f"scheme 'fv4' needs a diffusion D > 0 (central-type fluxes), got D = {D}; use "
                         "scheme='sg' or the MUSCL methods for advection")
    dx = grid.dx[axis]
    n = grid.n[axis]
    check_peclet(b, D, dx, axis)
    idx = np.moveaxis(np.arange(grid.size).reshape(grid.shape), axis, 0)  # (n, ...)
    bf = np.moveaxis(b, axis, 0)  # (nf, ...)
    nf = bf.shape[0]
    j = np.arange(nf)
    cells = [(j + k) % n if periodic else np.clip(j + k, 0, n - 1) for k in (-1, 0, 1, 2)]
    shape = (nf,) + (1,) * (grid.dim - 1)
    g = D / dx
    w = [(-bf - g) / 12.0, (7.0 * bf + 15.0 * g) / 12.0, (7.0 * bf - 15.0 * g) / 12.0, (-bf + g) / 12.0]
    if not periodic:
        A, C = face_coefficients(bf, D, dx, "sg", axis)
        wall = ((j == 0) | (j == nf - 1)).reshape(shape)
        zero = np.zeros_like(bf)
        w = [np.where(wall, zero, w[0]), np.where(wall, A, w[1]), np.where(wall, -C, w[2]), np.where(wall, zero, w[3])]
    lower = idx[cells[1]]
    upper = idx[(j + 1) % n]
    rows, cols, vals = [], [], []
    for k in range(4):
        col = idx[cells[k]]
        wk = np.broadcast_to(w[k], col.shape) / dx
        rows += [lower.reshape(-1), upper.reshape(-1)]
        cols += [col.reshape(-1), col.reshape(-1)]
        vals += [-wk.reshape(-1), wk.reshape(-1)]
    return rows, cols, vals


def assemble_1d(centres_faces_b, D: float, dx: float, n: int, bc: str = "zero_flux", scheme: str = "sg") -> np.ndarray:
    """Dense n x n 1-D operator for face drifts ``centres_faces_b`` (n - 1 interior faces, or n if periodic);
    the building block of separable (Kronecker-sum) operators L = sum_a I (x) L_a (x) I."""
    g = Grid((0.0,), (n * dx,), (n,))
    return assemble(g, [centres_faces_b], D, bc, scheme).toarray()
