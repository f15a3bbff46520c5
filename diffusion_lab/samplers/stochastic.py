r"""Stochastic exponential-integrator and restart samplers (placeholder; methods are registered here)."""
from __future__ import annotations
