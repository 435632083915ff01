"""Name → class registries for methods and adapters.

Entries are lazy (``"module:attr"`` strings) so importing vtprune imports no method or adapter code.
Third-party packages add their own through entry-point groups::

    [project.entry-points."vtprune.methods"]
    my_method = "my_pkg.my_method:MyMethod"
"""

from __future__ import annotations

import difflib
import importlib
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A lazy registry with aliases, "did you mean" errors and an entry-point group."""

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_loaded = False

    def add(self, name: str, target: T | str, *, aliases: tuple[str, ...] = ()) -> None:
        """Register ``target`` (a class, or a lazy ``"module:attr"`` string) under ``name``."""
        for key in (name, *aliases):
            if key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} name {key!r} is already registered")
        self._entries[name] = target
        for alias in aliases:
            self._aliases[alias] = name

    def register(self, name: str, *, aliases: tuple[str, ...] = ()):
        """Class decorator: ``@METHODS.register("my_method")``."""

        def deco(cls: T) -> T:
            self.add(name, cls, aliases=aliases)
            return cls

        return deco

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.group):
            if ep.name not in self._entries and ep.name not in self._aliases:
                self._entries[ep.name] = ep.value

    def canonical(self, name: str) -> str:
        """The registry key for ``name`` (resolving aliases); raises with suggestions if unknown."""
        if not isinstance(name, str):
            raise TypeError(f"{self.kind} name must be a string, got {type(name).__name__}")
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
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._entries[key] = target
        return target  # type: ignore[return-value]

    def names(self, *, include_aliases: bool = False) -> list[str]:
        self._load_entry_points()
        names = list(self._entries)
        if include_aliases:
            names += list(self._aliases)
        return sorted(names)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, target in self._aliases.items() if target == name)

    def __contains__(self, name: object) -> bool:
        try:
            self.canonical(name)  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return False
        return True


# One line per method: adding a method is one new file plus one line here.
METHODS: Registry = Registry("method", "vtprune.methods")
METHODS.add("random", "vtprune.methods.random:RandomPrune")
METHODS.add("pool", "vtprune.methods.pool:SpatialPool", aliases=("downsample",))
METHODS.add("fastv", "vtprune.methods.fastv:FastV")
METHODS.add("cls_attention", "vtprune.methods.cls_attention:ClsAttention", aliases=("fastervlm",))
METHODS.add("kcenter", "vtprune.methods.kcenter:KCenter", aliases=("divprune",))
METHODS.add("todre_drop", "vtprune.methods.kcenter:MigrationDrop")
METHODS.add("mmr", "vtprune.methods.mmr:MMR", aliases=("idpruner",))
METHODS.add("coverage", "vtprune.methods.coverage:Coverage", aliases=("mmtok",))
METHODS.add("entropy", "vtprune.methods.entropy:EntropyPrune", aliases=("entropyprune",))
METHODS.add("debiased_attention", "vtprune.methods.debiased_attention:DebiasedAttention")
METHODS.add("zeroth_order", "vtprune.methods.zeroth_order:ZerothOrder", aliases=("zoo_prune", "zooprune"))
METHODS.add("transition", "vtprune.methods.transition:TransPrune", aliases=("transprune",))
METHODS.add("visionzip", "vtprune.methods.visionzip:VisionZip")
METHODS.add("dart", "vtprune.methods.dart:DART")

ADAPTERS: Registry = Registry("model adapter", "vtprune.adapters")
ADAPTERS.add("llava", "vtprune.adapters.llava:LlavaAdapter")
ADAPTERS.add("llava_next", "vtprune.adapters.llava_next:LlavaNextAdapter")
ADAPTERS.add("llava_next_video", "vtprune.adapters.llava_next_video:LlavaNextVideoAdapter")
ADAPTERS.add("llava_onevision", "vtprune.adapters.llava_onevision:LlavaOnevisionAdapter")
ADAPTERS.add("internvl", "vtprune.adapters.internvl:InternVLAdapter")
ADAPTERS.add("qwen2_vl", "vtprune.adapters.qwen2_vl:Qwen2VLAdapter")
ADAPTERS.add("qwen2_5_vl", "vtprune.adapters.qwen2_5_vl:Qwen2_5VLAdapter")
ADAPTERS.add("qwen3_vl", "vtprune.adapters.qwen3_vl:Qwen3VLAdapter")
