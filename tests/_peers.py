"""Loading peer code for equivalence tests. Tests skip when the PEER is missing, never when our code is."""
import pytest


def k_diffusion_sampling():
    """k-diffusion's ``sampling`` module (``diffusion_lab.interop.k_diffusion_sampling``); pytest.skip if
    k-diffusion or its sampling dependencies (torchsde, torchdiffeq, scipy) are missing."""
    from diffusion_lab.interop import k_diffusion_sampling as load

    try:
        return load()
    except ImportError as exc:
        pytest.skip(f"k-diffusion's sampling.py does not load: {exc}")
