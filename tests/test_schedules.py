"""Schedules: identities over Hypothesis-drawn parameters, broken variants, and input validation."""
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from diffusion_lab import schedules as S
from theory_checks.kernels import (derivative_residual, f_g_residual, kernel_moment_residual,
                                   lambda_roundtrip_residual)
from theory_checks.strategies import schedules, times

EXACT = 1e-10


@given(st.data())
def test_derivatives_match_autograd(data):
    s = data.draw(schedules())
    t = data.draw(times(s, 8))
    if isinstance(s, S.DDPMDiscrete):  # avoid the interpolant's kinks
        t = (torch.floor(t * s.n_steps) + 0.5) / s.n_steps
        t = t.clamp(s.t_min, s.t_max)
    assert derivative_residual(s, t) <= EXACT
    assert f_g_residual(s, t) <= EXACT


@given(st.data())
def test_lambda_roundtrip(data):
    s = data.draw(schedules())
    t = data.draw(times(s, 8))
    assert lambda_roundtrip_residual(s, t) <= EXACT


def test_lambda_roundtrip_times_one_ulp_apart():
    """Regression (found by Hypothesis): cosine-schedule times one ulp apart at t_min, where lambda cannot
    resolve the difference, are not a monotonicity failure; a genuinely increasing lambda still is."""
    s = S.VPCosine()
    t = torch.tensor(s.t_min, dtype=torch.float64)
    ulp = torch.nextafter(t, torch.tensor(1.0, dtype=torch.float64))
    assert lambda_roundtrip_residual(s, torch.stack([t, ulp, t, ulp])) <= EXACT

    class Flipped(type(s)):
        def lam(self, t):
            return -super().lam(t)

    assert lambda_roundtrip_residual(Flipped(), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)) == float("inf")


@given(st.data())
def test_alpha_sigma_positive_and_lambda_decreasing(data):
    s = data.draw(schedules())
    t = torch.linspace(s.t_min, s.t_max, 200, dtype=torch.float64)
    assert (s.alpha(t) > 0).all() and (s.sigma(t) > 0).all()
    assert (torch.diff(s.lam(t)) < 0).all()


@given(beta_min=st.floats(0.01, 1.0), spread=st.floats(0.0, 30.0), t=st.floats(1e-3, 1.0))
def test_log_snr_of_vp_linear_against_its_closed_form(beta_min, spread, t):
    # alpha^2 = exp(-B), sigma^2 = 1 - exp(-B), B(t) = beta_min t + (beta_max - beta_min) t^2 / 2, so
    # log SNR = -log(expm1(B)); written here from the schedule's definition, not from lam()
    s = S.VPLinear(beta_min=beta_min, beta_max=beta_min + spread)
    B = beta_min * t + 0.5 * spread * t * t
    expect = -math.log(math.expm1(B))
    got = float(s.log_snr(torch.tensor(t, dtype=torch.float64)))
    assert abs(got - expect) <= 1e-12 * max(1.0, abs(expect))


@given(sigma_min=st.floats(1e-3, 0.1), ratio=st.floats(10.0, 1e4), t=st.floats(0.0, 1.0))
def test_log_snr_of_ve_against_its_closed_form(sigma_min, ratio, t):
    # alpha = 1, sigma(t) = sigma_min (sigma_max / sigma_min)^t: log SNR = -2 log sigma_min - 2 t log(ratio)
    s = S.VE(sigma_min=sigma_min, sigma_max=sigma_min * ratio)
    expect = -2.0 * math.log(sigma_min) - 2.0 * t * math.log(ratio)
    got = float(s.log_snr(torch.tensor(t, dtype=torch.float64)))
    assert abs(got - expect) <= 1e-12 * max(1.0, abs(expect))


@pytest.mark.parametrize("name", ["vp", "subvp", "cosine", "rf", "edm", "ve"])
def test_kernel_moments(name):
    assert kernel_moment_residual(S.SCHEDULES[name]()) <= 1e-8


def test_closed_forms():
    vp = S.VPLinear()
    t = torch.tensor([0.25, 1.0], dtype=torch.float64)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    assert torch.allclose(vp.alpha(t), torch.exp(-B / 2), rtol=1e-14)
    assert torch.allclose(S.SubVP().sigma(t), 1 - torch.exp(-B), rtol=1e-14)
    ve = S.VE(sigma_min=0.01, sigma_max=50)
    assert math.isclose(float(ve.sigma(torch.tensor(1.0, dtype=torch.float64))), 50.0, rel_tol=1e-14)
    assert math.isclose(float(ve.sigma(torch.tensor(0.0, dtype=torch.float64))), 0.01, rel_tol=1e-14)
    rf = S.RectifiedFlow()
    assert torch.allclose(rf.g2(t[:1]), 2 * t[:1] / (1 - t[:1]))
    cos = S.VPCosine()
    assert abs(cos.t_max - 0.998) < 1e-3  # beta clipped at 999
    beta_tmax = float(-2 * cos.f(torch.tensor(cos.t_max, dtype=torch.float64)))
    assert math.isclose(beta_tmax, 999.0, rel_tol=1e-9)


def test_ddpm_discrete_matches_betas():
    d = S.DDPMDiscrete()
    assert torch.allclose(d.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    i = torch.tensor([1, 10, 500, 1000])
    alpha = d.alpha(d.t_of_index(i).to(torch.float64))
    assert torch.allclose(alpha**2, d.alphas_cumprod[i - 1], rtol=1e-13)


def test_float32_in_float32_out():
    for cls in S.SCHEDULES.values():
        s = cls()
        t = torch.linspace(s.t_min, s.t_max, 5, dtype=torch.float32)
        for fn in (s.alpha, s.sigma, s.dalpha, s.dsigma, s.f, s.g2, s.lam):
            assert fn(t).dtype == torch.float32, (cls.name, fn.__name__)


def test_python_float_gives_float64():
    assert S.VPLinear().alpha(0.5).dtype == torch.float64


@dataclass(frozen=True)
class _WrongDerivative(S.VPLinear):
    def dalpha(self, t):  # the sign of beta/2 flipped
        return 0.5 * self.beta(t) * self.alpha(t)


@dataclass(frozen=True)
class _WrongG(S.VPLinear):
    def g2(self, t):  # g^2 = beta/2 instead of beta
        return 0.5 * self.beta(t)


def test_broken_schedules_fail_their_checks():
    t = torch.linspace(0.01, 0.99, 11, dtype=torch.float64)
    assert derivative_residual(_WrongDerivative(), t) > 0.5
    assert f_g_residual(_WrongG(), t) > 0.3
    assert kernel_moment_residual(_WrongG()) > 0.1


@pytest.mark.parametrize("kw", [dict(beta_min=-1.0), dict(beta_min=5.0, beta_max=1.0), dict(t_min=0.5, t_max=0.2)])
def test_bad_parameters_raise(kw):
    with pytest.raises(ValueError, match=r"VPLinear"):
        S.VPLinear(**kw)


def test_t_outside_range_names_value():
    with pytest.raises(ValueError, match=r"t=1\.5 is outside the valid range"):
        S.VPLinear().check_t(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="unknown schedule 'nope'"):
        S.get_schedule("nope")
