"""The ``lmms_eval.models`` entry point: registers vtprune's model classes with lmms-eval.

``pyproject.toml``::

    [project.entry-points."lmms_eval.models"]
    vtprune = "vtprune.integrations.manifest:manifests"

lmms-eval calls :func:`manifests` when it builds its model registry; the classes themselves are imported
only when a run asks for one (the wrapped lmms-eval classes import decord / qwen-vl-utils at module top).
"""

from __future__ import annotations

from typing import Any

#: model id -> (simple class name, chat class name) in :mod:`vtprune.integrations.lmms_eval`.
#: The chat variants mirror lmms-eval's own registrations (lmms-eval prefers chat unless ``--force_simple``).
MODELS: dict[str, tuple[str | None, str | None]] = {
    "vtprune": ("VTPruneHF", None),
    "vtprune_llava_hf": ("VTPruneLlavaHf", "VTPruneLlavaHfChat"),
    "vtprune_qwen2_vl": ("VTPruneQwen2VL", None),
    "vtprune_qwen2_5_vl": ("VTPruneQwen2_5VL", "VTPruneQwen2_5VLChat"),
    "vtprune_qwen3_vl": ("VTPruneQwen3VL", "VTPruneQwen3VLChat"),
    "vtprune_internvl_hf": (None, "VTPruneInternVLHf"),
    "vtprune_mistral3_vl": ("VTPruneMistral3VL", None),
    "vtprune_glm4v": ("VTPruneGlm4v", None),
    "vtprune_gemma4": ("VTPruneGemma4", None),
}

_MODULE = "vtprune.integrations.lmms_eval"


def manifests() -> list[Any]:
    """One ``lmms_eval.models.registry_v2.ModelManifest`` per model id in :data:`MODELS`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=model_id,
            simple_class_path=f"{_MODULE}.{simple}" if simple else None,
            chat_class_path=f"{_MODULE}.{chat}" if chat else None,
        )
        for model_id, (simple, chat) in MODELS.items()
    ]
