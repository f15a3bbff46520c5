r"""Area "flow_maps": learned flow maps (``diffusion_lab.flowmap``, ``diffusion_lab.meanflow``) against closed forms.

- The MeanFlow identity (Geng, Deng, Bai, Kolter & He 2025, eq. 6): at the *exact* average velocity
  u(z_t, r, t) = (z_t - Phi_{t->r}(z_t)) / (t - r) of the PF-ODE,

      u(z_t, r, t) = v(z_t, t) - (t - r) (v . grad_z u + d_t u),

  with d/dt u computed by the package's MeanFlow target (one Jacobian-vector product along (v, 0, 1)). For a Gaussian
  the map Phi is closed-form; for a mixture it is a fine RK4 integration of the exact velocity (forward-mode
  differentiable), whose O(h^4) error sets the tolerance.
- The boundary condition Psi(x, t, t) = x, bit for bit, of the three flow-map parameterisations with random networks.
- Consistency Trajectory Models' loss (Kim et al. 2024) vanishes at the exact two-time map: with the network that
  makes ``FlowMap`` the closed-form Gaussian map and an exact teacher segment Phi_{tau_n -> tau_{n-1}}, the two-time
  loss is zero to round-off, while a perturbed network's is not.
"""
from __future__ import annotations

import torch

from diffusion_lab import schedules as S
from diffusion_lab.flowmap import FlowMap, TwoTimeMLP, distance
from diffusion_lab.flows import gaussian_flow_map
from diffusion_lab.meanflow import MeanFlowMap, ShortcutMap, meanflow_target
from diffusion_lab.samplers.grids import time_grid
from diffusion_lab.targets import Gaussian, bimodal_1d, ring8
from diffusion_lab.training import edm_precond

from .catalogue import Outcome, check

RF = S.RectifiedFlow()
VP = S.VPLinear()
GAUSS = Gaussian([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])


def gaussian_average_velocity(target: Gaussian, schedule):
    r"""The exact average velocity u(z, r, t) = (z - Phi_{t->r}(z)) / (t - r), r < t, of Gaussian data N(mu, C),
    C = Q diag(lambda) Q^T: Phi_{t->r}(z) = alpha_r mu + Q diag(sqrt((alpha_r^2 lambda + sigma_r^2) /
    (alpha_t^2 lambda + sigma_t^2))) Q^T (z - alpha_t mu). Written in torch operations of (z, r, t), so it can be
    differentiated forward-mode."""
    lam, Q = torch.linalg.eigh(target.cov.to(torch.float64))
    mu = target.mu.to(torch.float64)

    def u(z, r, t):
        a_r, s_r, a_t, s_t = (c[:, None] for c in (schedule.alpha(r), schedule.sigma(r), schedule.alpha(t),
                                                     schedule.sigma(t)))
        ratio = torch.sqrt((a_r ** 2 * lam + s_r ** 2) / (a_t ** 2 * lam + s_t ** 2))  # (batch, d)
        phi = a_r * mu + ((z - a_t * mu) @ Q * ratio) @ Q.T
        return (z - phi) / (t - r)[:, None]

    return u


def diagonal_mixture_velocity(target, schedule):
    r"""The exact PF-ODE velocity v(x, tau) = alpha' D + sigma' (x - alpha D)/sigma of a Gaussian mixture with
    diagonal covariances, D = sum_k w_k(x) [m_k + alpha c_k / (alpha^2 c_k + sigma^2) (x - alpha m_k)],
    w_k = softmax_k(log pi_k + log N(x; alpha m_k, alpha^2 c_k + sigma^2)), in elementwise torch operations (forward
    mode differentiates them at the cost of a plain call; the package's field goes through batched linear algebra)."""
    covs = target.covs.to(torch.float64)
    if not torch.equal(covs, torch.diag_embed(torch.diagonal(covs, dim1=-2, dim2=-1))):
        raise ValueError("diagonal_mixture_velocity needs diagonal component covariances")
    c = torch.diagonal(covs, dim1=-2, dim2=-1)  # (K, d)
    m = target.means.to(torch.float64)  # (K, d)
    logw = torch.log(target.weights.to(torch.float64))

    def v(x, tau):
        a, s, da, ds = (f(tau)[:, None, None] for f in (schedule.alpha, schedule.sigma, schedule.dalpha,
                                                         schedule.dsigma))
        var = a ** 2 * c + s ** 2  # (batch, K, d)
        diff = x[:, None, :] - a * m
        logp = logw - 0.5 * (diff ** 2 / var + torch.log(2 * torch.pi * var)).sum(-1)
        w = torch.softmax(logp, dim=1)[:, :, None]
        D = (w * (m + a * c / var * diff)).sum(1)
        a, s, da, ds = (q[:, 0] for q in (a, s, da, ds))
        return da * D + ds * (x - a * D) / s

    return v


def rk4_average_velocity(v, steps: int = 200):
    r"""u(z, r, t) = (z - Phi^h_{t->r}(z)) / (t - r) with Phi^h ``steps`` classical RK4 steps of dz/dtau = v(z, tau)
    from t down to r (per-sample times), in torch operations (forward-mode differentiable); error O(h^4)."""

    def u(z, r, t):
        h = (r - t) / steps
        hh = h[:, None]
        x, tau = z, t
        for _ in range(steps):
            k1 = v(x, tau)
            k2 = v(x + 0.5 * hh * k1, tau + 0.5 * h)
            k3 = v(x + 0.5 * hh * k2, tau + 0.5 * h)
            k4 = v(x + hh * k3, tau + h)
            x = x + hh / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            tau = tau + h
        return (z - x) / (t - r)[:, None]

    return u


def meanflow_identity_residuals(n: int = 24, seed: int = 0, rk4_steps: int = 40, jvp: str = "func",
                                mixture_jvp: str = "forward_ad") -> dict:
    r"""max |u - (v - (t - r) du/dt)| / max(1, max |u|) per case, du/dt by ``meanflow.meanflow_target``: Gaussian
    (closed-form u) on RectifiedFlow and VPLinear, bimodal_1d on RectifiedFlow and ring8 on VPLinear (RK4 u, h <=
    0.0075); r uniform in [0.05, 0.5], t - r uniform in [0.02, 0.3]. Also: the residual of the wrong sign
    v + (t - r) du/dt (Gaussian, RectifiedFlow), the closed form's distance to ``flows.gaussian_flow_map`` and the
    elementwise mixture velocity's distance to the package's field. The Gaussian cases take the product by ``jvp``
    (``torch.func.jvp``), the mixture cases by ``mixture_jvp`` (dual tensors: the same product, cheaper through
    160 RK4 stages)."""
    g = torch.Generator().manual_seed(seed)
    out = {"velocity_vs_field": 0.0}
    cases = [("gaussian_2d", GAUSS, RF, "rf", None), ("gaussian_2d", GAUSS, VP, "vp", None),
             ("bimodal_1d", bimodal_1d(), RF, "rf", rk4_steps), ("ring8", ring8(), VP, "vp", rk4_steps)]
    for name, tg, sch, sname, steps in cases:
        r = 0.05 + 0.45 * torch.rand(n, generator=g, dtype=torch.float64)
        t = r + 0.02 + 0.28 * torch.rand(n, generator=g, dtype=torch.float64)
        field = tg.field(sch)
        z = torch.stack([tg.marginal(sch, float(ti)).sample(1, generator=g)[0] for ti in t]).to(torch.float64)
        v = field.velocity(z, t)
        if steps is None:
            u_fn = gaussian_average_velocity(tg, sch)
        else:
            v_mix = diagonal_mixture_velocity(tg, sch)
            out["velocity_vs_field"] = max(out["velocity_vs_field"],
                                           float((v_mix(z, t) - v).abs().max()) / max(1.0, float(v.abs().max())))
            u_fn = rk4_average_velocity(v_mix, steps)
        u, target, du_dt = meanflow_target(u_fn, z, r, t, v, jvp=jvp if steps is None else mixture_jvp)
        scale = max(1.0, float(u.abs().max()))
        out[f"{name}/{sname}"] = float((u.detach() - target).abs().max()) / scale
        if steps is None and sname == "rf":
            wrong = v + (t - r)[:, None] * du_dt
            out["wrong_sign/gaussian_2d/rf"] = float((u.detach() - wrong).abs().max()) / scale
            phi_r = torch.stack([gaussian_flow_map(tg, sch, z[i:i + 1], float(t[i]), float(r[i]))[0]
                                 for i in range(n)])
            out["closed_form_vs_gaussian_flow_map"] = float((z - (t - r)[:, None] * u.detach() - phi_r).abs().max())
    return out


@check("flow_maps.meanflow_identity", area="flow_maps", kind="quadrature", tol=1e-6,
       case="exact average velocity of gaussian_2d (closed form; RectifiedFlow and VPLinear), bimodal_1d "
            "(RectifiedFlow) and ring8 (VPLinear) (40 RK4 steps of the exact velocity, checked against the package's "
            "field); 24 points z_t ~ p_t, r in [0.05, 0.5], t - r in [0.02, 0.3]; du/dt by "
            "meanflow.meanflow_target (one Jacobian-vector product along (v, 0, 1): torch.func.jvp for the "
            "Gaussian, forward-mode dual tensors through the RK4 stages)",
       reference="Geng, Deng, Bai, Kolter & He 2025, eq. 6 (the MeanFlow identity)")
def _meanflow_identity():
    """At the exact average velocity, u(z_t, r, t) = v(z_t, t) - (t - r)(v . grad_z u + d_t u): max residual over
    cases / max(1, |u|) <= 1e-6."""
    res = meanflow_identity_residuals()
    cases = {k: v for k, v in res.items() if "/" in k and not k.startswith("wrong_sign")}  # the identity's residuals
    worst = max(cases.values())
    # the closed form must be the package's Gaussian map, and the opposite sign must fail: otherwise report failure
    if (res["closed_form_vs_gaussian_flow_map"] > 1e-10 or res["velocity_vs_field"] > 1e-12
            or res["wrong_sign/gaussian_2d/rf"] < 1e-3):
        worst = float("inf")
    return Outcome(worst, "; ".join(f"{k} {v:.1e}" for k, v in res.items()))


def _random_net(dim, seed, time_scale=None):
    torch.manual_seed(seed)
    kw = {} if time_scale is None else {"time_scale": time_scale}
    net = TwoTimeMLP(dim, hidden=16, depth=2, **kw).double()
    with torch.no_grad():  # a non-zero output layer: the boundary condition must not rely on F = 0
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def boundary_mismatches(kind: str) -> tuple[int, float]:
    """(number of entries with Psi(x, t, t) != x bitwise, max |Psi(x, s, t) - x| at s > t) for a random network,
    on VPLinear and RectifiedFlow, scalar and per-sample times (the second number shows the network is active)."""
    bad, active = 0, 0.0
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for sch in (VP, RF):
        if kind == "flowmap":
            psi = FlowMap(_random_net(2, 0), sch, sigma_data=0.5)
        elif kind == "meanflow":
            psi = MeanFlowMap(_random_net(2, 0, 1000.0 / sch.t_max), sch)
        else:
            psi = ShortcutMap(_random_net(2, 0, 1000.0 / sch.t_max), sch, levels=7)
        times = [sch.t_min, 0.013, 0.37, sch.t_max, torch.linspace(sch.t_min, sch.t_max, 64, dtype=torch.float64)]
        with torch.no_grad():
            for t in times:
                bad += int((psi(x, t, t) != x).sum())
            active = max(active, float((psi(x, 0.6, 0.1) - x).abs().max()))
    return bad, active


def _boundary_check(kind):
    def fn():
        bad, active = boundary_mismatches(kind)
        # a map that never moves x would pass trivially: require the random network to act at s > t
        return Outcome(float(bad) if active > 1e-3 else float("inf"),
                       f"{bad} entries differ from x at s = t; max |Psi(x, 0.6, 0.1) - x| = {active:.3f}")
    return fn


for _kind, _param in (("flowmap", "FlowMap: (sigma_t/sigma_s) x + (alpha_t - alpha_s sigma_t/sigma_s) g"),
                      ("meanflow", "MeanFlowMap: x - (s - t) u(x, t, s)"),
                      ("shortcut", "ShortcutMap: x - (s - t) s(x, s, s - t)")):
    check(f"flow_maps.boundary[{_kind}]", area="flow_maps", kind="exact", tol=0.0,
          case=f"{_param}; random TwoTimeMLP (float64, all weights perturbed), VPLinear and RectifiedFlow, "
               f"t in {{t_min, 0.013, 0.37, t_max}} and 64 per-sample times",
          reference="Song, Dhariwal, Chen & Sutskever 2023 (boundary condition); Kim et al. 2024; "
                    "Geng et al. 2025; Frans et al. 2024",
          doc="Psi(x, t, t) = x bit for bit for every network: residual = number of entries that differ.")(
        _boundary_check(_kind))


class ExactGaussianResidual:
    """The network F(c_in x, c_s, c_t) that makes ``FlowMap`` the closed-form Gaussian map: (1) of
    ``diffusion_lab.flowmap`` solved for F (one time pair per batch), optionally plus ``delta`` * sin(x_in)."""

    def __init__(self, target, schedule, sigma_data, delta: float = 0.0):
        self.target, self.sch, self.sd, self.delta = target, schedule, sigma_data, delta

    def __call__(self, x_in, c_s, c_t):
        if not (torch.all(c_s == c_s[0]) and torch.all(c_t == c_t[0])):
            raise ValueError("ExactGaussianResidual takes one (s, t) per batch")
        s, t = (self.sch.t_from_lam(-4.0 * c[0].to(torch.float64)) for c in (c_s, c_t))
        c_skip, c_out, cin, _ = edm_precond(self.sch, s, self.sd)
        x = x_in / cin
        ratio = self.sch.sigma(t) / self.sch.sigma(s)
        b = self.sch.alpha(t) - self.sch.alpha(s) * ratio
        if float(b) == 0.0:  # s = t: any F gives Psi = x
            return torch.zeros_like(x_in)
        g = (gaussian_flow_map(self.target, self.sch, x, float(s), float(t)) - ratio * x) / b
        return (g - c_skip * x) / c_out + self.delta * torch.sin(x_in)


def ctm_losses(delta: float = 1e-3, n_grid: int = 8, n: int = 256, seed: int = 0) -> tuple[float, float, float]:
    r"""Sum over the pairs (n, m), 0 <= m < n <= N of a log-SNR grid tau of the CTM loss
    E d(Psi(x, tau_n, tau_m), Psi(xhat, tau_{n-1}, tau_m)), xhat = Phi_{tau_n -> tau_{n-1}}(x) exact, x ~ p_{tau_n},
    for the exact network and for one perturbed by ``delta`` sin(x_in); and the exact network's max error of
    Psi(x, tau_n, tau_m) against the closed-form map. (loss_exact, loss_perturbed, map_error)."""
    sch, tg = VP, GAUSS
    grid = time_grid(sch, n_grid, "logsnr").flip(0)
    exact = FlowMap(ExactGaussianResidual(tg, sch, 0.5), sch, sigma_data=0.5)
    pert = FlowMap(ExactGaussianResidual(tg, sch, 0.5, delta), sch, sigma_data=0.5)
    g = torch.Generator().manual_seed(seed)
    l_exact = l_pert = err = 0.0
    for i in range(1, n_grid + 1):
        s, u = float(grid[i]), float(grid[i - 1])
        x = tg.marginal(sch, s).sample(n, generator=g)
        xhat = gaussian_flow_map(tg, sch, x, s, u)
        for m in range(i):
            t = float(grid[m])
            l_exact += float(distance(exact(x, s, t), exact(xhat, u, t)).mean())
            l_pert += float(distance(pert(x, s, t), pert(xhat, u, t)).mean())
            err = max(err, float((exact(x, s, t) - gaussian_flow_map(tg, sch, x, s, t)).abs().max()))
    return l_exact, l_pert, err


@check("flow_maps.ctm_exact_teacher", area="flow_maps", kind="exact", tol=1e-12,
       case="gaussian_2d/VPLinear; FlowMap with the network solved from the closed-form map; 8-step log-SNR grid, all "
            "36 pairs (n, m), 256 samples each; exact teacher segment Phi_{tau_n -> tau_{n-1}}; perturbation "
            "1e-3 sin(x_in)",
       reference="Kim et al. 2024 (Consistency Trajectory Models); Song et al. 2023, Thm 1")
def _ctm_exact():
    """At the exact two-time map the CTM loss against an exact teacher segment vanishes: residual = loss(exact) /
    loss(network perturbed by 1e-3 sin(x_in)) <= 1e-12 (a loss that cannot tell the two apart fails)."""
    le, lp, err = ctm_losses()
    ratio = le / lp if lp > 0 else float("inf")
    return Outcome(ratio, f"loss exact {le:.2e}, perturbed {lp:.2e}; exact map's max error vs closed form {err:.1e}")
