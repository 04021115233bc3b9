"""Figures render, and are written as PNG and PDF."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from surgery_lib import plots


def test_every_figure_renders_and_saves(tmp_path):
    table = pd.DataFrame({"mnist": [0.9, 0.4], "shapes": [1.1, 0.5]}, index=["merged", "merged + surgery"])
    generator = torch.Generator().manual_seed(0)
    expert = torch.randn(60, 8, generator=generator)
    figures = {
        "bars": plots.bias_bars(table),
        "blocks": plots.block_bias_curves({"merged": [0.3, 0.5, 0.8], "merged + SurgeryV2": [0.1, 0.1, 0.2]}),
        "tsne": plots.tsne_embeddings(expert, expert + 1, expert + 0.1, title="mnist"),
        "curve": plots.learning_curve({"TA + Surgery": pd.Series([43.0, 60.0, 64.0], index=[0, 500, 1000])}),
    }
    for name, figure in figures.items():
        png, pdf = plots.save_figure(figure, tmp_path / name)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"
    # t-SNE draws one scatter per set (expert, merged, surgery), in the paper's colours.
    colours = [c.get_facecolor()[0][:3] for c in figures["tsne"].axes[0].collections]
    assert len(colours) == 3


def test_the_grid_figures_draw_every_method_and_version_in_the_version_colours(tmp_path):
    import matplotlib.colors as mcolors

    rows = [
        {"label": label, "version": v, "average": 60 + 5 * v + i, "std": 0.5 if v else float("nan")}
        for i, label in enumerate(["TA", "TSV-M", "Iso-C"])
        for v in (0, 1, 2)
    ]
    table = pd.DataFrame(rows)
    dots = plots.grid_dots(table)
    markers = [line for line in dots.axes[0].lines if line.get_marker() == "o"]
    assert [mcolors.to_hex(m.get_color()) for m in markers] == [
        mcolors.to_hex(c) for c in plots.VERSION_COLOURS.values()
    ]
    assert all(len(m.get_xdata()) == 3 for m in markers)  # one dot per method and version
    assert [t.get_text() for t in dots.axes[0].get_yticklabels()] == ["TA", "TSV-M", "Iso-C"]
    points = pd.DataFrame(
        {"alone": [60.0, 62.0, 65.0] * 2, "gain": [10.0, 8.0, 5.0, 15.0, 12.0, 9.0], "version": [1] * 3 + [2] * 3}
    )
    scatter = plots.gain_scatter(points, "alone", "merge alone (%)", "title")
    assert (
        len(scatter.axes[0].collections) == 2 and len(scatter.axes[0].lines) == 3
    )  # two versions, two fits, the zero line
    for name, figure in (("dots", dots), ("scatter", scatter)):
        png, _ = plots.save_figure(figure, tmp_path / name)
        assert png.stat().st_size > 1000


def test_block_curves_have_one_tick_per_block_and_stay_visible_where_they_coincide():
    figure = plots.block_bias_curves(
        {"merged": [0.3, 0.5, 0.8], "+ Surgery": [0.3, 0.5, 0.4], "+ SurgeryV2": [0.1, 0.1, 0.2]}
    )
    axis = figure.axes[0]
    assert list(axis.get_xticks()) == [1, 2, 3]
    lines = axis.get_lines()
    assert len({line.get_linestyle() for line in lines}) == 3 and len({line.get_marker() for line in lines}) == 3
    assert lines[0].get_linewidth() > lines[1].get_linewidth()  # the later, coinciding curve is drawn on top, thinner


def test_the_coefficient_map_is_centred_on_the_start_and_labelled_by_block():
    names = [
        "conv1.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.1.attn.in_proj_weight",
        "proj",
    ]
    table = pd.DataFrame(
        [[0.30, 0.31, 0.29, 0.32, 0.30], [0.30, 0.28, 0.30, 0.33, 0.31]], index=["a", "b"], columns=names
    )
    figure = plots.coefficient_heatmap(table)
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["embed", "block 0", "block 1", "head"]
    low, high = axis.collections[0].get_clim()
    assert (low, high) == pytest.approx((0.27, 0.33))  # 0.3 ± the largest move (0.03), not [0, 1]


def test_smoothed_curves_draw_the_raw_series_faintly_and_its_moving_average():
    figure = plots.curves({"layer-wise": pd.Series([1.0, 0.0] * 10)}, xlabel="step", ylabel="entropy", smooth=4)
    raw, trend = figure.axes[0].get_lines()
    assert raw.get_alpha() == 0.3 and list(trend.get_ydata())[3:] == [0.5] * 17


def test_a_trimming_methods_clip_label_keeps_the_methods_colour():
    from surgery_lib.merging import METHODS
    from surgery_lib.plots import colour_of

    ties = METHODS["ties"]
    clip_label = ties + " [top 20% of tower + text leftovers = 25.83 % of the tower]"  # method_label on real CLIP
    assert colour_of(ties) is not None and colour_of(clip_label) == colour_of(ties)
    assert colour_of(clip_label + " + Surgery") == colour_of(ties + " + Surgery")


def test_line_charts_keep_the_book_palette_and_never_repeat_a_colour():

    # Bare version names and rows with a note in brackets take the row's colour (chapter 06's data and online
    # figures drew "Surgery" in matplotlib's first colour, a blue like the experts').
    assert plots.palette(["Surgery", "SurgeryV2"]) == {
        "Surgery": plots.SURGERY_COLOUR,
        "SurgeryV2": plots.SURGERY_V2_COLOUR,
    }
    assert plots.colour_of("layer-wise AdaMerging + Surgery (online)") == plots.SURGERY_COLOUR
    # Two Surgery runs in one figure (chapter 05: two ranks) get two colours, neither blue.
    runs = plots.palette(
        ["task arithmetic + Surgery (rank 4)", "Surgery (rank 16)", "task arithmetic + SurgeryV2 (rank 4)"]
    )
    assert list(runs.values())[0] == plots.SURGERY_COLOUR and len(set(runs.values())) == 3
    unknown = plots.palette(["rank", "images per task", "lr 1e-05", "lr 0.0001"])
    assert len(set(unknown.values())) == 4
    assert not set(unknown.values()) & {plots.EXPERT_COLOUR, plots.SURGERY_COLOUR, "#1f77b4", "#2ca02c"}


def test_a_log_axis_is_labelled_with_the_values_themselves():

    figure = plots.curves(
        {"Surgery": pd.Series([70.0, 72.0, 75.0], index=[50, 200, 1000])},
        xlabel="images per task",
        ylabel="accuracy",
        logx=True,
    )
    labels = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert labels == ["50", "200", "1000"]


def test_a_stem_with_a_dot_keeps_its_whole_name(tmp_path):
    """Path.with_suffix cut ``main_table_mini-v0.2`` to ``main_table_mini-v0.csv``: the tables of presets
    ``mini-v0.2`` and ``mini-v0.3`` (dots are allowed in preset names) overwrote each other in one --out folder."""
    from surgery_lib.evaluation import write_table

    table = pd.DataFrame({"mnist": [90.0]}, index=["merged"])
    for version in ("0.2", "0.3"):
        written = write_table(table.assign(mnist=float(version)), tmp_path / f"main_table_mini-v{version}")
        assert [p.name for p in written] == [f"main_table_mini-v{version}.csv", f"main_table_mini-v{version}.md"]
    assert pd.read_csv(tmp_path / "main_table_mini-v0.2.csv")["mnist"].tolist() == [0.2]
    written = write_table(table, tmp_path / "named.csv", records=True)  # a stem given with a suffix it writes
    assert [p.name for p in written] == ["named.csv", "named.md", "named.json"]
    figure = plots.bias_bars(table)
    png, pdf = plots.save_figure(figure, tmp_path / "tsne_v1.5")
    assert (png.name, pdf.name) == ("tsne_v1.5.png", "tsne_v1.5.pdf") and png.is_file() and pdf.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"main_table_mini-v{v}.{ext}" for v in ("0.2", "0.3") for ext in ("csv", "md")]
        + ["named.csv", "named.md", "named.json", "tsne_v1.5.png", "tsne_v1.5.pdf"]
    )
