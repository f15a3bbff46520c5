"""Sample-path samplers of the reverse process: PF-ODE solvers, exponential integrators, SDE solvers.

``sample(field, x_init, method=..., steps=... or nfe=... or grid=...)`` is the entry point; ``available()`` lists
the methods with their order, stochasticity and NFE per step; ``time_grid`` builds grids.
"""
from .base import (MethodInfo, SampleResult, available, get_method, plan_for_nfe, register, sample, step_iter,
                   steps_for_nfe)
from .grids import GRID_KINDS, check_grid, time_grid
from .optimize import optimize_grid

__all__ = ["MethodInfo", "SampleResult", "available", "get_method", "register", "sample", "step_iter",
           "steps_for_nfe", "plan_for_nfe", "GRID_KINDS", "check_grid", "time_grid", "optimize_grid"]
