r"""Linear multistep samplers of the PF-ODE (placeholder; methods are registered here)."""
from __future__ import annotations
