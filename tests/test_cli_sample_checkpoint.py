"""`diffusion-lab sample --checkpoint PATH [--vae DIR]` on models from elsewhere (a reference-layout DiT ``.pt``,
a diffusers DiT directory) and this package's checkpoints, with the per-sample seeding of
``diffusion_lab.distributed``.

The CLI's samples are compared with the same computation done by hand through the library (load, field, start
noise, sampler, decoder): equal to 1e-12 (the same float64 operations in the same order; no method error enters).
"""
import json

import numpy as np
import pytest
import torch

from diffusion_lab import distributed as D
from diffusion_lab import interop
from diffusion_lab.cli import main
from diffusion_lab.models import DiT, DiTConfig
from diffusion_lab.models import convert
from diffusion_lab.samplers import sample

TINY = dict(input_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=1, num_heads=4,
            num_classes=3, class_dropout_prob=0.1, time_scale=1.0)


def _randomize(net, seed=0):
    """adaLN-Zero starts with a zero output layer: fill every weight with random numbers so outputs carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def ref_dit(tmp_path_factory):
    """A tiny learn_sigma DiT saved in the reference layout, and the model itself."""
    net = _randomize(DiT(DiTConfig(**TINY)))
    path = tmp_path_factory.mktemp("ref") / "dit.pt"
    torch.save(convert.reference_state_dict(net), path)
    return path, net


def _by_hand(net, n, seed, batch, method="ddim", steps=3, labels=None, w=0.0, **options):
    """The samples the CLI should produce, built from the library's parts."""
    from diffusion_lab.guidance import classifier_free_guidance

    out = []
    for b, (s, e) in enumerate(D.batch_bounds(n, batch)):
        y = labels[s:e] if labels is not None else None
        field = interop.dit_field(net, y)
        if w:
            field = classifier_free_guidance(field, w, y)
        sig = float(field.schedule.sigma(torch.tensor(field.schedule.t_max, dtype=torch.float64)))
        x = D.initial_noise(seed, s, e, net.data_shape, sig)
        g = torch.Generator().manual_seed(D.derived_seed(seed, D.SAMPLER_STREAM, b))
        with torch.no_grad():
            out.append(sample(field, x, method, steps=steps, final="denoise", generator=g, **options).x.float())
    return torch.cat(out)


def _run(argv, out):
    assert main([*argv, "--out", str(out), "--no-plot"]) == 0
    with np.load(out / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def test_reference_dit_checkpoint_samples_as_the_library_does(ref_dit, tmp_path):
    path, net = ref_dit
    got = _run(["sample", "--checkpoint", str(path), "--num-heads", "4", "--n", "5", "--batch", "2",
                "--method", "ddim:eta=0.5", "--steps", "3", "--cfg", "1.5", "--seed", "7"], tmp_path / "s")
    labels = torch.arange(5) % 3
    want = _by_hand(net, 5, 7, 2, labels=labels, w=1.5, eta=0.5)
    assert got["x"].shape == (5, 4, 8, 8) and got["labels"].tolist() == labels.tolist()
    assert float(np.abs(want.numpy()).max()) > 0.1
    np.testing.assert_allclose(got["x"], want.numpy(), rtol=0, atol=1e-12)
    s = json.loads((tmp_path / "s" / "settings.json").read_text())
    assert s["checkpoint_kind"] == "reference DiT" and s["train"]["config"]["num_heads"] == 4 and s["batch"] == 2


def test_wrong_head_count_gives_other_samples(ref_dit, tmp_path):
    """The check has teeth: the same weights read with 2 heads instead of 4 sample something else."""
    path, net = ref_dit
    got = _run(["sample", "--checkpoint", str(path), "--num-heads", "2", "--n", "3", "--method", "ddim",
                "--steps", "3"], tmp_path / "s")
    want = _by_hand(net, 3, 0, 256, labels=torch.arange(3) % 3)
    assert float(np.abs(got["x"] - want.numpy()).max()) > 1e-3


def test_reference_dit_of_a_non_paper_width_needs_num_heads(ref_dit, tmp_path, capsys):
    path, _ = ref_dit
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--checkpoint", str(path), "--out", str(tmp_path / "s")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "hidden size 32" in err and "num_heads" in err
    assert not (tmp_path / "s").exists()


def test_two_checkpoints_are_refused(ref_dit, tmp_path, capsys):
    path, _ = ref_dit
    with pytest.raises(SystemExit):
        main(["sample", str(path), "--checkpoint", str(tmp_path / "other.pt"), "--out", str(tmp_path / "s")])
    assert "two checkpoints" in capsys.readouterr().err


def test_sample_i_depends_on_seed_and_i_only(ref_dit, tmp_path):
    """Deterministic method: sample i is the same whatever n and the batch size, to the rounding of the float32
    network's batched products of other shapes (float32 eps 1.2e-7, amplified by 1/alpha(t_max) ~ 160 in the
    denoiser of a random network: relative 1e-5 of the largest value), against O(1) relative changes for another
    seed."""
    path, _ = ref_dit
    common = ["sample", "--checkpoint", str(path), "--num-heads", "4", "--method", "ddim", "--steps", "3",
              "--class", "1", "--seed", "3"]
    a = _run([*common, "--n", "6", "--batch", "4"], tmp_path / "a")["x"]
    b = _run([*common, "--n", "3", "--batch", "2"], tmp_path / "b")["x"]
    c = _run([*common, "--n", "3", "--batch", "2", "--seed", "4"], tmp_path / "c")["x"]
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a[:3], b, rtol=0, atol=1e-5 * scale)
    assert float(np.abs(b - c).max()) > 0.1 * scale


def test_initial_noise_is_per_sample():
    a = D.initial_noise(5, 0, 10, (3,))
    b = D.initial_noise(5, 4, 7, (3,))
    assert torch.equal(a[4:7], b)
    assert not torch.equal(D.initial_noise(6, 4, 7, (3,)), b)
    # the start law: N(0, sigma^2 I); 4000 x 3 draws, the sample std within 5 standard errors of 2
    x = D.initial_noise(0, 0, 4000, (3,), sigma=2.0)
    assert abs(float(x.std()) - 2.0) < 5 * 2.0 / np.sqrt(2 * x.numel())
    assert D.derived_seed(0, 0, 1) != D.derived_seed(0, 1, 0) != D.derived_seed(1, 0, 0)
    with pytest.raises(ValueError, match="index=-1"):
        D.derived_seed(0, 0, -1)
    with pytest.raises(ValueError, match="rank=2"):
        D.rank_batches(5, 2, 2)
    assert D.rank_batches(5, 1, 2) == [1, 3] and D.batch_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]


# ------------------------------------------------------------------------------------------------
# diffusers: a DiT directory and a VAE


def _tiny_diffusers_dit(path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(3)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                          out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=3)
    net.save_pretrained(path)
    return net


def test_diffusers_dit_directory(tmp_path):
    _tiny_diffusers_dit(tmp_path / "dit")
    ours = interop.load_dit_checkpoint(tmp_path / "dit")
    got = _run(["sample", "--checkpoint", str(tmp_path / "dit"), "--n", "4", "--method", "dpmpp_2m", "--steps", "4"],
               tmp_path / "s")
    want = _by_hand(ours, 4, 0, 256, method="dpmpp_2m", steps=4, labels=torch.arange(4) % 3)
    assert float(np.abs(want.numpy()).max()) > 0.1
    np.testing.assert_allclose(got["x"], want.numpy(), rtol=0, atol=1e-12)


def test_vae_decodes_the_latents(ref_dit, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), norm_num_groups=4, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16)
    vae.save_pretrained(tmp_path / "vae")
    path, net = ref_dit
    got = _run(["sample", "--checkpoint", str(path), "--num-heads", "4", "--vae", str(tmp_path / "vae"), "--n", "3",
                "--method", "ddim", "--steps", "2", "--class", "2"], tmp_path / "s")
    z = _by_hand(net, 3, 0, 256, steps=2, labels=torch.full((3,), 2))
    img = interop.decode_latents(interop.load_vae(tmp_path / "vae"), z)
    want = torch.clamp(127.5 * img + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert got["arr_0"].dtype == np.uint8 and got["arr_0"].shape == (3, 16, 16, 3)
    assert len(np.unique(want)) > 10  # the decoder's output is not constant
    np.testing.assert_array_equal(got["arr_0"], want)


def test_vae_of_other_latent_channels_is_refused(ref_dit, tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2).save_pretrained(
        tmp_path / "vae")
    path, _ = ref_dit
    with pytest.raises(SystemExit):
        main(["sample", "--checkpoint", str(path), "--num-heads", "4", "--vae", str(tmp_path / "vae"),
              "--out", str(tmp_path / "s")])
    assert "latents of 2 channels" in capsys.readouterr().err


def test_no_checkpoint_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--out", str(tmp_path / "s")])
    assert "give a checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
