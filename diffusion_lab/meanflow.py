r"""Flow maps trained from one network's own derivatives or self-consistency: MeanFlow and shortcut models.

Both learn an *average velocity* over an interval and turn it into a flow map Psi(x, s, t) ~ Phi_{s->t}(x) for
s >= t (time runs from data at t_min to noise at t_max, as everywhere in the package), with the call convention of
``flowmap.FlowMap`` (``forward(x, s, t)``, ``.schedule``, ``.nfe``), so ``flowmap.flow_map_sample`` samples with
them unchanged.

MeanFlow (Geng, Deng, Bai, Kolter & He 2025). Along the PF-ODE path z_tau, the average velocity over [r, t], r <= t,

    u(z_t, r, t) = (t - r)^{-1} int_r^t v(z_tau, tau) d tau,   so   z_r = z_t - (t - r) u(z_t, r, t).      (1)

Differentiating (t - r) u = int_r^t v d tau in t with r fixed gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v . grad_z u + d_t u,                   (2)

the total derivative along the path, i.e. the Jacobian-vector product of u along the tangent (v, 0, 1) in
(z, r, t). Training regresses u_theta onto the right side of (2) with u_theta in place of u and a stop-gradient:

    L = E w || u_theta(z_t, r, t) - sg[v - (t - r) (v . grad_z u_theta + d_t u_theta)] ||^2,

with z_t = alpha_t x_0 + sigma_t eps and v the conditional velocity alpha'_t x_0 + sigma'_t eps (data alone, the
paper's setting; alpha = 1 - t, sigma = t on ``RectifiedFlow``) or a teacher field's velocity v(z_t, t) (MeanFlow
distillation). One ``torch.func.jvp`` gives u_theta and d/dt u_theta together (``meanflow_target``). The paper's
adaptive weight w = sg[1 / (||Delta||^2 + c)^p] and its (r, t) sampling (both times logit-normal, sorted, r = t for a
fraction of the batch) are the defaults of ``train_meanflow``. The flow map is (1):

    Psi(x, s, t) = x - (s - t) u_theta(x, t, s)      (u's first time is the earlier-in-noise, later-in-data one),

exactly x at s = t for any network.

Shortcut models (Frans, Hafner, Levine & Abbeel 2024). A network s_theta(x, tau, d) conditioned on the step size d
predicts the step x_{tau - d} = x_tau - d s_theta(x_tau, tau, d). Training: flow matching at d = 0,
|| s_theta(x_tau, tau, 0) - v ||^2, and self-consistency for a fraction of the batch,

    s_theta(x_tau, tau, 2d) ~ sg[(s(x_tau, tau, d) + s(x'_{tau - d}, tau - d, d)) / 2],
    x'_{tau - d} = x_tau - d s(x_tau, tau, d),                                                               (3)

with the target evaluated by an EMA of theta and step sizes d = L / 2^k (L = t_max - t_min) on a grid of M = 2^K
steps. The flow map is Psi(x, s, t) = x - (s - t) s_theta(x, s, s - t).
"""
from __future__ import annotations

import torch
from torch import nn

from ._tensor import as_tensor, bcast
from .field import VelocityField
from .flowmap import DistillResult, TwoTimeMLP, _param_dtype
from .schedules import Schedule
from .training import EMA

__all__ = ["MeanFlowMap", "ShortcutMap", "meanflow_target", "meanflow_loss", "train_meanflow", "shortcut_target",
           "train_shortcut", "sample_meanflow_times", "TIME_DISTRIBUTIONS", "StepTrainer", "MeanFlowTrainer",
           "ShortcutTrainer"]

TIME_DISTRIBUTIONS = ("logit_normal", "uniform")


def _check_schedule(schedule):
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a diffusion_lab Schedule, got {type(schedule).__name__}")


def _default_net(dim, schedule, hidden, depth):
    # times enter the embedding as tau / t_max * 1000 (DiT's integer-step range), as in the official MeanFlow code
    return TwoTimeMLP(dim, hidden=hidden, depth=depth, time_scale=1000.0 / schedule.t_max)


class _AverageVelocityMap(nn.Module):
    """Shared plumbing: time checks of ``FlowMap`` and the map x - (s - t) w(x, s, t)."""

    def __init__(self, net, schedule: Schedule):
        super().__init__()
        _check_schedule(schedule)
        if not callable(net):
            raise TypeError(f"net must be callable (x, c_1, c_2) -> tensor, got {type(net).__name__}")
        self.net = net
        self.schedule = schedule
        self.nfe = 0

    def _times(self, s, t, x):
        """s, t as (batch,) float64 tensors inside the schedule's range with s >= t (python numbers are read in
        float64, not x's dtype: a float32 0.999 would fall outside RectifiedFlow's t_max = 0.999)."""
        n = x.shape[0]
        out = []
        for name, v in (("s", s), ("t", t)):
            v = as_tensor(v).to(device=x.device, dtype=torch.float64)
            if v.ndim > 1 or (v.ndim == 1 and v.shape[0] != n):
                raise ValueError(f"{name} must be a scalar or a (batch,) tensor with batch={n}; got shape "
                                 f"{tuple(v.shape)}")
            self.schedule.check_t(v, what=name)
            out.append(v.expand(n) if v.ndim == 0 else v)
        s, t = out
        if bool((t > s).any()):
            i = int(torch.nonzero(t > s)[0])
            raise ValueError(f"a flow map runs from s down to t <= s; got s={float(s[i])!r} < t={float(t[i])!r}")
        return s, t

    def _net(self, x, c1, c2):
        wdtype = _param_dtype(self.net, x.dtype)
        out = self.net(x.to(wdtype), c1.to(wdtype), c2.to(wdtype))
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"network returned {shape}, expected x's shape {tuple(x.shape)}")
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, s, t) -> torch.Tensor:
        """Psi(x, s, t) = x - (s - t) w(x, s, t); s, t scalars or (batch,) tensors with s >= t. One network call."""
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise ValueError(f"x must be a tensor of shape (batch, *data_shape), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        s, t = self._times(s, t, x)
        w = self._average_velocity_st(x, s, t)
        self.nfe += 1
        return x - bcast(s - t, x).to(x.dtype) * w  # s = t: the product is exactly 0, so Psi(x, t, t) = x


class MeanFlowMap(_AverageVelocityMap):
    r"""MeanFlow's average velocity u_theta(z, r, t), r <= t, and its flow map Psi(x, s, t) = x - (s - t) u(x, t, s).

    The network sees (z, t, t - r), the conditioning of the official code (the time and the interval length):
    u_theta(z, r, t) = F(z, t, t - r). ``TwoTimeMLP`` fits (its two embedded inputs are t and t - r).

    Parameters
    ----------
    net : nn.Module or callable
        F(z, t, h) -> tensor of z's shape, h = t - r >= 0.
    schedule : Schedule
    """

    def u(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u_theta(z, r, t) for (batch,) tensors r <= t (not counted in ``nfe``; no range checks: it is the
        function differentiated by ``meanflow_target``)."""
        return self._net(z, t, t - r)

    def _average_velocity_st(self, x, s, t):
        return self.u(x, t, s)


class ShortcutMap(_AverageVelocityMap):
    r"""A shortcut model s_theta(x, tau, d) and its flow map Psi(x, s, t) = x - (s - t) s_theta(x, s, s - t).

    Steps no longer than the finest level d_min = (t_max - t_min) / M are flow steps: the network is asked for
    d = 0 (the instantaneous velocity), as the official code conditions its finest level on the flow-matching
    input. The network sees d / (t_max - t_min) * t_max so that d and tau share one embedding scale.

    Parameters
    ----------
    net : nn.Module or callable
        F(x, tau, d_in) -> tensor of x's shape.
    schedule : Schedule
    levels : int
        K: step sizes d = L / 2^k, k = 0..K-1, on a grid of M = 2^K steps (the paper's M = 128 is K = 7).
    """

    def __init__(self, net, schedule: Schedule, levels: int = 7):
        super().__init__(net, schedule)
        if int(levels) != levels or not 1 <= levels <= 20:
            raise ValueError(f"levels must be an integer in [1, 20] (M = 2^levels steps), got {levels!r}")
        self.levels = int(levels)

    @property
    def span(self) -> float:
        return float(self.schedule.t_max - self.schedule.t_min)

    @property
    def d_min(self) -> float:
        """L / M, the finest step; steps <= d_min are flow (d = 0) steps."""
        return self.span / 2 ** self.levels

    def step_velocity(self, x: torch.Tensor, tau: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """s_theta(x, tau, d) for (batch,) tensors tau, d >= 0 (not counted in ``nfe``)."""
        d = torch.where(d <= self.d_min * (1 + 1e-9), torch.zeros_like(d), d)
        return self._net(x, tau, d * (self.schedule.t_max / self.span))

    def _average_velocity_st(self, x, s, t):
        return self.step_velocity(x, s, s - t)


# --------------------------------------------------------------------------------------------------------------
# MeanFlow: target and loss


JVP_MODES = ("func", "forward_ad")


def _jvp(fn, primals, tangents, mode):
    if mode == "func":
        return torch.func.jvp(fn, primals, tangents)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = fn(*(fwAD.make_dual(p, tg) for p, tg in zip(primals, tangents)))
        primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:  # the output does not depend on the inputs
            tangent = torch.zeros_like(primal)
        return primal, tangent


def meanflow_target(u_fn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor, *,
                    jvp: str = "func"):
    r"""The MeanFlow regression target (2) of any average-velocity function, from one Jacobian-vector product.

        (u, du/dt) = jvp(u_fn, (z, r, t), (v, 0, 1)),   du/dt = v . grad_z u + d_t u,
        target     = v - (t - r) du/dt.

    ``jvp="func"`` is ``torch.func.jvp`` (the official code's ``jax.jvp``); ``"forward_ad"`` computes the same
    product with ``torch.autograd.forward_ad`` dual tensors, which on CPU in this torch costs several times less
    per call for small networks (the functional transform dispatches many elementwise operations through Python
    reference implementations). Both give u with its graph for the loss.

    Parameters
    ----------
    u_fn : callable (z, r, t) -> tensor of z's shape
        u(z, r, t) for (batch,) times r <= t (e.g. ``MeanFlowMap.u``, or an exact average velocity).
    z : tensor (batch, *data_shape), the point z_t
    r, t : (batch,) tensors of z's dtype
    v : tensor of z's shape, the velocity at (z, t) (conditional or a field's)

    Returns
    -------
    (u, target, du_dt)
        u carries the graph of u_fn (for the loss); target and du_dt are detached (the stop-gradient).
    """
    if v.shape != z.shape:
        raise ValueError(f"v has shape {tuple(v.shape)}, expected z's shape {tuple(z.shape)}")
    r = as_tensor(r, like=z).to(z.dtype).expand(z.shape[0])
    t = as_tensor(t, like=z).to(z.dtype).expand(z.shape[0])
    if jvp not in JVP_MODES:
        raise ValueError(f"unknown jvp mode {jvp!r}; choose one of {JVP_MODES}")
    u, du_dt = _jvp(u_fn, (z, r, t), (v.to(z.dtype), torch.zeros_like(r), torch.ones_like(t)), jvp)
    du_dt = du_dt.detach()
    target = (v - bcast(t - r, z) * du_dt).detach()
    return u, target, du_dt


def meanflow_loss(u_fn, z, r, t, v, *, p: float = 1.0, c: float = 1e-2, jvp: str = "func") -> torch.Tensor:
    r"""Per-sample MeanFlow loss (batch,): w ||u - target||^2 with the adaptive weight w = sg[(||Delta||^2 + c)^{-p}]
    (p = 0: plain squared error; the official code's p = 1, c = 0.01). ``target`` from ``meanflow_target``."""
    if not p >= 0 or not c > 0:
        raise ValueError(f"need the adaptive-weight power p >= 0 and constant c > 0, got p={p!r}, c={c!r}")
    u, target, _ = meanflow_target(u_fn, z, r, t, v, jvp=jvp)
    sq = (u - target).pow(2).reshape(z.shape[0], -1).sum(1)
    if p == 0:
        return sq
    return sq / (sq.detach() + c) ** p


def sample_meanflow_times(schedule: Schedule, n: int, *, distribution: str = "logit_normal", mean: float = -0.4,
                          std: float = 1.0, fraction_r_neq_t: float = 0.25, generator=None):
    r"""(r, t), (n,) float64, r <= t in [t_min, t_max]: two draws u_1, u_2 of ``distribution`` on (0, 1)
    (logit-normal sigmoid(mean + std N(0, 1)), the paper's default mean -0.4, std 1.0; or uniform), sorted, mapped to
    t_min + (t_max - t_min) u; then r = t for all but a fraction ``fraction_r_neq_t`` of the batch (the paper's 25%).
    """
    if distribution not in TIME_DISTRIBUTIONS:
        raise ValueError(f"unknown time distribution {distribution!r}; choose one of {TIME_DISTRIBUTIONS}")
    if not 0.0 <= fraction_r_neq_t <= 1.0:
        raise ValueError(f"fraction_r_neq_t must be in [0, 1], got {fraction_r_neq_t!r}")
    if not std > 0:
        raise ValueError(f"the logit-normal std must be > 0, got {std!r}")
    if distribution == "logit_normal":
        a = torch.sigmoid(mean + std * torch.randn(2, n, generator=generator, dtype=torch.float64))
    else:
        a = torch.rand(2, n, generator=generator, dtype=torch.float64)
    lo, hi = schedule.t_min, schedule.t_max
    a = lo + (hi - lo) * a
    t, r = a.max(0).values, a.min(0).values
    n_neq = int(round(n * fraction_r_neq_t))
    r = torch.where(torch.arange(n) < n_neq, r, t)
    return r, t


def _check_training_args(schedule, teacher, batch, log_every):
    if teacher is not None:
        if not isinstance(teacher, VelocityField):
            raise TypeError(f"teacher must be a VelocityField or None, got {type(teacher).__name__}")
        if teacher.schedule.settings() != schedule.settings():
            raise ValueError(f"the map's schedule {schedule!r} differs from the teacher's {teacher.schedule!r}")
    for name, v in (("batch", batch), ("log_every", log_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _check_steps(steps):
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")


def _noised(schedule, x0, tau, z):
    """(x_tau, conditional velocity) = (alpha x0 + sigma z, alpha' x0 + sigma' z)."""
    a, s, da, ds = (bcast(c(tau), x0).to(x0.dtype) for c in (schedule.alpha, schedule.sigma, schedule.dalpha,
                                                                schedule.dsigma))
    return a * x0 + s * z, da * x0 + ds * z


def _velocity(schedule, teacher, x0, tau, gen):
    z = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    xt, v = _noised(schedule, x0, tau, z)
    if teacher is not None:
        with torch.no_grad():
            v = teacher.velocity(xt.to(torch.float64), tau).to(x0.dtype)
    return xt, v


class StepTrainer:
    r"""The loop, log and checkpoint plumbing of a trainer cut at step boundaries, with the interface of
    ``flowmap.ConsistencyTrainer``: ``run(steps, on_log=, ckpt_every=, on_checkpoint=)`` trains from ``self.step``
    to ``steps``, ``train_step()`` is one optimiser step returning the batch loss, and ``state_dict()`` (tensors and
    plain containers only, ``torch.load(weights_only=True)``-loadable) / ``load_state_dict`` hold everything a
    continuation needs: the network, its EMA, Adam, the trainer's generator (the only source of the data indices,
    times and noise), the global RNG states, the log and its running sum. So ``run(k); sd = state_dict()``, a new
    trainer with ``load_state_dict(sd)`` and ``run(n)`` give bitwise the weights and log of one ``run(n)``.

    Subclasses set ``self.net`` (the trained module), ``self.opt``, ``self.ema`` and ``self.generator`` and define
    ``train_step``; ``_extra_state`` / ``_load_extra_state`` add their own entries."""

    resumable = True

    def _init_loop(self, seed: int, log_every: int) -> None:
        self.seed, self.log_every = int(seed), int(log_every)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.step, self.history, self.acc, self.acc_n, self.teacher_calls = 0, [], 0.0, 0, 0

    def train_step(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, steps: int, *, on_log=None, ckpt_every: int = 0, on_checkpoint=None) -> None:
        """Train from ``self.step`` to ``steps``: ``on_log(record)`` after each log record (every ``log_every``
        steps and at the last; record = {"step", "loss" (mean since the previous record)}), ``on_checkpoint(self)``
        every ``ckpt_every`` steps before the last. The last record of a call off the log grid is replaced by the
        next grid record when the run continues, so a run continued in several calls, or from a saved state, logs
        what one call logs."""
        _check_steps(steps)
        self.net.train()
        if self.step < steps and self.history and self.history[-1]["step"] == self.step \
                and self.step % self.log_every:
            self.history.pop()  # the previous call's end, off the log grid: the next record covers its steps
        try:
            while self.step < steps:
                loss = self.train_step()
                self.step += 1
                self.acc, self.acc_n = self.acc + loss, self.acc_n + 1
                if self.step % self.log_every == 0 or self.step == steps:
                    rec = {"step": self.step, "loss": self.acc / self.acc_n}
                    self.history.append(rec)
                    if self.step % self.log_every == 0:  # off the grid: the sums continue
                        self.acc, self.acc_n = 0.0, 0
                    if on_log is not None:
                        on_log(rec)
                if ckpt_every and self.step % ckpt_every == 0 and self.step < steps and on_checkpoint is not None:
                    on_checkpoint(self)
        finally:
            self.net.eval()

    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, sd: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """Tensors and plain containers only (loadable with ``torch.load(weights_only=True)``)."""
        from .training import rng_state

        return {"step": self.step, "net": self.net.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "generator": self.generator.get_state(), "rng": rng_state(),
                "history": [dict(r) for r in self.history], "acc": self.acc, "acc_n": self.acc_n,
                "teacher_calls": self.teacher_calls, **self._extra_state()}

    def load_state_dict(self, sd: dict) -> None:
        from .training import set_rng_state

        self.net.load_state_dict(sd["net"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        self.generator.set_state(sd["generator"])
        set_rng_state(sd["rng"])
        self.step, self.history = int(sd["step"]), [dict(r) for r in sd["history"]]
        self.acc, self.acc_n, self.teacher_calls = float(sd["acc"]), int(sd["acc_n"]), int(sd["teacher_calls"])
        self._load_extra_state(sd)

    def result(self) -> DistillResult:
        """The run so far as ``train_meanflow`` / ``train_shortcut`` return it."""
        return DistillResult(psi=self.psi, psi_ema=self.flow_map(), history=list(self.history),
                             teacher_calls=self.teacher_calls, teacher_evals=self.teacher_evals,
                             settings=self.settings())


class MeanFlowTrainer(StepTrainer):
    r"""MeanFlow training (Geng et al. 2025, Algorithm 1; the loss of the module docstring) cut at step boundaries:
    ``train_meanflow`` is ``MeanFlowTrainer(mf, teacher, data, ...).run(steps)`` followed by ``result()``.

    Each step draws, from the trainer's generator and in this order, the data indices, the times (r, t)
    (``sample_meanflow_times``) and the noise eps, forms z_t = alpha_t x_0 + sigma_t eps and v (the conditional
    velocity, or the teacher's at (z_t, t): one teacher call), and takes one Adam step on the mean of
    ``meanflow_loss``; then the evaluation EMA. The Jacobian-vector product draws no random numbers. Arguments as in
    ``train_meanflow``; ``flow_map()`` is the EMA network's map."""

    def __init__(self, mf: MeanFlowMap, teacher: VelocityField | None, data: torch.Tensor, *, batch: int = 256,
                 lr: float = 1e-3, betas=(0.9, 0.95), distribution: str = "logit_normal", mean: float = -0.4,
                 std: float = 1.0, fraction_r_neq_t: float = 0.25, p: float = 1.0, c: float = 1e-2,
                 ema_decay: float = 0.999, seed: int = 0, log_every: int = 100, jvp: str = "func"):
        if not isinstance(mf, MeanFlowMap) or not isinstance(mf.net, nn.Module):
            raise TypeError("mf must be a MeanFlowMap around a torch.nn.Module network")
        sch = mf.schedule
        _check_training_args(sch, teacher, batch, log_every)
        sample_meanflow_times(sch, 1, distribution=distribution, mean=mean, std=std,
                              fraction_r_neq_t=fraction_r_neq_t)
        if not p >= 0 or not c > 0:
            raise ValueError(f"need the adaptive-weight power p >= 0 and constant c > 0, got p={p!r}, c={c!r}")
        if jvp not in JVP_MODES:
            raise ValueError(f"unknown jvp mode {jvp!r}; choose one of {JVP_MODES}")
        self.psi, self.net, self.teacher, self.data = mf, mf.net, teacher, data
        self.batch, self.lr, self.betas = int(batch), lr, tuple(betas)
        self.distribution, self.mean, self.std, self.fraction_r_neq_t = distribution, mean, std, fraction_r_neq_t
        self.p, self.c, self.ema_decay, self.jvp = p, c, ema_decay, jvp
        self._init_loop(seed, log_every)
        self.dtype = _param_dtype(mf.net, torch.float32)
        self.ema = EMA(mf.net, ema_decay, warmup=True)
        self.opt = torch.optim.Adam(mf.net.parameters(), lr=lr, betas=self.betas)
        self.resolved = {"distribution": distribution, "mean": mean, "std": std, "fraction_r_neq_t": fraction_r_neq_t,
                         "p": p, "c": c, "betas": list(self.betas), "jvp": jvp}

    def train_step(self) -> float:
        gen, batch, sch, dtype = self.generator, self.batch, self.psi.schedule, self.dtype
        x0 = self.data[torch.randint(0, self.data.shape[0], (batch,), generator=gen)].to(dtype)
        r, t = sample_meanflow_times(sch, batch, distribution=self.distribution, mean=self.mean, std=self.std,
                                     fraction_r_neq_t=self.fraction_r_neq_t, generator=gen)
        calls0 = self.teacher.nfe if self.teacher is not None else 0
        z, v = _velocity(sch, self.teacher, x0, t, gen)
        if self.teacher is not None:
            self.teacher_calls += self.teacher.nfe - calls0
        loss = meanflow_loss(self.psi.u, z, r.to(dtype), t.to(dtype), v, p=self.p, c=self.c, jvp=self.jvp).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.net)
        return float(loss.detach())

    @property
    def teacher_evals(self) -> int:
        """Per-sample teacher evaluations: one batch call per step."""
        return self.teacher_calls * self.batch

    def flow_map(self) -> MeanFlowMap:
        """The evaluation map: the EMA weights (``DistillResult.psi_ema``)."""
        return MeanFlowMap(self.ema.module, self.psi.schedule)

    def settings(self) -> dict:
        return {"method": "meanflow", "teacher": self.teacher is not None, "steps": self.step, "batch": self.batch,
                "lr": self.lr, "betas": list(self.betas), "distribution": self.distribution, "mean": self.mean,
                "std": self.std, "fraction_r_neq_t": self.fraction_r_neq_t, "p": self.p, "c": self.c,
                "ema_decay": self.ema_decay, "seed": self.seed, "jvp": self.jvp}


def train_meanflow(mf: MeanFlowMap, data: torch.Tensor, *, teacher: VelocityField | None = None,
                   steps: int = 1000, batch: int = 256, lr: float = 1e-3, betas=(0.9, 0.95),
                   distribution: str = "logit_normal", mean: float = -0.4, std: float = 1.0,
                   fraction_r_neq_t: float = 0.25, p: float = 1.0, c: float = 1e-2, ema_decay: float = 0.999,
                   seed: int = 0, log_every: int = 100, jvp: str = "func") -> DistillResult:
    r"""Train ``mf`` (in place) with the MeanFlow loss of the module docstring (Geng et al. 2025, Algorithm 1):
    ``MeanFlowTrainer(mf, teacher, data, ...).run(steps)``, whose ``state_dict`` makes the run resumable.

    Parameters
    ----------
    mf : MeanFlowMap around an ``nn.Module`` network.
    data : tensor (N, *data_shape), samples x_0 (batches drawn with replacement).
    teacher : VelocityField, optional
        None: v is the conditional velocity alpha'_t x_0 + sigma'_t eps (training from data alone). A field: v is its
        velocity at (z_t, t), one batched teacher call per step (MeanFlow distillation).
    steps, batch, lr, betas : Adam steps, batch size, learning rate and (beta_1, beta_2) (the official 0.9, 0.95).
    distribution, mean, std, fraction_r_neq_t : the (r, t) sampling of ``sample_meanflow_times``.
    p, c : the adaptive loss weight (``meanflow_loss``).
    jvp : "func" | "forward_ad", how ``meanflow_target`` takes the Jacobian-vector product (same values).
    ema_decay : the evaluation EMA (package warm-up).

    Returns
    -------
    DistillResult
        ``psi`` = mf, ``psi_ema`` a MeanFlowMap around the EMA network, ``teacher_calls`` and ``teacher_evals``
        (0 without a teacher), the loss history and the settings.
    """
    _check_steps(steps)
    run = MeanFlowTrainer(mf, teacher, data, batch=batch, lr=lr, betas=betas, distribution=distribution, mean=mean,
                          std=std, fraction_r_neq_t=fraction_r_neq_t, p=p, c=c, ema_decay=ema_decay, seed=seed,
                          log_every=log_every, jvp=jvp)
    run.run(steps)
    return run.result()


# --------------------------------------------------------------------------------------------------------------
# Shortcut models


def shortcut_target(s_fn, x: torch.Tensor, tau: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    r"""The self-consistency target (3) for the step 2d from two steps d of ``s_fn``:

        s_1 = s(x, tau, d),   x' = x - d s_1,   s_2 = s(x', tau - d, d),   target = (s_1 + s_2) / 2,

    so that x - 2d target = x' - d s_2 (two shortcut steps of size d). Detached (no gradient).

    Parameters
    ----------
    s_fn : callable (x, tau, d) -> tensor of x's shape, (batch,) tau and d
    x : tensor (batch, *data_shape), x_tau
    tau, d : (batch,) tensors, tau - 2d >= t_min
    """
    with torch.no_grad():
        s1 = s_fn(x, tau, d)
        x2 = x - bcast(d, x).to(x.dtype) * s1
        s2 = s_fn(x2, tau - d, d)
        return 0.5 * (s1 + s2)


class ShortcutTrainer(StepTrainer):
    r"""Shortcut-model training (Frans et al. 2024; ``train_shortcut``) cut at step boundaries: ``train_shortcut``
    is ``ShortcutTrainer(sm, teacher, data, ...).run(steps)`` followed by ``result()``.

    Each step draws, from the trainer's generator and in this order, the data indices, the self-consistency levels
    beyond the equal split, the positions j, the self-consistency noise, the flow-matching grid indices and the
    flow-matching noise; the target network theta- (an EMA of theta with decay ``target_decay``; 0: the online
    weights) is part of the state. Arguments as in ``train_shortcut``; ``flow_map()`` is the EMA network's map."""

    def __init__(self, sm: ShortcutMap, teacher: VelocityField | None, data: torch.Tensor, *, batch: int = 256,
                 lr: float = 1e-3, bootstrap_every: int = 8, target_decay: float = 0.999, ema_decay: float = 0.999,
                 seed: int = 0, log_every: int = 100):
        if not isinstance(sm, ShortcutMap) or not isinstance(sm.net, nn.Module):
            raise TypeError("sm must be a ShortcutMap around a torch.nn.Module network")
        sch = sm.schedule
        _check_training_args(sch, teacher, batch, log_every)
        if int(bootstrap_every) != bootstrap_every or bootstrap_every < 1 or batch // bootstrap_every < sm.levels:
            raise ValueError(f"bootstrap_every must be an integer >= 1 leaving batch // bootstrap_every >= levels "
                             f"({sm.levels}) self-consistency samples; got bootstrap_every={bootstrap_every!r} with "
                             f"batch={batch}")
        if not 0.0 <= target_decay < 1.0:
            raise ValueError(f"target_decay must be in [0, 1), got {target_decay}")
        self.psi, self.net, self.teacher, self.data = sm, sm.net, teacher, data
        self.batch, self.lr, self.bootstrap_every = int(batch), lr, int(bootstrap_every)
        self.target_decay, self.ema_decay = target_decay, ema_decay
        self._init_loop(seed, log_every)
        self.dtype = _param_dtype(sm.net, torch.float32)
        self.target = EMA(sm.net, target_decay, warmup=False)
        self.ema = EMA(sm.net, ema_decay, warmup=True)
        self.psi_target = ShortcutMap(self.target.module, sch, sm.levels)
        self.opt = torch.optim.Adam(sm.net.parameters(), lr=lr)
        self.n_sc = self.batch // self.bootstrap_every
        self.n_fm = self.batch - self.n_sc
        self.resolved = {"target_decay": target_decay, "levels": sm.levels, "bootstrap_every": self.bootstrap_every}

    def train_step(self) -> float:
        gen, batch, sch, dtype, sm = self.generator, self.batch, self.psi.schedule, self.dtype, self.psi
        L, K, M = sm.span, sm.levels, 2 ** sm.levels
        n_sc, n_fm = self.n_sc, self.n_fm
        x0 = self.data[torch.randint(0, self.data.shape[0], (batch,), generator=gen)].to(dtype)
        # self-consistency part
        k = torch.arange(K).repeat_interleave(n_sc // K)
        k = torch.cat([k, torch.randint(0, K, (n_sc - k.numel(),), generator=gen)])
        d = L / 2.0 ** k.to(torch.float64)
        j = (torch.rand(n_sc, generator=gen, dtype=torch.float64) * 2.0 ** k).floor() + 1
        tau_sc = (sch.t_min + d * j).clamp(max=sch.t_max)
        z = torch.randn((n_sc, *x0.shape[1:]), generator=gen, dtype=dtype)
        x_sc, _ = _noised(sch, x0[:n_sc], tau_sc, z)
        tgt_sc = shortcut_target(self.psi_target.step_velocity, x_sc, tau_sc.to(dtype), (d / 2).to(dtype))
        # flow-matching part
        kf = torch.randint(1, M + 1, (n_fm,), generator=gen).to(torch.float64)
        tau_fm = (sch.t_min + L * kf / M).clamp(max=sch.t_max)
        calls0 = self.teacher.nfe if self.teacher is not None else 0
        x_fm, v_fm = _velocity(sch, self.teacher, x0[n_sc:], tau_fm, gen)
        if self.teacher is not None:
            self.teacher_calls += self.teacher.nfe - calls0
        x = torch.cat([x_sc, x_fm])
        tau = torch.cat([tau_sc, tau_fm]).to(dtype)
        dd = torch.cat([d, torch.zeros(n_fm, dtype=torch.float64)]).to(dtype)
        tgt = torch.cat([tgt_sc, v_fm])
        loss = (sm.step_velocity(x, tau, dd) - tgt).pow(2).reshape(batch, -1).sum(1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.target.update(self.net)
        self.ema.update(self.net)
        return float(loss.detach())

    @property
    def teacher_evals(self) -> int:
        """Per-sample teacher evaluations: the flow-matching rows of each step."""
        return self.teacher_calls * self.n_fm

    def flow_map(self) -> ShortcutMap:
        """The evaluation map: the EMA weights (``DistillResult.psi_ema``)."""
        return ShortcutMap(self.ema.module, self.psi.schedule, self.psi.levels)

    def settings(self) -> dict:
        return {"method": "shortcut", "teacher": self.teacher is not None, "steps": self.step, "batch": self.batch,
                "lr": self.lr, "levels": self.psi.levels, "bootstrap_every": self.bootstrap_every,
                "target_decay": self.target_decay, "ema_decay": self.ema_decay, "seed": self.seed}

    def _extra_state(self) -> dict:
        return {"target": self.target.state_dict()}

    def _load_extra_state(self, sd: dict) -> None:
        self.target.load_state_dict(sd["target"])


def train_shortcut(sm: ShortcutMap, data: torch.Tensor, *, teacher: VelocityField | None = None,
                   steps: int = 1000, batch: int = 256, lr: float = 1e-3, bootstrap_every: int = 8,
                   target_decay: float = 0.999, ema_decay: float = 0.999, seed: int = 0,
                   log_every: int = 100) -> DistillResult:
    r"""Train ``sm`` (in place) as a shortcut model (Frans et al. 2024): per batch, ``batch // bootstrap_every``
    self-consistency samples (the paper's 1/8) and the rest flow matching. ``ShortcutTrainer(sm, teacher, data,
    ...).run(steps)``, whose ``state_dict`` makes the run resumable.

    - Flow matching: tau = t_min + L k / M, k uniform in {1..M}; loss ||s_theta(x_tau, tau, 0) - v||^2 with v the
      conditional velocity alpha' x_0 + sigma' eps, or a teacher field's velocity (distillation).
    - Self-consistency: level k uniform over {0..K-1} (equal counts, as the official code), d = L / 2^k, tau =
      t_min + d j, j uniform in {1..2^k}; target (3) at the half step d/2 from the target network theta- (an EMA of
      theta with decay ``target_decay``, the official 0.999); loss ||s_theta(x_tau, tau, d) - target||^2. The finest
      half step d/2 = L/M is a flow (d = 0) step, as in ``ShortcutMap``.

    The loss is the mean over the whole batch. Returns a ``DistillResult`` (``psi_ema``: the evaluation EMA).

    ``target_decay``: the official 0.999 suits long runs; in short ones the lagging target slows the propagation of
    self-consistency from the fine levels to the coarse ones. ``target_decay=0`` (the online network under a
    stop-gradient) is the faster choice there: on ring8 (RectifiedFlow, exact teacher, 1500 steps) the one-step
    error against the exact map was 0.16 with 0 and 0.56 with 0.999.
    """
    _check_steps(steps)
    run = ShortcutTrainer(sm, teacher, data, batch=batch, lr=lr, bootstrap_every=bootstrap_every,
                          target_decay=target_decay, ema_decay=ema_decay, seed=seed, log_every=log_every)
    run.run(steps)
    return run.result()


def meanflow_map(dim: int, schedule: Schedule, hidden: int = 64, depth: int = 3) -> MeanFlowMap:
    """A MeanFlowMap around a fresh ``TwoTimeMLP`` (times embedded as tau / t_max * 1000)."""
    _check_schedule(schedule)
    return MeanFlowMap(_default_net(dim, schedule, hidden, depth), schedule)


def shortcut_map(dim: int, schedule: Schedule, hidden: int = 64, depth: int = 3, levels: int = 7) -> ShortcutMap:
    """A ShortcutMap around a fresh ``TwoTimeMLP``."""
    _check_schedule(schedule)
    return ShortcutMap(_default_net(dim, schedule, hidden, depth), schedule, levels)


__all__ += ["meanflow_map", "shortcut_map"]
