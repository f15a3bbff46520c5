"""Helpers of the subcommands that train or load a network: training data, preview samples and their figure."""
from __future__ import annotations

TRAIN_DATA_HELP = "ring8 and the other exact targets (samples), moons / swiss_roll / checkerboard, digits (sklearn 8x8)"


def train_data(name: str, n: int, seed: int, conditional: bool):
    """(x, labels or None, description) of a training set; raises ValueError naming a bad choice."""
    import torch

    from ..targets import SAMPLE_ONLY, TARGETS, digits, get_target

    g = torch.Generator().manual_seed(seed)
    if name == "digits":
        x, y = digits(return_labels=True)
        return x, y, "sklearn digits (1797 images, 8x8, scaled to [-1, 1])"
    if name in TARGETS:
        x, k = get_target(name).sample(n, g, dtype=torch.float32, return_labels=True)
        return x, (k if conditional else None), f"{n} samples of the exact target {name}"
    if name in SAMPLE_ONLY:
        if conditional:
            raise ValueError(f"--conditional needs class labels; {name!r} has none (use an exact target or digits)")
        return SAMPLE_ONLY[name](n, g).to(torch.float32), None, f"{n} samples of {name}"
    raise ValueError(f"unknown data {name!r}; choose one of {train_data_choices()}")


def train_data_choices() -> list:
    from ..targets import SAMPLE_ONLY, TARGETS

    return sorted(TARGETS) + sorted(SAMPLE_ONLY) + ["digits"]


def preview(field, meta: dict, n: int, seed: int, labels=None, w: float = 0.0, method: str = "dpmpp_2m",
            steps: int | None = 25, final: str = "denoise", grid_kind: str = "logsnr", nfe: int | None = None,
            options: dict | None = None):
    """Samples of a learned field from p_{t_max} (standard normal times sigma(t_max)), optionally with CFG: ``steps``
    steps of ``method`` (or an NFE budget ``nfe``) with its ``options``."""
    import torch

    from ..guidance import classifier_free_guidance
    from ..samplers import sample

    sch = field.schedule
    g = torch.Generator().manual_seed(seed)
    shape = tuple(meta["data_shape"])
    x = torch.randn((n, *shape), generator=g, dtype=torch.float64) * float(sch.sigma(torch.tensor(sch.t_max, dtype=torch.float64)))
    if labels is not None:
        field.model.labels = labels
        if w != 0.0:
            field = classifier_free_guidance(field, w, labels)
    if nfe is not None:
        steps = None
    return sample(field, x, method, steps=steps, nfe=nfe, final=final, generator=g, grid_kind=grid_kind,
                  **(options or {}))


def save_preview(x, labels, meta: dict, path: str, title: str) -> None:
    """2-D data: a scatter panel; images: a grid (one row per class when labelled, else up to 8 rows of 10)."""
    from ..plots import image_grid, sample_panels

    if len(meta["data_shape"]) == 1 and meta["data_shape"][0] == 2:
        sample_panels({"samples": x.cpu()}, path, {"samples": title})
    elif len(meta["data_shape"]) == 3:
        x = x.clamp(-1, 1).cpu()
        if labels is not None:
            k = int(labels.max()) + 1
            rows = [x[labels == c][:10] for c in range(k)]
            image_grid(rows, path, row_titles=[f"class {c}" for c in range(k)], title=title)
        else:
            image_grid([x[i:i + 10] for i in range(0, min(len(x), 80), 10)], path, title=title)
