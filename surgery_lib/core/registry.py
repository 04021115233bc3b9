"""Name -> object registries: merging methods, presets and settings are looked up by name through one."""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from typing import Generic, TypeVar

from surgery_lib.core.errors import SurgeryBookError, use_one_of

T = TypeVar("T")


class Registry(MutableMapping[str, T], Generic[T]):
    """A mapping ``name -> T`` that grows by :meth:`register`, in registration order. Item assignment
    (``registry[name] = entry``) replaces on purpose; deletion unregisters (tests use both through monkeypatch).

    ``what`` names the kind of object in errors (``"merging method"``). ``load`` runs once, before the
    first lookup, to register entries that live outside Python modules (preset JSON files).
    """

    def __init__(self, what: str, load: Callable[[], None] | None = None):
        self.what = what
        self._entries: dict[str, T] = {}
        self._load = load

    def _ensure_loaded(self) -> None:
        if self._load is not None:
            load, self._load = self._load, None
            load()

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` under ``name`` and return it.

        Raises:
            SurgeryBookError: ``name`` is taken (and ``replace`` is False), or is not a plain identifier-like name.
        """
        if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
            raise SurgeryBookError(f"invalid {self.what} name {name!r}", "use letters, digits, '-', '_' and '.' only")
        if name in self._entries and not replace:
            raise SurgeryBookError(
                f"a {self.what} named {name!r} is already registered", "choose another name, or pass replace=True"
            )
        self._entries[name] = entry
        return entry

    def get(self, name: str, default: T | None = None) -> T | None:  # type: ignore[override]
        self._ensure_loaded()
        return self._entries.get(name, default)

    def __getitem__(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._entries[name]
        except KeyError:
            raise SurgeryBookError(f"unknown {self.what} {name!r}", use_one_of(name, self._entries)) from None

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry, replace=True)

    def __delitem__(self, name: str) -> None:
        self._ensure_loaded()
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._ensure_loaded()
        return iter(self._entries)

    def __len__(self) -> int:
        self._ensure_loaded()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.what!r}, {list(self._entries)})"
