"""Table rows, identified by what they are: a :class:`Row` is a (method, version) key, and its label is built
here, once, for every table, figure and chapter.

A row's ``method`` is a registered merging method (``"task_arithmetic"``) or a reference row of the zoo
(``"expert"``, ``"pretrained"``, ``"mtl"``, ``"zero_shot"``); its ``version`` is 0 for the merge alone, 1 for
+ Surgery and 2 for + SurgeryV2. :func:`row_of` reads a label back into its key, so code that only has a
table's labels (a figure's legend) still colours and groups by key, never by parsing label text itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.merging.api import method_label
from surgery_lib.merging.base import MERGE_METHODS
from surgery_lib.merging.options import MergeOptions
from surgery_lib.settings.base import ZERO_SHOT_ROW, ZOO_ROWS

if TYPE_CHECKING:
    from surgery_lib.settings.base import Zoo

#: The label suffix of each surgery version: the merge alone, + Surgery, + SurgeryV2.
VERSION_SUFFIX = {0: "", 1: " + Surgery", 2: " + SurgeryV2"}
#: Each version in words, for figure legends and table columns.
VERSION_NAMES = {0: "merge alone", 1: VERSION_SUFFIX[1].strip(), 2: VERSION_SUFFIX[2].strip()}
#: The reference rows' keys and default labels (a zoo may relabel them: :attr:`Zoo.reference_labels`).
REFERENCE_LABELS = {**ZOO_ROWS, "zero_shot": ZERO_SHOT_ROW}


@dataclass(frozen=True)
class Row:
    """A table row: ``method`` (a registered merging method or a reference key) and ``version`` (0, 1, 2)."""

    method: str
    version: int = 0

    def __post_init__(self) -> None:
        if self.method not in MERGE_METHODS and self.method not in REFERENCE_LABELS:
            known = ", ".join([*MERGE_METHODS, *REFERENCE_LABELS])
            raise SurgeryBookError(f"no table row for {self.method!r}", f"use a merging method or a reference: {known}")
        if self.version not in VERSION_SUFFIX or (self.version and self.is_reference):
            raise SurgeryBookError(
                f"row {self.method!r} has version {self.version!r}",
                "use 0 (alone), 1 (+ Surgery) or 2 (+ SurgeryV2); reference rows are version 0",
            )

    @property
    def is_reference(self) -> bool:
        """A bound (experts, pretrained, MTL), not a merge."""
        return self.method in REFERENCE_LABELS

    def label(self, zoo: Zoo | None = None, options: MergeOptions | None = None) -> str:
        """The row's label: the method's (on real CLIP a trimming method's says what its top-k keeps, so pass
        the ``zoo`` and ``options``) plus the version's suffix; a reference row's as the ``zoo`` names it."""
        if self.is_reference:
            labels = {**REFERENCE_LABELS, **(zoo.reference_labels if zoo is not None else {})}
            return labels[self.method]
        base = MERGE_METHODS[self.method].label if zoo is None else method_label(zoo, self.method, options)
        return base + VERSION_SUFFIX[self.version]


def row_label(method: str, version: int = 0, zoo: Zoo | None = None, options: MergeOptions | None = None) -> str:
    """``Row(method, version).label(zoo, options)``: e.g. ``row_label("task_arithmetic", 1)`` is
    ``"task arithmetic + Surgery"`` and ``row_label("expert")`` is ``"individual (expert)"``."""
    return Row(method, version).label(zoo, options)


def row_of(label: str) -> Row | None:
    """The key of a row ``label`` built by :meth:`Row.label` (``None`` for any other text): the version from
    its suffix, the method from its label (a real-CLIP trimming note in brackets allowed)."""
    label = str(label)
    for key, name in REFERENCE_LABELS.items():
        if label == name:
            return Row(key)
    version = next((v for v in (2, 1) if label.endswith(VERSION_SUFFIX[v])), 0)
    base = label[: len(label) - len(VERSION_SUFFIX[version])] if version else label
    base = base.split(" [", 1)[0]
    method = next((name for name, spec in MERGE_METHODS.items() if spec.label == base), None)
    return Row(method, version) if method is not None else None
