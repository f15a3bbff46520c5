r"""Sampling on several processes (torch.distributed, launched by torchrun) with results that do not depend on
how many processes there are.

The reference DiT sampling script (Peebles & Xie 2023, facebookresearch/DiT ``sample_ddp.py``) gives rank r the
seed ``seed * world_size + r``, so its samples change with the number of GPUs. Here every random number is tied
to the sample or the batch it belongs to instead:

* sample i (0-based, over the whole run) starts from its own noise

  .. math:: x_i = \sigma(t_{\max})\, z_i, \qquad z_i \sim N(0, I),

  z_i drawn from a generator seeded s(seed, 0, i), so the start of sample i depends on (seed, i) only;
* the samples are cut into batches of a fixed size B, batch b = samples [bB, (b+1)B); the sampler's own noise in
  batch b (stochastic methods: DDIM with eta > 0, SDE solvers) comes from a generator seeded s(seed, 1, b);
* process r of W runs the batches b with b mod W = r, and rank 0 gathers them back in batch order.

Every batch is the same computation (same inputs, same shapes, same generator) whatever W is, so a run on W
processes gives bitwise the samples of a single-process run with the same seed and B, on the same hardware.
The seeds s(seed, stream, index) come from numpy's ``SeedSequence(seed, spawn_key=(stream, index))`` (O'Neill's
seed-sequence hashing), which keeps nearby (seed, index) pairs statistically independent.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

__all__ = ["NOISE_STREAM", "SAMPLER_STREAM", "derived_seed", "initial_noise", "batch_bounds", "rank_batches",
           "world", "gather_batches"]

NOISE_STREAM = 0    # stream of the start noise z_i of sample i
SAMPLER_STREAM = 1  # stream of a stochastic sampler's noise in batch b


def derived_seed(seed: int, stream: int, index: int) -> int:
    """The 64-bit seed s(seed, stream, index) of one sample's or one batch's generator.

    Parameters
    ----------
    seed : int
        The run's seed (any integer; negative ones are taken modulo 2^64).
    stream : int
        ``NOISE_STREAM`` (start noise of sample ``index``) or ``SAMPLER_STREAM`` (sampler noise of batch ``index``).
    index : int
        The sample or batch index, >= 0.

    Returns
    -------
    int
        ``SeedSequence(seed mod 2^64, spawn_key=(stream, index)).generate_state(1, uint64)[0]``.
    """
    if int(stream) < 0 or int(index) < 0:
        raise ValueError(f"stream and index must be >= 0, got stream={stream}, index={index}")
    ss = np.random.SeedSequence(int(seed) % 2**64, spawn_key=(int(stream), int(index)))
    return int(ss.generate_state(1, dtype=np.uint64)[0])


def initial_noise(seed: int, start: int, stop: int, shape, sigma: float = 1.0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    r"""The start noise of samples start..stop-1: row i is :math:`\sigma z_i` with z_i ~ N(0, I) of ``shape`` drawn
    on the CPU from a generator seeded ``derived_seed(seed, NOISE_STREAM, i)``.

    Parameters
    ----------
    seed : int
    start, stop : int
        Sample indices, 0 <= start <= stop.
    shape : tuple of int
        The shape of one sample.
    sigma : float
        sigma(t_max) of the schedule (the start law N(0, sigma^2 I)).
    dtype : torch.dtype

    Returns
    -------
    torch.Tensor
        (stop - start, *shape) on the CPU.
    """
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start={start}, stop={stop}")
    shape = tuple(int(s) for s in shape)
    out = torch.empty((stop - start, *shape), dtype=dtype)
    for j, i in enumerate(range(start, stop)):
        g = torch.Generator().manual_seed(derived_seed(seed, NOISE_STREAM, i))
        out[j] = torch.randn(shape, generator=g, dtype=dtype)
    return out * sigma


def batch_bounds(n: int, batch: int) -> list[tuple[int, int]]:
    """[(0, B), (B, 2B), ..., (.., n)]: the batches of n samples in batches of B (the last one may be shorter)."""
    if n < 1 or batch < 1:
        raise ValueError(f"n and batch must be >= 1, got n={n}, batch={batch}")
    return [(s, min(s + batch, n)) for s in range(0, n, batch)]


def rank_batches(n_batches: int, rank: int, world_size: int) -> list[int]:
    """The batches process ``rank`` of ``world_size`` runs: b = rank, rank + W, rank + 2W, ..."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n_batches, world_size))


def world() -> tuple[int, int]:
    """(rank, world_size) of the current process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_batches(n_batches: int, run_batch: Callable[[int], object]) -> list | None:
    """Run this process's batches (``rank_batches``) and gather every batch's result on rank 0, in batch order.

    Batches go in rounds: in round k process r runs batch k W + r and all processes then gather to rank 0
    (``torch.distributed.gather_object``; a process without a batch in the last round sends None), so rank 0
    holds at most one round of results from the others at a time besides its output list. Without a process
    group this is ``[run_batch(b) for b in range(n_batches)]``.

    Parameters
    ----------
    n_batches : int
    run_batch : callable
        ``run_batch(b)`` -> a picklable result (CPU tensors, numpy arrays, numbers).

    Returns
    -------
    list or None
        The n_batches results on rank 0, None on the other ranks.
    """
    rank, size = world()
    if size == 1:
        return [run_batch(b) for b in range(n_batches)]
    import torch.distributed as dist

    out = [] if rank == 0 else None
    for k in range(-(-n_batches // size)):
        b = k * size + rank
        mine = run_batch(b) if b < n_batches else None
        got = [None] * size if rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        if rank == 0:
            out.extend(got[: min(size, n_batches - k * size)])
    return out
