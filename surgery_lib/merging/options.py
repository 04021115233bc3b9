"""Merge options: each method declares the options it reads, and everything else is generated from them.

An :class:`Option` says once what an option is: its name, type, default, valid range or choices, help text
and command-line flag. A method lists the options it reads (:attr:`~surgery_lib.merging.base.MergeMethod.options`);
registering the method registers them in :data:`MERGE_OPTIONS`, from which the command line builds its flags,
``--help`` and their checks, :class:`MergeOptions` checks its values, and the merge cache builds its key.
Adding an option to a method is an :class:`Option` in the method's module: no other file changes.

The options several families read (the scale, the TIES fraction kept, the seed, ...) are declared here so that
those families share one declaration; an option only one family reads lives in that family's module.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from surgery_lib.core.errors import MAX_SEED, SurgeryBookError, given_or_default, interval_text, whole_number
from surgery_lib.core.registry import Registry
from surgery_lib.models import PRECISIONS


@dataclass(frozen=True)
class Option:
    """One merge option, declared once.

    Attributes:
        name: the :class:`MergeOptions` attribute and the key in the merge cache.
        kind: ``int``, ``float`` or ``str``.
        default: the value when unset; ``None`` means the method's or the preset's (said in ``help``).
        help: the ``--help`` text (the methods that read it are appended).
        low, high: the valid interval for numbers (``None``: unbounded); ``low_open`` / ``high_open`` exclude an end.
        choices: the valid values of a ``str`` option.
        flag: the command-line flag without ``--`` (default: ``name`` with dashes).
    """

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    flag: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (int, float, str):
            raise SurgeryBookError(f"merge option {self.name!r} has kind {self.kind!r}", "use int, float or str")
        if self.default is not None:
            self.check(self.default)

    @property
    def cli_flag(self) -> str:
        """``--flag`` on the command line."""
        return "--" + (self.flag or self.name.replace("_", "-"))

    @property
    def dest(self) -> str:
        """The attribute the flag sets on argparse's namespace (``--adamerging-lr`` -> ``adamerging_lr``)."""
        return self.cli_flag[2:].replace("-", "_")

    @property
    def interval(self) -> str:
        """The valid interval in words, e.g. ``(0, 1]``; empty for an unbounded or ``str`` option."""
        if self.low is None and self.high is None:
            return ""
        return interval_text(self.low, self.high, self.low_open, self.high_open)

    def check(self, value: Any) -> Any:
        """``value`` converted to :attr:`kind` when valid; a :class:`SurgeryBookError` naming the flag otherwise.

        ``None`` is valid only for an option whose default is ``None`` (the method's or preset's value)."""
        flag = self.cli_flag
        if value is None:
            if self.default is None:
                return None
            raise SurgeryBookError(f"{flag} cannot be None", f"pass a value or leave it unset (default {self.default})")
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                choices = ", ".join(self.choices or ())
                raise SurgeryBookError(f"{flag} {value!r} is not one of: {choices}", f"pass one of {choices} to {flag}")
            return value
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's numbers too
            raise SurgeryBookError(f"{flag} {value!r} is not a number", f"pass a {self.kind.__name__} to {flag}")
        if self.kind is int:  # NaN and infinity too: int() raised a ValueError or an OverflowError on them
            value = whole_number(value, flag, f"pass an integer to {flag}")
        elif not math.isfinite(value):
            raise SurgeryBookError(f"{flag} {value} is not a finite number", f"pass a finite value to {flag}")
        value = self.kind(value)
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (above and below):
            raise SurgeryBookError(
                f"{flag} {value} is outside {self.interval}", f"pass a value in {self.interval} to {flag}"
            )
        return value


#: Every option some registered method reads, by name, in the order first declared.
MERGE_OPTIONS: Registry[Option] = Registry("merge option")


def register_option(option: Option) -> Option:
    """Add ``option`` to :data:`MERGE_OPTIONS` (registering a method does this for each option it reads).

    Raises:
        SurgeryBookError: another declaration already uses the name (one name, one meaning).
    """
    known = MERGE_OPTIONS.get(option.name)
    if known is not None and known != option:
        raise SurgeryBookError(
            f"merge option {option.name!r} is declared twice, differently ({known} and {option})",
            "read the declared Option (surgery_lib.merging.options or the family module) instead of declaring it again",
        )
    clash = [o.name for o in MERGE_OPTIONS.values() if o.cli_flag == option.cli_flag and o.name != option.name]
    if clash:
        raise SurgeryBookError(f"merge options {clash[0]!r} and {option.name!r} share {option.cli_flag}", "set flag=")
    return MERGE_OPTIONS.register(option.name, option, replace=known is not None)


class MergeOptions:
    """The values of the merge options (immutable): ``MergeOptions(scale=0.5, seed=1)``.

    Any registered option (:data:`MERGE_OPTIONS`) can be set; an unset one reads as its declared default.
    Values are checked on construction (range, choices, type), with the flag's name in the error. Each method
    reads only the options it declares, and only those key its cache entry.
    """

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        checked = {name: option_named(name).check(value) for name, value in values.items()}
        object.__setattr__(self, "_values", checked)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        option = MERGE_OPTIONS.get(name)
        if option is None:
            raise AttributeError(f"no merge option {name!r} (registered: {', '.join(MERGE_OPTIONS)})")
        return self._values.get(name, option.default)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"MergeOptions are immutable: use options.replace({name}=...)")

    def replace(self, **changes: Any) -> MergeOptions:
        """A copy with ``changes`` applied (each checked)."""
        return MergeOptions(**{**self._values, **changes})

    def values(self) -> dict[str, Any]:
        """Every registered option's value, defaults included."""
        return {name: getattr(self, name) for name in MERGE_OPTIONS}

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self.values().items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MergeOptions) and self.values() == other.values()

    def __hash__(self) -> int:
        return hash(tuple(self.values().items()))

    def __repr__(self) -> str:
        return f"MergeOptions({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable for the grid's worker processes
        return (_rebuild, (self._values,))


def as_merge_options(options: Any) -> MergeOptions:
    """``options`` where it is a :class:`MergeOptions`, the defaults for None.

    Raises:
        SurgeryBookError: for anything else; for a dict, with the call that builds the options from it.
    """
    return given_or_default(options, MergeOptions, "options", "MergeOptions(scale=0.3)")


def _rebuild(values: dict[str, Any]) -> MergeOptions:
    return MergeOptions(**values)


def option_named(name: str) -> Option:
    """The registered option ``name``; a :class:`SurgeryBookError` listing the registered ones otherwise."""
    option = MERGE_OPTIONS.get(name)
    if option is None:
        raise SurgeryBookError(
            f"unknown merge option {name!r}", f"use one of: {', '.join(MERGE_OPTIONS)} (or declare it in the method)"
        )
    return option


# The options several families read, declared once here.
SCALE = Option(
    "scale",
    float,
    None,
    "the scaling coefficient of the (combined) task vector (default: 0.3 for task arithmetic and the "
    "methods built on it; TIES: its operating point's scale; Iso and TSV-M: their published values)",
)
KEEP_FRACTION = Option(
    "keep_fraction",
    float,
    0.2,
    "TIES trimming: the fraction of each task vector's entries kept, by magnitude (default 0.2)",
    low=0,
    high=1,
    low_open=True,
)
STEPS = Option(
    "steps",
    int,
    None,
    "optimisation steps of the merge (AdaMerging: the preset's adamerging_steps; WUDI: its published 300)",
    low=1,
)
SEED = Option(
    "seed",
    int,
    0,
    "the seed of the merge's random draws (batches, sampled images, DARE's drops; default 0)",
    low=0,
    high=MAX_SEED,
)
SAMPLES = Option(
    "samples", int, 256, "labelled training images per task the merge reads (default 256)", low=1, high=10**7
)
PRECISION = Option(
    "precision",
    str,
    None,
    "GPU precision of the merge's forward passes (default: the preset's; fp32 for real CLIP, as the official code; "
    "tf32 = fp32 with TF32 matmuls, torch 1.10's default on Ampere GPUs)",
    choices=PRECISIONS,
)
