"""Area "solvers" (continued): linear multistep samplers -- measured global orders against the exact 1-D flow map, and
identities between the multistep families.

Two effects set the orders measured here (see diffusion_lab.samplers.multistep):

* constant Adams-Bashforth weights (plms, pndm, ipndm) are exact only for steps uniform in sigma/alpha; on the
  log-SNR grid they leave a local error O(h^3) at every step: global order 2;
* a lower-order warm-up (first step Euler) leaves a local error O(h^2 d eps/d lambda): the variable-weight
  methods (lms, deis) show their formula's order from t_max = 1 on VP, where eps barely moves over the first
  steps, and order 2 from t_max = 0.4, where it moves.

Step counts are chosen where the slope between consecutive N has settled (checked down to N = 16 and up to
N = 1024): N = 32..256 for the order-2 cases; N = 128..1024 for order 3 from t_max = 1 (at 32..256 it reads
2.78, still rising); N = 64..512 from t_max = 0.4.
"""
from __future__ import annotations

import numpy as np
import torch

from diffusion_lab import schedules as S
from diffusion_lab.reference import quantile_flow_map
from diffusion_lab.samplers import get_method, sample, time_grid
from diffusion_lab.targets import bimodal_1d

from .catalogue import Outcome, check
from .solvers import _order_check

_MID = (32, 64, 128, 256)
_HIGH = (128, 256, 512, 1024)
_LOW_START = (64, 128, 256, 512)

# (method, expected order, step counts, t_max of VPLinear, options)
ORDER_CASES = [
    ("lms", 2, _LOW_START, 0.4, {}),               # k-diffusion's warm-up: Euler, then orders 2, 3, 4
    ("lms", 2, _MID, 1.0, {"order": 2}),
    ("lms", 3, _HIGH, 1.0, {"order": 3}),
    ("plms", 2, _MID, 1.0, {}),
    ("plms", 2, _MID, 1.0, {"order": 2}),          # S-PNDM
    ("pndm", 2, _MID, 1.0, {}),
    ("pndm", 2, _MID, 1.0, {"midpoint": "sigmabar"}),
    ("ipndm", 2, _MID, 1.0, {}),
    ("deis", 1, _MID, 1.0, {"order": 1}),
    ("deis", 2, _MID, 1.0, {"order": 2}),
    ("deis", 3, _HIGH, 1.0, {"order": 3}),
    ("deis", 2, _LOW_START, 0.4, {"order": 3}),
    ("deis", 2, _LOW_START, 0.4, {"order": 4}),
    ("deis", 3, _HIGH, 1.0, {"order": 3, "variant": "logrho"}),
]


def _register(cases):
    for method, p, ns, t_max, opts in cases:
        get_method(method)  # an unregistered method is an error, not a silently dropped check
        parts = [f"{k}={v}" for k, v in opts.items()] + ([f"t_max={t_max:g}"] if t_max != 1.0 else [])
        suffix = "[" + ",".join(parts) + "]" if parts else ""
        check(f"solvers.order[{method}{suffix}]", area="solvers", kind="order", tol=0.15,
              case=f"bimodal_1d, VP (t_max={t_max:g}), log-SNR grid, N in {ns}, 256 samples, exact quantile map",
              reference="Karras et al. 2022; Liu et al. 2022; Zhang & Chen 2023")(
            _order_check(method, p, ns, t_max=t_max, **opts))


_register(ORDER_CASES)


def _sigmabar_uniform_slope(method: str, ns, **options):
    """Slope of the terminal error on EDM from sigma = 2 to 0.2 with sigma-uniform steps (time_grid 'karras' with
    rho = 1), against the exact quantile flow map of the bimodal 1-D mixture (256 samples)."""
    sch, tg = S.EDM(t_min=0.2, t_max=2.0), bimodal_1d()
    x = tg.marginal(sch, sch.t_max).sample(256, torch.Generator().manual_seed(0))
    exact = quantile_flow_map(tg, sch, x, sch.t_max, sch.t_min)
    field = tg.field(sch)
    errs = [float((sample(field, x, method, grid=time_grid(sch, n, "karras", rho=1.0), **options).x - exact)
                  .abs().mean()) for n in ns]
    return float(np.polyfit(np.log(1.0 / np.asarray(ns, dtype=float)), np.log(errs), 1)[0]), errs


@check("solvers.order[pndm,sigmabar_uniform_grid]", area="solvers", kind="order", tol=0.3,
       case="bimodal_1d, EDM sigma 2 -> 0.2, sigma-uniform grid, N in (16, 32, 64, 128), 256 samples",
       reference="Liu et al. 2022 (F-PNDM)")
def _pndm_uniform():
    """On a grid uniform in sigma/alpha, PNDM's constant 4-step weights are the exact Adams-Bashforth weights and
    its pseudo Runge-Kutta warm-up is RK4 (midpoint in t = sigma on EDM): global order 4 (measured 4.1; the same
    method on the log-SNR grid of this range measures 1.9)."""
    ns = (16, 32, 64, 128)
    slope, errs = _sigmabar_uniform_slope("pndm", ns)
    return Outcome(abs(slope - 4.0), f"slope {slope:.3f} (expected 4); errors at N={ns}: "
                   + ", ".join(f"{e:.2e}" for e in errs))


def _identity(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _setup(schedule, t_max=None, n=64):
    tg = bimodal_1d()
    t0 = schedule.t_max if t_max is None else t_max
    return tg.field(schedule), tg.marginal(schedule, t0).sample(n, torch.Generator().manual_seed(3))


@check("solvers.multistep.ipndm_is_lms_on_sigmabar_uniform_grid", area="solvers", kind="exact", tol=1e-11,
       case="bimodal_1d, VP from t = 0.5, 10 sigma/alpha-uniform steps, 64 samples",
       reference="Zhang & Chen 2023 (iPNDM, rho-AB-DEIS); k-diffusion sample_lms")
def _ipndm_lms():
    """With equal steps in sigmabar = sigma/alpha, the Lagrange weights of LMS (eps interpolated in sigmabar) are
    the constant Adams-Bashforth weights of iPNDM, warm-up included, so the two samplers coincide."""
    sch = S.VPLinear()
    field, x = _setup(sch, 0.5)
    grid = time_grid(sch, 10, "karras", rho=1.0, t_max=0.5)
    return _identity(sample(field, x, "ipndm", grid=grid).x, sample(field, x, "lms", grid=grid).x)


@check("solvers.multistep.deis_tab_is_lms_on_edm", area="solvers", kind="exact", tol=1e-11,
       case="bimodal_1d, EDM, 11 Karras steps, orders 2-4, 64 samples", reference="Zhang & Chen 2023 eq. 14")
def _tab_lms():
    """On EDM the time is t = sigma = sigma/alpha, so tAB-DEIS (eps a polynomial in t, integrated in sigmabar) is
    LMS (eps a polynomial in sigmabar) for every order."""
    sch = S.EDM()
    field, x = _setup(sch)
    grid = time_grid(sch, 11, "karras")
    return max(_identity(sample(field, x, "deis", grid=grid, order=k).x, sample(field, x, "lms", grid=grid, order=k).x)
               for k in (2, 3, 4))


@check("solvers.multistep.pndm_warm_up_is_rk4_in_edm_coordinates", area="solvers", kind="exact", tol=1e-12,
       case="bimodal_1d, VP, 3 log-SNR steps, 64 samples", reference="Liu et al. 2022 eq. 13")
def _prk_rk4():
    """PNDM's pseudo Runge-Kutta step with the stage point at the sigma/alpha midpoint is classical RK4 on
    d(x/alpha)/d(sigma/alpha) = eps_hat (the first 3 steps of pndm(midpoint='sigmabar') = rk4 with coords='edm')."""
    sch = S.VPLinear()
    field, x = _setup(sch)
    grid = time_grid(sch, 3, "logsnr")
    return _identity(sample(field, x, "pndm", grid=grid, midpoint="sigmabar").x,
                     sample(field, x, "rk4", grid=grid, coords="edm").x)
