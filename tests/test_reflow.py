"""Reflow / rectified flow (diffusion_lab.reflow): straightness against closed forms, the coupling against the exact
1-D flow map, training on a straight coupling, and the catalogue checks' planted errors."""
import math

import pytest
import torch
from scipy.integrate import quad

from diffusion_lab import VPLinear, targets
from diffusion_lab.field import VelocityField
from diffusion_lab.models import MLPScore
from diffusion_lab.reference import quantile_flow_map
from diffusion_lab.reflow import Coupling, couple, one_step, reflow, straightness, train_rectified
from diffusion_lab.samplers import sample
from diffusion_lab.schedules import RectifiedFlow

RF = RectifiedFlow()


def test_straightness_zero_for_a_straight_field():
    a = torch.tensor([[0.7, -1.3]], dtype=torch.float64)
    field = VelocityField(RF, lambda x, t: a.expand_as(x), "velocity")
    z = torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    st = straightness(field, z, 8)
    # constant velocity: the path is the line itself, so S is round-off only (|a|^2 ~ 2, 1e-28 ~ 100 ulp^2)
    assert st.S < 1e-26, st.S
    span = RF.t_max - RF.t_min
    assert math.isclose(st.cost, span**2 * float((a**2).sum()), rel_tol=1e-13)
    assert st.nfe == 4 * 8 + 1


def test_straightness_of_a_gaussian_closed_form():
    """1-D data N(0, s^2), noise N(0, 1) on RF: the flow is x(t) = c(t) z / c(T), c(t) = sqrt((1-t)^2 s^2 + t^2), so
    S = mean(z^2)/c(T)^2 int_{t0}^{T} ((c(T) - c(t0))/(T - t0) - c'(t))^2 dt. RK4 + Simpson are O(h^4): the error
    must fall ~16x from 16 to 32 steps (>= 10x asserted; measured 2.5e-4 -> 1.4e-5 relative, the velocity turning
    on the scale s^2 = 0.09 near t_min) and be below 1e-4 relative at 32 steps."""
    s2 = 0.09
    tg = targets.Gaussian([0.0], [[s2]])
    field = tg.field(RF)
    z = tg.marginal(RF, RF.t_max).sample(400, generator=torch.Generator().manual_seed(1))
    c = lambda t: math.sqrt((1 - t) ** 2 * s2 + t * t)  # noqa: E731
    dc = lambda t: (t - (1 - t) * s2) / c(t)  # noqa: E731
    t0, T = RF.t_min, RF.t_max
    slope = (c(T) - c(t0)) / (T - t0)
    integral = quad(lambda t: (slope - dc(t)) ** 2, t0, T, epsabs=1e-15, epsrel=1e-13, limit=200)[0]
    exact = float((z**2).mean()) / c(T) ** 2 * integral
    errs = [abs(straightness(field, z, n).S - exact) / exact for n in (16, 32)]
    assert errs[1] < 1e-4 and errs[0] / errs[1] > 10, (errs, exact)


def test_couple_matches_exact_quantile_map_and_counts_nfe():
    tg = targets.bimodal_1d()
    field = tg.field(RF)
    z = tg.marginal(RF, RF.t_max).sample(300, generator=torch.Generator().manual_seed(2))
    ref = quantile_flow_map(tg, RF, z, RF.t_max, RF.t_min)
    n0 = field.nfe
    c = couple(field, z, steps=64)
    assert c.nfe == field.nfe - n0 == 4 * 64
    # RK4 with 64 steps on this smooth field: measured max error 2e-6; 1e-4 leaves room for other seeds
    assert float((c.x - ref).abs().max()) < 1e-4
    d = couple(field, z, solver="dop853", rtol=1e-10)
    assert float((d.x - ref).abs().max()) < 1e-7  # DOP853 at rtol 1e-10 against the closed-form quantile map
    assert math.isclose(c.cost(), float(((z - ref) ** 2).mean()), rel_tol=1e-4)


def test_coupling_line_is_the_schedule_interpolation():
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(20, 2, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g, dtype=torch.float64)
    cp = Coupling(x, z, RF.t_min, RF.t_max)
    assert torch.allclose(cp.interpolate(RF.t_min), x, rtol=0, atol=1e-15)
    assert torch.allclose(cp.interpolate(RF.t_max), z, rtol=0, atol=1e-15)
    X0, X1 = cp.endpoints()
    for t in (RF.t_min, 0.3, 0.77, RF.t_max):
        tt = torch.tensor(t, dtype=torch.float64)
        line = RF.alpha(tt) * X0 + RF.sigma(tt) * X1
        assert torch.allclose(line, cp.interpolate(t), rtol=0, atol=1e-14)
    assert torch.allclose(X1 - X0, cp.velocity, rtol=1e-14, atol=0)


@pytest.mark.slow
def test_training_on_a_straight_coupling_gives_one_step_sampling():
    """x = 0.5 z + 1: the lines (2) never cross, so the rectified velocity is the lines' own (z - x)/(T - t0) and the
    flow is straight; a small network fitted for 400 steps makes one Euler step land within 0.1 of x (measured 0.062;
    the untrained, zero-output network misses by E|z - x| ~ 1.1), and the learned field runs in the package's
    samplers."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    cp = Coupling(0.5 * z + 1.0, z, RF.t_min, RF.t_max)
    torch.manual_seed(0)
    net = MLPScore(1, hidden=32, depth=2)
    field, hist = train_rectified(net, cp, RF, steps=400, batch=128, lr=3e-3, sigma_data=0.5, seed=0, log_every=200)
    assert len(hist) == 2 and hist[-1]["loss"] < hist[0]["loss"]
    zt = torch.randn(500, 1, generator=g, dtype=torch.float64)
    err = float((one_step(field, zt) - (0.5 * zt + 1.0)).abs().mean())
    assert err < 0.1, err
    assert straightness(field, zt, 8).S < 1e-2
    res = sample(field, zt, "heun", steps=4)
    assert res.nfe > 0 and float((res.x - (0.5 * zt + 1.0)).abs().mean()) < 0.1


def test_reflow_rounds_and_bad_input():
    tg = targets.bimodal_1d()
    z = tg.marginal(RF, RF.t_max).sample(256, generator=torch.Generator().manual_seed(5))
    rounds = reflow(tg.field(RF), z, 1, lambda: MLPScore(1, hidden=8, depth=1), steps=3, batch=16, couple_steps=4)
    assert [r.k for r in rounds] == [0, 1] and rounds[1].coupling.nfe == 16
    assert torch.isfinite(one_step(rounds[1].field, z)).all()
    with pytest.raises(ValueError, match="RectifiedFlow"):
        couple(tg.field(VPLinear()), z)
    with pytest.raises(ValueError, match="even"):
        straightness(tg.field(RF), z, 7)
    with pytest.raises(ValueError, match="'euler'"):
        couple(tg.field(RF), z, solver="euler")


def test_reflow_checks_fail_on_planted_errors():
    from theory_checks.reflow_checks import reflow_marginals_residual

    assert reflow_marginals_residual(sign=-1.0).residual > 1e-2  # the regression coefficient's sign flipped


@pytest.mark.slow
def test_reflow_cost_check_fails_on_planted_error():
    from theory_checks.reflow_checks import reflow_cost_residual

    assert reflow_cost_residual(sign=-1.0).residual == float("inf")


@pytest.mark.slow
def test_reflow_rounds_experiment_quick(tmp_path):
    """The gallery experiment in quick mode writes its files; round 0 (the exact field) has MMD^2 of its ODE law
    within 5 SE of 0, and one Euler step from the exact field is far off (MMD^2 > 0.1: it lands near the mean)."""
    import json

    from experiments import reflow_rounds

    headline = reflow_rounds.main(["--quick", "--rounds", "1", "--targets", "bimodal_1d", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "reflow_rounds.json").read_text())
    rows = doc["headline"]["rows"]
    assert [r["S"] for r in headline["rows"]] == [r["S"] for r in rows]  # main returns the headline it wrote
    assert [r["round"] for r in rows] == [0, 1] and (tmp_path / "reflow_rounds.png").stat().st_size > 0
    assert abs(rows[0]["ode_mmd2"]) < 5 * rows[0]["ode_mmd2_se"] and rows[0]["euler1_mmd2"] > 0.1
    assert rows[1]["S"] < rows[0]["S"]


def _roundtrip(sd):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_reflow_trainer_resumes_bitwise_across_a_round_and_round_one_is_train_rectified():
    """ReflowTrainer, 2 rounds x 4 steps: run(5) (inside round 2); state through a weights_only file; a fresh trainer
    loads it and runs to 8: bitwise the weights, EMA, Adam state and log of run(8) in one call; a state saved at the
    round boundary (step 4) continues the same way. Round 1 is couple + train_rectified with the same network
    initialisation and seed, bitwise."""
    from diffusion_lab.reflow import ReflowTrainer

    tg = targets.bimodal_1d()
    z = tg.marginal(RF, RF.t_max).sample(128, generator=torch.Generator().manual_seed(5))
    field = tg.field(RF)
    kw = dict(rounds=2, steps_per_round=4, batch=16, lr=3e-3, sigma_data=0.8, seed=2, couple_steps=4, log_every=3)
    make = lambda: MLPScore(1, hidden=8, depth=1)  # noqa: E731
    straight = ReflowTrainer(field, z, make, **kw)
    straight.run(8)
    assert [(r["step"], r["round"]) for r in straight.history] == [(3, 1), (6, 2), (8, 2)]
    assert straight.teacher_calls == 16 and straight.coupling_calls == 16  # RK4 x 4 steps per coupling
    for cut in (5, 4):
        first = ReflowTrainer(field, z, make, **kw)
        first.run(cut)
        sd = _roundtrip(first.state_dict())
        second = ReflowTrainer(field, z, make, **kw)
        second.load_state_dict(sd)
        second.run(8)
        a, b = straight.trainer, second.trainer
        for ma, mb in ((a.net, b.net), (a.ema.module, b.ema.module)):
            for p, q in zip(ma.state_dict().values(), mb.state_dict().values()):
                assert torch.equal(p, q), cut
        for i, s in a.opt.state_dict()["state"].items():
            assert all(torch.equal(v, b.opt.state_dict()["state"][i][k]) for k, v in s.items())
        assert torch.equal(straight.coupling.x, second.coupling.x)
        assert straight.history == second.history and second.round == 2
        assert (second.teacher_calls, second.coupling_calls) == (16, 16)
    one = ReflowTrainer(field, z, make, **{**kw, "rounds": 1})
    one.run(4)
    with torch.random.fork_rng():
        torch.manual_seed(kw["seed"] + 1)
        net = make()
    f, hist = train_rectified(net, couple(field, z, steps=4), RF, steps=4, batch=16, lr=3e-3, sigma_data=0.8,
                              seed=kw["seed"] + 1, log_every=3)
    for p, q in zip(f.model.net.parameters(), one.field().model.net.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="cannot run to step 5"):
        one.run(5)
    other = ReflowTrainer(field, z[:64], make, **kw)
    with pytest.raises(ValueError, match="other noise samples"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="RectifiedFlow"):
        ReflowTrainer(tg.field(VPLinear()), z, make)
