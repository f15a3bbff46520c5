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
from .meanflow import StepTrainer
from .training import EMA, Objective, learned_field

__all__ = ["Coupling", "couple", "Straightness", "straightness", "one_step", "train_rectified", "RectifiedTrainer",
           "ReflowRound", "reflow", "ReflowTrainer"]


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


class RectifiedTrainer(StepTrainer):
    r"""``train_rectified`` cut at step boundaries (the interface of ``meanflow.StepTrainer``: ``run``,
    ``train_step``, ``state_dict`` / ``load_state_dict``, bitwise continuation): ``train_rectified`` is
    ``RectifiedTrainer(net, coupling, schedule, steps=steps, ...).run(steps)`` followed by ``field()``.

    Each step sets the learning rate of step k (cosine: lr (1 + cos(pi k / K)) / 2 with K = ``steps``, the total
    the trainer was built for; or constant), draws the pair indices and the times t ~ U[t_min, t_max] from the
    trainer's generator, and takes one Adam step on the flow-matching loss of the line (2); then the EMA."""

    def __init__(self, net: nn.Module, coupling: Coupling, schedule: RectifiedFlow, *, steps: int = 3000,
                 batch: int = 256, lr: float = 1e-3, lr_schedule: str = "cosine", ema_decay: float = 0.999,
                 sigma_data: float = 1.0, seed: int = 0, log_every: int = 500):
        if not isinstance(schedule, RectifiedFlow):
            raise ValueError(f"train_rectified needs a RectifiedFlow schedule, got {schedule!r}")
        if (coupling.t_min, coupling.t_max) != (schedule.t_min, schedule.t_max):
            raise ValueError(f"the coupling's times ({coupling.t_min}, {coupling.t_max}) differ from the schedule's "
                             f"({schedule.t_min}, {schedule.t_max})")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        for name, v in (("steps", steps), ("batch", batch), ("log_every", log_every)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.net, self.coupling, self.schedule = net, coupling, schedule
        self.total_steps, self.batch, self.lr, self.lr_schedule = int(steps), int(batch), lr, lr_schedule
        self.ema_decay, self.sigma_data = ema_decay, sigma_data
        self.objective = Objective(schedule, prediction="velocity", sigma_data=sigma_data)
        dtype = next(net.parameters()).dtype
        self.X0, self.X1 = (e.to(dtype) for e in coupling.endpoints())
        self._init_loop(seed, log_every)
        self.opt = torch.optim.Adam(net.parameters(), lr=lr)
        self.ema = EMA(net, ema_decay, warmup=True)

    def train_step(self) -> float:
        sch, batch, gen = self.schedule, self.batch, self.generator
        if self.step >= self.total_steps:
            raise ValueError(f"a rectified-flow run built for {self.total_steps} steps (its learning-rate schedule) "
                             f"cannot run past them")
        if self.lr_schedule == "cosine":
            for g in self.opt.param_groups:
                g["lr"] = 0.5 * self.lr * (1.0 + math.cos(math.pi * self.step / self.total_steps))
        idx = torch.randint(0, self.X0.shape[0], (batch,), generator=gen)
        t = sch.t_min + (sch.t_max - sch.t_min) * torch.rand(batch, generator=gen, dtype=torch.float64)
        loss = self.objective.per_sample(self.net, self.X0[idx], t=t, eps=self.X1[idx]).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.net)
        return float(loss.detach())

    def field(self) -> VelocityField:
        """The ``VelocityField`` of the EMA network (``training.learned_field``, prediction "velocity")."""
        self.ema.module.eval()
        return learned_field(self.ema.module, self.schedule, "velocity", sigma_data=self.sigma_data)

    def settings(self) -> dict:
        return {"method": "rectified", "steps": self.step, "total_steps": self.total_steps, "batch": self.batch,
                "lr": self.lr, "lr_schedule": self.lr_schedule, "ema_decay": self.ema_decay,
                "sigma_data": self.sigma_data, "seed": self.seed}


def train_rectified(net: nn.Module, coupling: Coupling, schedule: RectifiedFlow, *, steps: int = 3000,
                    batch: int = 256, lr: float = 1e-3, lr_schedule: str = "cosine", ema_decay: float = 0.999,
                    sigma_data: float = 1.0, seed: int = 0, log_every: int = 500):
    r"""Fit a velocity network to the straight interpolation (2) of ``coupling`` (Liu et al. 2023, eq. 1):

        min_theta E_{t ~ U[t_min, t_max], (x, z)} || (X_1 - X_0) - v_theta(x_t, t) ||^2,

    through ``training.Objective(schedule, prediction="velocity")`` with data X_0 and noise X_1 (the extrapolated
    endpoints), so x_t = (1 - t) X_0 + t X_1 is the line through (t_min, x) and (t_max, z). Adam with cosine
    decay of the learning rate to 0 (``lr_schedule="constant"`` keeps it), an EMA of the weights (decay
    ``ema_decay``). The loop is ``RectifiedTrainer`` (resumable).

    Returns (field, history): the ``VelocityField`` of the EMA network (``training.learned_field``) and the
    loss history [(step, loss)].
    """
    run = RectifiedTrainer(net, coupling, schedule, steps=steps, batch=batch, lr=lr, lr_schedule=lr_schedule,
                           ema_decay=ema_decay, sigma_data=sigma_data, seed=seed, log_every=log_every)
    run.run(steps)
    return run.field(), run.history


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


class ReflowTrainer:
    r"""Reflow rounds cut at step boundaries, for runs that are checkpointed and resumed (``diffusion-lab distill
    --method reflow``): ``rounds`` rounds of ``steps_per_round`` steps on one step counter, with the interface of
    ``flowmap.ConsistencyTrainer`` (``run(steps, on_log=, ckpt_every=, on_checkpoint=)``, ``state_dict`` /
    ``load_state_dict``; a run continued from any step's state is bitwise the uninterrupted one).

    Round k = 1, 2, ... starts at step (k - 1) S, S = ``steps_per_round``: it couples the noise samples ``z`` with
    x = Phi^{k-1}(z) (``couple``, RK4 with ``couple_steps`` steps; round 1 from ``field``, round k > 1 from round
    k - 1's EMA field), builds ``make_net()`` with torch's global generator seeded ``seed + k`` inside
    ``torch.random.fork_rng`` (so the initialisation neither depends on nor changes the caller's random state), and
    trains it with a ``RectifiedTrainer`` (seed ``seed + k``, the learning-rate schedule over S steps). The state
    holds the current round's coupling x (z is checked against it), its trainer and the log; the earlier rounds'
    networks are not kept (``reflow`` keeps every round). ``teacher_calls`` counts the batch calls of ``field``
    (round 1's coupling, of ``z.shape[0]`` samples each), ``coupling_calls`` those of the learned rounds' fields.
    """

    resumable = True

    def __init__(self, field: VelocityField, z: torch.Tensor, make_net, *, rounds: int = 1,
                 steps_per_round: int = 3000, batch: int = 256, lr: float = 1e-3, lr_schedule: str = "cosine",
                 ema_decay: float = 0.999, sigma_data: float = 1.0, seed: int = 0, couple_steps: int = 64,
                 log_every: int = 100):
        _check_rf(field)
        if not callable(make_net):
            raise TypeError(f"make_net must be a callable returning an nn.Module, got {type(make_net).__name__}")
        for name, v in (("rounds", rounds), ("steps_per_round", steps_per_round), ("batch", batch),
                        ("couple_steps", couple_steps), ("log_every", log_every)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        self.teacher, self.z, self.make_net = field, z.detach().to(torch.float64), make_net
        self.rounds, self.steps_per_round, self.batch, self.lr = int(rounds), int(steps_per_round), int(batch), lr
        self.lr_schedule, self.ema_decay, self.sigma_data, self.seed = lr_schedule, ema_decay, sigma_data, int(seed)
        self.couple_steps, self.log_every = int(couple_steps), int(log_every)
        self.schedule = field.schedule
        self.total_steps = self.rounds * self.steps_per_round
        self.resolved = {"rounds": self.rounds, "steps_per_round": self.steps_per_round, "couple_steps":
                         self.couple_steps, "lr_schedule": lr_schedule, "couple_solver": "rk4"}
        self.step, self.round, self.history, self.acc, self.acc_n = 0, 0, [], 0.0, 0
        self.teacher_calls, self.coupling_calls = 0, 0
        self.coupling, self.trainer = None, None

    @property
    def net(self) -> nn.Module | None:
        """The network of the current round (None before the first step)."""
        return self.trainer.net if self.trainer is not None else None

    @property
    def teacher_evals(self) -> int:
        """Per-sample evaluations of ``field``: its batch calls times the number of coupled samples."""
        return self.teacher_calls * int(self.z.shape[0])

    def _new_trainer(self, k: int) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + k)
            net = self.make_net()
        if not isinstance(net, nn.Module):
            raise TypeError(f"make_net() must return an nn.Module, got {type(net).__name__}")
        self.trainer = RectifiedTrainer(net, self.coupling, self.schedule, steps=self.steps_per_round,
                                        batch=self.batch, lr=self.lr, lr_schedule=self.lr_schedule,
                                        ema_decay=self.ema_decay, sigma_data=self.sigma_data, seed=self.seed + k,
                                        log_every=self.steps_per_round)
        self.round = k

    def _start_round(self, k: int) -> None:
        prev = self.teacher if k == 1 else self.trainer.field()
        self.coupling = couple(prev, self.z, steps=self.couple_steps)
        if k == 1:
            self.teacher_calls += self.coupling.nfe
        else:
            self.coupling_calls += self.coupling.nfe
        self._new_trainer(k)

    def run(self, steps: int, *, on_log=None, ckpt_every: int = 0, on_checkpoint=None) -> None:
        """Train from ``self.step`` to ``steps`` <= rounds x steps_per_round: ``on_log(record)`` (record = {"step",
        "loss" (mean since the previous record), "round"}) every ``log_every`` steps and at the last,
        ``on_checkpoint(self)`` every ``ckpt_every`` steps before the last. The last record of a call off the log
        grid is replaced by the next grid record when the run continues (as in ``meanflow.StepTrainer.run``)."""
        if int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if steps > self.total_steps:
            raise ValueError(f"a reflow run of {self.rounds} round(s) x {self.steps_per_round} steps cannot run to "
                             f"step {steps}")
        if self.step < steps and self.history and self.history[-1]["step"] == self.step \
                and self.step % self.log_every:
            self.history.pop()  # the previous call's end, off the log grid: the next record covers its steps
        try:
            while self.step < steps:
                if self.trainer is None or self.trainer.step == self.steps_per_round:
                    self._start_round(self.round + 1)
                tr = self.trainer
                tr.net.train()
                loss = tr.train_step()
                tr.step += 1
                self.step += 1
                self.acc, self.acc_n = self.acc + loss, self.acc_n + 1
                if self.step % self.log_every == 0 or self.step == steps:
                    rec = {"step": self.step, "loss": self.acc / self.acc_n, "round": self.round}
                    self.history.append(rec)
                    if self.step % self.log_every == 0:  # off the grid: the sums continue
                        self.acc, self.acc_n = 0.0, 0
                    if on_log is not None:
                        on_log(rec)
                if ckpt_every and self.step % ckpt_every == 0 and self.step < steps and on_checkpoint is not None:
                    on_checkpoint(self)
        finally:
            if self.trainer is not None:
                self.trainer.net.eval()

    def field(self) -> VelocityField:
        """The current round's EMA field (a ``prediction="velocity"`` model of ``RectifiedFlow``)."""
        if self.trainer is None:
            raise ValueError("no reflow round has been trained yet (run first)")
        return self.trainer.field()

    def settings(self) -> dict:
        return {"method": "reflow", "steps": self.step, "rounds": self.rounds, "steps_per_round":
                self.steps_per_round, "batch": self.batch, "lr": self.lr, "lr_schedule": self.lr_schedule,
                "ema_decay": self.ema_decay, "sigma_data": self.sigma_data, "seed": self.seed,
                "couple_steps": self.couple_steps, "n_pairs": int(self.z.shape[0])}

    def state_dict(self) -> dict:
        """Tensors and plain containers only (loadable with ``torch.load(weights_only=True)``)."""
        from .training import rng_state

        return {"step": self.step, "round": self.round, "z": self.z,
                "coupling_x": self.coupling.x if self.coupling is not None else None,
                "coupling_nfe": self.coupling.nfe if self.coupling is not None else 0,
                "trainer": self.trainer.state_dict() if self.trainer is not None else None, "rng": rng_state(),
                "history": [dict(r) for r in self.history], "acc": self.acc, "acc_n": self.acc_n,
                "teacher_calls": self.teacher_calls, "coupling_calls": self.coupling_calls}

    def load_state_dict(self, sd: dict) -> None:
        from .training import set_rng_state

        if sd["z"].shape != self.z.shape or not torch.equal(sd["z"], self.z):
            raise ValueError("the state was saved for other noise samples z than this trainer's")
        k = int(sd["round"])
        if k > self.rounds:
            raise ValueError(f"the state is in round {k}, beyond this trainer's {self.rounds} round(s)")
        if k:
            sch = self.schedule
            self.coupling = Coupling(x=sd["coupling_x"], z=self.z, t_min=sch.t_min, t_max=sch.t_max,
                                     nfe=int(sd["coupling_nfe"]))
            self._new_trainer(k)
            self.trainer.load_state_dict(sd["trainer"])
        else:
            self.coupling, self.trainer, self.round = None, None, 0
        set_rng_state(sd["rng"])
        self.step, self.history = int(sd["step"]), [dict(r) for r in sd["history"]]
        self.acc, self.acc_n = float(sd["acc"]), int(sd["acc_n"])
        self.teacher_calls, self.coupling_calls = int(sd["teacher_calls"]), int(sd["coupling_calls"])
