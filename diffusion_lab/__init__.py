"""diffusion_lab: diffusion-model theory as numerical experiments.

One object -- a time-dependent velocity field built from a noise schedule and a model of the data --
seen three ways: sample paths (SDE / PF-ODE / DDIM / DPM-Solver), Langevin dynamics, and
Fokker-Planck density evolution. The documentation (docs/, built with Sphinx) describes what is implemented.

Threads: small-tensor work (2-D targets, batches of thousands) runs fastest on one intra-op thread, and much
slower with several when the CPU is shared; call ``diffusion_lab.set_threads(1)`` once, or wrap a block in
``with diffusion_lab.threads(1):`` (the ``diffusion-lab`` command does this by default). Large networks and
images gain from more threads. ``benchmarks/threads.py`` measures the difference on the machine at hand.
"""
from . import param, schedules, targets
from ._threads import set_threads, threads
from .field import VelocityField
from .schedules import EDM, SCHEDULES, VE, DDPMDiscrete, RectifiedFlow, Schedule, SubVP, VPCosine, VPLinear, get_schedule
from .samplers import available, sample, time_grid
from .targets import Gaussian, GaussianMixture, get_target

# the sample-path methods defined outside the samplers package register here, where the package assembles its
# methods (langevin imports the registry; the registry never imports langevin)
from . import langevin  # noqa: E402,F401  (registers pc and annealed_langevin)

__version__ = "0.1.0"

__all__ = [
    "VelocityField", "Schedule", "VPLinear", "VPCosine", "SubVP", "VE", "EDM", "RectifiedFlow", "DDPMDiscrete",
    "SCHEDULES", "get_schedule", "Gaussian", "GaussianMixture", "get_target", "param", "schedules", "targets",
    "sample", "time_grid", "available", "set_threads", "threads",
]
