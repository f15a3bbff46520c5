"""CLI rough edges: method options checked before any work, --list-methods with options, check streaming with
measured orders, a quiet exit on a closed pipe, help on every option, train's distance to the exact law."""
import argparse
import csv
import io
import subprocess
import sys

import pytest
import torch

from diffusion_lab.cli import build_parser, main
from diffusion_lab.cli import check as check_cmd

TRAIN = ["train", "--steps", "20", "--log-every", "10", "--n-train", "1000", "--batch", "64", "--hidden", "16",
         "--depth", "1", "--device", "cpu", "--eval-n", "300"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One small ring8 checkpoint shared by the tests that sample or compare on a network."""
    out = tmp_path_factory.mktemp("train")
    assert main([*TRAIN, "--out", str(out), "--no-plot", "--eval-n", "0"]) == 0
    return out / "checkpoint.pt"


def _subparsers(parser):
    return parser._subparsers._group_actions[0].choices


def test_every_option_of_every_command_has_help_text():
    parser = build_parser()
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), (name, action.dest)


@pytest.mark.parametrize("spec, needles", [
    ("ddim:et=0.5", ("'et'", "eta", "noise")),
    ("ddimm", ("unknown method", "'ddimm'", "ddim")),
    ("ddim:eta", ("name:key=value",)),
])
def test_sample_rejects_bad_method_options_before_loading_anything(tmp_path, capsys, spec, needles):
    # the checkpoint does not exist: the method error must come first (no work, no file read)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(tmp_path / "missing.pt"), "--method", spec, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffusion-lab sample: error: --method")
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not out.exists()


def test_compare_rejects_bad_method_options_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "heun", "ddim:et=0.5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "'et'" in err and "eta" in err and not (tmp_path / "o").exists()


def test_list_methods_shows_each_methods_options(capsys):
    from diffusion_lab.samplers import available

    assert main(["compare", "--list-methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    option_lines = [ln.strip() for ln in lines if ln.strip().startswith("options:")]
    assert len(option_lines) == len(available())
    by_method = {}
    for i, ln in enumerate(lines):
        if ln.strip().startswith("options:"):
            by_method[lines[i - 1].split()[0]] = ln.strip()
    assert "eta=0.0" in by_method["ddim"]
    assert "gamma=1.0" in by_method["em"]
    assert by_method["auto"] == "options: none"
    assert "passed on to the predictor" in by_method["pc"]


def test_sample_with_options_and_an_nfe_budget_runs_and_records_them(tmp_path, capsys, checkpoint):
    out = tmp_path / "s"
    assert main(["sample", str(checkpoint), "--method", "ddim:eta=0.5", "--steps", "6", "--n", "50",
                 "--no-plot", "--out", str(out)]) == 0
    import json

    s = json.loads((out / "settings.json").read_text())
    assert s["options"] == {"eta": 0.5} and s["sampler_settings"]["eta"] == 0.5
    assert s["nfe"] == 6 + 1  # 6 DDIM steps and the final denoiser
    out2 = tmp_path / "s2"
    assert main(["sample", str(checkpoint), "--method", "auto", "--nfe", "10", "--n", "50",
                 "--no-plot", "--out", str(out2)]) == 0
    s2 = json.loads((out2 / "settings.json").read_text())
    assert s2["nfe"] <= 10 and s2["sampler_settings"]["requested_method"] == "auto"
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"wrote samples.pt, samples.npz, settings.json to {out2}"


class _FakeCheck:
    kind, area, tol, identity = "exact", "fake", 1e-10, "x = x"

    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def run(self):
        from theory_checks.catalogue import Result

        self._fn()
        return Result(self, 0.0, True, 0.0, "")


def test_check_prints_each_result_before_the_next_check_runs(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    seen = {}
    checks = [_FakeCheck("first.check", lambda: None),
              _FakeCheck("second.check", lambda: seen.setdefault("at_second", buf.getvalue()))]
    results = check_cmd._stream(checks, quiet=False)
    assert [r.check.name for r in results] == ["first.check", "second.check"]
    assert "first.check" in seen["at_second"] and "second.check" not in seen["at_second"]


def test_check_prints_measured_orders_not_residuals(capsys):
    assert main(["check", "-k", "solvers.order[heun]"]) == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("solvers.order[heun]"))
    import re

    measured = float(re.search(r"order (-?\d+\.\d+) \(theory 2\)", row).group(1))
    assert abs(measured - 2) <= 0.15  # Heun's global order, within the order class's 0.15


def test_measured_order_reads_the_slope_and_the_theory():
    from theory_checks.catalogue import Check, Result

    c = Check("x", "solvers", "order", 0.15, "", "", lambda: 0.0)
    assert check_cmd.measured_order(Result(c, 0.05, True, 0.0, "slope 2.050 (expected 2); errors ...")) == (2.05, 2.0)
    assert check_cmd.measured_order(Result(c, 0.05, True, 0.0, "slope -0.500; x")) == (-0.5, None)
    e = Check("y", "solvers", "exact", 1e-10, "", "", lambda: 0.0)
    assert check_cmd.measured_order(Result(e, 0.0, True, 0.0, "slope 2")) is None


def test_a_closed_stdout_ends_the_command_quietly(capsys):
    class Closed(io.TextIOBase):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    old = sys.stdout
    sys.stdout = Closed()
    try:
        rc = main(["check", "--list"])
    finally:
        sys.stdout = old
    assert rc == 141
    assert capsys.readouterr().err == ""


def test_a_listing_into_a_closed_pipe_prints_no_traceback():
    # a real pipe whose reader is gone (`check --list` itself is run in-process above: its import is slow)
    proc = subprocess.Popen([sys.executable, "-m", "diffusion_lab.cli", "compare", "--list-methods"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line (as `| head -0`)
    _, err = proc.communicate(timeout=120)
    assert err.decode() == "" and proc.returncode == 141


def test_train_on_an_exact_target_reports_the_mmd_to_the_exact_law(tmp_path, capsys):
    from diffusion_lab import training as T
    from diffusion_lab.cli._learned import preview
    from diffusion_lab.metrics import mmd2_exact
    from diffusion_lab.targets import ring8

    out = tmp_path / "train"
    assert main([*TRAIN, "--out", str(out), "--no-plot"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step ")]
    assert len(lines) == 3 and all("MMD^2 to" in ln for ln in lines)
    with open(out / "train_log.csv") as fh:
        log = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in log] == [10, 20]
    # the logged number is the MMD^2 of the EMA network's samples: recomputed from the checkpoint it agrees
    state = T.load_checkpoint(str(out / "checkpoint.pt"))
    field = T.field_from_checkpoint(state)
    res = preview(field, state["meta"], 300, 0 + 2)
    m = mmd2_exact(res.x, ring8())
    assert float(log[-1]["mmd2"]) == pytest.approx(m.mmd2, rel=1e-6, abs=1e-9)
    assert float(log[-1]["mmd2_se"]) == pytest.approx(m.se, rel=1e-6)
    assert m.mmd2 > 3 * m.se  # 20 steps of a 16-wide MLP: resolved from the exact law, so the number means something


def test_train_on_sample_only_data_logs_no_mmd(tmp_path, capsys):
    out = tmp_path / "train"
    assert main([*TRAIN, "--data", "moons", "--out", str(out), "--no-plot"]) == 0
    with open(out / "train_log.csv") as fh:
        assert "mmd2" not in next(csv.reader(fh))


def test_threads_option_goes_through_the_library_switch(monkeypatch, tmp_path):
    import diffusion_lab._threads as th

    calls = []
    monkeypatch.setattr(th, "set_threads", lambda n: calls.append(n) or 1)
    assert main(["likelihood", "--n", "2", "--threads", "3"]) == 0
    assert calls == [3]
    assert torch.get_num_threads() >= 1


def test_compare_checkpoint_measures_samplers_against_the_adaptive_solve_of_the_network(tmp_path, capsys,
                                                                                      checkpoint):
    import json

    from diffusion_lab import training as T
    from diffusion_lab.distributed import initial_noise
    from diffusion_lab.metrics import mean_error, mmd2_exact
    from diffusion_lab.samplers import sample
    from diffusion_lab.targets import ring8

    out = tmp_path / "cmp"
    assert main(["compare", "--checkpoint", str(checkpoint), "--methods", "heun", "em", "--nfe", "8",
                 "--n", "64", "--rtol", "1e-5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adaptively" in text and f"to {out}" in text.strip().splitlines()[-1]
    with open(out / "results.csv") as fh:
        rows = {r["sampler"]: r for r in csv.DictReader(fh)}
    assert (out / "error_vs_nfe.png").exists()
    ref = json.loads((out / "settings.json").read_text())["reference"]
    assert ref["nfe"] > 8 and ref["law"] == "p_t_min"
    # the numbers are what the library gives for the same starts: heun's flow error against the adaptive solve
    state = T.load_checkpoint(str(checkpoint))
    field = T.field_from_checkpoint(state)
    sigma_T = float(field.schedule.sigma(torch.tensor(field.schedule.t_max, dtype=torch.float64)))
    # compare's seeding (diffusion_lab.distributed): start i from (seed 0, i); 64 samples are one batch
    x_T = initial_noise(0, 0, 64, (2,), sigma_T)
    exact_flow = sample(field, x_T, "adaptive", rtol=1e-5, atol=1e-5).x
    heun = sample(field, x_T, "heun", nfe=8).x
    assert float(rows["heun"]["flow_error"]) == pytest.approx(mean_error(heun, exact_flow), rel=1e-9)
    assert rows["em"]["flow_error"] == "nan"  # a stochastic sampler does not approximate the flow map
    law = ring8().marginal(field.schedule, field.schedule.t_min)
    assert float(rows["heun"]["mmd2"]) == pytest.approx(mmd2_exact(heun, law).mmd2, rel=1e-9)


def test_train_throughput_excludes_the_exact_law_evaluation(monkeypatch, capsys):
    import time

    from diffusion_lab.cli import train as train_cmd

    clock = iter([10.0, 10.25, 20.0, 20.25])  # each evaluation takes 0.25 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    cb = train_cmd._callback(lambda trainer: (1e-3, 1e-4), trainer=None)
    r1 = {"step": 10, "loss": 1.0, "lr": 1e-3, "samples_per_s": 100.0, "seconds": 1.0}
    r2 = {"step": 20, "loss": 0.9, "lr": 1e-3, "samples_per_s": 100.0, "seconds": 2.0}
    cb(r1)
    cb(r2)
    assert r1["samples_per_s"] == 100.0  # nothing evaluated before the first record
    # 100 samples/s over 1 s of wall time of which 0.25 s was the evaluation: 100 samples in 0.75 s of training
    assert r2["samples_per_s"] == pytest.approx(100.0 / 0.75)
    assert r2["mmd2"] == 1e-3 and "MMD^2 to exact law 1.00e-03" in capsys.readouterr().out
