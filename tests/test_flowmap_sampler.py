"""``sample(..., method="flow_map")``: a learned flow map as a sampler of the registry, and its rows in ``compare``.

The exact Gaussian flow map (a FlowMap whose network is the residual solved from the parameterisation with the
closed-form map ``flows.gaussian_flow_map``, as in tests/test_flowmap.py) must reach the exact terminal sample in one
call; NFE counts are exact; a flow map and a field on different schedules are refused."""
import math

import pytest
import torch

from diffusion_lab import VPLinear, targets, time_grid
from diffusion_lab.flowmap import FlowMap, TwoTimeMLP, flow_map_sample
from diffusion_lab.flows import gaussian_flow_map
from diffusion_lab.samplers import available, get_method, sample
from diffusion_lab.schedules import EDM, VPCosine
from diffusion_lab.training import edm_precond

SCH = VPLinear()
GAUSS = targets.Gaussian([1.0, -0.5], [[1.0, 0.6], [0.6, 0.5]])


class ExactResidual:
    """F(c_in x, c_s, c_t) making the FlowMap the closed-form Gaussian map (solved from Psi = r x + b g)."""

    def __init__(self, target, schedule, sigma_data):
        self.target, self.sch, self.sd = target, schedule, sigma_data

    def __call__(self, x_in, c_s, c_t):
        assert torch.all(c_s == c_s[0]) and torch.all(c_t == c_t[0])
        s = float(self.sch.t_from_lam(-4.0 * c_s[0].double()))
        t = float(self.sch.t_from_lam(-4.0 * c_t[0].double()))
        c_skip, c_out, cin, _ = (float(c) for c in edm_precond(self.sch, torch.tensor(s, dtype=torch.float64), self.sd))
        x = x_in / cin
        a = lambda v: float(self.sch.alpha(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
        sg = lambda v: float(self.sch.sigma(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
        ratio = sg(t) / sg(s)
        g = (gaussian_flow_map(self.target, self.sch, x, s, t) - ratio * x) / (a(t) - a(s) * ratio)
        return (g - c_skip * x) / c_out


def exact_map(target=GAUSS, schedule=SCH):
    return FlowMap(ExactResidual(target, schedule, 0.5), schedule, sigma_data=0.5)


def _random_map(dim=2, seed=0, schedule=SCH):
    torch.manual_seed(seed)
    net = TwoTimeMLP(dim, hidden=16, depth=2).double()
    with torch.no_grad():  # a non-zero output layer, so that different calls give different results
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return FlowMap(net, schedule)


def _x_T(n=256, seed=3, schedule=SCH):
    return GAUSS.marginal(schedule, schedule.t_max).sample(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("grid_kind", ["logsnr", "uniform", "karras", "quadratic"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_exact_map_reaches_the_exact_terminal_sample(k, grid_kind):
    """The chain of the exact map composes Phi_{t_i -> t_i+1} into Phi_{T -> t_min} (semigroup), so every k and
    grid reaches the closed-form terminal sample; the bound is round-off: F is solved from the parameterisation
    and put back, a few ulps of |x| / b, amplified by the c_noise -> t inversion (1e-11 relative, as in
    tests/test_flowmap.py), over k composed calls."""
    x = _x_T()
    field = GAUSS.field(SCH)
    psi = exact_map()
    ref = gaussian_flow_map(GAUSS, SCH, x, SCH.t_max, SCH.t_min)
    n_field = field.nfe
    res = sample(field, x, "flow_map", steps=k, grid_kind=grid_kind, flow_map=psi)
    assert res.nfe == k and psi.nfe == k and field.nfe == n_field  # the field is never called
    assert res.x.dtype == torch.float64
    err = float((res.x - ref).abs().max())
    assert err < 1e-10 * (1 + float(ref.abs().max())), (k, grid_kind, err)
    assert res.method == "flow_map" and res.settings["steps"] == k and len(res.grid) == k + 1


@pytest.mark.parametrize("k", [1, 2, 4])
def test_nfe_budget_and_steps_agree_and_count_exactly(k):
    psi = _random_map()
    field = GAUSS.field(SCH)
    x = _x_T(16)
    a = sample(field, x, "flow_map", nfe=k, flow_map=psi)
    b = sample(psi, x, "flow_map", steps=k)  # the map alone, on its own schedule
    assert a.nfe == b.nfe == k and psi.nfe == 2 * k
    assert torch.equal(a.x, b.x) and torch.equal(a.grid, b.grid)
    assert get_method("flow_map").nfe_of_steps(k) == k


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_equals_flow_map_sample_bitwise(k, noise):
    """The registered method and ``flowmap.flow_map_sample`` are the same algorithm (same calls, same noise
    draws from the same generator)."""
    psi = _random_map()
    x = _x_T(32)
    a = sample(psi, x, "flow_map", steps=k, noise_reinjection=noise, generator=torch.Generator().manual_seed(7))
    b = flow_map_sample(psi, x, k, noise_reinjection=noise, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe == k


def test_multistep_consistency_sampling_is_the_published_algorithm():
    """Song et al. 2023, Algorithm 1 written out: x0 = f(x_T, T); for the next time tau: x = a_tau x0 + s_tau z,
    x0 = f(x, tau); with f(x, s) = Psi(x, s, t_min)."""
    psi = _random_map()
    x = _x_T(32)
    g = time_grid(SCH, 3, "logsnr")
    gen = torch.Generator().manual_seed(11)
    x0 = psi(x, float(g[0]), SCH.t_min)
    for tau in g[1:-1]:
        z = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x0 = psi(float(SCH.alpha(tau)) * x0 + float(SCH.sigma(tau)) * z, float(tau), SCH.t_min)
    res = sample(psi, x, "flow_map", grid=g, noise_reinjection=True, generator=torch.Generator().manual_seed(11))
    assert torch.equal(res.x, x0) and res.nfe == 3


def test_trajectory_and_user_grid():
    psi = exact_map()
    x = _x_T(64)
    grid = [SCH.t_max, 0.4, 0.05, SCH.t_min]
    res = sample(psi, x, "flow_map", grid=grid, return_trajectory=True)
    assert res.trajectory.shape == (4, *x.shape) and res.nfe == 3
    for i, t in enumerate(grid):  # every state of the chain is the exact map to its time
        ref = gaussian_flow_map(GAUSS, SCH, x, SCH.t_max, t) if i else x
        assert float((res.trajectory[i] - ref).abs().max()) < 1e-10 * (1 + float(ref.abs().max())), i


def test_final_denoise_uses_the_field_and_counts_its_call():
    field = GAUSS.field(SCH)
    psi = exact_map()
    x = _x_T(64)
    res = sample(field, x, "flow_map", steps=2, flow_map=psi, final="denoise")
    assert res.nfe == 3  # two map calls + the field's denoiser
    ref = field.denoiser(gaussian_flow_map(GAUSS, SCH, x, SCH.t_max, SCH.t_min), SCH.t_min)
    assert float((res.x - ref).abs().max()) < 1e-9
    with pytest.raises(ValueError, match="denoiser"):
        sample(psi, x, "flow_map", steps=2, final="denoise")


def test_refusals():
    psi = _random_map()
    x = _x_T(8)
    with pytest.raises(ValueError, match="differs from the field's"):
        sample(GAUSS.field(VPLinear(beta_max=10.0)), x, "flow_map", steps=1, flow_map=psi)
    with pytest.raises(ValueError, match="differs from the field's"):
        sample(GAUSS.field(VPCosine()), x, "flow_map", steps=1, flow_map=psi)
    with pytest.raises(TypeError, match="flow_map=psi"):
        sample(GAUSS.field(SCH), x, "flow_map", steps=1)
    with pytest.raises(TypeError, match="method='flow_map'"):
        sample(psi, x, "heun", steps=1)
    with pytest.raises(TypeError, match="option of method 'flow_map'"):
        sample(GAUSS.field(SCH), x, "heun", steps=1, flow_map=psi)
    with pytest.raises(TypeError, match="FlowMap"):
        sample(GAUSS.field(SCH), x, "flow_map", steps=1, flow_map=GAUSS.field(SCH))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(psi, x, "flow_map", grid=[SCH.t_min, 0.5])
    with pytest.raises(TypeError, match="noise_reinjection"):
        sample(psi, x, "flow_map", steps=2, noise_reinjection="yes")
    assert psi.nfe == 0  # every refusal comes before the first call


def test_registry_lists_flow_map_only_on_request():
    assert "flow_map" not in {m.name for m in available()}
    info = {m.name: m for m in available(flow_maps=True)}["flow_map"]
    assert info.needs == "flow_map" and info.family == "flow_map" and math.isnan(info.order)


def test_works_on_the_edm_schedule_too():
    sch = EDM()
    x = GAUSS.marginal(sch, sch.t_max).sample(64, generator=torch.Generator().manual_seed(1))
    ref = gaussian_flow_map(GAUSS, sch, x, sch.t_max, sch.t_min)
    res = sample(GAUSS.field(sch), x, "flow_map", steps=1, flow_map=exact_map(schedule=sch))
    assert res.nfe == 1
    assert float((res.x - ref).abs().max()) < 1e-10 * (1 + float(ref.abs().max()))


def test_compare_rows_for_flow_maps_share_starts_and_metrics():
    """run_comparison's flow-map rows: the exact map's chain reproduces the reference flow map (flow_error at
    round-off: DOP853 at rtol 1e-10 against the closed form), and its MMD^2 is then the exact flow map's own value
    (same samples up to ~1e-10, so the U-statistic agrees to ~1e-9); NFE counts exact; the multistep variant has no
    flow error; a map on another schedule is refused before any work."""
    from diffusion_lab.compare import run_comparison

    psi = exact_map()
    out = run_comparison(GAUSS, SCH, ["ddim"], [5], n_samples=300, null_repeats=2,
                         flow_maps={"exact map": psi, "exact map +noise": (psi, {"noise_reinjection": True})},
                         flow_map_nfes=(1, 2, 4, 8))
    rows = [r for r in out["rows"] if r["family"] == "flow_map"]
    assert [(r["sampler"], r["nfe"]) for r in rows] == [(lab, k) for lab in ("exact map", "exact map +noise")
                                                        for k in (1, 2, 4, 8)]
    ref = out["reference"]
    for r in rows[:4]:
        assert r["flow_error"] < 1e-8, r
        assert abs(r["mmd2"] - ref["mmd2_exact_flow"]) < 1e-8 and math.isnan(r["w2_exact"])
    assert all(math.isnan(r["flow_error"]) and r["stochastic"] for r in rows[4:])
    assert ref["ranking"][1] and "exact map" in ref["ranking"][8]
    ddim = next(r for r in out["rows"] if r["sampler"] == "ddim")
    assert ddim["flow_error"] > 1e-3  # DDIM at 5 steps is visibly off the map the exact flow map reproduces
    with pytest.raises(ValueError, match="schedule"):
        run_comparison(GAUSS, VPCosine(), ["ddim"], [5], n_samples=300, flow_maps={"m": psi})
    with pytest.raises(ValueError, match="no option 'noise'"):
        run_comparison(GAUSS, SCH, ["ddim"], [5], n_samples=300, flow_maps={"m": (psi, {"noise": True})})


@pytest.mark.slow
def test_consistency_steps_experiment_quick(tmp_path):
    """experiments.consistency_steps --quick runs end to end; its exact-map row has flow error 0 and the ODE rows
    reproduce the package's samplers at their budgets (DDIM at NFE 5 on ring8 is ~0.44 off the map, seed-independent
    to ~0.01 at 1000 samples)."""
    from experiments import consistency_steps

    h = consistency_steps.main(["--quick", "--out", str(tmp_path), "--format", "png"])
    assert 0.40 < h["ddim_nfe5_err"] < 0.48
    assert {v["verdict"].split()[-1] for v in h["verdicts"]} <= {"better", "worse", "resolved"}
    assert (tmp_path / "consistency_steps.json").exists() and (tmp_path / "consistency_steps_error.png").exists()
