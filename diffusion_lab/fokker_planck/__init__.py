r"""Fokker-Planck view: evolve the density of one velocity field on a grid (finite volumes with
Chang & Cooper 1970 / Scharfetter & Gummel 1969 fluxes).

- ``Grid``: uniform cell-centred tensor grids in 1-3 D (cell averages, zero-flux or periodic boxes).
- ``operators``: conservative finite-volume L for dp/dt = -div(b p) + D lap p with Scharfetter-Gummel /
  Chang-Cooper exponential fitting (upwind when D = 0), or central fluxes guarded by a cell-Peclet check.
- ``stepping.evolve``: backward Euler, Crank-Nicolson, TR-BDF2 (sparse LU re-used while L is unchanged),
  positivity-checked explicit Euler, and a Kronecker exponential integrator for separable linear drifts.
- ``solve_forward`` / ``solve_continuity`` / ``solve_reverse``: the noising FP equation, the PF-ODE continuity
  equation and the generation (reverse SDE family) equation, with mass/min and errors against exact p_t.
- ``advection``: second-order MUSCL fluxes with TVD limiters (minmod, van Leer, MC) and SSP Runge-Kutta for the
  continuity equation (positive under a documented CFL bound), and an IMEX split with exact diffusion sub-steps.
- ``splitting``: dimension splitting with batched tridiagonal solves for large 3-D grids, and memory estimates.
- ``density_from_samples``, ``exact_density``, ``tv``, ``kl``: put particles, grids and closed forms on one grid.
"""
from .densities import (density_from_samples, exact_density, gaussian_density, kl, l1, log_exact_density,
                        mass_outside, scott_bandwidth, tv)
from .equations import (FPSolution, LinearCoefficients, PointCoefficients, initial_density, schedule_ratio, solve,
                        solve_continuity, solve_forward, solve_reverse)
from .advection import LIMITERS, limited_slope, muscl_rhs, outflow_rate
from .grid import Grid
from .operators import assemble, bernoulli, check_peclet, face_coefficients
from .splitting import check_memory, estimate_memory
from .stepping import METHODS, evolve

__all__ = [
    "Grid", "assemble", "bernoulli", "check_peclet", "face_coefficients", "evolve", "METHODS", "solve",
    "solve_forward", "solve_continuity", "solve_reverse", "FPSolution", "LinearCoefficients", "PointCoefficients",
    "initial_density", "schedule_ratio", "density_from_samples", "exact_density", "log_exact_density",
    "gaussian_density", "mass_outside", "l1", "tv", "kl", "scott_bandwidth", "LIMITERS", "limited_slope",
    "muscl_rhs", "outflow_rate", "estimate_memory", "check_memory",
]
