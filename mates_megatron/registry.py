"""Components registered by name: a config names a selector, scorer, estimator or pool, and gets it here.

Built-in components register when their module is imported; your own register the same way from a module
that ``SelectionConfig.imports`` names (it is imported before the config is checked).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> component class for one extension point."""

    def __init__(self, kind: str, *, base: type | None = None, how_to_register: str | None = None) -> None:
        # base: the class every registered component derives from (None: any object, e.g. a function).
        self.kind, self.base = kind, base
        self.how_to_register = how_to_register or (
            f"register your own with @{kind.upper().replace(' ', '_')}S.register(name) in a module listed in "
            "selection.imports"
        )
        self._items: dict[str, T] = {}

    def require_base(self, base: type) -> None:
        """Refuse, from now on, components that do not derive from ``base``, and check those registered so far
        (for a registry that must stay a leaf: its base is set by the package that imports both)."""
        self.base = base
        for name, item in self._items.items():
            self._check(name, item)

    def _check(self, name: str, item: T) -> None:
        if self.base is not None and not (isinstance(item, type) and issubclass(item, self.base)):
            raise TypeError(
                f"{self.kind} {name!r}: {getattr(item, '__name__', item)!r} does not derive from "
                f"{self.base.__module__}.{self.base.__name__}; subclass it (the base declares what the run "
                "reads of a component)"
            )

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``@SCORERS.register("length")``; a name is registered once."""

        def add(item: T) -> T:
            self._check(name, item)
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.kind} {name!r} is registered twice: rename one of them")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))} "
                f"({self.how_to_register})"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test's temporary entry)."""
        del self._items[name]


def import_modules(modules: Iterable[str]) -> None:
    """Import the modules that register user components, naming the config field when one is missing."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(
                f"SelectionConfig.imports: cannot import {module!r} ({e}); put it on PYTHONPATH or fix the name"
            ) from e
