"""Interop with diffusers and k-diffusion: the same network and start noise give the same samples, step for step.

Tolerances. diffusers keeps its schedule in float32 (alphas_cumprod, sigmas) and evaluates the step coefficients
from it in float32 (square roots, 1 - alphabar; Euler steps its state in float32), so with a float64 network and
state its loop carries relative round-off of a few float32 ulps (6e-8) per step: the states agree with ours to
<= 1e-6 relative to their size, which is what is asserted. Our field uses the scheduler's own alphas_cumprod
(exact in float64), so no schedule mismatch enters. k-diffusion runs in float64 throughout: 1e-10.
"""
import math

import pytest
import torch

from diffusion_lab import interop as I
from diffusion_lab import schedules as S
from diffusion_lab.samplers import available, sample

from _peers import k_diffusion_sampling

diffusers = pytest.importorskip("diffusers")

REL = 1e-6  # float32 schedule arithmetic inside diffusers' step (module docstring)


def _rel(a, b) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return net.double().eval()


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(3, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------
# schedules and timesteps


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_alphas_cumprod(kind):
    """alpha(t_k)^2 = alphabar_k at the knots t_k = (k + 1)/N: exactly for a scheduler (its own float32 table),
    to float32 resolution for a config (evaluated in float64)."""
    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=kind)
    sch = diffusers.DDIMScheduler(**cfg)
    acp = sch.alphas_cumprod.to(torch.float64)
    k = torch.arange(1000)
    exact = I.schedule_from_diffusers(sch)
    t = I.t_of_timestep(exact, k)
    assert torch.allclose(exact.alpha(t) ** 2, acp, rtol=1e-14, atol=0)
    from_cfg = I.schedule_from_diffusers(cfg)
    assert isinstance(from_cfg, S.DDPMDiscrete)
    if kind == "linear":
        assert type(from_cfg) is S.DDPMDiscrete
    # float32 cumprod of 1000 factors: relative error grows ~ sqrt(k) ulp; at the tail alphabar ~ 1e-9 (cosine)
    assert torch.allclose(from_cfg.alpha(t) ** 2, acp, rtol=2e-5, atol=0)
    assert torch.allclose(I.diffusers_alphas_cumprod(cfg), acp, rtol=2e-5, atol=0)


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


def test_adapter_calls_network_at_the_knot_timesteps(unet, x_T):
    sch = diffusers.DDIMScheduler(prediction_type="v_prediction")
    field = I.from_diffusers(unet, sch)
    assert field.prediction == "v" and isinstance(field.schedule, I.DiscreteVP)
    t = I.t_of_timestep(field.schedule, 499)
    with torch.no_grad():
        ours = field.predict("v", x_T, t)
        theirs = unet(x_T, 499).sample
    assert torch.equal(ours, theirs)
    assert field.nfe == 1


# ------------------------------------------------------------------------------------------------
# sampler loops against diffusers' schedulers


SCHEDULERS = {  # ours, our options, scheduler class, scheduler options
    "ddim": ("ddim", {}, "DDIMScheduler", dict(clip_sample=False)),
    "dpmpp_2m": ("dpmpp_2m", dict(lower_order_final=False), "DPMSolverMultistepScheduler", {}),
    "unipc": ("unipc", dict(lower_order_final=False), "UniPCMultistepScheduler", {}),
    "euler": ("euler", dict(coords="edm"), "EulerDiscreteScheduler", {}),
}


def _compare(unet, x_T, name, prediction_type, beta_schedule, steps=10, timestep=None, spacing="trailing"):
    """Run diffusers' loop and ours on the same network and start; return (per-step rel. errors, final rel. error,
    nfe ours, nfe theirs). ``spacing`` None: the scheduler's default timestep_spacing."""
    ours, our_opts, cls, opts = SCHEDULERS[name]
    cfg = dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    if spacing is not None:
        cfg["timestep_spacing"] = spacing
    sch = getattr(diffusers, cls)(**cfg, **opts)
    field = I.from_diffusers(unet, sch)
    sch.set_timesteps(steps)
    grid = I.t_of_timestep(field.schedule, sch.timesteps)
    alpha = field.schedule.alpha(grid)
    states, calls = [], []

    def net(x, k):
        calls.append(float(k))
        return unet(x, k if timestep is None else timestep(k))

    def keep(i, k, x, s):
        # the state at the next timestep, in x-space. UniPC returns the predictor's state and corrects it at the
        # start of the next step (keeping it as last_sample); the corrected state at the last timestep is never
        # used (its final step outputs the denoiser of the predicted state), and ours stops there uncorrected.
        if name == "unipc":
            if 1 <= i <= steps - 2:
                states.append(s.last_sample.clone())
            if i == steps - 2:
                states.append(x.clone())
        elif i + 1 < steps:
            states.append(x * alpha[i + 1] if name == "euler" else x.clone())

    with torch.no_grad():
        out = I.diffusers_loop(sch, net, x_T, steps, alpha_start=float(alpha[0]), callback=keep)
        res = sample(field, x_T, ours, grid=grid, final="denoise", return_trajectory=True, **our_opts)
    errs = [_rel(res.trajectory[i + 1], s) for i, s in enumerate(states)]
    assert len(errs) == steps - 1
    return errs, _rel(res.x, out), res.nfe, len(calls)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loops_match_diffusers_step_for_step(unet, x_T, name, prediction_type):
    """Same tiny UNet, same x_T: our ddim / dpmpp_2m / unipc / euler on the scheduler's timesteps with
    final='denoise' reproduce DDIMScheduler / DPMSolverMultistepScheduler / UniPCMultistepScheduler /
    EulerDiscreteScheduler (trailing spacing, their defaults otherwise) state for state, and use as many model
    calls."""
    errs, final, nfe, calls = _compare(unet, x_T, name, prediction_type, "scaled_linear")
    assert max(errs) < REL, errs
    assert final < REL, final
    assert nfe == calls == 10


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loops_match_with_default_spacing(unet, x_T, name):
    """The schedulers' default timestep_spacing ("leading" for DDIM: 900, 800, ..., 0; "linspace" for the others:
    999, 888, ..., 0) also lies on the knots, and the loops agree there too (our grid = their timesteps' times)."""
    errs, final, nfe, calls = _compare(unet, x_T, name, "epsilon", "scaled_linear", spacing=None)
    assert max(errs) < REL and final < REL, (errs, final)
    assert nfe == calls == 10


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_loops_match_other_beta_schedules(unet, x_T, beta_schedule):
    for name in ("ddim", "dpmpp_2m"):
        errs, final, _, _ = _compare(unet, x_T, name, "epsilon", beta_schedule, steps=8)
        assert max(errs) < REL and final < REL, (name, errs, final)


def test_broken_timestep_mapping_fails(unet, x_T):
    """The check can fail: a network called one timestep late (k + 1, the classic off-by-one between 0- and
    1-based steps) moves the states far beyond the tolerance."""
    errs, final, _, _ = _compare(unet, x_T, "dpmpp_2m", "epsilon", "scaled_linear",
                                 timestep=lambda k: k + 1)
    assert max(errs) > 1e3 * REL and final > 1e3 * REL


def test_our_defaults_differ_where_documented(unet, x_T):
    """dpmpp_2m's default lowers the order of its last step for N < 10 (official DPM-Solver); diffusers keeps
    order 2 there and makes the step to sigma = 0 its first-order final step. With the defaults the loops differ."""
    sch = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                timestep_spacing="trailing")
    field = I.from_diffusers(unet, sch)
    with torch.no_grad():
        out = I.diffusers_loop(sch, unet, x_T, 8)
        grid = I.t_of_timestep(field.schedule, sch.timesteps)
        ours = sample(field, x_T, "dpmpp_2m", grid=grid, final="denoise").x
    assert _rel(ours, out) > 1e-4


# ------------------------------------------------------------------------------------------------
# a DiT with class labels and a learned variance


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(3)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                          out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10)
    return net.double().eval()


def test_dit_field_with_labels_and_learned_sigma(tiny_dit, x_T):
    """The DiT's 2C output channels are split (first C = the prediction), class labels pass through, and a DDIM
    loop matches diffusers' (as the DiT pipeline runs it: expanded timesteps, learned-sigma channels dropped)."""
    y = torch.tensor([1, 7, 3])
    sch = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    field = I.from_diffusers(tiny_dit, sch, class_labels=y)

    def net(x, k):
        out = tiny_dit(x, timestep=torch.as_tensor(k).expand(x.shape[0]), class_labels=y).sample
        return out[:, :2]

    with torch.no_grad():
        out = I.diffusers_loop(sch, net, x_T, 8)  # DDIM steps to k - N // n: n must divide N (documented)
        grid = I.t_of_timestep(field.schedule, sch.timesteps)
        ours = sample(field, x_T, "ddim", grid=grid, final="denoise")
    assert ours.nfe == 8
    assert _rel(ours.x, out) < REL
    with pytest.raises(ValueError, match="learn_sigma=True needs 2C = 4"):
        I.from_diffusers(lambda x, k: x, sch, learn_sigma=True).eps(x_T, 0.5)


def test_dit_field_guidance_and_directory_checkpoint(tiny_dit, tmp_path, x_T):
    """dit_field on a diffusers directory (save_pretrained) loaded by load_dit_checkpoint; classifier-free guidance
    of the package passes [c; null] as labels: (1 + w) eps(x|c) - w eps(x|null)."""
    from diffusion_lab.guidance import classifier_free_guidance
    from diffusion_lab.models import convert

    sd = tiny_dit.state_dict()
    for k in list(sd):  # identical embedder copies, as in a converted reference checkpoint
        if k.startswith("transformer_blocks.0.norm1.emb."):
            sd[k.replace("transformer_blocks.0.", "transformer_blocks.1.")] = sd[k].clone()
    net = diffusers.DiTTransformer2DModel(**{k: v for k, v in tiny_dit.config.items() if not k.startswith("_")})
    net.load_state_dict(sd)
    net.eval()  # in training mode diffusers' label embedder drops labels at random
    net.save_pretrained(tmp_path / "dit")
    ours = I.load_dit_checkpoint(tmp_path / "dit")
    assert isinstance(ours, type(convert.dit_from_diffusers(net)))
    y = torch.tensor([1, 7, 3])
    field = I.dit_field(ours, y)
    t = I.t_of_timestep(field.schedule, 600)
    guided = classifier_free_guidance(field, 3.0, y)
    with torch.no_grad():
        e_c = net(x_T.float(), timestep=torch.full((3,), 600), class_labels=y).sample[:, :2].double()
        e_u = net(x_T.float(), timestep=torch.full((3,), 600), class_labels=torch.full((3,), 10)).sample[:, :2]
        ref = 4.0 * e_c - 3.0 * e_u.double()
        got = guided.eps(x_T, t)
        cond = field.eps(x_T, t)
    assert float((cond - e_c).abs().max()) < 1e-5
    assert float((got - ref).abs().max()) < 1e-4
    assert guided.nfe == 2
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        I.load_dit_checkpoint(tmp_path / "missing.pt")


def test_decode_latents_scales_by_the_vae_factor(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    vae2 = I.load_vae(tmp_path / "vae")
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    out = I.decode_latents(vae2, z)
    assert out.shape == (2, 3, 8, 8) and torch.allclose(out, ref, atol=1e-6)


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
