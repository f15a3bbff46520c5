"""The package's figure style: distinct line styles beyond ten, plain NFE ticks, slope guides anchored at the
asymptotic end, floor bands, file formats and dpi, atomic writes, density maps with colour bars and one time
direction."""
import os
import struct

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diffusion_lab import plots  # noqa: E402


@pytest.fixture
def captured(monkeypatch):
    """The figures a plot function makes, kept open instead of written."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi=100, layout=True: figs.append(fig))
    yield figs
    import matplotlib.pyplot as plt

    for f in figs:
        plt.close(f)


def test_line_styles_stay_distinct_beyond_ten_lines():
    pairs = [plots.line_style(i) for i in range(30)]
    assert len(set(pairs)) == 30
    assert plots.line_style(0)[0] == plots.line_style(10)[0] and plots.line_style(0)[1] != plots.line_style(10)[1]


def test_nfe_ticks_are_plain_integers():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.loglog([5, 10, 20, 50], [1, 0.5, 0.2, 0.1])
    plots.nfe_ticks(ax, [5, 10, 20, 50, 10])
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "10", "20", "50"]
    plt.close(fig)


def test_slope_guides_go_through_the_median_at_the_largest_nfe_not_an_outlier():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    # a 3rd-order method with a huge error at NFE 3 (the outlier) and three methods at NFE 50
    pts = [(3, 10.0), (10, 1e-2), (50, 1e-4), (50, 4e-4), (50, 1e-3)]
    plots.slope_guides(ax, pts, orders=(1, 2, 3), span=4.0)
    lines = ax.get_lines()
    assert len(lines) == 3
    for line, p in zip(lines, (1, 2, 3)):
        (n0, n1), (e0, e1) = line.get_data()
        assert n1 == 50 and e1 == pytest.approx(4e-4)  # the median at the largest NFE
        assert n0 == pytest.approx(12.5)  # span 4 to the left: inside the data, not back to the outlier
        assert np.log(e0 / e1) / np.log(n1 / n0) == pytest.approx(p)  # slope -p on log-log axes
    plt.close(fig)


def test_metric_vs_nfe_names_its_axis_draws_the_floor_as_a_band_and_keeps_the_legend_outside(captured):
    rows = [{"sampler": s, "nfe": n, "m": 1.0 / n, "se": 0.01 / n} for s in ("a", "b") for n in (10, 20)]
    plots.metric_vs_nfe(rows, "x.png", "m", "se", floor=(0.01, 0.002), ylabel="sliced W2 to exact samples")
    ax = captured[0].axes[0]
    assert ax.get_ylabel() == "sliced W2 to exact samples"
    bands = [p for p in ax.patches if p.get_label() == "Monte-Carlo floor"]
    assert len(bands) == 1
    ys = bands[0].get_transform().transform(bands[0].get_path().vertices)[:, 1]  # display coordinates
    lo, hi = ax.transData.inverted().transform([[1, ys.min()], [1, ys.max()]])[:, 1]
    assert (lo, hi) == (pytest.approx(0.008), pytest.approx(0.012))  # mean +- spread
    leg = ax.get_legend()
    assert leg is not None and leg._loc == 6 and tuple(leg.get_bbox_to_anchor()._bbox.bounds[:2]) == (1.0, 0.5)


def _png_width(path) -> int:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", head[16:20])[0]


def test_formats_follow_the_extension_and_style_sets_the_dpi(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 2))
    with plots.style(dpi=50):
        plots.sample_panels({"a": x}, str(tmp_path / "a.png"))
    with plots.style(dpi=100):
        plots.sample_panels({"a": x}, str(tmp_path / "b.png"))
    # bbox_inches='tight' crops in inches, so the pixel width doubles with the dpi (up to rounding)
    assert abs(_png_width(tmp_path / "b.png") - 2 * _png_width(tmp_path / "a.png")) <= 2
    plots.sample_panels({"a": x}, str(tmp_path / "c.pdf"))
    plots.sample_panels({"a": x}, str(tmp_path / "d.svg"))
    assert (tmp_path / "c.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "d.svg").read_bytes()[:2000]
    assert sorted(os.listdir(tmp_path)) == ["a.png", "b.png", "c.pdf", "d.svg"]  # no temporaries


def test_an_unknown_extension_and_a_bad_dpi_are_refused(tmp_path):
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="'p.jpg'.*png, pdf, svg"):
        plots.sample_panels({"a": x}, "p.jpg")
    with pytest.raises(ValueError, match="dpi must be an integer >= 1, got 0"):
        with plots.style(dpi=0):
            pass


def test_the_package_style_does_not_leak_into_the_callers_settings(tmp_path):
    before = dict(matplotlib.rcParams)
    plots.sample_panels({"a": np.zeros((3, 2))}, str(tmp_path / "a.png"))
    changed = {k for k in before if matplotlib.rcParams[k] != before[k] and k != "backend"}
    assert not changed, changed


def test_density_maps_have_one_time_direction_shared_scale_and_colour_bars(captured):
    n = 8
    rng = np.random.default_rng(1)
    panels = [{"row": "exact", "t": t, "density": rng.random((n, n)) * (1 + t)} for t in (0.1, 0.5, 1.0)]
    # a generation run is computed from t_max down; it is shown in the same direction
    panels += [{"row": "generation", "t": t, "density": rng.random((n, n)) * 3, "note": f"TV {t:.1f}"}
               for t in (1.0, 0.5, 0.1, 0.001)]
    plots.fokker_planck_heatmaps(panels, (-1, 1, -1, 1), "fp.png")
    fig = captured[0]
    image_axes = [ax for ax in fig.axes if ax.get_images() and ax.get_visible()]
    colourbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colourbars) == 2 and len(image_axes) == 7
    for row, pts in (("exact", panels[:3]), ("generation", panels[3:])):
        axs = [ax for ax in image_axes if ax.get_images()[0].norm.vmax == pytest.approx(max(p["density"].max()
                                                                                            for p in pts))]
        assert len(axs) == len(pts)  # one colour scale per row: the row's maximum
        ts = [float(ax.get_title().split("\n")[0].split("= ")[1]) for ax in sorted(axs, key=lambda a: a.get_position().x0)]
        assert ts == sorted(ts)  # time increases to the right in every row
    gen_titles = [ax.get_title() for ax in image_axes if "TV" in ax.get_title()]
    assert any(t.startswith("t = 0.001") for t in gen_titles)  # the final TV is shown
    assert any(ax.get_xlabel() == "x1" for ax in image_axes) and any("x2" in ax.get_ylabel() for ax in image_axes)


def test_error_vs_nfe_guides_are_anchored_at_the_largest_budget(captured):
    rows = []
    for name, errs, stoch in (("dpm_solver_3", {3: 5.0, 10: 1e-3, 50: 1e-5}, False),
                              ("euler", {3: 0.3, 10: 0.1, 50: 0.02}, False),
                              ("em", {3: float("nan"), 10: float("nan"), 50: float("nan")}, True)):
        for n, e in errs.items():
            rows.append({"sampler": name, "nfe": n, "flow_error": e, "sw2": 0.1, "stochastic": stoch})
    plots.error_vs_nfe(rows, "e.png", floor=(0.05, 0.01))
    ax0 = captured[0].axes[0]
    guides = [ln for ln in ax0.get_lines() if ln.get_linestyle() == "--" and ln.get_color() == "0.45"]
    assert len(guides) == 3
    assert all(ln.get_data()[0][1] == 50 for ln in guides)
    assert all(ln.get_data()[1][1] == pytest.approx(np.median([1e-5, 0.02])) for ln in guides)
    labels = [t.get_text() for t in captured[0].legends[0].get_texts()]
    assert labels[-1] == "exact samples (Monte-Carlo floor)"


def test_crowded_nfe_budgets_get_1_2_5_ticks():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    nfes = [8, 15, 16, 24, 31, 32, 48, 63, 64, 96, 127, 128, 192, 255, 256, 384, 511, 512, 768]
    ax.loglog(nfes, [1.0 / n for n in nfes])
    plots.nfe_ticks(ax, nfes)
    fig.canvas.draw()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "20", "50", "100", "200", "500"]
    plt.close(fig)


def test_slope_guides_ignore_the_end_of_one_long_line():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    ax.set_yscale("log")
    pts = [(n, e * 10 ** -k) for k in range(4) for n, e in ((16, 1e-1), (32, 1e-2), (64, 1e-3))] + [(128, 1e-9)]
    plots.slope_guides(ax, pts, orders=(2,))
    (n0, n1), (e0, e1) = ax.get_lines()[0].get_data()
    assert n1 == 64 and e1 == pytest.approx(np.median([1e-3 * 10 ** -k for k in range(4)]))
    plt.close(fig)


def test_experiments_write_their_figure_in_the_chosen_format_and_remove_the_other_formats(tmp_path):
    from experiments import all as run_all

    (tmp_path / "langevin_bias.png").write_bytes(b"an older figure")
    assert run_all.main(["--only", "langevin_bias", "--quick", "--out", str(tmp_path), "--format", "svg",
                         "--dpi", "50"]) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == ["headlines.json", "langevin_bias.csv", "langevin_bias.json", "langevin_bias.svg"]
    assert b"<svg" in (tmp_path / "langevin_bias.svg").read_bytes()[:2000]
