"""Bad input ends in one clear error, never a traceback, and leaves nothing behind.

CLI cases run ``diffusion_lab.cli.main`` in-process: the contract is exit status 2, one line on stderr naming the
option or file and the problem, and no output folder. Library cases: a ValueError / TypeError whose message names
the offending value. Size options are checked against a memory estimate before anything is allocated (the tests
fix the limit at 16 GiB so that they do not depend on the machine).
"""
import json
import math
import os
import pickle

import pytest
import torch

from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.cli import main
from diffusion_lab.likelihood import log_likelihood
from diffusion_lab.samplers import check_grid, sample, time_grid
from diffusion_lab.training import CHECKPOINT_FORMAT, load_checkpoint


def _cli_error(argv, capsys, out=None):
    """Run the CLI, expect exit status 2 (returned or raised by argparse) and one stderr line; return it."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    if out is not None:
        assert not os.path.exists(out), f"{out} was created"
    return err[0]


# ---------------------------------------------------------------------------------------------
# CLI

@pytest.fixture
def corrupted(tmp_path):
    """Checkpoint files that are not checkpoints: truncated, empty, random bytes, a foreign pickle, missing keys."""
    good = {"format": CHECKPOINT_FORMAT, "meta": {"model": "mlp"}, "model": {"w": torch.zeros(3)}, "ema": {"module": {}}}
    torch.save(good, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    files = {
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "random": bytes(range(256)) * 16,
        "pickle": pickle.dumps({"a": 1}),
    }
    for name, data in files.items():
        (tmp_path / f"{name}.pt").write_bytes(data)
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, tmp_path / "missing_keys.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign_format.pt")
    return tmp_path


@pytest.mark.parametrize("name, needles", [
    ("truncated", ("truncated.pt", "not a readable")),
    ("empty", ("empty.pt", "not a readable", "EOFError")),
    ("random", ("random.pt", "not a readable")),
    ("pickle", ("pickle.pt", "not a readable", "tensors")),
    ("missing_keys", ("missing_keys.pt", "missing meta", "ema")),
    ("foreign_format", ("foreign_format.pt", "not a diffusion_lab training checkpoint")),
])
def test_sample_refuses_a_corrupted_checkpoint(corrupted, capsys, name, needles):
    out = corrupted / f"out_{name}"
    err = _cli_error(["sample", str(corrupted / f"{name}.pt"), "--out", str(out)], capsys, out)
    for needle in needles:
        assert needle in err, (needle, err)


def test_load_checkpoint_errors_name_the_file(corrupted):
    for name in ("truncated", "empty", "random", "pickle", "missing_keys"):
        with pytest.raises(ValueError, match=name):
            load_checkpoint(str(corrupted / f"{name}.pt"))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(str(corrupted / "nope.pt"))


def test_sample_missing_checkpoint(tmp_path, capsys):
    err = _cli_error(["sample", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")], capsys, tmp_path / "o")
    assert "nope.pt" in err


def test_fokker_planck_refuses_a_grid_too_large_for_memory(tmp_path, capsys):
    err = _cli_error(["fokker-planck", "--n", "100000", "--out", str(tmp_path / "f")], capsys, tmp_path / "f")
    assert "100000" in err and "GiB" in err


@pytest.mark.parametrize("argv, needles", [
    (["compare", "--n", "-5"], ("--n", "-5")),
    (["compare", "--methods", "no_such_method"], ("no_such_method",)),
    (["likelihood", "--rtol", "-1"], ("rtol", "-1")),
])
def test_bad_options_are_refused_before_any_output(tmp_path, capsys, argv, needles):
    out = tmp_path / "o"
    err = _cli_error([*argv, "--out", str(out)], capsys, out)
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("cmd", ["sample", "train"])
@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cpu:0x", ""])
def test_an_unknown_device_is_refused_with_the_accepted_names(tmp_path, capsys, cmd, name):
    argv = [cmd, str(tmp_path / "x.pt")] if cmd == "sample" else [cmd]
    err = _cli_error([*argv, "--device", name, "--out", str(tmp_path / "o")], capsys, tmp_path / "o")
    assert repr(name) in err and "--device" in err and "cuda:N" in err


@pytest.mark.parametrize("box", ["1e-300", "1e-05"])
def test_fokker_planck_refuses_a_degenerate_box(tmp_path, capsys, box):
    # 1e-05 with 64 cells: dx = 3.1e-7 < 1e-6 (singular LU for VE/EDM, measured at dx = 1e-7)
    err = _cli_error(["fokker-planck", "--box", box, "--n", "64", "--out", str(tmp_path / "f")], capsys,
                     tmp_path / "f")
    assert "--box" in err and box in err and "1e-06" in err


def test_likelihood_refuses_one_probe(tmp_path, capsys):
    err = _cli_error(["likelihood", "--divergence", "hutchinson", "--probes", "1", "--n", "20", "--out",
                      str(tmp_path / "l")], capsys, tmp_path / "l")
    assert "--probes" in err and ">= 2" in err


def test_one_hutchinson_probe_has_no_standard_error():
    """se = std_k(q_k)/sqrt(K) needs K >= 2: one probe gives NaN, never a falsely exact 0; the exact divergence's
    se stays 0 and two probes give a finite positive one (Rademacher probes on a non-diagonal Jacobian)."""
    f = T.ring8().field(S.VPLinear())
    x = torch.tensor([[0.3, -0.2], [1.0, 0.5]], dtype=torch.float64)
    kw = dict(rtol=1e-5, atol=1e-7)
    one = log_likelihood(f, x, divergence="hutchinson", n_probes=1, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isnan(one.se).all() and torch.isfinite(one.log_prob).all()
    two = log_likelihood(f, x, divergence="hutchinson", n_probes=2, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(two.se).all() and (two.se > 0).all()
    assert (log_likelihood(f, x, **kw).se == 0).all()


@pytest.fixture
def small_memory(monkeypatch):
    """A fixed 16 GiB limit, so the refusals below do not depend on the test machine's memory."""
    from diffusion_lab.cli import _common

    monkeypatch.setattr(_common, "memory_limit", lambda: 16 << 30)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-D MLP checkpoint trained for one step (about a second)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--steps", "1", "--n-train", "64", "--batch", "32", "--hidden", "8", "--depth", "1",
                 "--eval-n", "0", "--no-plot", "--device", "cpu", "--out", str(out)]) == 0
    return out / "checkpoint.pt"


@pytest.mark.parametrize("argv, value, gib", [
    # ring8 (d = 2): 3e8 x 16 bytes x 16 copies = 71.5 GiB
    (["compare", "--n", "300000000"], "300000000", "71.5"),
    # 1e8 x (2 + 1) x 8 bytes x (16 + 8 probes) = 53.6 GiB
    (["likelihood", "--n", "100000000", "--divergence", "hutchinson"], "100000000", "53.6"),
    # 1e9 x (2 x 8 + 8) bytes x 4 copies = 89.4 GiB
    (["train", "--n-train", "1000000000"], "1000000000", "89.4"),
])
def test_huge_sizes_are_refused_before_allocating(tmp_path, capsys, small_memory, argv, value, gib):
    out = tmp_path / "o"
    err = _cli_error([*argv, "--out", str(out)], capsys, out)
    assert f"{argv[1]} {value}:" in err and f"about {gib} GiB" in err and "limit of 16.0 GiB" in err, err


def test_sample_refuses_a_huge_sample_size(tmp_path, capsys, small_memory, tiny_checkpoint):
    # 1e11 x (2 x 4 + 8) bytes x 2 copies = 2980.2 GiB
    out = tmp_path / "s"
    err = _cli_error(["sample", str(tiny_checkpoint), "--n", "100000000000", "--device", "cpu", "--out", str(out)],
                     capsys, out)
    assert "--n 100000000000:" in err and "about 2980.2 GiB" in err, err


def test_sizes_under_the_limit_pass_the_memory_check(tmp_path, capsys, small_memory, tiny_checkpoint):
    out = tmp_path / "s"
    assert main(["sample", str(tiny_checkpoint), "--n", "50", "--steps", "2", "--no-plot", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert (out / "samples.pt").exists()


def test_check_size_estimate_and_limit(small_memory):
    import argparse

    from diffusion_lab.cli import _common

    class P(argparse.ArgumentParser):
        def error(self, message):
            raise ValueError(message)

    assert _common.check_size(P(), "--n", 1000, 16, 4, "x") == 64000
    assert _common.check_size(P(), "--n", 1 << 30, 16, 1, "x") == 16 << 30  # exactly at the limit: accepted
    with pytest.raises(ValueError, match=r"--n 1073741825: x needs about 16.0 GiB"):
        _common.check_size(P(), "--n", (1 << 30) + 1, 16, 1, "x")


def test_check_json_is_strict_json_even_with_a_crashed_check(tmp_path):
    from theory_checks.catalogue import Catalogue, Check
    from theory_checks.report import to_json

    crash = Check("crash", "x", "exact", 1e-10, "", "", lambda: 1 / 0)
    inf = Check("inf", "x", "exact", 1e-10, "", "", lambda: math.inf)
    path = tmp_path / "c.json"
    to_json(Catalogue([crash, inf]).run(), str(path), 0.0)

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert [c["residual"] for c in doc["checks"]] == [None, None]
    assert [c["pass"] for c in doc["checks"]] == [False, False]
    assert not (tmp_path / "c.json.tmp").exists()


# ---------------------------------------------------------------------------------------------
# library

@pytest.mark.parametrize("make, needles", [
    (lambda: S.VE(sigma_max=math.inf), ("sigma_max", "inf")),
    (lambda: S.EDM(t_max=math.inf), ("t_max", "inf")),
    (lambda: S.VPLinear(beta_max=math.nan), ("beta_max", "nan")),
    (lambda: T.GaussianMixture([1.0], [[math.nan, 0.0]], torch.eye(2)[None]), ("means", "nan")),
    (lambda: T.GaussianMixture([0.5, 0.5], [[0.0], [1.0]], [[[1.0]], [[math.inf]]]), ("covs", "inf", "component 1")),
    (lambda: T.Gaussian([0.0], [[math.nan]]), ("covs", "nan")),
])
def test_non_finite_parameters_are_refused(make, needles):
    with pytest.raises(ValueError) as exc:
        make()
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


def _field():
    return T.ring8().field(S.VPLinear())


@pytest.mark.parametrize("call, exc_type, needles", [
    (lambda f: sample(f, [[0.0, 1.0]], "heun", steps=4), TypeError, ("x_init", "list")),
    (lambda f: sample(f, torch.zeros(3, 2, dtype=torch.int64), "heun", steps=4), TypeError, ("x_init", "int64")),
    (lambda f: sample(f, torch.zeros(3, 5, dtype=torch.float64), "heun", steps=4), ValueError, ("(5,)", "(2,)")),
    (lambda f: sample(f, torch.zeros(0, 2, dtype=torch.float64), "heun", steps=4), ValueError, ("empty",)),
    (lambda f: sample(f, torch.zeros(3, 2, dtype=torch.float64), "heun", grid=[1.0, math.nan, 0.001]), ValueError,
     ("finite", "nan")),
    (lambda f: sample(f, torch.zeros(3, 2, dtype=torch.float64), "heun", steps=0), ValueError, ("steps", "0")),
    (lambda f: sample(f, torch.zeros(3, 2, dtype=torch.float64), "no_such_method", steps=4), ValueError,
     ("no_such_method",)),
    (lambda f: time_grid(f.schedule, 10**12, "logsnr"), ValueError, ("1000000000000",)),
    (lambda f: check_grid(f.schedule, [0.5, 0.7]), ValueError, ("decreasing",)),
    (lambda f: log_likelihood(f, [[0.0, 0.0]]), TypeError, ("x", "list")),
    (lambda f: log_likelihood(f, torch.full((2, 2), math.nan, dtype=torch.float64)), ValueError, ("non-finite",)),
    (lambda f: log_likelihood(f, torch.zeros(2, 2, dtype=torch.float64), rtol=-1.0), ValueError, ("rtol", "-1")),
])
def test_bad_arguments_raise_a_clear_error(call, exc_type, needles):
    with pytest.raises(exc_type) as exc:
        call(_field())
    for needle in needles:
        assert needle in str(exc.value), (needle, str(exc.value))


@pytest.mark.parametrize("n, needle", [(2.5, "2.5"), (float("nan"), "nan"), (True, "True")])
def test_grid_refuses_a_non_integer_number_of_cells(n, needle):
    from diffusion_lab import fokker_planck as FP

    with pytest.raises(ValueError, match="integer") as exc:
        FP.Grid.box(-1.0, 1.0, n)
    assert needle in str(exc.value)
    assert FP.Grid.box(-1.0, 1.0, 4.0).n == (4,)  # integer-valued floats are accepted


def test_grid_smallest_cell_width_still_solves():
    """At dx = MIN_CELL_WIDTH the one-step implicit solve of the stiffest schedule (EDM, t up to 80) is finite."""
    import warnings

    import numpy as np

    from diffusion_lab import fokker_planck as FP

    sch = S.EDM()
    grid = FP.Grid.box(-4 * FP.grid.MIN_CELL_WIDTH, 4 * FP.grid.MIN_CELL_WIDTH, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = FP.solve_forward(sch, T.bimodal_1d(), grid, [sch.t_min, sch.t_max], steps=1)
    assert np.isfinite(np.asarray(sol.densities if hasattr(sol, "densities") else sol.p)).all()


def test_fokker_planck_refuses_a_degenerate_box_in_the_api():
    import warnings

    from diffusion_lab import fokker_planck as FP

    sch = S.VPLinear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(ValueError, match="1.05e-45|box|dx"):
            FP.solve_forward(sch, T.bimodal_1d(), FP.Grid.box(-1.0507438307367324e-45, 1.0507438307367324e-45, 2),
                             [sch.t_min, 0.5], steps=1)


@pytest.mark.parametrize("conditioning", ["adaLN-Zero", "in-context"])
def test_dit_refuses_non_integer_labels(conditioning):
    """Float labels 2.7 would be truncated to class 2 by long(); they are refused with the value and its index.
    Integer-valued floats (2.0) are accepted and give exactly the output of the int64 labels."""
    from diffusion_lab.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, out_channels=1, hidden_size=32, depth=1,
                        num_heads=4, num_classes=3, conditioning=conditioning)).eval()
    x, c = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"2\.7 at index 1"):
        net(x, c, torch.tensor([0.0, 2.7, 1.0]))
    with pytest.raises(ValueError, match="nan at index 0"):
        net(x, c, torch.tensor([math.nan, 1.0, 1.0]))
    with pytest.raises(TypeError, match="bool"):
        net(x, c, torch.tensor([True, False, True]))
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)),
                                   net(x, c, torch.tensor([0, 2, 1])), rtol=0, atol=0)


def test_save_checkpoint_leaves_no_partial_tmp(tmp_path):
    """A failing save removes its partial checkpoint.pt.tmp and keeps the previous checkpoint; a stale .tmp of an
    interrupted save is replaced and renamed away by the next save."""
    from diffusion_lab.training import save_checkpoint

    path = tmp_path / "checkpoint.pt"
    good = {"format": CHECKPOINT_FORMAT, "meta": {"model": "mlp"}, "model": {"w": torch.ones(3)}, "ema": {"module": {}}}
    save_checkpoint(str(path), good)
    with pytest.raises(Exception):
        save_checkpoint(str(path), {"w": torch.zeros(3), "bad": lambda: 0})  # lambdas do not pickle
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(str(path), good)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True)["meta"] == {"model": "mlp"}


def test_train_resume_removes_a_stale_tmp(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--steps", "2", "--n-train", "64", "--batch", "32", "--hidden", "8", "--depth", "1", "--eval-n",
            "0", "--no-plot", "--device", "cpu", "--ckpt-every", "1", "--out", str(out)]
    assert main(argv) == 0
    (out / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    assert main([*argv[:2], "3", *argv[3:], "--resume"]) == 0
    assert not (out / "checkpoint.pt.tmp").exists()
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 3
