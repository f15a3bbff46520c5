"""The grid optimiser: the DP against brute force, the exact-history step costs against the samplers themselves,
the pilot objective against every fixed grid (with an independent reference flow map), the cache, a learned-style
field, the time_grid dispatch and the Align Your Steps schedules."""
import itertools
import math

import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.field import VelocityField
from diffusion_lab.reference import flow_map
from diffusion_lab.samplers import GRID_KINDS, optimize_grid, sample, time_grid
from diffusion_lab.samplers import optimize as O

SMALL = dict(candidates=17, n_pilot=16, refine=1)


@pytest.fixture(autouse=True)
def _fresh_cache():
    O.clear_cache()
    yield
    O.clear_cache()


def _brute(costs, M, n, objective):
    best = math.inf
    for inner in itertools.combinations(range(1, M - 1), n - 1):
        best = min(best, O.path_value(costs, [0, *inner, M - 1], objective))
    return best


@pytest.mark.parametrize("objective", ["sum", "max"])
@pytest.mark.parametrize("history", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_matches_brute_force(objective, history, seed):
    M, n = 8, 3
    g = torch.Generator().manual_seed(seed)
    costs = [torch.rand(M, M, generator=g, dtype=torch.float64)]
    for _ in range(n - 1):
        costs.append(torch.rand(M, M, M, generator=g, dtype=torch.float64) if history
                     else torch.rand(M, M, generator=g, dtype=torch.float64))
    value, path = O.dp_optimal_path(costs, objective)
    assert path[0] == 0 and path[-1] == M - 1 and all(a < b for a, b in zip(path, path[1:])) and len(path) == n + 1
    assert value == pytest.approx(O.path_value(costs, path, objective), rel=1e-14)
    assert value == pytest.approx(_brute(costs, M, n, objective), rel=1e-14)


def test_dp_on_real_costs_matches_brute_force():
    """M = 8, N = 3 on the tables the optimiser itself builds (dpmpp_2m: pair state with a warm-up step)."""
    sch = S.VPLinear()
    f = T.ring8().field(sch)
    r = optimize_grid(f, 3, "dpmpp_2m", candidates=8, n_pilot=16, refine=0)
    tk = next(iter(O._TEACHERS))
    forms, _ = O._step_forms("dpmpp_2m", 3, {})
    costs = [O._TABLES[(tk, None, fm)][1] for fm in forms]
    assert [c.ndim for c in costs] == [2, 3, 2]  # DDIM warm-up, 2M with history, lower-order final step
    assert r.dp_value == pytest.approx(_brute(costs, 8, 3, "sum"), rel=1e-12)
    assert r.dp_value == pytest.approx(O.path_value(costs, r.settings["dp_path"]), rel=1e-12)


def test_grid_is_valid_and_never_worse_than_fixed_grids_on_the_pilot():
    sch = S.VPLinear()
    f = T.gaussian_2d().field(sch)
    x_pilot = 1.0 * torch.randn(24, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    n = 4
    r = optimize_grid(f, n, "heun", x_pilot=x_pilot, **SMALL)
    g = r.grid
    assert g.dtype == torch.float64 and g.shape == (n + 1,)
    assert g[0].item() == sch.t_max and g[-1].item() == sch.t_min and bool((torch.diff(g) < 0).all())
    # independent reference: scipy DOP853 flow map, not the optimiser's own teacher
    ref, _ = flow_map(f, x_pilot, sch.t_max, sch.t_min)

    def err(grid):
        return float((sample(f, x_pilot, "heun", grid=grid).x - ref).norm(dim=1).mean())

    mine = err(g)
    assert mine == pytest.approx(r.objective_after, rel=1e-5)  # teacher (rtol 1e-8) vs DOP853: same reference
    for kind in GRID_KINDS:
        assert mine <= err(time_grid(sch, n, kind)) * (1 + 1e-6), kind
    assert r.objective_after <= r.objective_before <= min(r.fixed_terminal.values()) + 1e-15
    # with N | M - 1 the logsnr grid is one of the DP's paths, so the DP optimum cannot be above it
    assert r.dp_value <= r.dp_value_logsnr * (1 + 1e-12)


def test_cache_hit_costs_nothing():
    sch = S.VPLinear()
    f = T.bimodal_1d().field(sch)
    r1 = optimize_grid(f, 3, "dpmpp_2m", **SMALL)
    assert r1.cost_nfe > 0 and not r1.cached
    nfe = f.nfe
    r2 = optimize_grid(f, 3, "dpmpp_2m", **SMALL)
    assert r2.cached and r2.cost_nfe == 0 and f.nfe == nfe
    assert torch.equal(r1.grid, r2.grid)
    # another field object (same target) is not a hit
    f2 = T.bimodal_1d().field(sch)
    r3 = optimize_grid(f2, 3, "dpmpp_2m", **SMALL)
    assert not r3.cached and r3.cost_nfe == f2.nfe > 0


def test_learned_style_field_from_a_plain_callable():
    """A plain callable eps-model (a fixed random MLP, no x0_eps, no closed form) through VelocityField."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)).double()
    calls = []

    def model(x, t):
        calls.append(1)
        tt = t.expand(x.shape[0])[:, None] if t.ndim == 0 else t[:, None]
        with torch.no_grad():
            return 0.3 * net(torch.cat([x, tt], 1)) + x / (1 + x.pow(2).sum(1, keepdim=True)).sqrt()

    sch = S.VPLinear()
    f = VelocityField(sch, model, "eps", data_shape=(2,))
    r = optimize_grid(f, 3, "unipc", **SMALL)
    assert r.grid.shape == (4,) and bool((torch.diff(r.grid) < 0).all())
    assert r.cost_nfe == f.nfe == len(calls) > 0
    assert r.objective_after <= min(r.fixed_terminal.values())


def _captured(field, x, grid, method, **opts):
    out = sample(field, x, method, grid=grid, return_trajectory=True, **opts)
    return out.trajectory


def _teacher_dict(field, grid, traj, D):
    sch = field.schedule
    return {"traj": traj, "D": D, "cand": grid, "alpha": sch.alpha(grid).tolist(), "sigma": sch.sigma(grid).tolist(),
            "lam": sch.lam(grid).tolist()}


def test_exact_history_costs_reproduce_the_samplers_steps():
    """Fed the sampler's own states and model values as 'teacher', the dpmpp_2m and unipc step forms reproduce the
    sampler's next state: the cost is ~0 (round-off), so the forms are the methods' own steps."""
    sch = S.VPLinear()
    f = T.ring8().field(sch)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grid = torch.tensor([1.0, 0.6, 0.3, 0.1], dtype=torch.float64)
    # dpmpp_2m: step 1 -> 2 is the second-order step with history D(x_0)
    tr = _captured(f, x, grid, "dpmpp_2m", lower_order_final=False)
    D = torch.stack([f.x0_eps(tr[m], grid[m])[0] for m in range(4)])
    T2 = O._table(("dpmpp_2m",), f, "dpmpp_2m", _teacher_dict(f, grid, tr, D), False)
    assert float(T2[0, 1, 2]) < 1e-12
    C1 = O._table(("dpm1",), f, "dpmpp_2m", _teacher_dict(f, grid, tr, D), False)
    assert float(C1[0, 1]) < 1e-12  # the warm-up step
    # unipc (order 2, corrector): the history D_1 is the model at the predictor state of step 0 (UniP-1 = DDIM)
    tr = _captured(f, x, grid, "unipc", lower_order_final=False)
    a, s, lam = sch.alpha(grid).tolist(), sch.sigma(grid).tolist(), sch.lam(grid).tolist()
    D0 = f.x0_eps(tr[0], grid[0])[0]
    x_pred1 = (s[1] / s[0]) * tr[0] - (a[1] * math.expm1(-(lam[1] - lam[0]))) * D0
    D = torch.stack([D0, f.x0_eps(x_pred1, grid[1])[0], D0, D0])
    Tu = O._table(("unipc", 2, True), f, "unipc", _teacher_dict(f, grid, tr, D), False)
    assert float(Tu[0, 1, 2]) < 1e-12
    Cu = O._table(("unipc", 1, True), f, "unipc", _teacher_dict(f, grid, tr, D), False)
    assert float(Cu[0, 1]) < 1e-12


def test_step_costs_shrink_at_the_methods_order():
    """Local error of one Heun step from the teacher: O(h^3), so halving the step cuts it by ~8."""
    sch = S.VPLinear()
    f = T.gaussian_2d().field(sch)
    optimize_grid(f, 2, "heun", candidates=65, n_pilot=16, refine=0)
    tk = next(iter(O._TEACHERS))
    C = O._TABLES[(tk, "heun", ("run", O._freeze({"final_euler": False})))][1]
    for j in (8, 24):  # h = 1/64 and 2/64 of the log-SNR range (measured 7.4 and 7.7)
        ratio = float(C[j, j + 2] / C[j, j + 1])
        assert 6.0 < ratio < 10.0, (j, ratio)


def test_time_grid_dispatch_and_errors():
    sch = S.VPLinear()
    f = T.bimodal_1d().field(sch)
    with pytest.raises(ValueError, match="field and method"):
        time_grid(sch, 3, "optimized")
    with pytest.raises(ValueError, match="method"):
        time_grid(sch, 3, "optimized", field=f)
    g = time_grid(sch, 3, "optimized", field=f, method="dpmpp_2m", **SMALL)
    assert torch.equal(g, optimize_grid(f, 3, "dpmpp_2m", **SMALL).grid)
    with pytest.raises(TypeError):
        time_grid(sch, 3, "logsnr", field=f)
    with pytest.raises(ValueError, match="stochastic"):
        optimize_grid(f, 3, "em", **SMALL)


def test_ays_grid_published_values_and_interpolation():
    sch = S.EDM()  # alpha = 1: sigmabar is the EDM sigma
    g10 = time_grid(sch, 10, "ays")
    sig = torch.exp(-sch.lam(g10))
    assert torch.allclose(sig, torch.tensor(O.AYS_SIGMAS["sd15"], dtype=torch.float64), rtol=1e-10)
    # 5 steps: u = i/5 falls on every second published point, where the log-linear interpolant is exact
    g5 = time_grid(sch, 5, "ays", model="sdxl")
    assert torch.allclose(torch.exp(-sch.lam(g5)), torch.tensor(O.AYS_SIGMAS["sdxl"][::2], dtype=torch.float64),
                          rtol=1e-10)
    # 20 steps: midpoints are geometric means of neighbours
    s20 = torch.exp(-sch.lam(time_grid(sch, 20, "ays")))
    p = O.AYS_SIGMAS["sd15"]
    assert float(s20[1]) == pytest.approx(math.sqrt(p[0] * p[1]), rel=1e-10)
    g_vp = time_grid(S.VPLinear(), 10, "ays")
    assert bool((torch.diff(g_vp) < 0).all())
    with pytest.raises(ValueError, match="not inside"):
        time_grid(S.VPLinear(t_max=0.5), 10, "ays")
