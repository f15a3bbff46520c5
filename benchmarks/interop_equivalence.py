#!/usr/bin/env python
r"""diffusers and k-diffusion through ``diffusion_lab.interop``: the max differences table.

Three blocks, every network a small random one (nothing is downloaded), float64 unless stated:

1. diffusers schedulers: a random UNet2DModel as a field (``interop.from_diffusers``); diffusers' own loop
   (DDIM, DPM-Solver++ 2M, UniPC, Euler; timestep_spacing "trailing" and the scheduler's default) against ours
   on the scheduler's timesteps (``interop.step_states``: grid = t_of_timestep(schedule, scheduler.timesteps),
   final="denoise"), for
   every prediction type and beta schedule. Column "step": max over steps of max |ours - theirs| / max(1, max
   |theirs|) of the states at the timesteps; "final": the same for the output; "NFE": ours / theirs. A row with a
   deliberately broken timestep map (the network called at k + 1) shows what a wrong mapping gives.
2. k-diffusion: our exported ``sample_<name>`` against k-diffusion's on a smooth random denoiser and Karras sigmas
   (max |ours - theirs|, model calls).
3. DiT weights: a random diffusers DiTTransformer2DModel converted to ``diffusion_lab.models.DiT``, max |ours -
   theirs| over random inputs, timesteps (integer and fractional) and labels, float32 and float64; the round
   trip back to diffusers' layout; and the same with a wrong head count (must be large).
4. With ``--reference-dit PATH`` (facebookresearch/DiT ``models.py``, a local copy; nothing is downloaded): the
   reference DiT itself, built with random weights in every tensor (its zero initialisation would make the output
   0), saved as a state dict, loaded by ``models.convert.dit_from_reference`` and compared on random inputs,
   integer timesteps and labels. models.py imports ``PatchEmbed``, ``Attention`` and ``Mlp`` from timm; when timm is
   not installed they are replaced by minimal modules with timm's parameter names and forward passes (conv patch
   embedding + flatten; fused-qkv multi-head attention; Linear-GELU(tanh)-Linear), which the table says.

Run:  python benchmarks/interop_equivalence.py [--steps 10] [--reference-dit PATH/models.py] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

try:
    from diffusion_lab import interop as I
    from diffusion_lab.models import DiT
    from diffusion_lab.models import convert as C
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from diffusion_lab import interop as I
    from diffusion_lab.models import DiT
    from diffusion_lab.models import convert as C

SCHEDULERS = {  # ours, our options (to match the scheduler's last steps), diffusers class, its options
    "ddim": ("ddim", {}, "DDIMScheduler", dict(clip_sample=False)),
    "dpmpp_2m": ("dpmpp_2m", dict(lower_order_final=False), "DPMSolverMultistepScheduler", {}),
    "unipc": ("unipc", dict(lower_order_final=False), "UniPCMultistepScheduler", {}),
    "euler": ("euler", dict(coords="edm"), "EulerDiscreteScheduler", {}),
}
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def tiny_unet(seed=0):
    import diffusers

    torch.manual_seed(seed)
    net = diffusers.UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    return net.double().eval()


def scheduler_row(unet, x_T, name, prediction_type, beta_schedule, spacing, steps, shift=0):
    import diffusers

    ours, our_opts, cls, opts = SCHEDULERS[name]
    b0, b1 = BETAS[beta_schedule]
    cfg = dict(beta_schedule=beta_schedule, beta_start=b0, beta_end=b1, prediction_type=prediction_type, **opts)
    if spacing != "default":
        cfg["timestep_spacing"] = spacing
    sch = getattr(diffusers, cls)(**cfg)
    field = I.from_diffusers(unet, sch)
    st = I.step_states(sch, lambda x, k: unet(x, k + shift), field, x_T, steps, ours, **our_opts)
    return {"block": "diffusers", "ours": ours, "theirs": cls, "prediction_type": prediction_type,
            "beta_schedule": beta_schedule, "spacing": spacing, "steps": steps, "broken": bool(shift),
            "step": max(st.step_errors()), "final": st.final_error(), "nfe_ours": st.nfe_ours,
            "nfe_theirs": st.nfe_theirs}


class SmoothDenoiser:
    def __init__(self, seed=5):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(6, 6, dtype=torch.float64, generator=g) / 3
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        c = 1.0 / (1.0 + sigma.reshape(-1, 1) ** 2)
        return c * x + (1 - c) * torch.tanh(x @ self.w)


def kdiffusion_rows(steps):
    K = I.k_diffusion_sampling()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sigmas = K.get_sigmas_karras(steps, 0.02, 20.0, rho=7.0).to(torch.float64)
    finally:
        torch.set_default_dtype(old)
    x = 20.0 * torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rows = []
    for name in ("euler", "heun", "dpmpp_2m"):
        a, b = SmoothDenoiser(), SmoothDenoiser()
        ref = getattr(K, f"sample_{name}")(a, x, sigmas, disable=True)
        out = getattr(I, f"sample_{name}")(b, x, sigmas)
        rows.append({"block": "k-diffusion", "method": name, "steps": steps,
                     "max_abs": float((out - ref).abs().max()), "calls_ours": b.calls, "calls_theirs": a.calls})
    return rows


def dit_rows():
    import diffusers

    torch.manual_seed(3)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=2,
                                          out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=10).eval()
    sd = net.state_dict()
    for k in list(sd):  # identical embedder copies, as in a converted reference checkpoint
        if k.startswith("transformer_blocks.0.norm1.emb."):
            sd[k.replace("transformer_blocks.0.", "transformer_blocks.1.")] = sd[k].clone()
    net.load_state_dict(sd)
    rows = []
    for dtype in (torch.float32, torch.float64):
        n = net.to(dtype)
        ours = C.dit_from_diffusers(n)
        back_sd, back_cfg = C.diffusers_state_dict(ours)
        back = diffusers.DiTTransformer2DModel(**back_cfg).to(dtype).eval()
        back.load_state_dict(back_sd)
        wrong = DiT(ours.config.replace(num_heads=2)).to(dtype)
        wrong.load_state_dict(ours.state_dict())
        diff = {"ours": 0.0, "round_trip": 0.0, "wrong_heads": 0.0}
        scale = 0.0
        for seed in range(5):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(8, 2, 8, 8, generator=g, dtype=dtype)
            t = torch.rand(8, generator=g, dtype=torch.float64) * 999
            t[:4] = torch.randint(0, 1000, (4,), generator=g).double()
            y = torch.randint(0, 10, (8,), generator=g)
            with torch.no_grad():
                ref = n(x, timestep=t, class_labels=y).sample
                scale = max(scale, float(ref.abs().max()))
                diff["ours"] = max(diff["ours"], float((ours(x, t.to(dtype), y) - ref).abs().max()))
                diff["round_trip"] = max(diff["round_trip"],
                                         float((back(x, timestep=t, class_labels=y).sample - ref).abs().max()))
                diff["wrong_heads"] = max(diff["wrong_heads"], float((wrong.eval()(x, t.to(dtype), y) - ref)
                                                                     .abs().max()))
        rows.append({"block": "DiT", "dtype": str(dtype).removeprefix("torch."), "output_scale": scale, **diff})
    net.float()
    return rows


def _timm_stand_in():
    """Minimal ``timm.models.vision_transformer`` with the three layers the reference models.py imports."""
    import types

    import torch.nn.functional as F
    from torch import nn

    class PatchEmbed(nn.Module):
        def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
            super().__init__()
            self.patch_size = (patch_size, patch_size)
            self.num_patches = (img_size // patch_size) ** 2
            self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(nn.Module):
        def __init__(self, dim, num_heads=8, qkv_bias=False, **_):
            super().__init__()
            self.num_heads = num_heads
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))

    class Mlp(nn.Module):
        def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0, **_):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(in_features, hidden_features), act_layer(), \
                nn.Linear(hidden_features, in_features)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    mod = types.ModuleType("timm.models.vision_transformer")
    mod.PatchEmbed, mod.Attention, mod.Mlp = PatchEmbed, Attention, Mlp
    return mod


def reference_dit_rows(path):
    """Our DiT loaded from a reference DiT's state dict against the reference forward (block 4 above)."""
    import importlib.util
    import types

    saved = {k: sys.modules.get(k) for k in ("timm", "timm.models", "timm.models.vision_transformer")}
    try:
        import timm.models.vision_transformer  # noqa: F401
        layers = "timm"
    except ImportError:
        vt = _timm_stand_in()
        timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
        timm.models, models.vision_transformer = models, vt
        sys.modules.update({"timm": timm, "timm.models": models, "timm.models.vision_transformer": vt})
        layers = "stand-in for timm (PatchEmbed, Attention, Mlp)"
    try:
        spec = importlib.util.spec_from_file_location("reference_dit_models", path)
        ref = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ref)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    rows = []
    for learn_sigma in (True, False):
        torch.manual_seed(0)
        net = ref.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=384, depth=2, num_heads=6,
                      num_classes=10, learn_sigma=learn_sigma).eval()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name != "pos_embed":
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))
        ours = C.dit_from_reference({k: v.clone() for k, v in net.state_dict().items()})
        diff, scale = 0.0, 0.0
        for seed in range(5):
            g = torch.Generator().manual_seed(10 + seed)
            x = torch.randn(8, 4, 8, 8, generator=g)
            t = torch.randint(0, 1000, (8,), generator=g)
            y = torch.randint(0, 11, (8,), generator=g)  # 10 = the null class of classifier-free guidance
            with torch.no_grad():
                a = net(x, t, y)
                b = ours(x, t.float(), y)
            diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(a.abs().max()))
        back = C.reference_state_dict(ours)
        same = set(back) == set(net.state_dict()) and all(torch.equal(back[k], v) for k, v in net.state_dict().items())
        rows.append({"block": "reference DiT", "learn_sigma": learn_sigma, "out_channels": ours.out_channels,
                     "num_heads": ours.num_heads, "max_abs": diff, "output_scale": scale,
                     "saved_back_identical": bool(same), "layers": layers})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="inference steps (a divisor of 1000 for DDIM)")
    p.add_argument("--reference-dit", default=None, metavar="PATH", help="facebookresearch/DiT models.py (local)")
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()  # diffusers' notes on casting a model with .to(dtype)
    unet = tiny_unet()
    x_T = torch.randn(4, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rows = []
    for beta in BETAS:
        for pt in ("epsilon", "v_prediction", "sample"):
            for name in SCHEDULERS:
                for spacing in ("trailing", "default"):
                    rows.append(scheduler_row(unet, x_T, name, pt, beta, spacing, a.steps))
    rows.append(scheduler_row(unet, x_T, "dpmpp_2m", "epsilon", "scaled_linear", "trailing", a.steps, shift=1))
    print("== diffusers schedulers vs ours (rel. max difference; same UNet, same x_T) ==")
    print(f"{'ours':9s} {'scheduler':28s} {'prediction':13s} {'betas':18s} {'spacing':9s} {'step':>9s} "
          f"{'final':>9s} {'NFE':>7s}")
    for r in rows:
        tag = "  <- broken map (k + 1)" if r["broken"] else ""
        print(f"{r['ours']:9s} {r['theirs']:28s} {r['prediction_type']:13s} {r['beta_schedule']:18s} "
              f"{r['spacing']:9s} {r['step']:9.2e} {r['final']:9.2e} {r['nfe_ours']:>3d}/{r['nfe_theirs']:<3d}{tag}")
    kd = kdiffusion_rows(a.steps)
    print("\n== k-diffusion samplers vs ours exported as sample_<name> (max abs difference) ==")
    for r in kd:
        print(f"{r['method']:9s} steps {r['steps']:3d}  max|diff| {r['max_abs']:9.2e}  calls "
              f"{r['calls_ours']}/{r['calls_theirs']}")
    dit = dit_rows()
    print("\n== DiT: diffusers DiTTransformer2DModel -> diffusion_lab DiT (max abs difference) ==")
    for r in dit:
        print(f"{r['dtype']:8s} output scale {r['output_scale']:.3g}  converted {r['ours']:9.2e}  round trip "
              f"{r['round_trip']:9.2e}  wrong head count {r['wrong_heads']:9.2e}")
    ref_rows = []
    if a.reference_dit:
        ref_rows = reference_dit_rows(a.reference_dit)
        print("\n== reference DiT (facebookresearch/DiT models.py) -> diffusion_lab DiT (max abs difference) ==")
        for r in ref_rows:
            print(f"learn_sigma={r['learn_sigma']!s:5s} out_channels {r['out_channels']}  heads {r['num_heads']}  "
                  f"output scale {r['output_scale']:.3g}  max|diff| {r['max_abs']:9.2e}  saved back identical "
                  f"{r['saved_back_identical']}  [{r['layers']}]")
    good = [r for r in rows if not r["broken"]]
    summary = {"diffusers_max_step": max(r["step"] for r in good), "diffusers_max_final": max(r["final"] for r in good),
               "kdiffusion_max": max(r["max_abs"] for r in kd), "dit_max": max(r["ours"] for r in dit)}
    print("\nsummary:", {k: f"{v:.2e}" for k, v in summary.items()})
    if a.json:
        import diffusers

        with open(a.json, "w") as f:
            json.dump({"settings": {"steps": a.steps, "torch": torch.__version__, "diffusers": diffusers.__version__},
                       "diffusers": rows, "kdiffusion": kd, "dit": dit, "reference_dit": ref_rows,
                       "summary": summary}, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
