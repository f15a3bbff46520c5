"""theory_checks: a catalogue of named numerical checks of diffusion-model identities.

Each check states the identity it verifies (its docstring), the closed-form case it runs on, its residual
and its tolerance class (exact / quadrature / mc / order), or is a published *claim*
with a verdict. ``python -m theory_checks`` prints the catalogue; ``diffusion-lab check`` is the same
command.
"""
from .catalogue import KINDS, REGISTRY, Catalogue, Check, Outcome, Result, catalogue, check

__all__ = ["KINDS", "REGISTRY", "Catalogue", "Check", "Outcome", "Result", "catalogue", "check"]
