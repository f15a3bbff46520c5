"""DiT weights from diffusers' DiTTransformer2DModel into our DiT and back (the reference layout, which needs no
diffusers: tests/test_interop_core.py).

Tolerance 1e-5 (outputs of size ~1): diffusers computes the timestep features in float32 whatever the model dtype
(``get_timestep_embedding`` casts t to float32), ours in the input's dtype; the arguments t omega_i reach ~1000 rad,
where a float32 ulp is 6e-5 rad, which moves the output by ~1e-6 (measured 7e-7 in float64, 1.3e-6 in float32).
"""
import pytest
import torch

from diffusion_lab.models import DiT, get_config
from diffusion_lab.models import convert as C
from test_interop_core import _inputs  # the same random DiT inputs (x, fractional timesteps, labels)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5


def _tie_embedders(net):
    """diffusers gives every block its own randomly initialised condition embedder; a converted reference
    checkpoint has identical copies. Copy block 0's into the others."""
    sd = net.state_dict()
    for k in list(sd):
        if k.startswith("transformer_blocks.0.norm1.emb."):
            for i in range(1, net.config.num_layers):
                sd[k.replace("transformer_blocks.0.", f"transformer_blocks.{i}.")] = sd[k].clone()
    net.load_state_dict(sd)
    return net


@pytest.fixture(scope="module")
def ddit():
    torch.manual_seed(3)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=2,
                                          out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10)
    return _tie_embedders(net).eval()




def _max_diff(ours, net, dtype, seed=0):
    x, t, y = _inputs(dtype=dtype, seed=seed)
    with torch.no_grad():
        a = net(x, timestep=t, class_labels=y).sample
        b = ours(x, t.to(dtype), y)
    assert float(a.abs().max()) > 0.1  # a random diffusers DiT is not zero-initialised: the check has teeth
    return float((a - b).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_diffusers_dit_converted_gives_the_same_output(ddit, dtype):
    net = ddit.to(dtype)
    ours = C.dit_from_diffusers(net)
    assert ours.config.frequency_shift == 1.0 and ours.config.mlp_norm_eps == 1e-5 and ours.out_channels == 4
    assert next(ours.parameters()).dtype == dtype
    for seed in range(3):
        assert _max_diff(ours, net, dtype, seed) < TOL
    ddit.float()


def test_broken_head_split_or_qkv_order_fails(ddit):
    """The check guards the attention head split and the q/k/v row order: a model with the right weights but
    another head count, or with q and k swapped, is far off."""
    ours = C.dit_from_diffusers(ddit)
    wrong_heads = DiT(ours.config.replace(num_heads=2))
    wrong_heads.load_state_dict(ours.state_dict())
    assert _max_diff(wrong_heads.eval(), ddit, torch.float32) > 1e3 * TOL
    swapped = C.dit_from_diffusers(ddit)
    with torch.no_grad():
        for blk in swapped.blocks:
            q, k, v = blk.attn.qkv.weight.chunk(3, 0)
            blk.attn.qkv.weight.copy_(torch.cat([k, q, v], 0))
    assert _max_diff(swapped, ddit, torch.float32) > 1e3 * TOL


def test_untied_embedders_are_refused():
    torch.manual_seed(0)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=2,
                                          num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(ValueError, match="block 1's condition embedder differs"):
        C.dit_from_diffusers(net)


def test_diffusers_round_trip(ddit):
    ours = C.dit_from_diffusers(ddit)
    sd, cfg = C.diffusers_state_dict(ours)
    back = diffusers.DiTTransformer2DModel(**cfg)
    back.load_state_dict(sd, strict=True)
    assert _max_diff(ours, back.eval(), torch.float32) < TOL
    for k, v in ddit.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    with pytest.raises(ValueError, match="frequency_shift=0.0"):
        C.diffusers_config(get_config("DiT-micro/2"))
