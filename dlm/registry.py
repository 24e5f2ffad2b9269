"""Named registries for dlm's extension points (schedules, objectives, decoders, ...).

A registry is a dict plus a ``register`` decorator. A failed lookup names what exists and
suggests the closest match, so a typo in a recipe is a one-line fix.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def close_matches(name: str, options: list[str]) -> str:
    """' Did you mean 'x'?' when something is close, else ''."""
    hits = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f" Did you mean {hits[0]!r}?" if hits else ""


class Registry(Generic[T]):
    """``builtins`` maps the names dlm ships to the module that registers each: the names are
    known (for ``--help`` and error messages) without importing those modules, and a lookup
    imports the one it needs."""

    def __init__(self, kind: str, builtins: dict[str, str] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._builtins = dict(builtins or {})

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items and name in self._builtins:
            importlib.import_module(self._builtins[name])  # its @register runs on import
        if name not in self._items:
            known = self.names()
            raise KeyError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(known)}." + close_matches(name, known)
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Every name, the built-ins included, without importing anything."""
        return sorted({*self._items, *self._builtins})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._builtins

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def build(self, name: str, **settings):
        """The dataclass registered as ``name`` built with ``settings``; an unknown name or setting
        is a ValueError listing what exists."""
        from dataclasses import fields

        try:
            cls = self.get(name)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
        allowed = [f.name for f in fields(cls)]
        for key in settings:
            if key not in allowed:
                raise ValueError(
                    f"{self.kind} {name!r} has no setting {key!r}; its settings: {', '.join(allowed)}."
                    + close_matches(key, allowed)
                )
        return cls(**settings)
