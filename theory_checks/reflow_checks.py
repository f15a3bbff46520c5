"""Area "flow_maps": rectified flow / reflow (Liu, Gong & Liu 2023) and consistency training (Song, Dhariwal, Chen &
Sutskever 2023), in 1-D where every quantity is a closed form or a converged quadrature.

The rectified flow of the independent coupling X_0 ~ bimodal_1d, X_1 ~ N(0, 1) has the closed-form velocity

    v(x, t) = E[X_1 - X_0 | X_t = x] = sum_k w_k(x, t) [ -m_k + (t - (1 - t) s_k^2) / V_k(t) (x - (1 - t) m_k) ],
    V_k(t) = (1 - t)^2 s_k^2 + t^2,   w_k proportional to pi_k N(x; (1 - t) m_k, V_k),

since (X_1 - X_0, X_t) is jointly Gaussian given the component k. It is written here from the coupling alone, not
through the package's parameterisation code, and is compared with the package's exact field on ``RectifiedFlow``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import brentq

from diffusion_lab import schedules as S
from diffusion_lab.field import VelocityField
from diffusion_lab.flowmap import consistency_training_loss
from diffusion_lab.flows import gaussian_flow_map
from diffusion_lab.reflow import couple
from diffusion_lab.targets import Gaussian, bimodal_1d

from .catalogue import Outcome, check

TARGET = bimodal_1d()
PI = TARGET.weights.numpy()
M = TARGET.means[:, 0].numpy()
S2 = TARGET.covs[:, 0, 0].numpy()


def rectified_velocity(x: np.ndarray, t: float, sign: float = 1.0) -> np.ndarray:
    """E[X_1 - X_0 | X_t = x] of the independent coupling (module docstring); ``sign=-1`` is a planted error (the
    regression coefficient's sign flipped) for the failure test."""
    x = np.asarray(x, dtype=np.float64)[..., None]
    V = (1 - t) ** 2 * S2 + t * t
    logw = np.log(PI) - 0.5 * np.log(2 * math.pi * V) - 0.5 * (x - (1 - t) * M) ** 2 / V
    w = np.exp(logw - logw.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    cond = -M + sign * (t - (1 - t) * S2) / V * (x - (1 - t) * M)
    return (w * cond).sum(-1)


def interpolation_cdf(x: np.ndarray, t: float) -> np.ndarray:
    """CDF of X_t = (1 - t) X_0 + t X_1 (a mixture of N((1 - t) m_k, V_k(t)))."""
    V = (1 - t) ** 2 * S2 + t * t
    z = (np.asarray(x, dtype=np.float64)[..., None] - (1 - t) * M) / np.sqrt(2 * V)
    return (PI * 0.5 * np.vectorize(math.erfc)(-z)).sum(-1)


def _flow(z: np.ndarray, times: list[float], sign: float = 1.0) -> dict:
    """Z_t for t in ``times`` (descending from 1) of dZ/dt = v(Z, t), Z_1 = z, by DOP853 (rtol 1e-12); the 1-D
    points move independently, so the whole vector is one system with an elementwise tolerance."""
    sol = solve_ivp(lambda t, y: rectified_velocity(y, t, sign), (1.0, min(times)), np.asarray(z, dtype=np.float64),
                    method="DOP853", rtol=1e-12, atol=1e-12, t_eval=sorted(times, reverse=True))
    if not sol.success:
        raise RuntimeError(sol.message)
    return {float(t): sol.y[:, i] for i, t in enumerate(sol.t)}


def reflow_marginals_residual(sign: float = 1.0, n: int = 64) -> Outcome:
    """Rectified flow keeps the marginals of the interpolation (Liu et al. 2023, Theorem 3.3): pushing the
    quantiles q_i = Phi^{-1}(u_i) of X_1 along dZ/dt = E[X_1 - X_0 | X_t = Z] from t = 1 to t gives
    F_{X_t}(Z_t(q_i)) = u_i at every t; residual: the largest abs(F_{X_t}(Z_t(q_i)) - u_i) over t in
    {0.75, 0.5, 0.25, 0}, together with the largest relative difference between the closed-form rectified velocity
    and the package's exact field on RectifiedFlow."""
    from scipy.stats import norm

    u = (np.arange(n) + 0.5) / n
    zs = norm.ppf(u)
    times = [0.75, 0.5, 0.25, 0.0]
    traj = _flow(zs, times, sign)
    marg = max(float(np.abs(interpolation_cdf(traj[t], t) - u).max()) for t in times)
    sch = S.RectifiedFlow()
    field = TARGET.field(sch)
    xs = torch.linspace(-4, 4, 41, dtype=torch.float64)[:, None]
    vel = 0.0
    for t in (sch.t_min, 0.1, 0.5, 0.9, sch.t_max):
        pkg = field.velocity(xs, t)[:, 0].numpy()
        ref = rectified_velocity(xs[:, 0].numpy(), t, sign)
        vel = max(vel, float(np.abs(pkg - ref).max() / np.abs(ref).max()))
    return Outcome(max(marg, vel), f"max |F_t(Z_t) - u| = {marg:.2e} over t in {times}; package field vs closed form "
                                   f"{vel:.2e} (relative)")


def _convex_costs(d: np.ndarray, w: np.ndarray) -> dict:
    return {p: float((w * np.abs(d) ** p).sum()) for p in (1, 2, 4)}


def _independent_costs() -> dict:
    """E|X_1 - X_0|^p for p = 1, 2, 4 in closed form: X_1 - X_0 ~ sum_k pi_k N(-m_k, 1 + s_k^2)."""
    mu, var = -M, 1.0 + S2
    sd = np.sqrt(var)
    e1 = sd * math.sqrt(2 / math.pi) * np.exp(-mu**2 / (2 * var)) + mu * (1 - 2 * np.vectorize(
        lambda v: 0.5 * math.erfc(v / math.sqrt(2)))(mu / sd))
    e2 = mu**2 + var
    e4 = mu**4 + 6 * mu**2 * var + 3 * var**2
    return {1: float((PI * e1).sum()), 2: float((PI * e2).sum()), 4: float((PI * e4).sum())}


def reflow_cost_residual(sign: float = 1.0, n: int = 80) -> Outcome:
    """Rectification does not increase convex transport costs (Liu et al. 2023, Theorem 3.5): for the independent
    coupling of bimodal_1d and N(0, 1) and its rectified coupling (Z_0, Z_1), E|Z_1 - Z_0|^p <= E|X_1 - X_0|^p for
    p = 1, 2, 4. In 1-D the rectified coupling is the monotone one, Z_0 = F_0^{-1}(Phi(Z_1)) (the flow keeps order
    and marginals), the optimal coupling for every convex cost; residual: the largest relative difference between
    the rectified costs (``reflow.couple``, DOP853, on the closed-form velocity; Gauss-Hermite over Z_1 with n nodes)
    and the monotone costs (quantile map by root finding), and inf if a rectified cost exceeds the independent one."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    weights = weights / math.sqrt(2 * math.pi)
    sch = S.RectifiedFlow(t_min=1e-10, t_max=1 - 1e-10)  # endpoints within 1e-10 of t = 0 and 1

    class Closed:
        def __call__(self, x, t):
            tt = t.reshape(-1)[0] if t.ndim else t
            return torch.from_numpy(rectified_velocity(x[:, 0].numpy(), float(tt), sign))[:, None]

    field = VelocityField(sch, Closed(), "velocity")
    c = couple(field, torch.from_numpy(nodes)[:, None], solver="dop853", rtol=1e-11, atol=1e-12)
    rect = _convex_costs((c.z - c.x)[:, 0].numpy(), weights)

    def q0(u):  # F_0^{-1}(u) by root finding on the closed-form CDF
        return brentq(lambda y: float(interpolation_cdf(np.array([y]), 0.0)[0]) - u, -30, 30, xtol=1e-14, rtol=1e-15)

    from scipy.stats import norm

    mono_x0 = np.array([q0(float(norm.cdf(z))) if 1e-300 < norm.cdf(z) < 1 else np.nan for z in nodes])
    ok = np.isfinite(mono_x0)
    mono = _convex_costs(nodes[ok] - mono_x0[ok], weights[ok])
    rect_ok = _convex_costs((c.z - c.x)[:, 0].numpy()[ok], weights[ok])
    indep = _independent_costs()
    res = max(abs(rect_ok[p] - mono[p]) / mono[p] for p in mono)
    if any(rect[p] > indep[p] for p in indep):
        res = float("inf")
    detail = "; ".join(f"p={p}: independent {indep[p]:.4f} -> rectified {rect[p]:.4f} (monotone {mono[p]:.4f})"
                       for p in indep)
    return Outcome(res, detail + f"; coupling NFE {c.nfe}")


class _GaussianConsistency:
    """f_a(x, s, t) = Phi_{s->t}(x) + a h(x, s) for a 1-D Gaussian, h(x, s) = x - alpha_s m (a direction that is
    not itself consistent along trajectories); ``eps`` perturbs the map itself by eps h."""

    def __init__(self, target, schedule, eps=0.0):
        self.target, self.schedule, self.eps = target, schedule, eps
        self.a = torch.zeros((), dtype=torch.float64, requires_grad=True)

    def __call__(self, x, s, t):
        sch, m = self.schedule, float(self.target.means[0, 0])
        s64 = torch.as_tensor(float(s), dtype=torch.float64)
        h = x - sch.alpha(s64) * m
        return gaussian_flow_map(self.target, sch, x, float(s), float(t)) + (self.a + self.eps) * h


def ct_semigradient(schedule, s: float, rel_gap: float, eps: float = 0.0, same_noise: bool = True) -> float:
    """The weighted stop-gradient CT derivative G = lambda d/da E[||f_a(x, s) - stopgrad f_a(xhat, u)||^2] at a = 0,
    lambda = 1/(sigmabar_s - sigmabar_u), sigmabar_u = (1 - rel_gap) sigmabar_s, for x_0 ~ N(m, v), z ~ N(0, 1):
    the expectation is a quadratic polynomial in (x_0, z) (the maps are affine), so 3 x 3 Gauss-Hermite nodes give it
    exactly. ``same_noise=False`` (a planted error) gives xhat the reflected noise -z."""
    tg = Gaussian([0.7], [[0.3]])
    nodes, w = np.polynomial.hermite_e.hermegauss(3)
    w = w / math.sqrt(2 * math.pi)
    Y, Z = np.meshgrid(nodes, nodes, indexing="ij")
    W = torch.from_numpy(np.outer(w, w).reshape(-1))
    x0 = torch.from_numpy(0.7 + math.sqrt(0.3) * Y.reshape(-1))[:, None]
    z = torch.from_numpy(Z.reshape(-1))[:, None]
    sb = lambda t: float(schedule.sigma(torch.tensor(t, dtype=torch.float64)) /  # noqa: E731
                         schedule.alpha(torch.tensor(t, dtype=torch.float64)))
    target_sb = (1 - rel_gap) * sb(s)
    u = float(schedule.t_from_lam(-math.log(target_sb) * torch.ones((), dtype=torch.float64)))
    f = _GaussianConsistency(tg, schedule, eps)
    f.schedule = schedule
    if same_noise:
        per = consistency_training_loss(f, x0, z, s, u, loss="l2")
    else:  # xhat from -z: the pair is no longer on one noising path
        sch = schedule
        s64, u64 = torch.tensor(s, dtype=torch.float64), torch.tensor(u, dtype=torch.float64)
        x = sch.alpha(s64) * x0 + sch.sigma(s64) * z
        xhat = sch.alpha(u64) * x0 - sch.sigma(u64) * z
        with torch.no_grad():
            y = f(xhat, u, schedule.t_min)
        per = (f(x, s, schedule.t_min) - y).pow(2).sum(1)
    (g,) = torch.autograd.grad((W * per).sum(), f.a)
    return float(g) / (sb(s) - sb(u))


def ct_stationary_residual(same_noise: bool = True, rel_gap: float = 1e-5) -> Outcome:
    """Consistency training's stop-gradient objective is stationary at the exact consistency function (Song et al.
    2023, Theorem 2: with the same z at both levels, E[xhat | x] is the exact Euler step, so the weighted CT gradient
    is O(sigmabar_s - sigmabar_u)), and not at a perturbed one. Residual: the largest ratio
    abs(G(f*)) / abs(G(f* + 0.1 h)) over VP-linear and rectified-flow schedules and three noise levels, at a
    relative gap of 1e-5 (measured: the residual falls tenfold per tenfold smaller gap, 6.4e-3, 6.4e-4, 6.5e-5 at 1e-3, 1e-4, 1e-5)."""
    worst, parts = 0.0, []
    for sch in (S.VPLinear(), S.RectifiedFlow()):
        for s in (0.1, 0.4, 0.8):
            g0 = ct_semigradient(sch, s, rel_gap, 0.0, same_noise)
            g1 = ct_semigradient(sch, s, rel_gap, 0.1, same_noise)
            worst = max(worst, abs(g0) / abs(g1))
            parts.append(f"{sch.name} s={s}: G(f*) {g0:.1e}, G(f*+0.1h) {g1:.2e}")
    return Outcome(worst, "; ".join(parts))


@check("flow_maps.reflow_preserves_marginals", area="flow_maps", kind="quadrature", tol=1e-7,
       case="independent coupling bimodal_1d x N(0,1), 64 quantiles of X_1, DOP853 rtol 1e-12, t in {0.75,0.5,0.25,0}",
       reference="Liu, Gong & Liu 2023, Theorem 3.3")
def _reflow_marginals():
    """The rectified flow dZ/dt = E[X_1 - X_0 | X_t = Z] has the interpolation's marginals, F_{X_t}(Z_t(q)) =
    F_{X_1}(q); its velocity is the package's exact field on the rectified-flow schedule."""
    return reflow_marginals_residual()


@check("flow_maps.reflow_does_not_increase_convex_costs", area="flow_maps", kind="quadrature", tol=1e-6,
       case="bimodal_1d x N(0,1): independent vs rectified coupling, E|Z_1 - Z_0|^p, p = 1, 2, 4, 80 Gauss-Hermite "
            "nodes",
       reference="Liu, Gong & Liu 2023, Theorem 3.5")
def _reflow_costs():
    """Rectification does not increase convex transport costs; in 1-D it yields the monotone (optimal) coupling."""
    return reflow_cost_residual()


@check("flow_maps.ct_objective_stationary_at_consistency_function", area="flow_maps", kind="quadrature", tol=1e-3,
       case="x_0 ~ N(0.7, 0.3), VP-linear and RF, s in {0.1, 0.4, 0.8}, relative gap 1e-5, 3 x 3 Gauss-Hermite nodes",
       reference="Song, Dhariwal, Chen & Sutskever 2023, Theorem 2")
def _ct_stationary():
    """The weighted stop-gradient CT gradient vanishes (to O(gap)) at the exact consistency function of a Gaussian
    and not at a perturbed one."""
    return ct_stationary_residual()
