r"""The sampler comparison on an exact target (the main job behind ``diffusion-lab compare``).

For one exact target and schedule, every sampler starts from the same exact samples x_T ~ p_{t_max} and
runs at each NFE budget, spent by the method's own budget rule (``samplers.plan_for_nfe``: the largest step
count whose exact NFE fits, or e.g. DPM-Solver-fast's order composition). The declared defaults "auto" and
"auto_sde" come first: they choose method and grid from the budget (``samplers.auto``), ignoring ``grid_kind``;
``runs`` names the method/grid they ran. Reported per (sampler, budget):

- ``mmd2``, ``mmd2_se``: the unbiased MMD^2 between the samples and the EXACT target law p (p_{t_min}, or p_0
  with final="denoise"), Gaussian kernel with the bandwidth ``metrics.mmd_bandwidth(p)`` fixed by the law; the
  p-terms are closed form, so only the sample-sample term is Monte Carlo (``metrics.mmd2_exact``). Every sampler,
  deterministic or stochastic, gets it. ``mmd2_z`` = (mmd2 - null mean) / sqrt(mmd2_se^2 + null std^2) and
  ``resolved`` = mmd2_z > 2: whether the sampler's distance is distinguishable from that of exact samples.
  ``mmd_rank``: within one NFE budget, 1 + the number of samplers whose MMD^2 is lower by more than 2 standard
  errors of the PAIRED difference (``metrics.mmd2_diff_se``; rows share x_T), so samplers the metric cannot
  separate share a rank;
- ``flow_error``: mean_i ||x_i - Phi(x_T,i)||, Phi the PF-ODE flow map t_max -> t_min solved by scipy DOP853
  to rtol 1e-10 (deterministic samplers only: a stochastic sampler does not approximate Phi);
- ``sw2``: sliced W2 between the samples and one fixed set of as many exact samples of the target law, on the
  same 256 projections for every row; ``sw2_exact_flow``: the same for the exact flow map Phi(x_T); and in the
  reference the Monte-Carlo floor between two independent exact sets (mean, SE and spread over 4 repeats).
  Its Monte-Carlo spread is comparable to the differences between good samplers, so it is kept as a
  descriptive column only: ``sw2_resolved`` flags the rows above floor + 2 spreads, and nothing is ranked by it;
- ``w2_exact`` (Gaussian targets): the exact W2 between the sampler's output law and the target law, no Monte
  Carlo. Deterministic samplers: N(m_T, C_T) pushed through the sampler's affine map
  (``metrics.affine_pushforward``). Stochastic samplers: the law N(b, A C A^T + B B^T) of
  ``metrics.sampler_gaussian_law``, which needs the sampler's ``noise=`` option and ``info["noise_draws"]``
  (read from one probe call on 2 samples); NaN for a sampler without them;
- ``seconds``: wall time of the sampler call.

Learned flow maps (``flow_maps``, e.g. checkpoints of ``diffusion-lab distill``) get rows of their own at
``flow_map_nfes`` (default 1, 2, 4, 8 network calls) through ``sample(field, x_T, "flow_map", flow_map=psi)``, on the
same x_T, with the same metrics and ranks (within an NFE budget shared with ODE rows, the ranks compare them). A map
run as the deterministic chain gets ``flow_error``; with ``noise_reinjection`` (multistep consistency sampling) it
samples the law, so only the law metrics. ``w2_exact`` is NaN for them: a network is not affine in x_T, so the
Gaussian push-forward does not apply.

The reference holds the MMD null band (mean and spread of mmd2 over ``null_repeats`` sets of exact samples,
expectation exactly 0), the value for the exact flow map's samples, the bandwidth, the sliced-W2 floor, and
``ranking``: per NFE budget, the samplers ordered by (mmd_rank, mmd2).

Sample count: at the default 4,000 the MMD separates ``em`` at NFE 20 from the exact law on ring8 at 4.6-6
standard errors (8 seeds); at 2,000 it did so at 1.7-3.9 only, so the default is 4,000.

No I/O here: the CLI writes the CSV, JSON and figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .metrics import (affine_pushforward, gaussian_w2, mean_error, mmd2_diff_se, mmd2_exact, mmd2_null, mmd_bandwidth,
                      mmd_law_cross, sampler_gaussian_law, sliced_w2, sliced_w2_floor)
from .reference import flow_map
from .samplers import get_method, plan_for_nfe, sample
from .samplers.auto import resolve
from .schedules import Schedule
from .targets import Gaussian, GaussianMixture

__all__ = ["MethodSpec", "parse_method", "run_comparison", "mmd_ranks", "DEFAULT_METHODS", "DEFAULT_NFES",
           "DEFAULT_SAMPLES", "DEFAULT_FLOW_MAP_NFES"]

DEFAULT_NFES = (5, 10, 20, 50)
DEFAULT_FLOW_MAP_NFES = (1, 2, 4, 8)
DEFAULT_SAMPLES = 4000
DEFAULT_METHODS = ("auto", "auto_sde", "euler", "heun", "ddim", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc",
                   "ipndm", "deis", "em", "ddpm_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "pc")


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
    _check_option_names(name, [k for k, _ in options], spec)
    return MethodSpec(name, tuple(options))


def method_options(name: str) -> list[str] | None:
    """The option names a registered method accepts (None: it also forwards arbitrary options, as pc passes its
    predictor's options on; "auto" methods accept none)."""
    import inspect

    info = get_method(name)
    params = inspect.signature(info.fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and info.family != "auto":
        return None
    skip = {"field", "x", "grid", "generator", "callback", "progress"}
    return [] if info.family == "auto" else [n for n in params if n not in skip]


def _check_option_names(name: str, keys: list, spec: str) -> None:
    """Unknown options fail here, before any work, with the valid ones listed."""
    valid = method_options(name)
    if valid is None:
        return
    bad = [k for k in keys if k not in valid]
    if bad:
        raise ValueError(f"method {name!r} has no option {bad[0]!r} (in {spec!r}); its options: "
                         + (", ".join(valid) if valid else "none"))


@dataclass(frozen=True)
class _Run:
    """How one (spec, budget) row runs: the registered method, step count, grid kind and options."""

    method: str
    steps: int
    grid_kind: str
    options: dict


def plan_row(spec: MethodSpec, nfe: int, final: str, grid_kind: str, schedule: Schedule | None = None) -> _Run:
    """Resolve a (method, budget) pair: "auto"/"auto_sde" pick method and grid kind by their rule (for
    ``schedule``, as ``sample`` does), then the method's budget rule gives the step count and options."""
    choice = resolve(spec.name, nfe, final, schedule=schedule)
    name, kind = (choice.method, choice.grid_kind) if choice else (spec.name, grid_kind)
    steps, options = plan_for_nfe(name, int(nfe), final, **dict(spec.options))
    return _Run(name, steps, kind, options)


def mmd_ranks(results: list, margin: float = 2.0) -> list[int]:
    """SE-aware ranks of paired MMD results (``metrics.mmd2_exact`` on sets sharing their starts): rank_a = 1 +
    #{b : mmd2_b < mmd2_a - margin * SE(mmd2_a - mmd2_b)}, SE of the paired difference. Ties are shared; a
    sampler outranks another only where the metric resolves the gap."""
    out = []
    for a in results:
        better = sum(1 for b in results if b is not a and b.mmd2 < a.mmd2 - margin * mmd2_diff_se(a, b))
        out.append(1 + better)
    return out


def _noise_law(field, p_T, law, run_: _Run, final, x_probe):
    """Exact W2 of a stochastic sampler's output law on a Gaussian target, or NaN when the sampler does not
    take ``noise=`` or report ``info["noise_draws"]``."""
    opts, steps, grid_kind = run_.options, run_.steps, run_.grid_kind
    try:
        probe = sample(field, x_probe, run_.method, steps=steps, grid_kind=grid_kind, final=final,
                       generator=torch.Generator().manual_seed(0), **opts)
    except TypeError:
        return math.nan
    k = probe.info.get("noise_draws")
    if k is None:
        return math.nan

    def run(x, noise):
        return sample(field, x, run_.method, steps=steps, grid_kind=grid_kind, final=final, noise=noise, **opts).x

    try:
        m, c = sampler_gaussian_law(run, p_T.mu, p_T.cov, int(k))
    except TypeError:  # no noise option after all
        return math.nan
    return gaussian_w2(m, c, law.mu, law.cov)


def _flow_map_plan(flow_maps, flow_map_nfes, schedule, final):
    """[(label, FlowMap, options, nfe)] of the ``flow_maps`` argument, checked before any work."""
    from .samplers.flowmap import is_flow_map

    if not flow_maps:
        return []
    if final != "step":
        raise ValueError("flow maps end at t_min: compare them with final='step'")
    if not flow_map_nfes or any(int(k) != k or k < 1 for k in flow_map_nfes):
        raise ValueError(f"flow_map_nfes must be integers >= 1, got {list(flow_map_nfes)}")
    plan = []
    for label, value in flow_maps.items():
        psi, options = (value, {}) if is_flow_map(value) else value
        if not is_flow_map(psi):
            raise TypeError(f"flow map {label!r}: expected a diffusion_lab.flowmap.FlowMap or (FlowMap, options), got "
                            f"{type(psi).__name__}")
        if psi.schedule.settings() != schedule.settings():
            raise ValueError(f"flow map {label!r} was trained on the schedule {psi.schedule.settings()}, the "
                             f"comparison runs on {schedule.settings()}")
        _check_option_names("flow_map", list(options), label)
        plan += [(label, psi, dict(options), int(k)) for k in flow_map_nfes]
    return plan


def run_comparison(target: GaussianMixture, schedule: Schedule, methods, nfes=DEFAULT_NFES, *,
                   n_samples: int = DEFAULT_SAMPLES, seed: int = 0, grid_kind: str = "logsnr", final: str = "step",
                   progress=None, mmd_bandwidth_override: float | None = None, null_repeats: int = 8,
                   flow_maps: dict | None = None, flow_map_nfes=DEFAULT_FLOW_MAP_NFES) -> dict:
    """Run every (method, NFE) pair; returns {"rows": [...], "reference": {...}} (see module docstring).
    ``mmd_bandwidth_override`` replaces the law-based kernel bandwidth; ``null_repeats`` sets of exact samples
    form the MMD null band. ``flow_maps``: {label: FlowMap or (FlowMap, {"noise_reinjection": bool})}, each run at
    every budget of ``flow_map_nfes`` (one network call per step) after the samplers, on ``grid_kind``."""
    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    map_plan = _flow_map_plan(flow_maps, flow_map_nfes, schedule, final)
    if n_samples < 3:
        raise ValueError(f"n_samples must be >= 3 (the MMD standard error needs it), got {n_samples}")
    plan = []
    for spec in specs:
        for nfe in nfes:
            plan.append((spec, nfe, plan_row(spec, nfe, final, grid_kind, schedule)))
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

    bw = mmd_bandwidth(law) if mmd_bandwidth_override is None else float(mmd_bandwidth_override)
    pp = mmd_law_cross(law, law, bw)
    null = mmd2_null(law, n_samples, repeats=null_repeats, seed=seed + 2000, bandwidth=bw)

    def mmd(x):
        return mmd2_exact(x, law, bw, pp=pp)

    def z_of(r):
        return (r.mmd2 - null["mean"]) / math.sqrt(r.se ** 2 + null["std"] ** 2)

    sw2_exact_flow = sw2(ref)
    sw2_spread = floor_se * math.sqrt(4)  # sliced_w2_floor's 4 repeats: SE of their mean -> spread of one value
    mmd_flow = mmd(ref)
    gaussian = isinstance(target, Gaussian)
    rows, results = [], []
    total = len(plan) + len(map_plan)
    for k, (spec, nfe, run_) in enumerate(plan):
        info = get_method(run_.method)
        steps = run_.steps
        gen = torch.Generator().manual_seed(seed + 1)  # the same noise stream for every stochastic sampler
        res = sample(field, x_T, run_.method, steps=steps, grid_kind=run_.grid_kind, generator=gen, final=final,
                     **run_.options)
        deterministic = not info.stochastic and not dict(spec.options).get("eta", 0)
        r = mmd(res.x)
        results.append(r)
        row = {
            "sampler": spec.label, "family": info.family, "order": info.order, "stochastic": not deterministic,
            "nfe_budget": int(nfe), "steps": steps, "nfe": res.nfe, "grid_kind": run_.grid_kind,
            "runs": f"{run_.method}/{run_.grid_kind}" if run_.method != spec.name else "",
            "mmd2": r.mmd2, "mmd2_se": r.se, "mmd2_z": z_of(r), "resolved": bool(z_of(r) > 2.0), "mmd_rank": 0,
            "flow_error": mean_error(res.x, ref) if deterministic else math.nan,
            "sw2": sw2(res.x), "sw2_exact_flow": sw2_exact_flow, "w2_exact": math.nan, "seconds": res.seconds,
        }
        row["sw2_resolved"] = bool(row["sw2"] > floor + 2 * sw2_spread)
        if gaussian and deterministic:
            m, c = affine_pushforward(
                lambda pts: sample(field, pts, run_.method, steps=steps, grid_kind=run_.grid_kind,
                                   final=final, **run_.options).x,
                p_T.mu, p_T.cov)
            row["w2_exact"] = gaussian_w2(m, c, law.mu, law.cov)
        elif gaussian:
            row["w2_exact"] = _noise_law(field, p_T, law, run_, final, x_T[:2])
        rows.append(row)
        if progress is not None:
            progress(k + 1, total, row)
    for k, (label, psi, options, nfe) in enumerate(map_plan):
        res = sample(field, x_T, "flow_map", steps=nfe, grid_kind=grid_kind, flow_map=psi,
                     generator=torch.Generator().manual_seed(seed + 1), **options)
        deterministic = not options.get("noise_reinjection", False)
        r = mmd(res.x)
        results.append(r)
        row = {
            "sampler": label, "family": "flow_map", "order": math.nan, "stochastic": not deterministic,
            "nfe_budget": nfe, "steps": nfe, "nfe": res.nfe, "grid_kind": grid_kind, "runs": "",
            "mmd2": r.mmd2, "mmd2_se": r.se, "mmd2_z": z_of(r), "resolved": bool(z_of(r) > 2.0), "mmd_rank": 0,
            "flow_error": mean_error(res.x, ref) if deterministic else math.nan,
            "sw2": sw2(res.x), "sw2_exact_flow": sw2_exact_flow, "w2_exact": math.nan, "seconds": res.seconds,
        }
        row["sw2_resolved"] = bool(row["sw2"] > floor + 2 * sw2_spread)
        rows.append(row)
        if progress is not None:
            progress(len(plan) + k + 1, total, row)
    ranking = {}
    for budget in dict.fromkeys([*(int(nfe) for nfe in nfes), *(nfe for *_, nfe in map_plan)]):
        idx = [i for i, row in enumerate(rows) if row["nfe_budget"] == budget]
        for i, rk in zip(idx, mmd_ranks([results[i] for i in idx])):
            rows[i]["mmd_rank"] = rk
        ranking[budget] = [rows[i]["sampler"] for i in sorted(idx, key=lambda i: (rows[i]["mmd_rank"], rows[i]["mmd2"]))]
    return {
        "rows": rows,
        "reference": {"solver": "scipy DOP853", "rtol": 1e-10, "nfe": ref_nfe, "sw2_exact_flow": sw2_exact_flow,
                      "sw2_floor": floor, "sw2_floor_se": floor_se, "sw2_floor_spread": sw2_spread,
                      "law": "p_0" if final == "denoise" else "p_t_min",
                      "mmd_bandwidth": bw, "mmd_kernel": "exp(-|x - y|^2 / (2 l^2))",
                      "mmd2_null_mean": null["mean"], "mmd2_null_std": null["std"], "mmd2_null_repeats": null_repeats,
                      "mmd2_null_values": null["values"], "mmd2_exact_flow": mmd_flow.mmd2,
                      "mmd2_exact_flow_se": mmd_flow.se, "mmd2_exact_flow_z": z_of(mmd_flow),
                      "n_samples": n_samples, "ranking": ranking},
    }
