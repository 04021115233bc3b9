"""What every merging family shares: the result, the registry of named methods, and (from
:mod:`~surgery_lib.merging.options`) the options they declare.

A family module defines its method's ``run`` function and calls :func:`register_method` once per method it
offers; the command line (``--method`` choices and help), the main table, the merge cache and the contract
test all read :data:`MERGE_METHODS`. Adding a method is one module plus its import line in
``surgery_lib/merging/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from surgery_lib.core.errors import SurgeryBookError
from surgery_lib.core.registry import Registry
from surgery_lib.merging.options import MergeOptions, Option, register_option

if TYPE_CHECKING:
    from surgery_lib.settings.base import Zoo


@dataclass
class MergeResult:
    """A merged state dict, how long it took, and method-specific details (e.g. AdaMerging coefficients)."""

    method: str
    state: dict[str, torch.Tensor]
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


#: ``run(zoo, experts, options, device, progress) -> (merged state dict, details)``; ``experts`` maps the
#: tasks to merge to their state dicts (all of the zoo's, or a subset).
MergeFunction = Callable[
    ["Zoo", dict[str, Mapping[str, torch.Tensor]], MergeOptions, torch.device, bool],
    tuple[dict[str, torch.Tensor], dict[str, Any]],
]

#: ``prepare(zoo, experts, options, device, progress) -> at_scale`` for a merge of the form
#: ``theta_0 + scale * update``: everything that does not depend on the scale (task vectors, SVDs, DARE's masks,
#: TIES' election) computed once, and ``at_scale(scale) -> (merged state dict, details)`` finishing the merge at
#: one scale. A search over the scale then prepares once per value of its other options, as the official searches
#: do: tall_masks' evaluation loop, which the TSV-M and Iso-C code reuses, merges the task vectors once and applies
#: the merged vector at every coefficient of its grid.
PreparedMerge = Callable[
    ["Zoo", dict[str, Mapping[str, torch.Tensor]], MergeOptions, torch.device, bool],
    Callable[[float], tuple[dict[str, torch.Tensor], dict[str, Any]]],
]


def run_at_scale(prepare: PreparedMerge, default_scale: float) -> MergeFunction:
    """The :data:`MergeFunction` of a method given as :data:`PreparedMerge`: prepared, then finished at
    ``options.scale`` (``default_scale`` when it is None). One code path, so a search's candidate at a scale is
    bit for bit the method's merge at that scale."""

    def run(zoo, experts, options, device, progress):
        scale = default_scale if options.scale is None else options.scale
        return prepare(zoo, experts, options, device, progress)(scale)

    return run


@dataclass(frozen=True)
class MergeMethod:
    """A named merging method.

    Attributes:
        name: the registry key (``--method`` value).
        label: the row label in tables.
        run: the merge (:data:`MergeFunction`).
        options: the options it reads (:class:`~surgery_lib.merging.options.Option`, declared once each); they,
            and only they, key its cache entry, and the command line offers exactly their flags for it.
        trims: it trims task vectors the TIES way (on real CLIP its label names the kept fraction).
        data: ``"free"`` (weights only), ``"labeled"`` (training images and labels), ``"unlabeled"``
            (test-time images without labels) or ``"validation"`` (labelled validation images: the tuned twins).
        search: the grid its official code searches on validation data, ``((option, values), ...)`` with the
            values in the order they are tried; a method with one gets a tuned twin
            (:func:`~surgery_lib.merging.tuning.register_tuned`).
        prepare: the merge split at its scale (:data:`PreparedMerge`), for a method whose merge is
            ``theta_0 + scale * update``; its tuned twin then computes the update once per value of the searched
            options other than the scale. ``run`` must be ``run_at_scale(prepare, default)``.
    """

    name: str
    label: str
    run: MergeFunction = field(repr=False)
    options: tuple[Option, ...] = ()
    trims: bool = False
    data: str = "free"
    search: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    prepare: PreparedMerge | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        strays = [option for option in self.options if not isinstance(option, Option)]
        if strays:
            raise SurgeryBookError(
                f"merging method {self.name!r} declares options {strays} that are not Option declarations",
                "pass Option objects (surgery_lib.merging.options: SCALE, SEED, ... or your own Option(...))",
            )
        if self.data not in DATA_KINDS:
            raise SurgeryBookError(
                f"merging method {self.name!r} declares data={self.data!r}", f"use one of {', '.join(DATA_KINDS)}"
            )
        unread = [name for name, values in self.search if name not in self.reads or not values]
        if unread:
            raise SurgeryBookError(
                f"merging method {self.name!r} searches {unread}, which it does not read or gives no values",
                "search only options in its options=(...), each with at least one value",
            )
        for name, values in self.search:
            for value in values:
                next(o for o in self.options if o.name == name).check(value)
        if self.prepare is not None and "scale" not in self.reads:
            raise SurgeryBookError(
                f"merging method {self.name!r} is prepared for a scale it does not read",
                "declare the SCALE option (options=(SCALE, ...)) or leave prepare out",
            )

    @property
    def reads(self) -> tuple[str, ...]:
        """The names of the options it reads."""
        return tuple(option.name for option in self.options)

    def key_options(self, options: MergeOptions) -> dict[str, Any]:
        """The options this method reads, by name: what its cache key covers."""
        return {option: getattr(options, option) for option in self.reads}


#: What a method reads besides the experts' weights (:attr:`MergeMethod.data`).
DATA_KINDS = ("free", "labeled", "unlabeled", "validation")

#: Every registered merging method, in registration order.
MERGE_METHODS: Registry[MergeMethod] = Registry("merging method")


def register_method(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to :data:`MERGE_METHODS` (a family module calls this once per method) and return it."""
    for option in method.options:
        register_option(option)
    return MERGE_METHODS.register(method.name, method)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; raises :class:`SurgeryBookError` listing the known ones."""
    return MERGE_METHODS[name]


def check_method(name: str) -> str:
    """Raise a clear error for an unknown method name; return the name."""
    return get_method(name).name


class _Labels(Mapping[str, str]):
    """``METHODS[name]`` is the table label of a registered method (a live view of the registry)."""

    def __getitem__(self, name: str) -> str:
        return MERGE_METHODS[name].label

    def __iter__(self) -> Iterator[str]:
        return iter(MERGE_METHODS)

    def __len__(self) -> int:
        return len(MERGE_METHODS)

    def __repr__(self) -> str:
        return repr(dict(self))


#: Method name -> the label it gets in tables, for every registered method.
METHODS: Mapping[str, str] = _Labels()


class _Trimming(Set[str]):
    """The names of the registered methods that trim the TIES way (a live view of the registry)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in MERGE_METHODS and MERGE_METHODS[name].trims

    def __iter__(self) -> Iterator[str]:
        return (name for name, method in MERGE_METHODS.items() if method.trims)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(tuple(self))


#: Methods that trim task vectors the TIES way (their label names the kept fraction on real CLIP).
TRIMMING: Set[str] = _Trimming()

#: The rows of the papers' main table, in their order (plus the zoo's reference rows first).
MAIN_TABLE = (
    "weight_averaging",
    "fisher",
    "regmean",
    "task_arithmetic",
    "ties",
    "adamerging_task",
    "adamerging_layer",
    "adamerging_plus_task",
    "adamerging_plus",
)

#: The merges the papers repair with Surgery and SurgeryV2 (their main table's rows).
REPAIRED = (
    "weight_averaging",
    "task_arithmetic",
    "ties",
    "adamerging_task",
    "adamerging_layer",
    "adamerging_plus_task",
    "adamerging_plus",
)


def ties_zero_entries(zoo: Zoo) -> int:
    """The all-zero entries the official TIES trimmed together with this zoo's task vectors (real CLIP's text leftovers)."""
    return zoo.ties_zero_entries


def train_subset(zoo: Zoo, task: str, count: int, seed: int) -> torch.Tensor:
    """``count`` random training images of ``task`` (seeded), normalised: (count, 3, H, W) float32."""
    data = zoo.suite[task]
    index = torch.randperm(len(data.labels["train"]), generator=torch.Generator().manual_seed(seed))[:count]
    return data.normalized("train", index)


def with_options(options: MergeOptions, **changes: Any) -> MergeOptions:
    """``options`` with ``changes`` applied, ignoring changes that are None."""
    return options.replace(**{k: v for k, v in changes.items() if v is not None})
