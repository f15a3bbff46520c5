r"""k-diffusion's samplers driven by one of our exact fields, for ``benchmarks/peers.py``.

k-diffusion (Crowson, https://github.com/crowsonkb/k-diffusion) works in EDM coordinates: the state is
xbar = x/alpha, the noise level sigmabar = sigma/alpha = e^{-lambda}, and the model is a denoiser
D(xbar, sigmabar) = E[x_0 | x_t] (Karras et al. 2022, eq. 1-3). Our field on any VP schedule gives it as

    t(sigmabar) = schedule.t_from_lam(-log sigmabar),   D(xbar, sigmabar) = field.denoiser(alpha(t) xbar, t).

Only ``k_diffusion/sampling.py`` is loaded, as a standalone module (``diffusion_lab.interop``: its package
``__init__`` imports training extras a benchmark does not need).

Numerics: k-diffusion builds some tensors with torch's default dtype (``torch.linspace`` in
``get_sigmas_karras``, ``torch.tensor(sigma_max)`` in ``sample_dpm_fast``); every call here runs with the default
dtype set to float64 (restored afterwards), so its sigma lists and log-sigma grids are float64 like our model.
The samplers' own options are left at their defaults.
"""
from __future__ import annotations

import contextlib
import math

import torch

#: deterministic samplers taking a sigma list (steps -> NFE)
DETERMINISTIC = {
    "sample_euler": lambda n: n,
    "sample_heun": lambda n: 2 * n - 1,      # the last step (to sigma = 0) is Euler
    "sample_dpm_2": lambda n: 2 * n - 1,     # idem
    "sample_lms": lambda n: n,
    "sample_dpmpp_2m": lambda n: n,
    "sample_dpm_fast": lambda n: n,          # n is the NFE budget itself (orders 3, ..., 3, then 2/1)
}
#: stochastic samplers taking a sigma list
STOCHASTIC = {
    "sample_euler_ancestral": lambda n: n,
    "sample_dpm_2_ancestral": lambda n: 2 * n - 1,
    "sample_dpmpp_2s_ancestral": lambda n: 2 * n - 1,
    "sample_dpmpp_sde": lambda n: 2 * n - 1,
    "sample_dpmpp_2m_sde": lambda n: n,
    "sample_dpmpp_3m_sde": lambda n: n,
}

def load():
    """k_diffusion.sampling as a standalone module (``diffusion_lab.interop.k_diffusion_sampling``, cached).
    Raises ImportError when k-diffusion is absent."""
    from diffusion_lab.interop import k_diffusion_sampling

    return k_diffusion_sampling()


def version() -> str | None:
    try:
        from importlib.metadata import version as v

        return v("k-diffusion")
    except Exception:
        return None


@contextlib.contextmanager
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class KDenoiser:
    """``model(xbar, sigmabar) -> D``: the exact denoiser in k-diffusion's coordinates; counts calls and keeps
    the last (xbar, sigmabar, D) so that the caller can tell whether an output is the last denoiser."""

    def __init__(self, field):
        self.field = field
        self.schedule = field.schedule
        self.calls = 0
        self.sigmas: list[float] = []
        self.last = None

    def t_of(self, sigmabar: float) -> float:
        return float(self.schedule.t_from_lam(torch.tensor(-math.log(sigmabar), dtype=torch.float64)))

    def __call__(self, xbar, sigma, **_):
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
        if not torch.all(s == s[0]):
            raise ValueError(f"one noise level per call expected, got {s.tolist()[:4]}...")
        sb = float(s[0])
        t = self.t_of(sb)
        a = float(self.schedule.alpha(t))
        d = self.field.denoiser(a * xbar, t)
        self.calls += 1
        self.sigmas.append(sb)
        self.last = (xbar, sb, d)
        return d


def sigma_range(schedule, n_train: int = 1000) -> tuple[float, float]:
    """(sigma_min, sigma_max) of the model: sigmabar at t = 1/N and at t = 1 (DDPMDiscrete's first and last knot)."""
    lo = math.exp(-float(schedule.lam(torch.tensor(1.0 / n_train, dtype=torch.float64))))
    hi = math.exp(-float(schedule.lam(torch.tensor(1.0, dtype=torch.float64))))
    return lo, hi


def karras_sigmas(n: int, sigma_min: float, sigma_max: float):
    """k-diffusion's default grid: ``get_sigmas_karras(n, sigma_min, sigma_max, rho=7)``, 0 appended (float64)."""
    K = load()
    with float64_default():
        return K.get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0).to(torch.float64)


def run(name: str, field, x_start: torch.Tensor, steps: int, *, seed: int | None = None, noise=None) -> dict:
    """Run k-diffusion's ``name`` with its default options from x_start = samples of p_{t=1} (in x, not xbar).

    Returns the output in x-space and how it ends: ``end`` "x(t_e)" (sample_dpm_fast: the state at sigma_min,
    t_e = 1/N), "D@t_last" (the output equals the denoiser of the last model call, to round-off), or "x(0)"
    (another sigma = 0 output, e.g. LMS's multistep step to sigma = 0). ``seed`` seeds torch's global generator
    before the call: the ancestral samplers draw ``torch.randn_like`` and the SDE ones seed their Brownian tree
    from it. ``noise`` (K, *x.shape), for the stochastic samplers only, replaces their noise sampler by one that
    returns noise[0], noise[1], ... in call order (K must be at least the number of calls, ``noise_draws`` in the
    result; a (0, ...) tensor counts the calls and returns zeros). For samplers whose noise of one step is one
    standard normal independent of the others this is their law; it is not for ``sample_dpmpp_sde``, which
    draws twice per step from a Brownian tree on nested intervals.
    """
    K = load()
    schedule = field.schedule
    fn = getattr(K, name)
    s_min, s_max = sigma_range(schedule)
    t_s = 1.0
    a_s = float(schedule.alpha(t_s))
    model = KDenoiser(field)
    xbar = x_start / a_s
    if seed is not None:
        torch.manual_seed(seed)
    kw, draws = {}, [0]
    if noise is not None:
        if name not in STOCHASTIC:
            raise ValueError(f"{name} is deterministic: it takes no noise")
        k_avail = int(noise.shape[0])

        def noise_sampler(sigma, sigma_next):
            i = draws[0]
            draws[0] += 1
            if k_avail == 0:
                return torch.zeros_like(xbar)
            if i >= k_avail:
                raise ValueError(f"{name}: noise has {k_avail} draws but the sampler asks for more")
            return noise[i].to(xbar)

        kw["noise_sampler"] = noise_sampler
    with float64_default():
        if name == "sample_dpm_fast":
            out = fn(model, xbar, s_min, s_max, steps, disable=True)
            sigmas = None
        else:
            sigmas = karras_sigmas(steps, s_min, s_max)
            out = fn(model, xbar, sigmas, disable=True, **kw)
    res = {"nfe": model.calls, "t_start": t_s, "steps": steps, "calls_at_sigma": model.sigmas,
           "noise_draws": draws[0] if noise is not None else None}
    if out.dtype != torch.float64:
        raise RuntimeError(f"k-diffusion {name} returned {out.dtype}; expected float64")
    if name == "sample_dpm_fast":  # ends at sigma_min without a final denoise
        t_e = model.t_of(s_min)
        t_e = round(t_e * 1000) / 1000 if abs(t_e * 1000 - round(t_e * 1000)) < 1e-6 else t_e
        res.update(x=out * float(schedule.alpha(t_e)), end="x(t_e)", t_end=t_e)
        return res
    xl, sl, dl = model.last
    dev = float((out - dl).abs().max() / (1.0 + dl.abs().max()))
    t_last = model.t_of(sl)
    if abs(t_last * 1000 - round(t_last * 1000)) < 1e-6:  # a knot up to round-off of exp/log
        t_last = round(t_last * 1000) / 1000
    res.update(x=out, dev_from_last_denoiser=dev)
    if dev < 1e-5:
        res.update(end="D@t_last", t_end=t_last)
    else:
        res.update(end="x(0)", t_end=0.0, t_last=t_last)
    return res


def steps_for_budget(name: str, budget: int) -> int | None:
    """Largest step count whose NFE (the counts above, checked against the counted calls on every run) fits."""
    count = DETERMINISTIC.get(name) or STOCHASTIC[name]
    for n in range(budget, 0, -1):
        if count(n) <= budget:
            return n
    return None
