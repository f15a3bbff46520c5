"""Matplotlib figures. Nothing else in the package imports matplotlib."""
from __future__ import annotations

import math


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def error_vs_nfe(rows: list[dict], path: str, title: str = "", floor: float | None = None) -> None:
    """Two log-log panels: terminal error vs the exact flow map (deterministic samplers, with reference
    slopes -1, -2, -3) and sliced W2 to the target law (all samplers, with the Monte-Carlo floor)."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for name in samplers:
        rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        fe = [r["flow_error"] for r in rs]
        style = "--" if rs[0]["stochastic"] else "-"
        if not all(math.isnan(v) for v in fe):
            axes[0].loglog(nfe, fe, "o" + style, label=name)
        axes[1].loglog(nfe, [r["sw2"] for r in rs], "o" + style, label=name)
    det = [r for r in rows if not math.isnan(r["flow_error"])]
    if det:
        n0 = min(r["nfe"] for r in det)
        n1 = max(r["nfe"] for r in det)
        e0 = max(r["flow_error"] for r in det if r["nfe"] == n0)
        for p in (1, 2, 3):
            axes[0].loglog([n0, n1], [e0, e0 * (n0 / n1) ** p], ":", color="gray", lw=1)
            axes[0].annotate(f"slope -{p}", (n1, e0 * (n0 / n1) ** p), fontsize=8, color="gray")
    if floor is not None:
        axes[1].axhline(floor, color="gray", ls=":", lw=1)
        axes[1].annotate("exact flow map (Monte-Carlo floor)", (axes[1].get_xlim()[0], floor), fontsize=8, color="gray", va="bottom")
    axes[0].set(xlabel="NFE", ylabel="mean ||x - Phi(x_T)||", title="terminal error vs exact PF-ODE flow map")
    axes[1].set(xlabel="NFE", ylabel="sliced W2", title="distribution error vs exact samples")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
