r"""The one place that knows peer libraries' internals (optional imports only).

``k_diffusion_sampling()`` loads k-diffusion's ``sampling.py`` (Crowson; Karras et al. 2022) on its own: the
installed package's ``__init__`` imports training extras (image libraries, wandb, ...) that a sampler comparison
does not need, so a stub package ``k_diffusion`` with a stub ``k_diffusion.utils`` (the one helper
``append_dims`` that sampling.py uses) is put into ``sys.modules`` while the file executes, and ``sys.modules``
is restored afterwards. sampling.py's own imports are torch, scipy, torchdiffeq, torchsde and tqdm.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

__all__ = ["k_diffusion_sampling"]

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
