"""Two gloo processes on the CPU (torch.multiprocessing spawn, one start for all checks):

* ``diffusion-lab sample`` on 2 ranks writes bitwise the samples of a single-process run with the same seed (a
  package checkpoint with a stochastic sampler and CFG, and a reference-layout DiT), with a sample count that
  does not fill the last round of batches;
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


def _worker(rank, world, tmp, port, sample_args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    T.init_distributed("gloo")
    try:
        for name, argv in sample_args.items():
            assert main([*argv, "--out", os.path.join(tmp, name + "_ddp"), "--device", "cpu"]) == 0
        torch.save(_train_streams(rank, world, tmp), os.path.join(tmp, f"streams{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    assert main(["train", "--data", "ring8", "--conditional", "--steps", "2", "--batch", "64", "--n-train", "256",
                 "--hidden", "16", "--depth", "1", "--eval-n", "0", "--no-plot", "--log-every", "2",
                 "--out", str(tmp / "train")]) == 0
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
