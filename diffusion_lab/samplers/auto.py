r"""The declared defaults: ``sample(field, x, method="auto", nfe=K)`` and ``method="auto_sde"``.

A rule fixed by a design study alone (below) picks the method, its options and the grid from the budget K:

    auto      K <= 11        ipndm (fourth-order Adams-Bashforth on eps, warm-up 1-2-3-4), log-SNR grid
              12 <= K <= 17  unipc (bh2, UniP-2 + UniC), DPM-Solver's time-quadratic grid
              18 <= K <= 40  dpmpp_3m (official coefficients), log-SNR grid
              K > 40         unipc, log-SNR grid
    auto_sde  K <= 14        dpmpp_2m_sde (eta = 1, midpoint), log-SNR grid
              K >= 15        dpmpp_3m_sde (eta = 1), log-SNR grid

How the rule was made: ``benchmarks/auto_design.py`` and ``benchmarks/auto_design_sde.py`` ran every registered
method on every grid kind at budgets 3 to 50 on a DESIGN set only -- the targets ring8, bimodal_1d, gaussian_2d,
ncsn_two_mode and a 16-D anisotropic Gaussian under six schedules (VP-linear, VP-cosine, EDM, DDPM-discrete, VE,
rectified flow; the stochastic study without VP-cosine, scored by exact W2 on the Gaussians and MMD^2 to the exact
law on the mixtures) and three endings: the state at t_min, the denoiser there, and on the VP schedules the
denoiser at t_e = 1/K after a grid that stops there, as K-step "trailing" schedulers end (results in
benchmarks/results/auto_design*.txt). Selection, in two steps:

1. the method per budget: among the (method, grid) pairs that do not fail on any schedule (worst per-schedule
   geometric-mean error within 3x of the best worst case), the best geometric-mean error relative to the
   per-case best; method changes happen at the midpoints between the measured budgets;
2. one grid per method range: the grid kind with the best geometric mean over the budgets of that range (for
   ipndm at 3-10 log-SNR 2.40 against time-quadratic 2.41; the per-budget winners alternated between them).

Without the robustness filter rk4 on the time-quadratic grid would win at NFE 50 -- it is the best on VP
schedules and 760-8500x off on VE, which a default cannot be. The benchmark suite ``targets.suite()`` (other
dimensions, conditionings and component counts) was not used to make the rule: it measures it, and
``targets.suite(seed=1)`` (fresh instances of the same families) was first run only after this rule was fixed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import register

__all__ = ["AutoChoice", "auto_choice", "resolve", "AUTO_RULES"]


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
    "auto": ((11, "ipndm", "logsnr", {}), (17, "unipc", "quadratic", {}), (40, "dpmpp_3m", "logsnr", {}),
             (None, "unipc", "logsnr", {})),
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


def resolve(name: str, nfe: int, final: str = "step") -> AutoChoice | None:
    """What method ``name`` runs at a budget of ``nfe`` model evaluations: the rule's choice for "auto" /
    "auto_sde" (the final denoiser's evaluation comes out of the budget first), None for any other method."""
    from .base import get_method

    info = get_method(name)
    if info.family != "auto":
        return None
    return auto_choice(int(nfe) - (1 if final == "denoise" else 0), stochastic=info.stochastic)


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
