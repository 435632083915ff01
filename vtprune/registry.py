"""Name → class registries for methods and adapters.

Nothing is imported until a registry is first used, so importing vtprune imports no method or adapter code.
A built-in method is one file in ``vtprune/methods/`` whose class carries ``@METHODS.register("name")``, a
model family one file in ``vtprune/adapters/`` whose class carries ``@ADAPTERS.register("family")``: the
registry imports every module of its package on first use (no list to edit). Third-party packages add their
own through entry-point groups::

    [project.entry-points."vtprune.methods"]
    my_method = "my_pkg.my_method:MyMethod"
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import threading
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")


def _same(a: object, b: object) -> bool:
    """The same class, also across a module reload (re-registration is then a no-op)."""

    def key(t: object) -> str:
        return t if isinstance(t, str) else f"{t.__module__}:{t.__qualname__}"  # type: ignore[attr-defined]

    return key(a) == key(b)


class Registry(Generic[T]):
    """A lazy registry with aliases, "did you mean" errors and an entry-point group."""

    def __init__(self, kind: str, group: str, package: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self.package = package  # every module of it is imported on first use (its classes self-register)
        self._entries: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_loaded = False
        self._discovered = package is None
        self._discovering = False
        # first use imports modules whose decorators call add(): re-entrant, and other threads wait for it
        self._lock = threading.RLock()

    def add(self, name: str, target: T | str, *, aliases: tuple[str, ...] = ()) -> None:
        """Register ``target`` (a class, or a lazy ``"module:attr"`` string) under ``name``."""
        with self._lock:
            for key in (name, *aliases):
                held = self._entries.get(key, self._entries.get(self._aliases.get(key, ""), None))
                if held is not None and not _same(held, target):
                    raise ValueError(f"{self.kind} name {key!r} is already registered")
            self._entries[name] = target
            for alias in aliases:
                self._aliases[alias] = name

    def register(self, name: str, *, aliases: tuple[str, ...] = ()):
        """Class decorator: ``@METHODS.register("my_method")``; the class's ``name`` must agree."""

        def deco(cls: T) -> T:
            own = getattr(cls, "name", name)
            if own != name:
                raise ValueError(f"{cls.__name__}.name is {own!r} but it is registered as {name!r}")
            self.add(name, cls, aliases=aliases)
            return cls

        return deco

    def _discover(self) -> None:
        if self._discovered:  # set only once every module is imported, so no thread sees a partial registry
            return
        with self._lock:
            if self._discovered or self._discovering:  # done, or this thread is importing them right now
                return
            self._discovering = True
            try:
                pkg = importlib.import_module(self.package)
                for info in pkgutil.iter_modules(pkg.__path__):
                    if not info.name.startswith("_") and info.name != "base":
                        importlib.import_module(f"{self.package}.{info.name}")
                self._discovered = True
            finally:
                self._discovering = False

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        with self._lock:
            if self._entry_points_loaded:
                return
            for ep in metadata.entry_points(group=self.group):
                if ep.name not in self._entries and ep.name not in self._aliases:
                    self._entries[ep.name] = ep.value
            self._entry_points_loaded = True

    def canonical(self, name: str) -> str:
        """The registry key for ``name`` (resolving aliases); raises with suggestions if unknown."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
        self._discover()
        if name not in self._entries and name not in self._aliases:
            self._load_entry_points()
        if name in self._aliases:
            return self._aliases[name]
        if name in self._entries:
            return name
        known = self.names(include_aliases=True)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown {self.kind} {name!r}.{hint} Available: {', '.join(self.names())}.")

    def get(self, name: str) -> T:
        key = self.canonical(name)
        target = self._entries[key]
        if isinstance(target, str):
            with self._lock:
                module, _, attr = target.partition(":")
                target = getattr(importlib.import_module(module), attr)
                self._entries[key] = target
        return target  # type: ignore[return-value]

    def names(self, *, include_aliases: bool = False) -> list[str]:
        self._discover()
        self._load_entry_points()
        names = list(self._entries)
        if include_aliases:
            names += list(self._aliases)
        return sorted(names)

    def aliases_of(self, name: str) -> list[str]:
        self._discover()
        return sorted(a for a, target in self._aliases.items() if target == name)

    def __contains__(self, name: object) -> bool:
        try:
            self.canonical(name)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False
        return True


METHODS: Registry = Registry("method", "vtprune.methods", package="vtprune.methods")

ADAPTERS: Registry = Registry("model adapter", "vtprune.adapters", package="vtprune.adapters")
