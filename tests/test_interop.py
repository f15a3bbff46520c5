"""diffusers networks as fields: the same network and start noise give diffusers' samples, step for step.

Tolerances. diffusers keeps its schedule in float32 (alphas_cumprod, sigmas) and evaluates the step coefficients
from it in float32 (square roots, 1 - alphabar; Euler steps its state in float32), so with a float64 network and
state its loop carries relative round-off of a few float32 ulps (6e-8) per step: the states agree with ours to
<= 1e-6 relative to their size, which is what is asserted. Our field uses the scheduler's own alphas_cumprod
(exact in float64), so no schedule mismatch enters. k-diffusion runs in float64 throughout: 1e-10.
"""
import pytest
import torch

from diffusion_lab import interop as I
from diffusion_lab import schedules as S
from diffusion_lab.samplers import sample

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


def test_pipeline_gives_its_network_and_scheduler(unet, x_T):
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(prediction_type="sample"))
    field = I.from_diffusers(pipe)
    assert field.model.net is unet and field.prediction == "x0"
    with torch.no_grad():
        assert torch.equal(field.denoiser(x_T, 0.5), unet(x_T, 499).sample)


# ------------------------------------------------------------------------------------------------
# sampler loops against diffusers' schedulers


SCHEDULERS = {  # ours, our options, scheduler class, scheduler options
    "ddim": ("ddim", {}, "DDIMScheduler", dict(clip_sample=False)),
    "dpmpp_2m": ("dpmpp_2m", dict(lower_order_final=False), "DPMSolverMultistepScheduler", {}),
    "unipc": ("unipc", dict(lower_order_final=False), "UniPCMultistepScheduler", {}),
    "euler": ("euler", dict(coords="edm"), "EulerDiscreteScheduler", {}),
}


def _compare(unet, x_T, name, prediction_type, beta_schedule, steps=10, timestep=None, spacing="trailing"):
    """Run diffusers' loop and ours on the same network and start (``interop.step_states``); return (per-step rel.
    errors, final rel. error, nfe ours, nfe theirs). ``timestep``: diffusers' side calls the network at timestep(k)
    (a deliberately wrong mapping); ``spacing`` None: the scheduler's default timestep_spacing."""
    ours, our_opts, cls, opts = SCHEDULERS[name]
    cfg = dict(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    if spacing is not None:
        cfg["timestep_spacing"] = spacing
    sch = getattr(diffusers, cls)(**cfg, **opts)
    field = I.from_diffusers(unet, sch)

    def net(x, k):
        return unet(x, k if timestep is None else timestep(k))

    st = I.step_states(sch, net, field, x_T, steps, ours, **our_opts)
    errs = st.step_errors()
    assert len(errs) == steps - 1 and st.ours.shape == st.theirs.shape == (steps - 1, *x_T.shape)
    return errs, st.final_error(), st.nfe_ours, st.nfe_theirs


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


def test_field_as_diffusers_model_drives_a_scheduler():
    """The other direction: an exact field of the package answering diffusers' model(x, k) (FieldAsDiffusers) in
    DPMSolverMultistepScheduler's loop gives our dpmpp_2m on the same timesteps."""
    from diffusion_lab import targets

    schedule = S.DDPMDiscrete()
    tg = targets.ring8()
    field = tg.field(schedule, "eps")
    x_T = tg.marginal(schedule, 1.0).sample(64, torch.Generator().manual_seed(0))
    sch = diffusers.DPMSolverMultistepScheduler(timestep_spacing="trailing")
    model = I.FieldAsDiffusers(field)
    out = I.diffusers_loop(sch, model, x_T, 12)
    grid = I.t_of_timestep(schedule, sch.timesteps)
    ours = sample(field, x_T, "dpmpp_2m", grid=grid, final="denoise", lower_order_final=False)
    assert model.calls == ours.nfe == 12 and model.timesteps[0] == 999.0
    assert _rel(ours.x, out) < REL


def test_broken_timestep_mapping_fails(unet, x_T):
    """The check can fail: a network called one timestep late (k + 1, the classic off-by-one between 0- and
    1-based steps) moves the states far beyond the tolerance."""
    errs, final, _, _ = _compare(unet, x_T, "dpmpp_2m", "epsilon", "scaled_linear",
                                 timestep=lambda k: k + 1)
    assert max(errs) > 1e3 * REL and final > 1e3 * REL


def test_step_states_refuses_what_it_cannot_compare(unet, x_T):
    sch = diffusers.DDIMScheduler(timestep_spacing="trailing", clip_sample=False)
    field = I.from_diffusers(unet, sch)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        I.step_states(sch, unet, field, x_T, 1, "ddim")
    from diffusion_lab import targets

    exact = targets.ring8().field(S.VPLinear(), "eps")  # a continuous schedule: no timesteps to share
    with pytest.raises(TypeError, match="discrete schedule"):
        I.step_states(sch, unet, exact, x_T, 4, "ddim")


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
