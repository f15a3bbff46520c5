"""benchmarks/dit_speed.py: the GPU command fails in one line on a machine without CUDA, and a tiny CPU run reports
figures that follow from its own timings (images/s, TFLOP/s from the MAC count, MFU, exact NFE)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("dit_speed_bench", ROOT / "benchmarks" / "dit_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda", "--dtype", "bf16", "--compile", "--peak-tflops", "989"], "CUDA is not available"),
    (["--device", "cpu", "--config", "DiT-Q/2"], "--config DiT-Q/2: unknown"),
    (["--device", "cpu", "--peak-tflops", "0"], "--peak-tflops must be > 0"),
    (["--device", "cpu", "--sample-steps", "-1"], "--sample-steps must be >= 1"),
])
def test_bad_settings_are_one_line_errors(bench, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    assert bench.main(argv) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and message in cap.err


def test_tiny_cpu_run_reports_consistent_figures(bench, tmp_path, capsys):
    path = tmp_path / "speed.json"
    assert bench.main(["--device", "cpu", "--config", "DiT-micro/2", "--no-diffusers", "--batch", "2",
                       "--repeats", "1", "--steps", "1", "--sample-batch", "2", "--sample-steps", "2",
                       "--peak-tflops", "2.0", "--threads", "1", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "train step ours (batch 2)" in text and "sample ddim" in text
    r = json.loads(path.read_text())
    macs = r["settings"]["gmacs_forward_per_sample"] * 1e9
    train, smp = r["results"]["ours"], r["sampling"]
    # the figures are the formulas of the docstring applied to the measured median (exact up to float rounding)
    assert train["images_per_s"] == pytest.approx(2 / train["median_s"], rel=1e-12)
    assert train["achieved_tflops"] == pytest.approx(6 * macs * 2 / train["median_s"] / 1e12, rel=1e-12)
    assert train["mfu"] == pytest.approx(train["achieved_tflops"] / 2.0, rel=1e-12)
    assert smp["nfe"] == 3  # DDIM: 2 steps plus the final denoiser evaluation
    assert smp["achieved_tflops"] == pytest.approx(2 * macs * 2 * 3 / smp["median_s"] / 1e12, rel=1e-12)
    assert smp["s_per_nfe"] == pytest.approx(smp["median_s"] / 3, rel=1e-12)
