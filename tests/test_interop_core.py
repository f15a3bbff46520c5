"""Interop paths that need no diffusers: schedules from diffusers configs, the timestep map, k-diffusion both ways,
the reference DiT checkpoint layout, and the optional imports.

The comparisons with k-diffusion's own samplers skip when k-diffusion's sampling.py cannot be loaded (an optional
peer); everything else runs with the package's required dependencies only. k-diffusion runs in float64 here and
its samplers are the same arithmetic as ours in EDM coordinates, so the tolerance is 1e-10 (measured <= 2e-15).
"""
import pytest
import torch

from diffusion_lab import interop as I
from diffusion_lab import schedules as S
from diffusion_lab.models import DiT, get_config
from diffusion_lab.models import convert as C
from diffusion_lab.samplers import available

from _peers import k_diffusion_sampling


# ------------------------------------------------------------------------------------------------
# schedules and timesteps


def test_config_schedules_match_their_formulas():
    """linear -> DDPMDiscrete with N b0 .. N b1; the others -> DiscreteVP with alphabar from the beta formula."""
    n = 1000
    lin = I.schedule_from_diffusers(dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    assert type(lin) is S.DDPMDiscrete and lin.t_min == 1 / n
    ref = S.DDPMDiscrete()
    t = I.t_of_timestep(lin, torch.arange(n))
    assert torch.allclose(lin.alpha(t), ref.alpha(t), rtol=1e-14)
    sl = I.schedule_from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    assert torch.allclose(sl.alpha(t) ** 2, torch.cumprod(1 - betas, 0), rtol=1e-13)
    cos = I.schedule_from_diffusers(dict(beta_schedule="squaredcos_cap_v2"))
    f = lambda s: torch.cos((s + 0.008) / 1.008 * torch.pi / 2) ** 2  # noqa: E731  (Nichol & Dhariwal eq. 17)
    k = torch.arange(n, dtype=torch.float64)
    beta = torch.clamp(1 - f((k + 1) / n) / f(k / n), max=0.999)
    assert torch.allclose(cos.alpha(t) ** 2, torch.cumprod(1 - beta, 0), rtol=1e-12)
    assert float(beta.max()) == 0.999  # the cap is active at the end


def test_explicit_alphas_cumprod_and_trained_betas():
    betas = torch.linspace(1e-3, 0.05, 50, dtype=torch.float64)
    acp = torch.cumprod(1 - betas, 0)
    s1 = I.schedule_from_diffusers(alphas_cumprod=acp)
    s2 = I.schedule_from_diffusers(dict(num_train_timesteps=50, trained_betas=betas.tolist()))
    t = I.t_of_timestep(s1, torch.arange(50))
    assert torch.allclose(s1.alpha(t) ** 2, acp, rtol=1e-14)
    assert torch.allclose(s2.alpha(t) ** 2, acp, rtol=1e-14)
    assert s1.t_min == 1 / 50 and s1.n_steps == 50
    assert torch.allclose(s1.betas, betas, rtol=1e-10)


def test_schedule_errors():
    with pytest.raises(ValueError, match="strictly decreasing"):
        I.DiscreteVP(alphas_cumprod_table=(0.9, 0.95, 0.5))
    with pytest.raises(ValueError, match=r"alphabar\[2\] = 0.0"):
        I.DiscreteVP(alphas_cumprod_table=(0.9, 0.5, 0.0))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        I.schedule_from_diffusers(dict(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="'sigmoid' is not mapped"):
        I.schedule_from_diffusers(dict(beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        I.from_diffusers(lambda x, k: x, dict(), prediction_type="flow")


def test_timesteps_exact_at_knots_and_affine_between():
    sch = I.schedule_from_diffusers(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    k = torch.arange(1000)
    t = I.t_of_timestep(sch, k)
    kk = I.timestep_of_t(sch, t)
    assert torch.equal(kk, k.to(torch.float64))  # exact integers at every knot
    mid = 0.5 * (t[:-1] + t[1:])
    assert torch.allclose(I.timestep_of_t(sch, mid), k[:-1].double() + 0.5, atol=1e-9)
    # the schedule between knots: log alpha linear in t
    la = sch.log_alpha(mid)
    assert torch.allclose(la, 0.5 * (sch.log_alpha(t[:-1]) + sch.log_alpha(t[1:])), atol=1e-15)


def test_importing_the_package_does_not_import_diffusers():
    import subprocess
    import sys

    code = "import sys, diffusion_lab, diffusion_lab.interop; print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"



# ------------------------------------------------------------------------------------------------
# k-diffusion both ways


class _Denoiser:
    """A smooth nonlinear denoiser D(x; sigma) with conditioning (a stand-in for a network)."""

    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.w = torch.randn(6, 6, dtype=torch.float64, generator=g) / 3
        self.calls = 0

    def __call__(self, x, sigma, shift=0.0):
        self.calls += 1
        s = sigma.reshape(-1, 1)
        c = 1.0 / (1.0 + s ** 2)
        return c * x + (1 - c) * torch.tanh(x @ self.w) + shift


def _kd_sigmas(K, n, lo=0.02, hi=20.0):
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return K.get_sigmas_karras(n, lo, hi, rho=7.0).to(torch.float64)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_exported_samplers_match_k_diffusion(name):
    """sample_<name> of ours, called exactly as a k-diffusion user interface calls k-diffusion's, gives k-diffusion's
    result with the same number of model calls (Karras sigmas ending at 0, conditioning through extra_args)."""
    K = k_diffusion_sampling()
    sigmas = _kd_sigmas(K, 8)
    x = 20.0 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    theirs_model, ours_model = _Denoiser(), _Denoiser()
    ref = getattr(K, f"sample_{name}")(theirs_model, x, sigmas, extra_args={"shift": 0.1}, disable=True)
    seen = []
    out = getattr(I, f"sample_{name}")(ours_model, x, sigmas, extra_args={"shift": 0.1},
                                       callback=lambda d: seen.append(d["i"]))
    assert float((out - ref).abs().max()) < 1e-10
    assert ours_model.calls == theirs_model.calls
    assert seen == list(range(len(sigmas) - 1))


def test_exported_sampler_without_final_zero_matches_k_diffusion():
    K = k_diffusion_sampling()
    sigmas = _kd_sigmas(K, 6)[:-1]  # stop at sigma_min > 0
    x = 20.0 * torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = K.sample_euler(_Denoiser(), x, sigmas, disable=True)
    assert float((I.sample_euler(_Denoiser(), x, sigmas) - ref).abs().max()) < 1e-10


def test_every_registered_method_is_exported():
    names = I.k_diffusion_samplers()
    expected = {f"sample_{m.name}" for m in available() if m.family != "auto"}
    assert set(names) == expected
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10
    sigmas = torch.cat([torch.logspace(1.3, -1.7, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    for key, fn in names.items():  # every one runs in the convention (a few ms each)
        out = fn(_Denoiser(), x, sigmas, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and torch.isfinite(out).all(), key
    x0 = names["sample_ddim"](_Denoiser(), x, sigmas)
    assert float((x0 - names["sample_euler"](_Denoiser(), x, sigmas)).abs().max()) < 1e-12  # DDIM = Euler in EDM
    with pytest.raises(AttributeError, match="no registered method 'nope'"):
        I.sample_nope  # noqa: B018
    with pytest.raises(ValueError, match="takes no sigma list"):
        I.k_diffusion_sampler("auto")
    with pytest.raises(ValueError, match="positive except a final 0"):
        I.sample_euler(_Denoiser(), x, torch.tensor([1.0, 0.0, 0.0]))


def test_k_diffusion_denoiser_as_field():
    """from_k_diffusion: EDM schedule, x0 prediction; the PF-ODE velocity is (x - D)/sigma (Karras et al. eq. 3)."""
    d = _Denoiser()
    field = from_kd = I.from_k_diffusion(d, 0.02, 20.0, extra_args={"shift": 0.1})
    assert isinstance(from_kd.schedule, S.EDM) and field.prediction == "x0"
    x = torch.randn(4, 6, dtype=torch.float64)
    sig = torch.tensor(1.5, dtype=torch.float64)
    v = field.velocity(x, sig)
    assert torch.allclose(v, (x - d(x, sig.expand(4), shift=0.1)) / 1.5, rtol=1e-13)


def _inputs(n=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 999  # fractional timesteps too
    t[:2] = torch.tensor([0.0, 999.0])
    y = torch.randint(0, 10, (n,), generator=g)
    return x, t, y


# ------------------------------------------------------------------------------------------------
# reference layout (facebookresearch/DiT models.py)


def _reference_keys(depth: int) -> set[str]:
    """The parameter names of the reference DiT (models.py: timm PatchEmbed / Attention / Mlp, TimestepEmbedder,
    LabelEmbedder, DiTBlock, FinalLayer), written out."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    for i in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    return keys


def _reference_like(seed=0):
    """Our DiT in the reference configuration (learn_sigma: 2C outputs, integer-step time input), random weights
    everywhere (the zero init would make every output 0)."""
    cfg = get_config("DiT-S/2", input_size=8, in_channels=2, out_channels=4, depth=2, num_classes=10,
                     time_scale=1.0)
    model = DiT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_reference_layout_round_trip():
    model = _reference_like()
    sd = C.reference_state_dict(model)
    assert set(sd) == _reference_keys(2)
    assert sd["final_layer.linear.weight"].shape[0] == 2 * 2 * 4  # p^2 * 2C (learn_sigma)
    cfg = C.config_from_reference(sd)
    assert (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.in_channels, cfg.out_channels, cfg.input_size,
            cfg.num_classes, cfg.class_dropout_prob, cfg.time_scale) == (384, 6, 2, 2, 4, 8, 10, 0.1, 1.0)
    back = C.dit_from_reference({"ema": sd, "opt": {}})  # the training script's checkpoint dict
    x, t, y = _inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t.float(), y), back(x, t.float(), y))
    bad = dict(sd)
    bad["pos_embed"] = bad["pos_embed"] + 0.1
    with pytest.raises(ValueError, match="differs from the 2-D sin-cos table"):
        C.dit_from_reference(bad)
    with pytest.raises(ValueError, match="not one of the paper's widths"):
        C.config_from_reference({**sd, "x_embedder.proj.weight": torch.zeros(40, 2, 2, 2)})
    with pytest.raises(ValueError, match="frequency_shift=1.0"):
        C.reference_state_dict(DiT(model.config.replace(frequency_shift=1.0)))


def test_reference_checkpoint_file_to_field(tmp_path):
    """load_dit_checkpoint reads a reference .pt; dit_field drops the variance channels and calls the network at
    integer DDPM steps k = N t - 1 on the linear schedule the reference was trained with."""
    model = _reference_like(seed=1)
    path = tmp_path / "DiT-test.pt"
    torch.save(C.reference_state_dict(model), path)
    loaded = I.load_dit_checkpoint(path)
    y = torch.tensor([0, 3, 9])
    field = I.dit_field(loaded, y)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t = I.t_of_timestep(field.schedule, 250)
    with torch.no_grad():
        eps = field.eps(x, t)
        ref = model(x.float(), torch.full((3,), 250.0), y)[:, :2].double()
    assert torch.equal(eps, ref)
