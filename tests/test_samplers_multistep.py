"""Linear multistep samplers (lms, plms, pndm, ipndm, deis) against their reference implementations, closed forms
and measured orders.

Peers run on the same grid with the same exact model: k-diffusion's ``sample_lms`` (float64 throughout, so
agreement to round-off), diffusers' PNDM / DEIS schedulers on ``DDPMDiscrete`` (timestep k <-> t = (k + 1)/1000;
diffusers keeps its schedule in float32, so agreement to ~1e-6 as shipped, and to round-off once its schedule
tensors are replaced by our float64 ones) and diffusers' IPNDM step (which carries its own schedule and
v-prediction; we give it our alpha, sigma and the exact v = alpha eps - sigma x0).
"""
import math

import numpy as np
import pytest
import torch

from diffusion_lab import schedules, targets
from diffusion_lab.reference import quantile_flow_map
from diffusion_lab.samplers import get_method, sample, time_grid
from diffusion_lab.samplers.multistep import AB_WEIGHTS, deis_weights, lagrange_weights
from _peers import k_diffusion_sampling

METHODS = ["lms", "plms", "pndm", "ipndm", "deis"]

VARIANTS = [
    ("lms", {}), ("lms", {"order": 1}), ("lms", {"order": 2}), ("lms", {"order": 3}),
    ("plms", {}), ("plms", {"order": 2}), ("plms", {"order": 3}),
    ("pndm", {}), ("pndm", {"midpoint": "sigmabar"}),
    ("ipndm", {}), ("ipndm", {"order": 1}), ("ipndm", {"order": 3}),
    ("deis", {}), ("deis", {"order": 1}), ("deis", {"order": 2}), ("deis", {"order": 4}),
    ("deis", {"variant": "logrho"}), ("deis", {"lower_order_final": True}),
]

# diffusers' DEIS calls np.log on torch scalars (a NumPy 2 deprecation warning per call)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

DIFFUSERS_COMMON = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        prediction_type="epsilon")


def _setup(schedule, n=32, seed=0, target=None, t=None):
    tg = target or targets.ring8()
    field = tg.field(schedule)
    x = tg.marginal(schedule, schedule.t_max if t is None else t).sample(n, torch.Generator().manual_seed(seed))
    return tg, field, x


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- k-diffusion -------------------------------------------------------------------------------------------------

def _k_diffusion_sampling():
    return k_diffusion_sampling()


@pytest.mark.parametrize("schedule", [schedules.EDM(), schedules.VE()], ids=lambda s: s.name)
def test_lms_equals_k_diffusion_sample_lms(schedule):
    """alpha = 1: x is k-diffusion's state; its denoiser is ours at the time of each sigma; same sigma list."""
    kd = _k_diffusion_sampling()
    _, field, x = _setup(schedule)
    grid = time_grid(schedule, 12, "karras")
    sigmas = schedule.sigma(grid)

    def model(xx, s):
        t = schedule.t_from_lam(-torch.log(s[0].to(torch.float64)))
        return field.denoiser(xx, t)

    for order in (1, 2, 3, 4):
        ref = kd.sample_lms(model, x.clone(), sigmas, disable=True, order=order)
        ours = sample(field, x, "lms", grid=grid, order=order).x
        # both float64; k-diffusion's quad is exact on these cubic integrands to ~1e-15
        assert _rel(ours, ref) < 1e-12, order
    # the weights themselves: k-diffusion's linear_multistep_coeff vs the Gauss-Legendre integrals
    s = sigmas.tolist()
    for i in range(3, 8):
        ref_c = [kd.linear_multistep_coeff(4, s, i, j) for j in range(4)]
        ours_c = [c * (s[i + 1] - s[i]) for c in lagrange_weights([s[i - j] for j in range(4)], s[i], s[i + 1])]
        np.testing.assert_allclose(ours_c, ref_c, rtol=1e-10, atol=1e-13)


# -- diffusers ---------------------------------------------------------------------------------------------------

def _run_diffusers(scheduler, field, x):
    """A diffusers sampling loop with the exact eps model at t = (k + 1)/1000; returns (x, model call times)."""
    calls = []
    for k in scheduler.timesteps:
        t = torch.tensor((int(k) + 1) / 1000, dtype=torch.float64)
        calls.append(round(float(t), 12))
        x = scheduler.step(field.eps(x, t), k, x).prev_sample
    return x, calls


@pytest.mark.parametrize("n_steps", [10, 20])
@pytest.mark.parametrize("method,skip_prk", [("plms", True), ("pndm", False)])
def test_plms_pndm_equal_diffusers(method, skip_prk, n_steps):
    diffusers = pytest.importorskip("diffusers")
    sch = schedules.DDPMDiscrete()
    _, field, x = _setup(sch)
    # trailing spacing with N | 1000: states at t = 1, 1 - 1/N, ..., 1/N and finally timestep 0 (t = 1/1000)
    grid = torch.tensor([1.0 - i / n_steps for i in range(n_steps)] + [1e-3], dtype=torch.float64)
    res = sample(field, x, method, grid=grid)
    for float64_schedule in (False, True):
        s = diffusers.PNDMScheduler(**DIFFUSERS_COMMON, timestep_spacing="trailing", skip_prk_steps=skip_prk)
        s.set_timesteps(n_steps)
        if float64_schedule:
            s.alphas_cumprod = sch.alphas_cumprod.clone()
            s.final_alpha_cumprod = sch.alphas_cumprod[0].clone()
        ref, calls = _run_diffusers(s, field, x.clone())
        assert len(calls) == res.nfe == get_method(method).nfe_of_steps(n_steps)
        # float32 alphas_cumprod (relative error ~1e-7) -> ~1e-6; float64 -> round-off
        assert _rel(res.x, ref) < (1e-12 if float64_schedule else 1e-5), (float64_schedule, _rel(res.x, ref))


@pytest.mark.parametrize("n_steps", [10, 25])
@pytest.mark.parametrize("order,lower_order_final", [(1, False), (2, True), (3, True), (3, False)])
def test_deis_logrho_equals_diffusers(order, lower_order_final, n_steps):
    diffusers = pytest.importorskip("diffusers")
    sch = schedules.DDPMDiscrete()
    _, field, x = _setup(sch)
    for float64_schedule in (False, True):
        s = diffusers.DEISMultistepScheduler(**DIFFUSERS_COMMON, timestep_spacing="trailing", solver_order=order,
                                             lower_order_final=lower_order_final)
        s.set_timesteps(n_steps)
        grid = torch.tensor([(int(k) + 1) / 1000 for k in s.timesteps] + [1e-3], dtype=torch.float64)
        if float64_schedule:
            s.sigmas = torch.exp(-sch.lam(grid))  # its sigmas are sigma/alpha, kept in float32
        ref, calls = _run_diffusers(s, field, x.clone())
        res = sample(field, x, "deis", grid=grid, order=order, variant="logrho", lower_order_final=lower_order_final)
        assert len(calls) == res.nfe == n_steps
        # float32 sigmas enter differences of logs in the order-3 weights: up to ~3e-5 measured
        tol = 1e-12 if float64_schedule else (1e-4 if order == 3 else 1e-5)
        assert _rel(res.x, ref) < tol, (float64_schedule, _rel(res.x, ref))


@pytest.mark.parametrize("schedule", [schedules.DDPMDiscrete(), schedules.VPLinear()], ids=lambda s: s.name)
def test_ipndm_equals_diffusers_step(schedule):
    diffusers = pytest.importorskip("diffusers")
    _, field, x = _setup(schedule)
    for n_steps in (2, 3, 7, 20):
        grid = time_grid(schedule, n_steps, "logsnr")
        s = diffusers.IPNDMScheduler()
        s.set_timesteps(n_steps)
        s.alphas, s.betas = schedule.alpha(grid), schedule.sigma(grid)  # its (alpha, sigma) table
        s.set_begin_index(0)
        y = x.clone()
        for i, k in enumerate(s.timesteps):
            x0, eps = field.x0_eps(y, grid[i])
            y = s.step(s.alphas[i] * eps - s.betas[i] * x0, k, y).prev_sample  # v-prediction on VP
        # its DDIM step goes through x0 = (x - sigma eps)/alpha (alpha(t_max) ~ 0.007): 1e-11 round-off
        assert _rel(sample(field, x, "ipndm", grid=grid).x, y) < 1e-10, n_steps


# -- identities between the methods ------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.VE(), schedules.RectifiedFlow()],
                         ids=lambda s: s.name)
def test_first_order_members_are_ddim(schedule):
    _, field, x = _setup(schedule)
    grid = time_grid(schedule, 9, "logsnr")
    ref = sample(field, x, "ddim", grid=grid).x
    for method, opts in [("lms", {"order": 1}), ("ipndm", {"order": 1}), ("deis", {"order": 1}),
                         ("deis", {"order": 1, "variant": "logrho"})]:
        assert _rel(sample(field, x, method, grid=grid, **opts).x, ref) < 1e-12, (method, opts)


def test_deis_tab_is_lms_on_edm_and_logrho_on_ve():
    """tAB interpolates in the schedule's time: on EDM t = sigma/alpha (lms's variable), on VE t is affine in
    log sigma (diffusers' log-rho variable); Lagrange interpolation is invariant under affine changes."""
    for order in (2, 3, 4):
        sch = schedules.EDM()
        _, field, x = _setup(sch)
        grid = time_grid(sch, 11, "karras")
        a = sample(field, x, "deis", grid=grid, order=order).x
        assert _rel(a, sample(field, x, "lms", grid=grid, order=order).x) < 1e-11, order
        sch = schedules.VE()
        _, field, x = _setup(sch)
        grid = time_grid(sch, 11, "logsnr")
        a = sample(field, x, "deis", grid=grid, order=order).x
        assert _rel(a, sample(field, x, "deis", grid=grid, order=order, variant="logrho").x) < 1e-11, order
    # and they differ where the variables differ
    sch = schedules.VPLinear()
    _, field, x = _setup(sch)
    grid = time_grid(sch, 11, "logsnr")
    outs = [sample(field, x, "deis", grid=grid).x, sample(field, x, "deis", grid=grid, variant="logrho").x,
            sample(field, x, "lms", grid=grid, order=3).x]
    assert min(_rel(outs[0], outs[1]), _rel(outs[0], outs[2]), _rel(outs[1], outs[2])) > 1e-4


def test_ipndm_is_lms_on_a_sigmabar_uniform_grid():
    """Variable-step Adams-Bashforth weights reduce to the constant ones when sigma/alpha steps are equal."""
    sch = schedules.VPLinear()
    _, field, x = _setup(sch, t=0.5)
    grid = time_grid(sch, 10, "karras", rho=1.0, t_max=0.5)
    a = sample(field, x, "ipndm", grid=grid).x
    assert _rel(a, sample(field, x, "lms", grid=grid).x) < 1e-11
    assert _rel(a, sample(field, x, "lms", grid=time_grid(sch, 10, "logsnr", t_max=0.5)).x) > 1e-4


def test_pndm_warm_up_is_rk4_in_edm_coordinates():
    """With the midpoint in sigma/alpha, the pseudo Runge-Kutta step is classical RK4 in (x/alpha, sigma/alpha);
    with the time midpoint (default) it is not (except on EDM, where t = sigma/alpha)."""
    sch = schedules.VPLinear()
    _, field, x = _setup(sch)
    grid = time_grid(sch, 3, "logsnr")
    rk4 = sample(field, x, "rk4", grid=grid, coords="edm").x
    assert _rel(sample(field, x, "pndm", grid=grid, midpoint="sigmabar").x, rk4) < 1e-12
    assert _rel(sample(field, x, "pndm", grid=grid).x, rk4) > 1e-5


def test_plms_order_2_is_s_pndm():
    """S-PNDM: improved Euler first, then (3 e_i - e_{i-1})/2; the orders part from step 2 (0-based) on."""
    sch = schedules.VPLinear()
    _, field, x = _setup(sch)
    grid = time_grid(sch, 2, "logsnr")
    assert torch.equal(sample(field, x, "plms", grid=grid, order=2).x, sample(field, x, "plms", grid=grid, order=3).x)
    grid = time_grid(sch, 6, "logsnr")
    assert _rel(sample(field, x, "plms", grid=grid, order=2).x, sample(field, x, "plms", grid=grid).x) > 1e-5


# -- weights -----------------------------------------------------------------------------------------------------

def _tab_reference(sch, g, lam, i, k, integrate):
    """C_ij / Delta sigmabar from int_{t_i}^{t_{i+1}} (d sigmabar/d tau) L_j(tau) d tau, integrated in t (the
    official formulation): scipy's adaptive quad on smooth schedules; on the discrete schedule, whose d lambda/dt
    jumps at every knot, 6-point Gauss-Legendre in t on each knot interval (vectorised)."""
    nodes = [g[i - j] for j in range(k)]
    basis = lambda tau, j: math.prod((tau - nodes[m]) / (nodes[j] - nodes[m]) for m in range(k) if m != j)
    scale = math.exp(-lam[i + 1]) - math.exp(-lam[i])
    if hasattr(sch, "knots"):
        pts = np.array([g[i + 1]] + [p for p in sch.knots() if g[i + 1] < p < g[i]] + [g[i]])
        xg, wg = np.polynomial.legendre.leggauss(6)
        a, b = pts[:-1, None], pts[1:, None]
        tau = (0.5 * (a + b) + 0.5 * (b - a) * xg).ravel()
        w = (0.5 * (b - a) * wg).ravel()
        tt = torch.from_numpy(tau)
        dsb = (-sch.dlam(tt) * torch.exp(-sch.lam(tt))).numpy()
        return [-float(np.sum(w * dsb * basis(tau, j))) / scale for j in range(k)]
    dsb = lambda tau: float(-sch.dlam(torch.tensor(tau, dtype=torch.float64))
                            * torch.exp(-sch.lam(torch.tensor(tau, dtype=torch.float64))))
    return [-integrate.quad(lambda tau: dsb(tau) * basis(tau, j), g[i + 1], g[i], limit=200, epsabs=0,
                            epsrel=1e-12)[0] / scale for j in range(k)]


def test_deis_tab_weights_against_quadrature_in_t():
    """Our tAB weights (Gauss-Legendre in lambda, knots as break points) against quadrature in t."""
    integrate = pytest.importorskip("scipy.integrate")
    for sch, kind in ((schedules.VPLinear(), "logsnr"), (schedules.RectifiedFlow(), "uniform"),
                      (schedules.VPCosine(), "logsnr"), (schedules.DDPMDiscrete(), "logsnr"),
                      (schedules.DDPMDiscrete(), "uniform")):
        grid = time_grid(sch, 8, kind)
        g = grid.tolist()
        lam = sch.lam(grid).tolist()
        for i in (3, 7):
            ours = deis_weights(sch, g, lam, i, 4, "tab")
            np.testing.assert_allclose(ours, _tab_reference(sch, g, lam, i, 4, integrate), rtol=1e-9, atol=1e-10,
                                       err_msg=f"{sch.name} {kind} step {i}")
            assert abs(sum(ours) - 1.0) < 1e-12


def test_deis_weights_converged_in_the_number_of_nodes():
    for sch in (schedules.VPLinear(), schedules.RectifiedFlow(), schedules.VE()):
        for kind in ("logsnr", "uniform", "karras"):
            grid = time_grid(sch, 6, kind)
            g, lam = grid.tolist(), sch.lam(grid).tolist()
            for i in range(1, 6):
                for variant in ("tab", "logrho"):
                    a = deis_weights(sch, g, lam, i, min(4, i + 1), variant)
                    b = deis_weights(sch, g, lam, i, min(4, i + 1), variant, n_quad=96)
                    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_constant_weights_are_the_uniform_step_lagrange_integrals():
    for k, w in AB_WEIGHTS.items():
        np.testing.assert_allclose(lagrange_weights([-float(j) for j in range(k)], 0.0, 1.0), w, rtol=1e-13)


# -- orders on the exact 1-D flow map ----------------------------------------------------------------------------

def _slope(method, ns, t_max=1.0, schedule=None, grid_kind="logsnr", rho=7.0, **options):
    sch = schedule or schedules.VPLinear()
    tg = targets.bimodal_1d()
    field = tg.field(sch)
    x = tg.marginal(sch, t_max).sample(128, torch.Generator().manual_seed(0))
    exact = quantile_flow_map(tg, sch, x, t_max, sch.t_min)
    errs = [float((sample(field, x, method, grid=time_grid(sch, n, grid_kind, rho=rho, t_max=t_max), **options).x
                   - exact).abs().mean()) for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("method,options,ns,t_max,order", [
    ("ipndm", {}, (32, 64, 128), 1.0, 2),                  # constant weights on a log-SNR grid
    ("plms", {}, (32, 64, 128), 1.0, 2),
    ("pndm", {}, (32, 64, 128), 1.0, 2),
    ("lms", {"order": 2}, (32, 64, 128), 1.0, 2),
    ("deis", {"order": 2}, (32, 64, 128), 1.0, 2),
    ("deis", {"order": 3}, (128, 256, 512), 1.0, 3),       # eps barely moves over the warm-up from t_max = 1
    ("lms", {}, (64, 128, 256), 0.4, 2),                   # first-order warm-up sets the order where eps moves
    ("deis", {"order": 3}, (64, 128, 256), 0.4, 2),
])
def test_measured_order(method, options, ns, t_max, order):
    slope, errs = _slope(method, ns, t_max, **options)
    assert abs(slope - order) < 0.15, (method, options, slope, errs)


def test_pndm_is_fourth_order_on_a_sigmabar_uniform_grid():
    """On EDM from sigma = 2 to 0.2 with sigma-uniform steps PNDM's constant weights are the exact ones and its
    Runge-Kutta warm-up is RK4: order 4; on the log-SNR grid of the same range: order 2."""
    sch = schedules.EDM(t_min=0.2, t_max=2.0)
    s_uni, e_uni = _slope("pndm", (16, 32, 64, 128), 2.0, sch, "karras", rho=1.0)  # measured 4.1
    s_log, e_log = _slope("pndm", (32, 64, 128), 2.0, sch, "logsnr")               # measured 1.9
    assert abs(s_uni - 4) < 0.3 and abs(s_log - 2) < 0.15, (s_uni, e_uni, s_log, e_log)


def test_registered_orders_and_family():
    expected = {"lms": 4, "plms": 2, "pndm": 2, "ipndm": 2, "deis": 3}
    for name, order in expected.items():
        info = get_method(name)
        assert info.order == order and info.family == "multistep" and not info.stochastic, name


# -- NFE, options, dtypes, schedules -----------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", VARIANTS)
def test_nfe_is_declared(method, options):
    _, field, x = _setup(schedules.VPLinear(), n=4)
    info = get_method(method)
    for n in (1, 2, 3, 4, 5, 12):
        res = sample(field, x, method, steps=n, **options)
        assert res.nfe == info.nfe_of_steps(n), (method, options, n, res.nfe)


def test_nfe_values():
    assert [get_method(m).nfe_of_steps(10) for m in METHODS] == [10, 11, 19, 10, 10]
    assert [get_method("pndm").nfe_of_steps(n) for n in (1, 2, 3, 4)] == [4, 8, 12, 13]


def test_bad_options_raise_with_value():
    _, field, x = _setup(schedules.VPLinear(), n=4)
    for method, opts, needle in [("lms", {"order": 5}, "order=5"), ("lms", {"order": 2.5}, "order=2.5"),
                                 ("plms", {"order": 1}, "order=1"), ("ipndm", {"order": 0}, "order=0"),
                                 ("deis", {"order": 5}, "order=5"), ("deis", {"variant": "rab"}, "'rab'"),
                                 ("deis", {"n_quad": 1}, "n_quad=1"), ("pndm", {"midpoint": "lambda"}, "'lambda'")]:
        with pytest.raises(ValueError, match=needle):
            sample(field, x, method, steps=3, **opts)


@pytest.mark.parametrize("schedule", [schedules.VPLinear(), schedules.VE(), schedules.EDM(), schedules.RectifiedFlow()],
                         ids=lambda s: s.name)
def test_runs_on_schedules_in_float32_and_float64(schedule):
    tg, field, x = _setup(schedule, n=16, target=targets.bimodal_1d())
    exact = quantile_flow_map(tg, schedule, x, schedule.t_max, schedule.t_min)
    for method in METHODS:
        x64 = sample(field, x, method, steps=24).x
        x32 = sample(field, x.float(), method, steps=24).x
        assert x64.dtype == torch.float64 and x32.dtype == torch.float32, method
        torch.testing.assert_close(x32.double(), x64, rtol=1e-4, atol=1e-4, msg=method)
        e8 = float((sample(field, x, method, steps=8).x - exact).abs().mean())
        assert float((x64 - exact).abs().mean()) < e8, method


@pytest.mark.parametrize("method", METHODS)
def test_callback_and_trajectory(method):
    _, field, x = _setup(schedules.VPLinear(), n=4)
    seen = []
    x_out, _ = get_method(method).fn(field, x, time_grid(field.schedule, 5),
                                     callback=lambda i, xx: seen.append((i, xx.clone())))
    assert [i for i, _ in seen] == [1, 2, 3, 4, 5] and torch.equal(seen[-1][1], x_out)
    res = sample(field, x, method, steps=5, return_trajectory=True)
    assert res.trajectory.shape == (6, *x.shape) and torch.equal(res.trajectory[-1], res.x)


def test_exact_for_point_mass():
    """Dirac data: eps_hat is constant along the flow, so every method (DDIM transfer of a weighted mean of equal
    eps's) is exact. (With N = 1 the single step spans lambda from -5 to 4.6, and the Runge-Kutta stages of
    plms / pndm amplify round-off by e^h ~ 1.5e4 per stage: 4e-7; hence N >= 3.)"""
    mu = torch.tensor([[0.7, -1.2]], dtype=torch.float64)
    point = targets.GaussianMixture([1.0], mu, 1e-16 * torch.eye(2, dtype=torch.float64)[None], name="point")
    sch = schedules.VPLinear()
    _, field, x = _setup(sch, n=8, target=point)
    a_T, s_T = float(sch.alpha(sch.t_max)), float(sch.sigma(sch.t_max))
    a_0, s_0 = float(sch.alpha(sch.t_min)), float(sch.sigma(sch.t_min))
    exact = a_0 * mu + s_0 / s_T * (x - a_T * mu)
    for method, options in VARIANTS:
        for n in (3, 6):
            out = sample(field, x, method, steps=n, **options).x
            assert float((out - exact).norm(dim=1).max()) < 1e-8, (method, options, n)
