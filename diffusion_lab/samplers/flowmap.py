r"""A learned flow map Psi_theta(x, s, t) (``diffusion_lab.flowmap.FlowMap``) as a sampler: ``method="flow_map"``.

On a grid T = t_0 > t_1 > ... > t_k = t_end of k steps, k network evaluations of Psi (one per step, counted
exactly in ``SampleResult.nfe``)::

    chain (default)      x_{i+1} = Psi(x_i, t_i, t_{i+1}),                         x_k ~ Phi_{T -> t_end}(x_T);
    noise_reinjection    xhat_0 = Psi(x_i, t_i, t_end),  x_{i+1} = alpha_{t_{i+1}} xhat_0 + sigma_{t_{i+1}} z,
                         z ~ N(0, I) fresh (``generator``), returning the last xhat_0

(the second is multistep consistency sampling, Song, Dhariwal, Chen & Sutskever 2023, Algorithm 1; it samples the
law p_{t_end}, not the map of x_T). The chain is the two-time map's sampler (Kim et al. 2024); a consistency model
trained for t = t_min only should use ``noise_reinjection=True`` beyond one step.

The flow map is a companion of the field: ``sample(field, x, "flow_map", steps=k, flow_map=psi)``, or the map alone
``sample(psi, x, "flow_map", steps=k)`` (it knows its schedule). Any map with ``FlowMap``'s call convention works
(``is_flow_map``: psi(x, s, t), ``.schedule``, ``.nfe``), e.g. the MeanFlow and shortcut maps of
``diffusion_lab.meanflow``. The grid is built on the common schedule by every
grid kind of ``time_grid`` (or given as a decreasing list); a flow map only runs from s down to t <= s.
"""
from __future__ import annotations

import torch

from .base import register, step_iter

__all__ = ["flow_map_step_loop", "is_flow_map"]


def is_flow_map(obj) -> bool:
    """A ``flowmap.FlowMap``, or any callable with its call convention: ``obj(x, s, t)`` (one network call, counted
    in ``obj.nfe``) and ``obj.schedule`` (the MeanFlow and shortcut maps of ``diffusion_lab.meanflow``)."""
    from ..field import VelocityField
    from ..flowmap import FlowMap  # lazy: diffusion_lab.flowmap imports this package
    from ..schedules import Schedule

    if isinstance(obj, FlowMap):
        return True
    return (not isinstance(obj, VelocityField) and callable(obj) and isinstance(getattr(obj, "schedule", None), Schedule)
            and isinstance(getattr(obj, "nfe", None), int))


@register("flow_map", family="flow_map", order=float("nan"), stochastic=False, needs="flow_map",
          description="a learned flow map Psi(x, s, t): k network calls for k steps (chain, or multistep "
                      "consistency sampling with noise_reinjection)")
def flow_map_step_loop(field, x, grid, *, flow_map=None, noise_reinjection: bool = False, generator=None,
                       callback=None, progress=False):
    """The k steps of the module docstring on ``grid`` with ``flow_map`` (the FlowMap; default ``field`` itself when
    it is one). ``callback(i, x_i)`` sees the state at grid[i] (for noise_reinjection: the re-noised state, and the
    last xhat_0 at the end)."""
    psi = field if flow_map is None else flow_map
    if not is_flow_map(psi):
        raise TypeError(f"method 'flow_map' needs a FlowMap (flow_map=psi, or psi in place of the field); got "
                        f"{type(psi).__name__}")
    if not isinstance(noise_reinjection, bool):
        raise TypeError(f"noise_reinjection must be True or False, got {noise_reinjection!r}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"a flow map runs from s down to t <= s; the grid must be strictly decreasing, got "
                         f"{grid.tolist()}")
    sch = psi.schedule
    t_end = float(grid[-1])
    n = len(grid) - 1
    with torch.no_grad():
        for i in step_iter(n, progress, "flow map"):
            s, t = float(grid[i]), float(grid[i + 1])
            if not noise_reinjection:
                x = psi(x, s, t)
            else:
                x0 = psi(x, s, t_end)
                if i + 1 < n:
                    tn = grid[i + 1]
                    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                    x = float(sch.alpha(tn)) * x0 + float(sch.sigma(tn)) * z
                else:
                    x = x0
            if callback is not None:
                callback(i + 1, x)
    return x, {"noise_reinjection": noise_reinjection}
