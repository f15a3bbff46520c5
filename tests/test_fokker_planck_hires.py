"""High-resolution grid schemes: MUSCL advection (order, conservation, positivity, no new extrema, CFL refusal),
IMEX drift-diffusion, fourth-order fluxes, adaptive TR-BDF2, 3-D dimension splitting, memory estimates."""
import math

import numpy as np
import pytest

from diffusion_lab.fokker_planck import (Grid, LinearCoefficients, PointCoefficients, check_memory, estimate_memory,
                                         gaussian_density, l1, limited_slope, muscl_rhs, outflow_rate, solve,
                                         solve_continuity, solve_forward)
from diffusion_lab.fokker_planck.splitting import AxisOperator
from diffusion_lab.fokker_planck.stepping import _D, _E, _GAMMA, _W
from diffusion_lab.schedules import VPLinear
from diffusion_lab.targets import Gaussian

OU = LinearCoefficients(rate=lambda s: -1.0, diffusion=lambda s: 1.0, time_independent=True, ratio=-1.0,
                        integral_D=lambda a, b: b - a)
M0 = np.array([1.5, -1.0, 0.5])


def ou_exact(grid, t):
    """Exact cell averages of the OU density from N(M0, 0.09 I): N(M0 e^-t, (0.09 e^-2t + 1 - e^-2t) I)."""
    return gaussian_density(grid, M0[:grid.dim] * math.exp(-t), 0.09 * math.exp(-2 * t) + 1 - math.exp(-2 * t))


def constant_speed(v=1.0):
    return PointCoefficients(lambda x, s: np.full_like(x, v), lambda s: 0.0, time_independent=True)


def test_limiter_closed_forms():
    a, b = np.array([1.0, 1.0, -2.0, 1.0, 0.0]), np.array([3.0, -1.0, -0.5, 1.0, 2.0])
    np.testing.assert_allclose(limited_slope(a, b, "minmod"), [1.0, 0.0, -0.5, 1.0, 0.0])
    np.testing.assert_allclose(limited_slope(a, b, "vanleer"), [1.5, 0.0, -0.8, 1.0, 0.0])  # 2ab/(a+b)
    np.testing.assert_allclose(limited_slope(a, b, "mc"), [2.0, 0.0, -1.0, 1.0, 0.0])  # min(2|a|, 2|b|, |a+b|/2)
    with pytest.raises(ValueError, match="unknown limiter 'superbee'"):
        limited_slope(a, b, "superbee")


def test_outflow_rate_closed_form():
    g = Grid.box(0.0, 1.0, 10, 2)
    fd = [np.full(g.face_shape(0), 2.0), np.full(g.face_shape(1), -3.0)]
    # interior cell: 2 max(2, 0)/0.1 + 2 max(0, 3)/0.1 = 100
    assert outflow_rate(g, fd) == pytest.approx(100.0, rel=1e-14)
    fd = [np.full(g.face_shape(0, True), 1.0), np.zeros(g.face_shape(1, True))]
    assert outflow_rate(g, fd, "periodic") == pytest.approx(20.0, rel=1e-14)


def test_muscl_second_order_on_smooth_pf_ode_density():
    """PF-ODE of N(1, 0.25) under VP from t = 0.1 to 0.6: p_t is Gaussian in closed form. van Leer and MC converge
    at order >= 1.8 in L1 over two refinements; upwinding is first order and >= 10x worse at n = 128."""
    tg, vp = Gaussian([1.0], 0.25), VPLinear()
    f = tg.field(vp)
    errs = {}
    for lim in ("vanleer", "mc"):
        errs[lim] = [solve_continuity(f, tg, Grid.box(-5, 5, n), [0.1, 0.6], scheme="muscl", limiter=lim).l1[-1]
                     for n in (32, 64, 128)]
        orders = np.log2(np.array(errs[lim][:-1]) / np.array(errs[lim][1:]))
        assert np.all(orders >= 1.8), (lim, errs[lim], orders)
    up = solve_continuity(f, tg, Grid.box(-5, 5, 128), [0.1, 0.6], steps=100).l1[-1]
    assert up > 10 * errs["vanleer"][-1]


def test_muscl_generation_direction_and_mass():
    tg, vp = Gaussian([0.5, -0.5], [[0.3, 0.1], [0.1, 0.2]]), VPLinear()
    g = Grid.box(-4, 4, 48, 2)
    sol = solve_continuity(tg.field(vp), tg, g, [0.8, 0.3, 0.1], scheme="muscl", limiter="mc", method="ssprk2")
    assert sol.mass_drift < 1e-12 * sol.mass[0] and sol.min.min() >= 0.0
    assert sol.l1[-1] < 0.02 and sol.settings["max_cfl"] <= 1.0 + 1e-12  # positivity bound held at every stage


@pytest.mark.parametrize("limiter", ["minmod", "vanleer", "mc"])
def test_step_stays_positive_without_new_extrema(limiter):
    """A periodic step advected once around the box at speed 1: every value stays within the initial [min, max]
    (TVD under the CFL bound) and mass is exact; the limited scheme is sharper than upwinding."""
    g = Grid.box(0.0, 1.0, 100)
    x = g.centres(0)
    p0 = np.where((x > 0.25) & (x < 0.55), 2.0, 0.5)
    sol = solve(g, p0, [0.0, 0.5, 1.0], constant_speed(), method="ssprk3", limiter=limiter, cfl=0.9,
                bc="periodic", steps=None)
    d = sol.densities
    assert d.min() >= 0.5 - 1e-14 and d.max() <= 2.0 + 1e-14
    assert sol.mass_drift <= 1e-12 * sol.mass[0]
    up = solve(g, p0, [0.0, 1.0], constant_speed(), method="ssprk3", limiter="none", cfl=0.9, bc="periodic",
               steps=None)
    assert l1(d[-1], p0, g) < 0.8 * l1(up.densities[-1], p0, g)


def test_positivity_from_a_point_mass_2d():
    g = Grid.box(-2.0, 2.0, 40, 2)
    p0 = np.zeros(g.shape)
    p0[8, 30] = 1.0 / g.volume
    swirl = PointCoefficients(lambda x, s: np.stack([-x[:, 1], x[:, 0]], 1) - 0.3 * x, lambda s: 0.0,
                              time_independent=True)
    sol = solve(g, p0, [0.0, 0.5, 1.0], swirl, method="ssprk3", limiter="mc", cfl=1.0, steps=None)
    assert sol.min.min() >= 0.0 and sol.mass_drift < 1e-13


def test_cfl_rejection_names_the_bound():
    g = Grid.box(0.0, 1.0, 100)
    p0 = 1.0 + 0.5 * np.sin(2 * np.pi * g.centres(0))
    # r = 2 |v| / dx = 200: a step must be <= 0.005
    with pytest.raises(ValueError, match=r"step h = 0\.01 breaks the positivity \(CFL\) bound.*need h <= "
                                         r"1/max_j r_j = 0\.005"):
        solve(g, p0, [0.0, 0.5], constant_speed(), method="ssprk3", steps=50, bc="periodic")
    ok = solve(g, p0, [0.0, 0.5], constant_speed(), method="ssprk3", dt=0.005, bc="periodic")
    assert ok.steps == 100 and ok.min.min() > 0
    with pytest.raises(ValueError, match="D = 1 .*use method='imex'"):
        solve(g, p0, [0.0, 0.5], OU, method="ssprk2", cfl=0.5)


def test_muscl_rhs_conservative_and_translation_exact_for_linear_data():
    """Zero column sums (discrete mass) and, for linear periodic-free data at constant speed, the exact
    -v dp/dx in the interior (second-order reconstruction is exact on linear data)."""
    g = Grid.box(0.0, 1.0, 20)
    rng = np.random.default_rng(0)
    p = rng.random(g.shape)
    b = [rng.normal(size=g.face_shape(0))]
    for lim in ("minmod", "vanleer", "mc"):
        assert abs(muscl_rhs(g, p, b, lim).sum()) < 1e-12
        lin = 1.0 + g.centres(0)
        r = muscl_rhs(g, lin, [np.full(g.face_shape(0), 2.0)], lim)
        np.testing.assert_allclose(r[2:-2], -2.0, rtol=1e-12)


def test_imex_ou_second_order():
    """Strang IMEX (MUSCL advection, exact diffusion sub-steps) on the 2-D OU equation: positive, mass exact,
    errors shrink about 4x per refinement."""
    errs = []
    for n in (32, 64):
        g = Grid.box(-6, 6, n, 2)
        sol = solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, method="imex", cfl=0.9)
        assert sol.min.min() >= 0 and sol.mass_drift < 1e-12
        errs.append(l1(sol.densities[-1], ou_exact(g, 1.0), g))
    assert 3.3 < errs[0] / errs[1] < 4.7, errs


def test_fv4_fourth_order_2d_ou():
    errs = []
    for n in (48, 96):
        g = Grid.box(-6, 6, n, 2)
        sol = solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, method="expm", scheme="fv4")
        assert sol.mass_drift < 1e-13
        errs.append(l1(sol.densities[-1], ou_exact(g, 1.0), g))
    assert 13.0 < errs[0] / errs[1] < 19.0, errs  # 2^4 = 16
    with pytest.raises(ValueError, match="cell Peclet number"):
        solve(Grid.box(-6, 6, 24), ou_exact(Grid.box(-6, 6, 24), 0.0), [0.0, 1.0], OU, method="expm", scheme="fv4")


def test_adaptive_trbdf2_pair_and_tolerance():
    """The stage derivatives satisfy y_{n+1} = y_n + h (w k1 + w k2 + d k3) with k3 = L y_{n+1} (the ESDIRK form
    behind the error estimate), and a tighter rtol gives a smaller error with more steps."""
    assert _W + _W + _D == pytest.approx(1.0, abs=1e-15)  # consistency of b
    assert sum(_E) == pytest.approx(0.0, abs=1e-15)  # b and b^ both consistent
    g = Grid.box(-6, 6, 64)
    ref = solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, method="expm").densities[-1]
    res = [solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, rtol=r, atol=1e-10) for r in (1e-3, 1e-5)]
    e = [l1(r.densities[-1], ref, g) for r in res]
    assert e[1] < 0.2 * e[0] and res[1].steps > res[0].steps and res[1].mass_drift < 1e-13
    with pytest.raises(ValueError, match="rtol/atol need method='trbdf2'"):
        solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, method="be", rtol=1e-3)


def test_adaptive_trbdf2_on_forward_vp():
    tg = Gaussian([1.0], 0.2)
    sol = solve_forward(VPLinear(), tg, Grid.box(-6, 6, 200), [0.05, 0.5], rtol=1e-5, atol=1e-9)
    assert sol.l1[-1] < 2e-3 and sol.settings["rtol"] == 1e-5


def test_axis_operator_matches_assembled():
    from diffusion_lab.fokker_planck import assemble

    g = Grid((-1.0, -2.0, 0.0), (1.0, 2.0, 1.0), (5, 6, 4))
    rng = np.random.default_rng(3)
    fd = [rng.normal(size=g.face_shape(a)) for a in range(3)]
    L = assemble(g, fd, 0.4)
    p = rng.random(g.shape)
    tot = sum(np.moveaxis(AxisOperator(g, fd[a], 0.4, a).matvec(np.moveaxis(p, a, 0)), 0, a) for a in range(3))
    np.testing.assert_allclose(tot.reshape(-1), L @ p.reshape(-1), rtol=1e-12, atol=1e-12)
    op = AxisOperator(g, fd[1], 0.4, 1)
    r = np.moveaxis(p, 1, 0).copy()
    x = AxisOperator.solve(op.factor(0.3), r.copy())
    np.testing.assert_allclose(x - 0.3 * op.matvec(x), r, atol=1e-12)


def test_split_3d_ou_against_closed_form():
    """3-D OU from N((1.5, -1, 0.5), 0.09 I) by Strang-split TR-BDF2: mass exact, error within 2% of the unsplit
    TR-BDF2 (the split is exact for the commuting axis operators of OU), second order in space."""
    errs = []
    for n in (16, 32):
        g = Grid.box(-6, 6, n, 3)
        sol = solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, method="split", steps=20)
        assert sol.mass_drift < 1e-12 and sol.min.min() >= 0
        errs.append(l1(sol.densities[-1], ou_exact(g, 1.0), g))
    assert 3.5 < errs[0] / errs[1] < 4.5, errs
    g = Grid.box(-6, 6, 16, 3)
    un = solve(g, ou_exact(g, 0.0), [0.0, 1.0], OU, method="trbdf2", steps=20)
    assert abs(l1(un.densities[-1], ou_exact(g, 1.0), g) - errs[0]) < 0.02 * errs[0]


def test_split_non_separable_drift_matches_unsplit():
    g = Grid.box(-3, 3, 24, 2)
    co = PointCoefficients(lambda x, s: np.stack([-x[:, 0] + 0.5 * x[:, 1], -x[:, 1] - 0.5 * x[:, 0]], 1),
                           lambda s: 0.5, time_independent=True)
    p0 = gaussian_density(g, [1.0, 0.5], 0.2)
    a = solve(g, p0, [0.0, 0.5], co, method="split", steps=40).densities[-1]
    b = solve(g, p0, [0.0, 0.5], co, method="trbdf2", steps=40).densities[-1]
    assert l1(a, b, g) < 2e-3


def test_memory_estimate_and_refusal():
    small = estimate_memory((64, 64), "trbdf2")
    assert small < estimate_memory((128, 128), "trbdf2") < 2**30
    assert estimate_memory((128,) * 3, "split") < estimate_memory((128,) * 3, "trbdf2")
    with pytest.raises(MemoryError) as e:
        check_memory((100000, 100000), "trbdf2", limit=8 << 30)
    msg = str(e.value)
    assert "\n" not in msg and "100000x100000" in msg and "GiB" in msg
    assert check_memory((128,) * 3, "split", limit=8 << 30) < 8 << 30


def test_cli_refuses_a_grid_beyond_memory(tmp_path, capsys):
    from diffusion_lab.cli import main

    with pytest.raises(SystemExit):
        main(["fokker-planck", "--n", "100000", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "100000x100000" in err and "GiB" in err


def test_exact_density_in_chunks_matches_points():
    from diffusion_lab.fokker_planck import exact_density
    from diffusion_lab.fokker_planck.grid import gauss_legendre_cell_points

    g = Grid.box(-3, 3, 12, 3)
    pts, w = gauss_legendre_cell_points(g, 3)
    sub, _ = gauss_legendre_cell_points(g, 3, cells=slice(100, 300))
    np.testing.assert_array_equal(pts.reshape(g.size, -1, 3)[100:300].reshape(-1, 3), sub)
    tg = Gaussian([0.2, -0.1, 0.3], 0.5)
    # 3-node Gauss-Legendre per axis: relative error O((dx/s)^6 / 2^6 6!) ~ 1e-4 at dx = 0.5, s^2 = 0.5
    np.testing.assert_allclose(exact_density(tg, None, g, 0.0), gaussian_density(g, [0.2, -0.1, 0.3], 0.5),
                               rtol=5e-4, atol=1e-8)


def test_imex_reverse_small_gamma_matches_marginals():
    """Generation with gamma = 0.2 (advection-dominated) by IMEX: positive, mass exact, close to p_t; the CFL-chosen
    steps stay within the positivity bound."""
    from diffusion_lab.fokker_planck import solve_reverse
    from diffusion_lab.targets import bimodal_1d

    tg = bimodal_1d()
    sol = solve_reverse(tg.field(VPLinear()), tg, Grid.box(-8, 8, 128), [1.0, 0.5, 0.1], gamma=0.2, method="imex",
                        cfl=0.9, target=tg)
    assert sol.min.min() >= 0 and sol.mass_drift < 1e-12
    assert np.all(sol.l1 < 6e-3), sol.l1  # second order: 4e-3 at dx = 1/8 (8.8e-4 at dx = 1/16)
    assert sol.settings["max_cfl"] <= 1.0 + 1e-12
