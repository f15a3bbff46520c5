"""Two gloo processes on the CPU (torch.multiprocessing spawn, one start for all checks):

* ``diffusion-lab sample`` on 2 ranks writes bitwise the samples of a single-process run with the same seed (a
  package checkpoint with a stochastic sampler and CFG, and a reference-layout DiT), with a sample count that
  does not fill the last round of batches;
* ``diffusion-lab compare --checkpoint`` on 2 ranks: rank 0 alone writes, results.csv and the reference are the
  single-process run's (every number but the timings), and the gathered terminal samples of every sampler and of
  the adaptive reference are bitwise those of one process;
* training resume under DDP: after a checkpoint at step 3 and a resume in fresh trainers, every rank draws
  bitwise the same t, noise and global-RNG numbers as in an uninterrupted run, and ends with the same weights;
  a checkpoint without per-rank states (as written before they were kept) gives rank 1 other streams (the
  check has teeth) and warns.
"""
import os
import socket
import warnings

import numpy as np
import pytest
import torch

from diffusion_lab import training as T
from diffusion_lab.cli import main

WORLD = 2
STEPS, CUT = 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trainer(rank, world, draws):
    """A tiny MLP trainer whose objective records every (t, eps) it draws, with one global-RNG number."""
    from diffusion_lab.models import get_model
    from diffusion_lab.schedules import get_schedule

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = get_model("mlp", data_shape=[2], hidden=16, depth=1, num_classes=0)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    loader = T.TensorLoader(x, None, 16, seed=0, rank=rank, world_size=world)
    obj = T.Objective(get_schedule("vp"), "eps")
    draw = obj.draw

    def recording(x0, generator=None):
        t, eps = draw(x0, generator)
        draws.append((t.clone(), eps.clone(), torch.rand(3)))  # torch.rand: the global generator
        return t, eps

    object.__setattr__(obj, "draw", recording)  # a frozen dataclass: set the instance attribute directly
    return T.Trainer(net, obj, loader, lr=1e-2, seed=0, meta={"test": True})


def _params(tr):
    return [p.detach().clone() for p in tr.net.parameters()]


def _train_streams(rank, world, tmp):
    import torch.distributed as dist

    torch.manual_seed(100 + rank)  # a different global stream per rank
    full = []
    tr = _trainer(rank, world, full)
    tr.run(STEPS)
    result = {"full": full, "full_params": _params(tr)}

    torch.manual_seed(100 + rank)
    first = []
    tr = _trainer(rank, world, first)
    ckpt = os.path.join(tmp, "ckpt.pt")
    tr.run(CUT, ckpt_every=CUT, on_checkpoint=lambda t: T.save_checkpoint(ckpt, t.state_dict()))
    if rank == 0:  # the same checkpoint as an older version wrote it, without the per-rank states
        sd = torch.load(ckpt, weights_only=True)
        result["saved_ranks"] = len(sd["rank_rng"])
        del sd["rank_rng"]
        T.save_checkpoint(os.path.join(tmp, "old.pt"), sd)
    dist.barrier()
    for name, path in (("resumed", ckpt), ("old", os.path.join(tmp, "old.pt"))):
        torch.manual_seed(12345)  # overwritten by the restore
        rest = []
        tr = _trainer(rank, world, rest)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr.load_state_dict(torch.load(path, weights_only=True))
        tr.run(STEPS)
        result[name] = first + rest
        result[name + "_params"] = _params(tr)
        result[name + "_warned"] = any("no RNG state for rank" in str(w.message) for w in caught)
    return result


# compare --checkpoint: a deterministic and a stochastic sampler, 7 samples in batches of 2 (rank 1 has no batch in
# the last round), a loose reference tolerance (the test is about equality, not accuracy)
CMP_METHODS, CMP_NFE, CMP_N, CMP_BATCH, CMP_SEED, CMP_RTOL = ["heun", "ddim:eta=0.5"], [4, 6], 7, 2, 3, 1e-3


def _compare_argv(tmp):
    return ["compare", "--checkpoint", os.path.join(tmp, "uncond", "checkpoint.pt"), "--methods", *CMP_METHODS,
            "--nfe", *map(str, CMP_NFE), "--n", str(CMP_N), "--batch", str(CMP_BATCH), "--seed", str(CMP_SEED),
            "--rtol", str(CMP_RTOL), "--no-plot"]


def _compare_samples(tmp):
    """checkpoint_comparison's terminal samples (rank 0; None elsewhere) with the settings of _compare_argv."""
    from diffusion_lab.cli.compare import checkpoint_comparison
    from diffusion_lab.compare import parse_method

    state = T.load_checkpoint(os.path.join(tmp, "uncond", "checkpoint.pt"))
    out = checkpoint_comparison(T.field_from_checkpoint(state), state["meta"], [parse_method(m) for m in CMP_METHODS],
                                CMP_NFE, n=CMP_N, seed=CMP_SEED, grid_kind="logsnr", final="step", rtol=CMP_RTOL,
                                batch=CMP_BATCH, keep_samples=True)
    return None if out is None else out["samples"]


def _worker(rank, world, tmp, port, sample_args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    T.init_distributed("gloo")
    try:
        for name, argv in sample_args.items():
            assert main([*argv, "--out", os.path.join(tmp, name + "_ddp"), "--device", "cpu"]) == 0
        assert main([*_compare_argv(tmp), "--out", os.path.join(tmp, "cmp_ddp")]) == 0
        samples = _compare_samples(tmp)
        assert (samples is None) == (rank != 0)
        if rank == 0:
            torch.save(samples, os.path.join(tmp, "cmp_samples_ddp.pt"))
        torch.save(_train_streams(rank, world, tmp), os.path.join(tmp, f"streams{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    assert main(["train", "--data", "ring8", "--conditional", "--steps", "2", "--batch", "64", "--n-train", "256",
                 "--hidden", "16", "--depth", "1", "--eval-n", "0", "--no-plot", "--log-every", "2",
                 "--out", str(tmp / "train")]) == 0
    # unconditional, trained enough (lr 1e-2, 30 steps) that its samples are O(1) and the MMD columns not degenerate
    assert main(["train", "--data", "ring8", "--steps", "30", "--lr", "1e-2", "--batch", "64", "--n-train", "256",
                 "--hidden", "16", "--depth", "1", "--eval-n", "0", "--no-plot", "--log-every", "30",
                 "--out", str(tmp / "uncond")]) == 0
    from diffusion_lab.models import DiT, DiTConfig
    from diffusion_lab.models.convert import reference_state_dict

    net = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=1,
                        num_heads=4, num_classes=3, time_scale=1.0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    torch.save(reference_state_dict(net), tmp / "dit.pt")
    sample_args = {
        # 7 samples in batches of 2: 4 batches, rank 0 runs 0 and 2, rank 1 runs 1 and 3 (the last one short)
        "pkg": ["sample", str(tmp / "train" / "checkpoint.pt"), "--method", "ddim:eta=0.5", "--steps", "4",
                "--n", "7", "--batch", "2", "--cfg", "1", "--seed", "5", "--no-plot"],
        # 5 samples in batches of 3: rank 1 has a batch in the only round, nothing more
        "dit": ["sample", "--checkpoint", str(tmp / "dit.pt"), "--num-heads", "4", "--method", "euler", "--steps",
                "3", "--n", "5", "--batch", "3", "--no-plot"],
    }
    torch.multiprocessing.spawn(_worker, args=(WORLD, str(tmp), _free_port(), sample_args), nprocs=WORLD, join=True)
    for name, argv in sample_args.items():
        assert main([*argv, "--out", str(tmp / (name + "_one"))]) == 0
    assert main([*_compare_argv(str(tmp)), "--out", str(tmp / "cmp_one")]) == 0
    torch.save(_compare_samples(str(tmp)), tmp / "cmp_samples_one.pt")
    return tmp


@pytest.mark.parametrize("name", ["pkg", "dit"])
def test_distributed_sampling_is_bitwise_the_single_process_run(runs, name):
    with np.load(runs / f"{name}_ddp" / "samples.npz") as a, np.load(runs / f"{name}_one" / "samples.npz") as b:
        assert a["x"].shape == b["x"].shape and a["x"].shape[0] in (5, 7)
        assert np.array_equal(a["x"], b["x"]) and np.array_equal(a["labels"], b["labels"])
        assert np.abs(a["x"]).max() > 0.1
    import json

    s = json.loads((runs / f"{name}_ddp" / "settings.json").read_text())
    assert s["world_size"] == WORLD
    assert not any(f.startswith("samples") for f in os.listdir(runs / "train"))  # no stray files elsewhere


def test_distributed_compare_checkpoint_is_the_single_process_run(runs):
    import csv
    import json

    ddp, one = runs / "cmp_ddp", runs / "cmp_one"
    assert sorted(os.listdir(ddp)) == ["results.csv", "settings.json"]  # rank 0 alone wrote, no temporary files
    with open(ddp / "results.csv") as fa, open(one / "results.csv") as fb:
        a, b = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    assert len(a) == len(CMP_METHODS) * len(CMP_NFE) == len(b)
    for ra, rb in zip(a, b):  # the CSV holds repr(float): equal text is the same double
        assert {k: v for k, v in ra.items() if k != "seconds"} == {k: v for k, v in rb.items() if k != "seconds"}
        assert float(ra["sw2"]) > 0.01 and float(ra["mmd2_se"]) > 1e-3  # not degenerate (samples far from the law)
    sa, sb = (json.loads((d / "settings.json").read_text()) for d in (ddp, one))
    assert sa["world_size"] == WORLD and sb["world_size"] == 1 and sa["batch"] == sb["batch"] == CMP_BATCH
    assert sa["reference"] == sb["reference"] and sa["reference"]["n_batches"] == 4
    xa = torch.load(runs / "cmp_samples_ddp.pt", weights_only=True)
    xb = torch.load(runs / "cmp_samples_one.pt", weights_only=True)
    assert torch.equal(xa["x_T"], xb["x_T"]) and torch.equal(xa["reference"], xb["reference"])
    assert len(xa["rows"]) == len(b) and all(torch.equal(p, q) for p, q in zip(xa["rows"], xb["rows"]))
    # the stochastic sampler drew noise: ddim with eta = 0.5 ends away from the deterministic heun at the same budget
    assert (xa["rows"][2] - xa["rows"][0]).abs().max() > 1e-3


def test_compare_checkpoint_batches_do_not_change_the_starts(runs):
    """The start of sample i depends on (seed, i) only: batches of 2 or one batch of 7 start from the same x_T, and
    with a deterministic sampler the terminal samples agree to the network's rounding."""
    from diffusion_lab.cli.compare import checkpoint_comparison
    from diffusion_lab.compare import parse_method

    state = T.load_checkpoint(str(runs / "uncond" / "checkpoint.pt"))
    out = checkpoint_comparison(T.field_from_checkpoint(state), state["meta"], [parse_method("heun")], [4], n=CMP_N,
                                seed=CMP_SEED, grid_kind="logsnr", final="step", rtol=CMP_RTOL, keep_samples=True)
    mine = torch.load(runs / "cmp_samples_one.pt", weights_only=True)
    assert torch.equal(out["samples"]["x_T"], mine["x_T"]) and out["reference"]["n_batches"] == 1
    # the network runs in float32, whose matrix products over batch shapes 2 and 7 may round differently (unit
    # roundoff 6e-8 per call, 3 calls of O(1) samples): 1e-5 is rounding, a different start would be O(1) off
    assert torch.allclose(out["samples"]["rows"][0], mine["rows"][0], rtol=0, atol=1e-5)
    assert (out["samples"]["rows"][0] - mine["rows"][0]).abs().max() < 1e-5 < mine["rows"][0].abs().max()


@pytest.mark.parametrize("argv, message", [
    (["compare", "--n", "8", "--batch", "4"], "--batch applies to --checkpoint only"),
    (["compare", "--n", "8"], "run compare --checkpoint only"),
])
def test_compare_refuses_what_it_cannot_distribute(monkeypatch, capsys, tmp_path, argv, message):
    if "--batch" not in argv:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; refused before any process group is made
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "c")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _streams(runs):
    return [torch.load(runs / f"streams{r}.pt", weights_only=True) for r in range(WORLD)]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for da, db in zip(a, b) for x, y in zip(da, db))


def test_ddp_resume_continues_every_ranks_streams(runs):
    s = _streams(runs)
    assert s[0]["saved_ranks"] == WORLD
    for r in range(WORLD):
        assert len(s[r]["full"]) == STEPS
        assert _same(s[r]["resumed"], s[r]["full"]), f"rank {r}: the resumed streams differ"
        assert all(torch.equal(a, b) for a, b in zip(s[r]["resumed_params"], s[r]["full_params"]))
        assert not s[r]["resumed_warned"]
    # the ranks draw different t and noise (per-rank seeds), so a rank 0 state restored on rank 1 would show
    assert not torch.equal(s[0]["full"][CUT][0], s[1]["full"][CUT][0])


def test_checkpoint_without_per_rank_states_still_loads(runs):
    """An older checkpoint (rank 0's state only) resumes rank 0 exactly; rank 1 cannot be restored, warns, and
    does not repeat rank 0's draws."""
    s = _streams(runs)
    assert _same(s[0]["old"], s[0]["full"]) and not s[0]["old_warned"]
    assert s[1]["old_warned"]
    assert not torch.equal(s[1]["old"][CUT][0], s[1]["full"][CUT][0])
    assert not torch.equal(s[1]["old"][CUT][0], s[0]["old"][CUT][0])


def test_single_process_checkpoints_are_unchanged():
    """One process: no per-rank entry is added, and gather_rng_states is this process's state alone."""
    tr = _trainer(0, 1, [])
    tr.run(2)
    sd = tr.state_dict()
    assert "rank_rng" not in sd
    (mine,) = tr.gather_rng_states()
    assert torch.equal(mine["generator"], sd["generator"])
