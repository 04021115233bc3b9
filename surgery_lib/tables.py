"""Tables for reading: the summary columns first, one decimal, the best value marked, per-task columns folded away.

A results table here has one row per method and one column per task plus ``average`` (and sometimes
``bias`` or ``normalized``). Eight task columns push the average off a page or a notebook's width, so
:func:`readable` shows the summary columns first and folds the per-task columns into a collapsible
block (HTML ``<details>``, which Jupyter, Colab and the rendered book all show as a click-to-open row).
"""

from __future__ import annotations

import hashlib
import html
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

from surgery_lib.settings.base import REFERENCE_ROWS

if TYPE_CHECKING:
    import pandas as pd

#: Columns that summarise a row, shown before (and, in the folded view, instead of) the per-task columns.
SUMMARY_COLUMNS = ("average", "average (normalised)", "normalized average", "± std", "gain", "bias")

#: Columns that describe a spread or a cost, not a result: never marked as best.
UNRANKED = frozenset(
    {"± std", "std", "seeds", "cells", "seconds", "minutes", "peak memory (GB)", "peak_rss_mib", "peak_gpu_gib"}
)

#: Columns where less is better (the representation bias): their best value is the smallest.
LOWER_IS_BETTER = frozenset({"bias", "bias before", "bias after"})


class ReadableTable:
    """A results table shown for reading. ``frame`` keeps every number; the display rounds and marks.

    Args:
        table: rows are methods (or settings), columns tasks and summary columns; numbers or strings
            such as ``"74.2 ± 0.4"``.
        digits: decimals shown (the stored numbers are not rounded).
        lower_is_better: column names whose best value is the smallest; by default the bias columns
            (:data:`LOWER_IS_BETTER`), or every column when ``True``.
        fold: fold the per-task columns into a collapsible block (default: when there are summary
            columns to show instead).
        mark_best: mark each column's best value; ``False`` where best means nothing (coefficients,
            settings).

    The best value of each numeric column is bold. Reference rows (the experts, multi-task learning,
    the pretrained model: upper and lower bounds, not competitors) are left out of that comparison
    unless the table has nothing else.
    """

    def __init__(
        self,
        table: pd.DataFrame,
        *,
        digits: int = 1,
        lower_is_better: bool | Sequence[str] | None = None,
        fold: bool | None = None,
        mark_best: bool = True,
    ) -> None:
        summary = [c for c in SUMMARY_COLUMNS if c in table.columns]
        self.frame = table[summary + [c for c in table.columns if c not in summary]]
        self.summary = summary
        self.digits = digits
        self.mark_best = mark_best
        if lower_is_better is True:
            self.lower = set(map(str, table.columns))
        else:
            self.lower = set(lower_is_better or ()) | (LOWER_IS_BETTER if lower_is_better is None else set())
        per_task = len(self.frame.columns) - len(summary)
        # One column more is shown, not hidden behind a fold that would only repeat the table.
        self.fold = bool(summary) and per_task > 1 if fold is None else fold

    def best(self) -> dict[str, object]:
        """The row label holding the best value of each numeric column (reference rows excluded)."""
        import pandas as pd

        if not self.mark_best:
            return {}
        rows = [r for r in self.frame.index if str(r) not in REFERENCE_ROWS] or list(self.frame.index)
        best = {}
        for column in self.frame.columns:
            if str(column) in UNRANKED:
                continue
            values = pd.to_numeric(self.frame.loc[rows, column], errors="coerce").dropna()
            if len(values) > 1 and values.nunique() > 1:
                best[column] = values.idxmin() if str(column) in self.lower else values.idxmax()
        return best

    def _cell(self, value: object) -> str:
        # numpy scalars too: a float32 coefficient printed through str() showed eight digits.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return str(value)
        if isinstance(value, numbers.Integral):
            return f"{int(value):,}"
        if math.isnan(value):
            return ""
        return f"{value:.{self.digits}f}"

    def _html(self, columns: Sequence[str], best: dict[str, object]) -> str:
        head = "".join(f"<th>{_breakable(c)}</th>" for c in columns)
        body = []
        shown = self.frame[list(columns)]
        for position, label in enumerate(shown.index):
            cells = []
            for column in columns:  # by column, keeping its dtype (a row would turn counts into floats)
                text = html.escape(self._cell(shown[column].iloc[position]))
                cells.append(f"<td><b>{text}</b></td>" if best.get(column) == label else f"<td>{text}</td>")
            # Row labels in normal weight, so that bold means "best" and nothing else.
            label_cell = f'<th style="font-weight: normal; text-align: left">{html.escape(str(label))}</th>'
            body.append(f"<tr>{label_cell}{''.join(cells)}</tr>")
        # The wrapper scrolls sideways on a screen narrower than the table instead of cutting its last columns.
        return (
            '<div style="overflow-x: auto"><table class="dataframe readable-table">'
            f"<thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"
        )

    def _repr_html_(self) -> str:
        best = self.best()
        note = "<p><small><b>bold</b>: best per column"
        note += (
            " among the merges (reference rows are bounds, not competitors)"
            if any(str(r) in REFERENCE_ROWS for r in self.frame.index)
            else ""
        )
        note += "</small></p>" if best else ""
        columns = list(self.frame.columns)
        if not self.fold:
            return self._html(columns, best) + (note if best else "")
        per_task = [c for c in columns if c not in self.summary]
        # A stable id keeps re-executed notebooks free of spurious diffs.
        digest = hashlib.sha1(self.frame.to_csv().encode()).hexdigest()[:8]
        return (
            self._html(self.summary, best)
            + f'<details id="table-{digest}"><summary>{_fold_label(per_task)}</summary>'
            + self._html(per_task, best)  # the summary columns are right above: repeated they widened it past the page
            + "</details>"
            + (note if best else "")
        )

    def __repr__(self) -> str:
        shown = self.frame[self.summary] if self.fold else self.frame
        return shown.to_string(float_format=lambda v: f"{v:.{self.digits}f}")


def _breakable(name: object) -> str:
    """A column name that may wrap after its underscores (``street_digits``), so that eight task columns fit the
    page; the text and what a reader copies are unchanged."""
    return html.escape(str(name)).replace("_", "_<wbr>")


def _fold_label(columns: Sequence[str]) -> str:
    return f"All {len(columns)} per-task columns" if len(columns) > 1 else f"The {columns[0]} column"


def readable(table: pd.DataFrame, **options) -> ReadableTable:
    """``table`` for reading in a notebook or the book: see :class:`ReadableTable` for ``options``."""
    return ReadableTable(table, **options)
