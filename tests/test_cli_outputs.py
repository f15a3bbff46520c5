"""Outputs that never mislead: a command writes into a new or empty folder (or replaces its own files there with
--overwrite), never leaves a stale artefact beside new ones, writes atomically and says where it wrote."""
import csv
import json
import math
import os

import pytest
import torch

from diffusion_lab.cli import _common as C
from diffusion_lab.cli import main

COMPARE = ["compare", "--methods", "euler", "--nfe", "4", "--n", "64"]
TRAIN = ["train", "--steps", "20", "--log-every", "10", "--n-train", "1000", "--batch", "64", "--hidden", "16",
         "--depth", "1", "--device", "cpu", "--eval-n", "200"]


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def test_compare_refuses_a_non_empty_folder_without_overwrite_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.csv").write_text("old numbers\n")
    with pytest.raises(SystemExit) as exc:
        main([*COMPARE, "--out", str(out)])
    assert exc.value.code == 2
    _one_line_error(capsys, str(out), "not empty", "results.csv", "--overwrite")
    assert (out / "results.csv").read_text() == "old numbers\n"
    assert sorted(os.listdir(out)) == ["results.csv"]


def test_compare_no_plot_with_overwrite_removes_the_old_figure_and_keeps_foreign_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*COMPARE, "--out", str(out)]) == 0
    assert (out / "error_vs_nfe.png").exists()
    (out / "notes.txt").write_text("mine")
    assert main([*COMPARE, "--methods", "heun", "--out", str(out), "--overwrite", "--no-plot"]) == 0
    assert sorted(os.listdir(out)) == ["notes.txt", "results.csv", "settings.json"]  # no figure of the older run
    with open(out / "results.csv") as fh:
        assert [r["sampler"] for r in csv.DictReader(fh)] == ["heun"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"wrote results.csv, settings.json to {out}")


def test_compare_format_replaces_the_png_of_an_earlier_run(tmp_path):
    out = tmp_path / "run"
    assert main([*COMPARE, "--out", str(out)]) == 0
    assert main([*COMPARE, "--out", str(out), "--overwrite", "--format", "svg"]) == 0
    assert sorted(os.listdir(out)) == ["error_vs_nfe.svg", "results.csv", "settings.json"]
    assert (out / "error_vs_nfe.svg").read_text()[:100].lstrip().startswith("<?xml")


def test_train_overwrite_no_plot_and_resume_leave_no_stale_figure(tmp_path, capsys):
    out = tmp_path / "train"
    assert main([*TRAIN, "--out", str(out)]) == 0
    assert {"samples.png", "loss.png", "checkpoint.pt"} <= set(os.listdir(out))
    # a fresh run into the same folder: refused, then allowed with --overwrite; --no-plot leaves no old figure
    with pytest.raises(SystemExit):
        main([*TRAIN, "--out", str(out), "--steps", "10", "--no-plot"])
    capsys.readouterr()
    assert main([*TRAIN, "--out", str(out), "--steps", "10", "--no-plot", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "settings.json", "train_log.csv"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 10
    # --resume continues from the checkpoint (kept) and rewrites the rest
    assert main([*TRAIN, "--out", str(out), "--steps", "20", "--resume"]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    assert {"samples.png", "loss.png"} <= set(os.listdir(out))
    assert not [f for f in os.listdir(out) if f.startswith(".") or f.endswith(".tmp")]  # no temporaries left
    assert f"to {out}" in capsys.readouterr().out.strip().splitlines()[-1]


def test_likelihood_out_writes_per_sample_rows_that_match_the_closed_form(tmp_path, capsys):
    out = tmp_path / "lik"
    assert main(["likelihood", "--n", "8", "--target", "gaussian_2d", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote results.csv, settings.json to {out}"
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8
    # rtol 1e-8 on the ODE: the log-density error per sample is ~1e-8, far below 1e-5
    assert max(abs(float(r["log_prob"]) - float(r["log_prob_exact"])) for r in rows) < 1e-5
    s = json.loads((out / "settings.json").read_text())
    nll = -sum(float(r["log_prob"]) for r in rows) / 8
    assert math.isclose(s["summary"]["nll_nats"], nll, rel_tol=1e-12)
    with pytest.raises(SystemExit):
        main(["likelihood", "--n", "8", "--out", str(out)])
    _one_line_error(capsys, "not empty")


def test_likelihood_without_out_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["likelihood", "--n", "4"]) == 0
    assert os.listdir(tmp_path) == []
    assert "wrote" not in capsys.readouterr().out


def test_check_json_refuses_an_existing_file_without_overwrite(tmp_path, capsys):
    path = tmp_path / "checks.json"
    path.write_text("{}")
    with pytest.raises(SystemExit):
        main(["check", "-k", "solvers.order[euler]", "--json", str(path)])
    _one_line_error(capsys, str(path), "--overwrite")
    assert path.read_text() == "{}"
    assert main(["check", "-k", "solvers.order[euler]", "--json", str(path), "--overwrite"]) == 0
    doc = json.loads(path.read_text())
    assert [c["name"] for c in doc["checks"]] == ["solvers.order[euler]"]
    row = doc["checks"][0]
    assert row["theory_order"] == 1 and abs(row["measured_order"] - 1) == pytest.approx(row["residual"], abs=1e-3)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote {path}"


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary_on_failure(tmp_path):
    path = tmp_path / "a.json"
    C.write_json(str(path), {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}

    def fail(tmp):
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        C.atomic_write(str(path), fail)
    assert json.loads(path.read_text()) == {"x": 1}  # the old file, whole
    assert os.listdir(tmp_path) == ["a.json"]


def test_write_csv_takes_the_union_of_keys(tmp_path):
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4, "mmd2": 0.1}]
    C.write_csv(str(tmp_path / "log.csv"), rows)
    with open(tmp_path / "log.csv") as fh:
        assert list(csv.DictReader(fh)) == [{"step": "1", "loss": "0.5", "mmd2": ""},
                                            {"step": "2", "loss": "0.4", "mmd2": "0.1"}]


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        main([*COMPARE, "--out", str(f)])
    _one_line_error(capsys, "is a file")


def test_fokker_planck_no_plot_overwrite_leaves_no_old_figure_and_says_where(tmp_path, capsys):
    out = tmp_path / "fp"
    args = ["fokker-planck", "--n", "24", "--steps", "8", "--times", "0.5", "1.0", "--out", str(out)]
    assert main(args) == 0
    assert (out / "fokker_planck.png").exists()
    assert main([*args, "--overwrite", "--no-plot"]) == 0
    assert sorted(os.listdir(out)) == ["results.csv", "settings.json"]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"wrote results.csv, settings.json to {out}")
    assert main([*args, "--overwrite", "--format", "pdf", "--dpi", "80"]) == 0
    assert (out / "fokker_planck.pdf").read_bytes()[:5] == b"%PDF-"
