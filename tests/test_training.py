"""Training objectives, the learned field, classifier-free guidance, checkpoints (bitwise resume), DDP and the
train / sample commands."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.field import VelocityField
from diffusion_lab.guidance import GuidedField, check_guidance_weight, classifier_free_guidance
from diffusion_lab.models import get_model
from diffusion_lab.samplers import get_method, sample
from diffusion_lab.targets import ring8

SCHEDS = [S.VPLinear(), S.VPCosine(), S.VE(), S.EDM(), S.RectifiedFlow(), S.SubVP()]


def _tiny_mlp(num_classes=0, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return get_model("mlp", data_shape=2, hidden=32, depth=2, num_classes=num_classes).to(dtype)


# -------------------------------------------------------------------------------------------- coefficients
@pytest.mark.parametrize("sch", SCHEDS, ids=lambda s: s.name)
def test_c_noise_is_minus_quarter_lambda(sch):
    t = torch.linspace(sch.t_min, sch.t_max, 7, dtype=torch.float64)
    assert torch.allclose(T.c_noise(sch, t), -sch.lam(t) / 4, rtol=0, atol=1e-14)
    if isinstance(sch, (S.EDM, S.VE)):  # alpha = 1: EDM's log(sigma)/4
        assert torch.allclose(T.c_noise(sch, t), torch.log(sch.sigma(t)) / 4, atol=1e-13)


def test_edm_precond_reduces_to_karras_on_edm():
    sch, sd = S.EDM(), 0.5
    sig = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_n = T.edm_precond(sch, sig, sd)
    assert torch.allclose(c_skip, sd**2 / (sig**2 + sd**2), rtol=1e-14)
    assert torch.allclose(c_out, sig * sd / torch.sqrt(sig**2 + sd**2), rtol=1e-14)
    assert torch.allclose(c_in, 1 / torch.sqrt(sig**2 + sd**2), rtol=1e-14)
    assert torch.allclose(c_n, torch.log(sig) / 4, rtol=1e-14)


@pytest.mark.parametrize("sch", SCHEDS, ids=lambda s: s.name)
def test_targets_are_the_true_predictions(sch):
    """Each kind's target, read back as a prediction of that kind, gives x0 exactly (edm through D = c_skip x + c_out F)."""
    from diffusion_lab import param

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(64, 2, dtype=torch.float64, generator=g)
    t = T.sample_t(64, sch, generator=g, dtype=torch.float64)
    a, s, da, ds = (c[:, None] for c in (sch.alpha(t), sch.sigma(t), sch.dalpha(t), sch.dsigma(t)))
    x = a * x0 + s * eps
    for kind in T.NET_PREDICTIONS:
        if kind == "v" and not sch.variance_preserving:
            with pytest.raises(ValueError, match="variance-preserving"):
                T.prediction_target(kind, x0, eps, x, sch, t)
            continue
        tgt = T.prediction_target(kind, x0, eps, x, sch, t, 0.7)
        if kind == "edm":
            c_skip, c_out, _, _ = T.edm_precond(sch, t, 0.7)
            x0_back = c_skip[:, None] * x + c_out[:, None] * tgt
        else:
            x0_back, _ = param.to_x0_eps(tgt, kind, x, a, s, da, ds)
        assert torch.allclose(x0_back, x0, rtol=1e-9, atol=1e-9 * float(1 / a.min())), kind


def test_flow_matching_target_on_rectified_flow():
    """Conditional flow matching with data at t = 0: x_t = (1-t) x0 + t eps, target u = eps - x0."""
    sch = S.RectifiedFlow()
    x0, eps = torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    t = torch.rand(8, dtype=torch.float64) * 0.9 + 0.05
    x = (1 - t)[:, None] * x0 + t[:, None] * eps
    assert torch.allclose(T.prediction_target("velocity", x0, eps, x, sch, t), eps - x0, atol=1e-15)


def test_loss_equivalences_and_dsm_optimum():
    from theory_checks.training_checks import dsm_optimum, edm_precond_variance_residual, loss_equivalence_residual

    assert loss_equivalence_residual(n=128) < 1e-9
    assert edm_precond_variance_residual() < 1e-12
    z1, z2, _, _ = dsm_optimum(n=40_000)
    assert abs(z1) < 5 and abs(z2) < 5


def test_time_samplers():
    g = torch.Generator().manual_seed(0)
    for sch in SCHEDS:
        for name in T.TIME_SAMPLERS:
            t = T.sample_t(4000, sch, name, generator=g, dtype=torch.float64)
            assert t.min() >= sch.t_min - 1e-12 and t.max() <= sch.t_max + 1e-12, (sch.name, name)
    t = T.sample_t(20000, S.EDM(), "lognormal", generator=g, dtype=torch.float64)
    assert abs(float(torch.log(t).median()) - (-1.2)) < 0.05  # sigma = t on EDM: median exp(P_mean)
    with pytest.raises(ValueError, match="time sampler 'bogus'"):
        T.sample_t(3, S.EDM(), "bogus")


def test_objective_validation():
    with pytest.raises(ValueError, match="variance-preserving"):
        T.Objective(S.VE(), "v")
    with pytest.raises(ValueError, match="'nope'"):
        T.Objective(S.VPLinear(), "nope")
    with pytest.raises(ValueError, match="sigma_data"):
        T.Objective(S.VPLinear(), sigma_data=-1.0)
    with pytest.raises(ValueError, match="weighting 'bad'"):
        T.Objective(S.VPLinear(), weighting="bad")


# -------------------------------------------------------------------------------------------- learned field
def test_learned_field_plugs_into_every_view():
    from diffusion_lab import langevin as L

    sch = S.VPLinear()
    net = _tiny_mlp()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    f = T.learned_field(net, sch, "eps", sigma_data=1.4)
    assert isinstance(f, VelocityField) and f.data_shape == (2,) and f.prediction == "eps"
    x = torch.randn(32, 2, dtype=torch.float64)
    for m in ("heun", "dpmpp_2m", "em", "ddim"):
        r = sample(f, x, m, steps=4, generator=torch.Generator().manual_seed(0))
        assert r.x.dtype == torch.float64 and torch.isfinite(r.x).all()
        assert r.nfe == get_method(m).nfe_of_steps(4)
    out = L.ula(f, x, 0.5, 0.01, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.x).all()
    # the edm parameterisation exposes D = x0
    fe = T.learned_field(net, sch, "edm", sigma_data=1.4)
    assert fe.prediction == "x0"
    # gradients flow to x when asked (e.g. divergences), not otherwise
    xg = x.clone().requires_grad_(True)
    f.score(xg, 0.3).sum().backward()
    assert xg.grad is not None and f.score(x, 0.3).grad_fn is None


def test_learned_field_fokker_planck():
    from diffusion_lab import fokker_planck as fp
    sch = S.VPLinear()
    f = T.learned_field(_tiny_mlp(), sch, "eps")  # zero output at init: eps_hat = 0 -> score 0
    grid = fp.Grid.box(-4.0, 4.0, 16, 2)
    sol = fp.solve_reverse(f, "prior", grid, [1.0, 0.5], steps=4)
    assert sol.nfe > 0 and sol.mass_drift < 1e-8


def test_labels_bound_or_passed():
    sch = S.VPLinear()
    net = _tiny_mlp(num_classes=3)
    with torch.no_grad():
        net.y_embedder.embedding_table.weight.normal_()
        net.out.weight.normal_()
    f = T.learned_field(net, sch, "eps", labels=1)
    x = torch.randn(5, 2)
    a = f.eps(x, 0.5)
    b = f.model(x, torch.tensor(0.5), y=torch.ones(5, dtype=torch.long))
    c = f.model.with_labels(2)(x, torch.tensor(0.5))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="class label 7"):
        f.model.with_labels(7)(x, torch.tensor(0.5))


# -------------------------------------------------------------------------------------------- guidance
def test_cfg_weight_zero_counts_and_errors():
    sch = S.VPLinear()
    net = _tiny_mlp(num_classes=4, dtype=torch.float64)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    net.eval()
    f = T.learned_field(net, sch, "eps", labels=2)
    x = torch.randn(9, 2, dtype=torch.float64)
    g0 = classifier_free_guidance(f, 0.0, 2, batched=False)
    assert isinstance(g0, GuidedField) and torch.equal(g0.eps(x, 0.4), f.eps(x, 0.4))
    assert torch.allclose(classifier_free_guidance(f, 0.0, 2).eps(x, 0.4), f.eps(x, 0.4), rtol=1e-12, atol=1e-14)
    w = 1.5
    g = classifier_free_guidance(f, w, 2)
    uncond = f.model(x, torch.tensor(0.4, dtype=torch.float64), y=4)
    assert torch.allclose(g.eps(x, 0.4), (1 + w) * f.eps(x, 0.4) - w * uncond, rtol=1e-12, atol=1e-13)
    assert g.nfe == 2
    r = sample(g, x, "heun", steps=3)
    assert r.nfe == 2 * get_method("heun").nfe_of_steps(3)
    for bad in (-1.5, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="guidance weight"):
            check_guidance_weight(bad)
    with pytest.raises(ValueError, match="not class-conditional"):
        classifier_free_guidance(T.learned_field(_tiny_mlp(), sch, "eps"), 1.0, 0)


# -------------------------------------------------------------------------------------------- the loop
def _digits_trainer(seed=0):
    """A conditional DiT-micro on a slice of digits: label dropout uses the global torch RNG, so the checkpoint's RNG
    state matters."""
    from diffusion_lab.targets import digits

    x, y = digits(return_labels=True)
    x, y = x[:200], y[:200]
    torch.manual_seed(seed)
    net = get_model("DiT-micro/2", num_classes=10)
    obj = T.Objective(S.VPLinear(), "eps", time_sampler="lognormal", sigma_data=0.75)
    return T.Trainer(net, obj, T.TensorLoader(x, y, 48, seed=seed), lr=2e-3, warmup=2, ema_decay=0.9,
                     grad_clip=1.0, seed=seed, meta={"test": True})


def test_resume_is_bitwise_identical(tmp_path):
    n = 10  # 200 rows in batches of 48: the interruption at 5 is mid-epoch, and an epoch boundary is crossed after
    straight = _digits_trainer()
    straight.run(n, log_every=2)
    first = _digits_trainer()
    first.run(n // 2, log_every=2)
    path = os.path.join(tmp_path, "ckpt.pt")
    T.save_checkpoint(path, first.state_dict())
    del first
    torch.manual_seed(12345)  # scramble every global RNG the restore must put back
    import random

    import numpy as np

    random.seed(7)
    np.random.seed(7)
    state = torch.load(path, weights_only=True)
    resumed = _digits_trainer(seed=0)
    resumed.load_state_dict(state)
    assert resumed.step == n // 2 and resumed.loader.state_dict()["pos"] == (n // 2) * 48 % 192
    resumed.run(n, log_every=2)
    for (k, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), k
    for a, b in zip(straight.ema.module.parameters(), resumed.ema.module.parameters()):
        assert torch.equal(a, b)
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert torch.equal(straight.generator.get_state(), resumed.generator.get_state())


def test_checkpoint_format_errors(tmp_path):
    tr = _digits_trainer()
    path = os.path.join(tmp_path, "bad.pt")
    torch.save({"format": "other"}, path)
    with pytest.raises(ValueError, match="not a diffusion_lab training checkpoint"):
        T.load_checkpoint(path)
    with pytest.raises(ValueError, match="format 'other'"):
        tr.load_state_dict({"format": "other"})


def test_loader_shards_cover_the_global_batch():
    data = torch.arange(40, dtype=torch.float32)[:, None]
    full = T.TensorLoader(data, batch_size=8, seed=3)
    shards = [T.TensorLoader(data, batch_size=8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # crosses an epoch boundary (5 batches per epoch)
        xb, _ = full.next()
        parts = torch.cat([s.next()[0] for s in shards])
        assert torch.equal(xb, parts)
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        T.TensorLoader(data, batch_size=8, world_size=3, rank=0)


# -------------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_batch():
    g = torch.Generator().manual_seed(11)
    x0 = ring8().sample(16, g)
    t = T.sample_t(16, S.VPLinear(), generator=g, dtype=torch.float64)
    eps = torch.randn(16, 2, dtype=torch.float64, generator=g)
    return x0, t, eps


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        net = _tiny_mlp(dtype=torch.float64, seed=rank)  # different inits: DDP must broadcast rank 0's
        with torch.no_grad():
            net.out.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(5 + rank))
        model = T.wrap_ddp(net)
        obj = T.Objective(S.VPLinear(), "eps", sigma_data=1.4)
        x0, t, eps = _ddp_batch()
        b = x0.shape[0] // world
        sl = slice(rank * b, (rank + 1) * b)
        obj(model, x0[sl], t=t[sl], eps=eps[sl]).backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        init = {k: v.clone() for k, v in net.state_dict().items()}
        data = ring8().sample(256, torch.Generator().manual_seed(1)).to(torch.float64)
        tr = T.Trainer(net, obj, T.TensorLoader(data, batch_size=32, rank=rank, world_size=world), lr=1e-2, seed=0)
        tr.run(4, log_every=2)
        torch.save({"grads": grads, "init": init, "params": net.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(tmp_path, f"rank{r}.pt"), weights_only=True) for r in range(2))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    # single process, full batch, from the broadcast (rank 0) initial weights
    net = _tiny_mlp(dtype=torch.float64)
    net.load_state_dict(r0["init"])
    x0, t, eps = _ddp_batch()
    T.Objective(S.VPLinear(), "eps", sigma_data=1.4)(net, x0, t=t, eps=eps).backward()
    for k, p in net.named_parameters():
        assert torch.equal(r0["grads"][k], r1["grads"][k]), k
        assert torch.allclose(r0["grads"][k], p.grad, rtol=1e-12, atol=1e-15), k
    assert any(p.grad.abs().max() > 0 for p in net.parameters())


# -------------------------------------------------------------------------------------------- CLI
def test_cli_train_resume_sample(tmp_path, capsys):
    from diffusion_lab.cli import main

    out = str(tmp_path / "run")
    common = ["train", "--data", "ring8", "--n-train", "512", "--batch", "64", "--hidden", "16", "--depth", "1",
              "--log-every", "5", "--out"]
    assert main([*common, out + "_straight", "--steps", "20", "--no-plot"]) == 0
    assert main([*common, out, "--steps", "10", "--no-plot"]) == 0
    assert main([*common, out, "--steps", "20", "--resume"]) == 0
    a = torch.load(out + "_straight/checkpoint.pt", weights_only=True)
    b = torch.load(out + "/checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for f in ("checkpoint.pt", "train_log.csv", "settings.json", "loss.png", "samples.png"):
        assert os.path.exists(os.path.join(out, f)), f
    assert main(["sample", out + "/checkpoint.pt", "--method", "ddim", "--steps", "5", "--n", "50",
                 "--out", str(tmp_path / "s"), "--no-plot"]) == 0
    s = torch.load(tmp_path / "s" / "samples.pt", weights_only=True)
    assert s["x"].shape == (50, 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["sample", out + "/checkpoint.pt", "--cfg", "1.0", "--out", str(tmp_path / "s")])
    assert e.value.code == 2 and "unconditional" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, out, "--steps", "5", "--resume"])
    assert "beyond --steps 5" in capsys.readouterr().err


def test_cli_conditional_digits_cfg(tmp_path, capsys):
    from diffusion_lab.cli import main

    out = str(tmp_path / "d")
    assert main(["train", "--data", "digits", "--model", "DiT-micro/2", "--steps", "4", "--batch", "32",
                 "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "samples.png"))
    assert main(["sample", out + "/checkpoint.pt", "--cfg", "2", "--class", "3", "--n", "6", "--steps", "3",
                 "--method", "heun", "--out", out + "/s"]) == 0
    assert "CFG w=2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["sample", out + "/checkpoint.pt", "--cfg", "-3", "--out", out + "/s"])
    assert "guidance weight w=-3.0 is below -1" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_short_training_learns_ring8():
    from diffusion_lab.metrics import sliced_w2

    torch.manual_seed(0)
    sch = S.VPLinear()
    g = torch.Generator().manual_seed(0)
    data = ring8().sample(20000, g, dtype=torch.float32)
    net = get_model("mlp", data_shape=2, hidden=64, depth=2)
    obj = T.Objective(sch, "edm", sigma_data=float(data.std()))
    tr = T.Trainer(net, obj, T.TensorLoader(data, batch_size=512), lr=3e-3, ema_decay=0.99)
    tr.run(600)
    f = T.learned_field(tr.ema.module, sch, "edm", sigma_data=obj.sigma_data)
    x = torch.randn(2000, 2, dtype=torch.float64, generator=g)
    out = sample(f, x, "dpmpp_2m", steps=25, final="denoise").x
    ref = ring8().sample(2000, g)
    assert sliced_w2(out, ref, generator=g) < 0.25


@pytest.mark.slow
def test_digits_experiment_quick(tmp_path):
    from experiments import digits_dit

    digits_dit.main(["--quick", "--out", str(tmp_path)])
    assert os.path.exists(tmp_path / "digits_dit.json")
