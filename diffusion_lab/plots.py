"""Matplotlib figures, in one style. Nothing else in the package imports matplotlib.

Every figure function draws under the package style (``STYLE``: sizes, grid, frameless legends) and writes its file
atomically, in the format of the path's extension (png, pdf or svg). ``style(dpi=...)`` sets the resolution of
every figure written inside it. Shared conventions: one (colour, marker) pair per line that stays distinct beyond
ten lines (``line_style``), plain tick labels at the NFE budgets (``nfe_ticks``), legends outside the data,
reference slopes drawn through the asymptotic (largest-NFE) end of the data (``slope_guides``), Monte-Carlo floors
as bands, colour bars and axis labels on density maps.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager

#: the package's matplotlib settings (entered around every figure function)
STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "legend.frameon": False, "axes.grid": False, "grid.alpha": 0.3, "lines.markersize": 4,
    "savefig.bbox": "tight", "figure.dpi": 100,
}

FORMATS = ("png", "pdf", "svg")


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextmanager
def style(dpi: int | None = None):
    """Write the figures made inside the block at ``dpi`` dots per inch (default: each figure's own).

    Parameters
    ----------
    dpi : int or None
        Resolution of raster output (png); pdf and svg are vector and use it only for embedded images.
    """
    import matplotlib

    if dpi is not None and (int(dpi) != dpi or dpi < 1):
        raise ValueError(f"dpi must be an integer >= 1, got {dpi!r}")
    with matplotlib.rc_context({"savefig.dpi": dpi} if dpi is not None else {}):
        yield


def _styled(fn):
    """Run a figure function under ``STYLE`` (the caller's savefig.dpi, set by ``style``, is kept)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib

        _mpl()
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _save(fig, path: str, dpi: int = 100, layout: bool = True) -> None:
    """Lay out (unless ``layout`` is false: colour bars placed by ``fig.colorbar(ax=...)``), write (atomically,
    format from the extension) and close a figure (every figure function ends here). ``dpi`` is the figure's own
    resolution, overridden by ``style(dpi=...)``."""
    import os

    import matplotlib
    import matplotlib.pyplot as plt

    from ._io import atomic_write

    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in FORMATS:
        plt.close(fig)
        raise ValueError(f"figure path {path!r}: the extension must be one of {', '.join(FORMATS)}")
    chosen = matplotlib.rcParams["savefig.dpi"]
    dpi = chosen if isinstance(chosen, (int, float)) else dpi
    if layout:
        fig.tight_layout()
    try:
        # legends placed outside the axes stay in the file (bbox_inches='tight')
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt))
    finally:
        plt.close(fig)


_MARKERS = "osD^v<>pPX*h"


def line_style(i: int) -> tuple[str, str]:
    """A distinct (colour, marker) pair for the i-th line: 10 colours x 12 markers, so more than ten lines never
    share both (line i and line i + 10 share a colour, not a marker)."""
    return f"C{i % 10}", _MARKERS[(i // 10 + i) % len(_MARKERS)]


_style = line_style  # the name used before it was public


def nfe_ticks(ax, nfes) -> None:
    """Plain integer ticks on a log NFE axis (5 10 20 50, not 5x10^0): at the budgets themselves when they are few
    and spread out (each at least 1.3x the previous), else at 1-2-5 multiples of powers of ten inside their range."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    vals = sorted({float(v) for v in nfes if v > 0})
    if not vals:
        return
    crowded = len(vals) > 8 or any(b / a < 1.3 for a, b in zip(vals, vals[1:]))
    if crowded:
        lo, hi = vals[0], vals[-1]
        ticks = [m * 10 ** k for k in range(int(math.floor(math.log10(lo))), int(math.ceil(math.log10(hi))) + 1)
                 for m in (1, 2, 5) if lo <= m * 10 ** k <= hi]
        vals = ticks if len(ticks) >= 2 else [lo, hi]
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plain_log_labels(axis) -> None:
    """Decimal labels (0.04, 0.1, 0.2) on the major and minor ticks of a log axis spanning less than two decades,
    where matplotlib would otherwise write 4x10^-2."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    lo, hi = sorted(axis.get_view_interval())
    if lo > 0 and hi / lo < 100:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        from matplotlib.ticker import NullFormatter

        axis.set_minor_formatter(NullFormatter())


_nfe_ticks = nfe_ticks


def slope_guides(ax, points, orders=(1, 2, 3), span: float = 4.0) -> None:
    """Reference lines of slope -p (p in ``orders``) on a log-log axis, anchored in the asymptotic range.

    All guides pass through (n1, e1): n1 the largest abscissa of ``points`` reached by at least half as many lines
    as the best-covered abscissa, e1 the median ordinate there, so neither an outlier at small n (e.g. a third-order
    method at 3 NFE) nor the end of one long line can move them. Each guide covers n1 / span .. n1,
    where a line of slope -p at error e(n) = e1 (n1 / n)^p is what the asymptotic regime should follow.

    Parameters
    ----------
    ax : matplotlib Axes
        A log-log axis.
    points : iterable of (n, e)
        The data (non-finite or non-positive errors are ignored).
    orders : tuple of float
        The slopes -p to draw.
    span : float
        Ratio of the guide's right and left ends.
    """
    import statistics

    pts = [(n, e) for n, e in points if e == e and e > 0 and math.isfinite(e)]
    if not pts:
        return
    counts = {n: sum(1 for m, _ in pts if m == n) for n, _ in pts}
    # the largest abscissa that at least half as many lines reach as the best-covered one (not one long line's end)
    n1 = max(n for n, c in counts.items() if c >= max(counts.values()) / 2)
    e1 = statistics.median(e for n, e in pts if n == n1)
    n0 = max(min(n for n, _ in pts), n1 / span)
    if n0 >= n1:
        return
    for p in orders:
        e0 = e1 * (n1 / n0) ** p
        ax.plot([n0, n1], [e0, e1], "--", color="0.45", lw=0.9, dashes=(4, 3))
        ax.annotate(f"slope -{p:g}", (n0, e0), textcoords="offset points", xytext=(-2, 0), ha="right", va="center",
                    fontsize=7, color="0.35")


def floor_band(ax, mean: float, spread: float = 0.0, label: str = "Monte-Carlo floor") -> None:
    """The Monte-Carlo floor as a grey band mean +- spread (a line when spread is 0), labelled in the legend."""
    if spread > 0:
        ax.axhspan(mean - spread, mean + spread, color="0.6", alpha=0.3, lw=0, label=label)
        ax.axhline(mean, color="0.45", lw=0.8)
    else:
        ax.axhline(mean, color="0.45", ls=":", lw=1, label=label)


def legend_outside(fig_or_ax, handles=None, labels=None, **kw) -> None:
    """A legend to the right of the axes (or the figure), never over the data."""
    opts = dict(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    opts.update(kw)
    if handles is None:
        fig_or_ax.legend(**opts)
    else:
        fig_or_ax.legend(handles, labels, **opts)


@_styled
def error_vs_nfe(rows: list[dict], path: str, title: str = "", floor=None,
                 mmd_null: tuple[float, float] | None = None) -> None:
    """Log-log panels of the compare run: terminal error vs the exact flow map (deterministic samplers, with
    reference slopes -1, -2, -3 through the largest budget, ``slope_guides``) and sliced W2 to exact samples (all
    samplers, with the Monte-Carlo floor ``floor``: a number, or (mean, spread) drawn as a band); and,
    when the rows carry ``mmd2``, a third panel: MMD^2 to the exact law with +-1 SE bars, on a symlog axis
    (unbiased values can be negative) whose linear zone is the null's spread, and the null band
    ``mmd_null`` = (mean, std) as a shaded mean +- 1 std band. Hollow markers: not resolved from the null."""
    plt = _mpl()
    has_mmd = all("mmd2" in r for r in rows)
    fig, axes = plt.subplots(1, 3 if has_mmd else 2, figsize=(19 if has_mmd else 13, 4.8))
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    for i, name in enumerate(samplers):
        rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        nfe = [r["nfe"] for r in rs]
        fe = [r["flow_error"] for r in rs]
        style = "--" if rs[0]["stochastic"] else "-"
        color, marker = _style(i)
        if not all(math.isnan(v) for v in fe):
            axes[0].loglog(nfe, fe, marker + style, label=name, color=color, ms=5)
        axes[1].loglog(nfe, [r["sw2"] for r in rs], marker + style, label=name, color=color, ms=5)
        if has_mmd:
            axes[2].errorbar(nfe, [r["mmd2"] for r in rs], yerr=[r["mmd2_se"] for r in rs], fmt=style, color=color,
                             capsize=2, lw=1, label=name)
            for r in rs:
                resolved = r.get("resolved", True)
                axes[2].plot([r["nfe"]], [r["mmd2"]], marker, color=color, mfc=color if resolved else "none", ms=5)
    slope_guides(axes[0], [(r["nfe"], r["flow_error"]) for r in rows if not math.isnan(r["flow_error"])])
    if floor is not None:
        mean, spread = floor if isinstance(floor, tuple) else (floor, 0.0)
        floor_band(axes[1], mean, spread, "exact samples (Monte-Carlo floor)")
    axes[0].set(xlabel="NFE", ylabel="mean ||x - Phi(x_T)||", title="terminal error vs exact PF-ODE flow map")
    axes[1].set(xlabel="NFE", ylabel="sliced W2", title="sliced W2 vs exact samples (descriptive)")
    if has_mmd:
        ax = axes[2]
        ax.set_xscale("log")
        spread = max(mmd_null[1] if mmd_null else 0.0, max(r["mmd2_se"] for r in rows), 1e-12)
        ax.set_yscale("symlog", linthresh=spread)
        if mmd_null is not None:
            m, sd = mmd_null
            ax.axhspan(m - sd, m + sd, color="gray", alpha=0.25, lw=0, label="exact samples: mean +- 1 std")
            ax.axhline(m, color="gray", lw=1)
        ax.set(xlabel="NFE", ylabel="MMD^2 to the exact law (symlog)",
               title="MMD^2 vs exact law (+-1 SE; hollow: within noise)")
    handles, labels = axes[1].get_legend_handles_labels()
    if floor is not None:  # the floor's entry last, beside the null band's
        k = labels.index("exact samples (Monte-Carlo floor)")
        handles, labels = handles[:k] + handles[k + 1:] + [handles[k]], labels[:k] + labels[k + 1:] + [labels[k]]
    if has_mmd and mmd_null is not None:
        h2, l2 = axes[2].get_legend_handles_labels()
        band = [(h, lab) for h, lab in zip(h2, l2) if lab.startswith("exact samples")]  # the null band's entry
        handles, labels = handles + [b[0] for b in band], labels + [b[1] for b in band]
    legend_outside(fig, handles, labels)
    nfes = [r.get("nfe_budget", r["nfe"]) for r in rows]  # ticks at the budgets, not every NFE actually used
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        _nfe_ticks(ax, nfes)
    if title:
        fig.suptitle(title)
    _save(fig, path, dpi=110)


@_styled
def peer_ratios(rows: list[dict], path: str, title: str = "") -> None:
    """Ours / best peer per target, one panel per NFE budget: the declared default (filled circles) and our best
    (method, grid) chosen after the fact (hollow squares), log axis, with the parity line (1) and the 0.5 line.
    ``rows``: dicts with target, nfe, ratio_default, ratio_best (None where missing)."""
    plt = _mpl()
    nfes = sorted({r["nfe"] for r in rows})
    tnames = list(dict.fromkeys(r["target"] for r in rows))
    fig, axes = plt.subplots(1, len(nfes), figsize=(4.2 * len(nfes), 4.6), sharey=True, squeeze=False)
    for ax, nfe in zip(axes[0], nfes):
        sel = {r["target"]: r for r in rows if r["nfe"] == nfe}
        xs = range(len(tnames))
        for key, style, label in (("ratio_default", dict(marker="o", color="C0", ls=""), "declared default"),
                                  ("ratio_best", dict(marker="s", mfc="none", color="C3", ls=""),
                                   "best after the fact")):
            pts = [(i, sel[t][key]) for i, t in zip(xs, tnames) if t in sel and sel[t].get(key)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ms=7, label=label, **style)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.5, color="gray", lw=0.8, ls="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(tnames, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"NFE {nfe}")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0][0].set_ylabel("terminal error: ours / best peer")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=120)


@_styled
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
    _save(fig, path, dpi=110)


@_styled
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
    _save(fig, path, dpi=110)


@_styled
def metric_vs_nfe(rows: list[dict], path: str, key: str, err_key: str | None = None, floor=None,
                  title: str = "", ylabel: str | None = None, floor_label: str = "Monte-Carlo floor") -> None:
    """A metric against NFE, one line per sampler (distinct colour and marker), with +-2 ``err_key`` bars, plain NFE
    ticks, the legend outside the data and the Monte-Carlo floor ``floor`` (a number, or (mean, spread) drawn as a
    band). ``ylabel`` names the metric in words (default: ``key``)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, name in enumerate(dict.fromkeys(r["sampler"] for r in rows)):
        rs = sorted((r for r in rows if r["sampler"] == name), key=lambda r: r["nfe"])
        color, marker = line_style(i)
        ax.errorbar([r["nfe"] for r in rs], [r[key] for r in rs],
                    yerr=[2 * r[err_key] for r in rs] if err_key else None, fmt=marker + "-", color=color, label=name,
                    capsize=3)
    if floor is not None:
        mean, spread = floor if isinstance(floor, tuple) else (floor, 0.0)
        floor_band(ax, mean, spread, floor_label)
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel=ylabel or key, title=title)
    nfe_ticks(ax, [r["nfe"] for r in rows])
    plain_log_labels(ax.yaxis)
    ax.grid(True, which="both", alpha=0.3)
    legend_outside(ax)
    _save(fig, path, dpi=110)



@_styled
def fokker_planck_heatmaps(panels: list[dict], extent: tuple, path: str, title: str = "") -> None:
    """Grid of 2-D density maps: one row per equation or view, one column per time, time increasing to the right in
    every row (a generation run, computed from t_max down, is shown in the same direction as the forward one).

    Panels at the same t share a column (a row without that time leaves the cell empty). Every row shares one colour
    scale (square-root norm from 0 to the row's largest density) with its colour bar; axes carry x1 / x2 ticks and
    labels. ``panels``: dicts with ``row`` (label), ``t``, ``density`` (n0 x n1 array, axis 0 = x1) and optional
    ``note`` (e.g. the TV to the exact p_t), shown under the time; ``extent`` = (x_lo, x_hi, y_lo, y_hi)."""
    from matplotlib.colors import PowerNorm

    plt = _mpl()
    rows = list(dict.fromkeys(p["row"] for p in panels))
    times = sorted({round(float(p["t"]), 12) for p in panels})
    col = {t: j for j, t in enumerate(times)}
    ncol = len(times)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(2.4 * ncol + 1.2, 2.5 * len(rows) + 0.3), squeeze=False,
                             sharex=True, sharey=True)
    height = 2.5 * len(rows)
    fig.subplots_adjust(hspace=0.45, wspace=0.12, right=0.9, top=1 - 0.75 / height)  # before the colour bars
    for ax in axes.ravel():
        ax.set_visible(False)
    for i, r in enumerate(rows):
        mine = [p for p in panels if p["row"] == r]
        vmax = max(float(p["density"].max()) for p in mine)
        norm = PowerNorm(0.5, vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
        im = None
        for p in mine:
            j = col[round(float(p["t"]), 12)]
            ax = axes[i, j]
            ax.set_visible(True)
            im = ax.imshow(p["density"].T, origin="lower", extent=extent, cmap="magma", aspect="equal", norm=norm)
            ax.set_title(f"t = {p['t']:g}" + (f"\n{p['note']}" if p.get("note") else ""), fontsize=8)
        first = min(col[round(float(p["t"]), 12)] for p in mine)
        axes[i, first].set_ylabel(f"{r}\nx2", fontsize=8)
        for j in range(ncol):
            axes[i, j].tick_params(labelleft=j == first, labelbottom=False, labelsize=7)
        cb = fig.colorbar(im, ax=list(axes[i, :]), fraction=0.025, pad=0.02)
        cb.set_label("density (sqrt scale)", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    for j in range(ncol):  # x ticks and label under the lowest panel of each column
        low = max(i for i in range(len(rows)) if axes[i, j].get_visible())
        axes[low, j].tick_params(labelbottom=True)
        axes[low, j].set_xlabel("x1", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=110, layout=False)



@_styled
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
    _save(fig, path, dpi=110)


@_styled
def convergence_orders(rows: list[dict], path: str) -> None:
    """Left: error against NFE per method (log-log) with slope guides through the largest NFE; right: fitted order
    against t_min. Legends outside the data."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
    orders = [r for r in rows if r["part"] == "orders"]
    for i, m in enumerate(dict.fromkeys(r["method"] for r in orders)):
        rs = [r for r in orders if r["method"] == m]
        color, marker = line_style(i)
        axes[0].loglog([r["nfe"] for r in rs], [r["error"] for r in rs], marker + "-", color=color,
                       label=f"{m} (fit {rs[0]['fitted_order']:.2f}, theory {rs[0]['expected_order']})")
    slope_guides(axes[0], [(r["nfe"], r["error"]) for r in orders])
    axes[0].set(xlabel="NFE", ylabel="mean |x - Phi(x_T)|", title="bimodal 1-D, VP, exact quantile flow map")
    if orders:
        nfe_ticks(axes[0], [r["nfe"] for r in orders])
    legend_outside(axes[0])
    br = [r for r in rows if r["part"] == "breakdown"]
    for i, key in enumerate(dict.fromkeys((r["method"], r.get("grid", "")) for r in br)):
        rs = [r for r in br if (r["method"], r.get("grid", "")) == key]
        color, marker = line_style(i)
        axes[1].semilogx([r["t_min"] for r in rs], [r["fitted_order"] for r in rs], marker + ("-" if key[1] != "uniform" else "--"),
                         color=color, label=f"{key[0]} ({key[1]} grid)")
        axes[1].axhline(rs[0]["expected_order"], color="gray", ls=":", lw=1)
    axes[1].set(xlabel="t_min", ylabel="fitted order (N = 16..128)", title="order break-down as t_min -> 0")
    axes[1].invert_xaxis()
    legend_outside(axes[1])
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    _save(fig, path, dpi=100)



@_styled
def ablation_vs_nfe(rows: list[dict], path: str, title: str = "") -> None:
    """EDM-style ablation: one column per ``target``; top row the flow-map error, bottom row the sliced W2 (with the
    Monte-Carlo floor ``mc_floor`` as a band of +-2 ``mc_floor_se`` when the rows carry it) against NFE; colour and marker = ``grid``, solid = Euler, dashed = Heun; one legend
    to the right of the figure."""
    plt = _mpl()
    targets = list(dict.fromkeys(r["target"] for r in rows))
    grids = list(dict.fromkeys(r["grid"] for r in rows))
    styles = {g: line_style(i) for i, g in enumerate(grids)}
    fig, axes = plt.subplots(2, len(targets), figsize=(5.0 * len(targets) + 1.5, 7.5), squeeze=False)
    for j, tname in enumerate(targets):
        rt = [r for r in rows if r["target"] == tname]
        for gname in grids:
            color, marker = styles[gname]
            for solver, ls in (("euler", "-"), ("heun", "--")):
                rs = sorted((r for r in rt if r["grid"] == gname and r["solver"] == solver), key=lambda r: r["nfe"])
                if not rs:
                    continue
                nfe = [r["nfe"] for r in rs]
                lab = f"{solver}, {gname} grid"
                axes[0, j].loglog(nfe, [r["flow_error"] for r in rs], marker + ls, color=color, ms=3, label=lab)
                axes[1, j].loglog(nfe, [r["sw2"] for r in rs], marker + ls, color=color, ms=3, label=lab)
        floor_band(axes[1, j], rt[0]["mc_floor"], 2 * rt[0].get("mc_floor_se", 0.0), "Monte-Carlo floor (+-2 SE)")
        axes[0, j].set(xlabel="NFE", ylabel="mean ||xbar - Phi(xbar_T)||", title=f"{tname}: flow-map error")
        axes[1, j].set(xlabel="NFE", ylabel="sliced W2", title=f"{tname}: sliced W2 to exact samples")
        for ax in axes[:, j]:
            ax.grid(True, which="both", alpha=0.3)
            nfe_ticks(ax, [r["nfe"] for r in rt])
    handles, labels = axes[1, 0].get_legend_handles_labels()
    legend_outside(fig, handles, labels)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=100)



@_styled
def loss_curve(history: list[dict], path: str, title: str = "") -> None:
    """Training loss (log scale) against step, from the trainer's log records (step, loss, lr)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], "-", lw=1.2)
    ax.set(xlabel="step", ylabel="loss (mean over log interval)", yscale="log", title=title or "training loss")
    ax.grid(True, which="both", alpha=0.3)
    _save(fig, path, dpi=110)


@_styled
def image_grid(rows: list, path: str, row_titles: list | None = None, col_titles: list | None = None,
               title: str = "", vmin: float = -1.0, vmax: float = 1.0) -> None:
    """A grid of single-channel images: ``rows`` is a list of (n_cols, 1, H, W) (or (n_cols, H, W)) arrays/tensors,
    one per row, shown in grey on [vmin, vmax] with optional row and column titles."""
    plt = _mpl()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(0.75 * n_cols + 1.2, 0.75 * n_rows + 0.6), squeeze=False)
    for i, imgs in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if j < len(imgs):
                im = imgs[j]
                im = im.detach().cpu().numpy() if hasattr(im, "detach") else im
                ax.imshow(im.reshape(im.shape[-2], im.shape[-1]), cmap="gray", vmin=vmin, vmax=vmax)
            if j == 0 and row_titles:
                ax.set_ylabel(str(row_titles[i]), fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(str(col_titles[j]), fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    _save(fig, path, dpi=110)


@_styled
def eta_sweep(rows: list[dict], path: str, floor: float | None = None, title: str = "") -> None:
    """DDIM eta sweep: ``sw2_mean`` (+- 2 ``sw2_se``) against ``steps``, one line per ``eta``, with the Monte-Carlo
    floor (a number, or (mean, half-width) drawn as a band); right panel the paired difference to eta = 0 (``minus_eta0_mean`` +- 2 ``minus_eta0_se``)."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for eta in dict.fromkeys(r["eta"] for r in rows):
        rs = sorted((r for r in rows if r["eta"] == eta), key=lambda r: r["steps"])
        s = [r["steps"] for r in rs]
        axes[0].errorbar(s, [r["sw2_mean"] for r in rs], yerr=[2 * r["sw2_se"] for r in rs], fmt="o-", capsize=3,
                         label=f"eta = {eta:g}")
        axes[1].errorbar(s, [r["minus_eta0_mean"] for r in rs], yerr=[2 * r["minus_eta0_se"] for r in rs], fmt="o-",
                         capsize=3, label=f"eta = {eta:g}")
    if floor is not None:
        mean, spread = floor if isinstance(floor, tuple) else (floor, 0.0)
        floor_band(axes[0], mean, spread, "Monte-Carlo floor" + (" (+-2 SE)" if spread else ""))
    axes[0].set(xscale="log", yscale="log", xlabel="steps S", ylabel="sliced W2", title="error vs steps")
    axes[1].axhline(0.0, color="k", lw=0.8)
    axes[1].set(xscale="log", xlabel="steps S", ylabel="sliced W2 minus eta=0 (paired)",
                title="difference to deterministic DDIM")
    for ax in axes:
        nfe_ticks(ax, [r["steps"] for r in rows])
    plain_log_labels(axes[0].yaxis)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=100)


@_styled
def vdm_invariance(rows: list[dict], curves: dict, path: str) -> None:
    """VDM invariance: log-SNR against normalised time and the t-uniform estimator's mean integrand per schedule
    (``curves[name]`` with ``u``, ``log_snr``, ``integrand``), and per row of ``rows`` the closed form, quadrature and
    Monte-Carlo mean (+- 2 SE) of L_inf, with the estimator's standard deviation."""
    import numpy as np

    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, c in curves.items():
        axes[0].plot(c["u"], c["log_snr"], label=name)
        axes[1].semilogy(c["u"], c["integrand"], label=name)
    axes[0].set(xlabel="(t - t_min)/(t_max - t_min)", ylabel="log SNR", title="matched end points")
    axes[1].set(xlabel="(t - t_min)/(t_max - t_min)", ylabel="(t1 - t0) (-SNR'/2) E||x - x_hat||^2",
                title="integrand (area = L_inf for every schedule)")
    x = np.arange(len(rows))
    axes[2].axhline(rows[0]["closed_form"], color="k", lw=1, label="closed form")
    axes[2].plot(x - 0.1, [r["quadrature"] for r in rows], "s", label="quadrature")
    axes[2].errorbar(x + 0.1, [r["mc_mean"] for r in rows], yerr=[2 * r["mc_se"] for r in rows], fmt="o", capsize=3,
                     label="Monte Carlo +- 2 SE")
    for i, r in enumerate(rows):
        axes[2].annotate(f"SD {r['mc_sd']:.3g}", (i, r["mc_mean"]), textcoords="offset points", xytext=(0, 18),
                         ha="center", fontsize=7)
    axes[2].set_xticks(x)
    axes[2].set_xticklabels([r["schedule"] for r in rows], rotation=15, fontsize=7)
    axes[2].set(ylabel="L_inf", title="same loss, different estimator SD")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, dpi=100)


@_styled
def same_marginals(paths: dict, rows: list[dict], path_rows: list[dict], path: str, title: str = "",
                   max_paths: int = 12) -> None:
    """Top: sample paths (``paths[gamma]``: (steps + 1, m, 2) array) per gamma from the same x_T. Bottom left: TV of each
    view's marginal to the closed form against t (``rows``: gamma, t, view, tv_to_closed_form, mc_floor) with the
    Monte-Carlo floor; bottom right: the coupling statistics of ``path_rows`` against gamma. The first ``max_paths``
    paths are drawn."""
    plt = _mpl()
    gammas = list(paths)
    fig = plt.figure(figsize=(3.2 * len(gammas), 6.6))
    for i, gamma in enumerate(gammas):
        ax = fig.add_subplot(2, len(gammas), i + 1)
        tr = paths[gamma][:, :max_paths]
        for j in range(tr.shape[1]):
            ax.plot(tr[:, j, 0], tr[:, j, 1], lw=0.5, alpha=0.6, color=plt.cm.hsv(j / tr.shape[1]))
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=4, color="k", zorder=3)
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=6, marker="x", color="k", zorder=3)
        ax.set(xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), title=f"gamma = {gamma:g}")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(2, 2, 3)
    for view, ls in (("EM samples", "o-"), ("Fokker-Planck grid", "s--")):
        for k, gamma in enumerate(gammas):
            rs = sorted((r for r in rows if r["view"] == view and r["gamma"] == gamma), key=lambda r: r["t"])
            if rs:
                ax.plot([r["t"] for r in rs], [r["tv_to_closed_form"] for r in rs], ls, color=plt.cm.viridis(k / len(gammas)),
                        ms=4, label=f"{view}, gamma = {gamma:g}")
    fl = sorted({(r["t"], r["mc_floor"]) for r in rows})
    ax.plot([a for a, _ in fl], [b for _, b in fl], "k:", label="Monte-Carlo floor")
    ax.set(xscale="log", xlabel="t", ylabel="TV to closed-form p_t", title="marginals agree")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax = fig.add_subplot(2, 2, 4)
    g = [p["gamma"] for p in path_rows]
    ax.plot(g, [p["corr_xT_xtmin"] for p in path_rows], "o-", label="corr(x_T, x_tmin)")
    ax.plot(g, [p["same_mode_as_ode"] for p in path_rows], "s-", label="same final mode as gamma = 0")
    ax.set(xlabel="gamma", ylabel="fraction / correlation", title="paths differ", ylim=(0, 1.05))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=100)


@_styled
def em_dimension(rows: list[dict], path: str, title: str = "") -> None:
    """EM discretisation error: KL and W2 against N (one line per d; solid = ``family`` 'aniso', dashed = others), with
    reference slopes -2 and -1 through the largest N (``slope_guides``), and KL against d at each N with a slope-1
    reference."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.6))
    fams = list(dict.fromkeys(r["family"] for r in rows))
    dims = sorted({r["d"] for r in rows})
    steps = sorted({r["N"] for r in rows})
    for fam in fams:
        ls = "-" if fam == "aniso" else "--"
        for k, d in enumerate(dims):
            rs = sorted((r for r in rows if r["family"] == fam and r["d"] == d), key=lambda r: r["N"])
            col = plt.cm.viridis(k / max(len(dims) - 1, 1))
            lab = f"{fam}, d = {d}"
            axes[0].loglog([r["N"] for r in rs], [r["kl"] for r in rs], "o" + ls, color=col, ms=3, label=lab)
            axes[1].loglog([r["N"] for r in rs], [r["w2"] for r in rs], "o" + ls, color=col, ms=3, label=lab)
        for k, n in enumerate(steps):
            rs = sorted((r for r in rows if r["family"] == fam and r["N"] == n), key=lambda r: r["d"])
            axes[2].loglog([r["d"] for r in rs], [r["kl"] for r in rs], "o" + ls, ms=3,
                           color=plt.cm.plasma(k / max(len(steps) - 1, 1)), label=f"{fam}, N = {n}")
    slope_guides(axes[0], [(r["N"], r["kl"]) for r in rows], orders=(2,))
    slope_guides(axes[1], [(r["N"], r["w2"]) for r in rows], orders=(1,))
    kl_lo = min(r["kl"] for r in rows if r["d"] == dims[0])
    axes[2].loglog([dims[0], dims[-1]], [kl_lo, kl_lo * dims[-1] / dims[0]], "k:", lw=1, label="slope 1")
    axes[0].set(xlabel="steps N", ylabel="KL(EM output || p_tmin)", title="KL vs N")
    axes[1].set(xlabel="steps N", ylabel="W2(EM output, p_tmin)", title="W2 vs N")
    axes[2].set(xlabel="dimension d", ylabel="KL", title="KL vs d")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    nfe_ticks(axes[0], steps)
    nfe_ticks(axes[1], steps)
    nfe_ticks(axes[2], dims)
    legend_outside(axes[1], fontsize=6)  # the same lines as the KL panel
    legend_outside(axes[2], fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=100)


# --- DiT design-space experiments (dit_norms, dit_prepost_ln, dit_attention_cost, dit_patch_detect) ---

@_styled
def dit_norms(rows: list[dict], path: str) -> None:
    """RMSNorm vs LayerNorm: speed-up t_LN / t_RMS - 1 (median, [min, max] bars) per width / training step."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ops = [r for r in rows if r["part"] == "norm_op"]
    for (mode, impl), mk in zip([(m, i) for m in ("forward", "forward+backward")
                                 for i in ("rmsnorm", "rmsnorm_torch")], "osd^"):
        rs = sorted((r for r in ops if r["mode"] == mode and r["rms_impl"] == impl), key=lambda r: r["width"])
        if not rs:
            continue
        w = [r["width"] for r in rs]
        med = [r["speedup_median"] for r in rs]
        err = [[m - r["speedup_min"] for m, r in zip(med, rs)], [r["speedup_max"] - m for m, r in zip(med, rs)]]
        axes[0].errorbar(w, med, yerr=err, marker=mk, capsize=2, label=f"{impl}, {mode}")
    axes[0].axhspan(0.07, 0.64, color="g", alpha=0.15, label="claimed 7%-64% (Zhang & Sennrich 2019)")
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set(xscale="log", xlabel="width d", ylabel="t_LN / t_RMS - 1", title="normalisation alone (CPU, 1 thread)")
    axes[0].legend(fontsize=6)
    steps = [r for r in rows if r["part"] == "train_step"]
    if steps:
        x = range(len(steps))
        med = [r["speedup_median"] for r in steps]
        err = [[m - r["speedup_min"] for m, r in zip(med, steps)], [r["speedup_max"] - m for m, r in zip(med, steps)]]
        axes[1].errorbar(list(x), med, yerr=err, fmt="o", capsize=3)
        axes[1].set_xticks(list(x), [r["case"] for r in steps], fontsize=7)
    axes[1].axhspan(0.07, 0.64, color="g", alpha=0.15)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(ylabel="t_LN / t_RMS - 1", title="whole AdamW training step")
    _save(fig, path, dpi=100)


@_styled
def dit_prepost_ln(rows: list[dict], path: str) -> None:
    """Pre-LN vs Post-LN: stream RMS across depth at init, block gradient norms at init, training loss curves."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    init = [r for r in rows if r["phase"] == "init"]
    depths = sorted({r["depth"] for r in init})
    for k, d in enumerate(depths):
        col = plt.cm.viridis(k / max(len(depths) - 1, 1))
        for pl, ls in (("pre", "-"), ("post", "--")):
            rs = sorted((r for r in init if r["depth"] == d and r["placement"] == pl), key=lambda r: r["layer"])
            axes[0].plot([r["layer"] for r in rs], [r["stream_rms"] for r in rs], ls, color=col, marker=".",
                         label=f"{pl}-LN, L={d}")
            axes[1].semilogy([r["layer"] for r in rs[1:]], [r["block_grad_norm"] for r in rs[1:]], ls, color=col,
                             marker=".", label=f"{pl}-LN, L={d}")
    axes[0].set(xlabel="layer l", ylabel="token RMS of residual stream", title="forward norm at init")
    axes[1].set(xlabel="block l", ylabel="||grad of block params||", title="gradient norms at init")
    tr = [r for r in rows if r["phase"] == "train"]
    for (lr, pl), ls in zip([(lr, pl) for lr in sorted({r["lr"] for r in tr}, reverse=True) for pl in ("pre", "post")],
                            ["-", "--", "-", "--"]):
        rs = sorted((r for r in tr if r["lr"] == lr and r["placement"] == pl), key=lambda r: r["step"])
        axes[2].semilogy([r["step"] for r in rs], [r["loss"] for r in rs], ls, marker=".",
                         label=f"{pl}-LN lr={lr:g}")
    axes[2].set(xlabel="AdamW step (no warm-up)", ylabel="eps-MSE", title="training loss")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, path, dpi=100)


@_styled
def dit_attention_cost(rows: list[dict], path: str) -> None:
    """Attention MACs vs L against 4LD^2 + 2L^2D; stored activations with/without checkpointing, math vs fused."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    base = sorted((r for r in rows if r["backend"] == "math" and not r["checkpointing"]), key=lambda r: r["L"])
    L = [r["L"] for r in base]
    axes[0].loglog(L, [r["macs_attention_formula"] for r in base], "k-", label="4LD^2 + 2L^2D")
    axes[0].loglog(L, [r["macs_attention_measured"] for r in base], "o", label="flop counter / 2 (math SDPA)")
    axes[0].loglog(L, [r["macs_counted_fused"] for r in base], "x", label="counted with fused kernel")
    axes[0].set(xlabel="L = HW / p^2", ylabel="MACs per attention layer", title="attention MACs")
    for backend, ck, mk in (("math", False, "o-"), ("math", True, "s-"), ("fused", False, "^--")):
        rs = sorted((r for r in rows if r["backend"] == backend and r["checkpointing"] == ck), key=lambda r: r["L"])
        axes[1].loglog([r["L"] for r in rs], [r["stored_bytes"] / 2 ** 20 for r in rs], mk,
                       label=f"{backend}, {'checkpointing' if ck else 'no checkpointing'}")
    axes[1].loglog(L, [r["softmax_matrix_bytes"] / 2 ** 20 for r in base], "k:", label="softmax matrices (N h L^2)")
    axes[1].set(xlabel="L", ylabel="stored activations (MiB)", title="activation memory for backward")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    _save(fig, path, dpi=100)


@_styled
def dit_patch_detect(rows: list[dict], path: str) -> None:
    """Detection rate vs s / s_min (MC against the Phi-curves) and s_min vs p on log-log axes."""
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    mc = [r for r in rows if r["detector"] == "average+matched"]
    ps = sorted({r["p"] for r in mc})
    for k, p in enumerate(ps):
        col = plt.cm.viridis(k / max(len(ps) - 1, 1))
        rs = sorted((r for r in mc if r["p"] == p), key=lambda r: r["s"])
        axes[0].plot([r["s_over_s_min"] for r in rs], [r["rate_avg_mc"] for r in rs], "o", color=col, ms=3,
                     label=f"average, p={p}")
        axes[0].plot([r["s_over_s_min"] for r in rs], [r["rate_avg_theory"] for r in rs], "-", color=col, lw=1)
    axes[0].axhline(0.5, color="k", lw=0.5)
    axes[0].set(xlabel="s / s_min", ylabel="detection rate", title="patch averaging: MC vs Phi-curve")
    axes[0].legend(fontsize=6)
    smin_mc = []
    for p in ps:
        rs = sorted((r for r in mc if r["p"] == p), key=lambda r: r["s"])
        r0 = min(rs, key=lambda r: abs(r["s_over_s_min"] - 1))
        smin_mc.append(r0["s"] / r0["s_over_s_min"])
    axes[1].loglog(ps, smin_mc, "o-", label="averaging: sqrt(gamma sigma p / Delta I) (slope 1/2)")
    lr = sorted((r for r in rows if r["detector"] == "logistic regression"), key=lambda r: r["p"])
    if lr:
        ax2 = axes[1].twinx()
        ax2.plot([r["p"] for r in lr], [r["rate_logreg"] for r in lr], "s--", color="C2",
                 label=f"logistic regression rate at s={lr[0]['s']:g}")
        ax2.plot([r["p"] for r in lr], [r["rate_avg_theory"] for r in lr], "x:", color="C3",
                 label="averaging rate at the same s")
        ax2.set(ylabel="detection rate", ylim=(0, 1))
        ax2.legend(fontsize=6, loc="lower right")
    axes[1].set(xlabel="patch size p", ylabel="s_min (pixels)", title="s_min vs p")
    axes[1].legend(fontsize=6, loc="upper left")
    axes[1].grid(True, which="both", alpha=0.3)
    _save(fig, path, dpi=100)


@_styled
def dit_conditioning(rows: list[dict], path: str) -> None:
    """Conditioning variants: Frechet distance, accuracy and held-out loss per variant (one dot per seed, mean bar)."""
    plt = _mpl()
    order = ["adaLN-Zero", "adaLN", "cross-attention", "in-context"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, lab in zip(axes, ("frechet", "accuracy", "heldout_loss"),
                            ("classifier-space Frechet distance", "class accuracy (CFG)", "held-out loss")):
        for i, c in enumerate(order):
            v = [r[key] for r in rows if r["conditioning"] == c]
            ax.plot([i] * len(v), v, "o", alpha=0.6, color=f"C{i}")
            if v:
                ax.hlines(sum(v) / len(v), i - 0.3, i + 0.3, color=f"C{i}")
        ax.set_xticks(range(len(order)), order, fontsize=7, rotation=15)
        ax.set(title=lab)
        ax.grid(True, alpha=0.3)
    _save(fig, path, dpi=100)
