"""Every catalogue entry passes, the catalogue holds exactly the pinned set of checks, and the machinery reports
failures as failures; planted bugs in the package are caught by the checks written for them."""
import json
import subprocess
import sys
import warnings

import pytest

from theory_checks import catalogue
from theory_checks.catalogue import RENAMED_PREFIXES, Catalogue, Check, Outcome, current_name

CHECKS = catalogue().checks

# The exact set of check names: a check that disappears (an unregistered method, a renamed case, a module no
# longer imported) fails test_catalogue_names_are_pinned. Adding a check means adding its name here.
EXPECTED_NAMES = {
    # claims
    "claims.claim_attention_permutation_invariant", "claims.attention_permutation_equivariant",
    "claims.claim_post_ln_exponential_growth", "claims.norm_bounds_residual_stacks",
    "claims.claim_laplacian_residual_amplifies", "claims.laplacian_gain",
    # dit
    "dit.adaLN_zero_identity_at_init", "dit.adaLN_zero_gate_gradient", "dit.patchify_roundtrip",
    "dit.pos_embed_row_norm", "dit.parameter_count", "dit.gflops_paper_table", "dit.mac_formula_vs_flop_counter",
    "dit.conditioning_variant_params", "dit.conditioning_variant_gflops", "dit.variant_mac_formula_vs_flop_counter",
    "dit.variant_zero_output_at_init", "dit.block_permutation_equivariant",
    "dit.attention_matches_multihead_reference", "dit.block_matches_reference", "dit.softmax_temperature_limits",
    "dit.claim_softmax_one_hot_limit", "dit.rms_layer_norm_scale_properties", "dit.attention_rollout_row_stochastic",
    # flow_maps (reflow and consistency training; MeanFlow, shortcut, boundary, CTM)
    "flow_maps.reflow_preserves_marginals", "flow_maps.reflow_does_not_increase_convex_costs",
    "flow_maps.ct_objective_stationary_at_consistency_function",
    "flow_maps.meanflow_identity", "flow_maps.boundary[flowmap]", "flow_maps.boundary[meanflow]",
    "flow_maps.boundary[shortcut]", "flow_maps.ctm_exact_teacher",
    # fokker_planck
    "fokker_planck.mass_conservation", "fokker_planck.positivity_backward_euler",
    "fokker_planck.discrete_equilibrium", "fokker_planck.space_order", "fokker_planck.forward_matches_closed_form",
    "fokker_planck.reverse_sde_marginals",
    # kernels
    "kernels.derivatives[vp]", "kernels.derivatives[cosine]", "kernels.derivatives[subvp]", "kernels.derivatives[ve]",
    "kernels.derivatives[edm]", "kernels.derivatives[rf]", "kernels.derivatives[ddpm]", "kernels.f_g_consistency[vp]",
    "kernels.f_g_consistency[cosine]", "kernels.f_g_consistency[subvp]", "kernels.f_g_consistency[ve]",
    "kernels.f_g_consistency[edm]", "kernels.f_g_consistency[rf]", "kernels.f_g_consistency[ddpm]",
    "kernels.lambda_roundtrip[vp]", "kernels.lambda_roundtrip[cosine]", "kernels.lambda_roundtrip[subvp]",
    "kernels.lambda_roundtrip[ve]", "kernels.lambda_roundtrip[edm]", "kernels.lambda_roundtrip[rf]",
    "kernels.lambda_roundtrip[ddpm]", "kernels.kernel_moments[vp]", "kernels.kernel_moments[cosine]",
    "kernels.kernel_moments[subvp]", "kernels.kernel_moments[ve]", "kernels.kernel_moments[edm]",
    "kernels.kernel_moments[rf]", "kernels.kernel_moments[ddpm]", "kernels.ddpm_posterior",
    "kernels.ddpm_continuum_order",
    # langevin
    "langevin.ula_stationary_variance", "langevin.ula_stability_bound", "langevin.langevin_gaussian_transition",
    "langevin.mala_invariance", "langevin.ula_bias_detected", "langevin.corrector_keeps_p_t",
    "langevin.corrector_step_published_rule", "langevin.baoab_stationary_law", "langevin.kinetic_langevin_weak_order",
    # parameterisation
    "parameterisation.param_roundtrip[vp]", "parameterisation.param_roundtrip[cosine]",
    "parameterisation.param_roundtrip[subvp]", "parameterisation.param_roundtrip[ve]",
    "parameterisation.param_roundtrip[edm]", "parameterisation.param_roundtrip[rf]",
    "parameterisation.param_roundtrip[ddpm]", "parameterisation.v_prediction[vp,cosine]",
    "parameterisation.velocity_is_pf_drift[vp]", "parameterisation.velocity_is_pf_drift[cosine]",
    "parameterisation.velocity_is_pf_drift[subvp]", "parameterisation.velocity_is_pf_drift[ve]",
    "parameterisation.velocity_is_pf_drift[edm]", "parameterisation.velocity_is_pf_drift[rf]",
    "parameterisation.velocity_is_pf_drift[ddpm]", "parameterisation.tweedie",
    "parameterisation.tweedie_second_order", "parameterisation.score_autograd", "parameterisation.score_fd_order",
    "parameterisation.dsm_eps_scaling",
    # likelihood
    "likelihood.pf_ode_loglik_exact_divergence", "likelihood.pf_ode_loglik_hutchinson",
    "likelihood.hutchinson_rademacher_enumeration", "likelihood.flow_map_gaussian_closed_form",
    "likelihood.flow_map_semigroup_closed_form", "likelihood.flow_map_semigroup_order",
    "likelihood.consistency_boundary", "likelihood.inversion_reconstruction", "likelihood.classifier_guidance_bayes",
    "likelihood.elbo_gaussian_closed_form", "likelihood.elbo_mixture_exact_decomposition",
    "likelihood.elbo_below_log_likelihood", "likelihood.elbo_gaussian_gap_vanishes",
    "likelihood.elbo_discrete_to_continuous_order", "likelihood.elbo_ddpm_terms_closed_form",
    "likelihood.elbo_schedule_invariance",
    # pde
    "pde.fokker_planck[vp]", "pde.fokker_planck[cosine]", "pde.fokker_planck[subvp]", "pde.fokker_planck[ve]",
    "pde.fokker_planck[edm]", "pde.fokker_planck[rf]", "pde.continuity_pf_ode[vp]", "pde.continuity_pf_ode[ve]",
    "pde.continuity_pf_ode[edm]", "pde.continuity_pf_ode[rf]", "pde.sde_family[gamma=0.0]",
    "pde.sde_family[gamma=0.5]", "pde.sde_family[gamma=1.0]", "pde.sde_family[gamma=2.0]",
    # solvers
    "solvers.order[euler]", "solvers.order[heun]", "solvers.order[midpoint]", "solvers.order[rk4]",
    "solvers.order[ddim]", "solvers.order[dpm_solver_1]", "solvers.order[dpm_solver_2]",
    "solvers.order[dpm_solver_3]", "solvers.order[dpmpp_2m]", "solvers.order[dpmpp_3m]",
    "solvers.order[dpmpp_3m[coefficients=taylor]]", "solvers.order[dpmpp_2s]",
    "solvers.order[dpm_solver_2[predict=x0]]", "solvers.order[dpm_solver_3[predict=x0]]", "solvers.order[unipc]",
    "solvers.order[unipc[corrector=False]]", "solvers.reference_flow_map",
    "solvers.ddim_is_dpm_solver_1_is_edm_euler[vp]", "solvers.ddim_is_dpm_solver_1_is_edm_euler[ve]",
    "solvers.ddim_is_dpm_solver_1_is_edm_euler[rf]", "solvers.ddim_is_dpm_solver_1_is_edm_euler[edm]",
    "solvers.order[lms[t_max=0.4]]", "solvers.order[lms[order=2]]", "solvers.order[lms[order=3]]",
    "solvers.order[plms]", "solvers.order[plms[order=2]]", "solvers.order[pndm]",
    "solvers.order[pndm[midpoint=sigmabar]]", "solvers.order[ipndm]", "solvers.order[deis[order=1]]",
    "solvers.order[deis[order=2]]", "solvers.order[deis[order=3]]", "solvers.order[deis[order=3,t_max=0.4]]",
    "solvers.order[deis[order=4,t_max=0.4]]", "solvers.order[deis[order=3,variant=logrho]]",
    "solvers.order[pndm,sigmabar_uniform_grid]", "solvers.multistep.ipndm_is_lms_on_sigmabar_uniform_grid",
    "solvers.multistep.deis_tab_is_lms_on_edm", "solvers.multistep.pndm_warm_up_is_rk4_in_edm_coordinates",
    "solvers.em_weak_order", "solvers.reverse_sde_gaussian_weak_order[gamma=1]",
    "solvers.reverse_sde_gaussian_weak_order[gamma=2]", "solvers.ddpm_ancestral_weak_order",
    "solvers.ddim_eta_weak_order[eta=0.5]", "solvers.em_law_closed_form", "solvers.ddim_eta1_is_ddpm",
    "solvers.edm_sde_churn0_is_heun", "solvers.torchsde_euler_is_em", "solvers.weak_order[euler_ancestral]",
    "solvers.weak_order[dpmpp_2m_sde]", "solvers.weak_order[dpmpp_2m_sde[solver_type=heun]]",
    "solvers.weak_order[dpmpp_3m_sde]", "solvers.weak_order[sa_solver]", "solvers.weak_order[dpmpp_sde]",
    "solvers.weak_order[restart]",
    # training
    "training.edm_precond_unit_variance", "training.edm_precond_unit_variance_mc", "training.dsm_optimum_constant",
    "training.eps_loss_is_sigma2_score_loss", "training.cfg_identities", "training.cfg_nfe_counted_twice",
    "training.kl_bound_equality_noised_law", "training.kl_bound_holds_perturbed_score",
    "training.score_error_closed_form",
}


def test_catalogue_names_are_pinned():
    names = [c.name for c in CHECKS]
    assert len(set(names)) == len(names), "duplicate check names"
    missing, extra = EXPECTED_NAMES - set(names), set(names) - EXPECTED_NAMES
    assert not missing and not extra, f"checks missing from the catalogue: {sorted(missing)}; not pinned: {sorted(extra)}"


def test_names_start_with_their_area():
    for c in CHECKS:
        assert c.name.split(".")[0] == c.area, c.name


@pytest.mark.parametrize("chk", CHECKS, ids=[c.name for c in CHECKS])
def test_check_passes(chk):
    r = chk.run()
    assert r.passed, f"{chk.name}: residual {r.residual} > tol {chk.tol} ({r.detail})"
    assert chk.identity, f"{chk.name} has no docstring stating its identity"


def test_claims_are_refuted_with_counterexamples():
    claims = [c for c in CHECKS if c.kind == "claim"]
    assert {c.name for c in claims} == {
        "claims.claim_attention_permutation_invariant", "claims.claim_post_ln_exponential_growth",
        "claims.claim_laplacian_residual_amplifies", "dit.claim_softmax_one_hot_limit"}
    for c in claims:
        r = c.run()
        assert r.verdict == "refuted" and "counterexample" in r.detail


def test_failing_and_crashing_checks_fail():
    bad = Check("bad", "x", "exact", 1e-10, "", "", lambda: 1e-3)
    crash = Check("crash", "x", "exact", 1e-10, "", "", lambda: 1 / 0)
    nan = Check("nan", "x", "exact", 1e-10, "", "", lambda: float("nan"))
    claim = Check("c", "x", "claim", 0, "", "", lambda: Outcome(0.0, verdict="holds"), expected_verdict="refuted")
    results = Catalogue([bad, crash, nan, claim]).run()
    assert [r.passed for r in results] == [False, False, False, False]
    assert "ZeroDivisionError" in results[1].detail


def test_former_names_are_translated_with_a_message():
    assert current_name("F.corrector_keeps_p_t") == "langevin.corrector_keeps_p_t"
    assert current_name("FP.space_order") == "fokker_planck.space_order"
    assert current_name("langevin.ula_bias_detected") is None
    assert set(RENAMED_PREFIXES.values()) <= {c.area + "." for c in CHECKS}
    with pytest.warns(UserWarning, match="'E.order\\[euler\\]' is now 'solvers.order\\[euler\\]'"):
        sel = catalogue().select("E.order[euler]")
    assert [c.name for c in sel.checks] == ["solvers.order[euler]"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert catalogue().select("solvers.order[euler]").checks  # current names: no message


def test_module_entry_point_old_name_message():
    p = subprocess.run([sys.executable, "-m", "theory_checks", "--only", "H.laplacian_gain", "--quiet"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "'H.laplacian_gain' is now 'claims.laplacian_gain'" in p.stderr
    assert "1 passed, 0 failed" in p.stdout


def test_module_entry_point_json(tmp_path):
    out = tmp_path / "c.json"
    p = subprocess.run([sys.executable, "-m", "theory_checks", "--area", "claims", "--json", str(out)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["failed"] == 0 and doc["passed"] == len(doc["checks"]) == 6
    assert {"name", "area", "residual", "tol", "pass", "identity"} <= set(doc["checks"][0])


# ---------------------------------------------------------------------------------------------
# planted bugs: the check written for each one fails when the bug is monkeypatched into the package

def _run(name):
    (chk,) = [c for c in CHECKS if c.name == name]
    return chk.run()


def test_planted_head_split_is_caught(monkeypatch):
    import torch.nn.functional as F

    from diffusion_lab.models import dit

    def interleaved(self, x):  # heads taken as every h-th feature instead of consecutive slices
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.head_dim, self.num_heads).permute(2, 0, 4, 1, 3)
        q, k, v = qkv.unbind(0)
        return self._merge(F.scaled_dot_product_attention(q, k, v))

    monkeypatch.setattr(dit.Attention, "forward", interleaved)
    r = _run("dit.attention_matches_multihead_reference")
    assert not r.passed and r.residual > 0.1
    assert not _run("dit.block_matches_reference").passed
    assert _run("dit.block_permutation_equivariant").passed  # the symmetry check alone cannot see it


def test_planted_adaln_plus_one_is_caught(monkeypatch):
    from diffusion_lab.models import dit

    monkeypatch.setattr(dit, "modulate", lambda x, shift, scale: x * scale.unsqueeze(1) + shift.unsqueeze(1))
    assert not _run("dit.block_matches_reference").passed


def test_planted_snr_rule_is_caught(monkeypatch):
    from diffusion_lab import langevin as L

    original = L.snr_step_size
    monkeypatch.setattr(L, "snr_step_size", lambda s, z, snr, alpha=1.0: 0.5 * original(s, z, snr, alpha))
    assert not _run("langevin.corrector_step_published_rule").passed
    r = _run("langevin.corrector_keeps_p_t")
    assert not r.passed and r.residual > 8  # r = 0.4: v(1 + r^2/2) against v(1 + r^2), about 12 SE


def test_planted_baoab_o_step_is_caught(monkeypatch):
    import math

    from diffusion_lab import langevin as L

    real_exp = math.exp

    class _Math:  # e^{-gamma h} -> e^{-gamma h / 2} in the O-step only (kinetic_langevin's math.exp)
        def __getattr__(self, name):
            return getattr(math, name)

        @staticmethod
        def exp(v):
            return real_exp(v / 2)

    monkeypatch.setattr(L, "math", _Math())
    assert not _run("langevin.baoab_stationary_law").passed
    assert not _run("langevin.kinetic_langevin_weak_order").passed


def test_stability_refusal_must_name_the_bound(monkeypatch):
    from diffusion_lab import langevin as L

    def refuse_anything(*a, **k):
        raise ValueError("some other problem")

    monkeypatch.setattr(L, "ula", refuse_anything)
    assert not _run("langevin.ula_stability_bound").passed


def test_planted_bug_table_is_current():
    """Every bug of benchmarks/planted_bugs.py still finds its text exactly once (a stale bug would be reported, not
    silently skipped, but the table should be kept current), and its areas are catalogue areas."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("planted_bugs", root / "benchmarks" / "planted_bugs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    areas = {c.area for c in CHECKS}
    assert len(mod.BUGS) >= 19
    for bug in mod.BUGS:
        assert (root / bug.path).read_text().count(bug.old) == 1, bug.name
        assert set(bug.areas) <= areas, bug.name
        for f in bug.tests:
            assert (root / f).exists(), (bug.name, f)
