"""Area "langevin": Langevin samplers (ULA, MALA, the annealed / predictor-corrector step rules), run through the
implementations themselves."""
from __future__ import annotations

import math

import numpy as np
import torch

from diffusion_lab import langevin as L
from diffusion_lab import schedules as S
from diffusion_lab.targets import Gaussian

from .catalogue import Outcome, check


def gaussian_field(mean: float = 0.3, var: float = 1.7, schedule=None):
    """A 1-D Gaussian target's exact field; at the schedule's t_min the marginal is N(alpha m, alpha^2 v + sigma^2)."""
    schedule = schedule or S.VE(sigma_min=1e-3)
    tg = Gaussian([mean], [[var]])
    return tg, schedule, tg.field(schedule)


def ula_affine_step(field, t, h: float, dim: int = 1, dtype=torch.float64):
    """(A, b, B) of one ULA step of the implementation, x' = A x + b + B z, read off by running it with zero and
    unit noise (the exact Gaussian score is affine, so the step is exactly affine)."""
    pts = torch.cat([torch.zeros(1, dim, dtype=dtype), torch.eye(dim, dtype=dtype)], 0)
    zero = torch.zeros(1, *pts.shape, dtype=dtype)
    out = L.ula(field, pts, t, h, 1, noise=zero).x
    b = out[0]
    A = (out[1:] - b).T
    z = torch.eye(dim, dtype=dtype)[:, None, :].expand(dim, 1, dim).reshape(dim, 1, dim)
    B = torch.stack([L.ula(field, torch.zeros(1, dim, dtype=dtype), t, h, 1, noise=z[j:j + 1]).x[0] - b
                     for j in range(dim)], 1)
    return A, b, B


def ula_stationary_variance_residual(var_t: float, h: float, field, t) -> float:
    """ULA x' = x + h s + sqrt(2h) z on N(m, v) has stationary variance v / (1 - h/(2v)) for h < 2v (the
    fixed point of the AR(1) variance recursion): the
    fixed point B^2/(1 - A^2) of the implementation's exact variance recursion v' = A^2 v + B^2, relative error."""
    A, _, B = ula_affine_step(field, t, h)
    v_star = float(B[0, 0] ** 2 / (1 - A[0, 0] ** 2))
    return abs(v_star / (var_t / (1 - h / (2 * var_t))) - 1)


def ula_transition_order(var_t: float, field, t, x0: float, T: float, ks=(8, 16, 32, 64)) -> tuple[float, list]:
    """k ULA steps of size h = T/k from x0 converge to the exact Langevin transition on N(m, v),
    N(m + (x0 - m) e^{-T/v}, v (1 - e^{-2T/v})) (the Ornstein-Uhlenbeck transition), at order 1 in h: slope of the
    moment error."""
    A, b, B = ula_affine_step(field, t, 1.0)  # only to get the mean m = b/(1 - A) of p_t
    m = float(b[0] / (1 - A[0, 0]))
    exact_mean = m + (x0 - m) * math.exp(-T / var_t)
    exact_var = var_t * (1 - math.exp(-2 * T / var_t))
    errs = []
    for k in ks:
        A, b, B = ula_affine_step(field, t, T / k)
        a, c, s2 = float(A[0, 0]), float(b[0]), float(B[0, 0] ** 2)
        mean, var = x0, 0.0
        for _ in range(k):
            mean, var = a * mean + c, a * a * var + s2
        errs.append(abs(mean - exact_mean) + abs(var - exact_var))
    slope = float(np.polyfit(np.log([T / k for k in ks]), np.log(errs), 1)[0])
    return slope, errs


def _var_t(tg, schedule, t) -> float:
    tt = torch.tensor(float(t), dtype=torch.float64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    return a * a * float(tg.cov[0, 0]) + s * s


@check("langevin.ula_stationary_variance", area="langevin", kind="exact", tol=1e-12,
       case="1-D Gaussian (v = 1.7 + sigma_min^2) under VE at t_min, h/v in {0.01, 0.3, 1, 1.9}",
       reference="Roberts & Tweedie 1996 (ULA); AR(1) variance recursion")
def _ula_var():
    """ULA's stationary variance on N(m, v) is v / (1 - h/(2v)), from the implementation's exact variance recursion."""
    tg, sch, f = gaussian_field()
    v = _var_t(tg, sch, sch.t_min)
    return max(ula_stationary_variance_residual(v, r * v, f, sch.t_min) for r in (0.01, 0.3, 1.0, 1.9))


@check("langevin.ula_stability_bound", area="langevin", kind="exact", tol=0.0,
       case="1-D Gaussian under VE at t_min; h = 2v (1 -+ 1e-9)",
       reference="Roberts & Tweedie 1996 (ULA); AR(1) stability |1 - h/v| < 1")
def _ula_stab():
    """ULA on N(m, v) is stable iff h < 2v: |A| = |1 - h/v| < 1 below the bound, and ula refuses h >= 2v."""
    tg, sch, f = gaussian_field()
    v = _var_t(tg, sch, sch.t_min)
    A_below = abs(float(ula_affine_step(f, sch.t_min, 2 * v * (1 - 1e-9))[0]))
    try:
        L.ula(f, torch.zeros(1, 1, dtype=torch.float64), sch.t_min, 2 * v * (1 + 1e-9), 1)
        refused = False
    except ValueError as exc:  # refused at the bound, not for another reason: the message names the bound
        refused = "stability bound" in str(exc)
    ok = A_below < 1 and refused
    return Outcome(0.0 if ok else 1.0, f"|A| just below the bound = {A_below:.12f}; h above the bound refused: {refused}")


@check("langevin.langevin_gaussian_transition", area="langevin", kind="order", tol=0.15,
       case="1-D Gaussian under VE at t_min, x0 = 2.5, T = 1, k in {8..64} steps",
       reference="Ornstein-Uhlenbeck transition in closed form; Roberts & Tweedie 1996")
def _transition():
    """ULA's k-step moments converge to the exact Langevin transition N(m + (x0-m)e^{-T/v}, v(1 - e^{-2T/v})) at order 1."""
    tg, sch, f = gaussian_field()
    v = _var_t(tg, sch, sch.t_min)
    slope, errs = ula_transition_order(v, f, sch.t_min, 2.5, 1.0)
    return Outcome(abs(slope - 1), f"slope {slope:.3f} (expected 1); errors " + ", ".join(f"{e:.2e}" for e in errs))


def mala_invariance_zscores(h_ratio: float = 0.5, n_chains: int = 4000, n_steps: int = 30, seed: int = 0,
                            method: str = "mala"):
    """Chains started from exact samples of p_t (2-D correlated Gaussian, VP at t = 0.05) run ``n_steps`` of
    MALA (or ULA) with h = h_ratio * lambda_min(C_t); returns (max |z| of the means and variances along the
    eigenvectors of C_t against the truth, acceptance rate). MALA keeps p_t exactly (Roberts & Tweedie 1996);
    ULA does not (its stationary variance is v / (1 - h/(2v)))."""
    from diffusion_lab.targets import gaussian_2d

    tg, sch = gaussian_2d(), S.VPLinear()
    t = 0.05
    pt = tg.marginal(sch, t)
    f = tg.field(sch)
    g = torch.Generator().manual_seed(seed)
    x0 = pt.sample(n_chains, g)
    h = h_ratio * float(torch.linalg.eigvalsh(pt.cov).min())
    if method == "mala":
        res = L.mala(f, x0, t, h, n_steps, generator=g)
    else:
        res = L.ula(f, x0, t, h, n_steps, generator=g)
    # test in the eigenbasis of C_t, where the coordinates are independent and ULA's bias is largest
    lam, U = torch.linalg.eigh(pt.cov)
    y = (res.x - pt.mu) @ U
    z_mean = y.mean(0) / torch.sqrt(lam / n_chains)
    z_var = (y.var(0) - lam) / (lam * math.sqrt(2.0 / (n_chains - 1)))
    return float(torch.cat([z_mean, z_var]).abs().max()), res.acceptance_rate


@check("langevin.mala_invariance", area="langevin", kind="mc", tol=5.0,
       case="2-D Gaussian, VP t=0.05, 4000 chains from p_t, 30 steps, h = 0.5 lambda_min",
       reference="Roberts & Tweedie 1996 (MALA: Metropolis-Hastings detailed balance)")
def _mala():
    """MALA leaves p_t invariant: after 30 steps from exact samples, means and variances agree with p_t (max |z|)."""
    z, acc = mala_invariance_zscores()
    return Outcome(z, f"max |z| = {z:.2f}; acceptance rate {acc:.3f}")


@check("langevin.ula_bias_detected", area="langevin", kind="mc", tol=0.0,
       case="as langevin.mala_invariance, with ULA instead of MALA",
       reference="Roberts & Tweedie 1996 (ULA bias O(h))")
def _ula_detect():
    """At the same step the same test resolves ULA's bias (|z| >= 5), so MALA's pass is not for want of power:
    residual = max(0, 5 - max|z|)."""
    z, _ = mala_invariance_zscores(method="ula")
    return Outcome(max(0.0, 5.0 - z), f"ULA max |z| = {z:.1f} (variance v/(1 - h/2v) along lambda_min)")


def corrector_variance_zscore(snr: float = 0.16, d: int = 64, n_chains: int = 1000, n_steps: int = 40, seed: int = 0):
    """The Langevin corrector alone at fixed t (VE, d-dim isotropic Gaussian data N(0, v I) at t, chains from exact
    p_t) settles at the variance w = v (1 + r^2) predicted from the published rule alone, independently of the step
    sizes the code returns: with the step e = 2 (r ||z|| / ||s||)^2 of Song et al. 2021 (Alg. 5; norms averaged over
    the batch as the official code does) and s = -x/v, a chain of variance w has ||z|| / ||s|| = v / sqrt(w), so
    e = 2 r^2 v^2 / w, and ULA's variance recursion w = v / (1 - e/(2v)) has the fixed point w = v (1 + r^2).
    (A rule with half the step would settle at v (1 + r^2/2).)
    Returns (z-score against v (1 + r^2), z-score against the unbiased v)."""
    sch = S.VE()
    tg = Gaussian(torch.zeros(d), 0.5)
    t = 0.3
    pt = tg.marginal(sch, t)
    v = float(pt.cov[0, 0])
    g = torch.Generator().manual_seed(seed)
    x = pt.sample(n_chains, g)
    x, _ = L.langevin_corrector(tg.field(sch), x, t, snr, n_steps, generator=g)
    pred = v * (1 + snr * snr)
    emp = float(x.var(0).mean())
    se = pred * math.sqrt(2.0 / (n_chains * d))
    return (emp - pred) / se, (emp - v) / (v * math.sqrt(2.0 / (n_chains * d)))


@check("langevin.corrector_keeps_p_t", area="langevin", kind="mc", tol=5.0,
       case="VE, 64-D Gaussian, t=0.3, 1000 chains from p_t, 40 corrector steps, r in {0.16, 0.4}",
       reference="Song et al. 2021 (predictor-corrector sampling, Alg. 5: e = 2 alpha (r ||z|| / ||s||)^2)")
def _corrector():
    """The SNR-rule corrector at fixed t settles at the variance v (1 + r^2), the fixed point of the published step
    rule e = 2 (r ||z||/||s||)^2 with ULA's variance recursion (derived in ``corrector_variance_zscore``, not read
    from the step sizes the code returns); at r = 0.4 a rule off by a factor 2 is 12 standard errors away."""
    zs = [corrector_variance_zscore(snr=r) for r in (0.16, 0.4)]
    return Outcome(max(abs(z[0]) for z in zs),
                   "; ".join(f"r={r}: z vs v(1 + r^2) {z[0]:.2f}, z vs unbiased p_t {z[1]:.1f}"
                             for r, z in zip((0.16, 0.4), zs)))


def corrector_step_residual(snr: float = 0.16, alpha: float = 0.97, d: int = 8, n: int = 16, seed: int = 0) -> float:
    """One step of the package's corrector equals the published step written here from Song et al. 2021, Alg. 5:

        e = 2 alpha (r ||z||_2 / ||s||_2)^2,   x' = x + e s + sqrt(2 e) z,

    with s = -x / v the exact score of N(0, v I) and z the same standard normals (re-drawn from a copy of the
    generator); norms per sample, averaged over the batch (the official code). Relative max error of x' and of
    the returned step."""
    sch = S.VE()
    tg = Gaussian(torch.zeros(d), 0.5)
    t = 0.3
    v = float(tg.marginal(sch, t).cov[0, 0])
    g = torch.Generator().manual_seed(seed)
    x = tg.marginal(sch, t).sample(n, g)
    state = g.get_state()
    out, steps = L.langevin_corrector(tg.field(sch), x, t, snr, 1, alpha=alpha, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    z = torch.randn(x.shape, generator=g2, dtype=torch.float64)
    s = -x / v
    e = 2.0 * alpha * (snr * float(z.norm(dim=1).mean()) / float(s.norm(dim=1).mean())) ** 2
    expected = x + e * s + math.sqrt(2.0 * e) * z
    return max(float((out - expected).abs().max() / expected.abs().max()), abs(steps[0] / e - 1))


@check("langevin.corrector_step_published_rule", area="langevin", kind="exact", tol=1e-12,
       case="VE, 8-D Gaussian at t = 0.3, 16 chains, r in {0.05, 0.16, 0.4}, alpha in {1, 0.97}",
       reference="Song et al. 2021, Alg. 5 (Langevin corrector, SNR step rule)")
def _corrector_step():
    """A corrector step is x' = x + e s + sqrt(2e) z with e = 2 alpha (r ||z|| / ||s||)^2 (Song et al. 2021, Alg. 5),
    recomputed here from the same z and the closed-form score."""
    return max(corrector_step_residual(r, a) for r in (0.05, 0.16, 0.4) for a in (1.0, 0.97))


# ------------------------------------------------------------------------------------------------
# kinetic (underdamped) Langevin, BAOAB

def baoab_affine_step(field, t, h: float, friction: float):
    """(A, b, B) of one step of the package's ``kinetic_langevin`` on a 1-D target with affine score, (x', v') =
    A (x, v) + b + B z, read off one run on the states (0, 0), (1, 0), (0, 1), (0, 0) with the step's normals z
    re-drawn from a copy of the generator (the two runs from (0, 0) differ only through B z)."""
    x = torch.tensor([[0.0], [1.0], [0.0], [0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0], [0.0], [1.0], [0.0]], dtype=torch.float64)
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    res = L.kinetic_langevin(field, x, t, h, 1, friction=friction, v0=v, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    z = torch.randn(x.shape, generator=g2, dtype=torch.float64)[:, 0]
    out = torch.cat([res.x, res.info["v"]], 1).numpy()  # (4, 2)
    z = z.numpy()
    B = (out[0] - out[3]) / (z[0] - z[3])
    b = out[0] - B * z[0]
    A = np.stack([out[1] - b - B * z[1], out[2] - b - B * z[2]], 1)
    return A, b, B


def baoab_stationary_residual(h: float, friction: float, mean: float = 0.3, var: float = 1.7) -> float:
    """On N(m, v) BAOAB samples the position exactly: the stationary law of the implementation's affine step,
    (I - A)^{-1} b and the solution S of S = A S A^T + B B^T, has x-mean m, Var x = v for every h < 2 sqrt(v) and
    every friction, Var v = 1 - h^2/(4v) and Cov(x, v) = 0 (Leimkuhler & Matthews 2013, harmonic oscillator).
    Max relative error."""
    from scipy.linalg import solve_discrete_lyapunov

    tg, sch, f = gaussian_field(mean, var)
    t = sch.t_min
    v = _var_t(tg, sch, t)
    A, b, B = baoab_affine_step(f, t, h, friction)
    S_ = solve_discrete_lyapunov(A, np.outer(B, B))
    m_s = np.linalg.solve(np.eye(2) - A, b)
    return max(abs(S_[0, 0] / v - 1), abs(S_[1, 1] / (1 - h * h / (4 * v)) - 1), abs(S_[0, 1]) / math.sqrt(v),
               abs(m_s[0] - mean) / math.sqrt(v), abs(m_s[1]))


@check("langevin.baoab_stationary_law", area="langevin", kind="exact", tol=1e-12,
       case="1-D Gaussian (m = 0.3, v = 1.7 + sigma_min^2) under VE at t_min, h in {0.1, 0.5, 1, 2}, "
            "friction in {0.5, 1, 3}",
       reference="Leimkuhler & Matthews 2013 (BAOAB exact in configuration for harmonic forces)")
def _baoab_stationary():
    """BAOAB's stationary law on N(m, v) has the exact position law N(m, v) and velocity variance 1 - h^2/(4v),
    from the implementation's affine step (exact discrete Lyapunov equation): a wrong O-step (e^{-gamma h},
    sqrt(1 - e^{-2 gamma h})) moves Var x off v."""
    return max(baoab_stationary_residual(h, gam) for h in (0.1, 0.5, 1.0, 2.0) for gam in (0.5, 1.0, 3.0))


def baoab_transition_order(friction: float, x0: float = 2.5, v0: float = -0.7, T: float = 1.0, ks=(8, 16, 32, 64),
                           mean: float = 0.3, var: float = 1.7):
    """k BAOAB steps of size T/k from (x0, v0) against the exact transition of the underdamped Langevin SDE on N(m, v),
    dY = M Y dtau + (0, sqrt(2 gamma)) dW, Y = (x - m, v), M = [[0, 1], [-1/v, -gamma]]:
    mean e^{MT} Y_0, covariance C_inf - e^{MT} C_inf e^{M^T T}, C_inf = diag(v, 1). The moments of the chain follow
    the implementation's affine step exactly. Returns (slope of the moment error against h, errors); BAOAB has weak
    order 2."""
    from scipy.linalg import expm

    tg, sch, f = gaussian_field(mean, var)
    t = sch.t_min
    v = _var_t(tg, sch, t)
    M = np.array([[0.0, 1.0], [-1.0 / v, -friction]])
    E = expm(M * T)
    c_inf = np.diag([v, 1.0])
    m_exact = E @ np.array([x0 - mean, v0]) + np.array([mean, 0.0])
    c_exact = c_inf - E @ c_inf @ E.T
    errs = []
    for k in ks:
        A, b, B = baoab_affine_step(f, t, T / k, friction)
        m_, C = np.array([x0, v0]), np.zeros((2, 2))
        for _ in range(k):
            m_, C = A @ m_ + b, A @ C @ A.T + np.outer(B, B)
        errs.append(float(np.abs(m_ - m_exact).max() + np.abs(C - c_exact).max()))
    slope = float(np.polyfit(np.log([T / k for k in ks]), np.log(errs), 1)[0])
    return slope, errs


@check("langevin.kinetic_langevin_weak_order", area="langevin", kind="order", tol=0.15,
       case="1-D Gaussian under VE at t_min, (x0, v0) = (2.5, -0.7), T = 1, k in {8..64} steps, friction 0.5 and 2",
       reference="Leimkuhler & Matthews 2013 (BAOAB, weak order 2); underdamped Ornstein-Uhlenbeck transition")
def _kinetic_order():
    """kinetic_langevin (BAOAB) converges to the exact underdamped Langevin transition (mean and covariance in closed
    form) at weak order 2. Residual: max |slope - 2| over the frictions."""
    res = [baoab_transition_order(gam) for gam in (0.5, 2.0)]
    return Outcome(max(abs(sl - 2) for sl, _ in res),
                   "; ".join(f"friction {gam}: slope {sl:.3f}, errors " + ", ".join(f"{e:.2e}" for e in errs)
                             for gam, (sl, errs) in zip((0.5, 2.0), res)))
