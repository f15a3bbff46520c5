"""Printing and saving catalogue results (the only I/O of theory_checks)."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time

from .catalogue import Result


def _fmt(v: float) -> str:
    if v != v:
        return "nan"
    if v == 0:
        return "0"
    if math.isinf(v):
        return "inf"
    return f"{v:.2e}"


def table(results: list[Result]) -> str:
    """A plain-text table: name, area, kind, residual, tolerance, pass (claims show their verdict)."""
    header = ("name", "area", "kind", "residual", "tol", "pass")
    rows = []
    for r in results:
        c = r.check
        tol = f"-> {c.expected_verdict}" if c.kind == "claim" else _fmt(c.tol)
        res = (r.verdict or "error") if c.kind == "claim" else _fmt(r.residual)
        rows.append((c.name, c.area, c.kind, res, tol, "PASS" if r.passed else "FAIL"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    for r in results:
        if r.check.kind == "claim" or not r.passed:
            lines.append(f"  {r.check.name}: {r.detail}")
    n_pass = sum(r.passed for r in results)
    lines.append(f"{n_pass} passed, {len(results) - n_pass} failed")
    return "\n".join(lines)


def to_json(results: list[Result], path: str, seconds: float) -> None:
    """Write the results as strict JSON (non-finite numbers as null), atomically."""
    import numpy
    import scipy
    import torch

    import diffusion_lab

    doc = {
        "checks": [r.row() for r in results],
        "passed": sum(r.passed for r in results),
        "failed": sum(not r.passed for r in results),
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "diffusion_lab": diffusion_lab.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "platform": platform.platform(),
        },
    }
    text = json.dumps(_finite(doc), indent=2, default=float, allow_nan=False)  # NaN / inf are not JSON: null
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w") as fh:  # written whole, then renamed: a failed write leaves no partial file
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _finite(obj):
    """``obj`` with every non-finite float (a crashed check's NaN residual, an infinite one) replaced by None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
