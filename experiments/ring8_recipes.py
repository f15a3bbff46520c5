"""Training recipes for a ring8 score network, one change at a time, measured against the exact score.

Every row trains an MLP (``diffusion_lab.models.MLPScore``) on ring8 samples under the VP-linear schedule for a fixed
number of steps and measures, on the EMA network:

- the CPU seconds of training (``time.process_time``, one thread);
- e(t) = E_{p_t} ||s_theta - grad log p_t||^2 (``diagnostics.score_error_profile``) and its integral with the
  likelihood weighting, 1/2 int g(t)^2 e(t) dt (the KL bound of Song, Durkan, Murray & Ermon 2021, Thm 1);
- the TV distance between the Fokker-Planck solution of the learned reverse SDE (from the exact p_{t_max}) and the
  exact p_{t_min} (``diagnostics.kl_bound``; the exact field reaches the grid's floor);
- the exact-law MMD^2 (``metrics.mmd2_exact``) of dpmpp_2m samples at NFE 20 against p_{t_min}, as a ratio to the
  same sampler's MMD^2 on the exact field from the same x_T.

The changes follow the literature: EDM preconditioning and loss weighting with log-normal times (Karras et al. 2022),
time sampling uniform in log-SNR (Kingma et al. 2021), importance sampling of t by a pilot run's e(t) (Song et al.
2021, Sec. 5), a cosine learning-rate decay with warm-up (Loshchilov & Hutter 2017), the EMA length, random Fourier
time features (Tancik et al. 2020), larger batches and a wider/deeper network. ``ring8_recipe()`` is the best
measured recipe.

    python -m experiments.ring8_recipes [--out docs/figures] [--quick] [--only NAME,NAME]
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch

from diffusion_lab import diagnostics as Dg
from diffusion_lab import schedules as S
from diffusion_lab import training as T
from diffusion_lab.metrics import mmd2_exact
from diffusion_lab.models import get_model
from diffusion_lab.targets import ring8

from . import _common

TIME_SAMPLERS = ("uniform", "lognormal", "loglsnr", "importance")


# ------------------------------------------------------------------------------------------------
# training options the ablation needs beyond diffusion_lab.training

def sample_t_loglsnr(n: int, schedule, *, generator=None, dtype=torch.float64):
    r"""n times with lambda = log(alpha/sigma) ~ U[lambda_min, lambda_max] (uniform in log-SNR; Kingma et al. 2021),
    t = t_from_lam(lambda).

    Parameters
    ----------
    n : int
        Number of times.
    schedule : Schedule

    Returns
    -------
    torch.Tensor
        (n,) times in [t_min, t_max].
    """
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    lo, hi = schedule.lam_range
    u = torch.rand(int(n), generator=generator, dtype=torch.float64)
    t = schedule.t_from_lam(lo + (hi - lo) * u).clamp(schedule.t_min, schedule.t_max)
    return t.to(dtype)


class ImportanceTimes:
    r"""A density q(t) on [t_min, t_max] for importance sampling of training times by a score-error profile:

        q(t) = (1 - mix) / (t_max - t_min) + mix * r(t) / int r,   r = piecewise-linear interpolant of the
        eps-space error sigma(t)^2 e(t) on the profile's times (constant beyond its ends),

    sampled exactly by inverting the CDF on a fine grid. With ``reweight`` the loss is multiplied by
    p(t)/q(t) = 1/((t_max - t_min) q(t)), so the objective stays the uniform-t one and only its variance changes
    (Song et al. 2021, Sec. 5); without it, training effort moves to where the pilot network was wrong.

    Parameters
    ----------
    schedule : Schedule
    t, r : sequence of float
        Profile times (increasing) and non-negative error values.
    mix : float
        Weight of the error-shaped part, in [0, 1].
    reweight : bool
    """

    def __init__(self, schedule, t, r, mix: float = 0.5, reweight: bool = False, grid: int = 4096):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        r = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
        if t.numel() != r.numel() or t.numel() < 2:
            raise ValueError(f"t and r must hold the same number (>= 2) of values, got {t.numel()} and {r.numel()}")
        if not bool((r >= 0).all()) or not bool(torch.isfinite(r).all()) or float(r.sum()) <= 0:
            raise ValueError(f"r must be finite, >= 0 and not all 0, got {r.tolist()}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        self.schedule, self.mix, self.reweight = schedule, float(mix), bool(reweight)
        a, b = float(schedule.t_min), float(schedule.t_max)
        tg = torch.linspace(a, b, grid, dtype=torch.float64)
        idx = torch.searchsorted(t, tg).clamp(1, t.numel() - 1)
        t0, t1 = t[idx - 1], t[idx]
        w = ((tg - t0) / (t1 - t0)).clamp(0, 1)
        rg = r[idx - 1] * (1 - w) + r[idx] * w
        dens = rg / torch.trapezoid(rg, tg)
        self.tg = tg
        self.q = (1 - self.mix) / (b - a) + self.mix * dens
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                         torch.cumsum(0.5 * (self.q[1:] + self.q[:-1]) * (tg[1:] - tg[:-1]), 0)])
        self.cdf = cdf / cdf[-1]

    def density(self, t):
        """q(t), by linear interpolation on the grid."""
        t = torch.as_tensor(t, dtype=torch.float64)
        idx = torch.searchsorted(self.tg, t).clamp(1, self.tg.numel() - 1)
        w = ((t - self.tg[idx - 1]) / (self.tg[idx] - self.tg[idx - 1])).clamp(0, 1)
        return self.q[idx - 1] * (1 - w) + self.q[idx] * w

    def sample(self, n: int, generator=None):
        """n times drawn from q (inverse CDF, linear within grid cells)."""
        u = torch.rand(int(n), generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(self.cdf, u).clamp(1, self.cdf.numel() - 1)
        c0, c1 = self.cdf[idx - 1], self.cdf[idx]
        w = ((u - c0) / (c1 - c0).clamp_min(1e-300)).clamp(0, 1)
        return self.tg[idx - 1] + w * (self.tg[idx] - self.tg[idx - 1])

    def weight(self, t):
        """The loss factor p(t)/q(t) with p uniform (1 without ``reweight``)."""
        if not self.reweight:
            return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
        return 1.0 / ((self.schedule.t_max - self.schedule.t_min) * self.density(t))


@dataclasses.dataclass(frozen=True)
class RecipeObjective(T.Objective):
    """``training.Objective`` with two more time samplers: ``loglsnr`` (``sample_t_loglsnr``) and ``importance``
    (an ``ImportanceTimes`` in ``importance``; its weight p/q multiplies the loss)."""

    time_sampler: str = "uniform"
    importance: ImportanceTimes | None = None

    def __post_init__(self):
        if self.time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time sampler {self.time_sampler!r}; choose one of {TIME_SAMPLERS}")
        if self.time_sampler == "importance" and self.importance is None:
            raise ValueError("time_sampler='importance' needs importance=ImportanceTimes(...)")
        base = self.time_sampler if self.time_sampler in T.TIME_SAMPLERS else "uniform"
        object.__setattr__(self, "time_sampler", self.time_sampler)
        T.Objective.__post_init__(dataclasses.replace(self, time_sampler=base, importance=None)
                                  if base != self.time_sampler else self)

    def settings(self) -> dict:
        out = T.Objective.settings(self)
        out.pop("importance", None)
        return out

    def draw(self, x0, generator=None):
        if self.time_sampler == "loglsnr":
            t = sample_t_loglsnr(x0.shape[0], self.schedule, generator=generator).to(x0.device)
        elif self.time_sampler == "importance":
            t = self.importance.sample(x0.shape[0], generator).to(x0.device)
        else:
            return T.Objective.draw(self, x0, generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        return t, eps

    def per_sample(self, net, x0, y=None, *, t=None, eps=None, generator=None, autocast_dtype=None):
        if t is None and eps is None:
            t, eps = self.draw(x0, generator)
        loss = T.Objective.per_sample(self, net, x0, y, t=t, eps=eps, generator=generator,
                                      autocast_dtype=autocast_dtype)
        if self.time_sampler == "importance":
            loss = loss * self.importance.weight(torch.as_tensor(t)).to(loss)
        return loss


def cosine_lr(step: int, base_lr: float, total: int, warmup: int = 0, final: float = 0.0) -> float:
    r"""Linear warm-up over ``warmup`` steps, then cosine decay to ``final * base_lr`` at ``total``
    (Loshchilov & Hutter 2017):

        lr = base (step + 1)/warmup                                       for step < warmup
        lr = base (final + (1 - final) (1 + cos(pi u))/2),  u = (step - warmup)/(total - warmup)   after.

    Parameters
    ----------
    step, total, warmup : int
    base_lr, final : float

    Returns
    -------
    float
    """
    if total < 1 or warmup < 0 or warmup > total:
        raise ValueError(f"need total >= 1 and 0 <= warmup <= total, got total={total}, warmup={warmup}")
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    u = min(1.0, (step - warmup) / max(total - warmup, 1))
    return base_lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * u)))


class CosineTrainer(T.Trainer):
    """``training.Trainer`` whose learning rate follows ``cosine_lr`` over ``total_steps``."""

    def __init__(self, *args, total_steps: int, final_lr_frac: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.total_steps, self.final_lr_frac = int(total_steps), float(final_lr_frac)

    def lr_at(self, step: int) -> float:
        return cosine_lr(step, self.base_lr, self.total_steps, self.warmup, self.final_lr_frac)


# ------------------------------------------------------------------------------------------------
# recipes

BASE = {"prediction": "eps", "weighting": "uniform", "time_sampler": "uniform", "P_mean": -1.2, "P_std": 1.2,
        "lr": 2e-3, "lr_schedule": "constant", "warmup": 0, "ema": 0.999, "batch": 1024, "steps": 2000,
        "hidden": 128, "depth": 3, "time_embedding": "sinusoidal", "importance": None}


def ring8_recipe() -> dict:
    """The best ring8 recipe measured by ``python -m experiments.ring8_recipes`` (VP-linear schedule, keys as in
    ``BASE``; train it with ``fit``): eps-prediction, 7000 steps of batch 1024, a cosine learning rate from 2e-3
    with 200 warm-up steps, EMA 0.999, and training times drawn half uniformly, half by the eps-space error
    sigma^2 e(t) of a 500-step pilot (``ImportanceTimes``, unweighted). Measured: about 265 CPU seconds (one thread,
    pilot included), Fokker-Planck generation TV 0.023 against the exact p_{t_min}."""
    return dict(BASE, lr_schedule="cosine", warmup=200, time_sampler="importance", steps=7000)


#: Training steps at which the EMA network of one ``ring8_recipe()`` run is kept (``fit_stages``): the stages that
#: experiments.score_error measures, whose last one experiments.learned_ranking uses.
RECIPE_STAGES = (1000, 3000, 7000)


def fit(recipe: dict, data: torch.Tensor, seed: int = 0, *, target=None):
    """Train ``recipe`` on ``data`` (samples of ``target``, default ring8; VP-linear schedule), with its pilot when it
    samples t by importance; returns (EMA network, sigma_data, CPU seconds including the pilot's). The learned field
    is ``training.learned_field(net, VPLinear(), recipe["prediction"], sigma_data=sigma_data)``."""
    snaps, sd = fit_stages(recipe, data, seed, target=target)
    _, net, cpu = snaps[-1]
    return net, sd, cpu


def fit_stages(recipe: dict, data: torch.Tensor, seed: int = 0, stages=None, *, target=None, cache=None):
    """``fit`` with copies of the EMA network at the training steps ``stages`` (default: the recipe's last step) of
    one run; returns ([(step, EMA network, CPU seconds up to it, pilot included)], sigma_data).

    The importance pilot's e(t) is measured against ``target``'s exact score (default ring8). With ``cache`` (a
    folder) the networks' weights are stored there under a hash of the recipe, the target, the training data, the
    seed and the stages, and reused (read with ``weights_only=True``)."""
    import hashlib
    import json
    import os

    r = dict(BASE, **recipe)
    target = ring8() if target is None else target
    stages = (r["steps"],) if stages is None else tuple(int(s) for s in stages)
    if not stages or list(stages) != sorted(set(stages)) or stages[0] < 1 or stages[-1] > r["steps"]:
        raise ValueError(f"stages must be increasing steps in 1..{r['steps']}, got {stages}")
    model = _model_kwargs(r, data)
    path = None
    if cache:
        key = json.dumps([dict(r, importance=None), target.settings(), stages, seed, list(data.shape),
                          hashlib.sha1(data.contiguous().numpy().tobytes()).hexdigest()], sort_keys=True, default=str)
        path = os.path.join(cache, f"fit-{target.name}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.pt")
        if os.path.isfile(path):
            saved = torch.load(path, weights_only=True)  # plain tensors, numbers and strings
            snaps = []
            for step, cpu, state in zip(saved["steps"], saved["cpu"], saved["states"]):
                net = get_model("mlp", **model)
                net.load_state_dict(state)
                snaps.append((int(step), net.eval(), float(cpu)))
            return snaps, float(saved["sigma_data"])
    imp, pilot_cpu = None, 0.0
    if r["time_sampler"] == "importance":
        sch = S.VPLinear()
        pilot_steps = max(min(r["steps"] // 4, 500), 1)
        pnet, psd, pilot_cpu = train(dict(r, time_sampler="uniform", steps=pilot_steps), data, seed)
        c0 = time.process_time()
        pilot = Dg.score_error_profile(T.learned_field(pnet, sch, r["prediction"], sigma_data=psd), target,
                                       n_times=16, n=500, seed=seed + 5)
        pilot_cpu += time.process_time() - c0
        imp = ImportanceTimes(sch, pilot.t, pilot.e_eps.clamp_min(0), mix=0.5)
    snaps, sd = _train_stages(r, data, seed, imp, stages)
    snaps = [(step, net, cpu + pilot_cpu) for step, net, cpu in snaps]
    if path:
        from diffusion_lab._io import atomic_write

        os.makedirs(cache, exist_ok=True)
        saved = {"steps": [s for s, _, _ in snaps], "cpu": [c for _, _, c in snaps],
                 "states": [n.state_dict() for _, n, _ in snaps], "sigma_data": sd}
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    return snaps, sd


def _model_kwargs(r: dict, data: torch.Tensor) -> dict:
    model = {"data_shape": list(data.shape[1:]), "hidden": r["hidden"], "depth": r["depth"], "num_classes": 0}
    if r["time_embedding"] != "sinusoidal":
        model["time_embedding"] = r["time_embedding"]
    return model


def train(recipe: dict, data: torch.Tensor, seed: int = 0, importance: ImportanceTimes | None = None):
    """Train one recipe; returns (EMA network, sigma_data, CPU seconds of training)."""
    r = dict(BASE, **recipe)
    snaps, sd = _train_stages(r, data, seed, importance, (r["steps"],))
    _, net, cpu = snaps[-1]
    return net, sd, cpu


def _train_stages(r: dict, data: torch.Tensor, seed: int, importance, stages):
    """One run of recipe ``r`` with a copy of the EMA network at each of ``stages``: ([(step, net, cpu)], sigma_data).
    The learning-rate schedule runs over all ``r["steps"]``; the snapshots do not change the run."""
    sch = S.VPLinear()
    torch.manual_seed(seed)
    net = get_model("mlp", **_model_kwargs(r, data))
    sigma_data = round(float(data.std()), 4)
    obj = RecipeObjective(sch, r["prediction"], weighting=r["weighting"], time_sampler=r["time_sampler"],
                          sigma_data=sigma_data, P_mean=r["P_mean"], P_std=r["P_std"], importance=importance)
    loader = T.TensorLoader(data, batch_size=r["batch"], seed=seed)
    kw = dict(lr=r["lr"], warmup=r["warmup"], ema_decay=r["ema"], seed=seed)
    tr = (CosineTrainer(net, obj, loader, total_steps=r["steps"], **kw) if r["lr_schedule"] == "cosine"
          else T.Trainer(net, obj, loader, **kw))
    snaps, cpu = [], 0.0
    for step in stages:
        c0 = time.process_time()
        tr.run(step, log_every=max(r["steps"], 1))
        cpu += time.process_time() - c0
        snaps.append((step, copy.deepcopy(tr.ema.module).eval(), cpu))
    return snaps, sigma_data


def ablation(quick: bool):
    """(name, change description, recipe) rows: the baseline, then one change at a time on top of it."""
    steps = 150 if quick else 2000
    b = dict(BASE, steps=steps, batch=256 if quick else 1024)
    rows = [("baseline", "eps, uniform t, constant lr 2e-3, EMA 0.999, batch 1024, 128x3", b),
            ("edm", "EDM precond + weighting + log-normal t", dict(b, prediction="edm", weighting="edm",
                                                                   time_sampler="lognormal")),
            ("edm_loglsnr", "EDM precond + weighting, t uniform in log-SNR", dict(b, prediction="edm",
                                                                                 weighting="edm",
                                                                                 time_sampler="loglsnr")),
            ("loglsnr", "eps, t uniform in log-SNR", dict(b, time_sampler="loglsnr")),
            ("importance", "t: half uniform, half by a 500-step pilot's sigma^2 e(t)", dict(b, time_sampler="importance")),
            ("cosine", "cosine lr, 100 warm-up", dict(b, lr_schedule="cosine", warmup=min(100, steps // 4))),
            ("ema_0.9999", "EMA 0.9999", dict(b, ema=0.9999)),
            ("ema_0.99", "EMA 0.99", dict(b, ema=0.99)),
            ("fourier", "random Fourier time features", dict(b, time_embedding="fourier")),
            ("batch_4096", "batch 4096, 1/4 the steps", dict(b, batch=4 * b["batch"], steps=steps // 4)),
            ("wide_256x4", "256 wide x 4 deep, 1/3 the steps", dict(b, hidden=256, depth=4, steps=steps // 3)),
            ("long_baseline", "baseline, 4x the steps", dict(b, steps=4 * steps)),
            ("long_cosine", "cosine lr (200 warm-up), 3.75x the steps",
             dict(b, lr_schedule="cosine", warmup=min(200, steps // 4), steps=int(3.75 * steps))),
            ("long_cosine_importance", "cosine lr + importance t, 3.5x the steps = ring8_recipe()",
             ring8_recipe() if not quick else dict(ring8_recipe(), warmup=steps // 4, steps=int(3.5 * steps),
                                                   batch=b["batch"]))]
    return rows


def evaluate(field, tg, quick: bool, seed: int, x_T, exact_mmd):
    """e(t), its likelihood-weighted integral, the Fokker-Planck generation TV and KL, and the dpmpp_2m NFE-20 MMD^2
    (with its ratio to ``exact_mmd``) of one learned field; returns (profile, dict)."""
    fp = dict(cells=48 if quick else 96, half_width=5.0, steps=30 if quick else 100)
    prof = Dg.score_error_profile(field, tg, n_times=12 if quick else 24, n=500 if quick else 2000, seed=seed)
    kb = Dg.kl_bound(field, tg, profile=prof, **fp)
    mmd = _mmd(field, tg, x_T, seed)
    lik = prof.integral("likelihood")
    return prof, {"I_likelihood": lik[0], "I_likelihood_se": lik[1], "fp_tv": kb.tv, "kl_truth": kb.truth,
                  "mmd2": mmd.mmd2, "mmd2_se": mmd.se, "mmd2_ratio": mmd.mmd2 / exact_mmd}


def _mmd(field, tg, x_T, seed):
    from diffusion_lab.samplers import sample

    sch = field.schedule
    res = sample(field, x_T, "dpmpp_2m", nfe=20, generator=torch.Generator().manual_seed(seed + 1))
    return mmd2_exact(res.x, tg.marginal(sch, sch.t_min))


def _setup(quick: bool, seed: int):
    sch = S.VPLinear()
    tg = ring8()
    data = tg.sample(20_000 if quick else 100_000, torch.Generator().manual_seed(seed), dtype=torch.float32)
    n = 2000 if quick else 20_000
    x_T = tg.marginal(sch, sch.t_max).sample(n, torch.Generator().manual_seed(seed + 100))
    return sch, tg, data, x_T


def _cache_path(cache, name, recipe, quick, seed):
    import hashlib
    import json
    import os

    key = json.dumps([name, recipe, quick, seed], sort_keys=True, default=str)
    return os.path.join(cache, f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt")


def run_row(name: str, change: str, recipe: dict, quick: bool, seed: int, exact_mmd2: float, cache=None,
            cached_only: bool = False):
    """Train and measure one row; returns (row dict, e(t) profile). Rows with importance sampling train their own
    pilot (the same recipe with uniform t for a quarter of the steps, at most 500) and count its CPU seconds.
    With ``cache`` (a folder) the result is stored there under the row's name and recipe and reused."""
    import os

    torch.set_num_threads(1)
    path = _cache_path(cache, name, recipe, quick, seed) if cache else None
    if path and os.path.isfile(path):
        row, fields = torch.load(path, weights_only=True)  # plain tensors and numbers; the schedule is VP-linear
        prof = Dg.ScoreErrorProfile(**fields, schedule=S.VPLinear())
        row["mmd2_ratio"] = row["mmd2"] / exact_mmd2
        row["description"] = change
        return row, prof
    if cached_only:
        return None
    sch, tg, data, x_T = _setup(quick, seed)
    net, sd, cpu = fit(recipe, data, seed)
    field = T.learned_field(net, sch, recipe["prediction"], sigma_data=sd)
    prof, ev = evaluate(field, tg, quick, seed, x_T, exact_mmd2)
    row = {"change": name, "description": change, "train_cpu_s": cpu, "steps": recipe["steps"],
           "batch": recipe["batch"], **ev}
    print(_common.table([row], COLS), flush=True)
    if path:
        from diffusion_lab._io import atomic_write

        os.makedirs(cache, exist_ok=True)
        fields = {f.name: getattr(prof, f.name) for f in dataclasses.fields(prof) if f.name != "schedule"}
        atomic_write(path, lambda tmp: torch.save((row, fields), tmp))
    return row, prof


def run(quick: bool = False, seed: int = 0, only=None, jobs: int = 1, cache=None, cached_only: bool = False):
    torch.set_num_threads(1)
    sch, tg, data, x_T = _setup(quick, seed)
    exact = tg.field(sch)
    exact_mmd = _mmd(exact, tg, x_T, seed)
    fp = dict(cells=48 if quick else 96, half_width=5.0, steps=30 if quick else 100)
    exact_kb = Dg.kl_bound(exact, tg, n_times=4, n=50, **fp)
    todo = [(name, change, recipe, quick, seed, exact_mmd.mmd2, cache, cached_only)
            for name, change, recipe in ablation(quick) if not only or name in only]
    if only:  # run in the order given
        order = list(only)
        todo.sort(key=lambda a: order.index(a[0]))
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(jobs) as pool:
            results = pool.starmap(run_row, todo, chunksize=1)
    else:
        results = [run_row(*a) for a in todo]
    order = [name for name, _, _ in ablation(quick)]
    results = sorted((r for r in results if r is not None), key=lambda rp: order.index(rp[0]["change"]))
    rows = [r for r, _ in results]
    profiles = {r["change"]: p for r, p in results}
    headline = {"exact_field": {"fp_tv": exact_kb.tv, "mmd2": exact_mmd.mmd2, "mmd2_se": exact_mmd.se},
                "rows": {r["change"]: {k: r[k] for k in ("train_cpu_s", "steps", "I_likelihood", "fp_tv", "mmd2",
                                                         "mmd2_se", "mmd2_ratio")}
                         for r in rows},
                "best_recipe": ring8_recipe(),
                "targets": {"fp_tv": 0.03, "mmd2_ratio": 2.0, "train_cpu_s": 300.0}}
    settings = {"target": tg.settings(), "schedule": sch.settings(), "base": dict(BASE),
                "recipes": {name: dict(r, importance=None) for name, _, r in ablation(quick)},
                "data": int(data.shape[0]), "fokker_planck": fp,
                "mmd": {"sampler": "dpmpp_2m", "nfe": 20, "n": int(x_T.shape[0]), "law": "p_t_min"},
                "seed": seed, "quick": quick, "clock": "time.process_time, torch 1 thread"}
    return rows, {"settings": settings, "headline": headline, "profiles": profiles}


COLS = ["change", "train_cpu_s", "steps", "I_likelihood", "fp_tv", "mmd2_ratio"]


def figure(rows, profiles, exact_tv, path: str) -> None:
    """Left: e(t) of every recipe. Right: Fokker-Planck TV of each recipe against its CPU seconds of training."""
    from diffusion_lab.plots import _mpl, _save, line_style

    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    ax = axes[0]
    for i, (name, p) in enumerate(profiles.items()):
        col, mk = line_style(i)
        ax.plot(p.t.numpy(), p.e.numpy(), "-", color=col, marker=mk, ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("e(t) = E_p_t |s_theta - grad log p_t|^2")
    ax.set_title("score error per recipe")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    for i, r in enumerate(rows):
        col, mk = line_style(i)
        ax.plot([r["train_cpu_s"]], [r["fp_tv"]], marker=mk, color=col, ls="none", ms=8, label=r["change"])
    ax.axhline(0.03, color="k", ls="--", lw=1, label="target TV 0.03")
    ax.axhline(exact_tv, color="k", ls=":", lw=1, label=f"exact field (grid floor) {exact_tv:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("training CPU seconds (1 thread)")
    ax.set_ylabel("TV(Fokker-Planck generation, p_t_min)")
    ax.set_title("generation TV against training cost")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path, dpi=120)


def main(argv=None):
    p = _common.parser(__doc__.split("\n")[0], "docs/figures")
    p.add_argument("--only", default=None, help="comma-separated row names to run (default: all)")
    p.add_argument("--jobs", type=int, default=1, help="rows trained in parallel processes (default 1)")
    p.add_argument("--cache", default=None, metavar="DIR", help="store each row's result in DIR and reuse it")
    p.add_argument("--cached-only", action="store_true", help="report only the rows already in --cache")
    args = p.parse_args(argv)
    only = args.only.split(",") if args.only else None
    rows, meta = run(args.quick, args.seed, only, args.jobs, args.cache, args.cached_only)
    print(_common.table(rows, COLS + ["mmd2"]))
    h = meta["headline"]
    print(f"exact field: Fokker-Planck TV {h['exact_field']['fp_tv']:.4f}, MMD^2 {h['exact_field']['mmd2']:.3g} "
          f"+- {h['exact_field']['mmd2_se']:.2g}")
    _common.write(args.out, "ring8_recipes", rows, meta["settings"], h)
    with _common.figure_style(args):
        figure(rows, meta["profiles"], h["exact_field"]["fp_tv"], _common.figure(args, "ring8_recipes"))
    return h


if __name__ == "__main__":
    main()
