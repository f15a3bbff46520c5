"""The diffusion-lab command as a package: its help texts, and compare --dim (targets built in any dimension)."""
import csv
import json
import math

import pytest

from diffusion_lab.cli import build_parser, main
from diffusion_lab.compare import run_comparison
from diffusion_lab.schedules import get_schedule
from diffusion_lab.targets import get_target

SUBCOMMANDS = ("check", "compare", "likelihood", "fokker-planck", "train", "distill", "sample", "diagnose")


def _subparsers(parser):
    return parser._subparsers._group_actions[0].choices


def test_every_subcommand_is_registered_and_its_help_is_self_contained():
    subs = _subparsers(build_parser())
    assert tuple(subs) == SUBCOMMANDS
    for name, p in subs.items():
        text = p.format_help()
        assert p.prog == f"diffusion-lab {name}"
        for word in ("THEORY", "seed notes", "shared/"):
            assert word not in text, (name, word)
    assert "a published claim" in subs["check"].format_help()


def _compare(tmp_path, *extra):
    return main(["compare", "--methods", "euler", "--nfe", "4", "--n", "64", "--no-plot", "--out", str(tmp_path),
                 *extra])


@pytest.mark.parametrize("name, key", [("aniso_gaussian", "d"), ("aniso", "dim")])
def test_compare_dim_builds_the_target_in_that_dimension(tmp_path, capsys, name, key):
    assert _compare(tmp_path, "--target", name, "--dim", "3") == 0
    assert f"target {name} (d=3)" in capsys.readouterr().out
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["dim"] == 3 and settings["target"]["d"] == 3
    with open(tmp_path / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    # the same numbers as the library on get_target(name, <its dimension keyword>=3): same target, same run
    ref = run_comparison(get_target(name, **{key: 3}), get_schedule("vp"), ["euler"], [4], n_samples=64, seed=0)
    assert len(rows) == 1 == len(ref["rows"])
    for col in ("flow_error", "sw2", "w2_exact"):
        assert math.isclose(float(rows[0][col]), ref["rows"][0][col], rel_tol=1e-12), col
    assert float(rows[0]["flow_error"]) > 0


def test_compare_without_dim_records_null(tmp_path):
    assert _compare(tmp_path, "--target", "gaussian_2d") == 0
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["dim"] is None and settings["target"]["d"] == 2


@pytest.mark.parametrize("target, dim, needles", [
    ("ring8", "3", ("'ring8'", "--dim", "fixed dimension")),
    ("gaussian_2d", "2", ("'gaussian_2d'", "--dim")),
    ("aniso", "0", ("--dim", ">= 1")),
])
def test_compare_dim_errors_are_one_line_and_write_nothing(tmp_path, capsys, target, dim, needles):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        _compare(out, "--target", target, "--dim", dim)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("diffusion-lab compare: error: "), captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert captured.out == "" and not out.exists()
