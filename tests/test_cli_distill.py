"""`diffusion-lab distill`: the trainer run in two calls equals one ``flowmap.distill`` call bitwise, --resume after an
interruption equals one uninterrupted run bitwise (cd, ct, meanflow, shortcut, reflow), the summary's numbers are those
of the written map, bad input fails before anything is written; `compare --flow-map` puts the distilled map's rows beside the ODE
samplers; reflow writes a `train` checkpoint that `field_from_checkpoint` and `compare --checkpoint` read."""
import json
import math

import pytest
import torch

from diffusion_lab import VPLinear, targets
from diffusion_lab.cli import main
from diffusion_lab.cli.distill import flow_map_from_checkpoint, load_distill_checkpoint
from diffusion_lab.flowmap import ConsistencyTrainer, FlowMap, TwoTimeMLP, distill

SMALL = ["distill", "--teacher", "bimodal_1d", "--batch", "16", "--grid-steps", "4", "--solver", "ddim",
         "--hidden", "8", "--depth", "1", "--n-train", "256", "--eval-n", "64", "--log-every", "2", "--no-plot",
         "--ref-rtol", "1e-6"]


@pytest.mark.parametrize("method", ["cd", "ctm", "ct"])
def test_resumable_run_equals_flowmap_distill_bitwise(method):
    """The CLI's trainer is flowmap.distill cut at step boundaries: same weights, EMA, losses, teacher calls (ct:
    distill's own defaults, a curriculum 2 -> 8 intervals that changes within the 9 steps)."""
    tg = targets.ring8()
    sch = VPLinear()
    data = tg.sample(512, generator=torch.Generator().manual_seed(1)).float()
    if method == "ct":
        kw = dict(batch=32, lr=2e-3, ema_decay=0.99, seed=3, ct_s0=2, ct_s1=8)
        teacher = None
    else:
        kw = dict(batch=32, grid_steps=5, solver="heun", lr=2e-3, target_decay=0.9, ema_decay=0.99, seed=3)
        teacher = tg.field(sch)
    torch.manual_seed(0)
    a = distill(FlowMap(TwoTimeMLP(2, hidden=16, depth=2), sch, 0.5), teacher, data, steps=9, method=method,
                log_every=4, **kw)
    torch.manual_seed(0)
    run = ConsistencyTrainer(FlowMap(TwoTimeMLP(2, hidden=16, depth=2), sch, 0.5), tg.field(sch) if teacher else None,
                             data, method=method, log_every=4, total_steps=9 if method == "ct" else None, **kw)
    run.run(4)
    run.run(9)  # continued in a second call, as after a resume
    for p, q in zip(a.psi.net.parameters(), run.psi.net.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(a.psi_ema.net.parameters(), run.flow_map().net.parameters()):
        assert torch.equal(p, q)
    assert a.history == run.history and [r["step"] for r in run.history] == [4, 8, 9]
    assert a.teacher_calls == run.teacher_calls == (0 if method == "ct" else 18)  # Heun: two calls per step
    if method == "ct":
        # the curriculum ran: K' = floor(9 / (log2(8/2) + 1)) = 3, N(k) = 2 * 2^(k // 3), logged at k = 3, 7, 8
        assert [r["grid_steps"] for r in run.history] == [4, 8, 8]


def _states(path):
    return load_distill_checkpoint(str(path))["state"]


def _assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("net",):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), k
    for key in ("target", "ema"):
        if not a[key]:  # ct: no target network (theta- = stopgrad theta)
            assert not b[key]
            continue
        for k in a[key]["module"]:
            assert torch.equal(a[key]["module"][k], b[key]["module"][k]), (key, k)
        assert a[key]["updates"] == b[key]["updates"]
    for i, s in a["opt"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["opt"]["state"][i][k]), (i, k)
    assert torch.equal(a["generator"], b["generator"])
    assert a["history"] == b["history"] and a["teacher_calls"] == b["teacher_calls"]


@pytest.mark.parametrize("method", ["cd", pytest.param("ct", marks=pytest.mark.slow)])
def test_resume_after_interruption_is_bitwise_one_run(tmp_path, monkeypatch, capsys, method):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    SMALL = [*globals()["SMALL"], "--method", method, "--ct-s0", "2", "--ct-s1", "8"]
    assert main([*SMALL, "--steps", "12", "--ckpt-every", "4", "--out", str(straight)]) == 0
    original = ConsistencyTrainer.train_step

    def crash_at_10(self):
        if self.step == 9:
            raise KeyboardInterrupt  # killed during step 10: the last checkpoint is step 8's
        return original(self)

    monkeypatch.setattr(ConsistencyTrainer, "train_step", crash_at_10)
    with pytest.raises(KeyboardInterrupt):
        main([*SMALL, "--steps", "12", "--ckpt-every", "4", "--out", str(broken)])
    assert _states(broken / "checkpoint.pt")["step"] == 8
    monkeypatch.setattr(ConsistencyTrainer, "train_step", original)
    assert main([*SMALL, "--steps", "12", "--ckpt-every", "4", "--out", str(broken), "--resume"]) == 0
    _assert_same_state(_states(straight / "checkpoint.pt"), _states(broken / "checkpoint.pt"))
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((broken / "summary.json").read_text())
    assert a["evaluation"]["rows"] == b["evaluation"]["rows"]
    # a resume asking for other settings, or for fewer steps than done, is refused and changes nothing
    before = (broken / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        main([*SMALL, "--steps", "12", "--lr", "0.01", "--out", str(broken), "--resume"])
    assert e.value.code == 2 and "lr=0.001" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*SMALL, "--steps", "6", "--out", str(broken), "--resume"])
    # ct's curriculum depends on the total steps: another --steps is another run
    assert ("total_steps=12" if method == "ct" else "beyond --steps 6") in capsys.readouterr().err
    assert (broken / "checkpoint.pt").read_bytes() == before


@pytest.mark.slow  # a CLI run with its evaluation; the default set keeps the resume and compare runs
def test_summary_matches_the_written_map_and_counts(tmp_path):
    out = tmp_path / "o"
    assert main([*SMALL, "--steps", "6", "--out", str(out), "--method", "ctm"]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["teacher_calls"] == 6 and summ["teacher_evals"] == 6 * 16  # DDIM teacher: one call per step
    assert summ["settings"]["method"] == "ctm" and summ["settings"]["teacher"]["kind"] == "exact"
    rows = {(r["sampler"], r["nfe"]): r for r in summ["evaluation"]["rows"]}
    assert {("flow map chain", k) for k in (1, 2, 4)} <= set(rows)
    assert {("flow map multistep", k) for k in (2, 4)} <= set(rows)
    assert rows["teacher ddim x4", 4]["err_mean"] > 0
    assert all(math.isnan(rows["flow map multistep", k]["err_mean"]) for k in (2, 4))
    # the one-call error recomputed from the checkpoint's map against the run's reference (same DOP853 solve) ...
    from diffusion_lab.reference import flow_map

    psi, meta = flow_map_from_checkpoint(str(out / "checkpoint.pt"))
    sch, tg = VPLinear(), targets.bimodal_1d()
    x_T = tg.marginal(sch, sch.t_max).sample(64, torch.Generator().manual_seed(0 + 2))
    phi, _ = flow_map(tg.field(sch), x_T, sch.t_max, sch.t_min, rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        e = float((psi(x_T, sch.t_max, sch.t_min).double() - phi).norm(dim=1).mean())
    assert math.isclose(e, rows["flow map chain", 1]["err_mean"], rel_tol=1e-12)
    # ... which is the exact map to ~1e-6 relative (the closed form of a 1-D mixture's map is not at hand; the
    # scipy solve at rtol 1e-10 stands in for it), far below the errors measured (> 1e-2)
    phi_tight, _ = flow_map(tg.field(sch), x_T[:8], sch.t_max, sch.t_min)
    assert float((phi_tight - phi[:8]).abs().max()) < 1e-4
    assert meta["network"] == {"dim": 1, "hidden": 8, "depth": 1}


@pytest.mark.parametrize("argv, message", [
    (["--method", "reflow", "--schedule", "vp"], "rectified-flow schedule only"),
    (["--method", "reflow", "--rounds", "3"], "must be a multiple of --rounds"),
    (["--rounds", "2"], "--rounds applies to --method reflow only"),
    (["--method", "xyz"], "unknown --method 'xyz'"),
    (["--teacher", "no_such_thing"], "neither an exact target"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--ema", "1.0"], "--ema must be in [0, 1)"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main([*SMALL, "--steps", "2", "--out", str(out), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_non_empty_out_needs_overwrite_and_teacher_checkpoint_errors(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SystemExit):
        main([*SMALL, "--steps", "2", "--out", str(out)])
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        main([*SMALL, "--steps", "2", "--teacher", str(bad), "--out", str(tmp_path / "p")])
    assert "not a readable" in capsys.readouterr().err and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="not a readable"):
        load_distill_checkpoint(str(bad))


@pytest.mark.slow
def test_learned_teacher_from_a_train_checkpoint(tmp_path):
    """A `train` checkpoint is a teacher: errors are measured against its own PF-ODE (adaptive solve), the MMD
    against the exact law of its training target; the checkpoint records the teacher."""
    tr = tmp_path / "train"
    assert main(["train", "--data", "ring8", "--steps", "3", "--batch", "32", "--hidden", "16", "--depth", "1",
                 "--n-train", "256", "--eval-n", "0", "--no-plot", "--out", str(tr)]) == 0
    out = tmp_path / "d"
    assert main([*SMALL, "--teacher", str(tr / "checkpoint.pt"), "--steps", "3", "--out", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["settings"]["teacher"]["kind"] == "checkpoint" and summ["settings"]["data"] == "ring8"
    assert "adaptive" in summ["evaluation"]["reference"] and "mmd2" in summ["evaluation"]["rows"][0]
    assert summ["teacher_calls"] == 3
    with pytest.raises(SystemExit):  # a train checkpoint is not a flow map
        main(["compare", "--flow-map", str(tr / "checkpoint.pt"), "--methods", "ddim", "--nfe", "5", "--n", "64",
              "--out", str(tmp_path / "c")])


def test_compare_flow_map_rows_beside_the_samplers(tmp_path, capsys):
    import csv

    d = tmp_path / "d"
    assert main([*SMALL, "--steps", "2", "--out", str(d), "--method", "ctm"]) == 0
    ckpt = str(d / "checkpoint.pt")
    out = tmp_path / "c"
    common = ["compare", "--target", "bimodal_1d", "--methods", "ddim", "--nfe", "5", "--n", "100", "--no-plot"]
    assert main([*common, "--flow-map", ckpt, "--flow-map-nfe", "1", "2", "--flow-map-sampling", "both",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    maps = [r for r in rows if r["family"] == "flow_map"]
    assert [(r["sampler"].split()[-1], r["nfe"]) for r in maps] == [("chain", "1"), ("chain", "2"),
                                                                    ("multistep", "1"), ("multistep", "2")]
    assert all(r["flow_error"] != "nan" for r in maps[:2]) and all(r["flow_error"] == "nan" for r in maps[2:])
    # the one-call chain row is the checkpoint's map on compare's x_T (seed 0): the same flow error recomputed
    from diffusion_lab.reference import flow_map

    psi, _ = flow_map_from_checkpoint(ckpt)
    sch, tg = VPLinear(), targets.bimodal_1d()
    x_T = tg.marginal(sch, sch.t_max).sample(100, torch.Generator().manual_seed(0))
    phi, _ = flow_map(tg.field(sch), x_T, sch.t_max, sch.t_min)
    with torch.no_grad():
        e = float((psi(x_T, sch.t_max, sch.t_min).double() - phi).norm(dim=1).mean())
    assert math.isclose(float(maps[0]["flow_error"]), e, rel_tol=1e-9)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["flow_map_nfe"] == [1, 2] and len(settings["flow_maps"]) == 2
    capsys.readouterr()
    for argv, message in ((["--target", "ring8"], "pass --target bimodal_1d"),
                          (["--schedule", "cosine"], "pass --schedule vp"),
                          (["--final", "denoise"], "--final step")):
        with pytest.raises(SystemExit):
            main([*common, *argv, "--flow-map", ckpt, "--out", str(tmp_path / "x")])
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow  # a CLI run with its evaluation; the default set keeps the resume and compare runs
def test_meanflow_map_is_written_and_compare_samples_it(tmp_path, capsys):
    """A MeanFlow map (diffusion_lab.meanflow) through distill: the written map is sampled by method flow_map in
    compare (its call convention is FlowMap's); shortcut's batch floor is checked before anything is written."""
    import csv

    out = tmp_path / "mf"
    assert main([*SMALL, "--method", "meanflow", "--steps", "4", "--out", str(out)]) == 0
    summ = json.loads((out / "summary.json").read_text())
    assert summ["settings"]["map"] == "meanflow" and summ["teacher_calls"] == 4  # one teacher velocity per step
    psi, _ = flow_map_from_checkpoint(str(out / "checkpoint.pt"))
    from diffusion_lab.meanflow import MeanFlowMap

    assert isinstance(psi, MeanFlowMap)
    with pytest.raises(SystemExit):
        main([*SMALL, "--method", "shortcut", "--steps", "4", "--out", str(tmp_path / "sc")])
    assert "--batch >= 56" in capsys.readouterr().err and not (tmp_path / "sc").exists()
    c = tmp_path / "c"
    assert main(["compare", "--target", "bimodal_1d", "--methods", "ddim", "--nfe", "5", "--n", "50", "--no-plot",
                 "--flow-map", str(out / "checkpoint.pt"), "--flow-map-nfe", "1", "--out", str(c)]) == 0
    rows = [r for r in csv.DictReader(open(c / "results.csv")) if r["family"] == "flow_map"]
    assert len(rows) == 1 and rows[0]["nfe"] == "1" and "meanflow" in rows[0]["sampler"]


def test_shortcut_takes_target_decay():
    """--target-decay reaches the shortcut trainer (0: the online network as the self-consistency target); without it
    the trainer keeps its published default (EMA 0.999)."""
    from diffusion_lab.cli.distill import TRAINERS
    from diffusion_lab.meanflow import shortcut_map

    base = {"batch": 64, "lr": 1e-3, "ema_decay": 0.99, "seed": 0}
    data = torch.zeros(8, 2)
    run = TRAINERS["shortcut"](shortcut_map(2, VPLinear(), 8, 1), None, data, {**base, "target_decay": 0.0}, 10)
    assert run.target_decay == 0.0 and run.resolved["target_decay"] == 0.0
    run = TRAINERS["shortcut"](shortcut_map(2, VPLinear(), 8, 1), None, data, {**base, "target_decay": None}, 10)
    assert run.target_decay == 0.999


def _table(out: str) -> list:
    """The evaluation table's rows as printed (the lines after the header's rule)."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("sampler"))
    return [line for line in lines[i + 2:] if not line.startswith("wrote ")]


def _crash_during(cls, monkeypatch, call: int):
    """Make cls.train_step raise KeyboardInterrupt at its ``call``-th call (counted over the instances)."""
    original, calls = cls.train_step, [0]

    def crashing(self):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(cls, "train_step", crashing)
    return lambda: monkeypatch.setattr(cls, "train_step", original)


@pytest.mark.parametrize("method", ["meanflow", "shortcut"])
def test_meanflow_and_shortcut_resume_after_interruption_bitwise(tmp_path, monkeypatch, capsys, method):
    """Killed during step 10 (the last checkpoint is step 8's), --resume gives the checkpoint (weights, EMA, target
    network, Adam, generator, log), summary rows and printed table of the uninterrupted 12-step run; a resume with
    other settings is refused naming the setting, and leaves the checkpoint alone."""
    from diffusion_lab.meanflow import MeanFlowTrainer, ShortcutTrainer

    cls = MeanFlowTrainer if method == "meanflow" else ShortcutTrainer
    argv = [*SMALL, "--method", method, "--steps", "12", "--ckpt-every", "4", "--batch",
            "16" if method == "meanflow" else "56"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main([*argv, "--out", str(straight)]) == 0
    printed = capsys.readouterr().out
    restore = _crash_during(cls, monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(broken)])
    restore()
    assert _states(broken / "checkpoint.pt")["step"] == 8
    capsys.readouterr()
    assert main([*argv, "--out", str(broken), "--resume"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("from step 8 to 12")
    a, b = _states(straight / "checkpoint.pt"), _states(broken / "checkpoint.pt")
    _assert_same_state({**a, "target": a.get("target", {})}, {**b, "target": b.get("target", {})})
    assert a["acc"] == b["acc"] and a["acc_n"] == b["acc_n"]
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((broken / "summary.json").read_text())
    assert sa["evaluation"]["rows"] == sb["evaluation"]["rows"] and sa["final_loss"] == sb["final_loss"]
    assert sa["teacher_calls"] == sb["teacher_calls"] == 12
    assert sa["teacher_evals"] == 12 * (16 if method == "meanflow" else 49)  # shortcut: the flow-matching rows
    assert (straight / "distill_log.csv").read_text() == (broken / "distill_log.csv").read_text()
    capsys.readouterr()
    main([*argv, "--out", str(tmp_path / "again"), "--overwrite"])
    assert _table(capsys.readouterr().out) == _table(printed)
    before = (broken / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--lr", "0.01", "--out", str(broken), "--resume"])
    assert e.value.code == 2 and "lr=0.001" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--ema", "0.9", "--out", str(broken), "--resume"])
    assert "ema_decay=0.999" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--method", "ctm", "--out", str(broken), "--resume"])
    assert f"method={method!r}" in capsys.readouterr().err
    assert (broken / "checkpoint.pt").read_bytes() == before
    # options this method does not use (the consistency grid and teacher solver) do not block a resume
    assert main([*argv, "--grid-steps", "9", "--solver", "heun", "--out", str(broken), "--resume"]) == 0
    assert _states(broken / "checkpoint.pt")["step"] == 12


def test_reflow_resumes_bitwise_and_writes_a_train_checkpoint(tmp_path, monkeypatch, capsys):
    """reflow, 2 rounds x 4 steps on bimodal_1d (exact field on rf): killed during step 7 (last checkpoint: step 6,
    inside round 2), --resume equals the uninterrupted run (weights, EMA, Adam, coupling, log, summary rows). The
    checkpoint is a `train` checkpoint: field_from_checkpoint's one Euler step reproduces the reported 1-step error
    against the same DOP853 reference, and `compare --checkpoint` runs on it. Other --rounds / --steps on resume and
    a non-rf teacher checkpoint are refused."""
    from diffusion_lab import RectifiedFlow
    from diffusion_lab.reference import flow_map
    from diffusion_lab.reflow import RectifiedTrainer, one_step
    from diffusion_lab.training import field_from_checkpoint, load_checkpoint

    argv = [*SMALL, "--method", "reflow", "--steps", "8", "--rounds", "2", "--ckpt-every", "3", "--log-every", "3"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main([*argv, "--out", str(straight)]) == 0
    printed = capsys.readouterr().out
    assert "into MLPScore (velocity)" in printed and "round 2" in printed
    restore = _crash_during(RectifiedTrainer, monkeypatch, 7)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(broken)])
    restore()
    ck_a, ck_b = load_checkpoint(str(straight / "checkpoint.pt")), load_checkpoint(str(broken / "checkpoint.pt"))
    assert ck_b["step"] == 6 and ck_b["distill"]["state"]["round"] == 2
    assert main([*argv, "--out", str(broken), "--resume"]) == 0
    ck_b = load_checkpoint(str(broken / "checkpoint.pt"))
    for key in ("model",):
        assert all(torch.equal(v, ck_b[key][k]) for k, v in ck_a[key].items())
    assert all(torch.equal(v, ck_b["ema"]["module"][k]) for k, v in ck_a["ema"]["module"].items())
    sa, sb = ck_a["distill"]["state"], ck_b["distill"]["state"]
    assert torch.equal(sa["coupling_x"], sb["coupling_x"]) and sa["history"] == sb["history"]
    assert [(r["step"], r["round"]) for r in sa["history"]] == [(3, 1), (6, 2), (8, 2)]
    for i, st in sa["trainer"]["opt"]["state"].items():
        assert all(torch.equal(v, sb["trainer"]["opt"]["state"][i][k]) for k, v in st.items())
    summ = json.loads((straight / "summary.json").read_text())
    assert summ["evaluation"]["rows"] == json.loads((broken / "summary.json").read_text())["evaluation"]["rows"]
    # RK4 x 64 steps couples the 256 samples: 256 teacher calls, all in round 1
    assert summ["teacher_calls"] == 256 and summ["teacher_evals"] == 256 * 256
    rows = {(r["sampler"], r["nfe"]): r for r in summ["evaluation"]["rows"]}
    assert {(f"{w} euler", k) for w in ("reflow", "teacher") for k in (1, 2, 4)} <= set(rows)
    # the written field: its one Euler step, against the run's reference (same x_T, same DOP853 solve)
    field = field_from_checkpoint(ck_a)
    sch, tg = RectifiedFlow(), targets.bimodal_1d()
    assert field.schedule.settings() == sch.settings()
    x_T = tg.marginal(sch, sch.t_max).sample(64, torch.Generator().manual_seed(0 + 2))
    phi, _ = flow_map(tg.field(sch), x_T, sch.t_max, sch.t_min, rtol=1e-6, atol=1e-8)
    e = float((one_step(field, x_T) - phi).norm(dim=1).mean())
    assert math.isclose(e, rows["reflow euler", 1]["err_mean"], rel_tol=1e-12)
    c = tmp_path / "c"
    assert main(["compare", "--checkpoint", str(straight / "checkpoint.pt"), "--methods", "euler", "--nfe", "1",
                 "--n", "50", "--no-plot", "--out", str(c)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):  # as a flow map: refused, pointing to --checkpoint
        main(["compare", "--target", "bimodal_1d", "--schedule", "rf", "--flow-map", str(straight / "checkpoint.pt"),
              "--methods", "euler", "--nfe", "1", "--n", "50", "--no-plot"])
    assert "read it with --checkpoint" in capsys.readouterr().err
    before = (broken / "checkpoint.pt").read_bytes()
    for extra, message in ((["--rounds", "1"], "rounds=2"), (["--steps", "10"], "total_steps=8"),
                           (["--method", "meanflow", "--rounds", "1"], "method='reflow'")):
        with pytest.raises(SystemExit):
            main([*argv, *extra, "--out", str(broken), "--resume"])
        assert message in capsys.readouterr().err
    assert (broken / "checkpoint.pt").read_bytes() == before
    tr = tmp_path / "train"
    assert main(["train", "--data", "bimodal_1d", "--steps", "2", "--batch", "16", "--hidden", "8", "--depth", "1",
                 "--n-train", "256", "--eval-n", "0", "--no-plot", "--out", str(tr)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*argv, "--teacher", str(tr / "checkpoint.pt"), "--out", str(tmp_path / "r")])
    assert "trained on 'vp'" in capsys.readouterr().err and not (tmp_path / "r").exists()
    # `train --resume` on the reflow checkpoint: refused in one line, pointing to distill --resume, nothing written
    with pytest.raises(SystemExit):
        main(["train", "--data", "bimodal_1d", "--schedule", "rf", "--prediction", "velocity", "--steps", "9",
              "--no-plot", "--out", str(straight), "--resume"])
    err = capsys.readouterr().err
    assert "holds no training state" in err and "distill --resume" in err
    assert load_checkpoint(str(straight / "checkpoint.pt"))["step"] == ck_a["step"]


# ------------------------------------------------------------------------------------------------
# a DiT checkpoint teacher (class-conditional, the 8x8 digits): FlowMap(TwoTimeDiT) students

DIT = ["distill", "--batch", "8", "--grid-steps", "4", "--eval-n", "20", "--log-every", "2", "--no-plot"]


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    """A class-conditional DiT-micro/2 on digits after 3 training steps (EDM preconditioning, as the map's)."""
    out = tmp_path_factory.mktemp("dit_teacher")
    assert main(["train", "--data", "digits", "--model", "DiT-micro/2", "--prediction", "edm", "--steps", "3",
                 "--batch", "16", "--eval-n", "0", "--no-plot", "--out", str(out)]) == 0
    return str(out / "checkpoint.pt")


def _dit_reference(teacher: str, n: int, seed: int = 0):
    """evaluate's x_T, balanced labels and reference for a labelled map (the teacher's adaptive PF-ODE, rtol 1e-6)."""
    from diffusion_lab.guidance import bind_labels
    from diffusion_lab.samplers import sample
    from diffusion_lab.training import field_from_checkpoint, load_checkpoint

    field = field_from_checkpoint(load_checkpoint(teacher))
    sch = field.schedule
    g = torch.Generator().manual_seed(seed + 2)
    sigma_T = float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    x_T = torch.randn((n, 1, 8, 8), generator=g, dtype=torch.float64) * sigma_T
    y = torch.arange(n) % 10
    bound = bind_labels(field, y)
    return field, bound, x_T, y, sample(bound, x_T, "adaptive", rtol=1e-6, atol=1e-6).x


def test_dit_teacher_cd_resumes_bitwise_and_the_map_reloads(tmp_path, monkeypatch, capsys, dit_teacher):
    """cd from a class-conditional DiT: the student is FlowMap(TwoTimeDiT) with the teacher's labels; killed during
    step 3 (last checkpoint: step 2), --resume equals the uninterrupted 4-step run bitwise (weights, target, EMA,
    Adam, generator, log, summary rows); the checkpoint reloads through flow_map_from_checkpoint(labelled=True) and
    reproduces the reported 1-call error against the teacher's PF-ODE for the same balanced labels."""
    from diffusion_lab.flowmap import TwoTimeDiT

    argv = [*DIT, "--teacher", dit_teacher, "--method", "cd", "--steps", "4", "--ckpt-every", "2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main([*argv, "--out", str(straight)]) == 0
    printed = capsys.readouterr().out
    assert "into TwoTimeDiT (the teacher's DiT-micro/2" in printed and "10 classes" in printed
    restore = _crash_during(ConsistencyTrainer, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--out", str(broken)])
    restore()
    assert _states(broken / "checkpoint.pt")["step"] == 2
    assert main([*argv, "--out", str(broken), "--resume"]) == 0
    a, b = _states(straight / "checkpoint.pt"), _states(broken / "checkpoint.pt")
    _assert_same_state(a, b)
    assert any(k.startswith("emb_t.") for k in a["net"]) and any(k.startswith("dit.") for k in a["net"])
    sa = json.loads((straight / "summary.json").read_text())
    sb = json.loads((broken / "summary.json").read_text())
    assert sa["evaluation"]["rows"] == sb["evaluation"]["rows"]
    assert sa["teacher_calls"] == 4 * 2 and sa["evaluation"]["labels"] == "balanced, y_i = i mod 10"
    meta = sa["settings"]
    assert meta["network"] == {"kind": "dit", "model": "DiT-micro/2", "model_kwargs": {"num_classes": 10}}
    assert meta["num_classes"] == 10 and meta["batch"] == 8 and meta["lr"] == 2e-4  # the DiT teacher's default
    rows = {(r["sampler"], r["nfe"]): r for r in sa["evaluation"]["rows"]}
    assert {(f"teacher {s}", k) for s in ("ddim", "dpmpp_2m") for k in (1, 2, 4)} <= set(rows)
    # the written map, read back with its labels: the same 1-call error on evaluate's x_T and reference
    with pytest.raises(ValueError, match="class-conditional flow map"):
        flow_map_from_checkpoint(str(straight / "checkpoint.pt"))
    psi, m2 = flow_map_from_checkpoint(str(straight / "checkpoint.pt"), labelled=True)
    assert isinstance(psi.net, TwoTimeDiT) and m2["num_classes"] == 10
    _, _, x_T, y, ref = _dit_reference(dit_teacher, 20)
    with torch.no_grad():
        e = float((psi(x_T, psi.schedule.t_max, psi.schedule.t_min, y).double() - ref).reshape(20, -1)
                  .norm(dim=1).mean())
    assert math.isclose(e, rows["flow map chain", 1]["err_mean"], rel_tol=1e-12)
    # compare --flow-map samples without labels: refused in one line, nothing written
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["compare", "--target", "ring8", "--flow-map", str(straight / "checkpoint.pt"), "--methods", "ddim",
              "--nfe", "2", "--n", "10", "--no-plot", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert "class-conditional flow map" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_dit_student_starts_as_the_teachers_ddim_step(tmp_path, dit_teacher):
    """One step at lr 1e-12 leaves the float32 weights as initialised (Adam moves each by ~1e-12, below their
    rounding), so the written map is the initial one: Psi(x_T, T, t_min | y) = the teacher's one-step DDIM map for
    every sample, up to the float32 round-off of the network (atol 2e-5, as in tests/test_flowmap_dit.py), and the
    reported 1-call errors of map and DDIM agree."""
    from diffusion_lab.samplers import sample

    out = tmp_path / "d"
    assert main([*DIT, "--teacher", dit_teacher, "--method", "ctm", "--steps", "1", "--lr", "1e-12",
                 "--out", str(out)]) == 0
    psi, _ = flow_map_from_checkpoint(str(out / "checkpoint.pt"), labelled=True)
    _, bound, x_T, y, _ = _dit_reference(dit_teacher, 20)
    with torch.no_grad():
        got = psi(x_T, psi.schedule.t_max, psi.schedule.t_min, y).double()
    want = sample(bound, x_T, "ddim", steps=1, final="step").x
    assert float((got - want).abs().max()) < 2e-5
    rows = {(r["sampler"], r["nfe"]): r for r in json.loads((out / "summary.json").read_text())["evaluation"]["rows"]}
    assert math.isclose(rows["flow map chain", 1]["err_mean"], rows["teacher ddim", 1]["err_mean"], abs_tol=2e-5)


def test_dit_and_conditional_teachers_refused_where_unsupported(tmp_path, capsys, dit_teacher):
    """meanflow / shortcut / reflow do not take a DiT teacher; a class-conditional MLP has no labelled student:
    one line, exit 2, nothing written."""
    for method in ("meanflow", "shortcut", "reflow"):
        with pytest.raises(SystemExit) as e:
            main([*DIT, "--teacher", dit_teacher, "--method", method, "--batch", "64", "--steps", "2",
                  "--out", str(tmp_path / method)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--method cd, ctm, ct only" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / method).exists()
    tr = tmp_path / "mlp"
    assert main(["train", "--data", "ring8", "--conditional", "--steps", "2", "--batch", "16", "--hidden", "8",
                 "--depth", "1", "--n-train", "256", "--eval-n", "0", "--no-plot", "--out", str(tr)]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*SMALL, "--teacher", str(tr / "checkpoint.pt"), "--steps", "2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "class-conditional mlp" in err and "TwoTimeMLP student takes no labels" in err
    assert not (tmp_path / "o").exists()
