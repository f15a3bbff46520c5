"""diffusion_lab: diffusion-model theory as numerical experiments.

One object -- a time-dependent velocity field built from a noise schedule and a model of the data --
seen three ways: sample paths (SDE / PF-ODE / DDIM / DPM-Solver), Langevin dynamics, and
Fokker-Planck density evolution. See README.md for what is implemented.
"""
from . import param, schedules, targets
from .field import VelocityField
from .schedules import EDM, SCHEDULES, VE, DDPMDiscrete, RectifiedFlow, Schedule, SubVP, VPCosine, VPLinear, get_schedule
from .samplers import available, sample, time_grid
from .targets import Gaussian, GaussianMixture, get_target

__version__ = "0.1.0"

__all__ = [
    "VelocityField", "Schedule", "VPLinear", "VPCosine", "SubVP", "VE", "EDM", "RectifiedFlow", "DDPMDiscrete",
    "SCHEDULES", "get_schedule", "Gaussian", "GaussianMixture", "get_target", "param", "schedules", "targets",
    "sample", "time_grid", "available",
]
