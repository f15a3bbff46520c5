"""Learned flow maps (diffusion_lab.flowmap): boundary condition, exactness with the exact residual, consistency
distillation on a Gaussian against the teacher's own discretisation error, exact NFE counts."""
import math

import pytest
import torch

from diffusion_lab import RectifiedFlow, VPLinear, targets, time_grid
from diffusion_lab.flowmap import FlowMap, TwoTimeMLP, distill, flow_map_sample, teacher_step
from diffusion_lab.flows import gaussian_flow_map, semigroup_defect
from diffusion_lab.training import edm_precond

SCH = VPLinear()
GAUSS = targets.Gaussian([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])


def _random_net(dim=2, seed=0):
    torch.manual_seed(seed)
    net = TwoTimeMLP(dim, hidden=16, depth=2).double()
    with torch.no_grad():  # a non-zero output layer: the boundary condition must not rely on F = 0
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


class ExactResidual:
    """F(c_in x, c_s, c_t) that makes the FlowMap equal to the closed-form Gaussian map: solve (1) for F."""

    def __init__(self, target, schedule, sigma_data):
        self.target, self.sch, self.sd = target, schedule, sigma_data

    def __call__(self, x_in, c_s, c_t):
        s = float(self.sch.t_from_lam(-4.0 * c_s[0].double()))
        t = float(self.sch.t_from_lam(-4.0 * c_t[0].double()))
        assert torch.all(c_s == c_s[0]) and torch.all(c_t == c_t[0])
        c_skip, c_out, cin, _ = (float(c) for c in edm_precond(self.sch, torch.tensor(s, dtype=torch.float64), self.sd))
        x = x_in / cin
        a = lambda v: float(self.sch.alpha(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
        sg = lambda v: float(self.sch.sigma(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
        ratio = sg(t) / sg(s)
        b = a(t) - a(s) * ratio
        g = (gaussian_flow_map(self.target, self.sch, x, s, t) - ratio * x) / b
        return (g - c_skip * x) / c_out


def test_boundary_condition_exact():
    psi = FlowMap(_random_net(), SCH, sigma_data=0.5)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (SCH.t_min, 0.013, 0.37, SCH.t_max):
        assert torch.equal(psi(x, t, t), x)
    tb = torch.linspace(SCH.t_min, SCH.t_max, 64, dtype=torch.float64)
    assert torch.equal(psi(x, tb, tb), x)
    # and the map is not the identity elsewhere (the net does something)
    assert float((psi(x, 0.5, 0.1) - x).detach().abs().max()) > 1e-2


def test_bad_times_rejected():
    psi = FlowMap(_random_net(), SCH)
    x = torch.zeros(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="0.2"):
        psi(x, 0.2, 0.5)
    with pytest.raises(ValueError, match="outside the valid range"):
        psi(x, 1.5, 0.5)


def test_exact_residual_reproduces_gaussian_map_and_zero_semigroup_defect():
    psi = FlowMap(ExactResidual(GAUSS, SCH, 0.5), SCH, sigma_data=0.5)
    x = GAUSS.marginal(SCH, SCH.t_max).sample(256, generator=torch.Generator().manual_seed(3))
    for s, t in ((SCH.t_max, SCH.t_min), (0.7, 0.2), (0.3, 0.05), (0.05, SCH.t_min)):
        xs = GAUSS.marginal(SCH, s).sample(256, generator=torch.Generator().manual_seed(4))
        ref = gaussian_flow_map(GAUSS, SCH, xs, s, t)
        err = float((psi(xs, s, t) - ref).abs().max())
        # round-off: F is solved from (1) and put back, a few ulps of |x| / b amplified by the c_noise -> t inversion
        assert err < 1e-11 * (1 + float(ref.abs().max())), (s, t, err)
    d = semigroup_defect(psi, x, SCH.t_max, 0.3, SCH.t_min)
    assert d < 1e-11, d


def test_teacher_step_nfe_and_exact_on_gaussian_limit():
    field = GAUSS.field(SCH)
    x = GAUSS.marginal(SCH, 0.5).sample(32, generator=torch.Generator().manual_seed(5))
    n0 = field.nfe
    teacher_step(field, x, 0.5, 0.4, "ddim")
    assert field.nfe - n0 == 1
    teacher_step(field, x, 0.5, 0.4, "heun")
    assert field.nfe - n0 == 3
    # Heun's local error is O(h^3): halving the step divides it by ~8 (>= 5 allowed for the pre-asymptotic range)
    ref = lambda u: gaussian_flow_map(GAUSS, SCH, x, 0.5, u)  # noqa: E731
    e1 = float((teacher_step(field, x, 0.5, 0.46, "heun") - ref(0.46)).abs().max())
    e2 = float((teacher_step(field, x, 0.5, 0.48, "heun") - ref(0.48)).abs().max())
    assert e1 / e2 > 5, (e1, e2)


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_flow_map_sample_counts_nfe_exactly(k, noise):
    psi = FlowMap(_random_net(), SCH)
    x = torch.randn(16, 2, dtype=torch.float64)
    psi.nfe = 5
    res = flow_map_sample(psi, x, k, noise_reinjection=noise, generator=torch.Generator().manual_seed(0))
    assert res.nfe == k and psi.nfe == 5 + k
    assert res.x.shape == x.shape and len(res.grid) == k + 1
    assert float(res.grid[0]) == SCH.t_max and math.isclose(float(res.grid[-1]), SCH.t_min)


def test_deterministic_chain_is_composition():
    psi = FlowMap(_random_net(), SCH)
    x = torch.randn(16, 2, dtype=torch.float64)
    g = time_grid(SCH, 2, "logsnr")
    two = flow_map_sample(psi, x, 2).x
    manual = psi(psi(x, float(g[0]), float(g[1])), float(g[1]), float(g[2]))
    assert torch.equal(two, manual)


def test_consistency_distillation_reaches_teacher_discretisation_error():
    """CD's fixed point is the teacher's N-step composite map (Song et al. 2023, Thm 1: the consistency error is
    O((Delta t)^p) of the solver); so the one-step error of the student against the exact map should approach the
    teacher's own N-step error E_N = mean |Phi^DDIM_N(x_T) - Phi(x_T)|. Bound asserted: the student's distance to
    the teacher composite is < 0.1 E_N after 300 steps (measured 0.02-0.035 E_N over seeds 0-2), hence its error
    to Phi is within 1.1 E_N, while the untrained map's error is 5x E_N.
    E_N = 0.19 here (4 log-SNR-uniform DDIM steps on VPLinear)."""
    tg = targets.Gaussian([1.0], [[0.25]])
    field = tg.field(SCH)
    data = tg.sample(4096, generator=torch.Generator().manual_seed(1)).float()
    xT = tg.marginal(SCH, SCH.t_max).sample(1000, generator=torch.Generator().manual_seed(2))
    phi = gaussian_flow_map(tg, SCH, xT, SCH.t_max, SCH.t_min)
    N = 4
    g = time_grid(SCH, N, "logsnr")
    comp = xT.clone()
    for i in range(N):
        comp = teacher_step(field, comp, float(g[i]), float(g[i + 1]), "ddim")
    e_teacher = float((comp - phi).abs().mean())
    torch.manual_seed(0)
    psi = FlowMap(TwoTimeMLP(1, hidden=32, depth=2), SCH, sigma_data=0.5)
    e_init = float((flow_map_sample(psi, xT.float(), 1).x.double() - phi).abs().mean())
    n0 = field.nfe
    res = distill(psi, field, data, steps=300, batch=64, grid_steps=N, solver="ddim", lr=3e-3)
    assert res.teacher_calls == field.nfe - n0 == 300  # DDIM: one teacher call per step
    assert res.teacher_evals == 300 * 64
    out = flow_map_sample(res.psi, xT.float(), 1).x.double()
    e_student = float((out - phi).abs().mean())
    to_teacher = float((out - comp).abs().mean())
    assert e_init > 3 * e_teacher, (e_init, e_teacher)
    assert to_teacher < 0.1 * e_teacher, (to_teacher, e_teacher)
    assert e_student < 1.1 * e_teacher, (e_student, e_teacher)


def test_heun_teacher_costs_two_calls_per_step_and_ctm_runs():
    tg = targets.bimodal_1d()
    field = tg.field(SCH)
    data = tg.sample(512, generator=torch.Generator().manual_seed(1)).float()
    psi = FlowMap(TwoTimeMLP(1, hidden=8, depth=1), SCH)
    res = distill(psi, field, data, steps=7, batch=32, grid_steps=4, solver="heun", method="ctm")
    assert res.teacher_calls == 14 and res.teacher_evals == 14 * 32
    assert len(res.history) == 1 and math.isfinite(res.history[0]["loss"])
    with pytest.raises(ValueError, match="'xyz'"):
        distill(psi, field, data, steps=1, method="xyz")


def test_distill_from_learned_teacher_field():
    """Any VelocityField is a teacher: here an (untrained) MLP through training.learned_field, float32 network."""
    from diffusion_lab.models import MLPScore
    from diffusion_lab.training import learned_field

    torch.manual_seed(0)
    teacher = learned_field(MLPScore(2, hidden=16, depth=1), SCH, "eps")
    data = targets.ring8().sample(256, generator=torch.Generator().manual_seed(1)).float()
    psi = FlowMap(TwoTimeMLP(2, hidden=8, depth=1), SCH)
    res = distill(psi, teacher, data, steps=3, batch=16, grid_steps=4, solver="ddim")
    assert res.teacher_calls == 3 and res.psi_ema.nfe == 0
    out = flow_map_sample(res.psi_ema, torch.randn(8, 2), 2)
    assert out.nfe == 2 and torch.isfinite(out.x).all()
    with pytest.raises(ValueError, match="schedule"):
        distill(FlowMap(TwoTimeMLP(2, hidden=8, depth=1), VPLinear(beta_max=10.0)), teacher, data, steps=1)


def test_consistency_distances_closed_form():
    from diffusion_lab.flowmap import distance

    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.zeros_like(a)
    assert torch.equal(distance(a, b, "l2"), torch.tensor([25.0, 0.0], dtype=torch.float64))
    c = 0.00054 * math.sqrt(2)
    ph = distance(a, b, "pseudo_huber")
    assert abs(float(ph[0]) - (math.sqrt(25 + c * c) - c)) < 1e-15 and float(ph[1]) == 0.0
    # small residuals: ~ r^2 / (2c), to full relative precision (the naive sqrt(r^2 + c^2) - c keeps ~4 digits here)
    r = torch.tensor([[1e-6, 0.0]], dtype=torch.float64)
    small = float(distance(r, torch.zeros_like(r), "pseudo_huber", c=1.0))
    assert math.isclose(small, 0.5e-12 * (1 - 0.25e-12), rel_tol=1e-14)
    with pytest.raises(ValueError, match="'l1'"):
        distance(a, b, "l1")
    tg = targets.bimodal_1d()
    data = tg.sample(256, generator=torch.Generator().manual_seed(1)).float()
    res = distill(FlowMap(TwoTimeMLP(1, hidden=8, depth=1), SCH), tg.field(SCH), data, steps=3, batch=16,
                  grid_steps=4, solver="ddim", loss="pseudo_huber")
    assert res.settings["loss"] == "pseudo_huber" and math.isfinite(res.history[-1]["loss"])


# ---- consistency training (no teacher) ------------------------------------------------------------------------------

def test_ct_curriculum_closed_form():
    """N(k) = min(s0 2^floor(k/K'), s1), K' = floor(K/(log2 floor(s1/s0) + 1)) (Song & Dhariwal 2023): K = 1000,
    s0 = 10, s1 = 1280 gives K' = 125 and the doublings 10, 20, ..., 1280 at k = 0, 125, ..., 875."""
    from diffusion_lab.flowmap import ct_steps

    assert [ct_steps(k, 1000) for k in (0, 124, 125, 249, 250, 874, 875, 999)] == [10, 10, 20, 20, 40, 640, 1280, 1280]
    assert ct_steps(5, 8, 10, 1280) == 320  # K' = 8 // 8 = 1: one doubling per step, 10 * 2^5
    assert ct_steps(3, 4, 16, 16) == 16  # s0 = s1: a fixed discretisation
    with pytest.raises(ValueError, match="s0 <= s1"):
        ct_steps(0, 10, 20, 10)


def test_ct_level_probabilities_are_lognormal_masses():
    """p(n) is the N(P_mean, P_std^2) mass of (log sigmabar_{n-1}, log sigmabar_n], renormalised to the grid: compared
    with scipy's normal CDF (independent of the erf form) to 1e-12."""
    from scipy.stats import norm

    from diffusion_lab.flowmap import ct_level_probabilities

    g = time_grid(SCH, 40, "karras").flip(0)
    sb = SCH.sigma(g) / SCH.alpha(g)
    p = ct_level_probabilities(sb, -0.4, 2.0)
    cdf = torch.from_numpy(norm.cdf((torch.log(sb).numpy() + 0.4) / 2.0))
    ref = (cdf[1:] - cdf[:-1]) / (cdf[-1] - cdf[0])
    assert torch.allclose(p, ref, rtol=1e-10, atol=1e-12) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-14)
    with pytest.raises(ValueError, match="increasing"):
        ct_level_probabilities(sb.flip(0))


def test_ct_trains_without_teacher_with_the_published_recipe():
    tg = targets.bimodal_1d()
    data = tg.sample(512, generator=torch.Generator().manual_seed(1)).float()
    sd = float(data.std())
    psi = FlowMap(TwoTimeMLP(1, hidden=8, depth=1), SCH, sigma_data=sd)
    res = distill(psi, None, data, steps=8, batch=16, method="ct", log_every=4)
    st = res.settings
    assert res.teacher_calls == 0 and res.teacher_evals == 0
    assert st["loss"] == "pseudo_huber" and st["target_decay"] == 0.0 and st["grid_kind"] == "karras"
    assert math.isclose(st["p_mean"], -1.1 + math.log(sd / 0.5), rel_tol=1e-12) and st["p_std"] == 2.0
    assert math.isclose(st["huber_c"], 0.00054 * sd / 0.5, rel_tol=1e-12)  # D = 1
    # 8 steps: K' = 1, so the curriculum has doubled from 10 to 80 intervals by the last logged block
    assert [h["grid_steps"] for h in res.history] == [80, 1280] and all(math.isfinite(h["loss"]) for h in res.history)
    with pytest.raises(ValueError, match="teacher"):
        distill(psi, None, data, steps=1, method="cd")


def test_ct_objective_stationary_at_exact_consistency_function():
    """The catalogue check's quantity: the weighted stop-gradient CT derivative is O(gap) at the exact Gaussian
    consistency function (ratio to the perturbed one's < 1e-3 at gap 1e-5; measured 6.5e-5) and O(1) when the
    pair does not share its noise (a planted error)."""
    from theory_checks.reflow_checks import ct_stationary_residual

    assert ct_stationary_residual().residual < 1e-3
    assert ct_stationary_residual(same_noise=False).residual > 0.5


def test_consistency_training_loss_closed_form():
    """On a 1-D Gaussian with the exact (affine) consistency function f*, the l2 CT loss at a fixed pair of levels
    is E[(k_s (x_s - alpha_s m) - k_u (xhat - alpha_u m))^2] with k_r = sqrt(v_min)/sqrt(v_r),
    v_r = alpha_r^2 v + sigma_r^2;
    with x_0 = m + sqrt(v) y this is (k_s alpha_s - k_u alpha_u)^2 v + (k_s sigma_s - k_u sigma_u)^2, checked on
    3 x 3 Gauss-Hermite nodes (exact for the quadratic integrand)."""
    import numpy as np

    from diffusion_lab.flowmap import consistency_training_loss

    m, v = 0.7, 0.3
    tg = targets.Gaussian([m], [[v]])

    class Exact:
        schedule = SCH

        def __call__(self, x, s, t):
            return gaussian_flow_map(tg, SCH, x, float(s), float(t))

    nodes, w = np.polynomial.hermite_e.hermegauss(3)
    Y, Z = np.meshgrid(nodes, nodes, indexing="ij")
    W = torch.from_numpy(np.outer(w, w).reshape(-1) / (2 * math.pi))
    x0 = torch.from_numpy(m + math.sqrt(v) * Y.reshape(-1))[:, None]
    z = torch.from_numpy(Z.reshape(-1))[:, None]
    s, u = 0.4, 0.3
    got = float((W * consistency_training_loss(Exact(), x0, z, s, u)).sum())
    T = lambda r: torch.tensor(r, dtype=torch.float64)  # noqa: E731
    a = {r: float(SCH.alpha(T(r))) for r in (s, u, SCH.t_min)}
    sg = {r: float(SCH.sigma(T(r))) for r in (s, u, SCH.t_min)}
    k = {r: math.sqrt((a[SCH.t_min] ** 2 * v + sg[SCH.t_min] ** 2) / (a[r] ** 2 * v + sg[r] ** 2)) for r in (s, u)}
    ref = (k[s] * a[s] - k[u] * a[u]) ** 2 * v + (k[s] * sg[s] - k[u] * sg[u]) ** 2
    assert math.isclose(got, ref, rel_tol=1e-10), (got, ref)
    with pytest.raises(ValueError, match="u < s"):
        consistency_training_loss(Exact(), x0, z, 0.3, 0.4)


def test_python_float_times_with_float32_x_on_rectified_flow():
    """Python-float times are read in float64: t_max = 0.999 of the rectified-flow schedule rounds to 0.99900001 in
    float32, which the range check would refuse; the map must accept the schedule's own end points."""
    sch = RectifiedFlow()
    psi = FlowMap(TwoTimeMLP(2, hidden=8, depth=1), sch, 0.5)
    x = torch.randn(4, 2)
    y = psi(x, sch.t_max, sch.t_min)
    assert y.shape == x.shape and y.dtype == torch.float32 and bool(torch.isfinite(y).all())
    assert torch.equal(psi(x, sch.t_max, sch.t_max), x)  # the boundary condition at the end point itself
