"""Execute the book's notebooks with papermill for any preset and collect what they produce.

``reproduce(preset, out)`` runs every ``notebooks/NN_*.ipynb`` in order with the parameters
``preset``, ``device``, ``seed`` and ``output_dir`` injected, writes the executed copies to
``out/notebooks/`` (never over the sources), each notebook's figures and tables to ``out/<stem>/``,
and a summary (``out/summary.json`` and ``out/summary.md``) with wall time and artifacts per notebook: every
notebook run into the folder, including those earlier runs executed and this one left alone.

A run into a folder that an earlier run (killed, failed, or finished) left resumes: a notebook that finished
there is reused, not executed again, if its source, the parameters, the kernel, the preset's definition, the
library's code and the committed results it reads are all as now and its executed copy and files are still
there; every other notebook runs. Two runs into one folder at once take turns: the second waits, then reuses what
the first finished, so neither overwrites the other's notebooks or summary (the lock is ``out/.summary.json.lock``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from surgery_lib.book import CHAPTER_PARAMETERS, check_parameter, check_task_parameter
from surgery_lib.core.errors import SurgeryBookError, interval_text, use_one_of
from surgery_lib.core.progress import tqdm
from surgery_lib.core.project import __version__
from surgery_lib.core.storage import (
    CorruptFileError,
    atomic_path,
    config_hash,
    entry_lock,
    exported_cache,
    read_json,
    source_checksum,
    write_json,
)
from surgery_lib.grid import check_seeds
from surgery_lib.merging.options import MAX_SEED
from surgery_lib.models import resolve_device
from surgery_lib.presets import USER_PRESETS_ENV, get_preset

log = logging.getLogger(__name__)

ARTIFACT_SUFFIXES = (".png", ".pdf", ".csv", ".md")


@dataclass
class NotebookRun:
    """One notebook of a run: its status (``ok``, ``failed``, or ``reused`` from an earlier run into the same
    folder), the wall time (s) of its execution, the files it wrote under its output folder, and the
    fingerprint of what decided them (:func:`run_fingerprint`)."""

    notebook: str
    status: str
    seconds: float
    executed: str
    artifacts: list[str] = field(default_factory=list)
    error: str = ""
    fingerprint: str = ""


def shared_inputs(source: str | os.PathLike[str]) -> dict[str, str]:
    """What every notebook of ``source`` reads besides itself: the library's code (any edit counts, not only a
    new version) and the committed results under ``source/results/`` (chapters 06 and 07 show them)."""
    package = Path(__file__).parent
    results = Path(source) / "results"
    return {
        "surgery_lib": __version__,
        "library": source_checksum(p for p in package.rglob("*") if p.suffix in (".py", ".json")),
        "results": source_checksum(p for p in results.rglob("*") if p.is_file()) if results.is_dir() else "",
    }


def run_fingerprint(
    notebook: Path,
    preset: str,
    parameters: Mapping[str, Any],
    kernel: str | None = None,
    inputs: Mapping[str, str] | None = None,
) -> str:
    """What decides a notebook's outputs besides the machine: its source bytes, the injected parameters, the
    preset's definition (a redefined user preset differs), the kernel and :func:`shared_inputs`."""
    return config_hash(
        {
            "source": hashlib.sha256(notebook.read_bytes()).hexdigest(),
            "parameters": dict(parameters),
            "preset": get_preset(preset).to_dict(),
            "kernel": kernel,
            "inputs": dict(inputs if inputs is not None else shared_inputs(notebook.parent)),
        }
    )


def earlier_runs(out: Path) -> dict[str, NotebookRun]:
    """The notebooks that earlier runs into ``out`` recorded in its ``summary.json``, by name; {} if none."""
    path = out / "summary.json"
    if not path.exists():
        return {}
    try:
        records = read_json(path)["notebooks"]
        return {r["notebook"]: NotebookRun(**{k: v for k, v in r.items() if k in _RUN_FIELDS}) for r in records}
    except (CorruptFileError, OSError, KeyError, TypeError, AttributeError) as exc:  # any other shape of JSON
        log.warning("%s cannot be read (%s); running every notebook again", path, exc)
        return {}


_RUN_FIELDS = {f.name for f in fields(NotebookRun)}


def _reusable(run: NotebookRun | None, fingerprint: str, out: Path, executed: Path) -> NotebookRun | None:
    """The earlier run of a notebook as a ``reused`` run, if it finished as this one would and left its files."""
    if run is None or run.status not in ("ok", "reused") or run.fingerprint != fingerprint:
        return None
    if not isinstance(run.artifacts, list) or not all(isinstance(a, str) for a in run.artifacts):
        return None
    if not executed.is_file() or not all((out / artifact).is_file() for artifact in run.artifacts):
        return None  # deleted since: run it again
    seconds = float(run.seconds) if isinstance(run.seconds, (int, float)) else 0.0
    return NotebookRun(executed.name, "reused", seconds, str(executed), run.artifacts, "", fingerprint)


def find_notebooks(source: str | os.PathLike[str], only: Sequence[str] | None = None) -> list[Path]:
    """The numbered notebooks ``NN_*.ipynb`` in ``source``, in order; ``only`` (``None``: all) filters by number
    or stem.

    Raises:
        SurgeryBookError: if ``source`` has no notebooks, or ``only`` names one that does not exist or none at all
            (``--notebooks "$CHAPTERS"`` with the variable unset ran every notebook: hours on a CLIP preset).
    """
    source = Path(source)
    notebooks = sorted(source.glob("[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise SurgeryBookError(
            f"no notebooks (NN_*.ipynb) in {source}", "run from a checkout of the repository or pass --source DIR"
        )
    if only is not None:
        wanted = {name.strip().removesuffix(".ipynb") for name in only} - {""}
        if not wanted:
            raise SurgeryBookError(
                "--notebooks names no notebook", "pass numbers or names such as 04,05, or leave the option out for all"
            )
        chosen = [nb for nb in notebooks if nb.stem in wanted or nb.stem[:2] in wanted]
        unknown = wanted - {nb.stem for nb in chosen} - {nb.stem[:2] for nb in chosen}
        if unknown:
            raise SurgeryBookError(
                f"unknown notebook(s) {sorted(unknown)}",
                f"use numbers or names of: {', '.join(nb.stem for nb in notebooks)}",
            )
        notebooks = chosen
    return notebooks


def check_notebooks(notebooks: Sequence[Path]) -> None:
    """Read every notebook before the first kernel starts, so a damaged one fails in a second, not an hour in.

    Raises:
        SurgeryBookError: naming the first notebook that is not a readable Jupyter notebook.
    """
    import nbformat

    for notebook in notebooks:
        try:
            nbformat.validate(nbformat.read(notebook, as_version=4))
        except Exception as exc:  # noqa: BLE001  (nbformat raises JSON, validation and decoding errors)
            raise SurgeryBookError(
                f"{notebook} is not a readable notebook ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''})",
                "restore it from the repository (git checkout -- notebooks)",
            ) from None


def check_kernel(kernel: str) -> None:
    """Raises :class:`SurgeryBookError` naming the installed kernels unless ``kernel`` is one of them."""
    from jupyter_client.kernelspec import KernelSpecManager

    installed = sorted(KernelSpecManager().find_kernel_specs())
    if kernel not in installed:
        raise SurgeryBookError(
            f"no Jupyter kernel named {kernel!r}",
            f"use one of: {', '.join(installed) or 'none installed (pip install ipykernel)'}",
        )


#: The parameters that reproduce sets itself, and the option a user sets each of them with.
RESERVED_PARAMETERS = {"preset": "--preset", "device": "--device", "seed": "--seed", "output_dir": "--out"}


def check_parameters(
    notebooks: Sequence[Path], parameters: Mapping[str, Any], seed: int = 0, tasks: Sequence[str] | None = None
) -> dict[str, Any]:
    """``parameters`` checked against the parameters cells of ``notebooks``, before any kernel starts: papermill
    injects a name that no notebook declares without a word, so a typo (``surgery_stepz``) would run the whole
    book with the default. Returns them with a number given for a text parameter as its text (``-p ranks 16``
    means ``"16"``).

    Raises:
        SurgeryBookError: a name that reproduce sets itself (preset, device, seed, output_dir), a name that no
            notebook declares (listing those they do), a value of another kind than the declared default
            (text for a whole number, a fraction for a whole number, ...), or outside what the chapters take
            (:data:`~surgery_lib.book.CHAPTER_PARAMETERS`: ``-p surgery_steps 0``, ``-p ranks 4,x``), a task that
            is not one of ``tasks`` (the preset's: ``-p tsne_task mnsit``), or seeds that run past the largest seed
            from ``seed`` (``--seed``) on (chapter 07's three from 4294967295).

    A relative path (``-p grid_dir results/grid-b32``) is made absolute against the current folder, as the
    command's own ``--out`` is: the kernels run in the notebooks' folder.
    """
    import ast

    import papermill

    declared: dict[str, list[tuple[str, Any]]] = {}
    for notebook in notebooks:
        for name, entry in papermill.inspect_notebook(str(notebook)).items():
            try:
                default = ast.literal_eval(entry["default"])
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                default = None  # an expression: any value goes
            declared.setdefault(name, []).append((notebook.stem, default))
    checked = {}
    for name, value in parameters.items():
        if name in RESERVED_PARAMETERS:
            raise SurgeryBookError(
                f"-p {name} is set by reproduce itself", f"pass {RESERVED_PARAMETERS[name]} instead of -p {name}"
            )
        if name not in declared:
            names = sorted(set(declared) - set(RESERVED_PARAMETERS))
            raise SurgeryBookError(
                f"no notebook run here has a parameter {name!r}",
                use_one_of(name, names)
                if names
                else f"drop -p {name}: these notebooks take only --preset, --device and --seed",
            )
        for stem, default in declared[name]:
            if isinstance(default, str) and isinstance(value, (int, float)):
                value = str(value)
            expected = _kind(default)
            if expected and not _is_kind(value, default):
                raise SurgeryBookError(
                    f"-p {name} {value!r} is not {expected}, as {stem}'s {name} is (default {default!r})",
                    f"pass {expected} to -p {name}",
                )
        if name in CHAPTER_PARAMETERS:  # the range or the choices, as the chapter checks them in its setup cell
            if tasks is None:
                check_parameter(name, value, f"-p {name}")
            else:
                check_task_parameter(name, value, tasks, f"-p {name}")
            if CHAPTER_PARAMETERS[name].is_path and isinstance(value, str):
                # The kernels run in the notebooks' folder: `-p grid_dir results/grid-b32` given from the
                # repository's root meant ./results/grid-b32, and the chapter computed every cell into
                # notebooks/results/grid-b32 instead of reading the grid there.
                value = os.path.abspath(value)
        checked[name] = value
    for stem, default in declared.get("seeds", []):  # a chapter's seeds are seed, ..., seed + seeds - 1
        seeds = checked.get("seeds", default)
        if isinstance(seeds, int):
            try:
                check_seeds(seed, seeds, names=("--seed", "-p seeds"))
            except SurgeryBookError as exc:  # which notebook: its default seeds may be what runs past the end
                raise SurgeryBookError(f"{stem}: {exc.problem}", exc.fix) from None
    return checked


def _kind(default: Any) -> str:
    """What a parameter with ``default`` takes, in words; empty where any value goes."""
    if isinstance(default, bool):
        return "True or False"
    if isinstance(default, int):
        return "a whole number"
    if isinstance(default, float):
        return "a number"
    return "text" if isinstance(default, str) else ""


def _is_kind(value: Any, default: Any) -> bool:
    """Whether ``value`` is of the kind :func:`_kind` names for ``default`` (True is not a whole number here)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def reproduce(
    preset: str,
    out: str | os.PathLike[str],
    *,
    device: str | None = None,
    seed: int = 0,
    source: str | os.PathLike[str] = "notebooks",
    only: Sequence[str] | None = None,
    kernel: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> list[NotebookRun]:
    """Execute the notebooks for ``preset`` into ``out``; see the module docstring for the layout.

    ``parameters`` are passed to every notebook on top of preset, device, seed and output_dir (e.g.
    ``{"surgery_steps": 200}``); a notebook without such a parameter ignores it, and one that none of them
    declares is refused (:func:`check_parameters`). ``cache_dir`` reaches
    the kernels as ``$SURGERY_BOOK_CACHE`` (:func:`~surgery_lib.core.storage.exported_cache`).

    Raises:
        SurgeryBookError: for an unknown preset, a parameter that no notebook declares or of another kind,
            an ``out`` that would overwrite the sources, or a notebook that fails (naming the notebook and the
            cell; the partial copy stays for reading).
    """
    if importlib.util.find_spec("papermill") is None:
        raise SurgeryBookError(
            "papermill is not installed", "pip install 'surgery-book[book]' (or the repository's .venv)"
        )

    definition = get_preset(preset)  # an unknown preset fails here, before any kernel starts
    default_device = definition.default_device
    resolve_device(device, default_device)  # as here, so in the kernels: "banana" or a missing GPU fails now
    _check_seed(seed)
    notebooks = find_notebooks(source, only)
    check_notebooks(notebooks)
    parameters = check_parameters(notebooks, parameters or {}, seed, definition.tasks)
    if kernel is not None:
        check_kernel(kernel)
    out = Path(out).resolve()
    executed_dir = out / "notebooks"
    if executed_dir == Path(source).resolve():
        raise SurgeryBookError(f"{out} would write the executed notebooks over the sources", "pass another --out")
    try:
        executed_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=executed_dir):
            pass
    except OSError as exc:
        raise SurgeryBookError(
            f"cannot write into {out} ({exc.strerror or exc})", "pass --out a writable folder (not a file)"
        ) from None
    parameters = {**(parameters or {}), "preset": preset, "device": device or default_device, "seed": seed}
    # Another run into this folder would write the same notebooks and replace this one's summary: wait for it,
    # then read what it finished.
    with entry_lock(out / "summary.json", f"the notebooks in {out}"):
        return _run_notebooks(notebooks, out, executed_dir, preset, parameters, kernel, source, cache_dir, progress)


def _check_seed(seed: int) -> None:
    """A one-line error for a seed no merge or surgery run accepts, before the first notebook (not in the first
    cell that seeds something, after the earlier notebooks ran)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        interval = interval_text(0, MAX_SEED)
        raise SurgeryBookError(f"--seed {seed!r} is outside {interval}", f"pass a --seed in {interval}")


def _run_notebooks(
    notebooks: Sequence[Path],
    out: Path,
    executed_dir: Path,
    preset: str,
    parameters: dict[str, Any],
    kernel: str | None,
    source: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
) -> list[NotebookRun]:
    """The body of :func:`reproduce`, run while it holds ``out``'s lock: reuse or execute each notebook in turn."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    earlier, inputs = earlier_runs(out), shared_inputs(source)
    runs: list[NotebookRun] = []
    # The summary describes the folder: notebooks that earlier runs wrote there and this one leaves alone stay in it.
    others = [run for name, run in earlier.items() if name not in {notebook.name for notebook in notebooks}]

    def summarize() -> None:
        write_summary(out, preset, sorted([*runs, *others], key=lambda run: run.notebook))

    with exported_cache(cache_dir, USER_PRESETS_ENV):  # the kernels read the cache and presets from their environment
        bar = tqdm(notebooks, desc=f"reproduce ({preset})", unit="notebook", disable=not progress)
        for notebook in bar:
            bar.set_postfix_str(notebook.stem)
            artifacts_dir = out / notebook.stem
            target = executed_dir / notebook.name
            fingerprint = run_fingerprint(notebook, preset, parameters, kernel, inputs)
            reused = _reusable(earlier.get(notebook.name), fingerprint, out, target)
            if reused is not None:
                runs.append(reused)
                summarize()
                continue
            started = time.perf_counter()
            try:
                papermill.execute_notebook(
                    str(notebook),
                    str(target),
                    parameters={**parameters, "output_dir": str(artifacts_dir)},
                    cwd=str(notebook.parent),
                    kernel_name=kernel,
                    progress_bar=False,
                )
            except PapermillExecutionError as exc:
                message = f"{exc.ename}: {exc.evalue}".strip()
                seconds = time.perf_counter() - started
                runs.append(NotebookRun(notebook.name, "failed", seconds, str(target), error=message))
                summarize()
                raise SurgeryBookError(
                    f"notebook {notebook.name} failed in cell {exc.exec_count} ({message})",
                    f"read the traceback in {target}; the summary is in {out / 'summary.md'}",
                ) from None
            artifacts = sorted(
                str(p.relative_to(out)) for p in artifacts_dir.rglob("*") if p.suffix in ARTIFACT_SUFFIXES
            )
            seconds = time.perf_counter() - started
            runs.append(NotebookRun(notebook.name, "ok", seconds, str(target), artifacts, "", fingerprint))
            summarize()
    return runs


def write_summary(out: Path, preset: str, runs: Sequence[NotebookRun]) -> None:
    """``summary.json`` (everything) and ``summary.md`` (a table) in ``out``, written atomically."""
    write_json({"preset": preset, "notebooks": [asdict(run) for run in runs]}, out / "summary.json")
    lines = [
        f"# Reproduction summary: preset `{preset}`",
        "",
        "| notebook | status | seconds | figures | tables |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        figures = sum(a.endswith(".png") for a in run.artifacts)
        tables = sum(a.endswith(".csv") for a in run.artifacts)
        lines.append(f"| {run.notebook} | {run.status} | {run.seconds:.1f} | {figures} | {tables} |")
    failed = [run for run in runs if run.error]
    lines += ["", *(f"**{run.notebook} failed:** {run.error}" for run in failed)]
    with atomic_path(out / "summary.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
