"""The chapters' presentation helpers: readable tables, fixed colours, diagrams, glue and the preset banner."""

from __future__ import annotations

import re
import warnings

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from surgery_lib import book, diagrams, plots, tables
from surgery_lib.cli import _literal  # how reproduce -p reads a value
from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging import METHODS
from surgery_lib.settings.base import EXPERT_ROW

matplotlib.use("Agg")

TASKS = ["mnist", "shapes", "signs"]


def results() -> pd.DataFrame:
    table = pd.DataFrame(
        {"mnist": [90.0, 60.04, 70.0], "shapes": [80.0, 55.0, 65.0], "signs": [85.0, 50.0, 60.0]},
        index=[EXPERT_ROW, "task arithmetic", "task arithmetic + Surgery"],
    )
    table["average"] = table.mean(axis=1)
    table["bias"] = [np.nan, 0.9, 0.4]
    return table


def test_a_readable_table_puts_the_summary_first_and_folds_the_tasks():
    shown = tables.readable(results())
    assert list(shown.frame.columns[:2]) == ["average", "bias"]
    assert list(shown.frame.columns[2:]) == TASKS
    html = shown._repr_html_()
    compact, folded = html.split("<details", 1)
    assert "<th>average</th>" in compact and "mnist" not in compact
    assert all(f"<th>{t}</th>" in folded for t in TASKS) and "per-task columns" in folded
    assert "<th>average</th>" not in folded  # shown right above: repeating it widened the fold past the page
    assert "60.0" in html and "60.04" not in html  # one decimal shown, the frame keeps every digit
    assert shown.frame.loc["task arithmetic", "mnist"] == 60.04
    assert "mnist" not in repr(shown) and "average" in repr(shown)


def test_the_best_value_is_marked_among_the_merges_lowest_for_bias():
    best = tables.readable(results()).best()
    # The experts are the bound, not a competitor: the best average is the repaired merge's.
    assert best["average"] == "task arithmetic + Surgery"
    assert best["bias"] == "task arithmetic + Surgery"
    assert best["mnist"] == "task arithmetic + Surgery"
    html = tables.readable(results())._repr_html_()
    assert "<td><b>65.0</b></td>" in html and "<td><b>90.0</b></td>" not in html
    every_lower = tables.readable(results(), lower_is_better=True).best()
    assert every_lower["average"] == "task arithmetic"


def test_a_table_without_summary_columns_is_shown_whole_and_the_html_is_stable():
    single = pd.DataFrame({"average accuracy (%)": [61.7, 75.4]}, index=["rank 4", "rank 16"])
    shown = tables.readable(single)
    assert not shown.fold and "<details" not in shown._repr_html_()
    assert "<b>75.4</b>" in shown._repr_html_()
    assert tables.readable(results())._repr_html_() == tables.readable(results())._repr_html_()


def test_costs_and_spreads_are_never_best_and_one_extra_column_is_not_folded():
    costs = pd.DataFrame(
        {"average": [61.7, 75.4], "seconds": [4.6, 3.1], "peak memory (GB)": [1.2, 1.4], "seeds": [1, 3]},
        index=["task arithmetic", "task arithmetic + Surgery"],
    )
    best = tables.readable(costs).best()
    assert best == {"average": "task arithmetic + Surgery"}  # seconds, memory and seed counts are costs
    one_more = tables.readable(results()[["average", "bias", "mnist"]])
    assert not one_more.fold and "<details" not in one_more._repr_html_()
    forced = tables.readable(results()[["average", "bias", "mnist"]], fold=True)._repr_html_()
    assert "<summary>The mnist column</summary>" in forced and "1 per-task columns" not in forced


def test_numpy_numbers_are_rounded_counts_stay_integers_and_best_can_be_left_unmarked():
    coefficients = pd.DataFrame(
        {"block 1": np.array([0.25598907, 0.3], dtype=np.float32), "parameters": [4096, 20480]},
        index=["mnist", "shapes"],
    )
    html = tables.readable(coefficients, digits=2, mark_best=False)._repr_html_()
    assert "<td>0.26</td>" in html and "0.25598" not in html  # a float32 is a number too
    assert "<td>4,096</td>" in html and "4096.0" not in html  # a count beside floats stays a count
    assert "<b>" not in html and tables.readable(coefficients).best()


def test_long_task_names_may_wrap_and_a_wide_table_scrolls_instead_of_being_cut():
    wide = pd.DataFrame({"street_digits": [87.2], "photo_patches": [66.0]}, index=["individual (expert)"])
    html = tables.readable(wide)._repr_html_()
    assert "<th>street_<wbr>digits</th>" in html and "<th>photo_<wbr>patches</th>" in html
    assert html.startswith('<div style="overflow-x: auto"><table')


def test_every_method_and_reference_row_has_its_own_fixed_colour():
    colours = {name: plots.colour_of(name) for name in METHODS.values()}
    assert None not in colours.values() and len(set(colours.values())) == len(colours)
    assert plots.colour_of("task arithmetic") == plots.MERGED_COLOUR  # the papers' merged red
    assert plots.colour_of(EXPERT_ROW) == plots.EXPERT_COLOUR
    assert plots.colour_of("TIES-merging (disjoint sum) + Surgery") == plots.SURGERY_COLOUR
    assert plots.colour_of("TIES-merging (disjoint sum) + SurgeryV2") == plots.SURGERY_V2_COLOUR
    assert plots.colour_of("no such row") is None
    # A method keeps its colour whichever other labels share the figure.
    assert (
        plots.palette(["weight averaging", "x"])["weight averaging"]
        == plots.palette(["y", "weight averaging"])["weight averaging"]
    )


def test_bar_charts_use_the_fixed_colours_and_keep_the_legend_off_the_axes():
    figure = plots.bias_bars(results()[TASKS].iloc[1:])
    axis = figure.axes[0]
    faces = {matplotlib.colors.to_hex(p.get_facecolor()) for p in axis.patches if p.get_height() > 0}
    assert faces == {plots.MERGED_COLOUR, plots.SURGERY_COLOUR}
    legend = axis.get_legend()
    figure.canvas.draw()
    assert legend.get_window_extent().x0 >= axis.get_window_extent().x1  # right of the data, not on it


def test_the_diagrams_draw_one_module_per_block_and_name_their_parts():
    texts = " ".join(t.get_text() for t in diagrams.surgery_diagram().axes[0].texts)
    assert "merged encoder" in texts and "expert t" in texts and "head t" in texts and "no labels" in texts
    figure = diagrams.surgery_v2_diagram(blocks=4)
    modules = [t.get_text() for t in figure.axes[0].texts if re.fullmatch(r"\$S\^\{\w+\}_t\$", t.get_text())]
    assert modules == ["$S^{1}_t$", "$S^{2}_t$", "$S^{3}_t$", "$S^{L}_t$"]
    # One L1 loss per block and Surgery's own on the final embedding.
    assert [t.get_text() for t in figure.axes[0].texts].count("L1") == 4 + 1
    with pytest.raises(ValueError):
        diagrams.surgery_v2_diagram(blocks=1)


def test_the_diagrams_are_vector_graphics_with_reproducible_bytes():
    first, second = diagrams.svg_text(diagrams.surgery_diagram()), diagrams.svg_text(diagrams.surgery_diagram())
    assert first == second and first.lstrip().startswith("<?xml") and "<svg" in first
    assert "<image" not in first  # no embedded bitmap: sharp at any zoom
    shown = diagrams.as_svg(diagrams.surgery_v2_diagram())
    assert shown._repr_svg_().startswith("<svg")  # a notebook shows it as image/svg+xml


def test_the_background_pages_include_the_current_drawings(tmp_path):
    from pathlib import Path

    book_figures = Path(__file__).resolve().parents[1] / "book" / "figures"
    for written in diagrams.write_book_figures(tmp_path):
        committed = (book_figures / written.name).read_text(encoding="utf-8")
        drawn = written.read_text(encoding="utf-8")
        version = re.search(r"Matplotlib v([\d.]+)", committed).group(1)
        if version != matplotlib.__version__:
            pytest.skip(f"book/figures was drawn with matplotlib {version}, this is {matplotlib.__version__}")
        assert drawn == committed, f"rerun: python -m surgery_lib.diagrams book/figures ({written.name} changed)"
    pages = {
        name: (book_figures.parent / name).read_text(encoding="utf-8")
        for name in ("background_surgery.md", "background_surgery_v2.md")
    }
    assert "figures/surgery.svg" in pages["background_surgery.md"]
    assert "figures/surgery_v2.svg" in pages["background_surgery_v2.md"]


def test_tsne_panels_share_one_embedding_of_the_expert():
    generator = torch.Generator().manual_seed(0)
    expert = torch.randn(40, 6, generator=generator)
    figure = plots.tsne_panels(expert, expert + 3, expert + 0.1, seed=0)
    left, right = figure.axes
    assert np.array_equal(left.collections[0].get_offsets(), right.collections[0].get_offsets())
    assert [c.get_label() for c in right.collections] == ["expert", "merged + Surgery"]


def test_glue_records_plain_numbers_for_the_book(monkeypatch):
    import myst_nb

    recorded = []
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: recorded.append((name, value, display)))
    assert book.glue("gain", np.float64(13.75)) == np.float64(13.75)
    assert recorded == [("gain", 13.75, False)] and type(recorded[0][1]) is float


def test_the_preset_banner_names_the_preset_and_device():
    html = book.preset_banner("smoke", "cpu")._repr_html_()
    assert "Preset: smoke" in html and "on cpu" in html and "offline benchmark" in html
    clip = book.preset_banner("clip-vit-b-32", "cuda")
    assert "real CLIP checkpoints" in clip.text() and "on cuda" in clip.text() and "8 tasks" in clip.text()


def test_glued_strings_become_markdown_without_quotes(monkeypatch):
    import myst_nb

    recorded = []
    monkeypatch.setattr(myst_nb, "glue", lambda name, value, display: recorded.append(value))
    book.glue("task", "photo_patches")
    assert recorded[0]._repr_markdown_() == "photo_patches"


@pytest.mark.parametrize(
    ("tasks", "requested", "shown"),
    [
        (("photo_patches", "signs", "mnist"), "mnist,signs", ["mnist", "signs"]),
        (("mnist", "shapes"), "mnist,signs", ["mnist", "shapes"]),  # the smoke preset
        (("MNIST", "GTSRB", "SVHN"), "mnist,signs", ["MNIST", "GTSRB"]),  # a CLIP preset
        (("a", "b", "c", "d"), " c , a ,c,b", ["c", "a", "b"]),
        (("a",), "a,b", ["a"]),
        (("mnist", "shapes", "signs"), "mnsit,signs", ["signs", "mnist"]),  # a typo: said, then filled up
    ],
)
def test_a_chapter_shows_the_requested_tasks_it_has_then_fills_up_from_the_zoo(tasks, requested, shown):
    class Zoo:
        pass

    zoo = Zoo()
    zoo.tasks = tasks
    missing = [t.strip() for t in requested.split(",") if t.strip() not in tasks]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert book.shown_tasks(zoo, requested) == shown
    assert [str(w.message) for w in caught] == (
        [f"no task {', '.join(missing)} in this zoo (its tasks: {', '.join(tasks)}); showing {', '.join(shown)}"]
        if missing
        else []
    )


def test_a_chapter_parameter_outside_what_the_chapters_run_is_refused_naming_it():
    refused = [
        ("surgery_steps", 0, "the parameter surgery_steps 0 is not a whole number of at least 1"),
        ("surgery_steps", True, "is not a whole number"),
        ("surgery_steps", 2.5, "is not a whole number"),
        ("seed", -1, "is not a whole number in [0, 4294967295]"),
        ("seeds", 1001, "is not a whole number in [1, 1000]"),
        ("rank", -1, "is not a whole number of at least 0"),
        ("scale_points", 1, "of at least 2"),
        ("scale_max", 0.0, "is not a number above 0"),
        ("scale_max", float("nan"), "is not a number above 0"),
        ("samples_per_task", 500, "is not a whole number in [1, 50]"),
        ("ranks", "4,x", "ranks '4,x' is not a comma-separated list of whole numbers of at least 1. Fix: give ranks"),
        ("adapt_counts", "50,0", "is not a comma-separated list"),
        ("data_sizes", "", "is not a comma-separated list"),
        ("data_sizes", "1.5", "is not a comma-separated list"),
        ("adam", "per_task", "is not one of shared, per-task"),
        ("tune", "yes", "is not one of auto, none, validation"),
        ("another_zoo", "other", "is not one of reference, compute"),
        ("methods", "task_arithmetic,tiez", "methods 'task_arithmetic,tiez': unknown merging method 'tiez'"),
        ("methods", 3, "is not all, papers or a comma-separated list"),
        ("surgery", "none,3", "unknown surgery versions"),
        ("wudi_curve_layers", 0, "is not None or a whole number of at least 1"),
        ("grid_dir", "", "is not None or a folder path"),
        ("tsne_task", None, "is not auto or a task name"),
        ("tsne_task", "", "is not auto or a task name"),
        ("tsne_tasks", 3, "is not comma-separated task names"),
    ]
    for name, value, message in refused:
        with pytest.raises(SurgeryBookError, match=re.escape(message)):
            book.check_parameters(**{name: value})
    with pytest.raises(
        SurgeryBookError,
        match=r"^seed 4294967294 with seeds 3 uses the seeds 4294967294 to 4294967296.*Fix: pass a seed from 0 to 4294967293",
    ):
        book.check_parameters(seed=4294967294, seeds=3)  # chapter 07's grid would refuse it after building its zoo
    book.check_parameters(seed=4294967293, seeds=3)
    with pytest.raises(SurgeryBookError, match="no chapter parameter 'stepz' is declared"):
        book.check_parameters(stepz=3)
    book.check_parameters(
        ranks="4,16,64", data_sizes=200, wudi_curve_layers=None, grid_dir="grids", methods="papers", tune="auto"
    )
    for name, parameter in book.CHAPTER_PARAMETERS.items():  # every error's "e.g." is a value the check takes
        book.check_parameter(name, _literal(parameter.example))


def test_a_task_parameter_names_tasks_of_the_preset_or_zoo_it_runs_on():
    """``-p tsne_task mnsit`` failed inside chapter 04, after its merges; a value that names tasks is checked
    against the preset's tasks by ``reproduce`` and against the zoo's by the chapter, right after building it."""
    tasks = ("mnist", "signs", "shapes")
    assert book.check_task_parameter("tsne_task", "auto", tasks) == "auto"
    assert book.check_task_parameter("tsne_task", "signs", tasks) == "signs"
    assert book.check_task_parameter("tsne_tasks", " shapes, mnist,", tasks) == " shapes, mnist,"
    assert book.check_task_parameter("tsne_tasks", "", tasks) == ""  # empty: the chapter's own choice
    assert book.check_task_parameter("surgery_steps", 10, tasks) == 10  # names no tasks
    refused = [
        (
            "tsne_task",
            "mnsit",
            "-p tsne_task 'mnsit' names no task mnsit of this preset (its tasks: mnist, signs, "
            "shapes). Fix: for tsne_task, did you mean 'mnist'? Else use one of: auto, mnist, signs, shapes",
        ),
        ("tsne_task", " mnist", "names no task  mnist"),  # the chapter uses the name as it is given
        ("tsne_task", "mnist,signs", "names no task mnist,signs"),  # one task, not a list
        ("tsne_tasks", "mnist,cars,cars,dtd", "names no task cars, dtd of this preset"),
        ("tsne_tasks", "auto", "names no task auto"),  # no "auto" where the chapter shows several
        ("tsne_task", 0, "is not auto or a task name"),  # the value's own check first
    ]
    for name, value, message in refused:
        with pytest.raises(SurgeryBookError, match=re.escape(message)):
            book.check_task_parameter(name, value, tasks, given_as=f"-p {name}")
    book.check_task_parameters(tasks, tsne_task="shapes", tsne_tasks="signs")
    with pytest.raises(SurgeryBookError, match=re.escape("the parameter tsne_task 'dtd' names no task dtd")):
        book.check_task_parameters(tasks, tsne_tasks="signs", tsne_task="dtd")


def test_a_list_parameter_is_its_whole_numbers_each_once_in_order():
    assert book.whole_numbers("64, 4,16,4") == (64, 4, 16)
    assert book.whole_numbers(200) == (200,)
    assert book.whole_numbers("4,") == (4,)  # a trailing comma is no entry
    for value in ("", ",", "a", "4,-1", "0", True, 2.0, None):
        with pytest.raises(SurgeryBookError, match="is not a comma-separated list of whole numbers of at least 1"):
            book.whole_numbers(value)
