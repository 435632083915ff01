"""The Patcher: the only way vtprune changes a model, and the record that undoes it.

Every hook, attribute swap or wrapped method goes through a :class:`Patcher`, which keeps an undo
callable per change and replays them last-in-first-out. ``undo()`` is idempotent, so a handle can be
removed twice, or from ``__exit__`` after an exception, without harm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MISSING = object()


class Patcher:
    """Records every change made to a model so that :meth:`undo` restores it exactly."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    @property
    def active(self) -> list[str]:
        """Human-readable descriptions of the changes currently installed, oldest first."""
        return [what for what, _ in self._undo]

    def __len__(self) -> int:
        return len(self._undo)

    def pre_hook(self, module: nn.Module, fn: Callable[..., Any], *, what: str = "", via_forward: bool = False) -> None:
        """``module.register_forward_pre_hook(fn, with_kwargs=True)``, undone by removing the hook. ``via_forward``:
        for a module whose class calls ``self.forward`` from its own ``__call__`` (no hooks run; vLLM's
        torch.compile-able modules), wrap its ``forward`` instead, with the same arguments and return rules."""
        what = what or f"pre-hook on {type(module).__name__}"
        if via_forward:
            def pre(forward: Callable[..., Any]) -> Callable[..., Any]:
                def run(*args: Any, **kwargs: Any) -> Any:
                    changed = fn(module, args, kwargs)  # None, or new (args, kwargs) as torch's hooks return
                    a, k = (args, kwargs) if changed is None else changed
                    return forward(*a, **k)

                return run

            return self.wrap_method(module, "forward", pre, what=what)
        handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        self._undo.append((what, handle.remove))

    def post_hook(self, module: nn.Module, fn: Callable[..., Any], *, what: str = "", always_call: bool = False,
                  via_forward: bool = False) -> None:
        """``module.register_forward_hook(fn, with_kwargs=True)``, undone by removing the hook.
        ``always_call``: also run when the forward raises (closing per-forward state); ``via_forward``: as for
        :meth:`pre_hook`."""
        what = what or f"hook on {type(module).__name__}"
        if via_forward:
            def post(forward: Callable[..., Any]) -> Callable[..., Any]:
                def run(*args: Any, **kwargs: Any) -> Any:
                    try:
                        out = forward(*args, **kwargs)
                    except BaseException:
                        if always_call:
                            fn(module, args, kwargs, None)
                        raise
                    changed = fn(module, args, kwargs, out)
                    return out if changed is None else changed

                return run

            return self.wrap_method(module, "forward", post, what=what)
        handle = module.register_forward_hook(fn, with_kwargs=True, always_call=always_call)
        self._undo.append((what, handle.remove))

    def set_attr(self, obj: object, name: str, value: object, *, what: str = "") -> None:
        """Set ``obj.name = value``; undo restores the previous instance attribute or deletes it."""
        old = obj.__dict__.get(name, _MISSING)
        # nn.Module.__setattr__ would register Modules/Parameters; bypass it so the swap stays a plain
        # attribute and the undo is exact. A class (a host's patch of a runner class) takes type.__setattr__.
        setter = type.__setattr__ if isinstance(obj, type) else object.__setattr__
        setter(obj, name, value)

        def restore() -> None:
            if old is _MISSING:
                delattr(obj, name) if isinstance(obj, type) else obj.__dict__.pop(name, None)
            else:
                setter(obj, name, old)

        self._undo.append((what or f"attribute {type(obj).__name__}.{name}", restore))

    def wrap_method(
        self, obj: object, name: str, wrapper: Callable[[Callable[..., Any]], Callable[..., Any]], *, what: str = ""
    ) -> None:
        """Replace the bound method ``obj.name`` by ``wrapper(original)`` on this instance only.

        The replacement carries the original's signature (``functools.wraps``): transformers' ``generate``
        inspects ``get_image_features``' parameters to decide which kwargs to pop.
        """
        original = getattr(obj, name)
        patched = functools.wraps(original)(wrapper(original))
        self.set_attr(obj, name, patched, what=what or f"method {type(obj).__name__}.{name}")

    def undo(self) -> None:
        """Undo every recorded change, newest first. Safe to call more than once."""
        while self._undo:
            _, restore = self._undo.pop()
            restore()
