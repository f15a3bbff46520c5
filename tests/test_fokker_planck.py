"""Grid Fokker-Planck solver: closed forms, conservation, positivity, error detection, helpers, CLI."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from diffusion_lab.cli import main
from diffusion_lab.fokker_planck import (Grid, LinearCoefficients, assemble, bernoulli, density_from_samples,
                                         exact_density, face_coefficients, gaussian_density, l1, mass_outside,
                                         solve, solve_continuity, solve_forward, solve_reverse, tv)
from diffusion_lab.schedules import VE, VPLinear, SubVP
from diffusion_lab.targets import Gaussian, bimodal_1d, ring8

OU = LinearCoefficients(rate=lambda s: -1.0, diffusion=lambda s: 1.0, time_independent=True, ratio=-1.0,
                        integral_D=lambda a, b: b - a)


def test_grid_geometry():
    g = Grid((-1.0, 0.0), (1.0, 3.0), (4, 6))
    assert g.dim == 2 and g.shape == (4, 6) and g.size == 24
    assert g.dx == (0.5, 0.5) and g.volume == 0.25
    np.testing.assert_allclose(g.centres(0), [-0.75, -0.25, 0.25, 0.75])
    assert g.points().shape == (24, 2) and g.face_points(0).shape == (3 * 6, 2)
    assert g.face_points(1, periodic=True).shape == (4 * 6, 2)
    with pytest.raises(ValueError, match="lo < hi"):
        Grid((1.0,), (0.0,), (4,))
    with pytest.raises(ValueError, match="at least 2"):
        Grid.box(0, 1, 1)


@given(st.floats(-50, 50))
def test_bernoulli_stable_and_identity(w):
    b = float(bernoulli(w))
    ref = 1.0 if w == 0 else w / math.expm1(w)
    assert b == pytest.approx(ref, rel=1e-13, abs=1e-300)
    # Bern(-w) = Bern(w) + w and Bern(-w)/Bern(w) = e^w (the zero-flux ratio)
    assert float(bernoulli(-w)) == pytest.approx(b + w, rel=1e-12, abs=1e-12)


def test_bernoulli_extremes():
    assert bernoulli(0.0) == 1.0
    assert bernoulli(1e-12) == pytest.approx(1 - 5e-13, rel=1e-15)
    assert bernoulli(800.0) == 0.0 and bernoulli(-800.0) == pytest.approx(800.0)


def test_sg_equals_chang_cooper_flux():
    """Chang-Cooper flux F = B[(1-delta) f_{j+1} + delta f_j] + C (f_{j+1} - f_j)/dx, delta = 1/w' - 1/(e^w' - 1),
    w' = dx B / C with B = -b: F = -J (the two fluxes are the same expression)."""
    rng = np.random.default_rng(0)
    b, D, dx = rng.normal(size=50) * 3, 0.7, 0.2
    pj, pj1 = rng.random(50), rng.random(50)
    A, C = face_coefficients(b, D, dx)
    J = A * pj - C * pj1
    Bcc = -b
    w = dx * Bcc / D
    delta = 1 / w - 1 / np.expm1(w)
    F = Bcc * ((1 - delta) * pj1 + delta * pj) + D * (pj1 - pj) / dx
    np.testing.assert_allclose(F, -J, rtol=1e-10, atol=1e-12)


def test_equilibrium_ratio_exact():
    g = Grid.box(-6, 6, 120)
    xf = g.interior_faces(0)
    A, C = face_coefficients(-xf, 1.0, g.dx[0])
    np.testing.assert_allclose(A / C, np.exp(-g.dx[0] * xf), rtol=1e-13)
    x = g.centres(0)
    pi = np.exp(-0.5 * x * x)
    L = assemble(g, [-xf], 1.0)
    assert np.max(np.abs(L @ pi)) <= 1e-13 * np.max(np.abs(L.diagonal()) * pi)


@pytest.mark.parametrize("bc", ["zero_flux", "periodic"])
def test_column_sums_zero(bc):
    g = Grid.box(-3, 3, 10, 2)
    rng = np.random.default_rng(1)
    fd = [rng.normal(size=g.face_shape(a, bc == "periodic")) for a in range(2)]
    L = assemble(g, fd, 0.3, bc)
    assert np.max(np.abs(np.asarray(L.sum(axis=0)))) < 1e-13
    off = L - np.diag(L.diagonal())
    assert off.min() >= 0  # M-matrix structure


def test_central_scheme_peclet_detected():
    g = Grid.box(-6, 6, 20)
    with pytest.raises(ValueError, match=r"cell Peclet number \|b\| dx / D = 6\.48 on axis 0"):
        solve(g, gaussian_density(g, 0.0, 1.0), [0.0, 0.1], LinearCoefficients(lambda s: -1.0, lambda s: 0.5),
              scheme="central")
    # fine grid: central allowed and close to SG
    g = Grid.box(-6, 6, 200)
    p0 = gaussian_density(g, 1.0, 0.2)
    a = solve(g, p0, [0.0, 0.5], OU, scheme="central", steps=50)
    b = solve(g, p0, [0.0, 0.5], OU, scheme="sg", steps=50)
    assert l1(a.densities[-1], b.densities[-1], g) < 1e-3


def test_explicit_step_positivity_detected():
    g = Grid.box(-6, 6, 100)
    p0 = gaussian_density(g, 1.0, 0.3)
    with pytest.raises(ValueError, match=r"explicit Euler step h = 0\.01 breaks positivity.*need h <= 1/max\(-L_ii\) = 0\.006945"):
        solve(g, p0, [0.0, 0.1], OU, method="euler", dt=0.01)
    ok = solve(g, p0, [0.0, 0.1], OU, method="euler", dt=0.002)
    assert ok.min.min() >= 0 and ok.mass_drift < 1e-13


def test_ou_2d_exact_gaussian():
    """2-D OU from N((1.5,-1), 0.09 I): mean m e^-t, variance 0.09 e^-2t + 1 - e^-2t; errors shrink 4x per
    refinement (second order) and TR-BDF2 agrees with the time-exact exponential integrator."""
    errs = []
    for n in (32, 64, 128):
        g = Grid.box(-6, 6, n, 2)
        p0 = gaussian_density(g, [1.5, -1.0], 0.09)
        ex = gaussian_density(g, np.array([1.5, -1.0]) * math.exp(-1), 0.09 * math.exp(-2) + 1 - math.exp(-2))
        sol = solve(g, p0, [0.0, 1.0], OU, method="expm")
        errs.append(sol.l1[-1] if sol.l1 is not None else l1(sol.densities[-1], ex, g))
        assert sol.mass_drift < 1e-13
    assert 3.6 < errs[1] / errs[2] < 4.4 and 3.3 < errs[0] / errs[1] < 4.6
    g = Grid.box(-6, 6, 64, 2)
    p0 = gaussian_density(g, [1.5, -1.0], 0.09)
    a = solve(g, p0, [0.0, 1.0], OU, method="expm").densities[-1]
    b = solve(g, p0, [0.0, 1.0], OU, method="trbdf2", steps=40)
    assert l1(a, b.densities[-1], g) < 2e-4 and b.factorizations == 1  # one LU for a constant operator


def test_time_orders_1d():
    g = Grid.box(-6, 6, 200)
    p0 = gaussian_density(g, 1.5, 0.09)
    ref = solve(g, p0, [0.0, 1.0], OU, method="expm").densities[-1]
    e = {m: [l1(solve(g, p0, [0.0, 1.0], OU, method=m, steps=k).densities[-1], ref, g) for k in (10, 20, 40)]
         for m in ("be", "trbdf2")}
    assert 1.7 < e["be"][1] / e["be"][2] < 2.3  # first order
    assert 3.3 < e["trbdf2"][1] / e["trbdf2"][2] < 4.7  # second order


def test_backward_euler_positive_from_delta():
    g = Grid.box(-4, 4, 40, 2)
    p0 = np.zeros(g.shape)
    p0[5, 30] = 1 / g.volume
    be = solve(g, p0, [0.0, 1.0, 3.0], OU, method="be", dt=0.5)
    assert be.min.min() >= 0 and be.mass_drift < 1e-13


@pytest.mark.parametrize("schedule", [VPLinear(), VE(sigma_max=5.0), SubVP()])
def test_forward_matches_closed_form(schedule):
    tg = bimodal_1d()
    t1 = 0.5 if schedule.name != "ve" else 0.6
    g = Grid.box(-12, 12, 480)
    sol = solve_forward(schedule, tg, g, [0.05, 0.2, t1], method="trbdf2", steps=200)
    assert sol.mass_drift < 1e-12 and sol.min.min() > -1e-14
    assert np.all(sol.l1[1:] < 2e-3), sol.l1
    assert np.all(sol.mass_outside < 1e-10)


def test_forward_expm_exact_time_vp_and_ve():
    tg = bimodal_1d()
    g = Grid.box(-8, 8, 256)
    for sch in (VPLinear(), VE(sigma_max=3.0)):
        a = solve_forward(sch, tg, g, [0.05, 0.3], method="expm")
        b = solve_forward(sch, tg, g, [0.05, 0.3], method="trbdf2", steps=400)
        assert l1(a.densities[-1], b.densities[-1], g) < 2e-5


def test_reverse_sde_reproduces_marginals_and_counts_nfe():
    vp, tg = VPLinear(), bimodal_1d()
    f = tg.field(vp)
    g = Grid.box(-8, 8, 256)
    nfe0 = f.nfe
    sol = solve_reverse(f, tg, g, [1.0, 0.5, 0.1, 0.01], steps=100, target=tg)
    assert sol.nfe == f.nfe - nfe0 == 1 + 2 * 100  # TR-BDF2: 2 new operators per step, L_n re-used
    assert np.all(sol.l1 < 1.2e-3) and sol.mass_drift < 1e-12
    # a wrong score (scaled by 0.5) must fail
    from diffusion_lab.field import VelocityField

    bad = VelocityField(vp, lambda x, t: 0.5 * f.score(x, t), "score")
    wrong = solve_reverse(bad, tg, g, [1.0, 0.5, 0.1, 0.01], steps=100, target=tg)
    assert wrong.l1[-1] > 0.1


def test_pf_ode_continuity_forward_and_generation():
    vp, tg = VPLinear(), bimodal_1d()
    f = tg.field(vp)
    errs = []
    for n in (128, 256):
        g = Grid.box(-8, 8, n)
        errs.append(solve_continuity(f, tg, g, [1.0, 0.5, 0.05], steps=100).l1[-1])
    assert errs[1] < 0.7 * errs[0] and errs[1] < 0.05  # upwind: first order, converging
    fw = solve_continuity(f, tg, Grid.box(-8, 8, 256), [0.05, 0.5], steps=100)
    assert fw.l1[-1] < 0.05 and fw.mass_drift < 1e-12


def test_ring8_2d_generation():
    tg = ring8()
    g = Grid.box(-5, 5, 48, 2)
    sol = solve_reverse(tg.field(VPLinear()), tg, g, [1.0, 0.3], steps=20, target=tg)
    assert sol.mass_drift < 1e-12 and sol.tv[-1] < 0.01 and sol.kl[-1] < 1e-3


def test_mass_outside_truncation_reported():
    tg = Gaussian([0.0, 0.0], 1.0)
    g = Grid.box(-3, 3, 16, 2)
    val, exact = mass_outside(tg, None, g, 0.0)
    p_in = math.erf(3 / math.sqrt(2)) ** 2
    assert exact and val == pytest.approx(1 - p_in, rel=1e-12)
    val2, exact2 = mass_outside(Gaussian([0.0, 0.0], [[1.0, 0.5], [0.5, 1.0]]), None, g, 0.0)
    assert not exact2 and val2 >= val * 0.99  # union bound
    sol = solve_forward(VPLinear(), ring8(), Grid.box(-3, 3, 32, 2), [0.5, 1.0], steps=10)
    assert sol.mass_outside[-1] > 1e-3  # a box too small for p_1 is visible in the output


def test_exact_density_cell_vs_point_and_mass():
    tg = ring8()
    g = Grid.box(-6, 6, 64, 2)
    c = exact_density(tg, VPLinear(), g, 0.3)
    p = exact_density(tg, VPLinear(), g, 0.3, kind="point")
    out, exact = mass_outside(tg, VPLinear(), g, 0.3)
    assert exact and 1e-11 < out < 1e-8 and abs(g.mass(c) + out - 1) < 1e-13  # cell averages: all mass inside
    assert 0 < l1(c, p, g) < 1e-2


def test_density_from_samples():
    tg = Gaussian([0.5, -0.5], 0.5)
    x = tg.sample(40000, generator=torch.Generator().manual_seed(0))
    g = Grid.box(-4, 4, 40, 2)
    q = exact_density(tg, None, g, 0.0)
    h = density_from_samples(x, g, "hist")
    k = density_from_samples(x, g, "kde")
    assert abs(g.mass(h) - 1) < 1e-12 and abs(g.mass(k) - 1) < 1e-6
    assert tv(h, q, g) < 0.05 and tv(k, q, g) < 0.03
    assert tv(k, q, g) == pytest.approx(0.5 * l1(k, q, g))
    with pytest.raises(ValueError, match="shape"):
        density_from_samples(np.zeros((10, 3)), g)


def test_periodic_advection_translates():
    """Constant velocity on a periodic box: after one period the profile returns (upwind smears it only)."""
    g = Grid.box(0, 1, 200)
    p0 = 1.0 + 0.5 * np.sin(2 * np.pi * g.centres(0))
    co = LinearCoefficients(rate=lambda s: 0.0, diffusion=lambda s: 0.0)
    from diffusion_lab.fokker_planck import PointCoefficients

    adv = PointCoefficients(lambda x, s: np.ones_like(x), lambda s: 0.0, time_independent=True)
    sol = solve(g, p0, [0.0, 1.0], adv, method="trbdf2", steps=400, bc="periodic")
    assert sol.mass_drift < 1e-12
    assert l1(sol.densities[-1], p0, g) < 0.1
    still = solve(g, p0, [0.0, 1.0], co, method="be", steps=5, bc="periodic")
    np.testing.assert_allclose(still.densities[-1], p0, rtol=1e-14)


def test_time_errors():
    g = Grid.box(-4, 4, 16)
    with pytest.raises(ValueError, match="decreasing"):
        solve_reverse(bimodal_1d().field(VPLinear()), "prior", g, [0.1, 0.5])
    with pytest.raises(ValueError, match="outside"):
        solve_forward(VPLinear(), bimodal_1d(), g, [0.1, 1.5])
    with pytest.raises(ValueError, match="shape"):
        solve_forward(VPLinear(), np.ones(7), g, [0.1, 0.5])


def test_cli_fokker_planck(tmp_path, capsys):
    rc = main(["fokker-planck", "--n", "24", "--steps", "8", "--times", "0.2", "1.0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "generation" in out and "forward" in out
    assert (tmp_path / "results.csv").exists() and (tmp_path / "settings.json").exists()
    assert (tmp_path / "fokker_planck.png").exists()
    with pytest.raises(SystemExit):
        main(["fokker-planck", "--n", "2", "--out", str(tmp_path)])
    assert "--n must be >= 8" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    pytest.importorskip("pde")
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "fokker_planck_vs_pypde.py")
    spec = importlib.util.spec_from_file_location("fp_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--json", str(tmp_path / "b.json")]) == 0
