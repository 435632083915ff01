"""vtprune as a vLLM plugin: the same pre-LLM pruning, in the engine people serve VLMs with.

    vllm serve llava-hf/llava-1.5-7b-hf --additional-config '{"vtprune": {"method": "kcenter", "keep": 64}}'
    LLM(model, additional_config={"vtprune": {"method": "kcenter", "keep": 64}})

:func:`register` is the ``vllm.general_plugins`` entry point (vLLM calls it in every process). It registers
vtprune's model classes for the architectures it covers (by name: nothing of vLLM is imported here) and a
config hook that, at engine start, validates the ``vtprune`` entry of ``additional_config`` and stores it on the
model config. Without that entry every class behaves exactly as vLLM's own. See docs/vllm.md.

Rooms: :mod:`.config` (the entry -> steps, kept counts, the engine-start hook), :mod:`.families` (vtprune's adapters
over vLLM's modules), :mod:`.host` (the selection on one encoder call), :mod:`.positions` (original positions
through vLLM's multimodal-pruning path), :mod:`.models` (the shared processor and host glue) with
:mod:`.models_llava`, :mod:`.models_qwen`, :mod:`.models_internvl` (the model classes), :mod:`.runner` (the one
runner patch).
"""

from __future__ import annotations

from typing import Any

#: architecture -> the vtprune class vLLM builds for it
MODELS: dict[str, str] = {
    "LlavaForConditionalGeneration": "vtprune.integrations.vllm.models_llava:PrunedLlava",
    "LlavaNextForConditionalGeneration": "vtprune.integrations.vllm.models_llava:PrunedLlavaNext",
    "LlavaOnevisionForConditionalGeneration": "vtprune.integrations.vllm.models_llava:PrunedLlavaOnevision",
    "Qwen2_5_VLForConditionalGeneration": "vtprune.integrations.vllm.models_qwen:PrunedQwen2_5_VL",
    "Qwen2VLForConditionalGeneration": "vtprune.integrations.vllm.models_qwen:PrunedQwen2VL",
    "Qwen3VLForConditionalGeneration": "vtprune.integrations.vllm.models_qwen:PrunedQwen3VL",
    "InternVLForConditionalGeneration": "vtprune.integrations.vllm.models_internvl:PrunedInternVL",
}


class _ConfigHook:
    """vLLM's per-architecture ``verify_and_update_config`` hook (``MODELS_CONFIG_MAP``), chaining to any hook
    vLLM already had for the architecture."""

    previous: Any = None

    @classmethod
    def verify_and_update_config(cls, vllm_config: Any) -> None:
        if cls.previous is not None:
            cls.previous.verify_and_update_config(vllm_config)
        from vtprune.integrations.vllm.config import configure

        configure(vllm_config)

    @classmethod
    def verify_and_update_model_config(cls, model_config: Any) -> None:
        if cls.previous is not None and hasattr(cls.previous, "verify_and_update_model_config"):
            cls.previous.verify_and_update_model_config(model_config)


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent). Every architecture vLLM knows gets the config hook:
    the covered ones to be configured, the others to refuse a ``vtprune`` entry instead of running unpruned."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)
    for arch in set(ModelRegistry.get_supported_archs()) | set(MODELS):
        if not (isinstance(MODELS_CONFIG_MAP.get(arch), type) and issubclass(MODELS_CONFIG_MAP[arch], _ConfigHook)):
            hook = type(f"VtpruneConfig_{arch}", (_ConfigHook,), {"previous": MODELS_CONFIG_MAP.get(arch)})
            MODELS_CONFIG_MAP[arch] = hook
