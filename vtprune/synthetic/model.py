"""The LLaVA-1.5-architecture model trained on the synthetic task, built from configs (no download).

CLIP ViT with a [CLS] token at 336 px / patch 14 (576 patches), features from ``vision_feature_layer=-2`` with the
CLS dropped ("default" strategy), LLaVA's 2-layer GELU MLP projector, a Llama decoder. Only widths and depths are
small; every structural choice a pruning method or adapter relies on is LLaVA-1.5's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, PreTrainedTokenizerFast,
)

from vtprune.synthetic import scenes


@dataclass(frozen=True)
class ModelSpec:
    """Widths and depths. The ViT runs ``vit_layers`` layers; LLaVA reads layer -2, so the last one only costs time
    (kept for fidelity: [CLS]-attention methods read the layer that produces the features)."""

    vit_hidden: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    llm_hidden: int = 192
    llm_layers: int = 4
    llm_heads: int = 6
    llm_kv_heads: int = 6  # full multi-head attention, as LLaVA-1.5's Llama-2
    llm_intermediate: int = 512

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def build_config(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """LlavaConfig for ``spec`` with token ids taken from ``tokenizer``."""
    vision = CLIPVisionConfig(
        hidden_size=spec.vit_hidden, intermediate_size=4 * spec.vit_hidden, num_hidden_layers=spec.vit_layers,
        num_attention_heads=spec.vit_heads, image_size=scenes.IMAGE_SIZE, patch_size=scenes.PATCH,
        projection_dim=spec.vit_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.llm_hidden, intermediate_size=spec.llm_intermediate,
        num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
        num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=1024, rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=scenes.GRID**2, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(spec: ModelSpec, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0,
                attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """A freshly initialised model (seeded), in train mode, with generation ids set for greedy one-word answers."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(build_config(spec, tokenizer), attn_implementation=attn)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    gc.do_sample, gc.max_new_tokens = False, 2
    return model


def canonical_llava_layout(path: str | Path) -> None:
    """Rewrite a saved LLaVA's safetensors in the canonical llava-hf key layout (``vision_tower.vision_model.*``),
    which both transformers and vLLM load; transformers 5.x's ``save_pretrained`` writes ``vision_tower.*``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
                   for k, v in tensors.items()}
        if renamed.keys() != tensors.keys():
            save_file(renamed, str(file), metadata={**meta, "format": "pt"})
    index = Path(path) / "model.safetensors.index.json"
    if index.exists():
        import json

        data = json.loads(index.read_text())
        data["weight_map"] = {("vision_tower.vision_model." + k[len("vision_tower."):]
                               if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
                               else k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
