"""MeanFlow and shortcut models (diffusion_lab.meanflow): the jvp target against finite differences and the closed-form
Gaussian average velocity, zero loss at the exact u, the shortcut self-consistency target at the exact map, training
on a 1-D Gaussian, flow-map call convention, exact NFE and teacher counts, bad input."""
import math

import pytest
import torch

from diffusion_lab import RectifiedFlow, VPLinear, sample, targets, time_grid
from diffusion_lab.flowmap import TwoTimeMLP, flow_map_sample
from diffusion_lab.flows import gaussian_flow_map
from diffusion_lab.meanflow import (MeanFlowMap, ShortcutMap, meanflow_loss, meanflow_map, meanflow_target,
                                    sample_meanflow_times, shortcut_map, shortcut_target, train_meanflow,
                                    train_shortcut)

RF = RectifiedFlow()
VP = VPLinear()
MU, VAR = 1.0, 0.25  # 1-D Gaussian data N(MU, VAR)


def exact_u(schedule, mu=MU, var=VAR):
    """u(z, r, t) = (z - Phi_{t->r}(z)) / (t - r) for 1-D Gaussian data, written here from the closed form
    Phi_{t->r}(z) = alpha_r mu + sqrt((alpha_r^2 var + sigma_r^2) / (alpha_t^2 var + sigma_t^2)) (z - alpha_t mu)."""
    def u(z, r, t):
        a_r, s_r, a_t, s_t = (c[:, None] for c in (schedule.alpha(r), schedule.sigma(r), schedule.alpha(t),
                                                     schedule.sigma(t)))
        k = torch.sqrt((a_r ** 2 * var + s_r ** 2) / (a_t ** 2 * var + s_t ** 2))
        return (z - (a_r * mu + k * (z - a_t * mu))) / (t - r)[:, None]
    return u


def exact_velocity(schedule, z, t, mu=MU, var=VAR):
    """PF-ODE velocity of N(mu, var) data: d/dt of the map, (alpha' mu) + (d/dt log std_t) (z - alpha mu)."""
    a, s, da, ds = (c[:, None] for c in (schedule.alpha(t), schedule.sigma(t), schedule.dalpha(t), schedule.dsigma(t)))
    var_t = a ** 2 * var + s ** 2
    return da * mu + (a * da * var + s * ds) / var_t * (z - a * mu)


def _points(schedule, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = 0.05 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    t = r + 0.05 + 0.4 * torch.rand(n, generator=g, dtype=torch.float64)
    z = MU * schedule.alpha(t)[:, None] + torch.sqrt(schedule.alpha(t) ** 2 * VAR + schedule.sigma(t) ** 2)[:, None] \
        * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return z, r, t


@pytest.mark.parametrize("schedule", [RF, VP], ids=["rf", "vp"])
def test_jvp_target_matches_finite_differences_and_identity(schedule):
    z, r, t = _points(schedule)
    u_fn = exact_u(schedule)
    v = exact_velocity(schedule, z, t)
    u, target, du_dt = meanflow_target(u_fn, z, r, t, v)
    # central difference of u along the path direction (v, 0, 1): truncation O(h^2 u''') ~ 1e-8 at h = 1e-4,
    # round-off ~ 1e-16 / 1e-4 = 1e-12
    h = 1e-4
    fd = (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)
    assert torch.allclose(du_dt, fd, rtol=0, atol=1e-6 * (1 + float(fd.abs().max())))
    # the exact u satisfies the MeanFlow identity: the target equals u to round-off
    assert float((u - target).abs().max()) < 1e-12 * (1 + float(u.abs().max()))
    # the opposite sign (or the tangent on r instead of t) does not
    assert float((u - (v + (t - r)[:, None] * du_dt)).abs().max()) > 1e-2
    _, _, du_dr = meanflow_target(lambda z_, t_, r_: u_fn(z_, r_, t_), z, t, r, v)
    assert float((du_dr - du_dt).abs().max()) > 1e-2


def test_forward_ad_and_func_jvp_agree():
    z, r, t = _points(RF, 16)
    a = meanflow_target(exact_u(RF), z, r, t, exact_velocity(RF, z, t), jvp="func")
    b = meanflow_target(exact_u(RF), z, r, t, exact_velocity(RF, z, t), jvp="forward_ad")
    for x, y in zip(a, b):
        assert torch.allclose(x, y, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="'reverse'"):
        meanflow_target(exact_u(RF), z, r, t, z, jvp="reverse")


def test_exact_u_gives_zero_loss_and_perturbed_does_not():
    """With the exact average velocity as the network and the exact (marginal) velocity as v -- MeanFlow
    distillation from an exact teacher -- every per-sample loss is zero to float64 round-off."""
    z, r, t = _points(RF)
    v = exact_velocity(RF, z, t)
    u_fn = exact_u(RF)
    for p in (0.0, 1.0):
        loss = meanflow_loss(u_fn, z, r, t, v, p=p)
        assert float(loss.max()) < 1e-26, (p, float(loss.max()))
    bad = meanflow_loss(lambda z_, r_, t_: u_fn(z_, r_, t_) + 0.01 * z_ * t_[:, None], z, r, t, v, p=0.0)
    assert float(bad.mean()) > 1e-6


def test_shortcut_target_at_exact_map_is_exact_and_euler_is_two_steps():
    """At the exact average velocity s*(x, tau, d) = (x - Phi_{tau -> tau-d}(x))/d the self-consistency target of two
    d-steps is s*(x, tau, 2d) (the semigroup property of Phi); with an Euler s = v it is the two-Euler-step slope."""
    tg = targets.Gaussian([MU], [[VAR]])
    g = torch.Generator().manual_seed(3)
    for sch in (RF, VP):
        def s_exact(x, tau, d):
            return torch.stack([(x[i] - gaussian_flow_map(tg, sch, x[i:i + 1], float(tau[i]),
                                                           float(tau[i] - d[i]))[0]) / d[i] for i in range(len(x))])
        tau = 0.3 + 0.6 * torch.rand(32, generator=g, dtype=torch.float64)
        d = 0.01 + 0.1 * torch.rand(32, generator=g, dtype=torch.float64)
        x = tg.marginal(sch, 0.5).sample(32, generator=g)
        tgt = shortcut_target(s_exact, x, tau, d)
        assert torch.allclose(tgt, s_exact(x, tau, 2 * d), rtol=0, atol=1e-12), sch
        # a shortcut of the exact map is not the velocity: the target differs from v by O(d)
        assert float((tgt - exact_velocity(sch, x, tau)).abs().max()) > 1e-4
    v_fn = lambda x, tau, d: exact_velocity(RF, x, tau)  # noqa: E731
    tgt = shortcut_target(v_fn, x, tau, d)
    x1 = x - d[:, None] * exact_velocity(RF, x, tau)
    x2 = x1 - d[:, None] * exact_velocity(RF, x1, tau - d)
    assert torch.allclose(x - 2 * d[:, None] * tgt, x2, rtol=0, atol=1e-14)


def _random(kind, sch, seed=0):
    torch.manual_seed(seed)
    net = TwoTimeMLP(2, hidden=16, depth=2, time_scale=1000.0).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return MeanFlowMap(net, sch) if kind == "meanflow" else ShortcutMap(net, sch, levels=5)


@pytest.mark.parametrize("kind", ["meanflow", "shortcut"])
def test_flow_map_convention_boundary_and_nfe(kind):
    psi = _random(kind, RF)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (RF.t_min, 0.4, RF.t_max, torch.linspace(RF.t_min, RF.t_max, 16, dtype=torch.float64)):
        assert torch.equal(psi(x, t, t), x)
    assert psi.nfe == 4
    # Psi(x, s, t) = x - (s - t) w with w the network's average velocity at the right arguments
    s_, t_ = torch.full((16,), 0.7, dtype=torch.float64), torch.full((16,), 0.2, dtype=torch.float64)
    w = psi.u(x, t_, s_) if kind == "meanflow" else psi.step_velocity(x, s_, s_ - t_)
    assert torch.allclose(psi(x, 0.7, 0.2), x - 0.5 * w, rtol=0, atol=1e-15)
    res = flow_map_sample(psi, x, 2, grid_kind="uniform")
    g = time_grid(RF, 2, "uniform")
    assert res.nfe == 2 and torch.equal(res.x, psi(psi(x, float(g[0]), float(g[1])), float(g[1]), float(g[2])))
    # the package's sampler front end takes it as a flow map (duck type): the same chain, the same NFE
    out = sample(psi, x, "flow_map", steps=2, grid_kind="uniform")
    assert out.nfe == 2 and torch.equal(out.x, res.x)
    with pytest.raises(ValueError, match="0.2"):
        psi(x, 0.2, 0.5)
    with pytest.raises(ValueError, match="outside the valid range"):
        psi(x, 1.5, 0.5)


def test_shortcut_finest_steps_are_flow_steps():
    sm = _random("shortcut", RF)
    x = torch.randn(8, 2, dtype=torch.float64)
    tau = torch.full((8,), 0.5, dtype=torch.float64)
    d_min = (RF.t_max - RF.t_min) / 2 ** 5
    assert math.isclose(sm.d_min, d_min)
    assert torch.equal(sm.step_velocity(x, tau, torch.full((8,), d_min, dtype=torch.float64)),
                       sm.step_velocity(x, tau, torch.zeros(8, dtype=torch.float64)))
    assert not torch.equal(sm.step_velocity(x, tau, torch.full((8,), 2 * d_min, dtype=torch.float64)),
                           sm.step_velocity(x, tau, torch.zeros(8, dtype=torch.float64)))


def test_meanflow_time_sampling():
    r, t = sample_meanflow_times(RF, 1000, generator=torch.Generator().manual_seed(0))
    assert r.dtype == torch.float64 and bool((r <= t).all())
    assert float(r.min()) >= RF.t_min and float(t.max()) <= RF.t_max
    assert int((r < t).sum()) == 250  # the paper's 25% with r != t (continuous draws never tie)
    r, t = sample_meanflow_times(RF, 8, distribution="uniform", fraction_r_neq_t=1.0,
                                 generator=torch.Generator().manual_seed(0))
    assert bool((r < t).all())
    with pytest.raises(ValueError, match="'beta'"):
        sample_meanflow_times(RF, 4, distribution="beta")
    with pytest.raises(ValueError, match="1.5"):
        sample_meanflow_times(RF, 4, fraction_r_neq_t=1.5)


def test_meanflow_gradient_step_descends():
    """The loss's gradient reaches the parameters through the jvp's primal output (and not through the
    stop-gradient target): one small SGD step lowers the loss on the same batch, and the target is unchanged by
    a change of the loss' weighting."""
    torch.manual_seed(0)
    mf = meanflow_map(1, RF, hidden=16, depth=1).double()
    with torch.no_grad():
        mf.net.out.weight.normal_(0, 0.3)
    z, r, t = _points(RF, 128, seed=4)
    v = exact_velocity(RF, z, t)
    loss0 = meanflow_loss(mf.u, z, r, t, v, p=0.0).mean()
    grads = torch.autograd.grad(loss0, list(mf.net.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    with torch.no_grad():
        for p_, g in zip(mf.net.parameters(), grads):
            p_.sub_(1e-3 * g)
    loss1 = meanflow_loss(mf.u, z, r, t, v, p=0.0).mean()
    assert float(loss1) < float(loss0)


@pytest.mark.slow
def test_meanflow_training_reduces_one_step_error():
    """MeanFlow from data alone (conditional velocity, the paper's defaults) on 1-D N(1, 0.25), RectifiedFlow, 800
    steps. The untrained map is the identity (zero output layer), one-step error E_0 = mean|x_T - Phi(x_T)| ~ 0.97.
    Measured (online weights, training seeds 0 and 1): one step 0.37 E_0 and 0.59 E_0, two steps 0.08 E_0 and
    0.27 E_0. Asserted (seed 0, with room for the seed-to-seed spread seen): one step < 0.75 E_0, two steps < 0.4 E_0.
    The one-step map converges slowest: the logit-normal times rarely draw t near t_max with r near t_min."""
    tg = targets.Gaussian([MU], [[VAR]])
    data = tg.sample(4096, generator=torch.Generator().manual_seed(1)).float()
    xT = tg.marginal(RF, RF.t_max).sample(1000, generator=torch.Generator().manual_seed(2))
    phi = gaussian_flow_map(tg, RF, xT, RF.t_max, RF.t_min)
    torch.manual_seed(0)
    mf = meanflow_map(1, RF, hidden=32, depth=2)
    e0 = float((flow_map_sample(mf, xT.float(), 1).x.double() - phi).abs().mean())
    res = train_meanflow(mf, data, steps=800, batch=128, lr=3e-3)
    assert res.teacher_calls == 0 and res.teacher_evals == 0
    e1, e2 = (float((flow_map_sample(res.psi, xT.float(), k, grid_kind="uniform").x.double() - phi).abs().mean())
              for k in (1, 2))
    assert e0 > 0.9, e0
    assert e1 < 0.75 * e0 and e2 < 0.4 * e0, (e0, e1, e2)


def test_teacher_counts_and_bad_input():
    tg = targets.ring8()
    field = tg.field(RF)
    data = tg.sample(512, generator=torch.Generator().manual_seed(1)).float()
    mf = meanflow_map(2, RF, hidden=8, depth=1)
    n0 = field.nfe
    res = train_meanflow(mf, data, teacher=field, steps=3, batch=16)
    assert res.teacher_calls == field.nfe - n0 == 3 and res.teacher_evals == 48
    assert len(res.history) == 1 and math.isfinite(res.history[0]["loss"]) and res.psi_ema.nfe == 0
    sm = shortcut_map(2, RF, hidden=8, depth=1, levels=3)
    n0 = field.nfe
    res = train_shortcut(sm, data, teacher=field, steps=3, batch=32, bootstrap_every=8)
    assert res.teacher_calls == field.nfe - n0 == 3 and res.teacher_evals == 3 * 28  # flow-matching rows only
    assert math.isfinite(res.history[-1]["loss"])
    res = train_shortcut(sm, data, steps=2, batch=32)
    assert res.teacher_calls == 0
    with pytest.raises(ValueError, match="schedule"):
        train_meanflow(mf, data, teacher=tg.field(VP), steps=1)
    with pytest.raises(ValueError, match="bootstrap_every"):
        train_shortcut(sm, data, steps=1, batch=16, bootstrap_every=8)  # 2 self-consistency rows < 3 levels
    with pytest.raises(ValueError, match="levels"):
        ShortcutMap(TwoTimeMLP(2), RF, levels=0)
    with pytest.raises(ValueError, match="p="):
        train_meanflow(mf, data, steps=1, p=-1.0)
    with pytest.raises(ValueError, match="'reverse'"):
        train_meanflow(mf, data, steps=1, jvp="reverse")
    # the two jvp modes train identically (same product, same random stream)
    def run(mode):
        torch.manual_seed(5)
        return train_meanflow(meanflow_map(2, RF, hidden=8, depth=1).double(), data.double(), steps=2, batch=16,
                              jvp=mode)
    a, b = run("func"), run("forward_ad")
    for pa, pb in zip(a.psi.net.parameters(), b.psi.net.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-12)
    with pytest.raises(TypeError, match="Schedule"):
        MeanFlowMap(TwoTimeMLP(2), "rf")
    with pytest.raises(TypeError, match="MeanFlowMap"):
        train_meanflow(sm, data, steps=1)


def _roundtrip(sd):
    """A state through torch.save / torch.load(weights_only=True), as a checkpoint file holds it."""
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same_trainers(a, b):
    for key in ("net", "ema", *(["target"] if hasattr(a, "target") else [])):
        ma = a.net if key == "net" else getattr(a, key).module
        mb = b.net if key == "net" else getattr(b, key).module
        for p, q in zip(ma.state_dict().values(), mb.state_dict().values()):
            assert torch.equal(p, q), key
    for i, s in a.opt.state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b.opt.state_dict()["state"][i][k]), (i, k)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert a.history == b.history and a.teacher_calls == b.teacher_calls and a.step == b.step


@pytest.mark.parametrize("method", ["meanflow", "shortcut"])
def test_trainer_resumed_from_a_saved_state_is_bitwise_one_run(method):
    """run(2k) == run(k); state_dict through a weights_only file; a fresh trainer (other initial weights)
    load_state_dict; run(2k); and the wrapper train_* is the same run (k = 3 steps, logs every 2 steps, so the
    interruption falls between log records)."""
    from diffusion_lab.meanflow import MeanFlowTrainer, ShortcutTrainer

    tg = targets.ring8()
    field = tg.field(RF)
    data = tg.sample(512, generator=torch.Generator().manual_seed(1)).float()
    if method == "meanflow":
        make = lambda: meanflow_map(2, RF, hidden=16, depth=1)  # noqa: E731
        kw = dict(batch=32, lr=2e-3, ema_decay=0.9, seed=3, log_every=2, jvp="forward_ad")
        cls, fn = MeanFlowTrainer, train_meanflow
    else:
        make = lambda: shortcut_map(2, RF, hidden=16, depth=1, levels=3)  # noqa: E731
        kw = dict(batch=32, lr=2e-3, ema_decay=0.9, seed=3, log_every=2, target_decay=0.5)
        cls, fn = ShortcutTrainer, train_shortcut
    torch.manual_seed(0)
    straight = cls(make(), field, data, **kw)
    straight.run(6)
    torch.manual_seed(0)
    first = cls(make(), field, data, **kw)
    first.run(3)
    sd = _roundtrip(first.state_dict())
    torch.manual_seed(7)  # other initial weights: everything must come from the state
    second = cls(make(), field, data, **kw)
    second.load_state_dict(sd)
    assert second.step == 3
    second.run(6)
    _assert_same_trainers(straight, second)
    assert [r["step"] for r in second.history] == [2, 4, 6] and straight.teacher_calls == 6
    assert second.teacher_evals == 6 * (32 if method == "meanflow" else 28)  # shortcut: flow-matching rows only
    torch.manual_seed(0)
    res = fn(make(), data, teacher=field, steps=6, **kw)
    for p, q in zip(res.psi_ema.net.parameters(), second.flow_map().net.parameters()):
        assert torch.equal(p, q)
    assert res.history == second.history and res.settings == second.settings()
    with pytest.raises(ValueError, match="steps must be"):
        second.run(0)
