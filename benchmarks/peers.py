#!/usr/bin/env python
r"""diffusers' schedulers and k-diffusion's samplers against diffusion_lab's samplers, with the SAME exact model.

Two comparisons on exact Gaussian-mixture targets under ``schedules.DDPMDiscrete()`` (diffusers' default "linear"
betas 1e-4..0.02 over N = 1000 steps, float64):

* deterministic samplers: terminal error of the PF-ODE flow map (same start samples, matched end times);
* stochastic samplers: distance of the output LAW to the exact data law (MMD with closed-form mixture terms, and
  the exact W2 on Gaussian targets), where a per-sample error is meaningless.

What is compared (deterministic side)
-------------------------------------
* Model. One exact noise prediction eps(x, t) of a Gaussian mixture (``target.field(schedule, "eps")``).
  diffusers calls ``model(x, k)`` with a timestep k (0-based, possibly fractional); we answer with
  ``field.eps(x, t=(k + 1)/N)``. A fractional k is mapped by the same affine rule and evaluated on
  DDPMDiscrete's continuous-time interpolation (log alpha piecewise linear in t between the knots t_i = i/N,
  alpha(0) = 1): this is exactly the continuous-time model of DPM-Solver's ``NoiseScheduleVP('discrete')``.
  With the options used here every scheduler calls the model at integer timesteps (knots) only; the mapping
  matters for the optional ``--karras`` variants, whose timesteps are fractional (DPM-Solver rounds them to
  integers while its update uses the unrounded sigma: a genuine inconsistency of that scheduler that an
  exact model exposes).
  k-diffusion calls a denoiser D(xbar, sigmabar) on xbar = x/alpha with sigmabar = sigma/alpha = e^{-lambda};
  we answer with ``field.denoiser(alpha(t) xbar, t)`` at t = ``schedule.t_from_lam(-log sigmabar)``
  (``benchmarks/_kdiffusion.py``). Its sigma list is its default ``get_sigmas_karras(n, sigma_min, sigma_max,
  rho=7)`` with a 0 appended, where sigma_min, sigma_max are sigmabar at t = 1/N and t = 1.
* Start. Every method starts at its own first time t_s from samples of the EXACT marginal p_{t_s}:
  x_s = alpha(t_s) x_0 + sigma(t_s) z with the same seeded x_0 ~ p_0 and the same standard-normal z for all
  methods. All schedulers here use timestep_spacing="trailing", so t_s = 1 (timestep 999) for all of them, and
  k-diffusion starts at sigma_max, i.e. t_s = 1 as well.
  k-diffusion-style schedulers (Euler, Heun, LMS; init_noise_sigma != 1) keep the state x/alpha; they get
  x_s / alpha(t_s) and their model inputs go through ``scheduler.scale_model_input`` as in the pipelines.
* End. Per peer run we determine which time its output corresponds to:
    - "x(t_e)":   the state at a time t_e > 0 (DEIS: sigma_last = sigma of timestep 0, t_e = 1/N; PNDM:
                  final_alpha_cumprod = alphas_cumprod[0], t_e = 1/N; k-diffusion's DPM-Solver-fast stops at
                  sigma_min, t_e = 1/N). Reference: the PF-ODE flow map Phi_{t_s -> t_e}(x_s). Ours: a grid from
                  t_s to t_e, final="step".
    - "D@t_last": the output equals, to round-off, the denoiser computed from the LAST model call,
                  D(x_last, t_last) = (x_last - sigma eps)/alpha (DDIM with set_alpha_to_one=True; DPM-Solver++,
                  UniPC, Euler, Heun with a first-order final step to sigma = 0; k-diffusion's samplers with its
                  appended sigma = 0, at t_last = 1/N). This is checked numerically on every run, not assumed.
                  Reference: D(Phi_{t_s -> t_last}(x_s), t_last). Ours: a grid from t_s to t_last,
                  final="denoise" (one NFE for the denoiser, counted).
    - "x(0)":     output at sigma = 0 that is NOT the last denoiser (LMS of both libraries: a 4th-order multistep
                  step to sigma = 0). Reference: the flow map to t = 0, computed as D(Phi_{t_s -> 1e-8}(x_s),
                  1e-8) (differs from Phi_{t_s -> 0} by O(sigma/alpha at 1e-8)^2 ~ 1e-9). Ours: a grid from t_s
                  to DDPMDiscrete()'s default t_min = 1e-3, final="denoise".
  Secondary column err0: for every sigma = 0 output, the error against the same x(0) reference (how far the
  output is from the PF-ODE map to data; this charges the final denoising step as an error).
* Reference. ``samplers.sample(field, x_s, "adaptive", grid=[t_s, *end times, 1e-8], rtol=1e-10,
  atol=1e-12, coords="edm")`` in float64, one run per target through all end times (Dormand-Prince stops
  exactly at every grid time). coords="edm" integrates d(x/alpha)/d(sigma/alpha) = eps, which is smooth; in
  t-coordinates the drift f(t) of DDPMDiscrete jumps at all 1000 knots and the step controller crawls. In
  these coordinates the exact flow between two knot times does not depend on how alpha is interpolated
  between knots (eps depends on t only through alpha, sigma), so the reference is the same for the discrete
  schedule as diffusers sees it.
* Ours. Every registered deterministic method (MethodInfo.stochastic False, adaptive excluded) on the grid
  kinds of ``--grids`` (default logsnr / karras / uniform / quadratic) between the matched start and end times,
  with the step count (and options) of ``samplers.plan_for_nfe`` (the largest N that fits, unless a method has
  a budget rule of its own); "our best" is the most accurate (method, grid) at that end, chosen AFTER the fact
  against the exact reference.
* Error = mean over samples of ||x - x_ref||_2.
* Options. Besides the common betas/prediction type and timestep_spacing="trailing", every scheduler keeps its
  defaults except DDIM's clip_sample (default True: it clips x0_hat to [-1, 1], an image-range assumption that
  is not part of the ODE solver and would wreck targets of radius 2); set_alpha_to_one, lower_order_final,
  final_sigmas_type, euler_at_final are left at their defaults and their effect is what the "end" column shows.
  k-diffusion's samplers run with all their options at the defaults.
* "fixed" column: one configuration of ours declared in advance (--fixed, default auto/auto: the package's
  declared default ``method="auto"``, whose rule picks the method and grid kind from the budget and was fixed on
  a design set that excludes the suite; see diffusion_lab/samplers/auto.py), reported beside the per-cell best.
* NFE. Each peer's model calls are counted by wrapping the model; the step count is the largest whose counted
  NFE is <= the budget (diffusers Heun: 2N - 1, PNDM/PLMS: N + 1, the rest: N; k-diffusion Heun, DPM-2: 2N - 1,
  DPM-Solver-fast: n = the budget, the rest: N).

What is compared (stochastic side)
----------------------------------
* Same model, same start x_s ~ p_1 (t_s = 1) as above; every stochastic sampler runs to data: the peers to their
  sigma = 0 output (diffusers ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")`` orders 2 and 3,
  ``EulerAncestralDiscreteScheduler``, ``DPMSolverSDEScheduler``, all with the common options above; k-diffusion's
  euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde at their defaults
  on their default Karras sigmas), ours on a grid from t = 1 to t_min = 1e-3 with final="denoise".
* Distance to the EXACT law p_0: ``metrics.mmd2_exact`` -- the unbiased MMD^2 with a Gaussian kernel whose
  sample-vs-law and law-vs-law terms are closed form for a Gaussian mixture (only the sample-sample term is Monte
  Carlo), with its standard error; bandwidth ``metrics.mmd_bandwidth(p_0)``, fixed by the law in advance. The
  row "exact samples" is the same statistic on the seeded exact samples x_0 themselves: its mean is 0, and its
  SE is the resolution of the table. Two values are "resolved" when they differ by more than 2 standard errors of
  the difference (SEs added in quadrature; the runs share the start samples, which makes this conservative).
* Gaussian targets: the EXACT output law of a sampler with an exact affine score is Gaussian and is read off by
  ``metrics.sampler_gaussian_law`` (one batched run with the normals as inputs, no Monte Carlo); W2 to p_0 is then
  exact. It is computed for ours where the sampler takes ``noise=``, for diffusers' DPM-Solver SDE schedulers
  through ``step(variance_noise=...)``, and for the k-diffusion samplers through ``noise_sampler`` where one
  independent normal per call is the sampler's law (not dpmpp_sde, whose Brownian-tree draws on nested
  intervals are correlated).
* Ours: every registered stochastic method on every grid kind of ``--grids``, at its default options; "our best
  stochastic (after the fact)" is the smallest MMD^2 of these pairs (on Gaussian targets also the smallest W2),
  chosen after seeing the numbers (and, for MMD^2, biased low by that choice among noisy values); "fixed-sde"
  is one configuration declared in advance (``--fixed-sde``, default auto_sde/auto: ``method="auto_sde"``).
* Noise: ours draw from a torch.Generator seeded with seed + 2; diffusers' stochastic schedulers get the same
  seeded generator in ``step`` (DPMSolverSDEScheduler and k-diffusion use torch's global generator, seeded with
  seed + 2 before each run).

diffusers computes its schedule in float32 (betas, alphas_cumprod, sigmas; relative error <= 1e-6 against
the float64 schedule) and some schedulers step in float32 (Euler upcasts to float32 inside ``step``), which sets
an error floor of roughly 1e-6 for them; it only matters at large NFE.

Run:  python benchmarks/peers.py [--nfe "10 20"] [--targets "ring8 gaussian_2d"] [--suite] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field as dc_field
from pathlib import Path

import torch

try:
    import diffusion_lab
    from diffusion_lab import metrics, samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import diffusion_lab
    from diffusion_lab import metrics, samplers, schedules, targets

from diffusion_lab.interop import FieldAsDiffusers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _kdiffusion as KD  # noqa: E402  (benchmarks/_kdiffusion.py, next to this script)

TARGET_NAMES = ("ring8", "bimodal_1d", "gaussian_2d")
GRID_KINDS = ("logsnr", "karras", "uniform", "quadratic")
T_ZERO = 1e-8  # stand-in for t = 0 in the x(0) reference (sigma/alpha ~ 3e-5 there)
N_TRAIN = 1000
T_MIN_OURS = 1e-3  # where our runs to data stop before the final denoiser (DDPMDiscrete()'s default t_min)

COMMON = dict(num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon")


@dataclass
class Spec:
    """One diffusers scheduler configuration."""

    label: str
    cls: str
    options: dict = dc_field(default_factory=dict)
    extra: bool = False  # only with --karras
    noise_input: bool = False  # step() takes variance_noise (one normal per step): exact law on Gaussians


SPECS = [
    Spec("DDIM", "DDIMScheduler", dict(timestep_spacing="trailing", clip_sample=False)),
    Spec("DPM++2M", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_order=2,
                                                        algorithm_type="dpmsolver++")),
    Spec("DPM++3M", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_order=3,
                                                        algorithm_type="dpmsolver++")),
    Spec("UniPC", "UniPCMultistepScheduler", dict(timestep_spacing="trailing")),
    Spec("Euler", "EulerDiscreteScheduler", dict(timestep_spacing="trailing")),
    Spec("Heun", "HeunDiscreteScheduler", dict(timestep_spacing="trailing")),
    Spec("DEIS", "DEISMultistepScheduler", dict(timestep_spacing="trailing")),
    Spec("LMS", "LMSDiscreteScheduler", dict(timestep_spacing="trailing")),
    Spec("PNDM", "PNDMScheduler", dict(timestep_spacing="trailing", skip_prk_steps=True)),
    Spec("DPM++2M-karras", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_order=2,
                                                               algorithm_type="dpmsolver++",
                                                               use_karras_sigmas=True), extra=True),
    Spec("Euler-karras", "EulerDiscreteScheduler", dict(timestep_spacing="trailing", use_karras_sigmas=True),
         extra=True),
]

#: diffusers' stochastic schedulers (the stochastic table)
STOCH_SPECS = [
    Spec("DPM++2M-SDE", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_order=2,
                                                            algorithm_type="sde-dpmsolver++"), noise_input=True),
    Spec("DPM++3M-SDE", "DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", solver_order=3,
                                                            algorithm_type="sde-dpmsolver++"), noise_input=True),
    Spec("EulerA", "EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing")),
    Spec("DPM-SDE", "DPMSolverSDEScheduler", dict(timestep_spacing="trailing")),
]


def kd_label(name: str) -> str:
    return "kd:" + name.removeprefix("sample_")


# ------------------------------------------------------------------------------------------------
# The exact model as diffusers sees it


def make_scheduler(spec: Spec):
    import diffusers

    cls = getattr(diffusers, spec.cls)
    return cls(**COMMON, **spec.options)


def _t_of_sigma(schedule, sigma: float) -> float:
    """Time of the EDM noise level sigma/alpha = e^{-lambda}, snapped to a knot i/N when float32 round-off
    is all that separates them (diffusers keeps sigmas in float32)."""
    t = float(schedule.t_from_lam(torch.tensor(-math.log(sigma), dtype=torch.float64)))
    i = round(t * N_TRAIN)
    return i / N_TRAIN if abs(t * N_TRAIN - i) < 1e-3 else t


def nominal_end(sch, schedule, n_steps: int) -> tuple[str, float | None, list[str]]:
    """What the configuration says the output is: ("sigma0", None) for an output at sigma = 0 / alpha = 1,
    or ("time", t_e) for a state at t_e > 0; plus notes on inconsistencies of the scheduler's own grid."""
    notes = []
    if hasattr(sch, "final_alpha_cumprod"):  # DDIM / PNDM: prev_timestep = k - N_train // n
        ts = sorted({int(k) for k in sch.timesteps.tolist()}, reverse=True)
        ratio = N_TRAIN // n_steps
        states = [k - ratio for k in ts]
        if states[:-1] != ts[1:]:
            bad = [(s, k) for s, k in zip(states[:-1], ts[1:]) if s != k]
            notes.append(f"prev_timestep = k - {N_TRAIN}//{n_steps} puts states at timesteps "
                         f"{[s for s, _ in bad]} but calls the model at {[k for _, k in bad]}")
        last = states[-1]
        if last >= 0:
            return "time", (last + 1) / N_TRAIN, notes
        fa = float(sch.final_alpha_cumprod)
        if fa == 1.0:
            return "sigma0", None, notes
        # final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one=False) -> timestep 0
        acp = schedule.alphas_cumprod
        i = int(torch.argmin((acp - fa).abs()))
        if abs(float(acp[i]) - fa) > 1e-6:
            raise RuntimeError(f"final_alpha_cumprod {fa} matches no timestep")
        return "time", (i + 1) / N_TRAIN, notes
    sig = sch.sigmas
    last = float(sig[-1])
    if last == 0.0:
        return "sigma0", None, notes
    return "time", _t_of_sigma(schedule, last), notes


def run_scheduler(spec: Spec, n_steps: int, field, x0, z, *, x_start=None, generator=None, noise=None,
                  dry: bool = False) -> dict:
    """One diffusers sampling loop as its pipelines run it; returns the output in x-space (VP) and its end.

    The start is alpha(t_s) x0 + sigma(t_s) z, or ``x_start`` (samples of p_{t_s}) when given. Stochastic
    schedulers get ``generator`` in ``step`` when they accept one; ``noise`` (n_steps, *x.shape) is passed as
    ``variance_noise`` of step i (DPM-Solver's SDE variants), which makes the output a function of its inputs."""
    schedule = field.schedule
    sch = make_scheduler(spec)
    sch.set_timesteps(n_steps)
    ts = sch.timesteps
    model = FieldAsDiffusers(field, N_TRAIN)  # model(x, k) -> eps(x, t = (k + 1)/N), counting calls
    t_s = float(model.t_of(ts[0]))
    a_s, s_s = float(schedule.alpha(t_s)), float(schedule.sigma(t_s))
    if x_start is None:
        x_start = a_s * x0 + s_s * z  # exact sample of p_{t_s}
    scaled_state = float(sch.init_noise_sigma) != 1.0  # k-diffusion style: the state is x / alpha
    x = x_start / a_s if scaled_state else x_start.clone()
    params = inspect.signature(sch.step).parameters
    kw = {"generator": generator} if generator is not None and "generator" in params else {}
    if noise is not None:
        if "variance_noise" not in params:
            raise ValueError(f"{spec.label}: step() takes no variance_noise")
        if noise.shape[0] != len(ts):
            raise ValueError(f"{spec.label}: noise has {noise.shape[0]} draws for {len(ts)} steps")
    for i, k in enumerate(ts):
        x_in = sch.scale_model_input(x, k)
        eps = model(x_in, k)
        if noise is not None:
            kw["variance_noise"] = noise[i]
        x = sch.step(eps, k, x, **kw).prev_sample
    if x.dtype != torch.float64:
        raise RuntimeError(f"{spec.label} returned {x.dtype}; expected float64")
    kind, t_e, notes = nominal_end(sch, schedule, n_steps)
    if kind == "time" and scaled_state:
        x = x * float(schedule.alpha(t_e))  # back from x/alpha to x
    out = {"x": x, "nfe": model.calls, "t_start": t_s, "x_start": x_start, "notes": notes,
           "calls_at": model.timesteps}
    if kind == "time":
        out.update(end="x(t_e)", t_end=t_e)
        return out
    # sigma = 0: is the output the denoiser of the last model call?
    xl, tl, el = model.last
    al, sl = float(schedule.alpha(tl)), float(schedule.sigma(tl))
    d_last = (xl - sl * el) / al
    dev = float((x - d_last).abs().max() / (1.0 + d_last.abs().max()))
    t_last = float(tl)
    if dev < 1e-5:
        out.update(end="D@t_last", t_end=t_last, dev_from_last_denoiser=dev)
    else:
        out.update(end="x(0)", t_end=0.0, t_last=t_last, dev_from_last_denoiser=dev)
    return out


def steps_for_budget(spec: Spec, budget: int, field, dim: int) -> tuple[int, int] | None:
    """Largest num_inference_steps whose counted NFE is <= budget (dry runs on a 4-sample batch)."""
    x0 = torch.zeros(4, dim, dtype=torch.float64)
    z = torch.randn(4, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for n in range(budget, 0, -1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                nfe = run_scheduler(spec, n, field, x0, z, generator=torch.Generator().manual_seed(0))["nfe"]
        except Exception:  # some configurations reject tiny step counts
            continue
        if nfe <= budget:
            return n, nfe
    return None


# ------------------------------------------------------------------------------------------------
# Ours


def mean_err(x, ref) -> float:
    return float((x - ref).reshape(x.shape[0], -1).norm(dim=1).mean())


def our_methods(selected=None, stochastic=False):
    ms = [m for m in samplers.available() if m.stochastic == stochastic and not math.isnan(m.nfe_per_step)]
    if selected:
        ms_sel = [m for m in ms if m.name in selected]
        return ms_sel
    return ms


def check_methods(selected):
    known = {m.name for m in samplers.available() if not math.isnan(m.nfe_per_step)}
    unknown = set(selected or ()) - known
    if unknown:
        raise SystemExit(f"error: --methods: {sorted(unknown)} are not registered fixed-step methods "
                         f"(choose from {sorted(known)})")


def our_plan(method: str, nfe: int, final: str) -> tuple[int, dict]:
    """(steps, options) for ``method`` at a budget of ``nfe`` (its own budget rule where it has one)."""
    plan = getattr(samplers, "plan_for_nfe", None)
    if plan is not None:
        return plan(method, nfe, final)
    return samplers.steps_for_nfe(method, nfe, final), {}


def resolve(method: str, nfe: int, final: str, grids, lam_end: float | None = None,
            schedule=None) -> tuple[str, list, list]:
    """(method to run, [(grid label, grid kind)], plan) -- the declared defaults "auto" / "auto_sde" resolve to
    their rule's method and grid kind for this budget and the grid's end (``samplers.auto.resolve``, with the
    half log-SNR ``lam_end`` at the end time, exactly as ``sample(..., t_min=t_e)`` resolves it), labelled grid
    "auto"."""
    from diffusion_lab.samplers.auto import resolve as auto_resolve

    choice = auto_resolve(method, nfe, final, lam_end=lam_end, schedule=schedule)
    if choice is not None:
        return choice.method, [("auto", choice.grid_kind)], {"resolved": f"{choice.method}/{choice.grid_kind}"}
    return method, [(g, g) for g in grids], {}


def run_ours(field, x_start, t_s, t_e, final, nfe, ref, methods, grids) -> list[dict]:
    rows = []
    for m in methods:
        lam_end = float(field.schedule.lam(torch.tensor(float(t_e), dtype=torch.float64)))
        name, kinds, extra = resolve(m.name, nfe, final, grids, lam_end, field.schedule)
        try:
            n, opts = our_plan(name, nfe, final)
        except ValueError as e:
            rows.append({"method": m.name, "grid": None, "error": None, "skipped": str(e)})
            continue
        for glabel, kind in kinds:
            row = {"method": m.name, "grid": glabel, "steps": n, "options": _jsonable(opts), **extra}
            try:
                grid = samplers.time_grid(field.schedule, n, kind, t_min=t_e, t_max=t_s)
                res = samplers.sample(field, x_start, name, grid=grid, final=final, **opts)
                if res.nfe > nfe:
                    raise RuntimeError(f"used {res.nfe} NFE > budget {nfe}")
                err = mean_err(res.x, ref)
                row.update(nfe=res.nfe, error=err if math.isfinite(err) else None)
            except Exception as e:  # report, never hide, a failing method
                row.update(error=None, failed=f"{type(e).__name__}: {e}")
            rows.append(row)
    return rows


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}


def best_of(rows, key="error"):
    ok = [r for r in rows if r.get(key) is not None]
    return min(ok, key=lambda r: r[key]) if ok else None


def _pick(r, keys=("method", "grid", "steps", "nfe", "error")):
    return None if r is None else {k: r.get(k) for k in keys}


# ------------------------------------------------------------------------------------------------
# Deterministic side


def run_target(label, tg, args, methods, specs, log):
    schedule = schedules.DDPMDiscrete(t_min=T_ZERO)  # diffusers' betas; t_min lowered only for the x(0) reference
    field = tg.field(schedule, prediction="eps")
    g = torch.Generator().manual_seed(args.seed)
    x0 = tg.sample(args.samples, generator=g)
    z = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed + 1))
    grids = grids_for(tg, args)

    # 1. peer runs: diffusers schedulers and k-diffusion samplers
    pruns = {}
    for nfe in args.nfe:
        for spec in specs:
            tic = time.perf_counter()
            pick = steps_for_budget(spec, nfe, field, tg.dim)
            if pick is None:
                pruns[nfe, spec.label] = {"label": spec.label, "lib": "diffusers",
                                          "skipped": f"no step count fits NFE {nfe}"}
                continue
            n, _ = pick
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = run_scheduler(spec, n, field, x0, z)
            r.update(label=spec.label, lib="diffusers", cls=spec.cls, options=spec.options, steps=n,
                     seconds=time.perf_counter() - tic)
            pruns[nfe, spec.label] = r
        for name in (KD.DETERMINISTIC if args.kdiffusion else ()):
            tic = time.perf_counter()
            n = KD.steps_for_budget(name, nfe)
            if n is None:
                pruns[nfe, kd_label(name)] = {"label": kd_label(name), "lib": "k-diffusion",
                                             "skipped": f"no step count fits NFE {nfe}"}
                continue
            x_s = float(schedule.alpha(1.0)) * x0 + float(schedule.sigma(1.0)) * z
            r = KD.run(name, field, x_s, n)
            if r["nfe"] != KD.DETERMINISTIC[name](n):
                raise RuntimeError(f"{name}: counted {r['nfe']} NFE for {n} steps, expected "
                                   f"{KD.DETERMINISTIC[name](n)}")
            r.update(label=kd_label(name), lib="k-diffusion", cls=name, options={}, steps=n, notes=[],
                     seconds=time.perf_counter() - tic)
            pruns[nfe, kd_label(name)] = r

    # 2. one reference run per start time through every end time
    starts = sorted({r["t_start"] for r in pruns.values() if "x" in r}, reverse=True)
    refs = {}
    for t_s in starts:
        ends = set()
        for r in pruns.values():
            if "x" in r and r["t_start"] == t_s:
                ends.add(r["t_end"] if r["end"] != "x(0)" else T_ZERO)
        ends.add(T_MIN_OURS)
        ends.add(T_ZERO)
        grid = [t_s] + sorted((e for e in ends if e < t_s), reverse=True)
        x_s = float(schedule.alpha(t_s)) * x0 + float(schedule.sigma(t_s)) * z
        tic = time.perf_counter()
        res = samplers.sample(field, x_s, "adaptive", grid=grid, rtol=args.rtol, atol=args.atol, coords="edm",
                              return_trajectory=True)
        states = {t: res.trajectory[i] for i, t in enumerate(grid)}
        x_zero = field.denoiser(states[T_ZERO], T_ZERO)
        # floor of our x(0) runs: even an exact flow to t_min followed by the denoiser misses x(0) by this
        floor0 = mean_err(field.denoiser(states[T_MIN_OURS], T_MIN_OURS), x_zero)
        refs[t_s] = {"states": states, "x0": x_zero, "nfe": res.nfe, "seconds": time.perf_counter() - tic,
                     "x_s": x_s, "x0_floor_of_ours": floor0}
        log(f"  reference from t={t_s:g}: {len(grid) - 1} end times, NFE {res.nfe}, "
            f"{refs[t_s]['seconds']:.1f}s; floor of our x(0) runs (exact D(Phi(t={T_MIN_OURS:g}))"
            f" vs x(0)): {floor0:.2e}")

    def reference(t_s, end, t_e):
        R = refs[t_s]
        if end == "x(t_e)":
            return R["states"][t_e]
        if end == "D@t_last":
            return field.denoiser(R["states"][t_e], t_e)
        return R["x0"]

    # 3. errors of the peers and ours at matched ends
    results = []
    ours_cache = {}
    labels = [s.label for s in specs] + ([kd_label(n) for n in KD.DETERMINISTIC] if args.kdiffusion else [])
    for nfe in args.nfe:
        block = {"target": label, "dim": tg.dim, "nfe": nfe, "grids": list(grids), "diffusers": [],
                 "kdiffusion": [], "ours": {}}
        for lab in labels:
            r = pruns[nfe, lab]
            lib_key = "diffusers" if r["lib"] == "diffusers" else "kdiffusion"
            if "x" not in r:
                block[lib_key].append({"label": lab, "lib": r["lib"], "skipped": r["skipped"]})
                continue
            t_s, end, t_e = r["t_start"], r["end"], r["t_end"]
            ref = reference(t_s, end, t_e)
            err = mean_err(r["x"], ref)
            err0 = mean_err(r["x"], refs[t_s]["x0"]) if end in ("D@t_last", "x(0)") else None
            key = (t_s, end, t_e)
            if (nfe, key) not in ours_cache:
                if end == "x(t_e)":
                    o_te, final = t_e, "step"
                elif end == "D@t_last":
                    o_te, final = t_e, "denoise"
                else:
                    o_te, final = T_MIN_OURS, "denoise"
                tic = time.perf_counter()
                rows = run_ours(field, refs[t_s]["x_s"], t_s, o_te, final, nfe, ref, methods, grids)
                ours_cache[nfe, key] = {"t_start": t_s, "end": end, "t_end": t_e, "ours_t_end": o_te,
                                        "final": final, "rows": rows, "best": best_of(rows),
                                        "seconds": time.perf_counter() - tic}
            ob = ours_cache[nfe, key]["best"]
            of = next((row for row in ours_cache[nfe, key]["rows"]
                       if f"{row['method']}/{row['grid']}" == args.fixed and row.get("error") is not None), None)
            block[lib_key].append({
                "label": lab, "lib": r["lib"], "class": r["cls"], "options": r["options"], "steps": r["steps"],
                "nfe": r["nfe"], "t_start": t_s, "end": end, "t_end": t_e, "t_last": r.get("t_last"),
                "error": err, "err0": err0, "dev_from_last_denoiser": r.get("dev_from_last_denoiser"),
                "notes": r["notes"], "ours_key": f"{t_s:g}|{end}|{t_e:g}", "seconds": r.get("seconds"),
                "ours_best": _pick(ob), "ratio": None if ob is None or err == 0 else ob["error"] / err,
                "ours_fixed": _pick(of), "ratio_fixed": None if of is None or err == 0 else of["error"] / err,
            })
        for (n_, key), v in ours_cache.items():
            if n_ == nfe:
                block["ours"][f"{key[0]:g}|{key[1]}|{key[2]:g}"] = v
        # our best at t = 0 (for the err0 column): the x(0) setting
        if starts:
            key0 = (starts[0], "x(0)", 0.0)
            if (nfe, key0) not in ours_cache:
                rows = run_ours(field, refs[starts[0]]["x_s"], starts[0], T_MIN_OURS, "denoise", nfe,
                                refs[starts[0]]["x0"], methods, grids)
                ours_cache[nfe, key0] = {"t_start": starts[0], "end": "x(0)", "t_end": 0.0,
                                         "ours_t_end": T_MIN_OURS, "final": "denoise", "rows": rows,
                                         "best": best_of(rows), "seconds": None}
                block["ours"][f"{starts[0]:g}|x(0)|0"] = ours_cache[nfe, key0]
            block["ours_best_x0"] = _pick(ours_cache[nfe, key0]["best"])
        else:
            block["ours_best_x0"] = None
        summarize(block)
        results.append(block)
        print_block(block)
    return results, {t: {"nfe": v["nfe"], "seconds": v["seconds"], "x0_floor_of_ours": v["x0_floor_of_ours"]}
                     for t, v in refs.items()}


def _lib_summary(rows):
    ds = [d for d in rows if d.get("error") is not None]
    if not ds:
        return None
    best = min(ds, key=lambda d: d["error"])
    ratios = [d["ratio"] for d in ds if d["ratio"] is not None]
    worst = max(ds, key=lambda d: d["ratio"] if d["ratio"] is not None else -1)
    fixed = [d["ratio_fixed"] for d in ds if d["ratio_fixed"] is not None]
    return {
        "best": best["label"], "lib": best["lib"], "best_error": best["error"], "best_end": best["end"],
        "best_t_end": best["t_end"], "ours_at_same_end": best["ours_best"], "ratio": best["ratio"],
        "max_ratio_over_peers": max(ratios) if ratios else None, "max_ratio_peer": worst["label"] if ratios else None,
        "ours_fixed_at_same_end": best["ours_fixed"], "ratio_fixed": best["ratio_fixed"],
        "max_ratio_fixed_over_peers": max(fixed) if fixed else None,
    }


def summarize(block):
    block["summary_diffusers"] = _lib_summary(block["diffusers"])
    block["summary_kdiffusion"] = _lib_summary(block["kdiffusion"])
    block["summary_peers"] = _lib_summary(block["diffusers"] + block["kdiffusion"])


def _end_str(d):
    if d["end"] == "x(t_e)":
        return f"x(t={d['t_end']:.3g})"
    if d["end"] == "D@t_last":
        return f"D@t={d['t_end']:.3g}"
    return "x(0)"


def print_block(block):
    print(f"\n== target {block['target']} (d={block['dim']})  NFE budget {block['nfe']}  deterministic ==")
    print(f"{'peer':17s} {'steps':>5s} {'NFE':>4s} {'end':>11s} {'error':>9s} {'err0':>9s}   "
          f"{'ours best at same end':26s} {'error':>9s} {'ratio':>6s}   {'fixed':>9s} {'ratio':>6s}")
    for d in block["diffusers"] + block["kdiffusion"]:
        if d.get("error") is None:
            print(f"{d['label']:17s} skipped: {d.get('skipped')}")
            continue
        ob = d["ours_best"]
        ostr = "n/a" if ob is None else f"{ob['method']}/{ob['grid']} ({ob['nfe']})"
        ratio = "   n/a" if d["ratio"] is None else f"{d['ratio']:6.3f}"
        err0 = "        -" if d["err0"] is None else f"{d['err0']:9.2e}"
        of = d["ours_fixed"]
        fstr = "      n/a    n/a" if of is None else f"{of['error']:9.2e} {d['ratio_fixed']:6.3f}"
        print(f"{d['label']:17s} {d['steps']:5d} {d['nfe']:4d} {_end_str(d):>11s} {d['error']:9.2e} {err0}   "
              f"{ostr:26s} {ob['error'] if ob else float('nan'):9.2e} {ratio}   {fstr}")
        for note in d["notes"]:
            print(f"{'':17s}   note: {note}")
    b0 = block.get("ours_best_x0")
    if b0:
        print(f"{'ours -> x(0)':17s} {'':5s} {b0['nfe']:4d} {'x(0)':>11s} {'':9s} {b0['error']:9.2e}   "
              f"{b0['method']}/{b0['grid']} (grid to t=1e-3, then denoise)")
    for key, what in (("summary_diffusers", "diffusers"), ("summary_kdiffusion", "k-diffusion")):
        s = block.get(key)
        if not s:
            continue
        if s["ours_at_same_end"] is None:
            print(f"-> best {what}: {s['best']} {s['best_error']:.2e}; none of ours fits NFE {block['nfe']} there")
            continue
        ob = s["ours_at_same_end"]
        print(f"-> best {what}: {s['best']} {s['best_error']:.2e} [{s['best_end']}]; our best after the fact at "
              f"the same end: {ob['method']}/{ob['grid']} {ob['error']:.2e}, ratio {s['ratio']:.3f} (worst over "
              f"{what} {s['max_ratio_over_peers']:.3f}, {s['max_ratio_peer']})"
              + ("" if s["ratio_fixed"] is None else
                 f"; fixed {s['ours_fixed_at_same_end']['error']:.2e}, ratio {s['ratio_fixed']:.3f}"))


def single_configs(results, nfes=(10, 20)):
    """Post-hoc: every (method, grid) of ours, its worst ratio against the best peer (diffusers or k-diffusion)
    over the cells with NFE in ``nfes`` (what one configuration fixed for all targets would give)."""
    worst = {}
    for b in results:
        s = b.get("summary_peers")
        if not s or s["ours_at_same_end"] is None or b["nfe"] not in nfes:
            continue
        d = next(d for d in b["diffusers"] + b["kdiffusion"] if d["label"] == s["best"])
        for r in b["ours"][d["ours_key"]]["rows"]:
            k = f"{r['method']}/{r['grid']}"
            ratio = r["error"] / s["best_error"] if r.get("error") is not None else math.inf
            worst[k] = max(worst.get(k, 0.0), ratio)
    return sorted(worst.items(), key=lambda kv: kv[1])


def _fmt_peer(s):
    if not s:
        return f"{'-':>16s} {'':>11s} {'':>9s}"
    return f"{s['best']:>16s} {_end_str({'end': s['best_end'], 't_end': s['best_t_end']}):>11s} {s['best_error']:9.2e}"


def print_summary(results):
    print("\n== summary (deterministic): best diffusers, best k-diffusion, ours at the best peer's end ==")
    print("ratio = ours / best peer (the lower-error of the two libraries), at that peer's end; 'ours best' is "
          "chosen after the fact among all (method, grid) pairs")
    print(f"{'target':14s} {'NFE':>4s} {'best diffusers':>16s} {'end':>11s} {'error':>9s} {'best k-diffusion':>16s} "
          f"{'end':>11s} {'error':>9s}   {'ours fixed':>10s} {'ratio':>6s}   {'ours best (after the fact)':26s} "
          f"{'error':>9s} {'ratio':>6s}")
    for b in results:
        s = b.get("summary_peers")
        if not s or s["ours_at_same_end"] is None:
            continue
        ob, of = s["ours_at_same_end"], s["ours_fixed_at_same_end"]
        fixed = f"{'n/a':>10s} {'':6s}" if of is None else f"{of['error']:10.2e} {s['ratio_fixed']:6.3f}"
        print(f"{b['target']:14s} {b['nfe']:4d} {_fmt_peer(b['summary_diffusers'])} "
              f"{_fmt_peer(b['summary_kdiffusion'])}   {fixed}   {ob['method'] + '/' + ob['grid']:26s} "
              f"{ob['error']:9.2e} {s['ratio']:6.3f}")
    nfes = sorted({b["nfe"] for b in results} & {10, 20}) or sorted({b["nfe"] for b in results})
    top = single_configs(results, tuple(nfes))[:3]
    if top:
        print(f"one configuration for every target (chosen after the fact), worst ratio to the best peer over NFE "
              f"{nfes}: " + ", ".join(f"{k} {v:.3f}" for k, v in top))


# ------------------------------------------------------------------------------------------------
# Stochastic side: distance of the output law to the exact p_0


def _mmd_tools(tg):
    """(bandwidth, function x -> {"mmd2", "se"}) from diffusion_lab.metrics (closed-form mixture terms)."""
    fn = getattr(metrics, "mmd2_exact", None)
    if fn is None:
        raise SystemExit("error: diffusion_lab.metrics has no mmd2_exact (the stochastic table needs it); "
                         "run with --no-stochastic")
    bw = metrics.mmd_bandwidth(tg)
    pp = metrics.mmd_law_cross(tg, tg, bw)

    def mmd(x):
        r = fn(x, tg, bw, pp=pp)
        return {"mmd2": r.mmd2, "se": r.se}

    return bw, mmd


def is_gaussian(tg) -> bool:
    return tg.n_components == 1


def start_law(tg, schedule, t_s=1.0):
    """(mean, cov) of p_{t_s} for a Gaussian target: N(alpha mu, alpha^2 Sigma + sigma^2 I)."""
    a, s = float(schedule.alpha(t_s)), float(schedule.sigma(t_s))
    mu, cov = tg.means[0], tg.covs[0]
    return a * mu, a * a * cov + s * s * torch.eye(tg.dim, dtype=torch.float64)


def exact_w2(run, n_draws, tg, schedule):
    """W2(law of run's output, p_0) from the exact output law (metrics.sampler_gaussian_law)."""
    m_s, c_s = start_law(tg, schedule)
    b, C = metrics.sampler_gaussian_law(run, m_s, c_s, n_draws)
    return metrics.gaussian_w2(b, C, tg.means[0], tg.covs[0])


def _our_w2(field, method, grid, opts, tg):
    """Exact W2 of our stochastic sampler on a Gaussian target, or (None, reason)."""
    info = samplers.get_method(method)
    if "noise" not in inspect.signature(info.fn).parameters:
        return None, "takes no noise="
    m_s, _ = start_law(tg, field.schedule)
    probe = samplers.sample(field, m_s[None].clone(), method, grid=grid, final="denoise",
                            generator=torch.Generator().manual_seed(0), **opts)
    k = probe.info.get("noise_draws")
    if k is None:
        k = len(grid) - 1  # the (N, *x.shape) convention of the SDE samplers that predate noise_draws
    run = lambda x, noise: samplers.sample(field, x, method, grid=grid, final="denoise", noise=noise,  # noqa: E731
                                           **opts).x
    try:
        return exact_w2(run, k, tg, field.schedule), None
    except ValueError as e:
        return None, f"noise= rejected: {e}"


def run_stochastic(label, tg, args, methods_sto, log):
    schedule = schedules.DDPMDiscrete(t_min=T_ZERO)
    field = tg.field(schedule, prediction="eps")
    x0 = tg.sample(args.sde_samples, generator=torch.Generator().manual_seed(args.seed))
    z = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed + 1))
    t_s = 1.0
    x_s = float(schedule.alpha(t_s)) * x0 + float(schedule.sigma(t_s)) * z
    bw, mmd = _mmd_tools(tg)
    gauss = is_gaussian(tg)
    grids = grids_for(tg, args)
    seed = args.seed + 2
    null = mmd(x0)
    out = []
    for nfe in args.nfe:
        block = {"target": label, "dim": tg.dim, "nfe": nfe, "bandwidth": bw, "exact_samples": null,
                 "grids": list(grids), "diffusers": [], "kdiffusion": [], "ours": []}
        # diffusers
        for spec in STOCH_SPECS:
            row = {"label": spec.label, "lib": "diffusers", "class": spec.cls, "options": spec.options}
            tic = time.perf_counter()
            try:
                pick = steps_for_budget(spec, nfe, field, tg.dim)
                if pick is None:
                    raise ValueError(f"no step count fits NFE {nfe}")
                n = pick[0]
                torch.manual_seed(seed)  # DPMSolverSDEScheduler seeds its Brownian tree from the global generator
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = run_scheduler(spec, n, field, x0, z, x_start=x_s,
                                      generator=torch.Generator().manual_seed(seed))
                row.update(steps=n, nfe=r["nfe"], end=r["end"], t_end=r["t_end"], **mmd(r["x"]))
                if gauss and spec.noise_input:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        run = lambda x, noise: run_scheduler(spec, n, field, None, None, x_start=x,  # noqa: E731
                                                             noise=noise)["x"]
                        row["w2"] = exact_w2(run, n, tg, schedule)
            except Exception as e:  # report, never hide
                row.update(mmd2=None, failed=f"{type(e).__name__}: {e}")
            row["seconds"] = time.perf_counter() - tic
            block["diffusers"].append(row)
        # k-diffusion
        for name in (KD.STOCHASTIC if args.kdiffusion else ()):
            row = {"label": kd_label(name), "lib": "k-diffusion", "class": name, "options": {}}
            tic = time.perf_counter()
            try:
                n = KD.steps_for_budget(name, nfe)
                if n is None:
                    raise ValueError(f"no step count fits NFE {nfe}")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torchsde's Brownian-tree tolerance warnings
                    r = KD.run(name, field, x_s, n, seed=seed)
                if r["nfe"] != KD.STOCHASTIC[name](n):
                    raise RuntimeError(f"counted {r['nfe']} NFE for {n} steps, expected {KD.STOCHASTIC[name](n)}")
                row.update(steps=n, nfe=r["nfe"], end=r["end"], t_end=r["t_end"], **mmd(r["x"]))
                if gauss and name != "sample_dpmpp_sde":
                    k = KD.run(name, field, x_s[:1], n, noise=torch.zeros(0, 1, tg.dim,
                                                                         dtype=torch.float64))["noise_draws"]
                    run = lambda x, noise: KD.run(name, field, x, n, noise=noise)["x"]  # noqa: E731
                    row["w2"] = exact_w2(run, k, tg, schedule)
                    row["noise_draws"] = k
            except Exception as e:
                row.update(mmd2=None, failed=f"{type(e).__name__}: {e}")
            row["seconds"] = time.perf_counter() - tic
            block["kdiffusion"].append(row)
        # ours
        for m in methods_sto:
            lam_end = float(schedule.lam(torch.tensor(T_MIN_OURS, dtype=torch.float64)))
            name, kinds, extra = resolve(m.name, nfe, "denoise", grids, lam_end, schedule)
            try:
                n, opts = our_plan(name, nfe, "denoise")
            except ValueError as e:
                block["ours"].append({"method": m.name, "grid": None, "mmd2": None, "skipped": str(e)})
                continue
            for glabel, kind in kinds:
                row = {"method": m.name, "grid": glabel, "steps": n, "options": _jsonable(opts), **extra}
                tic = time.perf_counter()
                try:
                    grid = samplers.time_grid(schedule, n, kind, t_min=T_MIN_OURS, t_max=t_s)
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        res = samplers.sample(field, x_s, name, grid=grid, final="denoise",
                                              generator=torch.Generator().manual_seed(seed), **opts)
                    if res.nfe > nfe:
                        raise RuntimeError(f"used {res.nfe} NFE > budget {nfe}")
                    if not torch.isfinite(res.x).all():
                        raise FloatingPointError("non-finite output")
                    row.update(nfe=res.nfe, end="D@t_last", t_end=T_MIN_OURS, **mmd(res.x))
                    if gauss:
                        w2, why = _our_w2(field, name, grid, opts, tg)
                        row["w2"] = w2
                        if why:
                            row["w2_skipped"] = why
                except Exception as e:
                    row.update(mmd2=None, failed=f"{type(e).__name__}: {e}")
                row["seconds"] = time.perf_counter() - tic
                block["ours"].append(row)
        summarize_sto(block, args.fixed_sde)
        out.append(block)
        print_sto_block(block)
    return out


def _resolved(a, b) -> bool:
    """a and b (dicts with mmd2, se) differ by more than 2 standard errors of the difference."""
    return abs(a["mmd2"] - b["mmd2"]) > 2.0 * math.hypot(a["se"], b["se"])


def _best(rows, key):
    ok = [r for r in rows if r.get(key) is not None]
    return min(ok, key=lambda r: r[key]) if ok else None


def summarize_sto(block, fixed):
    peers = block["diffusers"] + block["kdiffusion"]
    bd, bk = _best(block["diffusers"], "mmd2"), _best(block["kdiffusion"], "mmd2")
    bp = _best(peers, "mmd2")
    ours = block["ours"]
    ob = _best(ours, "mmd2")
    of = next((r for r in ours if f"{r['method']}/{r['grid']}" == fixed and r.get("mmd2") is not None), None)
    s = {"best_diffusers": bd and bd["label"], "best_kdiffusion": bk and bk["label"], "best_peer": bp and bp["label"],
         "best_peer_mmd2": bp and bp["mmd2"], "best_peer_se": bp and bp["se"],
         "ours_best_after_the_fact": _pick(ob, ("method", "grid", "steps", "nfe", "mmd2", "se", "w2")),
         "ours_fixed": _pick(of, ("method", "grid", "steps", "nfe", "mmd2", "se", "w2")), "fixed_config": fixed}
    for k, r in (("ours_best", ob), ("ours_fixed", of)):
        if r is not None and bp is not None:
            s[f"{k}_ratio"] = r["mmd2"] / bp["mmd2"] if bp["mmd2"] > 0 else None
            s[f"{k}_resolved"] = _resolved(r, bp)
            s[f"{k}_peer_resolved_from_zero"] = bp["mmd2"] > 2 * bp["se"]
    if any(r.get("w2") is not None for r in peers + ours):
        pw, ow = _best(peers, "w2"), _best(ours, "w2")
        s["w2"] = {"best_peer": pw and pw["label"], "best_peer_w2": pw and pw["w2"],
                   "ours_best_after_the_fact": _pick(ow, ("method", "grid", "steps", "nfe", "w2")),
                   "ours_fixed_w2": of and of.get("w2"),
                   "ratio_best": (ow["w2"] / pw["w2"]) if ow and pw and pw["w2"] > 0 else None,
                   "ratio_fixed": (of["w2"] / pw["w2"]) if of and of.get("w2") is not None and pw and pw["w2"] > 0
                   else None}
    block["summary"] = s


def _ratio_str(s, k) -> str:
    """ours/best-peer MMD^2 ratio; "n/a" when the peer's MMD^2 is not resolved from 0 (within 2 SE), "<0" for a
    negative estimate of ours (an exact-law sampler gives negative values half of the time)."""
    ratio = s.get(f"{k}_ratio")
    if ratio is None or not s.get(f"{k}_peer_resolved_from_zero"):
        return "n/a"
    return "<0" if ratio < 0 else f"{ratio:.3f}"


def _mmd_str(r):
    return "      failed" if r.get("mmd2") is None else f"{r['mmd2']:9.2e} ± {r['se']:8.2e}"


def print_sto_block(block):
    print(f"\n== target {block['target']} (d={block['dim']})  NFE budget {block['nfe']}  stochastic: MMD^2 to the "
          f"exact p_0 (bandwidth {block['bandwidth']:.3g}) ==")
    nul = block["exact_samples"]
    print(f"{'exact samples':22s} {'':5s} {'':4s} {'':11s} {nul['mmd2']:9.2e} ± {nul['se']:8.2e}   (the null: mean 0)")
    for r in block["diffusers"] + block["kdiffusion"]:
        if r.get("mmd2") is None:
            print(f"{r['label']:22s} {r.get('failed') or r.get('skipped')}")
            continue
        w2 = f"   W2 {r['w2']:.3e}" if r.get("w2") is not None else ""
        print(f"{r['label']:22s} {r['steps']:5d} {r['nfe']:4d} {_end_str(r):>11s} {_mmd_str(r)}{w2}")
    ok = sorted((r for r in block["ours"] if r.get("mmd2") is not None), key=lambda r: r["mmd2"])
    for r in ok[:5]:
        w2 = f"   W2 {r['w2']:.3e}" if r.get("w2") is not None else ""
        print(f"{'ours ' + r['method'] + '/' + r['grid']:22s} {r['steps']:5d} {r['nfe']:4d} {_end_str(r):>11s} "
              f"{_mmd_str(r)}{w2}")
    bad = [r for r in block["ours"] if r.get("mmd2") is None]
    if bad:
        print(f"  ours not run: " + "; ".join(f"{r['method']}/{r['grid']}: {r.get('failed') or r.get('skipped')}"
                                             for r in bad[:6]) + (" ..." if len(bad) > 6 else ""))
    s = block["summary"]
    if s.get("best_peer"):
        for k, what in (("ours_fixed", "fixed"), ("ours_best", "best after the fact")):
            r = s.get("ours_best_after_the_fact" if k == "ours_best" else "ours_fixed")
            if r is None:
                print(f"-> ours {what}: not run")
                continue
            res = "resolved" if s[f"{k}_resolved"] else "NOT resolved (within 2 SE)"
            print(f"-> ours {what} {r['method']}/{r['grid']}: MMD^2 {r['mmd2']:.2e} vs best peer {s['best_peer']} "
                  f"{s['best_peer_mmd2']:.2e}, ratio {_ratio_str(s, k)}; difference {res}")
    if s.get("w2"):
        w = s["w2"]
        ob = w["ours_best_after_the_fact"]
        print(f"-> exact W2: best peer {w['best_peer']} {w['best_peer_w2']:.3e}; ours best after the fact "
              f"{ob['method']}/{ob['grid']} {ob['w2']:.3e}" if ob and w["best_peer"] else "-> exact W2: n/a",
              end="")
        print("" if w["ours_fixed_w2"] is None else f"; fixed {w['ours_fixed_w2']:.3e}")


def print_sto_summary(results):
    print("\n== summary (stochastic): MMD^2 to the exact p_0 (± SE); ratio = ours / best peer; '~' = difference "
          "within 2 SE (not resolved) ==")
    print(f"{'target':14s} {'NFE':>4s} {'best diffusers':>14s} {'MMD^2':>9s} {'best k-diff':>20s} {'MMD^2':>9s} "
          f"{'SE':>8s}   {'ours fixed':>10s} {'ratio':>7s}   {'ours best (after the fact)':28s} {'MMD^2':>9s} "
          f"{'ratio':>7s}   {'null SE':>8s}")

    def val(block, lab, lib):
        r = next((r for r in block[lib] if r["label"] == lab), None)
        return r

    for b in results:
        s = b["summary"]
        bd = val(b, s["best_diffusers"], "diffusers") if s["best_diffusers"] else None
        bk = val(b, s["best_kdiffusion"], "kdiffusion") if s["best_kdiffusion"] else None
        bp = bd if bd is not None and (bk is None or bd["mmd2"] <= bk["mmd2"]) else bk

        def cell(k, name):
            r = s.get(name)
            if r is None:
                return f"{'n/a':>10s} {'':7s}"
            mark = "" if s.get(f"{k}_resolved") else "~"
            return f"{r['mmd2']:10.2e} {_ratio_str(s, k) + mark:>7s}"

        ob = s["ours_best_after_the_fact"]
        print(f"{b['target']:14s} {b['nfe']:4d} {(bd or {}).get('label', '-'):>14s} "
              f"{(bd or {}).get('mmd2', float('nan')):9.2e} {(bk or {}).get('label', '-'):>20s} "
              f"{(bk or {}).get('mmd2', float('nan')):9.2e} {(bp or {}).get('se', float('nan')):8.2e}   "
              f"{cell('ours_fixed', 'ours_fixed')}   "
              f"{(ob['method'] + '/' + ob['grid']) if ob else '-':28s} {cell('ours_best', 'ours_best_after_the_fact')}"
              f"   {b['exact_samples']['se']:8.2e}")
    gw = [b for b in results if b["summary"].get("w2")]
    if gw:
        print("\n== summary (stochastic, Gaussian targets): exact W2 to p_0 ==")
        print(f"{'target':14s} {'NFE':>4s} {'best peer':>20s} {'W2':>10s}   {'ours fixed':>10s} {'ratio':>6s}   "
              f"{'ours best (after the fact)':28s} {'W2':>10s} {'ratio':>6s}")
        for b in gw:
            w = b["summary"]["w2"]
            ob = w["ours_best_after_the_fact"]
            fx = "       n/a       " if w["ours_fixed_w2"] is None else \
                f"{w['ours_fixed_w2']:10.3e} {w['ratio_fixed']:6.3f}"
            print(f"{b['target']:14s} {b['nfe']:4d} {w['best_peer'] or '-':>20s} "
                  f"{w['best_peer_w2'] if w['best_peer_w2'] is not None else float('nan'):10.3e}   {fx}   "
                  f"{(ob['method'] + '/' + ob['grid']) if ob else '-':28s} "
                  f"{ob['w2'] if ob else float('nan'):10.3e} "
                  f"{w['ratio_best'] if w['ratio_best'] is not None else float('nan'):6.3f}")


# ------------------------------------------------------------------------------------------------
# Targets, options


SUITE_SEED = 0  # set from --suite-seed


def suite_targets() -> list[tuple[str, object]]:
    fn = getattr(targets, "suite", None)
    if fn is None:
        raise SystemExit("error: --suite needs diffusion_lab.targets.suite(), which this version lacks")
    return [(label, tg) for label, tg in fn(seed=SUITE_SEED)]


def resolve_targets(names: list[str]) -> list[tuple[str, object]]:
    """Each name is a label of targets.suite(), a name of targets.TARGETS, or NAME:D (get_target(NAME, dim=D))."""
    suite = dict(suite_targets()) if hasattr(targets, "suite") else {}
    out = []
    for name in names:
        if name in suite:
            out.append((name, suite[name]))
        elif name in targets.TARGETS:
            out.append((name, targets.get_target(name)))
        elif ":" in name and name.split(":", 1)[0] in targets.TARGETS:
            base, dim = name.split(":", 1)
            try:
                out.append((name, targets.get_target(base, dim=int(dim))))
            except (TypeError, ValueError) as e:
                raise SystemExit(f"error: --targets {name!r}: {e}") from None
        else:
            raise SystemExit(f"error: --targets: unknown {name!r}; choose from {sorted(targets.TARGETS)}"
                             + (f", suite labels {sorted(suite)}" if suite else "") + " or NAME:D")
    return out


def grids_for(tg, args) -> tuple[str, ...]:
    """Grid kinds of our after-the-fact search: --grids, else all four up to --grids-dim, logsnr + quadratic above."""
    if args.grids:
        return tuple(args.grids)
    return GRID_KINDS if tg.dim <= args.grids_dim else ("logsnr", "quadratic")


def _list(conv, what):
    def parse(text):
        items = [s for s in text.replace(",", " ").split() if s]
        if not items:
            raise argparse.ArgumentTypeError(f"{what}: empty list")
        out = []
        for s in items:
            try:
                out.append(conv(s))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what}: cannot parse {s!r}") from None
        return out

    return parse


def default_fixed_sde() -> str:
    return "auto_sde/auto"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="diffusers' schedulers and k-diffusion's samplers against diffusion_lab's samplers on exact "
                    "Gaussian-mixture models: terminal error of the deterministic ones (same start samples, "
                    "matched end times, NFE budgets) and the distance of the stochastic ones' output law to the "
                    "exact data law (MMD; exact W2 on Gaussian targets).")
    p.add_argument("--nfe", type=_list(int, "--nfe"), default=None,
                   help='NFE budgets, space or comma separated (default "5 10 20 50"; --quick and --suite: "10 20")')
    p.add_argument("--targets", type=_list(str, "--targets"), default=None,
                   help=f'targets: names of targets.TARGETS, labels of targets.suite(), or NAME:D for '
                        f'get_target(NAME, dim=D) (default "{" ".join(TARGET_NAMES)}"; --quick: "ring8 bimodal_1d")')
    p.add_argument("--suite", action="store_true", help="run every target of targets.suite()")
    p.add_argument("--suite-seed", type=int, default=0,
                   help="instances of the suite's families (targets.suite(seed=...); default 0; another seed is a "
                        "fresh held-out copy of the suite)")
    p.add_argument("--samples", type=int, default=None, help="number of samples of the deterministic table (default 2000; --suite: 1000; --quick: 500)")
    p.add_argument("--sde-samples", type=int, default=None,
                   help="number of samples of the stochastic table (default 2000; --quick: 1000)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of x_0 ~ p_0 (the start noise z uses seed + 1, the samplers' noise seed + 2)")
    p.add_argument("--quick", action="store_true", help="fewer samples, targets and budgets")
    p.add_argument("--methods", type=_list(str, "--methods"), default=None,
                   help="restrict our methods, deterministic and stochastic (default: every registered one)")
    p.add_argument("--grids", type=_list(str, "--grids"), default=None,
                   help=f"grid kinds of our after-the-fact search (default: all of {GRID_KINDS} for targets of "
                        f"dimension <= --grids-dim, logsnr and quadratic above)")
    p.add_argument("--grids-dim", type=int, default=2,
                   help="largest dimension that gets all four grid kinds by default (default 2)")
    p.add_argument("--fixed", default="auto/auto", metavar="METHOD/GRID",
                   help="one deterministic configuration of ours declared in advance (default auto/auto: the "
                        "package's declared default, method='auto', which picks method and grid from the budget)")
    p.add_argument("--fixed-sde", default=None, metavar="METHOD/GRID",
                   help="one stochastic configuration of ours declared in advance (default auto_sde/auto: "
                        "method='auto_sde')")
    p.add_argument("--karras", action="store_true",
                   help="also run diffusers' DPM++2M and Euler with use_karras_sigmas=True (fractional timesteps)")
    p.add_argument("--no-kdiffusion", dest="kdiffusion", action="store_false",
                   help="leave k-diffusion out (it is used when installed)")
    p.add_argument("--no-stochastic", dest="stochastic", action="store_false", help="skip the stochastic table")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="skip the deterministic table")
    p.add_argument("--rtol", type=float, default=1e-10, help="reference ODE rtol (default 1e-10)")
    p.add_argument("--atol", type=float, default=1e-12, help="reference ODE atol (default 1e-12)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tensors are tiny and threads only contend)")
    p.add_argument("--figure", metavar="PATH", default=None,
                   help="draw ours / best peer per target and budget (declared default and best after the fact)")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only draw --figure from a saved --json run (no computation)")
    p.add_argument("--json", metavar="PATH", default=None, help="write every figure and the settings as JSON")
    a = p.parse_args(argv)
    if a.replot and not a.figure:
        p.error("--replot needs --figure PATH")
    global SUITE_SEED
    SUITE_SEED = a.suite_seed
    a.nfe = a.nfe or ([10, 20] if a.quick or a.suite else [5, 10, 20, 50])
    if a.suite and a.targets:
        p.error("give --suite or --targets, not both")
    a.samples = a.samples or (500 if a.quick else 1000 if a.suite else 2000)
    a.sde_samples = a.sde_samples or (1000 if a.quick else 2000)
    if any(n < 1 for n in a.nfe):
        p.error(f"--nfe: budgets must be >= 1, got {a.nfe}")
    if a.samples < 2 or a.sde_samples < 2:
        p.error(f"--samples and --sde-samples must be >= 2, got {a.samples}, {a.sde_samples}")
    if not (a.rtol > 0 and a.atol >= 0):
        p.error(f"need --rtol > 0 and --atol >= 0, got {a.rtol}, {a.atol}")
    if a.grids and set(a.grids) - set(GRID_KINDS):
        p.error(f"--grids: unknown {sorted(set(a.grids) - set(GRID_KINDS))}; choose from {GRID_KINDS}")
    a.fixed_sde = a.fixed_sde or default_fixed_sde()
    for opt, val in (("--fixed", a.fixed), ("--fixed-sde", a.fixed_sde)):
        if val.count("/") != 1 or val.split("/")[1] not in GRID_KINDS + ("auto",):
            p.error(f"{opt} must be METHOD/GRID with GRID in {GRID_KINDS} (or auto/auto, auto_sde/auto), "
                    f"got {val!r}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if not (a.deterministic or a.stochastic):
        p.error("--no-deterministic and --no-stochastic leave nothing to run")
    return a


def write_json(args, tlist, specs, methods, methods_sto, det_results, sto_results, ref_info, timings, elapsed,
               complete):
    import diffusers

    payload = {
        "settings": {
            "suite_seed": args.suite_seed,
            "targets": [{"label": lab, "name": getattr(tg, "name", lab), "dim": tg.dim,
                         "components": tg.n_components} for lab, tg in tlist],
            "suite": args.suite, "nfe": args.nfe, "samples": args.samples, "sde_samples": args.sde_samples, "seed_x0": args.seed,
            "seed_start_noise": args.seed + 1, "seed_sampler_noise": args.seed + 2,
            "schedule": schedules.DDPMDiscrete().settings(),
            "diffusers_common": COMMON,
            "schedulers": [{"label": s.label, "class": s.cls, **s.options} for s in specs],
            "stochastic_schedulers": [{"label": s.label, "class": s.cls, **s.options} for s in STOCH_SPECS],
            "kdiffusion": {"version": KD.version(), "deterministic": list(KD.DETERMINISTIC),
                           "stochastic": list(KD.STOCHASTIC), "sigmas": "get_sigmas_karras(n, sigma_min, "
                           "sigma_max, rho=7) + [0], sigmabar at t=1/1000 and t=1; float64",
                           "options": "defaults"} if args.kdiffusion else None,
            "our_methods": [m.row() for m in methods], "our_stochastic_methods": [m.row() for m in methods_sto],
            "grid_kinds": {lab: list(grids_for(tg, args)) for lab, tg in tlist},
            "reference": {"method": "adaptive", "rtol": args.rtol, "atol": args.atol, "coords": "edm",
                          "t_zero": T_ZERO, "runs": {k: {str(t): v for t, v in d.items()}
                                                     for k, d in ref_info.items()}},
            "metric": "mean over samples of ||x - x_ref||_2",
            "metric_stochastic": "metrics.mmd2_exact (unbiased MMD^2 against the exact p_0, Gaussian kernel, "
                                 "bandwidth metrics.mmd_bandwidth(p_0)) with its SE; exact W2 via "
                                 "metrics.sampler_gaussian_law on Gaussian targets",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                         "k_diffusion": KD.version(), "diffusion_lab": diffusion_lab.__version__,
                         "python": platform.python_version()},
            "fixed_config": args.fixed, "fixed_sde_config": args.fixed_sde, "threads": args.threads,
            "seconds": elapsed, "complete": complete, "seconds_per_target": timings, "command": " ".join(sys.argv),
        },
        "deterministic": det_results,
        "single_configs_worst_ratio_nfe_10_20": dict(single_configs(det_results)),
        "stochastic": sto_results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(payload, fh, separators=(",", ":"), default=str)


def ratio_rows(det_results) -> list[dict]:
    """(target, nfe, ratio of the declared default, ratio of our best after the fact) from the deterministic
    blocks, against the best peer at that peer's end."""
    out = []
    for b in det_results:
        s = b.get("summary_peers")
        if s:
            out.append({"target": b["target"], "nfe": b["nfe"], "ratio_default": s.get("ratio_fixed"),
                        "ratio_best": s.get("ratio")})
    return out


def draw(det_results, path, title) -> None:
    from diffusion_lab import plots

    plots.peer_ratios(ratio_rows(det_results), path, title)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            saved = json.load(fh)
        draw(saved["deterministic"], args.figure, f"suite seed {saved['settings'].get('suite_seed', 0)}: "
             f"fixed = {saved['settings'].get('fixed_config', 'auto/auto')}")
        return
    try:
        import diffusers
    except ImportError:
        raise SystemExit("error: this benchmark needs diffusers: pip install 'diffusion_lab[bench]' "
                         "(or pip install diffusers)") from None
    if args.kdiffusion:
        try:
            KD.load()
        except ImportError as e:
            print(f"k-diffusion not available ({e}); running without it")
            args.kdiffusion = False
    torch.set_num_threads(args.threads)
    check_methods(args.methods)
    tlist = suite_targets() if args.suite else resolve_targets(args.targets or
                                                               (["ring8", "bimodal_1d"] if args.quick
                                                                else list(TARGET_NAMES)))
    methods = our_methods(args.methods)
    methods_sto = our_methods(args.methods, stochastic=True)
    specs = [s for s in SPECS if args.karras or not s.extra]
    tic = time.perf_counter()
    print(f"peers: diffusers {diffusers.__version__}, k-diffusion {KD.version() if args.kdiffusion else 'off'}, "
          f"torch {torch.__version__}, diffusion_lab {diffusion_lab.__version__}; targets "
          f"{[f'{lab} (d={tg.dim})' for lab, tg in tlist]}; NFE {args.nfe}; {args.samples} samples; seed {args.seed}")
    if args.deterministic:
        print(f"our deterministic methods: {[m.name for m in methods]}; fixed {args.fixed}")
        print("error = mean ||x - x_ref||; end: x(t=..) state at t, D@t=.. denoiser at the last model time, "
              "x(0) flow map to t=0; err0 = error against the flow map to t=0 (sigma=0 outputs only); "
              "ratio = ours/peer")
    if args.stochastic:
        print(f"our stochastic methods: {[m.name for m in methods_sto]}; fixed-sde {args.fixed_sde}")
    det_results, sto_results, ref_info, timings = [], [], {}, {}
    for label, tg in tlist:
        print(f"\n[{label}]", flush=True)
        t0 = time.perf_counter()
        if args.deterministic:
            res, info = run_target(label, tg, args, methods, specs, lambda s: print(s, flush=True))
            det_results.extend(res)
            ref_info[label] = info
        t1 = time.perf_counter()
        if args.stochastic:
            sto_results.extend(run_stochastic(label, tg, args, methods_sto, lambda s: print(s, flush=True)))
        t2 = time.perf_counter()
        timings[label] = {"deterministic_s": t1 - t0, "stochastic_s": t2 - t1}
        print(f"  [{label}: deterministic {t1 - t0:.0f}s, stochastic {t2 - t1:.0f}s]", flush=True)
        if args.json:  # after every target, so that an interrupted long run keeps what it measured
            write_json(args, tlist, specs, methods, methods_sto, det_results, sto_results, ref_info, timings,
                       time.perf_counter() - tic, False)
    if det_results:
        print_summary(det_results)
    if sto_results:
        print_sto_summary(sto_results)
    elapsed = time.perf_counter() - tic
    print(f"\ntotal {elapsed:.0f}s")
    if args.json:
        write_json(args, tlist, specs, methods, methods_sto, det_results, sto_results, ref_info, timings, elapsed,
                   True)
        print(f"wrote {args.json}")
    if args.figure and det_results:
        draw(det_results, args.figure, f"fixed = {args.fixed}")


if __name__ == "__main__":
    main()
