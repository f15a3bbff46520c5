r"""The sampler comparison on an exact target (the main job behind ``diffusion-lab compare``).

For one exact target and schedule, every sampler starts from the same exact samples x_T ~ p_{t_max} and
runs at each NFE budget (the largest step count whose exact NFE fits). Reported per (sampler, budget):

- ``flow_error``: mean_i ||x_i - Phi(x_T,i)||, Phi the PF-ODE flow map t_max -> t_min solved by scipy DOP853
  to rtol 1e-10 (deterministic samplers only: a stochastic sampler does not approximate Phi);
- ``sw2``: sliced W2 between the samples and one fixed set of as many exact samples of the target law (p_{t_min},
  or p_0 with final="denoise"), on the same 256 projections for every row (a paired comparison). Next to it,
  ``sw2_exact_flow``: the same distance for the exact flow map Phi(x_T) (what an error-free deterministic
  sampler scores on these samples), and in the reference, the Monte-Carlo floor between two independent
  exact sample sets (mean and SE over 4 repeats);
- ``w2_exact`` (Gaussian targets, deterministic samplers): the exact W2 between the sampler's output law,
  obtained by pushing N(m_T, C_T) through the sampler's affine map, and the target law -- no Monte Carlo;
- ``seconds``: wall time of the sampler call.

No I/O here: the CLI writes the CSV, JSON and figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .metrics import affine_pushforward, gaussian_w2, mean_error, sliced_w2, sliced_w2_floor
from .reference import flow_map
from .samplers import get_method, sample, steps_for_nfe
from .schedules import Schedule
from .targets import Gaussian, GaussianMixture

__all__ = ["MethodSpec", "parse_method", "run_comparison", "DEFAULT_METHODS", "DEFAULT_NFES"]

DEFAULT_NFES = (5, 10, 20, 50)
DEFAULT_METHODS = ("euler", "heun", "ddim", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc",
                   "em", "ddpm_ancestral", "pc")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method with options, e.g. ``ddim:eta=0.5`` or ``heun:coords=edm``."""

    name: str
    options: tuple = ()

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.options)


def _value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_method(spec: str) -> MethodSpec:
    """Parse ``name`` or ``name:key=value,key=value``; raises ValueError naming the valid methods."""
    name, _, opts = spec.partition(":")
    get_method(name)  # raises with the list of valid choices
    options = []
    for item in filter(None, opts.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise ValueError(f"bad method option {item!r} in {spec!r}; write name:key=value,key=value")
        options.append((key, _value(val)))
    return MethodSpec(name, tuple(options))


def _nfe_options(spec: MethodSpec) -> dict:
    """The options that change a method's NFE count (see steps_for_nfe)."""
    return {k: v for k, v in spec.options if k in ("predictor", "corrector_steps", "n_steps_each")}


def run_comparison(target: GaussianMixture, schedule: Schedule, methods, nfes=DEFAULT_NFES, *, n_samples: int = 2000,
                   seed: int = 0, grid_kind: str = "logsnr", final: str = "step", progress=None) -> dict:
    """Run every (method, NFE) pair; returns {"rows": [...], "reference": {...}} (see module docstring)."""
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    plan = []
    for spec in specs:
        for nfe in nfes:
            plan.append((spec, nfe, steps_for_nfe(spec.name, int(nfe), final, **_nfe_options(spec))))
    g = torch.Generator().manual_seed(seed)
    p_T = target.marginal(schedule, schedule.t_max)
    x_T = p_T.sample(n_samples, g)
    field = target.field(schedule)
    ref, ref_nfe = flow_map(field, x_T, schedule.t_max, schedule.t_min)
    if final == "denoise":
        ref = field.denoiser(ref, schedule.t_min)
        law = target
    else:
        law = target.marginal(schedule, schedule.t_min)
    floor, floor_se = sliced_w2_floor(law.sample, n_samples, seed=seed + 1000)
    y = law.sample(n_samples, torch.Generator().manual_seed(seed + 2))

    def sw2(x):  # the same projections for every row
        return sliced_w2(x, y, 256, torch.Generator().manual_seed(seed + 3))

    sw2_exact_flow = sw2(ref)
    rows = []
    for k, (spec, nfe, steps) in enumerate(plan):
        info = get_method(spec.name)
        gen = torch.Generator().manual_seed(seed + 1)  # the same noise stream for every stochastic sampler
        res = sample(field, x_T, spec.name, steps=steps, grid_kind=grid_kind, generator=gen, final=final,
                     **dict(spec.options))
        deterministic = not info.stochastic and not dict(spec.options).get("eta", 0)
        row = {
            "sampler": spec.label, "family": info.family, "order": info.order, "stochastic": not deterministic,
            "nfe_budget": int(nfe), "steps": steps, "nfe": res.nfe,
            "flow_error": mean_error(res.x, ref) if deterministic else math.nan,
            "sw2": sw2(res.x), "sw2_exact_flow": sw2_exact_flow, "w2_exact": math.nan, "seconds": res.seconds,
        }
        if isinstance(target, Gaussian) and deterministic:
            m, c = affine_pushforward(
                lambda pts: sample(target.field(schedule), pts, spec.name, steps=steps, grid_kind=grid_kind,
                                   final=final, **dict(spec.options)).x,
                p_T.mu, p_T.cov)
            row["w2_exact"] = gaussian_w2(m, c, law.mu, law.cov)
        rows.append(row)
        if progress is not None:
            progress(k + 1, len(plan), row)
    return {
        "rows": rows,
        "reference": {"solver": "scipy DOP853", "rtol": 1e-10, "nfe": ref_nfe, "sw2_exact_flow": sw2_exact_flow,
                      "sw2_floor": floor, "sw2_floor_se": floor_se, "law": "p_0" if final == "denoise" else "p_t_min"},
    }
