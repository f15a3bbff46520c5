r"""Uniform cell-centred tensor-product grids (1-D, 2-D, 3-D) for finite volumes.

Axis a of a ``Grid`` covers [lo_a, hi_a] with n_a cells of width dx_a = (hi_a - lo_a)/n_a; cell j has centre
x_j = lo_a + (j + 1/2) dx_a and faces x_{j -+ 1/2} = lo_a + j dx_a, lo_a + (j + 1) dx_a. A density on the grid is
a float64 array of shape ``grid.shape`` = (n_0, ..., n_{d-1}) (axis a of the array = coordinate a, "ij"
indexing) holding cell averages p_j ~ |cell|^{-1} int_cell p dx; its mass is sum_j p_j |cell|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Grid", "gauss_legendre_cell_points", "MIN_CELL_WIDTH"]

#: Smallest cell width a ``Grid`` accepts. The package's densities live on O(1) scales and the implicit steppers
#: solve (I - c L) u = b with diffusion entries of L ~ g^2 / (2 dx^2); over one step of length dt the ratio to the
#: identity is ~ dt g^2 / (2 dx^2), which for EDM (g^2 = 2t, t up to 80) taken in one step is 6400 / dx^2. Above
#: 2^53 ~ 9e15 the identity is lost in float64 rounding and the mass-conserving (zero column sum) operator
#: makes the LU exactly singular (measured: VP fails at dx = 1e-9, VE and EDM at dx = 1e-7 with 8 steps), so
#: dx >= 1e-6 keeps that ratio below ~6e15 for every schedule of the package.
MIN_CELL_WIDTH = 1e-6


@dataclass(frozen=True)
class Grid:
    """Uniform cell-centred grid: ``lo``, ``hi`` (tuples of floats, one per axis) and ``n`` cells per axis.

    Build with ``Grid.box(lo, hi, n, dim)`` for a cube [lo, hi]^dim, or ``Grid((lo0, lo1), (hi0, hi1), (n0, n1))``.
    ``n`` must be integers (integer-valued floats such as 4.0 are accepted; 2.5, nan and booleans are refused
    rather than truncated), and every cell width dx_a = (hi_a - lo_a)/n_a must be at least ``MIN_CELL_WIDTH``
    (and 2^-40 of the largest |coordinate|), else ValueError naming the value.
    """

    lo: tuple
    hi: tuple
    n: tuple

    def __post_init__(self):
        lo = tuple(float(v) for v in np.atleast_1d(self.lo))
        hi = tuple(float(v) for v in np.atleast_1d(self.hi))
        n_in = tuple(np.atleast_1d(self.n).tolist())
        for a, v in enumerate(n_in):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v == int(v)):
                raise ValueError(f"Grid: the number of cells must be an integer, got n={v!r} on axis {a}")
        n = tuple(int(v) for v in n_in)
        if not (len(lo) == len(hi) == len(n)) or not 1 <= len(n) <= 3:
            raise ValueError(f"Grid: lo, hi, n must have the same length 1..3, got {lo}, {hi}, {n}")
        for a in range(len(n)):
            if not (math.isfinite(lo[a]) and math.isfinite(hi[a]) and lo[a] < hi[a]):
                raise ValueError(f"Grid: need finite lo < hi on axis {a}, got lo={lo[a]}, hi={hi[a]}")
            if n[a] < 2:
                raise ValueError(f"Grid: need at least 2 cells on axis {a}, got n={n[a]}")
            dx = (hi[a] - lo[a]) / n[a]
            if not dx >= MIN_CELL_WIDTH:
                raise ValueError(f"Grid: cell width dx = (hi - lo)/n = {dx:.3g} on axis {a} (box [{lo[a]!r}, "
                                 f"{hi[a]!r}], n={n[a]}) is below {MIN_CELL_WIDTH:g}: the implicit steppers' "
                                 "diffusion terms ~ dt g^2/(2 dx^2) would swamp the identity in float64 and the "
                                 "sparse LU would be singular; widen the box or use fewer cells")
            if not dx >= 2.0**-40 * max(abs(lo[a]), abs(hi[a])):
                raise ValueError(f"Grid: cell width {dx:.3g} on axis {a} is below 2^-40 of the box's largest "
                                 f"coordinate {max(abs(lo[a]), abs(hi[a])):.3g}: cell centres would not be "
                                 "resolved in float64")
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "n", n)

    @classmethod
    def box(cls, lo: float, hi: float, n: int, dim: int = 1) -> "Grid":
        """The cube [lo, hi]^dim with n cells per axis."""
        return cls((lo,) * dim, (hi,) * dim, (n,) * dim)

    # -- geometry ---------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return len(self.n)

    @property
    def shape(self) -> tuple:
        return self.n

    @property
    def size(self) -> int:
        return int(np.prod(self.n))

    @property
    def dx(self) -> tuple:
        """Cell widths dx_a = (hi_a - lo_a)/n_a."""
        return tuple((h - l) / m for l, h, m in zip(self.lo, self.hi, self.n))

    @property
    def volume(self) -> float:
        """Cell volume |cell| = prod_a dx_a."""
        return float(np.prod(self.dx))

    def centres(self, axis: int) -> np.ndarray:
        """Cell centres x_j = lo + (j + 1/2) dx along ``axis``, shape (n_axis,)."""
        return self.lo[axis] + (np.arange(self.n[axis]) + 0.5) * self.dx[axis]

    def edges(self, axis: int) -> np.ndarray:
        """All n_axis + 1 face positions lo + j dx along ``axis`` (histogram bin edges)."""
        return self.lo[axis] + np.arange(self.n[axis] + 1) * self.dx[axis]

    def interior_faces(self, axis: int) -> np.ndarray:
        """The n_axis - 1 faces x_{j+1/2} between cells j and j+1 along ``axis``."""
        return self.edges(axis)[1:-1]

    def points(self) -> np.ndarray:
        """Cell centres as an (N, d) array, N = prod n_a, in the C order of a density array."""
        mesh = np.meshgrid(*[self.centres(a) for a in range(self.dim)], indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)

    def face_points(self, axis: int, periodic: bool = False) -> np.ndarray:
        """Points of the faces normal to ``axis`` (interior faces; with ``periodic`` also the wrap face at
        hi_axis, between cell n-1 and cell 0), other coordinates at cell centres; (M, d) in C order of an
        array shaped like the grid with n_axis replaced by the number of faces."""
        faces = self.edges(axis)[1:] if periodic else self.interior_faces(axis)
        coords = [faces if a == axis else self.centres(a) for a in range(self.dim)]
        mesh = np.meshgrid(*coords, indexing="ij")
        return np.stack([m.reshape(-1) for m in mesh], axis=1)

    def face_shape(self, axis: int, periodic: bool = False) -> tuple:
        s = list(self.n)
        s[axis] = self.n[axis] if periodic else self.n[axis] - 1
        return tuple(s)

    # -- densities ---------------------------------------------------------------------------------
    def mass(self, p) -> float:
        """int p = sum_j p_j |cell|."""
        return float(np.sum(p) * self.volume)

    def check_density(self, p, what: str = "p") -> np.ndarray:
        """p as a float64 array of shape ``self.shape`` (a flat array of the right size is reshaped)."""
        p = np.asarray(p, dtype=np.float64)
        if p.shape != self.shape:
            if p.size == self.size and p.ndim == 1:
                p = p.reshape(self.shape)
            else:
                raise ValueError(f"{what} has shape {p.shape}, expected the grid's shape {self.shape}")
        if not np.all(np.isfinite(p)):
            raise ValueError(f"{what} has {int(np.sum(~np.isfinite(p)))} non-finite values")
        return p

    def refine(self, factor: int = 2) -> "Grid":
        """The same box with factor x more cells per axis."""
        return Grid(self.lo, self.hi, tuple(m * factor for m in self.n))

    def settings(self) -> dict:
        return {"lo": list(self.lo), "hi": list(self.hi), "n": list(self.n), "dx": list(self.dx)}


def gauss_legendre_cell_points(grid: Grid, order: int = 3, cells: slice | None = None):
    """Tensor Gauss-Legendre nodes inside every cell: (points (N * order^d, d), weights (order^d,)).

    Points are grouped per cell (cell-major, C order), weights sum to 1, so the cell average of a smooth u is
    sum_q w_q u(x_{j,q}) + O(dx^{2 order}). ``cells`` (a slice of the flat C-order cell index) restricts the
    points to those cells, so large grids can be processed in chunks.
    """
    z, w = np.polynomial.legendre.leggauss(order)
    z, w = 0.5 * z, 0.5 * w  # nodes on [-1/2, 1/2], weights summing to 1
    d = grid.dim
    offs = np.stack([m.reshape(-1) for m in np.meshgrid(*([z] * d), indexing="ij")], axis=1)  # (q, d)
    wq = np.prod(np.stack([m.reshape(-1) for m in np.meshgrid(*([w] * d), indexing="ij")], axis=1), axis=1)
    if cells is None:
        centres = grid.points()  # (N, d)
    else:
        idx = np.arange(grid.size)[cells]
        centres = np.stack([grid.centres(a)[i] for a, i in enumerate(np.unravel_index(idx, grid.shape))], axis=1)
    pts = centres[:, None, :] + offs[None, :, :] * np.asarray(grid.dx)[None, None, :]
    return pts.reshape(-1, d), wq
