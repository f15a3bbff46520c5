#!/usr/bin/env python
r"""diffusers' schedulers against diffusion_lab's deterministic samplers, with the SAME exact model.

What is compared
----------------
* Model. One exact noise prediction eps(x, t) of a Gaussian mixture (``target.field(schedule, "eps")``) under
  ``schedules.DDPMDiscrete()`` -- diffusers' default "linear" betas 1e-4..0.02 over N = 1000 steps, in float64.
  diffusers calls ``model(x, k)`` with a timestep k (0-based, possibly fractional); we answer with
  ``field.eps(x, t=(k + 1)/N)``. A fractional k is mapped by the same affine rule and evaluated on
  DDPMDiscrete's continuous-time interpolation (log alpha piecewise linear in t between the knots t_i = i/N,
  alpha(0) = 1): this is exactly the continuous-time model of DPM-Solver's ``NoiseScheduleVP('discrete')``.
  With the options used here every scheduler calls the model at integer timesteps (knots) only; the mapping
  matters for the optional ``--karras`` variants, whose timesteps are fractional (DPM-Solver rounds them to
  integers while its update uses the unrounded sigma: a genuine inconsistency of that scheduler that an
  exact model exposes).
* Start. Every method starts at its own first time t_s from samples of the EXACT marginal p_{t_s}:
  x_s = alpha(t_s) x_0 + sigma(t_s) z with the same seeded x_0 ~ p_0 and the same standard-normal z for all
  methods. All schedulers here use timestep_spacing="trailing", so t_s = 1 (timestep 999) for all of them.
  k-diffusion-style schedulers (Euler, Heun, LMS; init_noise_sigma != 1) keep the state x/alpha; they get
  x_s / alpha(t_s) and their model inputs go through ``scheduler.scale_model_input`` as in the pipelines.
* End. Per scheduler we determine which time its output corresponds to:
    - "x(t_e)":   the state at a time t_e > 0 (DEIS: sigma_last = sigma of timestep 0, t_e = 1/N; PNDM:
                  final_alpha_cumprod = alphas_cumprod[0], t_e = 1/N). Reference: the PF-ODE flow map
                  Phi_{t_s -> t_e}(x_s). Ours: a grid from t_s to t_e, final="step".
    - "D@t_last": the output equals, to round-off, the denoiser computed from the LAST model call,
                  D(x_last, t_last) = (x_last - sigma eps)/alpha (DDIM with set_alpha_to_one=True; DPM-Solver++,
                  UniPC, Euler, Heun with a first-order final step to sigma = 0). This is checked numerically on
                  every run, not assumed. Reference: D(Phi_{t_s -> t_last}(x_s), t_last). Ours: a grid from t_s to
                  t_last, final="denoise" (one NFE for the denoiser, counted).
    - "x(0)":     output at sigma = 0 that is NOT the last denoiser (LMS: a 4th-order multistep step to
                  sigma = 0). Reference: the flow map to t = 0, computed as D(Phi_{t_s -> 1e-8}(x_s), 1e-8)
                  (differs from Phi_{t_s -> 0} by O(sigma/alpha at 1e-8)^2 ~ 1e-9). Ours: a grid from t_s to
                  DDPMDiscrete()'s default t_min = 1e-3, final="denoise".
  Secondary column err0: for every sigma = 0 output, the error against the same x(0) reference (how far the
  output is from the PF-ODE map to data; this charges the final denoising step as an error).
* Reference. ``samplers.sample(field, x_s, "adaptive", grid=[t_s, *end times, 1e-8], rtol=1e-10,
  atol=1e-12, coords="edm")`` in float64, one run per target through all end times (Dormand-Prince stops
  exactly at every grid time). coords="edm" integrates d(x/alpha)/d(sigma/alpha) = eps, which is smooth; in
  t-coordinates the drift f(t) of DDPMDiscrete jumps at all 1000 knots and the step controller crawls. In
  these coordinates the exact flow between two knot times does not depend on how alpha is interpolated
  between knots (eps depends on t only through alpha, sigma), so the reference is the same for the discrete
  schedule as diffusers sees it.
* Ours. Every registered deterministic method (MethodInfo.stochastic False, adaptive excluded) on grids
  logsnr / karras / uniform / quadratic between the matched start and end times, with
  steps = ``steps_for_nfe(method, nfe, final)``; "our best" is the most accurate (method, grid) at that end.
* Error = mean over samples of ||x - x_ref||_2.
* Options. Besides the common betas/prediction type and timestep_spacing="trailing", every scheduler keeps its
  defaults except DDIM's clip_sample (default True: it clips x0_hat to [-1, 1], an image-range assumption that
  is not part of the ODE solver and would wreck targets of radius 2); set_alpha_to_one, lower_order_final,
  final_sigmas_type, euler_at_final are left at their defaults and their effect is what the "end" column shows.
* "fixed" column: one configuration of ours declared in advance (--fixed, default unipc/logsnr), reported
  beside the per-cell best (which is the best of ~44 method/grid pairs chosen against the exact reference).
* NFE. Each scheduler's model calls are counted by wrapping the model; num_inference_steps is the largest N
  whose counted NFE is <= the budget (Heun: 2N - 1, PNDM/PLMS: N + 1, the rest: N).

diffusers computes its schedule in float32 (betas, alphas_cumprod, sigmas; relative error <= 1e-6 against
the float64 schedule) and some schedulers step in float32 (Euler upcasts to float32 inside ``step``), which sets
an error floor of roughly 1e-6 for them; it only matters at large NFE.

Run:  python benchmarks/peers.py [--nfe "10 20"] [--targets "ring8 gaussian_2d"] [--quick] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field as dc_field

import torch

try:
    import diffusion_lab
    from diffusion_lab import samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    import diffusion_lab
    from diffusion_lab import samplers, schedules, targets

TARGET_NAMES = ("ring8", "bimodal_1d", "gaussian_2d")
GRID_KINDS = ("logsnr", "karras", "uniform", "quadratic")
T_ZERO = 1e-8  # stand-in for t = 0 in the x(0) reference (sigma/alpha ~ 3e-5 there)
N_TRAIN = 1000

COMMON = dict(num_train_timesteps=N_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
              prediction_type="epsilon")


@dataclass
class Spec:
    """One diffusers scheduler configuration."""

    label: str
    cls: str
    options: dict = dc_field(default_factory=dict)
    extra: bool = False  # only with --karras


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


# ------------------------------------------------------------------------------------------------
# The exact model as diffusers sees it


class DiffusersModel:
    """``model(x, k) -> eps(x, t = (k + 1)/N)``: counts calls and remembers the last (x, t, eps)."""

    def __init__(self, field, n_train: int = N_TRAIN):
        self.field, self.n_train = field, n_train
        self.calls = 0
        self.timesteps: list[float] = []
        self.last = None

    def t_of(self, k) -> torch.Tensor:
        k = torch.as_tensor(k, dtype=torch.float64).reshape(())
        return (k + 1.0) / self.n_train

    def __call__(self, x, k):
        t = self.t_of(k)
        eps = self.field.eps(x, t)
        self.calls += 1
        self.timesteps.append(float(k))
        self.last = (x, t, eps)
        return eps


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


def run_scheduler(spec: Spec, n_steps: int, field, x0, z, *, dry: bool = False) -> dict:
    """One diffusers sampling loop as its pipelines run it; returns the output in x-space (VP) and its end."""
    schedule = field.schedule
    sch = make_scheduler(spec)
    sch.set_timesteps(n_steps)
    ts = sch.timesteps
    model = DiffusersModel(field)
    t_s = float(model.t_of(ts[0]))
    a_s, s_s = float(schedule.alpha(t_s)), float(schedule.sigma(t_s))
    x_start = a_s * x0 + s_s * z  # exact sample of p_{t_s}
    scaled_state = float(sch.init_noise_sigma) != 1.0  # k-diffusion style: the state is x / alpha
    x = x_start / a_s if scaled_state else x_start.clone()
    for k in ts:
        x_in = sch.scale_model_input(x, k)
        eps = model(x_in, k)
        x = sch.step(eps, k, x).prev_sample
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
            nfe = run_scheduler(spec, n, field, x0, z)["nfe"]
        except Exception:  # some configurations reject tiny step counts
            continue
        if nfe <= budget:
            return n, nfe
    return None


# ------------------------------------------------------------------------------------------------


def mean_err(x, ref) -> float:
    return float((x - ref).reshape(x.shape[0], -1).norm(dim=1).mean())


def our_methods(selected=None):
    ms = [m for m in samplers.available() if not m.stochastic and not math.isnan(m.nfe_per_step)]
    if selected:
        unknown = set(selected) - {m.name for m in ms}
        if unknown:
            raise SystemExit(f"error: --methods: {sorted(unknown)} are not registered deterministic methods "
                             f"(choose from {[m.name for m in ms]})")
        ms = [m for m in ms if m.name in selected]
    return ms


def run_ours(field, x_start, t_s, t_e, final, nfe, ref, methods) -> list[dict]:
    rows = []
    for m in methods:
        try:
            n = samplers.steps_for_nfe(m.name, nfe, final)
        except ValueError as e:
            rows.append({"method": m.name, "grid": None, "error": None, "skipped": str(e)})
            continue
        for kind in GRID_KINDS:
            row = {"method": m.name, "grid": kind, "steps": n}
            try:
                grid = samplers.time_grid(field.schedule, n, kind, t_min=t_e, t_max=t_s)
                res = samplers.sample(field, x_start, m.name, grid=grid, final=final)
                if res.nfe > nfe:
                    raise RuntimeError(f"used {res.nfe} NFE > budget {nfe}")
                err = mean_err(res.x, ref)
                row.update(nfe=res.nfe, error=err if math.isfinite(err) else None)
            except Exception as e:  # report, never hide, a failing method
                row.update(error=None, failed=f"{type(e).__name__}: {e}")
            rows.append(row)
    return rows


def best_of(rows):
    ok = [r for r in rows if r.get("error") is not None]
    return min(ok, key=lambda r: r["error"]) if ok else None


def run_target(name, args, methods, specs, log):
    schedule = schedules.DDPMDiscrete(t_min=T_ZERO)  # diffusers' betas; t_min lowered only for the x(0) reference
    t_min_ours0 = schedules.DDPMDiscrete().t_min  # where our x(0) runs stop before the final denoiser
    tg = targets.get_target(name)
    field = tg.field(schedule, prediction="eps")
    g = torch.Generator().manual_seed(args.seed)
    x0 = tg.sample(args.samples, generator=g)
    z = torch.randn(x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed + 1))

    # 1. diffusers runs
    druns = {}
    for nfe in args.nfe:
        for spec in specs:
            tic = time.perf_counter()
            pick = steps_for_budget(spec, nfe, field, tg.dim)
            if pick is None:
                druns[nfe, spec.label] = {"label": spec.label, "skipped": f"no step count fits NFE {nfe}"}
                continue
            n, _ = pick
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = run_scheduler(spec, n, field, x0, z)
            r.update(label=spec.label, cls=spec.cls, options=spec.options, steps=n,
                     seconds=time.perf_counter() - tic)
            druns[nfe, spec.label] = r

    # 2. one reference run per start time through every end time
    starts = sorted({r["t_start"] for r in druns.values() if "x" in r}, reverse=True)
    refs = {}
    for t_s in starts:
        ends = set()
        for r in druns.values():
            if "x" in r and r["t_start"] == t_s:
                ends.add(r["t_end"] if r["end"] != "x(0)" else T_ZERO)
        ends.add(t_min_ours0)
        ends.add(T_ZERO)
        grid = [t_s] + sorted((e for e in ends if e < t_s), reverse=True)
        x_s = float(schedule.alpha(t_s)) * x0 + float(schedule.sigma(t_s)) * z
        tic = time.perf_counter()
        res = samplers.sample(field, x_s, "adaptive", grid=grid, rtol=args.rtol, atol=args.atol, coords="edm",
                              return_trajectory=True)
        states = {t: res.trajectory[i] for i, t in enumerate(grid)}
        x_zero = field.denoiser(states[T_ZERO], T_ZERO)
        # floor of our x(0) runs: even an exact flow to t_min followed by the denoiser misses x(0) by this
        floor0 = mean_err(field.denoiser(states[t_min_ours0], t_min_ours0), x_zero)
        refs[t_s] = {"states": states, "x0": x_zero, "nfe": res.nfe, "seconds": time.perf_counter() - tic,
                     "x_s": x_s, "x0_floor_of_ours": floor0}
        log(f"  reference from t={t_s:g}: {len(grid) - 1} end times, NFE {res.nfe}, "
            f"{refs[t_s]['seconds']:.1f}s; floor of our x(0) runs (exact D(Phi(t={t_min_ours0:g}))"
            f" vs x(0)): {floor0:.2e}")

    def reference(t_s, end, t_e):
        R = refs[t_s]
        if end == "x(t_e)":
            return R["states"][t_e]
        if end == "D@t_last":
            return field.denoiser(R["states"][t_e], t_e)
        return R["x0"]

    # 3. errors of diffusers and ours at matched ends
    results = []
    ours_cache = {}
    for nfe in args.nfe:
        block = {"target": name, "nfe": nfe, "diffusers": [], "ours": {}}
        for spec in specs:
            r = druns[nfe, spec.label]
            if "x" not in r:
                block["diffusers"].append({"label": spec.label, "skipped": r["skipped"]})
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
                    o_te, final = t_min_ours0, "denoise"
                tic = time.perf_counter()
                rows = run_ours(field, refs[t_s]["x_s"], t_s, o_te, final, nfe, ref, methods)
                ours_cache[nfe, key] = {"t_start": t_s, "end": end, "t_end": t_e, "ours_t_end": o_te,
                                        "final": final, "rows": rows, "best": best_of(rows),
                                        "seconds": time.perf_counter() - tic}
            ob = ours_cache[nfe, key]["best"]
            of = next((row for row in ours_cache[nfe, key]["rows"]
                       if f"{row['method']}/{row['grid']}" == args.fixed and row.get("error") is not None), None)
            block["diffusers"].append({
                "label": spec.label, "class": r["cls"], "options": r["options"], "steps": r["steps"],
                "nfe": r["nfe"], "t_start": t_s, "end": end, "t_end": t_e, "t_last": r.get("t_last"),
                "error": err, "err0": err0, "dev_from_last_denoiser": r.get("dev_from_last_denoiser"),
                "notes": r["notes"], "ours_key": f"{t_s:g}|{end}|{t_e:g}",
                "ours_best": None if ob is None else {k: ob[k] for k in ("method", "grid", "steps", "nfe", "error")},
                "ratio": None if ob is None or err == 0 else ob["error"] / err,
                "ours_fixed": None if of is None else {k: of[k] for k in ("method", "grid", "steps", "nfe", "error")},
                "ratio_fixed": None if of is None or err == 0 else of["error"] / err,
            })
        for (n_, key), v in ours_cache.items():
            if n_ == nfe:
                block["ours"][f"{key[0]:g}|{key[1]}|{key[2]:g}"] = v
        # our best at t = 0 (for the err0 column): the x(0) setting
        key0 = (starts[0], "x(0)", 0.0)
        if (nfe, key0) not in ours_cache and starts:
            rows = run_ours(field, refs[starts[0]]["x_s"], starts[0], t_min_ours0, "denoise", nfe,
                            refs[starts[0]]["x0"], methods)
            ours_cache[nfe, key0] = {"t_start": starts[0], "end": "x(0)", "t_end": 0.0, "ours_t_end": t_min_ours0,
                                     "final": "denoise", "rows": rows, "best": best_of(rows), "seconds": None}
            block["ours"][f"{starts[0]:g}|x(0)|0"] = ours_cache[nfe, key0]
        block["ours_best_x0"] = ours_cache[nfe, key0]["best"] if starts else None
        summarize(block)
        results.append(block)
        print_block(block)
    return results, {t: {"nfe": v["nfe"], "seconds": v["seconds"], "x0_floor_of_ours": v["x0_floor_of_ours"]}
                     for t, v in refs.items()}


def summarize(block):
    ds = [d for d in block["diffusers"] if d.get("error") is not None]
    if not ds:
        block["summary"] = None
        return
    best = min(ds, key=lambda d: d["error"])
    ratios = [d["ratio"] for d in ds if d["ratio"] is not None]
    if not ratios:
        block["summary"] = {"best_diffusers": best["label"], "best_diffusers_error": best["error"],
                            "ours_at_same_end": None, "ratio": None}
        return
    worst = max(ds, key=lambda d: d["ratio"] if d["ratio"] is not None else -1)
    block["summary"] = {
        "best_diffusers": best["label"], "best_diffusers_error": best["error"], "best_diffusers_end": best["end"],
        "best_diffusers_t_end": best["t_end"], "ours_at_same_end": best["ours_best"],
        "ratio": best["ratio"], "max_ratio_over_schedulers": max(ratios) if ratios else None,
        "max_ratio_scheduler": worst["label"],
        "ours_fixed_at_same_end": best["ours_fixed"], "ratio_fixed": best["ratio_fixed"],
        "max_ratio_fixed_over_schedulers": max((d["ratio_fixed"] for d in ds if d["ratio_fixed"] is not None),
                                               default=None),
    }


def _end_str(d):
    if d["end"] == "x(t_e)":
        return f"x(t={d['t_end']:.3g})"
    if d["end"] == "D@t_last":
        return f"D@t={d['t_end']:.3g}"
    return "x(0)"


def print_block(block):
    print(f"\n== target {block['target']}  NFE budget {block['nfe']} ==")
    print(f"{'diffusers':15s} {'steps':>5s} {'NFE':>4s} {'end':>11s} {'error':>9s} {'err0':>9s}   "
          f"{'ours best at same end':26s} {'error':>9s} {'ratio':>6s}   {'fixed':>9s} {'ratio':>6s}")
    for d in block["diffusers"]:
        if d.get("error") is None:
            print(f"{d['label']:15s} skipped: {d.get('skipped')}")
            continue
        ob = d["ours_best"]
        ostr = "n/a" if ob is None else f"{ob['method']}/{ob['grid']} ({ob['nfe']})"
        ratio = "  n/a" if d["ratio"] is None else f"{d['ratio']:6.3f}"
        err0 = "        -" if d["err0"] is None else f"{d['err0']:9.2e}"
        of = d["ours_fixed"]
        fstr = "      n/a    n/a" if of is None else f"{of['error']:9.2e} {d['ratio_fixed']:6.3f}"
        print(f"{d['label']:15s} {d['steps']:5d} {d['nfe']:4d} {_end_str(d):>11s} {d['error']:9.2e} {err0}   "
              f"{ostr:26s} {ob['error'] if ob else float('nan'):9.2e} {ratio}   {fstr}")
        for note in d["notes"]:
            print(f"{'':15s}   note: {note}")
    b0 = block.get("ours_best_x0")
    if b0:
        print(f"{'ours -> x(0)':15s} {'':5s} {b0['nfe']:4d} {'x(0)':>11s} {'':9s} {b0['error']:9.2e}   "
              f"{b0['method']}/{b0['grid']} (grid to t=1e-3, then denoise)")
    s = block["summary"]
    if s and s["ours_at_same_end"] is None:
        print(f"-> best diffusers: {s['best_diffusers']} {s['best_diffusers_error']:.2e}; none of ours fits NFE "
              f"{block['nfe']} at that end")
    elif s:
        ob = s["ours_at_same_end"]
        print(f"-> best diffusers: {s['best_diffusers']} {s['best_diffusers_error']:.2e} "
              f"[{s['best_diffusers_end']}]; ours at the same end: "
              f"{ob['method']}/{ob['grid']} {ob['error']:.2e}; ratio ours/best = {s['ratio']:.3f}; "
              f"worst ratio over schedulers = {s['max_ratio_over_schedulers']:.3f} ({s['max_ratio_scheduler']})")
        if s["ratio_fixed"] is not None:
            print(f"   fixed config {s['ours_fixed_at_same_end']['method']}/{s['ours_fixed_at_same_end']['grid']}: "
                  f"{s['ours_fixed_at_same_end']['error']:.2e}, ratio {s['ratio_fixed']:.3f}; worst ratio over "
                  f"schedulers {s['max_ratio_fixed_over_schedulers']:.3f}")


def single_configs(results, nfes=(10, 20)):
    """Post-hoc: every (method, grid) of ours, its worst ratio against the best diffusers scheduler over the
    cells with NFE in ``nfes`` (what one configuration fixed for all targets would give)."""
    worst = {}
    for b in results:
        s = b["summary"]
        if not s or s["ours_at_same_end"] is None or b["nfe"] not in nfes:
            continue
        d = next(d for d in b["diffusers"] if d["label"] == s["best_diffusers"])
        for r in b["ours"][d["ours_key"]]["rows"]:
            k = f"{r['method']}/{r['grid']}"
            ratio = r["error"] / s["best_diffusers_error"] if r.get("error") is not None else math.inf
            worst[k] = max(worst.get(k, 0.0), ratio)
    return sorted(worst.items(), key=lambda kv: kv[1])


def print_summary(results):
    print("\n== summary: ours (best deterministic method/grid, same end) vs the best diffusers scheduler ==")
    print(f"{'target':12s} {'NFE':>4s} {'best diffusers':15s} {'end':>11s} {'error':>9s}   {'ours (best)':24s} "
          f"{'error':>9s} {'ratio':>6s} {'max ratio':>9s}   {'fixed':>9s} {'ratio':>6s} {'max ratio':>9s}")
    for b in results:
        s = b["summary"]
        if not s or s["ours_at_same_end"] is None:
            continue
        ob = s["ours_at_same_end"]
        d = next(d for d in b["diffusers"] if d["label"] == s["best_diffusers"])
        print(f"{b['target']:12s} {b['nfe']:4d} {s['best_diffusers']:15s} {_end_str(d):>11s} "
              f"{s['best_diffusers_error']:9.2e}   {ob['method'] + '/' + ob['grid']:24s} {ob['error']:9.2e} "
              f"{s['ratio']:6.3f} {s['max_ratio_over_schedulers']:9.3f}   "
              + ("      n/a" if s["ratio_fixed"] is None else
                 f"{s['ours_fixed_at_same_end']['error']:9.2e} {s['ratio_fixed']:6.3f} "
                 f"{s['max_ratio_fixed_over_schedulers']:9.3f}"))
    nfes = sorted({b["nfe"] for b in results} & {10, 20}) or sorted({b["nfe"] for b in results})
    top = single_configs(results, tuple(nfes))[:3]
    if top:
        print(f"one configuration for every target (chosen after the fact), worst ratio over NFE {nfes}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in top))


# ------------------------------------------------------------------------------------------------


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


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Terminal error of diffusers' schedulers and of diffusion_lab's deterministic samplers on "
                    "exact Gaussian-mixture models, same start samples, matched end times and NFE budgets.")
    p.add_argument("--nfe", type=_list(int, "--nfe"), default=None,
                   help='NFE budgets, space or comma separated (default "5 10 20 50"; --quick: "10 20")')
    p.add_argument("--targets", type=_list(str, "--targets"), default=None,
                   help=f'targets (default "{" ".join(TARGET_NAMES)}"; --quick: "ring8 bimodal_1d")')
    p.add_argument("--samples", type=int, default=None, help="number of samples (default 2000; --quick: 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of x_0 ~ p_0 (the noise z uses seed + 1)")
    p.add_argument("--quick", action="store_true", help="fewer samples, targets and budgets (< 1 minute)")
    p.add_argument("--methods", type=_list(str, "--methods"), default=None,
                   help="restrict our methods (default: every registered deterministic method)")
    p.add_argument("--fixed", default="unipc/logsnr", metavar="METHOD/GRID",
                   help="one of our configurations declared in advance, reported beside the per-cell best "
                        "(default unipc/logsnr)")
    p.add_argument("--karras", action="store_true",
                   help="also run DPM++2M and Euler with use_karras_sigmas=True (fractional timesteps)")
    p.add_argument("--rtol", type=float, default=1e-10, help="reference ODE rtol (default 1e-10)")
    p.add_argument("--atol", type=float, default=1e-12, help="reference ODE atol (default 1e-12)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tensors are tiny and threads only contend)")
    p.add_argument("--json", metavar="PATH", default=None, help="write every figure and the settings as JSON")
    a = p.parse_args(argv)
    a.nfe = a.nfe or ([10, 20] if a.quick else [5, 10, 20, 50])
    a.targets = a.targets or (["ring8", "bimodal_1d"] if a.quick else list(TARGET_NAMES))
    a.samples = a.samples or (500 if a.quick else 2000)
    if any(n < 1 for n in a.nfe):
        p.error(f"--nfe: budgets must be >= 1, got {a.nfe}")
    unknown = [t for t in a.targets if t not in targets.TARGETS]
    if unknown:
        p.error(f"--targets: unknown {unknown}; choose from {sorted(targets.TARGETS)}")
    if a.samples < 1:
        p.error(f"--samples must be >= 1, got {a.samples}")
    if not (a.rtol > 0 and a.atol >= 0):
        p.error(f"need --rtol > 0 and --atol >= 0, got {a.rtol}, {a.atol}")
    if a.fixed.count("/") != 1 or a.fixed.split("/")[1] not in GRID_KINDS:
        p.error(f"--fixed must be METHOD/GRID with GRID in {GRID_KINDS}, got {a.fixed!r}")
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    return a


def main(argv=None):
    args = parse_args(argv)
    try:
        import diffusers
    except ImportError:
        raise SystemExit("error: this benchmark needs diffusers: pip install 'diffusion_lab[bench]' "
                         "(or pip install diffusers)") from None
    torch.set_num_threads(args.threads)
    methods = our_methods(args.methods)
    specs = [s for s in SPECS if args.karras or not s.extra]
    tic = time.perf_counter()
    print(f"peers: diffusers {diffusers.__version__}, torch {torch.__version__}, diffusion_lab "
          f"{diffusion_lab.__version__}; targets {args.targets}; NFE {args.nfe}; {args.samples} samples; "
          f"seed {args.seed}; our methods: {[m.name for m in methods]}")
    print("error = mean ||x - x_ref||; end: x(t=..) state at t, D@t=.. denoiser at the last model time, "
          "x(0) flow map to t=0; err0 = error against the flow map to t=0 (sigma=0 outputs only); "
          "ratio = ours/diffusers")
    all_results, ref_info = [], {}
    for name in args.targets:
        log = lambda s: print(s, flush=True)  # noqa: E731
        log(f"\n[{name}]")
        res, info = run_target(name, args, methods, specs, log)
        all_results.extend(res)
        ref_info[name] = info
    print_summary(all_results)
    elapsed = time.perf_counter() - tic
    print(f"\ntotal {elapsed:.0f}s")
    if args.json:
        payload = {
            "settings": {
                "targets": args.targets, "nfe": args.nfe, "samples": args.samples, "seed_x0": args.seed,
                "seed_noise": args.seed + 1, "schedule": schedules.DDPMDiscrete().settings(),
                "diffusers_common": COMMON, "schedulers": [{"label": s.label, "class": s.cls, **s.options}
                                                           for s in specs],
                "our_methods": [m.row() for m in methods], "grid_kinds": GRID_KINDS,
                "reference": {"method": "adaptive", "rtol": args.rtol, "atol": args.atol, "coords": "edm",
                              "t_zero": T_ZERO, "runs": {k: {str(t): v for t, v in d.items()}
                                                         for k, d in ref_info.items()}},
                "metric": "mean over samples of ||x - x_ref||_2",
                "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                             "diffusion_lab": diffusion_lab.__version__, "python": platform.python_version()},
                "fixed_config": args.fixed, "threads": args.threads, "seconds": elapsed, "command": " ".join(sys.argv),
            },
            "results": all_results,
            "single_configs_worst_ratio_nfe_10_20": dict(single_configs(all_results)),
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
