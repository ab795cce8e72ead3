"""Name -> component registries with one-line descriptions and "did you mean" errors.

Registries are the only global state of cl-bench: they are filled once, at import time, by the
``@REGISTRY.register(...)`` decorators of the component modules (imported by ``cl_bench.cli``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from cl_bench.errors import ConfigError

T = TypeVar("T")
_KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def closest(name: str, choices: list[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: its key, the object, and a one-line description."""

    name: str
    obj: T
    description: str
    aliases: tuple[str, ...] = ()


class Registry(Generic[T]):
    """A kebab-case keyed registry. Duplicates raise; unknown names list the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, description: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (and its ``aliases``)."""

        def decorator(obj: T) -> T:
            for key in (name, *aliases):
                if not _KEBAB.match(key):
                    raise ValueError(f"{self.kind} name {key!r} is not kebab-case")
                if key in self._entries or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[name] = Entry(name, obj, description, aliases)
            for alias in aliases:
                self._aliases[alias] = name
            return obj

        return decorator

    def canonical(self, name: str) -> str:
        """The registered key for ``name`` (resolving aliases); raise a ConfigError if unknown."""
        if name in self._entries:
            return name
        if name in self._aliases:
            return self._aliases[name]
        valid = sorted([*self._entries, *self._aliases])
        raise ConfigError(f"unknown {self.kind} '{name}'{closest(name, valid)}; valid: {', '.join(valid)}")

    def get(self, name: str) -> T:
        """The object registered as ``name`` (or an alias of it)."""
        return self._entries[self.canonical(name)].obj

    def entry(self, name: str) -> Entry[T]:
        """The whole registration of ``name`` (or an alias): name, object, description, aliases."""
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered keys (aliases excluded), sorted."""
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[name] for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases


# The three registries. Values are typed loosely here to keep this module free of torch; each
# component module documents what it registers (a Strategy subclass, a scenario factory, a
# backbone factory). They are filled when cl_bench.cli imports the component packages.
STRATEGIES: Registry = Registry("strategy")
SCENARIOS: Registry = Registry("scenario")
BACKBONES: Registry = Registry("backbone")
