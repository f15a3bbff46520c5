"""The sampler registry and the one entry point ``sample``.

A sampler is a plain function

    fn(field, x, grid, *, generator=None, callback=None, **options) -> (x_final, info)

that integrates from grid[0] = t_max down to grid[-1] = t_min, calls ``callback(i, x)`` after it reaches
grid[i] (i = 1..N), and returns the state at grid[-1] with a dict of method-specific information. It only
calls the field; ``sample`` counts model evaluations exactly as the change in ``field.nfe`` (plus that of the
learned flow map's ``nfe`` for method "flow_map", whose calls are the model evaluations).

Last step (same meaning for every method): ``final="step"`` returns x(t_min); ``final="denoise"`` returns
the denoiser D(x(t_min), t_min) = E[x_0 | x_{t_min}], at the cost of one more model evaluation (EDM's and
k-diffusion's final step to sigma = 0 is this: an Euler step to sigma = 0 lands exactly on D).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass, field as dc_field
from typing import Callable

import torch

from .._tensor import check_batch
from ..field import VelocityField
from .grids import check_grid, time_grid

__all__ = ["MethodInfo", "SampleResult", "register", "available", "get_method", "sample", "steps_for_nfe",
           "plan_for_nfe", "step_iter"]


@dataclass(frozen=True)
class MethodInfo:
    """What a sampler is: its family, order (global; weak order for stochastic methods), whether it is
    stochastic, its exact model evaluations ``nfe_of_steps(N, **options)`` for N steps, the fewest steps it
    accepts, its budget rule ``plan(nfe, **options) -> (N, options)`` (see ``plan_for_nfe``) and ``needs``: the
    option naming a companion object it cannot run without ("flow_map" for the learned flow map), or ""."""

    name: str
    fn: Callable
    family: str
    order: float
    stochastic: bool
    nfe_per_step: float
    nfe_of_steps: Callable[..., int]
    min_steps: int = 1
    description: str = ""
    plan: Callable[..., tuple[int, dict]] | None = None
    budget_rule: str = ""
    needs: str = ""

    def row(self) -> dict:
        return {"method": self.name, "family": self.family, "order": self.order, "stochastic": self.stochastic,
                "nfe_per_step": self.nfe_per_step, "min_steps": self.min_steps, "description": self.description,
                "budget_rule": self.budget_rule or "largest N whose NFE fits the budget"}


_REGISTRY: dict[str, MethodInfo] = {}


def _summary(doc: str | None) -> str:
    """The docstring's first paragraph on one line, cut before its first ': ' or '; ' (the formula part)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    depth = 0
    for i, ch in enumerate(para):
        depth += (ch in "([") - (ch in ")]")
        if depth == 0 and para[i:i + 2] in (": ", "; "):
            return para[:i].rstrip(",")
    return para


def _accept_options(count: Callable[..., int]) -> Callable[..., int]:
    """``count(n, **options)`` that ignores the options ``count`` does not declare (so every caller may pass a
    method's full option set, and only the ones that change its NFE are used)."""
    params = list(inspect.signature(count).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return count
    names = {p.name for p in params}
    return lambda n, **options: count(n, **{k: v for k, v in options.items() if k in names})


def register(name: str, *, family: str, order: float, stochastic: bool, nfe_per_step: float = 1,
             nfe_of_steps: Callable[..., int] | None = None, min_steps: int = 1, description: str = "",
             plan: Callable[..., tuple[int, dict]] | None = None, budget_rule: str = "", needs: str = ""):
    """Register a sampler function under ``name``; ``nfe_of_steps(N, **options)`` is its exact NFE for N steps
    (default round(nfe_per_step * N); nfe_per_step=nan marks an adaptive method); ``plan(nfe, **options)``,
    if given, is the method's own rule for spending an NFE budget (returns the step count and the options to
    run with), described in words by ``budget_rule``; ``needs`` names the option without which it cannot run
    (its companion object, e.g. "flow_map")."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"sampler {name!r} registered twice")
        count = nfe_of_steps or (lambda n, k=nfe_per_step: int(round(k * n)) if not math.isnan(k) else -1)
        _REGISTRY[name] = MethodInfo(name, fn, family, order, stochastic, nfe_per_step, _accept_options(count),
                                     min_steps, description or _summary(fn.__doc__), plan, budget_rule, needs)
        return fn

    return deco


def _load_all():
    """Import the sampler modules of this package (registration side effects). Methods defined elsewhere register
    where the package assembles its methods: ``diffusion_lab/__init__.py`` imports ``diffusion_lab.langevin``
    (pc, annealed_langevin), so this module never imports a module that imports it."""
    from . import auto, exponential, flowmap, multistep, ode, sde, stochastic  # noqa: F401


def available(flow_maps: bool = False) -> list[MethodInfo]:
    """Every registered method that samples a VelocityField on its own, with its order, stochasticity and NFE per
    step; ``flow_maps=True`` adds the methods that need a companion object (``MethodInfo.needs``: "flow_map", the
    learned flow map of ``diffusion_lab.flowmap``)."""
    _load_all()
    return [m for m in _REGISTRY.values() if flow_maps or not m.needs]


def get_method(name: str) -> MethodInfo:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(_REGISTRY)}") from None


def steps_for_nfe(method: str, nfe: int, final: str = "step", **options) -> int:
    """The largest number of steps N whose exact NFE ``nfe_of_steps(N, **options)`` (plus 1 for
    final='denoise') is <= nfe. Every option is passed on; those that change the count (heun's final_euler,
    pc's predictor and corrector_steps, singlestep DPM-Solver's orders, ...) are used."""
    info = get_method(method)
    budget = nfe - (1 if final == "denoise" else 0)
    if math.isnan(info.nfe_per_step):
        raise ValueError(f"{method} is adaptive: it takes rtol/atol, not an NFE budget")
    count = lambda n: info.nfe_of_steps(n, **options)  # noqa: E731
    if count(1) < 1:
        raise ValueError(f"{method} with options {options} makes no model evaluation per step; an NFE budget "
                         f"cannot set its step count")
    n = max(budget, 0) + 1  # every step costs >= 1 NFE, so N <= budget
    while n >= 1 and count(n) > budget:
        n -= 1
    if n < info.min_steps:
        lowest = count(info.min_steps) + (1 if final == "denoise" else 0)
        raise ValueError(f"NFE {nfe} is below the minimum {lowest} of method {method!r} "
                         f"({info.min_steps} step(s) of {info.nfe_per_step:g} NFE)")
    return n


def plan_for_nfe(method: str, nfe: int, final: str = "step", **options) -> tuple[int, dict]:
    """How ``method`` spends a budget of ``nfe`` model evaluations: (steps N, options to run with).

    Methods with a budget rule of their own (``MethodInfo.plan``; e.g. singlestep DPM-Solver composes its
    per-step orders from the budget, as the official DPM-Solver-fast) use it; every other method takes the
    largest N that fits (``steps_for_nfe``) and the options unchanged. Options the caller gives explicitly
    are never overridden. The returned plan's exact NFE is <= nfe (checked).
    """
    info = get_method(method)
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    budget = int(nfe) - (1 if final == "denoise" else 0)
    if info.plan is None:
        return steps_for_nfe(method, int(nfe), final, **options), dict(options)
    if budget < 1:
        raise ValueError(f"NFE {nfe} leaves no evaluation for method {method!r} after final={final!r}")
    n, opts = info.plan(budget, **options)
    used = info.nfe_of_steps(n, **opts)
    if used > budget or n < info.min_steps:
        raise ValueError(f"method {method!r}: its budget rule gave {n} steps using {used} NFE for a budget of "
                         f"{budget}")  # a bug in the rule, never expected
    return n, opts


def step_iter(n: int, progress: bool | str = False, desc: str = "sampling"):
    """range(n), with a tqdm progress bar when ``progress`` is true (used by every sampler loop)."""
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc if isinstance(progress, bool) else progress, leave=False)


@dataclass
class SampleResult:
    """Samples ``x`` at the end of ``grid``, the exact number of model evaluations ``nfe``, the grid,
    the trajectory (N+1 states at the grid times, on request) and method-specific ``info``."""

    x: torch.Tensor
    nfe: int
    grid: torch.Tensor
    method: str
    trajectory: torch.Tensor | None = None
    info: dict = dc_field(default_factory=dict)
    seconds: float = 0.0
    settings: dict = dc_field(default_factory=dict)


def _field_and_flow_map(field, method: str, options: dict):
    """(field or None, flow map or None) of a ``sample`` call, checked: a FlowMap in place of the field or as the
    ``flow_map`` option runs only with method "flow_map", on the field's own schedule; it is put into ``options``."""
    psi = options.get("flow_map")
    if isinstance(field, VelocityField) and psi is None and method != "flow_map":
        return field, None
    from .flowmap import is_flow_map

    if not isinstance(field, VelocityField) and is_flow_map(field):
        if method != "flow_map":
            raise TypeError(f"a FlowMap samples with method='flow_map', not {method!r}")
        if psi is not None and psi is not field:
            raise ValueError("give the flow map once: sample(psi, x, 'flow_map', ...) or sample(field, x, "
                             "'flow_map', flow_map=psi)")
        options["flow_map"] = field
        return None, field
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField (or a FlowMap with method='flow_map'), got "
                        f"{type(field).__name__}")
    if method != "flow_map":
        raise TypeError(f"flow_map= is an option of method 'flow_map', not of {method!r}")
    if psi is None:
        raise TypeError("method 'flow_map' needs the learned map: sample(field, x, 'flow_map', steps=k, "
                        "flow_map=psi) with psi a diffusion_lab.flowmap.FlowMap, or sample(psi, x, 'flow_map', steps=k)")
    if not is_flow_map(psi):
        raise TypeError(f"flow_map must be a diffusion_lab.flowmap.FlowMap (or a map with its call convention: "
                        f"psi(x, s, t), .schedule, .nfe), got {type(psi).__name__}")
    if psi.schedule.settings() != field.schedule.settings():
        raise ValueError(f"the flow map's schedule {psi.schedule!r} differs from the field's {field.schedule!r}; a "
                         f"flow map samples on the schedule it was trained on")
    return field, psi


def sample(field: VelocityField, x_init: torch.Tensor, method: str = "heun", steps: int | None = None,
           grid=None, *, nfe: int | None = None, grid_kind: str = "logsnr", generator: torch.Generator | None = None,
           final: str = "step", return_trajectory: bool = False, progress: bool = False,
           t_min: float | None = None, t_max: float | None = None, **options) -> SampleResult:
    """Integrate ``x_init`` (samples of p_{t_max}) from grid[0] = t_max to grid[-1] = t_min with ``method``.

    Give one of ``steps`` (with ``grid_kind`` in uniform / logsnr / karras / quadratic), ``nfe`` (a budget of
    model evaluations, spent by the method's budget rule, ``plan_for_nfe``; the final denoiser counts) or ``grid`` (a
    descending list or tensor of times; deterministic methods also take an increasing grid, which runs the
    PF-ODE from data to noise: DDIM inversion with method="ddim", an accurate one with "adaptive"). ``final`` is "step" or "denoise" (see the module docstring).
    ``t_min`` / ``t_max`` set the range of a grid built from ``steps`` or ``nfe`` (default: the schedule's); with
    ``method="auto"`` the end ``t_min`` also selects the rule (a grid that ends early, at half log-SNR
    lambda(t_min) <= ``auto.EARLY_LAMBDA``, has its own rule). Method options (eta, gamma, noise, rtol, ...) pass
    through ``**options``.

    Learned flow maps (``method="flow_map"``, ``samplers.flowmap``): ``sample(field, x, "flow_map", steps=k,
    flow_map=psi)`` runs the ``diffusion_lab.flowmap.FlowMap`` psi in k network calls (``nfe=k`` alike) on the grid
    of the field's schedule, which must be psi's (a ValueError otherwise); ``sample(psi, x, "flow_map", steps=k)``
    runs the map alone on its own schedule. Option ``noise_reinjection=True`` (with ``generator``) is multistep
    consistency sampling instead of the deterministic chain. ``nfe`` counts the map's calls (plus the field's
    denoiser call with final="denoise", which needs the field).
    """
    field, flow = _field_and_flow_map(field, method, options)
    schedule = flow.schedule if field is None else field.schedule
    check_batch(x_init, "x_init", shape=False)  # an empty batch is refused below, after the grid checks
    info = get_method(method)
    requested, auto = method, None
    if (t_min is not None or t_max is not None) and grid is not None:
        raise ValueError("t_min / t_max set the range of a grid built from steps= or nfe=; a grid= has its own")
    if info.family == "auto":  # the declared default: resolve method, grid and options from the budget
        if nfe is None or steps is not None or grid is not None:
            raise ValueError(f"method {method!r} takes an NFE budget only: sample(field, x, {method!r}, nfe=K)")
        from .auto import resolve

        t_end = field.schedule.t_min if t_min is None else t_min
        auto = resolve(method, nfe, final, lam_end=float(field.schedule.lam(torch.tensor(float(t_end),
                                                                                         dtype=torch.float64))),
                       schedule=schedule)
        method, grid_kind, options = auto.method, auto.grid_kind, {**auto.options, **options}
        info = get_method(method)
    if final not in ("step", "denoise"):
        raise ValueError(f"final must be 'step' or 'denoise', got {final!r}")
    if final == "denoise" and field is None:
        raise ValueError("final='denoise' needs the field's denoiser: sample(field, x, 'flow_map', flow_map=psi, "
                         "final='denoise')")
    adaptive = math.isnan(info.nfe_per_step)
    if sum(v is not None for v in (steps, grid, nfe)) > 1:
        raise ValueError("give one of steps=, nfe= or grid=")
    if nfe is not None:
        steps, options = plan_for_nfe(method, nfe, final, **options)
    if grid is not None:
        grid = check_grid(schedule, grid, allow_increasing=not info.stochastic)
        if grid[-1] > grid[0] and final == "denoise":
            raise ValueError("final='denoise' needs a decreasing grid (it ends on the data side)")
    elif steps is not None:
        grid = time_grid(schedule, steps, grid_kind, t_min=t_min, t_max=t_max)
    elif adaptive:  # integrate over the whole range; the method chooses its own steps
        grid = torch.tensor([schedule.t_max if t_max is None else t_max,
                             schedule.t_min if t_min is None else t_min], dtype=torch.float64)
        grid = check_grid(schedule, grid)
    else:
        raise ValueError(f"method {method!r} needs steps= or grid=")
    n = len(grid) - 1
    if n < info.min_steps:
        raise ValueError(f"method {method!r} needs at least {info.min_steps} steps, got {n}")
    if x_init.shape[0] == 0:
        raise ValueError("x_init is empty")
    traj = [x_init.clone()] if return_trajectory else None
    callback = (lambda i, x: traj.append(x.clone())) if return_trajectory else None
    counters = [c for c in (field, flow) if c is not None]  # every model whose calls count
    nfe0 = [c.nfe for c in counters]
    t0 = time.perf_counter()
    x, extra = info.fn(field if field is not None else flow, x_init, grid, generator=generator, callback=callback,
                       progress=progress, **options)
    if final == "denoise":
        x = field.denoiser(x, grid[-1])
    seconds = time.perf_counter() - t0
    settings = {"method": method, "steps": n, "grid_kind": grid_kind if steps is not None else "user",
                **({"nfe_budget": int(nfe)} if nfe is not None else {}),
                **({"requested_method": requested, "auto_rule": auto.rule} if auto is not None else {}),
                **({"t_min": float(t_min)} if t_min is not None else {}),
                **({"t_max": float(t_max)} if t_max is not None else {}),
                "final": final, "schedule": schedule.settings(), "dtype": str(x_init.dtype),
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in options.items()
                   if isinstance(v, (int, float, str, bool, tuple, list))}}
    if auto is not None:
        extra = {**(extra or {}), "auto": {"method": auto.method, "grid_kind": auto.grid_kind}}
    return SampleResult(x=x, nfe=sum(c.nfe - n0 for c, n0 in zip(counters, nfe0)), grid=grid, method=method,
                        trajectory=torch.stack(traj) if traj is not None else None, info=extra or {},
                        seconds=seconds, settings=settings)
