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


def langevin_bias(rows: list[dict], path: str) -> None:
    """ULA bias (closed form and Monte Carlo) and MALA bias against h on log-log axes, with a slope-1 line."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    h = [r["h"] for r in rows]
    ax.loglog(h, [r["ula_bias_exact"] for r in rows], "-", label="ULA, exact v/(1-h/2v) - v")
    ax.errorbar(h, [r["ula_bias_mc"] for r in rows], yerr=[2 * r["mc_se"] for r in rows], fmt="o", label="ULA, Monte Carlo")
    ax.errorbar(h, [max(abs(r["mala_bias_mc"]), 1e-6) for r in rows], yerr=[2 * r["mc_se"] for r in rows], fmt="s",
                label="MALA |bias|, Monte Carlo")
    ax.loglog(h, [r["mc_se"] for r in rows], ":", color="gray", label="Monte-Carlo SE")
    ax.loglog([h[0], h[-1]], [h[0] / 2, h[-1] / 2], "--", color="k", lw=1, label="slope 1 (h/2)")
    ax.set(xlabel="step size h", ylabel="variance bias", title="ULA vs MALA on N(0, 1)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_panels(samples: dict, path: str, titles: dict | None = None, lim: float | None = None) -> None:
    """One scatter panel per named 2-D sample set."""
    plt = _mpl()
    fig, axes = plt.subplots(1, len(samples), figsize=(4 * len(samples), 4), squeeze=False)
    for ax, (name, x) in zip(axes[0], samples.items()):
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4)
        ax.set_title((titles or {}).get(name, name), fontsize=9)
        if lim:
            ax.set(xlim=(-lim, lim), ylim=(-lim, lim))
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def metric_vs_nfe(rows: list[dict], path: str, key: str, err_key: str | None = None, floor: float | None = None,
                  title: str = "") -> None:
    """A metric against NFE, one line per sampler, with error bars and an optional Monte-Carlo floor."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name in dict.fromkeys(r["sampler"] for r in rows):
        rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        ax.errorbar([r["nfe"] for r in rs], [r[key] for r in rs],
                    yerr=[2 * r[err_key] for r in rs] if err_key else None, fmt="o-", label=name, capsize=3)
    if floor is not None:
        ax.axhline(floor, color="gray", ls=":", label="Monte-Carlo floor")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=key, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fokker_planck_heatmaps(panels: list[dict], extent: tuple, path: str, title: str = "") -> None:
    """Grid of 2-D density heat maps, one row per equation and one column per time.

    ``panels``: dicts with ``row`` (label), ``t``, ``density`` (n0 x n1 array, axis 0 = x) and optional ``note``
    (e.g. the TV to the exact p_t); ``extent`` = (x_lo, x_hi, y_lo, y_hi)."""
    plt = _mpl()
    rows = list(dict.fromkeys(p["row"] for p in panels))
    ncol = max(sum(1 for p in panels if p["row"] == r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.6 * ncol, 2.6 * len(rows)), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i, r in enumerate(rows):
        for j, p in enumerate(pp for pp in panels if pp["row"] == r):
            ax = axes[i, j]
            ax.set_axis_on()
            ax.imshow(p["density"].T, origin="lower", extent=extent, cmap="magma", aspect="equal")
            label = f"t = {p['t']:g}" + (f"\n{p['note']}" if p.get("note") else "")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(r, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def density_curves(x, curves: dict, path: str, xlim=None, title: str = "") -> None:
    """One panel per key of ``curves`` (e.g. a guidance weight), each overlaying named 1-D densities on grid x."""
    plt = _mpl()
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.8), squeeze=False)
    for ax, (key, dens) in zip(axes[0], curves.items()):
        for i, (name, p) in enumerate(dens.items()):
            ax.plot(x, p, lw=2.2 if i == 0 else 1.2, ls="-" if i == 0 else ("--" if "FP" in name else "-"), label=name)
        ax.set_title(f"w = {key:g}" if isinstance(key, (int, float)) else str(key))
        if xlim:
            ax.set_xlim(*xlim)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def convergence_orders(rows: list[dict], path: str) -> None:
    """Left: error against NFE per method (log-log) with slope guides; right: fitted order against t_min."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    orders = [r for r in rows if r["part"] == "orders"]
    for m in dict.fromkeys(r["method"] for r in orders):
        rs = [r for r in orders if r["method"] == m]
        axes[0].loglog([r["nfe"] for r in rs], [r["error"] for r in rs], "o-",
                       label=f"{m} (fit {rs[0]['fitted_order']:.2f}, theory {rs[0]['expected_order']})")
    if orders:
        n0, n1 = min(r["nfe"] for r in orders), max(r["nfe"] for r in orders)
        e0 = max(r["error"] for r in orders)
        for p in (1, 2, 3):
            axes[0].loglog([n0, n1], [e0, e0 * (n0 / n1) ** p], ":", color="gray", lw=1)
    axes[0].set(xlabel="NFE", ylabel="mean |x - Phi(x_T)|", title="bimodal 1-D, VP, exact quantile flow map")
    axes[0].legend(fontsize=7)
    br = [r for r in rows if r["part"] == "breakdown"]
    for key in dict.fromkeys((r["method"], r.get("grid", "")) for r in br):
        rs = [r for r in br if (r["method"], r.get("grid", "")) == key]
        axes[1].semilogx([r["t_min"] for r in rs], [r["fitted_order"] for r in rs],
                         "o-" if key[1] != "uniform" else "s--", label=f"{key[0]} ({key[1]} grid)")
        axes[1].axhline(rs[0]["expected_order"], color="gray", ls=":", lw=1)
    axes[1].set(xlabel="t_min", ylabel="fitted order (N = 16..128)", title="order break-down as t_min -> 0")
    axes[1].invert_xaxis()
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
