"""Area "solvers": deterministic solvers -- convergence orders against the exact 1-D flow map, and solver identities
(the exact 1-D flow map is the quantile map; DDIM = DPM-Solver-1 = Euler in (x/alpha, sigma/alpha))."""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab.reference import flow_map, quantile_flow_map
from diffusion_lab.samplers import get_method, sample, time_grid
from diffusion_lab.targets import GaussianMixture, bimodal_1d

from .catalogue import Outcome, check

ORDER_STEPS = (16, 32, 64, 128)


def measured_order(method: str, target: GaussianMixture | None = None, schedule=None, ns=ORDER_STEPS,
                   grid_kind: str = "logsnr", n_samples: int = 256, seed: int = 0, **options):
    """Least-squares slope p of log(mean |x_N - Phi(x_T)|) against log(1/N) for a deterministic sampler on a
    1-D mixture, with Phi = F_{t_min}^{-1} o F_{t_max} the exact flow map (oracle O3). Returns (p, errors)."""
    target = target or bimodal_1d()
    schedule = schedule or S.VPLinear()
    g = torch.Generator().manual_seed(seed)
    x_T = target.marginal(schedule, schedule.t_max).sample(n_samples, g)
    exact = quantile_flow_map(target, schedule, x_T, schedule.t_max, schedule.t_min)
    field = target.field(schedule)
    errs = []
    for n in ns:
        res = sample(field, x_T, method, grid=time_grid(schedule, n, grid_kind), **options)
        errs.append(float((res.x - exact).abs().mean()))
    slope = float(np.polyfit(np.log(1.0 / np.asarray(ns, dtype=float)), np.log(errs), 1)[0])
    return slope, errs


def _order_check(method: str, expected: float, ns=ORDER_STEPS, t_max: float = 1.0, **options):
    def fn():
        schedule = S.VPLinear(t_max=t_max) if t_max != 1.0 else None
        slope, errs = measured_order(method, schedule=schedule, ns=ns, **options)
        return Outcome(abs(slope - expected), f"slope {slope:.3f} (expected {expected:g}); errors at N={ns}: "
                       + ", ".join(f"{e:.2e}" for e in errs))

    start = f" from t_max = {t_max:g}" if t_max != 1.0 else ""
    fn.__doc__ = (f"Global error of {method} {options or ''} on the PF-ODE{start} is O(h^{expected:g}): "
                  f"measured slope of the terminal error against the exact quantile flow map, N in {ns}, "
                  f"log-SNR grid, bimodal 1-D mixture under VP (t_min = 1e-3).")
    return fn


# (method, expected order, step counts in the asymptotic range, options); midpoint and RK4 reach their
# asymptotic slope only from N = 32 (at N = 16..128 RK4 measures 3.84, midpoint 1.86)
ORDER_CASES = [
    ("euler", 1, ORDER_STEPS, {}),
    ("heun", 2, ORDER_STEPS, {}),
    ("midpoint", 2, (32, 64, 128, 256), {}),
    ("rk4", 4, (32, 64, 128, 256), {}),
    ("ddim", 1, ORDER_STEPS, {}),
    ("dpm_solver_1", 1, ORDER_STEPS, {}),
    ("dpm_solver_2", 2, ORDER_STEPS, {}),
    ("dpm_solver_3", 3, ORDER_STEPS, {}),
    ("dpmpp_2m", 2, ORDER_STEPS, {}),
    ("dpmpp_3m", 2, ORDER_STEPS, {}),  # the official coefficients (the default) are second order
    ("dpmpp_3m", 3, ORDER_STEPS, {"coefficients": "taylor"}),
    ("dpmpp_2s", 2, ORDER_STEPS, {}),
    ("dpm_solver_2", 2, ORDER_STEPS, {"predict": "x0"}),
    # the data-prediction 3S approaches its order from below: successive slopes 2.44, 2.68, 2.83, 2.92, 2.96
    # between N = 8, 16, ..., 256, so its asymptotic range starts at N = 32
    ("dpm_solver_3", 3, (32, 64, 128, 256), {"predict": "x0"}),
    ("unipc", 3, ORDER_STEPS, {}),  # UniP-2 + UniC: order 3
    ("unipc", 2, ORDER_STEPS, {"corrector": False}),
]


def _register_orders(cases):
    for method, p, ns, opts in cases:
        get_method(method)  # an unregistered method is an error, not a silently dropped check
        suffix = "" if not opts else "[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]"
        check(f"solvers.order[{method}{suffix}]", area="solvers", kind="order", tol=0.15,
              case=f"bimodal_1d, VP, log-SNR grid, N in {ns}, 256 samples, exact quantile map",
              reference="Hairer, Norsett & Wanner (1993) ch. II.3; the method's paper")(_order_check(method, p, ns, **opts))


_register_orders(ORDER_CASES)


@check("solvers.reference_flow_map", area="solvers", kind="quadrature", tol=1e-9,
       case="bimodal_1d, VP, 512 samples from p_{t_max} to t_min", reference="Song et al. 2021 (PF-ODE); quantile map F_t^{-1} o F_s in 1-D")
def _reference():
    """The 1-D PF-ODE flow map is the monotone quantile map F_t^{-1} o F_s: scipy DOP853 (rtol 1e-10) against it."""
    tg, sch = bimodal_1d(), S.VPLinear()
    x = tg.marginal(sch, sch.t_max).sample(512, torch.Generator().manual_seed(5))
    exact = quantile_flow_map(tg, sch, x, sch.t_max, sch.t_min)
    ode, _ = flow_map(tg.field(sch), x, sch.t_max, sch.t_min)
    return float((ode - exact).abs().max() / exact.abs().max())


def ddim_identity_residual(schedule, n_steps: int = 7, seed: int = 0) -> float:
    """DDIM(eta=0) = DPM-Solver-1 = Euler in (x/alpha, sigma/alpha) on the same grid (Lu et al. 2022 sec. 4.1):
    x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_hat(x_s, s), h = lambda_t - lambda_s."""
    tg = bimodal_1d()
    x = tg.marginal(schedule, schedule.t_max).sample(64, torch.Generator().manual_seed(seed))
    field = tg.field(schedule)
    grid = time_grid(schedule, n_steps, "logsnr")
    ddim = sample(field, x, "ddim", grid=grid, eta=0.0).x
    dpm1 = sample(field, x, "dpm_solver_1", grid=grid).x
    eul = sample(field, x, "euler", grid=grid, coords="edm").x
    scale = float(ddim.abs().max())
    return max(float((ddim - dpm1).abs().max()), float((ddim - eul).abs().max())) / scale


for _name in ("vp", "ve", "rf", "edm"):  # registered unconditionally: a missing method fails, never drops out
    check(f"solvers.ddim_is_dpm_solver_1_is_edm_euler[{_name}]", area="solvers", kind="exact", tol=1e-12,
          case="bimodal_1d, 7 log-SNR steps, 64 samples",
          reference="Lu et al. 2022 sec. 4.1; Song, Meng & Ermon 2021 sec. 4.3",
          doc=ddim_identity_residual.__doc__)(lambda s=S.SCHEDULES[_name](): ddim_identity_residual(s))
