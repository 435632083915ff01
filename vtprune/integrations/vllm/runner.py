"""What vLLM 0.32's model runners lack for image pruning, patched while the plugin is configured.

The runner moves the positions a pruning model returns into the prompt (``recompute_mrope_positions``) only when
``is_multimodal_pruning_enabled`` is set, and sets it only for EVS video pruning on GPU (``video_pruning_rate``;
the CPU runner never does). :func:`enable_pruning_path` is called when a pruned model with original positions is
built (in its worker, so only when the plugin is configured): from then on, a runner whose model carries a vtprune
host gathers its multimodal embeddings with the flag on. Through a :class:`~vtprune.patching.Patcher`, undone by
:func:`disable_pruning_path`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vtprune.patching import Patcher

_PATCHER: Patcher | None = None


def enable_pruning_path() -> None:
    global _PATCHER
    if _PATCHER is not None:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner inherits the method

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def gather_mm_embeddings(self: Any, *args: Any, **kwargs: Any) -> Any:
            host = getattr(self.get_model(), "vtprune", None)
            if host is not None and host.plan.original_positions:
                self.is_multimodal_pruning_enabled = True
            return original(self, *args, **kwargs)

        return gather_mm_embeddings

    patcher = Patcher()
    patcher.wrap_method(GPUModelRunner, "_gather_mm_embeddings", wrap,
                        what="vtprune: move pruned positions into the prompt")
    _PATCHER = patcher


def disable_pruning_path() -> None:
    global _PATCHER
    if _PATCHER is not None:
        _PATCHER.undo()
        _PATCHER = None
