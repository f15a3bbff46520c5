r"""Reflow / rectified flow (Liu, Gong & Liu 2023, "Flow Straight and Fast").

Time runs from data (t_min) to noise (t_max) on the rectified-flow schedule (``schedules.RectifiedFlow``,
x_t = (1 - t) x_0 + t z, velocity target z - x_0). Given a coupling (X_0, X_1), the rectified flow is the ODE

    dZ_t/dt = v^X(Z_t, t),   v^X(x, t) = E[X_1 - X_0 | X_t = x],   X_t = (1 - t) X_0 + t X_1,          (1)

the minimiser of E int ||(X_1 - X_0) - v(X_t, t)||^2 dt. Its flow keeps the marginals of the interpolation,
Law(Z_t) = Law(X_t) for every t (Liu et al. 2023, Theorem 3.3), and the coupling (Z_0, Z_1) it induces does not
increase any convex transport cost, E c(Z_1 - Z_0) <= E c(X_1 - X_0) (Theorem 3.5). Reflow repeats this: the
k-th coupling is (Phi^{k-1}(z), z) with Phi^{k-1} the previous flow's map from noise to data, and each round
straightens the flow.

Round 0 here is a given field (an exact target's field on ``RectifiedFlow``: the rectified flow of the independent
coupling, the paper's 1-rectified flow), so round k >= 1 is the paper's (k+1)-rectified flow. The coupling's
endpoints are x at t_min and z at t_max; the straight line through them,

    x_t = x + (t - t_min)/(t_max - t_min) (z - x) = (1 - t) X_0 + t X_1,                                (2)

is the schedule's interpolation of the extrapolated endpoints X_0 = x - t_min (z - x)/(t_max - t_min),
X_1 = z + (1 - t_max)(z - x)/(t_max - t_min), with velocity X_1 - X_0 = (z - x)/(t_max - t_min). A network trained
on (2) is a ``prediction="velocity"`` model of ``RectifiedFlow``, so its ``VelocityField`` runs in every sampler.

Measured per round:

- straightness S = int_{t_min}^{t_max} E ||(z - x)/(t_max - t_min) - v(Z_t, t)||^2 dt along the flow's own
  trajectories Z_t (Liu et al. 2023, Definition 3.6; 0 iff the trajectories are straight lines at constant speed);
- the transport cost E ||z - x||^2 of the coupling (x = Phi(z));
- one-step (Euler) sampling x_hat = z - (t_max - t_min) v(z, t_max) against the round's own map Phi(z).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field

import torch
from torch import nn

from ._tensor import bcast
from .field import VelocityField
from .reference import flow_map
from .schedules import RectifiedFlow
from .training import EMA, Objective, learned_field

__all__ = ["Coupling", "couple", "Straightness", "straightness", "one_step", "train_rectified", "ReflowRound",
           "reflow"]


@dataclass
class Coupling:
    """A coupling (x, z): x at ``t_min`` (data side), z at ``t_max`` (noise side), built with ``nfe`` batch calls of
    the field that coupled them."""

    x: torch.Tensor
    z: torch.Tensor
    t_min: float
    t_max: float
    nfe: int = 0

    @property
    def velocity(self) -> torch.Tensor:
        """The constant velocity of the straight line (2): (z - x)/(t_max - t_min) = X_1 - X_0."""
        return (self.z - self.x) / (self.t_max - self.t_min)

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X_0, X_1): the line (2) at t = 0 and t = 1, so that x_t = (1 - t) X_0 + t X_1."""
        v = self.velocity
        return self.x - self.t_min * v, self.z + (1.0 - self.t_max) * v

    def interpolate(self, t) -> torch.Tensor:
        """x_t = x + (t - t_min) (z - x)/(t_max - t_min); t a scalar or a (batch,) tensor."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.x + bcast(t - self.t_min, self.x).to(self.x.dtype) * self.velocity

    def cost(self) -> float:
        """The quadratic transport cost E ||z - x||^2 (mean over the pairs)."""
        return float((self.z - self.x).double().pow(2).reshape(self.x.shape[0], -1).sum(1).mean())


def _check_rf(field: VelocityField):
    if not isinstance(field, VelocityField):
        raise TypeError(f"field must be a VelocityField, got {type(field).__name__}")
    if not isinstance(field.schedule, RectifiedFlow):
        raise ValueError(f"reflow works on the rectified-flow schedule (schedules.RectifiedFlow), got "
                         f"{field.schedule!r}")


def couple(field: VelocityField, z: torch.Tensor, *, solver: str = "rk4", steps: int = 64, rtol: float = 1e-7,
           atol: float = 1e-9) -> Coupling:
    r"""The coupling (Phi(z), z) of ``field``'s flow: z at t_max is carried to x = Phi_{t_max -> t_min}(z) in float64.

    ``solver="rk4"``: classical RK4 on a uniform t-grid of ``steps`` steps (4 steps batch calls; error O(h^4)),
    the default, since a float32 network's round-off makes an adaptive solver shrink its steps without gaining
    accuracy. ``solver="dop853"``: ``reference.flow_map`` (DOP853 in the time variable, rtol per sample), for exact
    fields. ``Coupling.nfe`` counts the field's batch calls.
    """
    _check_rf(field)
    if solver not in ("rk4", "dop853"):
        raise ValueError(f"solver must be 'rk4' or 'dop853', got {solver!r}")
    sch = field.schedule
    z64 = z.detach().to(torch.float64)
    if solver == "dop853":
        x, nfe = flow_map(field, z64, sch.t_max, sch.t_min, rtol=rtol, atol=atol, coords="t")
    else:
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        nfe0 = field.nfe
        x = _rk4(field, z64, torch.linspace(sch.t_max, sch.t_min, int(steps) + 1, dtype=torch.float64))[0]
        nfe = field.nfe - nfe0
    return Coupling(x=x, z=z64, t_min=sch.t_min, t_max=sch.t_max, nfe=nfe)


def _rk4(field, x, ts):
    """Classical RK4 along the grid ts; returns (x at ts[-1], [v(x_{t_i}, t_i) for the nodes before the last])."""
    vs = []
    for i in range(len(ts) - 1):
        t, h = ts[i], ts[i + 1] - ts[i]
        k1 = field.velocity(x, t)
        vs.append(k1)
        k2 = field.velocity(x + 0.5 * h * k1, t + 0.5 * h)
        k3 = field.velocity(x + 0.5 * h * k2, t + 0.5 * h)
        k4 = field.velocity(x + h * k3, ts[i + 1])
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x, vs


@dataclass
class Straightness:
    """``S`` (straightness), ``cost`` (E||z - x||^2 of the coupling the path ends in), ``x`` = the path's end at
    t_min, ``nfe`` (batch calls), ``steps`` (RK4 steps on a uniform t-grid)."""

    S: float
    cost: float
    x: torch.Tensor
    nfe: int
    steps: int


def straightness(field: VelocityField, z: torch.Tensor, steps: int = 64) -> Straightness:
    r"""Straightness S = int_{t_min}^{t_max} E ||(z - x)/(t_max - t_min) - v(Z_t, t)||^2 dt of the flow from z
    (Liu et al. 2023, Definition 3.6, on [t_min, t_max]).

    The path Z_t is integrated by classical RK4 on a uniform grid of ``steps`` (even) steps from t_max down to
    t_min, in float64; v(Z_{t_i}, t_i) is the first RK4 stage at each node (and one more call at t_min), and the
    integral is Simpson's rule on the nodes: error O(h^4) for a smooth field. Cost: 4 steps + 1 batch calls.
    """
    _check_rf(field)
    if int(steps) != steps or steps < 2 or steps % 2:
        raise ValueError(f"steps must be an even integer >= 2 (Simpson's rule), got {steps!r}")
    sch = field.schedule
    nfe0 = field.nfe
    ts = torch.linspace(sch.t_max, sch.t_min, int(steps) + 1, dtype=torch.float64)
    x, vs = _rk4(field, z.detach().to(torch.float64), ts)
    vs.append(field.velocity(x, ts[-1]))
    slope = (z.to(torch.float64) - x) / (sch.t_max - sch.t_min)
    dev = torch.stack([(slope - v).pow(2).reshape(x.shape[0], -1).sum(1).mean() for v in vs])
    w = torch.ones(int(steps) + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    S = float((w * dev).sum()) * (sch.t_max - sch.t_min) / (3.0 * steps)
    cost = float((z.to(torch.float64) - x).pow(2).reshape(x.shape[0], -1).sum(1).mean())
    return Straightness(S=S, cost=cost, x=x, nfe=field.nfe - nfe0, steps=int(steps))


def one_step(field: VelocityField, z: torch.Tensor) -> torch.Tensor:
    """One Euler step from t_max to t_min: x_hat = z - (t_max - t_min) v(z, t_max) (one batch call)."""
    _check_rf(field)
    sch = field.schedule
    return z - (sch.t_max - sch.t_min) * field.velocity(z, sch.t_max)


def train_rectified(net: nn.Module, coupling: Coupling, schedule: RectifiedFlow, *, steps: int = 3000,
                    batch: int = 256, lr: float = 1e-3, lr_schedule: str = "cosine", ema_decay: float = 0.999,
                    sigma_data: float = 1.0, seed: int = 0, log_every: int = 500):
    r"""Fit a velocity network to the straight interpolation (2) of ``coupling`` (Liu et al. 2023, eq. 1):

        min_theta E_{t ~ U[t_min, t_max], (x, z)} || (X_1 - X_0) - v_theta(x_t, t) ||^2,

    through ``training.Objective(schedule, prediction="velocity")`` with data X_0 and noise X_1 (the extrapolated
    endpoints), so x_t = (1 - t) X_0 + t X_1 is the line through (t_min, x) and (t_max, z). Adam with cosine
    decay of the learning rate to 0 (``lr_schedule="constant"`` keeps it), an EMA of the weights (decay
    ``ema_decay``).

    Returns (field, history): the ``VelocityField`` of the EMA network (``training.learned_field``) and the
    loss history [(step, loss)].
    """
    if not isinstance(schedule, RectifiedFlow):
        raise ValueError(f"train_rectified needs a RectifiedFlow schedule, got {schedule!r}")
    if (coupling.t_min, coupling.t_max) != (schedule.t_min, schedule.t_max):
        raise ValueError(f"the coupling's times ({coupling.t_min}, {coupling.t_max}) differ from the schedule's "
                         f"({schedule.t_min}, {schedule.t_max})")
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    for name, v in (("steps", steps), ("batch", batch)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    obj = Objective(schedule, prediction="velocity", sigma_data=sigma_data)
    dtype = next(net.parameters()).dtype
    X0, X1 = (e.to(dtype) for e in coupling.endpoints())
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    ema = EMA(net, ema_decay, warmup=True)
    history, acc, acc_n = [], 0.0, 0
    net.train()
    for step in range(int(steps)):
        if lr_schedule == "cosine":
            for g in opt.param_groups:
                g["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))
        idx = torch.randint(0, X0.shape[0], (batch,), generator=gen)
        t = schedule.t_min + (schedule.t_max - schedule.t_min) * torch.rand(batch, generator=gen,
                                                                            dtype=torch.float64)
        loss = obj.per_sample(net, X0[idx], t=t, eps=X1[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net)
        acc, acc_n = acc + float(loss.detach()), acc_n + 1
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": acc / acc_n})
            acc, acc_n = 0.0, 0
    net.eval()
    ema.module.eval()
    return learned_field(ema.module, schedule, "velocity", sigma_data=sigma_data), history


@dataclass
class ReflowRound:
    """Round k of reflow: ``field`` (round 0: the given field), the ``coupling`` it was trained on (None for
    round 0), the training ``history`` and the coupling's cost in batch calls of the previous field
    (``coupling.nfe``)."""

    k: int
    field: VelocityField
    coupling: Coupling | None = None
    history: list = dc_field(default_factory=list)


def reflow(field: VelocityField, z: torch.Tensor, rounds: int, make_net, *, steps: int = 3000, batch: int = 256,
           lr: float = 1e-3, ema_decay: float = 0.999, sigma_data: float = 1.0, seed: int = 0,
           couple_steps: int = 64) -> list[ReflowRound]:
    r"""``rounds`` rounds of reflow starting from ``field`` (round 0): round k couples the noise samples ``z``
    (samples of p_{t_max}) with x = Phi^{k-1}(z) (``couple``) and fits ``make_net()`` to the straight
    interpolation of (x, z) (``train_rectified``; seed ``seed + k``). The coupling uses RK4 with ``couple_steps``
    steps. Returns [round 0, ..., round ``rounds``].
    """
    _check_rf(field)
    if int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
    out = [ReflowRound(0, field)]
    for k in range(1, int(rounds) + 1):
        c = couple(out[-1].field, z, steps=couple_steps)
        net = make_net()
        f, hist = train_rectified(net, c, field.schedule, steps=steps, batch=batch, lr=lr, ema_decay=ema_decay,
                                  sigma_data=sigma_data, seed=seed + k)
        out.append(ReflowRound(k, f, c, hist))
    return out
