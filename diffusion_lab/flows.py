r"""Flow maps of the PF-ODE: inversion (data -> prior -> data), exact maps, the semigroup, and consistency-style
parameterisations (consistency models, Song et al. 2023).

- ``encode`` / ``decode`` / ``reconstruction``: run a deterministic sampler on an increasing grid (t_min -> t_max:
  DDIM inversion with method="ddim", an accurate one with "adaptive") and back.
- ``flow_map``: Phi_{s->t}(x) for any two times, by the reference solver (``reference.flow_map``, rtol 1e-10).
- ``gaussian_flow_map``: the closed form for N(mu, Sigma) data, Phi_{s->t}(x) = alpha_t mu + C_t^{1/2} C_s^{-1/2}
  (x - alpha_s mu) with C = alpha^2 Sigma + sigma^2 I (the matrices commute, so this is the symmetric
  positive-definite -- optimal-transport -- map).
- ``consistency_parameterisation``: f(x, t) = c_skip(t) x + c_out(t) F(x, t) with c_skip = sigma_d^2/((t - eps)^2 +
  sigma_d^2), c_out = sigma_d (t - eps)/sqrt(sigma_d^2 + t^2), so f(x, eps) = x for any F (Song et al. 2023, Sec. 3).
"""
from __future__ import annotations

from typing import Callable

import torch

from . import reference
from .field import VelocityField
from .metrics import sqrtm_psd
from .samplers import sample, time_grid
from .targets import Gaussian

__all__ = ["encode", "decode", "reconstruction", "flow_map", "gaussian_flow_map", "semigroup_defect",
           "consistency_parameterisation"]


def _grid(field, steps, grid_kind, method):
    if method == "adaptive":
        return torch.tensor([field.schedule.t_max, field.schedule.t_min], dtype=torch.float64)
    return time_grid(field.schedule, steps, grid_kind)


def encode(field: VelocityField, x0: torch.Tensor, method: str = "ddim", steps: int = 50, grid_kind: str = "logsnr",
           **options):
    """x(t_min) -> x(t_max) along the PF-ODE with a deterministic ``method`` on the reversed grid (SampleResult)."""
    return sample(field, x0, method, grid=_grid(field, steps, grid_kind, method).flip(0), **options)


def decode(field: VelocityField, z: torch.Tensor, method: str = "ddim", steps: int = 50, grid_kind: str = "logsnr",
           **options):
    """x(t_max) -> x(t_min) with the same method and grid as ``encode`` (SampleResult)."""
    return sample(field, z, method, grid=_grid(field, steps, grid_kind, method), **options)


def reconstruction(field: VelocityField, x0: torch.Tensor, method: str = "ddim", steps: int = 50,
                   grid_kind: str = "logsnr", **options) -> dict:
    """Encode then decode; returns the latent, the reconstruction, mean/max ||x - x_rec|| and the total NFE."""
    z = encode(field, x0, method, steps, grid_kind, **options)
    back = decode(field, z.x, method, steps, grid_kind, **options)
    err = (back.x - x0).reshape(x0.shape[0], -1).norm(dim=1)
    return {"latent": z.x, "x": back.x, "mean_error": float(err.mean()), "max_error": float(err.max()),
            "nfe": z.nfe + back.nfe}


def flow_map(field: VelocityField, x: torch.Tensor, s: float, t: float, rtol: float = 1e-10) -> torch.Tensor:
    """Phi_{s->t}(x) by the reference DOP853 solve (either direction); Phi_{s->s} = id."""
    if s == t:
        return x.clone()
    return reference.flow_map(field, x, s, t, rtol=rtol)[0]


def gaussian_flow_map(target: Gaussian, schedule, x: torch.Tensor, s: float, t: float) -> torch.Tensor:
    """Closed-form Phi_{s->t}(x) = alpha_t mu + C_t^{1/2} C_s^{-1/2} (x - alpha_s mu) for Gaussian data."""
    ps, pt = target.marginal(schedule, s), target.marginal(schedule, t)
    M = sqrtm_psd(pt.cov) @ torch.linalg.inv(sqrtm_psd(ps.cov))
    return pt.mu + (x.to(torch.float64) - ps.mu) @ M.T


def semigroup_defect(phi: Callable, x: torch.Tensor, s: float, u: float, t: float) -> float:
    """max ||Phi_{u->t}(Phi_{s->u}(x)) - Phi_{s->t}(x)|| for a flow-map approximation ``phi(x, s, t)``."""
    return float((phi(phi(x, s, u), u, t) - phi(x, s, t)).reshape(x.shape[0], -1).norm(dim=1).max())


def consistency_parameterisation(F: Callable, eps: float, sigma_data: float = 0.5) -> Callable:
    """f(x, t) = c_skip(t) x + c_out(t) F(x, t); f(x, eps) = x exactly for every F (Song et al. 2023, Sec. 3)."""
    if not (eps >= 0 and sigma_data > 0):
        raise ValueError(f"need eps >= 0 and sigma_data > 0, got eps={eps}, sigma_data={sigma_data}")

    def f(x, t):
        t = torch.as_tensor(t, dtype=x.dtype)
        tt = t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t
        c_skip = sigma_data**2 / ((tt - eps) ** 2 + sigma_data**2)
        c_out = sigma_data * (tt - eps) / torch.sqrt(sigma_data**2 + tt**2)
        return c_skip * x + c_out * F(x, t)

    return f
