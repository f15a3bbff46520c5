"""VelocityField: input validation with the offending value in the message, NFE accounting."""
import subprocess
import sys

import pytest
import torch

from diffusion_lab import VelocityField
from diffusion_lab import schedules as S
from diffusion_lab import targets as T

from _closed_forms import mixture_closed_forms


def _field(prediction="eps", model=None):
    model = model or (lambda x, t: torch.zeros_like(x))
    return VelocityField(S.VPLinear(), model, prediction, data_shape=(2,))


def test_nfe_counts_one_per_call():
    f = T.ring8().field(S.VPLinear())
    x = torch.zeros(4, 2, dtype=torch.float64)
    f.score(x, 0.5)
    f.velocity(x, torch.full((4,), 0.3, dtype=torch.float64))
    f.x0_eps(x, 0.2)
    f.sde_drift(x, 0.2, gamma=0.5)
    f.sde_diffusion(0.2)
    assert f.nfe == 4


def test_shape_errors():
    f = _field()
    with pytest.raises(ValueError, match=r"data shape \(3,\)"):
        f.score(torch.zeros(4, 3), 0.5)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        f.score(torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match=r"batch=4; got shape \(3,\)"):
        f.score(torch.zeros(4, 2), torch.full((3,), 0.5))


def test_t_out_of_range_names_value():
    with pytest.raises(ValueError, match=r"t=1\.2.*outside the valid range \[0\.001, 1\.0\]"):
        _field().score(torch.zeros(4, 2), 1.2)
    with pytest.raises(ValueError, match=r"t=0\.0 is outside"):
        _field().score(torch.zeros(4, 2), torch.tensor([0.5, 0.5, 0.0, 0.5]))


def test_nan_model_output():
    f = _field(model=lambda x, t: x * float("nan"))
    with pytest.raises(FloatingPointError, match=r"8 non-finite values .* t in \[0\.5, 0\.5\]"):
        f.score(torch.ones(4, 2), 0.5)


def test_wrong_model_output_shape():
    f = _field(model=lambda x, t: x[:, :1])
    with pytest.raises(ValueError, match=r"model returned \(4, 1\), expected .* \(4, 2\)"):
        f.score(torch.ones(4, 2), 0.5)


def test_v_prediction_needs_vp_and_unknown_prediction():
    with pytest.raises(ValueError, match="variance-preserving"):
        VelocityField(S.VE(), lambda x, t: x, "v")
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        VelocityField(S.VE(), lambda x, t: x, "noise")


def test_sde_family_gamma_zero_is_pf_ode():
    f = T.ring8().field(S.SubVP())
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(f.sde_drift(x, 0.3, gamma=0.0), f.velocity(x, 0.3), rtol=1e-12)


def test_float32_field():
    f = T.ring8().field(S.VPLinear())
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    assert f.score(x, 0.5).dtype == torch.float32


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffusion_lab.cli", *args], capture_output=True, text=True)


def test_cli_help_and_errors():
    p = _cli("--help")
    assert p.returncode == 0 and "check" in p.stdout
    p = _cli("check", "--help")
    assert p.returncode == 0 and "--json" in p.stdout and "tolerance" in p.stdout
    for bad in (["check", "--bogus"], ["nosuch"], ["check", "--area", "nope"], ["check", "-k", "zzz"]):
        p = _cli(*bad)
        assert p.returncode == 2, bad
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in p.stderr, (bad, p.stderr)


def test_generic_model_goes_through_param_conversions():
    # a plain model returning one closed-form prediction; every other prediction must equal its closed form
    tg, s = T.ring8(), S.VPLinear()
    x = tg.sample(6, torch.Generator().manual_seed(3))
    t = torch.linspace(0.05, 0.95, 6, dtype=torch.float64)
    for kind in ("eps", "x0", "v", "score", "velocity"):
        plain = VelocityField(s, lambda x, t, k=kind: mixture_closed_forms(tg, s, x, t)[k], kind)
        ref = mixture_closed_forms(tg, s, x, t)
        for out in ("eps", "x0", "score", "velocity"):
            assert torch.allclose(plain.predict(out, x, t), ref[out], rtol=1e-9, atol=1e-12), (kind, out)
