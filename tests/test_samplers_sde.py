"""Stochastic samplers (diffusion_lab/samplers/sde.py) against closed forms, exact identities and each other.

Tolerances: float64 algebra identities use rtol 1e-12 (exact class); Monte Carlo comparisons use 5 standard
errors against the EXACT law of the discretised sampler (Gaussian data make every step affine), so
the O(h) bias is not part of the MC tolerance; the bias itself is checked separately against p_{t_min}.
"""
import math

import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.samplers import get_method, sample, time_grid
from diffusion_lab.samplers.sde import (brownian_increments, ddpm_posterior_coefficients, em_coefficients,
                                        make_brownian)
from theory_checks.solvers_sde import _exact_marginal, gaussian_w2, sampler_gaussian_law

SCHEDULES = [S.VPLinear(), S.VPCosine(), S.SubVP(), S.VE(), S.EDM(), S.RectifiedFlow()]


def _prior(schedule, n, d=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = float(schedule.sigma(torch.tensor(schedule.t_max, dtype=torch.float64)))
    return torch.randn(n, d, dtype=dtype, generator=g) * s


def _relmax(a, b):
    return float((a - b).abs().max() / b.abs().max())


# -- laws on Gaussian data: Monte Carlo against the exact discrete law, and the O(h) bias ---------------------

@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_em_gaussian_moments_mc_and_bias(gamma):
    target, sch = T.gaussian_2d(), S.VPLinear()
    field = target.field(sch)
    n_steps, batch = 40, 20000
    grid = time_grid(sch, n_steps, "uniform")
    m0, C0 = _exact_marginal(target, sch, sch.t_max)
    g = torch.Generator().manual_seed(11)
    x = m0 + torch.randn(batch, 2, dtype=torch.float64, generator=g) @ torch.linalg.cholesky(C0).T
    out = sample(field, x, "em", grid=grid, gamma=gamma, generator=g).x
    m_law, C_law = sampler_gaussian_law(field, "em", grid, m0, C0, gamma=gamma)
    # sample mean: SE = sqrt(C_jj/n); sample covariance entry: SE = sqrt((C_jj C_kk + C_jk^2)/n) (Gaussian)
    se_m = torch.sqrt(torch.diagonal(C_law) / batch)
    assert ((out.mean(0) - m_law).abs() <= 5 * se_m).all(), (out.mean(0), m_law, se_m)
    dC = torch.diagonal(C_law)
    se_C = torch.sqrt((dC[:, None] * dC[None, :] + C_law**2) / batch)
    assert ((torch.cov(out.T) - C_law).abs() <= 5 * se_C).all(), (torch.cov(out.T), C_law, se_C)
    # the discretisation bias against the exact p_{t_min}: small and first order (halves with h)
    m_ref, C_ref = _exact_marginal(target, sch, sch.t_min)
    w = gaussian_w2(m_law, C_law, m_ref, C_ref)
    m2, C2 = sampler_gaussian_law(field, "em", time_grid(sch, 2 * n_steps, "uniform"), m0, C0, gamma=gamma)
    w_half = gaussian_w2(m2, C2, m_ref, C_ref)
    assert w < 3.0 / n_steps
    assert 1.7 < w / w_half < 2.3, (w, w_half)


def test_ddpm_ancestral_and_edm_churn_laws_converge():
    target, sch = T.gaussian_2d(), S.VPLinear()
    field = target.field(sch)
    m0, C0 = _exact_marginal(target, sch, sch.t_max)
    m_ref, C_ref = _exact_marginal(target, sch, sch.t_min)
    for method, opts in (("ddpm_ancestral", {}), ("edm_sde", {"S_churn": 10.0})):
        errs = [gaussian_w2(*sampler_gaussian_law(field, method, time_grid(sch, n, "quadratic"), m0, C0, **opts),
                            m_ref, C_ref) for n in (32, 64)]
        assert errs[1] < 0.6 * errs[0] and errs[1] < 0.08, (method, errs)


def test_sampler_law_matches_closed_form_em_recursion():
    from theory_checks.solvers_sde import em_law_residual

    assert em_law_residual(gamma=1.3, n=17) < 1e-12


# -- exact identities --------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_em_gamma0_is_ode_euler(schedule):
    field = T.ring8().field(schedule)
    x = _prior(schedule, 200)
    a = sample(field, x, "em", steps=15, gamma=0.0).x
    b = sample(field, x, "euler", steps=15).x
    assert _relmax(a, b) < 1e-12


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s.name)
def test_edm_sde_churn0_is_heun_edm(schedule):
    field = T.ring8().field(schedule)
    x = _prior(schedule, 200)
    a = sample(field, x, "edm_sde", steps=10, grid_kind="karras", S_churn=0.0)
    b = sample(field, x, "heun", steps=10, grid_kind="karras", coords="edm")
    assert _relmax(a.x, b.x) < 1e-12
    assert a.nfe == b.nfe == 19


def test_edm_sde_on_edm_schedule_is_karras_alg2_step():
    """One churned step by hand (Karras et al. 2022 Alg. 2 lines 5-8, alpha = 1, sigma = t): last step Euler."""
    sch = S.EDM()
    field = T.ring8().field(sch)
    x = _prior(sch, 50)
    grid = torch.tensor([40.0, 10.0], dtype=torch.float64)
    z = torch.randn(1, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = sample(field, x, "edm_sde", grid=grid, S_churn=0.2, noise=z).x
    t_hat = 40.0 * 1.2
    x_hat = x + math.sqrt(t_hat**2 - 40.0**2) * z[0]
    d = (x_hat - T.ring8().denoiser(x_hat, torch.tensor(t_hat, dtype=torch.float64), sch)) / t_hat
    assert _relmax(out, x_hat + (10.0 - t_hat) * d) < 1e-12


@pytest.mark.parametrize("schedule", [S.VPLinear(), S.EDM(), S.RectifiedFlow()], ids=lambda s: s.name)
def test_ddim_eta1_equals_ddpm_ancestral(schedule):
    try:
        get_method("ddim")
    except ValueError:
        pytest.skip("method 'ddim' is not registered yet")
    field = T.ring8().field(schedule)
    x = _prior(schedule, 300)
    noise = torch.randn(25, *x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    a = sample(field, x, "ddim", steps=25, eta=1.0, noise=noise).x
    b = sample(field, x, "ddpm_ancestral", steps=25, noise=noise).x
    assert _relmax(a, b) < 1e-12


def test_ddpm_posterior_coefficients_are_ho_et_al_on_vp():
    sch = S.VPLinear()
    grid = time_grid(sch, 30, "logsnr")
    A, B, C = (torch.tensor(v, dtype=torch.float64) for v in ddpm_posterior_coefficients(sch, grid))
    abar = sch.alpha(grid) ** 2
    ab_t, ab_s = abar[:-1], abar[1:]
    beta = 1.0 - ab_t / ab_s
    assert _relmax(A, torch.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)) < 1e-12
    assert _relmax(B, torch.sqrt(ab_s) * beta / (1 - ab_t)) < 1e-12
    assert _relmax(C**2, (1 - ab_s) * beta / (1 - ab_t)) < 1e-12


def test_em_coefficients_closed_form():
    sch = S.VPLinear()
    grid = torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64)
    a, b, c = em_coefficients(sch, grid, gamma=2.0)
    beta = sch.beta(grid[:-1])
    h = grid[:-1] - grid[1:]
    assert _relmax(torch.tensor(a, dtype=torch.float64), 1 + 0.5 * beta * h) < 1e-14
    assert _relmax(torch.tensor(b, dtype=torch.float64), -2.5 * beta * h / sch.sigma(grid[:-1])) < 1e-14
    assert _relmax(torch.tensor(c, dtype=torch.float64), 2.0 * torch.sqrt(beta * h)) < 1e-14


# -- torchsde backend --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["uniform", "logsnr"])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_torchsde_euler_and_native_em_same_path(kind, gamma):
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 400)
    grid = time_grid(sch, 30, kind)
    bm = make_brownian(grid, x.shape, generator=torch.Generator().manual_seed(7))
    noise = brownian_increments(bm, grid, x.shape)
    a = sample(field, x, "torchsde", grid=grid, bm=bm, gamma=gamma)
    b = sample(field, x, "em", grid=grid, noise=noise, gamma=gamma)
    assert _relmax(a.x, b.x) < 1e-12
    assert a.nfe == b.nfe == 30


def test_torchsde_float32_matches_em():
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 400, dtype=torch.float32)
    grid = time_grid(sch, 30)
    bm = make_brownian(grid, x.shape, dtype=torch.float32, generator=torch.Generator().manual_seed(7))
    a = sample(field, x, "torchsde", grid=grid, bm=bm).x
    b = sample(field, x, "em", grid=grid, noise=brownian_increments(bm, grid, x.shape)).x
    assert a.dtype == b.dtype == torch.float32
    assert _relmax(a, b) < 1e-5


@pytest.mark.parametrize("solver,nfe", [("euler", 12), ("milstein", 12), ("srk", 24), ("reversible_heun", 13)])
def test_torchsde_solvers_nfe_and_callback(solver, nfe):
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 64).reshape(64, 2)
    res = sample(field, x, "torchsde", steps=12, grid_kind="uniform", sde_solver=solver,
                 generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert res.nfe == nfe
    assert res.trajectory.shape == (13, 64, 2)
    assert torch.equal(res.trajectory[-1], res.x)
    assert torch.isfinite(res.x).all()


def test_torchsde_milstein_is_euler_for_additive_noise():
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 100)
    grid = time_grid(sch, 20)
    bm = make_brownian(grid, x.shape, generator=torch.Generator().manual_seed(1))
    a = sample(field, x, "torchsde", grid=grid, bm=bm, sde_solver="milstein").x
    b = sample(field, x, "torchsde", grid=grid, bm=bm, sde_solver="euler").x
    assert _relmax(a, b) < 1e-14


def test_torchsde_reproducible_from_generator_and_leaves_global_rng():
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 100)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sample(field, x, "torchsde", steps=10, generator=torch.Generator().manual_seed(4)).x
    assert torch.equal(torch.rand(1), before)
    b = sample(field, x, "torchsde", steps=10, generator=torch.Generator().manual_seed(4)).x
    c = sample(field, x, "torchsde", steps=10, generator=torch.Generator().manual_seed(5)).x
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_torchsde_image_shaped_state():
    sch = S.VPLinear()
    field = T.Gaussian(torch.zeros(6), 1.0).field(sch)
    model = field.model
    from diffusion_lab import VelocityField

    img_field = VelocityField(sch, lambda x, t: model(x.reshape(len(x), 6), t).reshape(x.shape), "x0")
    x = torch.randn(8, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = time_grid(sch, 10)
    bm = make_brownian(grid, (8, 6), generator=torch.Generator().manual_seed(1))
    a = sample(img_field, x, "torchsde", grid=grid, bm=bm).x
    b = sample(img_field, x, "em", grid=grid, noise=brownian_increments(bm, grid, x.shape)).x
    assert a.shape == x.shape and _relmax(a, b) < 1e-12


# -- NFE, noise convention, reproducibility ----------------------------------------------------------------

@pytest.mark.parametrize("method,opts", [("em", {}), ("em", {"gamma": 0.0}), ("ddpm_ancestral", {}),
                                         ("edm_sde", {"S_churn": 5.0}), ("torchsde", {})])
def test_nfe_matches_registry_and_callback_indices(method, opts):
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 32)
    for n in (1, 2, 7):
        idx = []
        info = get_method(method)
        out, _ = info.fn(field, x, time_grid(sch, n), generator=torch.Generator().manual_seed(0),
                         callback=lambda i, y: idx.append(i), **opts)
        res = sample(field, x, method, steps=n, generator=torch.Generator().manual_seed(0), **opts)
        assert res.nfe == info.nfe_of_steps(n), (method, n, res.nfe)
        assert idx == list(range(1, n + 1))
        assert torch.equal(out, res.x)


@pytest.mark.parametrize("method,opts", [("em", {"gamma": 1.5}), ("ddpm_ancestral", {}), ("edm_sde", {"S_churn": 20.0})])
def test_same_noise_same_result_and_noise_matters(method, opts):
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 64)
    g = torch.Generator().manual_seed(9)
    noise = torch.randn(8, *x.shape, dtype=torch.float64, generator=g)
    a = sample(field, x, method, steps=8, noise=noise, **opts).x
    b = sample(field, x, method, steps=8, noise=noise.clone(), generator=torch.Generator().manual_seed(1), **opts).x
    c = sample(field, x, method, steps=8, noise=torch.randn(noise.shape, dtype=torch.float64, generator=g), **opts).x
    d1 = sample(field, x, method, steps=8, generator=torch.Generator().manual_seed(2), **opts).x
    d2 = sample(field, x, method, steps=8, generator=torch.Generator().manual_seed(2), **opts).x
    assert torch.equal(a, b) and torch.equal(d1, d2)
    assert not torch.allclose(a, c)


def test_em_float32_runs_and_keeps_dtype():
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 128, dtype=torch.float32)
    for method in ("em", "ddpm_ancestral", "edm_sde"):
        out = sample(field, x, method, steps=10, generator=torch.Generator().manual_seed(0)).x
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


# -- option validation ------------------------------------------------------------------------------------

def test_bad_options_raise_value_error_naming_the_value():
    sch = S.VPLinear()
    field = T.ring8().field(sch)
    x = _prior(sch, 16)
    with pytest.raises(ValueError, match=r"gamma=-1\.5"):
        sample(field, x, "em", steps=4, gamma=-1.5)
    with pytest.raises(ValueError, match=r"gamma=nan"):
        sample(field, x, "torchsde", steps=4, gamma=float("nan"))
    with pytest.raises(ValueError, match=r"'abc'"):
        sample(field, x, "em", steps=4, gamma="abc")
    with pytest.raises(ValueError, match=r"'rk4'"):
        sample(field, x, "torchsde", steps=4, sde_solver="rk4")
    with pytest.raises(ValueError, match=r"\(4, 16, 2\).*\(3, 16, 2\)"):
        sample(field, x, "em", steps=4, noise=torch.zeros(3, 16, 2))
    with pytest.raises(ValueError, match=r"\(4, 16, 2\).*\(4, 16\)"):
        sample(field, x, "ddpm_ancestral", steps=4, noise=torch.zeros(4, 16))
    with pytest.raises(ValueError, match=r"S_churn=-1"):
        sample(field, x, "edm_sde", steps=4, S_churn=-1)
    with pytest.raises(ValueError, match=r"S_noise=inf"):
        sample(field, x, "edm_sde", steps=4, S_churn=1.0, S_noise=float("inf"))
    with pytest.raises(ValueError, match=r"S_max=0\.1"):
        sample(field, x, "edm_sde", steps=4, S_min=1.0, S_max=0.1)
    with pytest.raises(ValueError, match=r"uniform in t"):
        sample(field, x, "torchsde", steps=4, grid_kind="logsnr", sde_solver="reversible_heun")
    grid = time_grid(sch, 4)
    with pytest.raises(ValueError, match=r"\(16, 2\), got \(8, 2\)"):
        sample(field, x, "torchsde", grid=grid, bm=make_brownian(grid, (8, 2)))
    with pytest.raises(ValueError, match=r"space-time"):
        sample(field, x, "torchsde", grid=grid, sde_solver="srk", bm=make_brownian(grid, (16, 2)))
    short = make_brownian(grid[:3], (16, 2))
    with pytest.raises(ValueError, match=r"must cover"):
        sample(field, x, "torchsde", grid=grid, bm=short)
    with pytest.raises(ValueError, match=r"gamma\(0\.5\) = -1\.0"):
        sample(field, x, "em", grid=torch.tensor([1.0, 0.5, 0.1]), gamma=lambda t: torch.where(t < 0.9, -1.0, 1.0))


def test_time_dependent_gamma_callable():
    sch = S.VPLinear()
    field = T.gaussian_2d().field(sch)
    m0, C0 = _exact_marginal(T.gaussian_2d(), sch, sch.t_max)
    grid = time_grid(sch, 20)
    const = sampler_gaussian_law(field, "em", grid, m0, C0, gamma=0.7)
    call = sampler_gaussian_law(field, "em", grid, m0, C0, gamma=lambda t: 0.7 + 0.0 * t)
    assert _relmax(const[1], call[1]) < 1e-14


@pytest.mark.slow
def test_torchsde_srk_strong_convergence_beats_euler():
    sch = S.VPLinear()
    field = T.gaussian_2d().field(sch)
    x = _prior(sch, 300)
    fine = time_grid(sch, 1024, "uniform")
    bm = make_brownian(fine, x.shape, generator=torch.Generator().manual_seed(0), levy_area="space-time")
    ref = sample(field, x, "em", grid=fine, noise=brownian_increments(bm, fine, x.shape)).x
    err = {}
    for solver in ("euler", "srk"):
        grid = time_grid(sch, 64, "uniform")
        out = sample(field, x, "torchsde", grid=grid, bm=bm, sde_solver=solver).x
        err[solver] = float(((out - ref) ** 2).sum(1).mean().sqrt())
    assert err["srk"] < 0.3 * err["euler"], err
