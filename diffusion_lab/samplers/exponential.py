r"""Exponential integrators of the PF-ODE in the half log-SNR lambda = log(alpha/sigma): DDIM (and its
stochastic eta family), singlestep DPM-Solver-1/2/3 (noise or data prediction), multistep DPM-Solver++ 2M/3M
and UniPC (bh2).

Written in lambda, the PF-ODE has an exactly integrable linear part (Lu et al. 2022, eq. 3.4; 2022b, eq. 8):

    x_t = (alpha_t/alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lambda} eps_hat(x_lambda) d lambda     (noise prediction)
    x_t = (sigma_t/sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0_hat(x_lambda) d lambda       (data prediction)

for a step from s to t < s (h = lambda_t - lambda_s > 0). Each method approximates eps_hat or x0_hat in the
integral by a polynomial in lambda (Taylor from intermediate stages: singlestep; from past steps: multistep).
With the phi-functions written with expm1, the k-th order methods are exact when the prediction is a
polynomial of degree k - 1 in lambda.

Conventions shared by every sampler here: the grid is descending float64; h_i = lambda(t_{i+1}) - lambda(t_i);
coefficients are computed in float64 (python floats) and applied to x in x's dtype; the model is called only
through ``field.x0_eps`` (one NFE per call, both predictions from it); intermediate stage times are
t_from_lam of the intermediate lambda. Lower order is used where there is not enough history (warm-up).
"""
from __future__ import annotations

import math

import torch

from .base import register, step_iter

__all__ = ["ddim_coefficients"]


def _tables(field, grid):
    """alpha, sigma, lambda at the grid times, as lists of python floats (float64)."""
    sch = field.schedule
    g = grid.to(torch.float64)
    return sch.alpha(g).tolist(), sch.sigma(g).tolist(), sch.lam(g).tolist()


def _stage(field, lam_value: float):
    """(t, alpha, sigma) of the intermediate time t = t(lambda) (float64)."""
    sch = field.schedule
    t = sch.t_from_lam(torch.tensor(lam_value, dtype=torch.float64))
    return t, float(sch.alpha(t)), float(sch.sigma(t))


def _check_predict(predict):
    if predict not in ("eps", "x0"):
        raise ValueError(f"predict must be 'eps' (DPM-Solver) or 'x0' (DPM-Solver++), got {predict!r}")


# ------------------------------------------------------------------------------------------------
# DDIM


def ddim_coefficients(alpha_t: float, sigma_t: float, h: float, eta: float) -> tuple[float, float, float]:
    r"""(a, b, c) of the DDIM step x_t = a x0_hat + b eps_hat + c z from s to t, for any (alpha, sigma).

    c is eta times the std of the exact posterior q(x_t | x_s, x_0) of the forward process,

        c^2 = eta^2 sigma_t^2 (1 - e^{-2h}),    h = lambda_t - lambda_s,   e^{-h} = alpha_s sigma_t / (alpha_t sigma_s),
        a = alpha_t,   b = sqrt(sigma_t^2 - c^2) = sigma_t sqrt(1 - eta^2 (1 - e^{-2h})).

    On a VP schedule (alphabar = alpha^2, 1 - alphabar = sigma^2) c is Song, Meng & Ermon (2021) eq. 16,
    sigma(eta) = eta sqrt((1 - alphabar_t)/(1 - alphabar_s)) sqrt(1 - alphabar_s/alphabar_t), since
    sigma_t^2 (1 - e^{-2h}) = (sigma_t^2/sigma_s^2)(sigma_s^2 - alpha_s^2 sigma_t^2/alpha_t^2)
    = (sigma_t^2/sigma_s^2)(1 - alpha_s^2/alpha_t^2); and the step is their eq. 12. At eta = 1 the mean
    a x0 + b (x_s - alpha_s x0)/sigma_s is the DDPM posterior mean (Ho et al. 2020 eq. 7).
    """
    if eta == 0:  # the ODE step; also valid for h < 0 (an increasing grid: DDIM inversion)
        return alpha_t, sigma_t, 0.0
    if h < 0:
        raise ValueError(f"DDIM with eta={eta} > 0 needs a decreasing grid (h = {h:.4g} < 0); invert with eta=0")
    q = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
    c = eta * sigma_t * math.sqrt(q)
    b = sigma_t * math.sqrt(max(1.0 - eta * eta * q, 0.0))
    return alpha_t, b, c


@register("ddim", family="exponential", order=1, stochastic=False, nfe_per_step=1,
          description="DDIM (Song et al. 2021 eq. 12), eta in [0, 1]; eta > 0 adds noise (default 0: the ODE)",
          budget_rule='N = K steps')
def ddim(field, x, grid, *, eta=0.0, noise=None, generator=None, callback=None, progress=False):
    r"""DDIM, Song, Meng & Ermon (2021) eq. 12, in the general (alpha, sigma) form

        x_t = alpha_t x0_hat(x_s, s) + sqrt(sigma_t^2 - c^2) eps_hat(x_s, s) + c z,
        c = eta sigma_t sqrt(1 - e^{-2h}),   h = lambda_t - lambda_s   (see ``ddim_coefficients``).

    eta = 0 is deterministic and equals DPM-Solver-1 and Euler in (x/alpha, sigma/alpha) (Lu et al. 2022 sec. 4.1);
    eta = 1 is DDPM ancestral sampling with the posterior variance (Song, Meng & Ermon 2021 sec. 4.1). ``noise`` (N, *x.shape) of
    standard normals gives z for the step grid[i] -> grid[i+1]; otherwise z is drawn with ``generator``.
    Registered as non-stochastic because the default eta = 0 is; with eta > 0 it is a stochastic sampler, and
    its last step also adds c z at t_min (c -> 0 only as sigma(t_min) -> 0). NFE = N.
    """
    eta = float(eta)
    if not (0.0 <= eta <= 1.0):
        raise ValueError(f"ddim: eta must be in [0, 1], got eta={eta!r}")
    n = len(grid) - 1
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (n, *x.shape):
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"ddim: noise must be a tensor of shape (N, *x.shape) = {(n, *x.shape)}, got {shape}")
    alpha, sigma, lam = _tables(field, grid)
    for i in step_iter(n, progress, "ddim"):
        x0, eps = field.x0_eps(x, grid[i])
        a, b, c = ddim_coefficients(alpha[i + 1], sigma[i + 1], lam[i + 1] - lam[i], eta)
        x_new = a * x0 + b * eps
        if c > 0.0:
            z = noise[i].to(dtype=x.dtype, device=x.device) if noise is not None else \
                torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_new = x_new + c * z
        x = x_new
        if callback is not None:
            callback(i + 1, x)
    return x, {"eta": eta}


# ------------------------------------------------------------------------------------------------
# Singlestep DPM-Solver (Lu et al. 2022, Algorithms 1 and 2) and DPM-Solver++ (Lu et al. 2022b)


def _dpm_solver_step(field, x, t_s, t_t, a_s, s_s, l_s, a_t, s_t, l_t, order, predict):
    """One singlestep DPM-Solver(++) step of ``order`` (1, 2 or 3) from t_s to t_t; ``order`` NFE."""
    h = l_t - l_s
    x0, eps = field.x0_eps(x, t_s)
    if predict == "eps":
        m_s = eps
        phi_1 = math.expm1(h)
        x_lin = (a_t / a_s) * x - (s_t * phi_1) * m_s
        if order == 1:
            return x_lin
        if order == 2:
            r1 = 0.5
            t1, a1, s1 = _stage(field, l_s + r1 * h)
            x1 = (a1 / a_s) * x - (s1 * math.expm1(r1 * h)) * m_s
            m1 = field.x0_eps(x1, t1)[1]
            return x_lin - (s_t / (2.0 * r1) * phi_1) * (m1 - m_s)
        r1, r2 = 1.0 / 3.0, 2.0 / 3.0
        t1, a1, s1 = _stage(field, l_s + r1 * h)
        t2, a2, s2 = _stage(field, l_s + r2 * h)
        phi_22 = math.expm1(r2 * h) / (r2 * h) - 1.0
        phi_2 = phi_1 / h - 1.0
        x1 = (a1 / a_s) * x - (s1 * math.expm1(r1 * h)) * m_s
        m1 = field.x0_eps(x1, t1)[1]
        x2 = (a2 / a_s) * x - (s2 * math.expm1(r2 * h)) * m_s - (r2 / r1 * s2 * phi_22) * (m1 - m_s)
        m2 = field.x0_eps(x2, t2)[1]
        return x_lin - (s_t * phi_2 / r2) * (m2 - m_s)
    # data prediction (DPM-Solver++): phi's of -h
    m_s = x0
    phi_1 = math.expm1(-h)
    x_lin = (s_t / s_s) * x - (a_t * phi_1) * m_s
    if order == 1:
        return x_lin
    if order == 2:
        r1 = 0.5
        t1, a1, s1 = _stage(field, l_s + r1 * h)
        x1 = (s1 / s_s) * x - (a1 * math.expm1(-r1 * h)) * m_s
        m1 = field.x0_eps(x1, t1)[0]
        return x_lin - (0.5 / r1 * a_t * phi_1) * (m1 - m_s)
    r1, r2 = 1.0 / 3.0, 2.0 / 3.0
    t1, a1, s1 = _stage(field, l_s + r1 * h)
    t2, a2, s2 = _stage(field, l_s + r2 * h)
    phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1.0
    phi_2 = phi_1 / h + 1.0
    x1 = (s1 / s_s) * x - (a1 * math.expm1(-r1 * h)) * m_s
    m1 = field.x0_eps(x1, t1)[0]
    x2 = (s2 / s_s) * x - (a2 * math.expm1(-r2 * h)) * m_s + (r2 / r1 * a2 * phi_22) * (m1 - m_s)
    m2 = field.x0_eps(x2, t2)[0]
    return x_lin + (a_t * phi_2 / r2) * (m2 - m_s)


def _check_orders(name: str, orders, n: int, max_order: int) -> list[int]:
    if orders is None:
        return [max_order] * n
    out = list(orders) if not isinstance(orders, str) else None
    if out is None or len(out) != n or any(int(k) != k or not 1 <= k <= max_order for k in out):
        raise ValueError(f"{name}: orders must be a list of {n} integers in 1..{max_order} (one per step), "
                         f"got orders={orders!r}")
    return [int(k) for k in out]


def _singlestep(field, x, grid, order, predict, callback, progress, orders=None, name=None):
    _check_predict(predict)
    name = name or f"dpm_solver_{order}"
    alpha, sigma, lam = _tables(field, grid)
    n = len(grid) - 1
    orders = _check_orders(name, orders, n, order)
    for i in step_iter(n, progress, name):
        x = _dpm_solver_step(field, x, grid[i], grid[i + 1], alpha[i], sigma[i], lam[i],
                             alpha[i + 1], sigma[i + 1], lam[i + 1], orders[i], predict)
        if callback is not None:
            callback(i + 1, x)
    return x, {"order": order, "orders": orders, "predict": predict}


def dpm_solver_fast_orders(nfe: int, order: int) -> list[int]:
    r"""Per-step orders with which singlestep DPM-Solver spends exactly ``nfe`` model evaluations: the
    "DPM-Solver-fast" recipe of Lu et al. (2022, sec. 3.4; official ``get_orders_and_timesteps_for_singlestep_solver``).

    order 3: K = floor(nfe/3) + 1 steps, orders [3]*(K-2) + [2, 1] if nfe = 0 mod 3, [3]*(K-1) + [1] if nfe = 1,
    [3]*(K-1) + [2] if nfe = 2 (e.g. nfe 3, 4, 5, 10 -> [2, 1], [3, 1], [3, 2], [3, 3, 3, 1]);
    order 2: [2]*(nfe/2) for even nfe, [2]*floor(nfe/2) + [1] for odd nfe; order 1: [1]*nfe.
    The low-order steps come last, where the steps in lambda are taken at the small-noise end.
    """
    if int(nfe) != nfe or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    if order == 3:
        k = nfe // 3 + 1
        r = nfe % 3
        orders = [3] * (k - 2) + [2, 1] if r == 0 else [3] * (k - 1) + ([1] if r == 1 else [2])
    elif order == 2:
        orders = [2] * (nfe // 2) + ([1] if nfe % 2 else [])
    elif order == 1:
        orders = [1] * nfe
    else:
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    return orders


def _fast_plan(order: int):
    def plan(nfe, orders=None, **options):
        if orders is not None:  # the caller fixed the orders: the step count follows from them
            return len(orders), {"orders": orders, **options}
        orders = dpm_solver_fast_orders(nfe, order)
        return len(orders), {"orders": orders, **options}

    return plan


def _orders_nfe(order: int):
    return lambda n, orders=None: sum(orders) if orders is not None else order * n


_FAST_RULE = ("DPM-Solver-fast: per-step orders composed from the budget (Lu et al. 2022 sec. 3.4), "
              "e.g. NFE 10 -> orders [3, 3, 3, 1] on 4 steps")
_FAST_RULE_2 = "orders composed from the budget: [2] * (K/2) for even K, one first-order step last for odd K"


@register("dpm_solver_1", family="exponential", order=1, stochastic=False, nfe_per_step=1)
def dpm_solver_1(field, x, grid, *, predict="eps", generator=None, callback=None, progress=False):
    r"""DPM-Solver-1 (Lu et al. 2022 eq. 3.7): x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_hat(x_s, s);
    predict='x0' (DPM-Solver++ 1): x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) x0_hat(x_s, s).
    Both equal DDIM(eta = 0) (Lu et al. 2022 sec. 4.1). NFE = N."""
    return _singlestep(field, x, grid, 1, predict, callback, progress)


@register("dpm_solver_2", family="exponential", order=2, stochastic=False, nfe_per_step=2,
          nfe_of_steps=_orders_nfe(2), plan=_fast_plan(2), budget_rule=_FAST_RULE_2)
def dpm_solver_2(field, x, grid, *, predict="eps", orders=None, generator=None, callback=None, progress=False):
    r"""Singlestep DPM-Solver-2 (Lu et al. 2022 Alg. 1, r1 = 1/2): with s1 = t(lambda_s + r1 h),

        u = (alpha_s1/alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s,
        x_t = (alpha_t/alpha_s) x_s - sigma_t (e^h - 1) eps_s - sigma_t/(2 r1) (e^h - 1) (eps_hat(u, s1) - eps_s);

    predict='x0': DPM-Solver++(2S) (Lu et al. 2022b, official ``singlestep_dpm_solver_second_update``), the
    same with (alpha, sigma, h, eps) -> (sigma, alpha, -h, x0). ``orders`` (one per step, each 1 or 2) mixes
    in first-order steps; NFE = sum(orders), 2N by default. Given an NFE budget (``sample(..., nfe=K)``) the
    orders follow ``dpm_solver_fast_orders(K, 2)``: an odd budget ends with one first-order step."""
    return _singlestep(field, x, grid, 2, predict, callback, progress, orders)


@register("dpmpp_2s", family="exponential", order=2, stochastic=False, nfe_per_step=2,
          nfe_of_steps=_orders_nfe(2), plan=_fast_plan(2), budget_rule=_FAST_RULE_2,
          description="DPM-Solver++(2S), singlestep data prediction (Lu et al. 2022b Alg. 1); NFE = 2N")
def dpmpp_2s(field, x, grid, *, orders=None, generator=None, callback=None, progress=False):
    r"""Singlestep DPM-Solver++(2S) (Lu et al. 2022b Alg. 1 with r1 = 1/2; official
    ``singlestep_dpm_solver_second_update`` with algorithm_type 'dpmsolver++'): with s1 = t(lambda_s + h/2),

        u = (sigma_s1/sigma_s) x_s - alpha_s1 (e^{-h/2} - 1) D_s,
        x_t = (sigma_t/sigma_s) x_s - alpha_t (e^{-h} - 1) D_s - alpha_t (e^{-h} - 1) (x0_hat(u, s1) - D_s),

    i.e. ``dpm_solver_2`` with predict='x0'. NFE = 2N (sum(orders) with ``orders``)."""
    return _singlestep(field, x, grid, 2, "x0", callback, progress, orders, name="dpmpp_2s")


@register("dpm_solver_3", family="exponential", order=3, stochastic=False, nfe_per_step=3,
          nfe_of_steps=_orders_nfe(3), plan=_fast_plan(3), budget_rule=_FAST_RULE)
def dpm_solver_3(field, x, grid, *, predict="eps", orders=None, generator=None, callback=None, progress=False):
    r"""Singlestep DPM-Solver-3 (Lu et al. 2022 Alg. 2, r1 = 1/3, r2 = 2/3): with phi_1 = e^h - 1,
    phi_2 = phi_1/h - 1, phi_22 = (e^{r2 h} - 1)/(r2 h) - 1 and s_j = t(lambda_s + r_j h),

        u1 = (alpha_s1/alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s,
        u2 = (alpha_s2/alpha_s) x_s - sigma_s2 (e^{r2 h} - 1) eps_s - (r2/r1) sigma_s2 phi_22 (eps_hat(u1, s1) - eps_s),
        x_t = (alpha_t/alpha_s) x_s - sigma_t phi_1 eps_s - (sigma_t/r2) phi_2 (eps_hat(u2, s2) - eps_s);

    predict='x0': DPM-Solver++(3S) (official ``singlestep_dpm_solver_third_update``, dpmsolver++).
    ``orders`` (one per step, each 1, 2 or 3) composes orders; NFE = sum(orders), 3N by default. Given an NFE
    budget (``sample(..., nfe=K)``), the orders are DPM-Solver-fast's (``dpm_solver_fast_orders(K, 3)``), on
    len(orders) steps of the requested grid kind: with grid_kind='logsnr' this is the official
    DPM-Solver-fast (``method='singlestep'``, ``skip_type='logSNR'``) step for step."""
    return _singlestep(field, x, grid, 3, predict, callback, progress, orders)


# ------------------------------------------------------------------------------------------------
# Multistep DPM-Solver++ (Lu et al. 2022b) and UniPC (Zhao et al. 2023)


def _step_orders(n: int, order: int, lower_order_final: bool, final_below: int | None = 10) -> list[int]:
    """Order used in each of the n steps of a multistep method: min(order, i + 1) in step i (0-based; warm-up
    with the history available) and, when ``lower_order_final``, also <= n - i (so the last step is first
    order) -- for every n if ``final_below`` is None (official UniPC ``sample`` and diffusers'
    UniPCMultistepScheduler), only when n < ``final_below`` otherwise (official DPM-Solver ``sample``,
    method='multistep': n < 10; diffusers' DPMSolverMultistepScheduler uses n < 15)."""
    orders = []
    for i in range(n):
        k = min(order, i + 1)
        if lower_order_final and (final_below is None or n < final_below):
            k = min(k, n - i)
        orders.append(k)
    return orders


def _dpmpp_multistep(field, x, grid, order, lower_order_final, callback, progress, name, d2_scale=2.0):
    alpha, sigma, lam = _tables(field, grid)
    n = len(grid) - 1
    orders = _step_orders(n, order, lower_order_final)
    hist = []  # data predictions D at grid[i], grid[i-1], ... (newest first)
    for i in step_iter(n, progress, name):
        hist.insert(0, field.x0_eps(x, grid[i])[0])
        del hist[order:]
        k = orders[i]
        h = lam[i + 1] - lam[i]
        a_t = alpha[i + 1]
        phi_1 = math.expm1(-h)
        x_new = (sigma[i + 1] / sigma[i]) * x - (a_t * phi_1) * hist[0]
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (1.0 / r0) * (hist[0] - hist[1])
            x_new = x_new - (0.5 * a_t * phi_1) * d1
        elif k == 3:
            r0 = (lam[i] - lam[i - 1]) / h
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_0 = (1.0 / r0) * (hist[0] - hist[1])
            d1_1 = (1.0 / r1) * (hist[1] - hist[2])
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d2_scale / (r0 + r1)) * (d1_0 - d1_1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x_new = x_new + (a_t * phi_2) * d1 - (a_t * phi_3) * d2
        x = x_new
        if callback is not None:
            callback(i + 1, x)
    return x, {"orders": orders, "lower_order_final": lower_order_final}


@register("dpmpp_2m", family="exponential", order=2, stochastic=False, nfe_per_step=1,
          budget_rule=('N = K steps; orders 1 then 2 (warm-up); last step first order when N < 10 (official '
                       'DPM-Solver)'))
def dpmpp_2m(field, x, grid, *, lower_order_final=True, generator=None, callback=None, progress=False):
    r"""Multistep DPM-Solver++(2M) (Lu et al. 2022b Alg. 2; official ``multistep_dpm_solver_second_update``,
    solver_type 'dpmsolver'): with D_i = x0_hat(x_i, t_i), h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1}/h_i,

        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) [(1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1}].

    The first step is DPM-Solver++1 (= DDIM); ``lower_order_final`` (default True) makes the last step first
    order too when N < 10 (the official repo's rule; diffusers uses N < 15). NFE = N."""
    return _dpmpp_multistep(field, x, grid, 2, lower_order_final, callback, progress, "dpmpp_2m")


@register("dpmpp_3m", family="exponential", order=2, stochastic=False, nfe_per_step=1,
          description="DPM-Solver++(3M) multistep, data prediction (Lu et al. 2022b); official coefficients "
                      "(global order 2) by default, coefficients='taylor' for order 3; NFE = N",
          budget_rule=('N = K steps; orders 1, 2, then 3 (warm-up); last two steps 2, 1 when N < 10 (official '
                       'DPM-Solver)'))
def dpmpp_3m(field, x, grid, *, lower_order_final=True, coefficients="reference", generator=None, callback=None,
             progress=False):
    r"""Multistep DPM-Solver++(3M), data prediction (Lu et al. 2022b; official dpm-solver
    ``multistep_dpm_solver_third_update``). With D_i = x0_hat(x_i, t_i), h = lambda_{i+1} - lambda_i,
    r0 = h_{i-1}/h, r1 = h_{i-2}/h, D1_0 = (D_i - D_{i-1})/r0, D1_1 = (D_{i-1} - D_{i-2})/r1,
    D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1) (= h D' + O(h^3)), phi_1 = e^{-h} - 1, phi_2 = phi_1/h + 1,
    phi_3 = phi_2/h - 1/2:

        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi_1 D_i + alpha_{i+1} phi_2 D1 - alpha_{i+1} phi_3 D2.

    Two choices of D2 (option ``coefficients``):

    - "reference" (default): D2 = (D1_0 - D1_1)/(r0+r1) = h^2 D''/2 + O(h^3), what the official code,
      diffusers' ``multistep_dpm_solver_third_order_update`` and k-diffusion's ``sample_dpmpp_3m_sde``
      (eta = 0) compute. Its local error is O(h^3): measured global order 2, not 3.
    - "taylor": D2 = 2 (D1_0 - D1_1)/(r0+r1) = h^2 D'' + O(h^3), which integrates the quadratic interpolant of
      D in lambda exactly (sigma_t int_0^h e^{lambda_i + u} D'' u^2/2 du = -alpha_t h^2 phi_3 D''): global
      order 3 (measured 3.1), and the step equals UniP-3 (``unipc`` with order=3, corrector=False).

    Why "reference" is the default: the choice was made by a rule fixed before measuring
    (benchmarks/dpmpp_3m_coefficients.py: the geometric mean of error(taylor)/error(reference) over 90 cells
    -- 5 exact targets x 3 schedules x logsnr/karras grids x NFE 5, 10, 20 -- decides). It is 1.32: the halved
    second difference is the more accurate at the budgets samplers are used at (ring8, VP, logsnr, N = 10:
    1.6e-2 against 6.1e-2), while "taylor" wins on Gaussians and at NFE 50 (geometric mean 0.82 there).

    Warm-up: steps 1 and 2 are of order 1 and 2 (as the official code); ``lower_order_final`` (N < 10) makes
    the last two steps of order 2 and 1. NFE = N. The first-order first step leaves a local error
    O(h^2 dD/dlambda) in the global error, so even "taylor" is globally of order 2 unless D barely moves over
    the first step: on VPLinear from t_max = 1 (alpha ~ 0.007) its measured order over N = 16..256 is
    3.1-3.2, from t_max = 0.4 it is 2.0."""
    if coefficients not in ("taylor", "reference"):
        raise ValueError(f"dpmpp_3m: coefficients must be 'taylor' or 'reference', got {coefficients!r}")
    x, info = _dpmpp_multistep(field, x, grid, 3, lower_order_final, callback, progress, "dpmpp_3m",
                               d2_scale=2.0 if coefficients == "taylor" else 1.0)
    info["coefficients"] = coefficients
    return x, info


def _unipc_coefficients(rks: list[float], h: float, k: int):
    r"""UniPC-bh2 weights for data prediction (Zhao et al. 2023 Alg. 2 / official ``multistep_uni_pc_bh_update``):
    hh = -h, B(h) = e^{hh} - 1, b_j = (j-1)! hphi_j(hh)/B(h) with hphi_1 = (e^{hh} - 1)/hh - 1 ... , R_{jm} = r_m^{j-1};
    predictor rho_p solves R[:-1,:-1] rho = b[:-1] (rho = 1/2 for k = 2), corrector rho_c solves R rho = b
    (rho = 1/2 for k = 1)."""
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    fact = 1
    b = []
    for j in range(1, k + 1):
        b.append(h_phi_k * fact / b_h)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = torch.tensor([[r ** (j - 1) for r in rks] for j in range(1, k + 1)], dtype=torch.float64)
    bt = torch.tensor(b, dtype=torch.float64)
    if k == 1:
        rho_p, rho_c = [], [0.5]
    else:
        rho_p = [0.5] if k == 2 else torch.linalg.solve(R[:-1, :-1], bt[:-1]).tolist()
        rho_c = torch.linalg.solve(R, bt).tolist()
    return b_h, rho_p, rho_c


@register("unipc", family="exponential", order=3, stochastic=False, nfe_per_step=1,
          description="UniPC-bh2 multistep, data prediction (Zhao et al. 2023); order option p (default 2) "
                      "+ UniC corrector -> order p + 1; NFE = N",
          budget_rule=('N = K steps; step i has order min(order, i + 1, N - i) at every N (official UniPC), '
                       'no corrector after the last step'))
def unipc(field, x, grid, *, order=2, corrector=True, lower_order_final=True, final_rule="every_n", generator=None,
          callback=None, progress=False):
    r"""UniPC with B(h) = e^{-h} - 1 (bh2), data prediction (Zhao et al. 2023 Alg. 2-3; official
    ``multistep_uni_pc_bh_update``). With D_i = x0_hat, r_m = (lambda_{i-m} - lambda_i)/h,
    D1_m = (D_{i-m} - D_i)/r_m (m = 1..k-1):

        predictor (UniP-k)  x~_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D_i
                                       - alpha_{i+1} B(h) sum_m rho_p,m D1_m,
        corrector (UniC-k)  x_{i+1}  = (same first two terms)
                                       - alpha_{i+1} B(h) [sum_m rho_c,m D1_m + rho_c,k (x0_hat(x~_{i+1}, t_{i+1}) - D_i)].

    The corrector's model evaluation x0_hat(x~_{i+1}, t_{i+1}) is reused as D_{i+1} by the next step, so each
    step costs one NFE and no corrector follows the last step: NFE = N. Step orders: warm-up min(order, i + 1)
    and, with ``lower_order_final`` (default), min(order, N - i) at every N, as the official UniPC ``sample``
    and diffusers' UniPCMultistepScheduler (``final_rule="every_n"``); ``final_rule="below_10"`` applies it
    only for N < 10, as the official DPM-Solver does for its multistep methods (measured on ring8, karras
    grid, N = 10: 0.18 with the official rule against 0.85 without it). Order of accuracy: ``order`` with corrector=False, ``order`` + 1 with
    the corrector (the registered order 3 is that of the defaults), except that the warm-up bounds it: the
    first step is UniP-1 + UniC-1 (local error O(h^3)), so order=3 with the corrector is globally of order 3
    (measured 3.0 from t_max = 0.4; 3.8-4.2 from t_max = 1, where D barely moves over the first step).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"unipc: order must be 1, 2 or 3, got order={order!r}")
    if final_rule not in ("every_n", "below_10"):
        raise ValueError(f"unipc: final_rule must be 'every_n' or 'below_10', got final_rule={final_rule!r}")
    alpha, sigma, lam = _tables(field, grid)
    n = len(grid) - 1
    orders = _step_orders(n, order, lower_order_final, final_below=None if final_rule == "every_n" else 10)
    hist = [field.x0_eps(x, grid[0])[0]]  # D at grid[i], grid[i-1], ... (newest first)
    for i in step_iter(n, progress, "unipc"):
        k = orders[i]
        h = lam[i + 1] - lam[i]
        a_t = alpha[i + 1]
        rks = [(lam[i - m] - lam[i]) / h for m in range(1, k)] + [1.0]
        d1s = [(hist[m] - hist[0]) / rks[m - 1] for m in range(1, k)]
        b_h, rho_p, rho_c = _unipc_coefficients(rks, h, k)
        x_lin = (sigma[i + 1] / sigma[i]) * x - (a_t * math.expm1(-h)) * hist[0]
        x_pred = x_lin
        for rho, d in zip(rho_p, d1s):
            x_pred = x_pred - (a_t * b_h * rho) * d
        last = i == n - 1
        if last:
            x = x_pred
        else:
            d_next = field.x0_eps(x_pred, grid[i + 1])[0]
            if corrector:
                x = x_lin
                for rho, d in zip(rho_c[:-1], d1s):
                    x = x - (a_t * b_h * rho) * d
                x = x - (a_t * b_h * rho_c[-1]) * (d_next - hist[0])
            else:
                x = x_pred
            hist.insert(0, d_next)
            del hist[order:]
        if callback is not None:
            callback(i + 1, x)
    return x, {"orders": orders, "corrector": corrector, "lower_order_final": lower_order_final,
               "final_rule": final_rule, "variant": "bh2"}
