r"""The declared defaults: ``sample(field, x, method="auto", nfe=K)`` and ``method="auto_sde"``.

A rule written down before any evaluation picks the method, its options and the grid from the budget K alone:

    auto      K <= 10        ipndm (fourth-order Adams-Bashforth on eps, warm-up 1-2-3-4), log-SNR grid
              10 < K <= 22   dpmpp_3m (official coefficients), log-SNR grid
              K > 22         rk4 (floor(K/4) steps), DPM-Solver's time-quadratic grid
    auto_sde  K <= 14        dpmpp_2m_sde (eta = 1, midpoint), log-SNR grid
              K >= 15        dpmpp_3m_sde (eta = 1), log-SNR grid

How the rule was made: ``benchmarks/auto_design.py`` and ``benchmarks/auto_design_sde.py`` ran every registered
method on every grid kind at budgets 3 to 50 on a DESIGN set only -- the targets ring8, bimodal_1d, gaussian_2d,
ncsn_two_mode and a 16-D anisotropic Gaussian under VP-linear, VP-cosine, EDM and DDPM-discrete schedules, ending
at t_min or with the denoiser there -- and the rule takes the best geometric-mean (method, grid) of each budget
range (results in benchmarks/results/auto_design*.txt). A first study without the DDPM-discrete schedule and the
denoised ending gave the same methods and grids, with the switch to rk4 after 30 instead of 22.
The benchmark suite ``targets.suite()`` (other dimensions, conditionings and component counts) was not used:
it measures the rule. The thresholds are the midpoints between measured budgets where the winner changed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import register

__all__ = ["AutoChoice", "auto_choice", "AUTO_RULES"]


@dataclass(frozen=True)
class AutoChoice:
    """What ``method="auto"`` / ``"auto_sde"`` resolves to for a budget: a registered method, a grid kind and
    options (the NFE budget is then spent by that method's own budget rule)."""

    method: str
    grid_kind: str
    options: dict = field(default_factory=dict)
    rule: str = ""


#: (largest budget, method, grid kind, options), first match wins
AUTO_RULES = {
    "auto": ((10, "ipndm", "logsnr", {}), (22, "dpmpp_3m", "logsnr", {}), (None, "rk4", "quadratic", {})),
    "auto_sde": ((14, "dpmpp_2m_sde", "logsnr", {}), (None, "dpmpp_3m_sde", "logsnr", {})),
}


def _describe(name: str) -> str:
    parts, lo = [], 1
    for hi, method, grid, _ in AUTO_RULES[name]:
        span = f"NFE {lo}-{hi}" if hi is not None else f"NFE >= {lo}"
        parts.append(f"{span}: {method}/{grid}")
        lo = (hi or 0) + 1
    return "; ".join(parts)


def auto_choice(nfe: int, stochastic: bool = False) -> AutoChoice:
    """The declared default for a budget of ``nfe`` model evaluations (see the module docstring)."""
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    name = "auto_sde" if stochastic else "auto"
    for hi, method, grid, options in AUTO_RULES[name]:
        if hi is None or nfe <= hi:
            return AutoChoice(method, grid, dict(options), _describe(name))
    raise AssertionError("unreachable: the last rule has no bound")


def _no_direct_call(name):
    def fn(field, x, grid, **_):
        raise ValueError(f"method {name!r} chooses its own method and grid from an NFE budget: call "
                         f"sample(field, x, {name!r}, nfe=K)")

    fn.__doc__ = f"The declared default ({_describe(name)}); resolved by ``sample(..., nfe=K)``."
    return fn


for _name, _stoch in (("auto", False), ("auto_sde", True)):
    register(_name, family="auto", order=2, stochastic=_stoch, nfe_per_step=1,
             description=f"declared default from the budget: {_describe(_name)}",
             budget_rule=_describe(_name))(_no_direct_call(_name))
