"""One switch for torch's intra-op thread count: ``set_threads(n)`` and the context manager ``threads(n)``.

Small-tensor work (2-D targets, batches of a few thousand, the grid Fokker-Planck solver) runs fastest on one
thread: each operator is microseconds of arithmetic, and waking an OpenMP team costs more than it saves, the more
so when other processes share the CPU. ``benchmarks/threads.py`` measures the ratio. Large networks and images
gain from several threads; the library leaves torch's default until asked.
"""
from __future__ import annotations

from contextlib import contextmanager

__all__ = ["set_threads", "threads"]


def _check(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the thread count must be an integer >= 1, got {n!r}")
    return n


def set_threads(n: int) -> int:
    """Set torch's intra-op thread count (``torch.set_num_threads``) for the whole process.

    Parameters
    ----------
    n : int
        Threads, >= 1. ``1`` is the right choice for 2-D targets and batches of thousands.

    Returns
    -------
    int
        The previous count, so that a caller can restore it.
    """
    import torch

    n = _check(n)
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


@contextmanager
def threads(n: int):
    """Run a block with ``n`` intra-op threads and restore the previous count on exit (also on an exception).

    Parameters
    ----------
    n : int
        Threads inside the block, >= 1.

    Examples
    --------
    >>> import diffusion_lab
    >>> with diffusion_lab.threads(1):
    ...     pass  # small-tensor sampling here
    """
    previous = set_threads(n)
    try:
        yield n
    finally:
        set_threads(previous)
