r"""Real models in, samplers out: the one place that knows peer libraries' conventions (optional imports only).

Three bridges, each through the package's ``VelocityField``:

* **diffusers models as fields** -- ``from_diffusers(model, scheduler_or_config)``. A diffusers network
  ``model(sample, timestep, **kwargs)`` trained on N discrete steps with cumulative products
  alphabar_k (k = 0..N-1) becomes a field on a discrete VP schedule of this package (``schedule_from_diffusers``):
  step k sits at continuous time t_k = (k + 1)/N, alpha(t_k)^2 = alphabar_k exactly, and between the knots
  log alpha is linear in t (DPM-Solver's ``NoiseScheduleVP('discrete')``; ``schedules.DDPMDiscrete``). The network
  is called at the timestep

      k(t) = N t - 1,   exact (an integer) at the knots t = t_k, affine between them,

  so a sampler whose grid lies on the knots calls the network exactly as diffusers' own loops do.
  ``prediction_type`` maps as epsilon -> "eps", v_prediction -> "v" (Salimans & Ho 2022), sample -> "x0".
  ``diffusers_loop`` runs a scheduler as diffusers' pipelines do, and ``step_states`` runs it beside one of our
  samplers on the same timesteps and returns both loops' states at every timestep (``StepStates``).
* **k-diffusion both ways** -- ``from_k_diffusion(denoiser)`` makes a denoiser D(x, sigma) (Karras et al. 2022,
  eq. 2-3; k-diffusion's ``model(x, sigma, **extra_args)``) a field on the EDM schedule (alpha = 1, sigma = t);
  ``k_diffusion_sampler(name)`` (and the module attributes ``sample_<name>``) export every registered method of
  ours in k-diffusion's calling convention ``sample_<name>(model, x, sigmas, extra_args=None, callback=None,
  disable=None)``.
* **k-diffusion's own sampling code** -- ``k_diffusion_sampling()`` loads k-diffusion's ``sampling.py``
  (Crowson; Karras et al. 2022) on its own: the installed package's ``__init__`` imports training extras (image
  libraries, wandb, ...) that a sampler comparison does not need, so a stub package ``k_diffusion`` with a stub
  ``k_diffusion.utils`` (the one helper ``append_dims`` that sampling.py uses) is put into ``sys.modules`` while
  the file executes, and ``sys.modules`` is restored afterwards. sampling.py's own imports are torch, scipy,
  torchdiffeq, torchsde and tqdm.

DiT weights (the reference implementation's and diffusers' layouts) are converted in
``diffusion_lab.models.convert``; ``load_dit_checkpoint`` and ``dit_field`` here turn a checkpoint file into a field.
Importing this module imports neither diffusers nor k-diffusion.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import sys
import types
from dataclasses import dataclass, field as dc_field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ._tensor import as_tensor
from .field import VelocityField
from .schedules import EDM, DDPMDiscrete, Schedule

__all__ = [
    "k_diffusion_sampling", "DiscreteVP", "diffusers_alphas_cumprod", "schedule_from_diffusers", "PREDICTION_TYPES",
    "timestep_of_t", "t_of_timestep", "DiffusersAdapter", "FieldAsDiffusers", "diffusers_loop", "StepStates",
    "step_states", "from_diffusers", "KDenoiserModel", "from_k_diffusion", "k_diffusion_sampler",
    "k_diffusion_samplers", "load_dit_checkpoint", "dit_field", "load_vae", "decode_latents",
]

_K_SAMPLING = None


def _append_dims(x, target_dims):
    """x with trailing singleton dimensions up to target_dims (k-diffusion's helper)."""
    extra = target_dims - x.ndim
    if extra < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * extra]


def k_diffusion_sampling():
    """k_diffusion.sampling as a standalone module (cached); ImportError naming what is missing when
    k-diffusion or one of sampling.py's imports is absent."""
    global _K_SAMPLING
    if _K_SAMPLING is not None:
        return _K_SAMPLING
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    path = Path(list(spec.submodule_search_locations)[0]) / "sampling.py"
    if not path.is_file():
        raise ImportError(f"k-diffusion found but {path} is missing")
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []  # a package with nothing in it, so that the real __init__ is never executed
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = _append_dims
    pkg.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        mspec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
    finally:  # a later real import of k_diffusion must not see the stubs
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    _K_SAMPLING = mod
    return mod


# ================================================================================================
# diffusers: schedules


@dataclass(frozen=True)
class DiscreteVP(DDPMDiscrete):
    r"""A discrete VP schedule given by its cumulative products alphabar_1 > ... > alphabar_N (any beta schedule:
    diffusers' ``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, ``trained_betas`` or an explicit
    ``alphas_cumprod``).

    Continuous time as ``DDPMDiscrete`` (DPM-Solver's ``NoiseScheduleVP('discrete')``): step i = 1..N sits at
    t_i = i/N, log alpha(t) is the piecewise-linear interpolant of the knots (t_i, log sqrt(alphabar_i)) with
    (t_0, 0) added, sigma = sqrt(1 - alpha^2); diffusers' 0-based timestep k is step i = k + 1.

    Parameters
    ----------
    alphas_cumprod : tuple of float
        alphabar_1, ..., alphabar_N, strictly decreasing in (0, 1).
    t_min : float, optional
        Lower end of the time range; default 1/N (diffusers' timestep 0).
    t_max : float
        Upper end, default 1 (timestep N - 1).
    """

    alphas_cumprod_table: tuple = dc_field(default=(), repr=False)
    t_min: float | None = None
    name: ClassVar[str] = "discrete_vp"

    def __post_init__(self):
        acp = tuple(float(a) for a in self.alphas_cumprod_table)
        n = len(acp)
        if n < 2:
            raise ValueError(f"DiscreteVP: need at least 2 cumulative products alphabar_i, got {n}")
        bad = [i for i, a in enumerate(acp) if not (0.0 < a < 1.0) or not math.isfinite(a)]
        if bad:
            raise ValueError(f"DiscreteVP: alphabar_i must lie in (0, 1); alphabar[{bad[0]}] = {acp[bad[0]]!r} "
                             f"(a zero terminal SNR, alphabar_N = 0, has no finite time on a VP schedule)")
        inc = [i for i in range(1, n) if acp[i] >= acp[i - 1]]
        if inc:
            i = inc[0]
            raise ValueError(f"DiscreteVP: alphabar must be strictly decreasing; alphabar[{i}] = {acp[i]!r} >= "
                             f"alphabar[{i - 1}] = {acp[i - 1]!r}")
        object.__setattr__(self, "alphas_cumprod_table", acp)
        object.__setattr__(self, "n_steps", n)
        if self.t_min is None:
            object.__setattr__(self, "t_min", 1.0 / n)
        Schedule.__post_init__(self)  # DDPMDiscrete's checks are about its linear betas, which are not used

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.tensor(self.alphas_cumprod_table, dtype=torch.float64)

    @cached_property
    def betas(self) -> torch.Tensor:
        """beta_i = 1 - alphabar_i / alphabar_{i-1} (alphabar_0 = 1)."""
        acp = self.alphas_cumprod
        prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        return 1.0 - acp / prev

    @cached_property
    def _knots(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(self.n_steps + 1, dtype=torch.float64) / self.n_steps
        log_alpha = torch.cat([torch.zeros(1, dtype=torch.float64), 0.5 * torch.log(self.alphas_cumprod)])
        return t, log_alpha

    def __repr__(self):
        acp = self.alphas_cumprod_table
        return (f"DiscreteVP(n_steps={self.n_steps}, alphabar=[{acp[0]:.6g} .. {acp[-1]:.6g}], t_min={self.t_min}, "
                f"t_max={self.t_max})")

    def settings(self) -> dict:
        """Name, size and end points (the N cumulative products are summarised by their first and last value)."""
        return {"name": self.name, "n_steps": self.n_steps, "t_min": self.t_min, "t_max": self.t_max,
                "alphabar_first": self.alphas_cumprod_table[0], "alphabar_last": self.alphas_cumprod_table[-1]}


def _config_of(scheduler_or_config) -> dict:
    if isinstance(scheduler_or_config, dict):
        return dict(scheduler_or_config)
    cfg = getattr(scheduler_or_config, "config", None)
    if cfg is None:
        raise TypeError(f"expected a diffusers scheduler or its config dict, got {type(scheduler_or_config).__name__}")
    return dict(cfg)


def diffusers_alphas_cumprod(config: dict) -> torch.Tensor:
    r"""The cumulative products alphabar_k = prod_{j <= k} (1 - beta_j), k = 0..N-1, of a diffusers scheduler
    config, computed in float64 from the config's formula (diffusers computes them in float32):

    ::

        linear             beta_k = b0 + (b1 - b0) k/(N - 1)                       (Ho et al. 2020)
        scaled_linear      beta_k = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) k/(N - 1))^2  (latent diffusion)
        squaredcos_cap_v2  beta_k = min(1 - abar(k+1)/abar(k), 0.999),  abar(s) = cos^2(((s/N + 0.008)/1.008) pi/2)
                                                                                   (Nichol & Dhariwal 2021, eq. 17)
        trained_betas      the given betas.

    Parameters
    ----------
    config : dict
        ``num_train_timesteps`` N, ``beta_start`` b0, ``beta_end`` b1, ``beta_schedule``, optional ``trained_betas``.

    Returns
    -------
    torch.Tensor
        (N,) float64.
    """
    n = int(config.get("num_train_timesteps", 1000))
    if n < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {n}")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True sets alphabar_{N-1} = 0 (zero terminal SNR, Lin et al. 2024): "
                         "no finite time of a VP schedule has alpha = 0")
    trained = config.get("trained_betas")
    b0, b1 = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64).reshape(-1)
        if betas.numel() != n:
            raise ValueError(f"trained_betas has {betas.numel()} entries, num_train_timesteps is {n}")
    elif kind == "linear":
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        s = torch.arange(n + 1, dtype=torch.float64) / n
        abar = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.clamp(1.0 - abar[1:] / abar[:-1], max=0.999)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not mapped; use linear, scaled_linear, squaredcos_cap_v2, "
                         f"trained_betas or pass alphas_cumprod explicitly")
    return torch.cumprod(1.0 - betas, 0)


def schedule_from_diffusers(scheduler_or_config=None, *, alphas_cumprod=None) -> DDPMDiscrete:
    """The package schedule of a diffusers noise schedule.

    Parameters
    ----------
    scheduler_or_config : diffusers scheduler or dict, optional
        A scheduler instance: its own ``alphas_cumprod`` tensor is used as is (the values its ``step`` uses, in
        float32 for diffusers' schedulers, represented exactly in float64). A config dict: the beta schedule is
        evaluated in float64 (``diffusers_alphas_cumprod``); the ``linear`` schedule then maps to
        ``DDPMDiscrete(n_steps=N, beta_min=N b0, beta_max=N b1)``.
    alphas_cumprod : sequence of float, optional
        Explicit alphabar_0..alphabar_{N-1}; overrides the scheduler's.

    Returns
    -------
    DDPMDiscrete or DiscreteVP
        t_min = 1/N (timestep 0), t_max = 1 (timestep N - 1).
    """
    if alphas_cumprod is not None:
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).reshape(-1)
        return DiscreteVP(alphas_cumprod_table=tuple(acp.tolist()))
    if scheduler_or_config is None:
        raise ValueError("give a diffusers scheduler, its config dict, or alphas_cumprod=")
    if not isinstance(scheduler_or_config, dict) and hasattr(scheduler_or_config, "alphas_cumprod"):
        acp = torch.as_tensor(scheduler_or_config.alphas_cumprod).to(torch.float64).reshape(-1)
        return DiscreteVP(alphas_cumprod_table=tuple(acp.tolist()))
    cfg = _config_of(scheduler_or_config)
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is None and cfg.get("beta_schedule", "linear") == "linear" \
            and not cfg.get("rescale_betas_zero_snr"):
        b0, b1 = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
        return DDPMDiscrete(n_steps=n, beta_min=b0 * n, beta_max=b1 * n, t_min=1.0 / n)
    return DiscreteVP(alphas_cumprod_table=tuple(diffusers_alphas_cumprod(cfg).tolist()))


#: diffusers' prediction_type -> the package's prediction names (param.PREDICTIONS)
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _snap(k: torch.Tensor) -> torch.Tensor:
    """Round values within 1e-9 of an integer to it (t_k N - 1 carries one rounding of the division)."""
    r = torch.round(k)
    return torch.where((k - r).abs() < 1e-9 * torch.clamp(k.abs(), min=1.0), r, k)


def timestep_of_t(schedule: DDPMDiscrete, t) -> torch.Tensor:
    r"""diffusers' timestep of continuous time t on an N-step discrete schedule: k(t) = N t - 1.

    Exact (an integer, snapped from the one rounding of (k + 1)/N) at the knots t_k = (k + 1)/N; affine in t
    between them, which is the interpolation the schedule uses (log alpha linear in t on each knot interval).

    Parameters
    ----------
    schedule : DDPMDiscrete
    t : float or tensor

    Returns
    -------
    torch.Tensor
        k(t) in t's float dtype (float64 for python numbers).
    """
    t = as_tensor(t)
    return _snap(t.to(torch.float64) * schedule.n_steps - 1.0).to(t.dtype)


def t_of_timestep(schedule: DDPMDiscrete, k) -> torch.Tensor:
    """Continuous time t = (k + 1)/N of diffusers' 0-based timestep k (float64); the inverse of ``timestep_of_t``."""
    k = torch.as_tensor(k).to(torch.float64)
    return (k + 1.0) / schedule.n_steps


def _output_tensor(out) -> torch.Tensor:
    """The tensor of a diffusers output object (``.sample``), a tuple (first entry) or a tensor."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read a tensor from the model output of type {type(out).__name__}")


class DiffusersAdapter:
    r"""``model(x, t)`` for ``VelocityField``: calls a diffusers network ``net(sample, timestep, **kwargs)`` at
    timestep k(t) = N t - 1 (``timestep_of_t``) and returns its prediction.

    x is cast to the network's parameter dtype and the output back to x's dtype. The timestep is passed as a
    (batch,) float64 tensor (a 0-d t expanded, as diffusers' pipelines expand theirs). When the output has twice the
    channels of x (learned variance, Nichol & Dhariwal 2021: DiT's ``learn_sigma`` and diffusers'
    ``variance_type="learned_range"``), the first half is the prediction and the second half is dropped;
    ``learn_sigma`` forces (True) or forbids (False) the split.

    Parameters
    ----------
    net : callable
        A diffusers model (UNet2DModel, DiTTransformer2DModel, UNet2DConditionModel, ...) or any callable with
        diffusers' ``(sample, timestep, **kwargs)`` signature.
    schedule : DDPMDiscrete
        The N-step schedule the timesteps refer to.
    model_kwargs : dict, optional
        Extra keyword arguments of every call (``class_labels``, ``encoder_hidden_states``, ...), passed as given
        (their batch dimension must match x's).
    learn_sigma : bool or None
        None: split when the output has 2C channels for C input channels.
    label_key : str
        The keyword under which a call's ``y`` reaches the network ("class_labels" for diffusers, "y" for
        ``diffusion_lab.models.DiT``).
    """

    def __init__(self, net: Callable, schedule: DDPMDiscrete, model_kwargs: dict | None = None,
                 learn_sigma: bool | None = None, label_key: str = "class_labels"):
        if not callable(net):
            raise TypeError(f"net must be callable (sample, timestep, ...), got {type(net).__name__}")
        if not isinstance(schedule, DDPMDiscrete):
            raise TypeError(f"schedule must be a discrete schedule (DDPMDiscrete / DiscreteVP), got {schedule!r}")
        self.net, self.schedule = net, schedule
        self.model_kwargs = dict(model_kwargs or {})
        self.learn_sigma = learn_sigma
        self.label_key = label_key
        self.calls = 0

    @property
    def num_classes(self) -> int:
        """The network's number of classes (its null class id for classifier-free guidance), 0 if unknown."""
        n = getattr(self.net, "num_classes", None)
        if n is None:
            n = getattr(getattr(self.net, "config", None), "num_embeds_ada_norm", None)
        return int(n or 0)

    def __repr__(self):
        return f"DiffusersAdapter({type(self.net).__name__}, N={self.schedule.n_steps})"

    def _dtype(self, x):
        params = getattr(self.net, "parameters", None)
        if params is not None:
            for p in params():
                return p.dtype
        return x.dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction at (x, t); ``y`` (class labels) overrides the stored labels (``guidance.CFGModel`` passes
        [c; null] this way)."""
        k = timestep_of_t(self.schedule, torch.as_tensor(t, dtype=torch.float64))
        if k.ndim == 0:
            k = k.expand(x.shape[0])  # one timestep per sample, as diffusers' pipelines pass them
        kwargs = self.model_kwargs if y is None else {**self.model_kwargs, self.label_key: y}
        out = _output_tensor(self.net(x.to(self._dtype(x)), k.to(x.device), **kwargs))
        self.calls += 1
        c = x.shape[1]
        split = self.learn_sigma
        if split is None:
            split = out.ndim == x.ndim and out.shape[1] == 2 * c
        if split:
            if out.shape[1] != 2 * c:
                raise ValueError(f"learn_sigma=True needs 2C = {2 * c} output channels, the model gave {out.shape[1]}")
            out = out[:, :c]
        return out.to(x.dtype)


def from_diffusers(model: Callable, scheduler_or_config=None, *, prediction_type: str | None = None,
                   alphas_cumprod=None, learn_sigma: bool | None = None, data_shape: tuple | None = None,
                   check_finite: bool = True, **model_kwargs) -> VelocityField:
    r"""A diffusers network as a ``VelocityField`` on the matching discrete VP schedule.

    The field's model is ``DiffusersAdapter``: at time t it calls ``model(x, k(t), **model_kwargs)`` with
    k(t) = N t - 1 (an integer at the knots t_k = (k + 1)/N, affine between), and its prediction is read as
    ``prediction_type`` (epsilon -> eps, v_prediction -> v, sample -> x0). Samplers of the package then use
    x_t = alpha(t) x_0 + sigma(t) eps with alpha(t_k)^2 = alphabar_k.

    Parameters
    ----------
    model : callable
        UNet2DModel, DiTTransformer2DModel (pass ``class_labels=``; a learn_sigma output of 2C channels is split),
        or any model with diffusers' ``(sample, timestep, ...)`` call; or a pipeline (its ``.unet`` or
        ``.transformer`` with its ``.scheduler``).
    scheduler_or_config : diffusers scheduler or config dict
        Gives the schedule (``schedule_from_diffusers``) and the default ``prediction_type``; optional for a
        pipeline.
    prediction_type : str, optional
        "epsilon", "v_prediction" or "sample"; default the config's (else "epsilon").
    alphas_cumprod : sequence of float, optional
        Explicit alphabar_k instead of the scheduler's.
    learn_sigma : bool or None
        See ``DiffusersAdapter``.
    data_shape, check_finite
        Passed to ``VelocityField``.
    **model_kwargs
        Extra arguments of every network call, e.g. ``class_labels=y`` (a (batch,) tensor) for a DiT.

    Returns
    -------
    VelocityField
    """
    if scheduler_or_config is None and alphas_cumprod is None and hasattr(model, "scheduler"):
        net = getattr(model, "unet", None) or getattr(model, "transformer", None)
        if net is None:
            raise ValueError(f"{type(model).__name__} has a scheduler but neither .unet nor .transformer")
        model, scheduler_or_config = net, model.scheduler
    schedule = schedule_from_diffusers(scheduler_or_config, alphas_cumprod=alphas_cumprod)
    if prediction_type is None:
        cfg = _config_of(scheduler_or_config) if scheduler_or_config is not None else {}
        prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {sorted(PREDICTION_TYPES)}")
    wrapped = DiffusersAdapter(model, schedule, model_kwargs, learn_sigma)
    return VelocityField(schedule, wrapped, PREDICTION_TYPES[prediction_type], data_shape=data_shape,
                         check_finite=check_finite)




# ================================================================================================
# DiT checkpoints and latent decoding (for ``diffusion-lab sample --checkpoint``)


def load_dit_checkpoint(path, *, map_location="cpu", **config_kw):
    """Our DiT with the weights of a checkpoint file (``models.convert``): a reference-layout ``.pt``
    (facebookresearch/DiT, e.g. ``DiT-XL-2-256x256.pt``: a plain state dict or the training script's {"ema", ...}),
    or a diffusers directory (``DiTTransformer2DModel.save_pretrained`` output, or a pipeline directory with a
    ``transformer`` subfolder; needs diffusers). Nothing is downloaded: ``path`` must exist.

    Parameters
    ----------
    path : str or Path
    map_location : passed to ``torch.load``
    **config_kw : passed to ``convert.config_from_reference`` (``num_heads=`` for non-paper widths, ...)

    Returns
    -------
    diffusion_lab.models.DiT
        eval mode, the checkpoint's dtype; learn_sigma checkpoints keep their 2C output channels.
    """
    from .models import convert

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no checkpoint at {p} (weights are never downloaded; give a local file)")
    if p.is_dir():
        from diffusers import DiTTransformer2DModel

        sub = "transformer" if (p / "transformer").is_dir() and not (p / "config.json").exists() else None
        net = DiTTransformer2DModel.from_pretrained(str(p), subfolder=sub, local_files_only=True)
        return convert.dit_from_diffusers(net)
    state = torch.load(p, map_location=map_location, weights_only=True)
    return convert.dit_from_reference(state, **config_kw)


def dit_field(model, labels=None, *, schedule: DDPMDiscrete | None = None, prediction: str = "eps",
              check_finite: bool = True) -> VelocityField:
    """The field of a DiT trained as the reference one: eps prediction on the discrete linear schedule of
    N = 1000 steps (betas 1e-4 .. 0.02, ``DDPMDiscrete()``), the network fed the DDPM step k = N t - 1, and the
    variance channels of a learn_sigma model dropped.

    Parameters
    ----------
    model : diffusion_lab.models.DiT (e.g. from ``load_dit_checkpoint``) or a diffusers DiTTransformer2DModel
    labels : int or (batch,) tensor, optional
        Class labels; ``guidance.classifier_free_guidance(field, w, labels)`` guides it (null id = num_classes).
    schedule : DDPMDiscrete, optional
        Default ``DDPMDiscrete()``.
    prediction : str
        The package's prediction name of the network output (the reference DiT: "eps").

    Returns
    -------
    VelocityField
    """
    schedule = schedule if schedule is not None else DDPMDiscrete()
    key = "y" if not hasattr(model, "config") or not hasattr(model.config, "num_embeds_ada_norm") else "class_labels"
    kwargs = {}
    if labels is not None:
        kwargs[key] = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    adapter = DiffusersAdapter(model, schedule, kwargs, learn_sigma=None, label_key=key)
    return VelocityField(schedule, adapter, prediction, check_finite=check_finite)


def load_vae(path):
    """diffusers' ``AutoencoderKL`` from a local directory (e.g. a copy of stabilityai/sd-vae-ft-ema), eval mode.
    Nothing is downloaded."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no VAE at {p} (weights are never downloaded; give a local directory)")
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(p), local_files_only=True).eval()


def decode_latents(vae, latents: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
    r"""Images in [-1, 1] from latents: ``vae.decode(z / s).sample`` with s the VAE's ``scaling_factor``
    (0.18215 for the Stable Diffusion VAE the DiT latents use; Rombach et al. 2022).

    Parameters
    ----------
    vae : diffusers AutoencoderKL
    latents : (N, 4, H/8, W/8) tensor
    scaling_factor : float, optional
        Default the VAE config's, else 0.18215.

    Returns
    -------
    torch.Tensor
        (N, 3, H, W), clamped to [-1, 1], in the latents' dtype.
    """
    s = scaling_factor if scaling_factor is not None else getattr(getattr(vae, "config", None), "scaling_factor",
                                                                   0.18215)
    dtype = next(vae.parameters()).dtype
    with torch.no_grad():
        img = vae.decode(latents.to(dtype) / float(s)).sample
    return img.clamp(-1.0, 1.0).to(latents.dtype)


class FieldAsDiffusers:
    r"""The other direction: a field of the package as a diffusers epsilon model ``model(x, k)``, answering
    eps_hat(x, t = (k + 1)/N) on the field's N-step discrete schedule (a fractional k by the same affine rule, i.e.
    on the schedule's interpolation). Counts its calls and keeps the timesteps and the last (x, t, eps)."""

    def __init__(self, field: VelocityField, n_train: int | None = None):
        self.field = field
        self.n_train = int(n_train if n_train is not None else field.schedule.n_steps)
        self.calls = 0
        self.timesteps: list[float] = []
        self.last = None

    def t_of(self, k) -> torch.Tensor:
        k = torch.as_tensor(k, dtype=torch.float64).reshape(())
        return (k + 1.0) / self.n_train

    def __call__(self, x, k):
        t = self.t_of(k)
        eps = self.field.eps(x, t)
        self.calls += 1
        self.timesteps.append(float(k))
        self.last = (x, t, eps)
        return eps


def diffusers_loop(scheduler, model: Callable, x_start: torch.Tensor, steps: int, *, alpha_start: float | None = None,
                   callback: Callable | None = None, generator: torch.Generator | None = None,
                   **model_kwargs) -> torch.Tensor:
    r"""diffusers' sampling loop as its pipelines run it (``set_timesteps``, then per timestep k:
    ``scale_model_input``, the model call, ``step``), from an exact sample of p_{t_0}.

    Schedulers whose state is the scaled xbar = x/alpha (``init_noise_sigma`` != 1: Euler, Heun, LMS, ...) start
    from x_start / alpha(t_0); diffusers' pipelines instead start them from ``init_noise_sigma`` times the noise,
    which with "linspace"/"trailing" spacing is sigma_max noise rather than sqrt(1 + sigma_max^2) noise.

    Parameters
    ----------
    scheduler : a diffusers scheduler (``set_timesteps`` is called here)
    model : callable
        ``model(x, k, **model_kwargs)`` returning the prediction (a tensor or an object with ``.sample``).
    x_start : torch.Tensor
        Samples of p_{t_0} in x-space, t_0 the first timestep's time.
    steps : int
        ``num_inference_steps``.
    alpha_start : float, optional
        alpha(t_0), needed for scaled-state schedulers (default: from the scheduler's ``alphas_cumprod``).
    callback : callable, optional
        ``callback(i, k, prev_sample, scheduler)`` after step i.
    generator : torch.Generator, optional
        Passed to ``step`` where it accepts one.

    Returns
    -------
    torch.Tensor
        The scheduler's final ``prev_sample`` (in xbar for scaled-state schedulers that end at sigma > 0, else x).
    """
    scheduler.set_timesteps(steps)
    ts = scheduler.timesteps
    scaled = float(scheduler.init_noise_sigma) != 1.0
    if scaled:
        if alpha_start is None:
            k0 = int(round(float(ts[0])))
            alpha_start = float(torch.as_tensor(scheduler.alphas_cumprod[k0], dtype=torch.float64).sqrt())
        x = x_start / alpha_start
    else:
        x = x_start.clone()
    kw = {"generator": generator} if generator is not None and \
        "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, k in enumerate(ts):
        out = _output_tensor(model(scheduler.scale_model_input(x, k), k, **model_kwargs))
        x = scheduler.step(out, k, x, **kw).prev_sample
        if callback is not None:
            callback(i, k, x, scheduler)
    return x


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|): an absolute difference for states of size <= 1, relative beyond."""
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


@dataclass(frozen=True)
class StepStates:
    r"""diffusers' scheduler loop and one of our samplers, run from the same x_{t_0} on the same timesteps
    k_0 > k_1 > ... > k_{N-1} (our grid t_i = (k_i + 1)/N_train), with their states at t_1, ..., t_{N-1} in x-space.

    Attributes
    ----------
    theirs, ours : torch.Tensor
        (N - 1, *x.shape): the states at t_1..t_{N-1}, diffusers' and ours (our trajectory's states 1..N-1).
    theirs_final, ours_final : torch.Tensor
        The outputs after the last timestep (final="denoise" on our side: D(x_{t_{N-1}})).
    nfe_theirs, nfe_ours : int
        Model calls of diffusers' loop and of ours.
    grid : torch.Tensor
        Our grid t_0..t_{N-1} (float64).
    """

    theirs: torch.Tensor
    ours: torch.Tensor
    theirs_final: torch.Tensor
    ours_final: torch.Tensor
    nfe_theirs: int
    nfe_ours: int
    grid: torch.Tensor

    def step_errors(self) -> list[float]:
        """Per state i = 1..N-1: max |ours_i - theirs_i| / max(1, max |theirs_i|)."""
        return [_relative_difference(a, b) for a, b in zip(self.ours, self.theirs)]

    def final_error(self) -> float:
        """The same relative difference of the outputs."""
        return _relative_difference(self.ours_final, self.theirs_final)


def step_states(scheduler, model: Callable, field: VelocityField, x_start: torch.Tensor, steps: int, method: str,
                *, generator: torch.Generator | None = None, **options) -> StepStates:
    r"""Run diffusers' loop (``diffusers_loop``) with ``model`` and our ``method`` on ``field`` from the same
    x_{t_0}, on the scheduler's own timesteps, and collect both sets of states at t_1..t_{N-1} (``StepStates``).

    Our side samples on the grid t_i = (k_i + 1)/N_train of the scheduler's timesteps k_i (``t_of_timestep``),
    final="denoise" (diffusers' last step returns the denoiser's x_0), with the trajectory kept. diffusers' states
    are read after each ``step`` and brought to x-space:

    * schedulers whose state is xbar = x / alpha (``init_noise_sigma`` != 1: Euler, Heun, ...): x_{i+1} =
      alpha(t_{i+1}) xbar_{i+1};
    * UniPC (Zhao et al. 2023) returns the predictor's state and applies the corrector at the start of the next
      step, keeping the corrected state as ``last_sample``: after step i >= 1 the corrected x_{t_i} is read from
      there; the state at t_{N-1} is the predictor's (the corrector there is never used: the last step returns
      the denoiser of the predicted state, and ours stops at t_{N-1} uncorrected as well);
    * the others: ``prev_sample`` itself.

    Parameters
    ----------
    scheduler : a diffusers scheduler, configured as for the field (``set_timesteps(steps)`` is called here)
    model : callable
        diffusers' side, ``model(x, k)`` (a tensor or an object with ``.sample``); its calls are counted. Pass a
        different callable from ``field``'s network to see what a wrong mapping does.
    field : VelocityField
        Ours, on ``schedule_from_diffusers(scheduler)`` (``from_diffusers(model, scheduler)``).
    x_start : torch.Tensor
        Samples of p_{t_0} in x-space.
    steps : int
        ``num_inference_steps`` N >= 2.
    method : str
        Our sampler (``samplers.sample``); ``options`` are passed to it (e.g. lower_order_final=False).
    generator : torch.Generator, optional
        Passed to diffusers' ``step`` (stochastic schedulers) -- ours draws its own noise, so only deterministic
        pairs can agree.

    Returns
    -------
    StepStates
    """
    from .samplers import sample

    if int(steps) < 2:
        raise ValueError(f"steps must be >= 2 (states at t_1..t_(N-1)), got {steps}")
    if not isinstance(field.schedule, DDPMDiscrete):
        raise TypeError(f"field must be on a discrete schedule (from_diffusers), got {type(field.schedule).__name__}")
    steps = int(steps)
    scheduler.set_timesteps(steps)
    grid = t_of_timestep(field.schedule, scheduler.timesteps)
    alpha = field.schedule.alpha(grid)
    scaled = float(scheduler.init_noise_sigma) != 1.0
    unipc = type(scheduler).__name__.startswith("UniPC")
    states, calls = [], [0]

    def counted(x, k):
        calls[0] += 1
        return model(x, k)

    def keep(i, k, x, s):
        if unipc:
            if 1 <= i <= steps - 2:
                states.append(s.last_sample.clone())
            if i == steps - 2:
                states.append(x.clone())
        elif i + 1 < steps:
            states.append(x * alpha[i + 1] if scaled else x.clone())

    with torch.no_grad():
        theirs = diffusers_loop(scheduler, counted, x_start, steps, alpha_start=float(alpha[0]), callback=keep,
                                generator=generator)
        res = sample(field, x_start, method, grid=grid, final="denoise", return_trajectory=True, **options)
    if len(states) != steps - 1:  # a scheduler whose state this reading does not know
        raise RuntimeError(f"collected {len(states)} diffusers states for {steps} steps, expected {steps - 1}")
    return StepStates(theirs=torch.stack(states), ours=res.trajectory[1:steps], theirs_final=theirs,
                      ours_final=res.x, nfe_theirs=calls[0], nfe_ours=int(res.nfe), grid=grid)


# ================================================================================================
# k-diffusion: denoisers as fields, our samplers in its calling convention


class KDenoiserModel:
    r"""``model(x, t)`` for ``VelocityField`` on the EDM schedule (alpha = 1, sigma = t): calls a k-diffusion
    denoiser ``denoiser(x, sigma, **extra_args)`` with sigma = t as a (batch,) tensor and returns
    D(x; sigma) = E[x_0 | x_sigma = x] (Karras et al. 2022, eq. 1-3). The last output is kept in ``last``."""

    def __init__(self, denoiser: Callable, extra_args: dict | None = None):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable (x, sigma, **extra_args), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.extra_args = dict(extra_args or {})
        self.calls = 0
        self.last = None

    def __repr__(self):
        return f"KDenoiserModel({type(self.denoiser).__name__})"

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma * x.new_ones([x.shape[0]])  # k-diffusion's sigma * s_in
        d = self.denoiser(x, sigma, **self.extra_args)
        self.calls += 1
        self.last = d
        return d


def from_k_diffusion(denoiser: Callable, sigma_min: float | None = None, sigma_max: float | None = None, *,
                     extra_args: dict | None = None, data_shape: tuple | None = None,
                     check_finite: bool = True) -> VelocityField:
    r"""A k-diffusion denoiser D(x; sigma) as a field on the EDM schedule, x_sigma = x_0 + sigma eps (Karras et al.
    2022 with s(t) = 1, sigma(t) = t): the PF-ODE is dx/dsigma = (x - D(x; sigma))/sigma.

    A model in k-diffusion's scaled coordinates of a VP network (``k_diffusion.external.DiscreteEpsDDPMDenoiser``
    and the like: x/alpha against sigma/alpha) is such a denoiser; its ``sigma_min`` / ``sigma_max`` attributes give
    the time range unless given here.

    Parameters
    ----------
    denoiser : callable
        ``denoiser(x, sigma, **extra_args) -> D``, sigma a (batch,) tensor.
    sigma_min, sigma_max : float, optional
        Time range [t_min, t_max] of the schedule; default the denoiser's attributes, else EDM's 0.002 and 80.
    extra_args : dict, optional
        Keyword arguments of every call (conditioning, ``cond_scale``, ...).

    Returns
    -------
    VelocityField
        prediction "x0" on ``EDM(t_min=sigma_min, t_max=sigma_max)``.
    """
    lo = sigma_min if sigma_min is not None else getattr(denoiser, "sigma_min", 0.002)
    hi = sigma_max if sigma_max is not None else getattr(denoiser, "sigma_max", 80.0)
    schedule = EDM(t_min=float(lo), t_max=float(hi))
    return VelocityField(schedule, KDenoiserModel(denoiser, extra_args), "x0", data_shape=data_shape,
                         check_finite=check_finite)


def _k_options(fn: Callable, to_zero: bool, options: dict) -> dict:
    """Our method's options in k-diffusion's convention: when the sigma list ends at 0 the step to sigma = 0 is the
    method's first-order final step (the denoiser), so the last step before it keeps its full order
    (``final_euler=False``, ``lower_order_final=False``) unless the caller sets these options."""
    params = inspect.signature(fn).parameters
    out = dict(options)
    if to_zero:
        if "final_euler" in params:
            out.setdefault("final_euler", False)
        if "lower_order_final" in params:
            out.setdefault("lower_order_final", False)
    return out


def k_diffusion_sampler(method: str) -> Callable:
    r"""Our registered ``method`` as a k-diffusion sampler ``sample_<method>(model, x, sigmas, extra_args=None,
    callback=None, disable=None, **options)``.

    The returned function integrates the PF-ODE (or the method's SDE) of ``from_k_diffusion(model)`` over the
    positive part of ``sigmas`` (strictly decreasing; the EDM schedule's time is sigma) starting from x at
    sigmas[0]; when ``sigmas`` ends with 0 the last step is the denoiser D(x; sigma_{n-1}) (``final="denoise"``),
    which is exactly k-diffusion's first-order step to sigma = 0. ``options`` are the method's own (``eta``,
    ``generator``, ``order``, ...). ``callback`` receives, after each step i (0-based) from sigmas[i] to
    sigmas[i+1], the dict {"x": state at sigmas[i+1], "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i+1],
    "denoised": the latest denoiser output}; k-diffusion's own samplers call it before the step, with the state at
    sigmas[i]. ``disable`` False shows a progress bar; None and True do not. Runs under ``torch.no_grad()``, as
    k-diffusion's samplers do.

    Parameters
    ----------
    method : str
        A registered method (``samplers.available()``); the budget-only methods "auto" / "auto_sde" are not
        exported (a sigma list fixes the grid they would choose).

    Returns
    -------
    callable
    """
    from .samplers import check_grid, get_method

    info = get_method(method)
    if info.family == "auto":
        raise ValueError(f"method {method!r} chooses its own grid from an NFE budget; it takes no sigma list")

    @torch.no_grad()  # as k-diffusion's samplers
    def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        s = torch.as_tensor(sigmas).detach().to(torch.float64).reshape(-1).cpu()
        if s.numel() < 2:
            raise ValueError(f"sigmas needs at least 2 entries, got {s.tolist()}")
        to_zero = bool(s[-1] == 0)
        grid = s[:-1] if to_zero else s
        if (grid <= 0).any():
            raise ValueError(f"sigmas must be positive except a final 0, got {s.tolist()}")
        field = from_k_diffusion(model, float(grid[-1]), float(grid[0]) if grid.numel() > 1 else float(grid[0]) * 2,
                                 extra_args=extra_args)
        wrapped = field.model

        def report(i, xi):  # after the step sigmas[i - 1] -> sigmas[i]
            if callback is not None:
                callback({"x": xi, "i": i - 1, "sigma": s[i - 1], "sigma_next": s[i], "denoised": wrapped.last})

        if grid.numel() > 1:
            grid = check_grid(field.schedule, grid)
            x = info.fn(field, x, grid, callback=report, progress=disable is False,
                        **_k_options(info.fn, to_zero, options))[0]
        if to_zero:
            x = field.denoiser(x, grid[-1])
            report(len(s) - 1, x)
        return x

    sampler.__name__ = sampler.__qualname__ = f"sample_{method}"
    sampler.__doc__ = (f"diffusion_lab's {method!r} ({info.description}) in k-diffusion's calling convention; "
                       f"see diffusion_lab.interop.k_diffusion_sampler.")
    return sampler


def k_diffusion_samplers() -> dict[str, Callable]:
    """{"sample_<name>": sampler} for every registered method except the budget-only "auto" family
    (``k_diffusion_sampler``)."""
    from .samplers import available

    return {f"sample_{m.name}": k_diffusion_sampler(m.name) for m in available() if m.family != "auto"}


def __getattr__(name: str):
    """``diffusion_lab.interop.sample_<method>``: our method in k-diffusion's calling convention."""
    if name.startswith("sample_"):
        from .samplers import get_method

        method = name[len("sample_"):]
        try:
            get_method(method)
        except ValueError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} (no registered method "
                                 f"{method!r})") from None
        fn = k_diffusion_sampler(method)
        globals()[name] = fn
        return fn
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    from .samplers import available

    return sorted(set(globals()) | {f"sample_{m.name}" for m in available() if m.family != "auto"})
