"""Time grids, the sample() entry point, NFE accounting, references and metrics, and the compare command."""
import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.metrics import affine_pushforward, gaussian_w2, sliced_w2
from diffusion_lab.reference import flow_map, quantile_flow_map
from diffusion_lab.samplers import check_grid, get_method, sample, steps_for_nfe, time_grid


@pytest.mark.parametrize("kind", ["uniform", "logsnr", "karras", "quadratic"])
@pytest.mark.parametrize("name", ["vp", "cosine", "ve", "edm", "rf", "ddpm", "subvp"])
def test_grids_are_decreasing_with_exact_ends(kind, name):
    s = S.SCHEDULES[name]()
    g = time_grid(s, 12, kind)
    assert g.dtype == torch.float64 and len(g) == 13
    assert g[0] == s.t_max and g[-1] == s.t_min and (torch.diff(g) < 0).all()


def test_grid_formulas():
    vp = S.VPLinear()
    lam = vp.lam(time_grid(vp, 10, "logsnr"))
    assert torch.allclose(torch.diff(lam), torch.full((10,), float(lam[1] - lam[0]), dtype=torch.float64), rtol=1e-9)
    edm = S.EDM()
    i = torch.arange(11, dtype=torch.float64) / 10
    karras = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # Karras et al. 2022 eq. 5
    assert torch.allclose(time_grid(edm, 10, "karras"), karras, rtol=1e-12)
    q = time_grid(vp, 4, "quadratic")
    u = torch.arange(5, dtype=torch.float64) / 4  # DPM-Solver's time_quadratic: uniform in sqrt(t)
    assert torch.allclose(q, (1.0 + u * (math.sqrt(1e-3) - 1.0)) ** 2, rtol=1e-14)


def test_grid_validation_names_values():
    vp = S.VPLinear()
    with pytest.raises(ValueError, match=r"strictly decreasing.*t\[1\]=0\.5 <= t\[2\]=0\.7"):
        time_grid(vp, kind=[0.9, 0.5, 0.7])
    with pytest.raises(ValueError, match=r"grid time=1\.5 is outside"):
        check_grid(vp, [1.5, 0.1])
    with pytest.raises(ValueError, match="unknown grid kind 'log'"):
        time_grid(vp, 10, "log")
    with pytest.raises(ValueError, match="integer >= 1, got 0"):
        time_grid(vp, 0)


@pytest.fixture(scope="module")
def ring():
    tg, s = T.ring8(), S.VPLinear()
    x = tg.marginal(s, s.t_max).sample(64, torch.Generator().manual_seed(0))
    return tg, s, tg.field(s), x


@pytest.mark.parametrize("method", ["euler", "heun", "midpoint", "rk4"])
def test_nfe_is_exact(ring, method):
    _, _, f, x = ring
    for n in (1, 3, 7):
        res = sample(f, x, method, steps=n)
        assert res.nfe == get_method(method).nfe_of_steps(n)
        res = sample(f, x, method, steps=n, final="denoise")
        assert res.nfe == get_method(method).nfe_of_steps(n) + 1


def test_steps_for_nfe():
    assert steps_for_nfe("heun", 10) == 5  # 2*5 - 1 = 9 <= 10 < 11
    assert steps_for_nfe("rk4", 10) == 2
    assert steps_for_nfe("euler", 10, final="denoise") == 9
    with pytest.raises(ValueError, match="NFE 0 is below the minimum 1"):
        steps_for_nfe("euler", 0)


def test_trajectory_and_final_denoise(ring):
    _, s, f, x = ring
    res = sample(f, x, "heun", steps=5, return_trajectory=True)
    assert res.trajectory.shape == (6, *x.shape)
    assert torch.equal(res.trajectory[0], x) and torch.equal(res.trajectory[-1], res.x)
    den = sample(f, x, "heun", steps=5, final="denoise")
    assert torch.allclose(den.x, f.denoiser(res.x, s.t_min), rtol=1e-13)
    assert res.settings["method"] == "heun" and res.settings["steps"] == 5


def test_sample_argument_errors(ring):
    _, _, f, x = ring
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of"):
        sample(f, x, "nope", steps=3)
    with pytest.raises(ValueError, match="give one of steps="):
        sample(f, x, "euler", steps=3, grid=[1.0, 0.5])
    with pytest.raises(ValueError, match="needs steps= or grid="):
        sample(f, x, "euler")
    with pytest.raises(ValueError, match="final must be"):
        sample(f, x, "euler", steps=3, final="zero")


def test_adaptive_tolerance_and_nfe(ring):
    tg, s, f, x = ring
    ref, _ = flow_map(f, x, s.t_max, s.t_min)
    errs = []
    for rtol in (1e-4, 1e-6, 1e-8):
        res = sample(f, x, "adaptive", rtol=rtol, atol=rtol)
        a, r = res.info["accepted"], res.info["rejected"]
        assert res.nfe == 1 + 6 * (a + r)  # FSAL Dormand-Prince
        errs.append(float((res.x - ref).norm(dim=1).max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_references_agree_1d():
    tg, s = T.bimodal_1d(), S.VPCosine()
    x = tg.marginal(s, s.t_max).sample(200, torch.Generator().manual_seed(1))
    q = quantile_flow_map(tg, s, x, s.t_max, s.t_min)
    o, nfe = flow_map(tg.field(s), x, s.t_max, s.t_min)
    assert float((q - o).abs().max()) < 1e-8 and nfe > 50
    assert (torch.diff(q[torch.argsort(x[:, 0]), 0]) > 0).all()  # the 1-D flow map is monotone


def test_gaussian_w2_and_pushforward():
    m1, m2 = torch.tensor([0.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    c1, c2 = torch.tensor([[4.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)
    assert math.isclose(gaussian_w2(m1, c1, m2, c2), math.sqrt(1 + 1), rel_tol=1e-14)
    A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -1.0], dtype=torch.float64)
    m = torch.tensor([0.5, 0.2], dtype=torch.float64)
    C = torch.tensor([[1.0, 0.3], [0.3, 2.0]], dtype=torch.float64)
    mo, co = affine_pushforward(lambda p: p @ A.T + b, m, C)
    assert torch.allclose(mo, A @ m + b) and torch.allclose(co, A @ C @ A.T)


def test_pushforward_of_sampler_matches_monte_carlo():
    tg, s = T.gaussian_2d(), S.VPLinear()
    pT = tg.marginal(s, s.t_max)
    run = lambda p: sample(tg.field(s), p, "euler", steps=6).x  # noqa: E731
    m, c = affine_pushforward(run, pT.mu, pT.cov)
    x = run(pT.sample(100_000, torch.Generator().manual_seed(2)))
    se = torch.sqrt(torch.diagonal(c) / 1e5)
    assert ((x.mean(0) - m).abs() < 5 * se).all()
    assert torch.allclose(torch.cov(x.T), c, rtol=0.03)


def test_sliced_w2_1d_is_sorted_matching():
    x = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64)
    y = torch.tensor([[4.0], [0.5], [2.0]], dtype=torch.float64)
    assert math.isclose(sliced_w2(x, y), math.sqrt((0.25 + 1 + 1) / 3), rel_tol=1e-14)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "diffusion_lab.cli", *args], capture_output=True, text=True)


def test_compare_command(tmp_path):
    p = _cli("compare", "--n", "300", "--nfe", "5", "20", "--methods", "euler", "heun", "--out", str(tmp_path),
             "--target", "gaussian_2d")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["sampler"] for r in rows] == ["euler", "euler", "heun", "heun"]
    assert all(int(r["nfe"]) <= int(r["nfe_budget"]) for r in rows)
    err = {(r["sampler"], r["nfe_budget"]): float(r["flow_error"]) for r in rows}
    assert err[("heun", "20")] < err[("heun", "5")] / 10  # second order: 4x the steps, > 10x smaller error
    w2 = {(r["sampler"], r["nfe_budget"]): float(r["w2_exact"]) for r in rows}
    assert w2[("euler", "20")] < w2[("euler", "5")]
    settings = json.load(open(tmp_path / "settings.json"))
    assert settings["target"]["name"] == "gaussian_2d" and settings["n_samples"] == 300
    assert (tmp_path / "error_vs_nfe.png").stat().st_size > 10_000


@pytest.mark.parametrize("args,needle", [
    (["--methods", "nope"], "unknown method 'nope'; choose one of"),
    (["--target", "nope"], "invalid choice: 'nope'"),
    (["--methods", "rk4", "--nfe", "3"], "NFE 3 is below the minimum 4"),
    (["--methods", "adaptive"], "adaptive methods"),
])
def test_compare_bad_options_one_line(tmp_path, args, needle):
    p = _cli("compare", "--out", str(tmp_path), *args)
    assert p.returncode == 2 and needle in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


@pytest.mark.parametrize("schedule", ["vp", "cosine", "subvp", "ve", "edm", "rf", "ddpm"])
def test_every_method_runs_on_every_schedule(schedule):
    """Every registered method accepts every schedule's field; deterministic ones get closer to the exact flow
    map with 4x the steps, stochastic ones stay finite with the law's scale."""
    from diffusion_lab.samplers import available

    s = S.SCHEDULES[schedule]()
    tg = T.bimodal_1d()
    f = tg.field(s)
    x = tg.marginal(s, s.t_max).sample(32, torch.Generator().manual_seed(0))
    ref, _ = flow_map(f, x, s.t_max, s.t_min)
    for m in available():
        if m.name in ("adaptive", "torchsde", "annealed_langevin"):
            continue  # adaptive: tested above; torchsde: tests/test_samplers_sde.py; annealed: tests/test_langevin.py
        opts = {"predictor": "ddpm_ancestral"} if m.name == "pc" else {}
        size = "nfe" if m.family == "auto" else "steps"  # the declared defaults take a budget only
        r = [sample(f, x, m.name, generator=torch.Generator().manual_seed(1), **{size: n}, **opts) for n in (8, 32)]
        assert all(torch.isfinite(ri.x).all() for ri in r), m.name
        if not m.stochastic:
            e = [float((ri.x - ref).abs().mean()) for ri in r]
            assert e[1] < e[0], (m.name, e)
        else:
            assert float(r[1].x.std()) < 3 * float(tg.covariance().sqrt()), m.name
