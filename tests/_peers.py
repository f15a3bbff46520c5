"""Loading peer code for equivalence tests: k-diffusion's sampling.py on its own (its package __init__ imports
training extras we do not install). Tests skip when the PEER is missing, never when our code is."""
import importlib.util
import sys
import types

import pytest


def k_diffusion_sampling():
    """k-diffusion's ``sampling`` module, loaded with stub ``k_diffusion`` / ``k_diffusion.utils`` packages (only
    ``utils.append_dims`` is used), restoring sys.modules afterwards; pytest.skip if k-diffusion or its sampling
    dependencies (torchsde, torchdiffeq, scipy) are missing."""
    for dep in ("scipy", "torchsde", "torchdiffeq"):
        pytest.importorskip(dep)
    spec0 = importlib.util.find_spec("k_diffusion")
    if spec0 is None or not spec0.submodule_search_locations:
        pytest.skip("k-diffusion is not installed")
    path = list(spec0.submodule_search_locations)[0] + "/sampling.py"
    saved = {k: sys.modules.get(k) for k in ("k_diffusion", "k_diffusion.utils")}
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = []
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    pkg.utils = utils
    sys.modules["k_diffusion"], sys.modules["k_diffusion.utils"] = pkg, utils
    try:
        spec = importlib.util.spec_from_file_location("k_diffusion.sampling", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except ImportError as exc:
        pytest.skip(f"k-diffusion's sampling.py does not load: {exc}")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod
