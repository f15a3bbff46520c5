"""The declared defaults method="auto" / "auto_sde": the rule resolves from the budget alone, spends no more
than the budget, and equals running the chosen method by hand."""
import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.samplers import available, get_method, sample
from diffusion_lab.samplers import time_grid
from diffusion_lab.samplers.auto import (AUTO_RULES, AUTO_RULES_EARLY, AUTO_RULES_VP, AUTO_RULES_VP_EARLY,
                                         EARLY_LAMBDA, auto_choice, is_variance_preserving)


@pytest.mark.parametrize("nfe,method,grid", [(1, "ipndm", "logsnr"), (5, "ipndm", "logsnr"), (11, "ipndm", "logsnr"),
                                             (12, "unipc", "quadratic"), (17, "unipc", "quadratic"),
                                             (18, "dpmpp_3m", "logsnr"), (40, "dpmpp_3m", "logsnr"),
                                             (41, "unipc", "logsnr"), (200, "unipc", "logsnr")])
def test_rule(nfe, method, grid):
    c = auto_choice(nfe)
    assert (c.method, c.grid_kind) == (method, grid)
    get_method(c.method)  # every method the rule names is registered


@pytest.mark.parametrize("nfe,method", [(5, "dpmpp_2m_sde"), (14, "dpmpp_2m_sde"), (15, "dpmpp_3m_sde"),
                                        (50, "dpmpp_3m_sde")])
def test_rule_sde(nfe, method):
    assert auto_choice(nfe, stochastic=True).method == method


@pytest.mark.parametrize("nfe,method,grid", [(3, "ipndm", "quadratic"), (13, "ipndm", "quadratic"),
                                             (14, "deis", "logsnr"), (17, "deis", "logsnr"),
                                             (18, "unipc", "logsnr"), (100, "unipc", "logsnr")])
def test_rule_for_grids_that_end_early(nfe, method, grid):
    c = auto_choice(nfe, lam_end=EARLY_LAMBDA)  # the threshold itself counts as early
    assert (c.method, c.grid_kind) == (method, grid)
    assert auto_choice(nfe, lam_end=EARLY_LAMBDA + 1e-9) == auto_choice(nfe)  # just above: the full-range rule
    assert auto_choice(nfe, stochastic=True, lam_end=0.0) == auto_choice(nfe, stochastic=True)  # no early SDE rule


@pytest.mark.parametrize("cls,vp", [(S.VPLinear, True), (S.VPCosine, True), (S.DDPMDiscrete, True), (S.EDM, False),
                                    (S.VE, False), (S.RectifiedFlow, False), (S.SubVP, False)])
def test_variance_preserving_schedules_get_the_vp_rule(cls, vp):
    sch = cls()
    assert is_variance_preserving(sch) == vp
    for nfe in (5, 15, 30):
        expect = next((m, g) for hi, m, g, _ in (AUTO_RULES_VP if vp else AUTO_RULES)["auto"]
                      if hi is None or nfe <= hi)
        c = auto_choice(nfe, schedule=sch)
        assert (c.method, c.grid_kind) == expect, (cls.__name__, nfe)


@pytest.mark.parametrize("nfe,method", [(5, "ipndm"), (13, "ipndm"), (14, "unipc"), (17, "unipc"), (18, "rk4")])
def test_vp_rule(nfe, method):
    c = auto_choice(nfe, schedule=S.VPLinear())
    assert (c.method, c.grid_kind) == (method, "quadratic")
    e = auto_choice(nfe, schedule=S.VPLinear(), lam_end=1.0)
    assert e.grid_kind == "quadratic" and e.method == {5: "ipndm", 13: "midpoint"}.get(nfe, "rk4")


def test_early_threshold_separates_the_design_endings():
    # every schedule of the design study ends above the threshold at its own t_min; the early endings are below
    for cls in (S.VPLinear, S.VPCosine, S.EDM, S.DDPMDiscrete, S.VE, S.RectifiedFlow):
        sch = cls()
        assert float(sch.lam(torch.tensor(sch.t_min, dtype=torch.float64))) > EARLY_LAMBDA, cls.__name__
    vp = S.VPLinear()
    assert float(vp.lam(torch.tensor(1 / 50, dtype=torch.float64))) < EARLY_LAMBDA


@pytest.mark.parametrize("nfe", [5, 10, 20])
def test_auto_on_a_grid_that_ends_early_equals_the_early_choice(nfe):
    sch = S.DDPMDiscrete()
    tg = T.ring8()
    field = tg.field(sch)
    x = tg.marginal(sch, sch.t_max).sample(16, torch.Generator().manual_seed(0))
    t_e = 1.0 / nfe
    res = sample(field, x, "auto", nfe=nfe, final="denoise", t_min=t_e)
    lam_e = float(sch.lam(torch.tensor(t_e, dtype=torch.float64)))
    assert lam_e <= EARLY_LAMBDA
    c = auto_choice(nfe - 1, lam_end=lam_e, schedule=sch)
    assert (c.method, c.grid_kind) == next((m, g) for hi, m, g, _ in AUTO_RULES_VP_EARLY["auto"]
                                           if hi is None or nfe - 1 <= hi)
    from diffusion_lab.samplers import plan_for_nfe

    steps, opts = plan_for_nfe(c.method, nfe, "denoise")
    grid = time_grid(sch, steps, c.grid_kind, t_min=t_e)
    by_hand = sample(field, x, c.method, grid=grid, final="denoise", **opts)
    assert torch.equal(res.x, by_hand.x) and res.nfe == by_hand.nfe <= nfe
    assert float(res.grid[-1]) == t_e and res.settings["t_min"] == t_e


def test_t_range_with_an_explicit_grid_is_refused():
    sch = S.VPLinear()
    tg = T.ring8()
    x = tg.marginal(sch, sch.t_max).sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="t_min / t_max"):
        sample(tg.field(sch), x, "heun", grid=time_grid(sch, 4), t_min=0.1)


def test_rules_name_registered_methods_with_matching_stochasticity():
    for name, rules in [*AUTO_RULES.items(), *AUTO_RULES_EARLY.items(), *AUTO_RULES_VP.items(),
                        *AUTO_RULES_VP_EARLY.items()]:
        for _, method, _, _ in rules:
            assert get_method(method).stochastic == (name == "auto_sde")
    names = {m.name for m in available()}
    assert {"auto", "auto_sde"} <= names


@pytest.mark.parametrize("nfe", [3, 7, 10, 12, 20, 33, 50])
@pytest.mark.parametrize("final", ["step", "denoise"])
def test_auto_equals_the_chosen_method_and_fits_the_budget(nfe, final):
    sch = S.VPLinear()
    tg = T.ring8()
    field = tg.field(sch)
    x = tg.marginal(sch, sch.t_max).sample(32, torch.Generator().manual_seed(0))
    res = sample(field, x, "auto", nfe=nfe, final=final)
    assert res.nfe <= nfe
    c = auto_choice(nfe - (final == "denoise"), schedule=sch)
    by_hand = sample(field, x, c.method, nfe=nfe, grid_kind=c.grid_kind, final=final)
    assert torch.equal(res.x, by_hand.x)
    assert res.method == c.method and res.settings["requested_method"] == "auto"
    assert res.settings["grid_kind"] == c.grid_kind


def test_auto_sde_equals_the_chosen_method():
    sch = S.VPLinear()
    tg = T.gaussian_2d()
    field = tg.field(sch)
    x = tg.marginal(sch, sch.t_max).sample(16, torch.Generator().manual_seed(0))
    a = sample(field, x, "auto_sde", nfe=20, generator=torch.Generator().manual_seed(1))
    c = auto_choice(20, stochastic=True, schedule=sch)
    assert (c.method, c.grid_kind) == ("dpmpp_3m_sde", "logsnr")  # one rule on every schedule
    b = sample(field, x, "dpmpp_3m_sde", nfe=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and a.nfe == 20


def test_auto_needs_a_budget():
    sch = S.VPLinear()
    tg = T.ring8()
    x = tg.marginal(sch, sch.t_max).sample(4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="takes an NFE budget only"):
        sample(tg.field(sch), x, "auto", steps=10)
    with pytest.raises(ValueError, match="nfe must be an integer >= 1"):
        auto_choice(0)


def test_every_multistep_and_singlestep_method_states_its_budget_rule():
    names = ["dpm_solver_2", "dpmpp_2s", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "unipc", "lms", "plms", "pndm",
             "ipndm", "deis", "dpmpp_2m_sde", "dpmpp_3m_sde", "sa_solver"]
    for name in names:
        info = get_method(name)
        assert info.budget_rule and info.row()["budget_rule"] == info.budget_rule, name


def test_suite_seed_draws_other_instances():
    a, b = T.suite(), T.suite(seed=1)
    assert [la for la, _ in a] == [lb for lb, _ in b]
    for (_, ta), (_, tb) in zip(a, b):
        assert ta.dim == tb.dim and ta.n_components == tb.n_components
    assert any(not torch.equal(ta.means, tb.means) for (_, ta), (_, tb) in zip(a, b))
