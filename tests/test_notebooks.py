"""Conventions every notebook and the book follow (structure only; nbval executes them)."""

from __future__ import annotations

import functools
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from surgery_lib.core.project import REPOSITORY_URL

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_badge_summary_install_and_parameters(path):
    notebook = json.loads(path.read_text())
    cells = notebook["cells"]
    first = "".join(cells[0]["source"])
    colab = REPOSITORY_URL.replace("https://github.com/", "https://colab.research.google.com/github/")
    assert f"{colab}/blob/main/notebooks/{path.name}" in first
    assert "**What you will learn.**" in first
    install = cells[1]
    assert "nbval-skip" in install["metadata"].get("tags", []) and "google.colab" in "".join(install["source"])
    assert REPOSITORY_URL in "".join(install["source"])
    # Valid IPython (the magics inside the Colab branch): cloned, installed from the clone, run from its notebooks/
    # folder, where results/ holds the committed grids that chapters 06 and 07 read.
    from IPython.core.inputtransformer2 import TransformerManager

    code = TransformerManager().transform_cell("".join(install["source"]))
    compile(code, path.name, "exec")
    assert "git clone" in code and "run_line_magic('pip', 'install --quiet /content/surgery-book')" in code
    assert "run_line_magic('cd', '/content/surgery-book/notebooks')" in code
    parameters = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(parameters) == 1 and 'preset = "mini"' in "".join(parameters[0]["source"])
    names = {line.split("=")[0].strip() for line in "".join(parameters[0]["source"]).splitlines() if "=" in line}
    assert {"preset", "device", "seed", "output_dir"} <= names  # what `surgery-book reproduce` injects


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_call_the_library_instead_of_defining_it(path):
    code = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert not [c for c in code if re.search(r"^(def|class) ", c, re.MULTILINE)]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_are_clean(path):
    text = path.read_text()
    notebook = json.loads(text)
    assert not re.search(r"(/root/|/tmp/|/home/|/usr/local/|/work/)", text), "absolute local path in outputs"
    assert "injected-parameters" not in text, "a papermill output was committed over the source"
    for cell in notebook["cells"]:
        assert "execution" not in cell.get("metadata", {}) and "papermill" not in cell.get("metadata", {})
        for output in cell.get("outputs", []):
            assert output.get("name") != "stderr", f"stderr output in {path.name}"
            assert output["output_type"] != "error"
    assert any(cell.get("outputs") for cell in notebook["cells"]), "notebook committed without outputs"
    # nbval fails every cell that has outputs but no execution count ("Unrun reference cell has outputs"), which
    # is what stripping tools such as nbstripout --keep-output leave behind; one fresh top-to-bottom run counts 1..n.
    counts = [cell.get("execution_count") for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts}; re-execute it top to bottom in a fresh kernel "
        "(jupyter nbconvert --execute --inplace) and strip only the timing metadata"
    )


def test_repository_url_is_the_same_everywhere():
    book = yaml.safe_load((ROOT / "book" / "_config.yml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert book["repository"]["url"] == REPOSITORY_URL
    assert project["project"]["urls"]["Repository"] == REPOSITORY_URL
    mentioned = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", (ROOT / "README.md").read_text()))
    assert mentioned <= {REPOSITORY_URL}


def test_every_notebook_is_in_the_book():
    toc = yaml.safe_load((ROOT / "book" / "_toc.yml").read_text())
    chapters = [chapter for part in toc["parts"] for chapter in part["chapters"]]
    files = {entry["file"] for chapter in chapters for entry in [chapter, *chapter.get("sections", [])]}
    assert {f"notebooks/{p.stem}" for p in NOTEBOOKS} <= files
    # A chapter's continuation page (a section in the toc) shares its number: 04_surgery_ablations under 04_surgery.
    for chapter in chapters:
        for section in chapter.get("sections", []):
            assert Path(section["file"]).name[:3] == Path(chapter["file"]).name[:3], section["file"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_chapter_has_its_tutorial_furniture(path):
    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert "**Prerequisites:**" in first and "**Runtime:**" in first and "RUNTIME_" not in first
    markdown = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "## Summary" in markdown and "## Exercises" in markdown
    exercises = markdown.split("## Exercises", 1)[1].split("\n## ", 1)[0]
    numbered = re.findall(r"^\d+\. ", exercises, re.MULTILINE)
    solutions = [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# Solution")]
    assert 2 <= len(numbered) == len(solutions), f"{path.name}: {len(numbered)} exercises, {len(solutions)} solutions"
    # Folded in the book, executed (and so checked by nbval) with the chapter.
    assert all("hide-cell" in c["metadata"].get("tags", []) and c["outputs"] for c in solutions)
    # The fold says what it holds ("Show code cell content" did not), and no heading stands between the
    # exercises and their solutions (chapter 06's solutions rendered under "Projects").
    for number, cell in enumerate(solutions, start=1):
        assert cell["metadata"].get("mystnb", {}).get("code_prompt_show") == f"Solution to exercise {number}"
    first_solution = cells.index(solutions[0])
    exercise_cell = max(i for i, c in enumerate(cells[:first_solution]) if "## Exercises" in "".join(c["source"]))
    between = "".join(
        "".join(c["source"]).split("## Exercises", 1)[-1]
        for c in cells[exercise_cell:first_solution]
        if c["cell_type"] == "markdown"
    )
    assert "\n## " not in between and not between.startswith("## "), f"{path.name}: a heading before the solutions"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plumbing_is_hidden_and_every_figure_has_a_caption(path):
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert "remove-cell" in cells[0]["metadata"].get("tags", [])  # the Colab install cell
    for cell in cells:
        source, tags = "".join(cell["source"]), cell["metadata"].get("tags", [])
        if "save_figure(" in source or "write_table(" in source:
            assert "remove-cell" in tags, f"{path.name}: a save-to-disk cell is shown: {source[:60]!r}"
        shown = [
            o
            for o in cell.get("outputs", [])
            if o["output_type"] in ("display_data", "execute_result")
            and not any(k.startswith("application/papermill.record") for k in o["data"])
        ]
        images = [o for o in shown if "image/png" in o["data"]]
        caption = cell["metadata"].get("mystnb", {}).get("figure", {}).get("caption", "")
        if images:
            assert len(caption) > 20, f"{path.name}: a figure without a caption: {source[:60]!r}"
            assert len(shown) == 1, f"{path.name}: a captioned cell must show its figure alone: {source[:60]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_code_fits_the_page(path):
    # 88 columns fit a code block of the rendered book at 1280 px (book/_static/custom.css); the browser test
    # checks the rendered blocks themselves, this catches a long line before the book is built.
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    shown = [c for c in cells if "remove-cell" not in c["metadata"].get("tags", [])]
    wide = [line for c in shown for line in "".join(c["source"]).splitlines() if len(line) > 88]
    assert not wide, f"{path.name}: code lines wider than 88 columns: {wide}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_chapter_reads_the_committed_grid_and_never_writes_into_it(path):
    """The committed grids (``notebooks/results/``) are inputs: a chapter copies the cells that vouch for its zoo
    into its own folder (``adopt_cells``, ``chapter_grid``) and computes the rest there. A chapter that ran ``run_grid`` on the
    committed folder overwrote every committed cell with this machine's on a processor whose zoo differs."""
    import ast

    sources = ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    tree = ast.parse("\n".join(s for s in sources if "%pip" not in s))  # the Colab install cell is IPython
    assignments = [
        (target.id, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    ]
    names_in = lambda expr: {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}  # noqa: E731
    literal = lambda expr: any(  # noqa: E731  (a path under notebooks/results: committed_results() / ...)
        (isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("results"))
        or (isinstance(n, ast.Call) and ast.unparse(n.func).endswith("committed_results"))
        for n in ast.walk(expr)
    )
    committed = {name for name, value in assignments if literal(value)}
    while True:  # every name computed from a committed folder (``folder = ... committed ...``)
        more = {name for name, value in assignments if names_in(value) & committed} - committed
        if not more:
            break
        committed |= more
    for node in ast.walk(tree):
        function = ast.unparse(node.func) if isinstance(node, ast.Call) else ""
        if function.endswith(("run_grid", "run_cells", "chapter_grid")):
            position = 2 if function.endswith("chapter_grid") else 1  # chapter_grid(specs, committed, out, zoo)
            folder = node.args[position] if len(node.args) > position else None
            assert folder is None or not (names_in(folder) & committed), (
                f"{path.name}: {ast.unparse(node)} writes into the committed grid"
            )


def _markdown(page: Path) -> str:
    """A page's Markdown: a notebook's markdown cells joined, or a ``.md`` file's text."""
    if page.suffix != ".ipynb":
        return page.read_text()
    cells = json.loads(page.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def _prose_lines(text: str):
    """The lines of Markdown ``text`` outside code fences and display math."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "$$", ":::")):
            fenced = not fenced
            continue
        if not fenced:
            yield line


@pytest.mark.parametrize("path", [*NOTEBOOKS, *sorted((ROOT / "book").glob("*.md"))], ids=lambda p: p.name)
def test_no_wrapped_sentence_starts_a_bullet(path):
    """Markdown reads a line starting with "+ " as a list item: a sentence wrapped before "+ SurgeryV2" rendered a
    stray bullet in chapter 07. The book writes its lists with "- "."""
    stray = [line for line in _prose_lines(_markdown(path)) if re.match(r"\s*\+\s", line)]
    assert not stray, f"{path.name}: lines that render as bullets: {stray}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_tables_show_rounded_numbers_and_counts_as_integers(path):
    """A table cell of five decimals or more (chapter 02 printed float32 coefficients as 0.25598907) or a count
    printed as a float (4096.0 parameters) is a display bug; the stored tables keep every digit."""
    shown = []
    for cell in json.loads(path.read_text())["cells"]:
        for output in cell.get("outputs", []):
            page = "".join(output.get("data", {}).get("text/html", ""))
            shown += re.findall(r"<td>(?:<b>)?(-?\d+\.\d{5,}|\d{4,}\.0)(?:</b>)?</td>", page)
    assert not shown, f"{path.name}: table cells shown unrounded or as float counts: {shown[:5]}"


#: Decimals a chapter's prose may state without an output holding them: what they are, not results of a run.
PROSE_CONSTANTS = {
    "0.02": "a ViT-B/32 module's share of the encoder's parameters, worked out in the text (chapter 04)",
    "0.3": "task arithmetic's scaling coefficient, the papers' choice (the appendix names its merges by it)",
    "0.50": "task arithmetic's share of the gain from the published CLIP numbers quoted beside it (chapter 00)",
    "0.9": "Adam's first-moment decay, the default the official code used (chapter 06's second page)",
    "0.95": "RegMean's published scaling of the off-diagonal Gram terms (chapter 07)",
    "1.10": "the torch version the official code pinned (chapter 06)",
}


def _output_text(notebook: Path) -> str:
    """Everything a notebook's committed outputs print or display, as one string."""
    return "".join(
        "".join(output.get("text", ""))
        + "".join("".join(v) for v in output.get("data", {}).values() if isinstance(v, (str, list)))
        for cell in json.loads(notebook.read_text())["cells"]
        for output in cell.get("outputs", [])
    )


def _typed_decimals(prose: str) -> list[str]:
    """The decimals typed into Markdown: glued values, code, maths and link targets left out. Fenced code blocks
    go; fenced directives (```{admonition} boxes, whose prose the reader reads) stay, without their fence lines."""
    patterns = (
        (r"\{glue:[^}]*\}`[^`]*`", 0),  # glued values
        (r"^\s*```(?!\{).*?^\s*```", re.DOTALL | re.MULTILINE),  # code blocks
        (r"^\s*```.*$", re.MULTILINE),  # a directive's fence lines
        (r"\$\$.*?\$\$", re.DOTALL),  # display maths
        (r"`[^`\n]*`", 0),  # inline code
        (r"\$[^$\n]*\$", 0),  # inline maths
        (r"\]\([^)]*\)", 0),  # link targets
    )
    for pattern, flags in patterns:
        prose = re.sub(pattern, " ", prose, flags=flags)
    return re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose)


def _cited_clip_numbers() -> set[str]:
    from surgery_lib.settings.clip.published import VIT_B32_AVERAGES

    return {f"{value:.1f}" for value in VIT_B32_AVERAGES.values()}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_decimal_in_a_chapters_prose_comes_from_its_run_or_a_cited_source(path):
    """A number typed into prose goes stale when the chapter is re-executed: results are glued. A decimal that
    is not glued must be in one of the chapter's outputs, among the published CLIP numbers the library cites, or
    a constant named in ``PROSE_CONSTANTS``."""
    outputs, cited = _output_text(path), _cited_clip_numbers()
    stale = [
        number
        for cell in json.loads(path.read_text())["cells"]
        if cell["cell_type"] == "markdown"
        for number in _typed_decimals("".join(cell["source"]))
        if number not in outputs and number not in cited and number not in PROSE_CONSTANTS
    ]
    assert not stale, f"{path.name}: numbers in prose that no output contains (glue them): {stale}"


#: Sections of the result pages that quote runs too long to commit with a chapter (their outputs are not in the
#: repository, so no test can read them): named here with the command that reproduces them.
UNCOMMITTED_RUNS = {
    (
        "results.md",
        "#### SurgeryV2 under both semantics, on the zoo before its validation split",
    ): "surgery-book table --preset mini --surgery none,1,2 --seeds 1 --adam per-task (on that zoo)",
    ("results.md", "## Speed of the surgery trainer"): "surgery-book bench --preset mini",
    # The appendix's lab notes: zoos of earlier recipes (not kept) and the bench scripts each section names. The
    # mini zoo's own numbers there (the first paragraph, its table row) are glued from chapter 02.
    ("appendix_adamerging.md", "## Every zoo tried"): "zoos built by earlier recipes, each a `surgery-book zoo` run",
    (
        "appendix_adamerging.md",
        "## Experts fine-tuned other ways: the kept-share proxy",
    ): "python bench/kept_share.py --modes M --lr-scale S; python bench/tangent_probe.py --lr-scale 1,3",
    (
        "appendix_adamerging.md",
        "## Fewer tasks: the papers' seven merges on subsets of the mini zoo",
    ): "python bench/task_count.py --sizes 2,3,4 --subsets 3",
    (
        "appendix_adamerging.md",
        "## Longer pretraining, sharpness-aware experts, a wider MLP: the recipe probe",
    ): "python bench/recipe_probe.py --name N [options], one build per row",
}
#: Where each other section of the result pages takes its numbers from: the committed outputs of a chapter, or
#: the README (the introduction's notes on reproducibility quote its tables).
SECTION_SOURCES = {
    ("intro.md", "## Running it"): "README.md",
    # The committed grid's table, and chapter 06's reference rows beside it.
    ("results.md", "## The main table"): (
        "notebooks/results/grid-mini/table.csv",
        "notebooks/06_reproduce_tables.ipynb",
    ),
    ("results.md", "### The optimiser's semantics across the grid"): "notebooks/06_reproduce_variants.ipynb",
    ("results.md", "## Surgery ablations"): "notebooks/04_surgery_ablations.ipynb",
    ("results.md", "## SurgeryV2"): "notebooks/05_surgery_v2.ipynb",
    ("results.md", "## AdaMerging on the offline benchmark"): "notebooks/06_reproduce_tables.ipynb",
}


def _sections(markdown: str) -> dict[str, str]:
    """A Markdown page's text by heading line (the text before the first heading under "")."""
    parts = re.split(r"^(#{1,6} .*)$", markdown, flags=re.MULTILINE)
    return {"": parts[0], **dict(zip(parts[1::2], parts[2::2]))}


@pytest.mark.parametrize("page", ["intro.md", "results.md", "appendix_adamerging.md"])
def test_every_decimal_a_results_page_quotes_is_in_the_output_it_comes_from(page):
    """The pages that quote runs (the introduction, the results page, the AdaMerging appendix) type numbers that
    chapters computed: each section names its source in ``SECTION_SOURCES`` and every decimal it types must be one
    that source prints (as printed, or rounded to fewer digits), so a re-executed chapter that changes a number
    fails here until the page follows (the results page once printed SurgeryV2 at 80.5 against chapter 05's
    80.4). Sections that quote runs whose outputs are not committed are named in ``UNCOMMITTED_RUNS`` instead,
    with the command that reproduces them."""
    cited, sections = _cited_clip_numbers(), _sections((ROOT / "book" / page).read_text())
    named = [heading for p, heading in [*UNCOMMITTED_RUNS, *SECTION_SOURCES] if p == page]
    assert set(named) <= set(sections), f"{page}: named sections that no longer exist: {set(named) - set(sections)}"
    stale, unsourced = [], []
    for heading, text in sections.items():
        numbers = [n for n in _typed_decimals(text) if n not in PROSE_CONSTANTS]
        if not numbers or (page, heading) in UNCOMMITTED_RUNS:
            continue
        if (page, heading) not in SECTION_SOURCES:
            unsourced.append(heading)
            continue
        sources = SECTION_SOURCES[page, heading]
        printed = set()
        for source in (ROOT / name for name in ((sources,) if isinstance(sources, str) else sources)):
            printed |= set(
                re.findall(r"\d+\.\d+", _output_text(source) if source.suffix == ".ipynb" else source.read_text())
            )
        rounded = printed | {f"{float(n):.{digits}f}" for n in printed for digits in range(1, len(n.split(".")[1]))}
        stale += [f"{heading}: {n}" for n in numbers if n not in rounded | cited]  # constants left out above
    assert not unsourced, f"{page}: sections that quote numbers without a source in SECTION_SOURCES: {unsourced}"
    assert not stale, f"{page}: numbers their source does not print (re-read the chapter's output): {stale}"


GLUE_ROLE = re.compile(r"\{glue(:\w+)?\}`([^`]+)`")


@functools.cache
def _glued_keys(notebook: Path) -> set[str]:
    cells = json.loads(notebook.read_text())["cells"]
    return {
        output["metadata"]["scrapbook"]["name"]
        for cell in cells
        for output in cell.get("outputs", [])
        if "scrapbook" in output.get("metadata", {})
    }


def test_every_glued_value_the_book_quotes_is_glued_by_its_notebook():
    """A glue role whose key no committed output holds renders as nothing, silently (no build warning when it
    names another notebook), and so does a ``{glue:md}`` role naming another notebook: every role of every
    chapter and page must find its key."""
    pages = [*NOTEBOOKS, *sorted((ROOT / "book").glob("*.md"))]
    missing = []
    for page in pages:
        for kind, reference in GLUE_ROLE.findall(_markdown(page)):
            document, _, key = reference.rpartition("::")
            if document and kind not in ("", ":text"):  # myst-nb's {glue:md} reads only its own page's values
                missing.append(f"{page.name}: {{glue{kind}}} cannot read {reference} (use glue:text)")
            if document and ":" not in key:  # myst-nb splits `doc::key` at its last colon: a format is needed
                missing.append(f"{page.name}: {reference} needs a format (:d, :.1f) to render")
            source = (page.parent / document).resolve() if document else page
            if key.split(":")[0] not in _glued_keys(source):
                missing.append(f"{page.name}: {reference}")
    assert not missing, f"glue roles without a glued value (re-execute the notebook): {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_chapter_asks_a_question_to_think_about_with_a_folded_answer(path):
    """Besides exercises that look numbers up, every chapter asks why: a question in bold before the exercises
    and an answer folded away (a dropdown the reader opens after trying)."""
    markdown = _markdown(path)
    assert "## Think about it" in markdown, f"{path.name}: no question to think about"
    section = markdown.split("## Think about it", 1)[1].split("\n## ", 1)[0]
    assert re.search(r"\*\*[^*]+\?\*\*", section), f"{path.name}: the section asks no question"
    assert section.count(":::{dropdown} An answer") >= 1 and section.count("\n:::") >= 1
    assert markdown.index("## Think about it") < markdown.index("## Exercises")


#: The parameters a chapter does not check itself: building its zoo checks preset and device, writing checks output_dir.
CHECKED_ELSEWHERE = {"preset", "device", "output_dir"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_chapter_checks_every_parameter_before_it_computes_anything(path):
    """A mistyped value (``-p ranks 4,x``, ``surgery_steps = 0`` typed in Colab) fails in the chapter's setup cell
    instead of after its merges and surgery runs: the setup cell calls ``book.check_parameters`` with every
    parameter the chapter declares, before it builds the zoo, and every declared default passes the check."""
    import ast

    import papermill

    from surgery_lib.book import CHAPTER_PARAMETERS, check_parameter

    declared = papermill.inspect_notebook(str(path))
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    setup = next(c for c in cells if "book.book_style()" in "".join(c["source"]))
    source = "".join(setup["source"])
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "book.check_parameters"
    ]
    assert len(calls) == 1, f"{path.name}: the setup cell calls book.check_parameters once"
    call = calls[0]
    assert {k.arg for k in call.keywords} == set(declared) - CHECKED_ELSEWHERE
    assert all(ast.unparse(k.value) == k.arg for k in call.keywords), "each keyword passes its own parameter"
    computes = [m.start() for m in re.finditer(r"build_zoo\(|beyond_the_papers_grid\(", source)]
    assert computes and source.index("book.check_parameters(") < min(computes)
    for name, entry in declared.items():
        if name not in CHECKED_ELSEWHERE:
            check_parameter(name, ast.literal_eval(entry["default"]))
    # A parameter naming one task (chapter 04's tsne_task) is checked against the zoo's tasks right after the zoo
    # is built, before the merges: a typo failed after them, where the chapter first used the name.
    one_task = [n for n in declared if n in CHAPTER_PARAMETERS and CHAPTER_PARAMETERS[n].names_tasks == "one"]
    if one_task:
        task_check = f"book.check_task_parameters(zoo.tasks, {', '.join(f'{n}={n}' for n in one_task)})"
        assert task_check in source, f"{path.name}: the setup cell runs {task_check}"
        assert source.index("zoo = build_zoo(") < source.index(task_check) < source.index("merging.")
