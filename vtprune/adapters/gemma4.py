"""Gemma-4 (``Gemma4ForConditionalGeneration``): a ViT over a variable number of patches per image (padded to a
common ``max_patches``, each real patch placed by its (x, y) in ``image_position_ids``) -> average pooling of each
k x k block of patches into one soft token -> ``embed_vision`` (scale-free RMSNorm + projection) -> Gemma-4 text
model with sliding-window and global layers, Per-Layer Embeddings and, in some checkpoints, KV sharing.

What the adapter does about each peculiarity:

* Variable token count per image: an image of Hp x Wp patches becomes a raster (Hp / k) x (Wp / k) grid of tokens
  (the tower strips padding before the projector). The grid is read from ``image_position_ids``; LLM token j of an
  image pools the patches whose ``x // k + (Wp / k) * (y // k)`` is j -- the pooler's own rule. ViT signals are
  per patch row of the padded (n_images, max_patches) batch and reach the tokens through that rule
  (``rows_to_tokens``); padding rows are never keys.
* Projector ``embed_vision`` runs on the pooled tokens, so a token's projector input is its own pooled row.
* Masks: the VLM hands its LLM a dict built from the caller's 2-D mask and ``mm_token_type_ids``; with
  ``use_bidirectional_attention == "vision"`` each image (or video frame) run attends to itself both ways in the
  SLIDING layers only (global layers stay causal). A cut sequence gets that dict rebuilt by Gemma-4's own
  functions from the kept token types, before the LLM and behind an in-LLM step; decode masks over each layer's
  own cache, as for Gemma-3 (the sliding window then counts kept tokens, what the sliding cache holds).
* Per-Layer Embeddings: the VLM computes ``per_layer_inputs`` (B, L, layers, d) from the token ids and passes it to
  the LLM, which hands slice ``[:, :, i]`` to decoder layer i as its SECOND POSITIONAL argument. It is gathered with
  the embeddings at the LLM input, and behind an in-LLM step each layer's slice is gathered with the layer's map.
* KV sharing (``num_kv_shared_layers``): the last layers ("reuse") attend over the K/V a "store" layer kept for
  them. The kept sequence must be the same for a store layer and its readers, so an in-LLM step is allowed only
  at or before the first store layer (refused beyond, naming the layers); reuse layers have no ``k_proj`` and no
  attention map of their own. transformers 5.25 slices the reuse layers' inputs to the last token in a
  ``generate`` prefill; behind an in-LLM step that slicing is switched off (the reuse layers then run every kept
  token, with the same last-token output).
* Positions are plain 1-D and kept ORIGINAL; a decode step given no positions is numbered by the VLM from the
  cache length, which pruning shortened (``derives_decode_positions``: the engine adds the dropped count back).
* Video (transformers >= 5.25: 5.19's forward does not pass ``num_frames_per_video``): every sampled frame is its
  own ``<mm:ss> BOI VIDEO* EOI`` run, a span and its own bidirectional block.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from transformers import masking_utils

from vtprune.adapters.base import Adapter, ImageLayout, LayerCut, VisionRecord
from vtprune.adapters.gemma3 import Gemma3Adapter
from vtprune.engine.sequence import take
from vtprune.registry import ADAPTERS
from vtprune.signals import Projector
from vtprune.video.inputs import VideoFormat


def _modeling() -> Any:
    from transformers.models.gemma4 import modeling_gemma4

    return modeling_gemma4


def _pool_members(pos: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The patch rows each soft token of one image pools, by the pooler's rule (``Gemma4VisionPooler``).

    pos: (max_patches, 2) long (x, y) of each row, (-1, -1) on padding. Returns (members (n, k*k) long: row of
    each patch of token j, raster inside its k x k block; grid height gh; grid width gw), n = gh * gw."""
    real = (pos != -1).all(-1)  # (P,)
    rows = real.nonzero()[:, 0]
    x, y = pos[rows, 0], pos[rows, 1]
    wp, hp = int(x.max()) + 1, int(y.max()) + 1
    if wp % k or hp % k or rows.numel() != wp * hp:
        raise ValueError(f"gemma4: {rows.numel()} image patches spanning {wp} x {hp} (x, y) do not tile a grid of "
                         f"{k} x {k} blocks")
    gw, gh = wp // k, hp // k
    token = x // k + gw * (y // k)  # the pooler's kernel index
    slot = (y % k) * k + x % k
    members = torch.full((gh * gw, k * k), -1, dtype=torch.long, device=pos.device)
    members[token, slot] = rows
    return members, gh, gw


def video_forward_supported() -> bool:
    """Whether this transformers' Gemma-4 forward can encode videos: 5.19's does not pass the required
    ``num_frames_per_video`` on to ``get_video_features`` (every video forward raises there)."""
    try:
        src = inspect.getsource(_modeling().Gemma4Model.forward)
    except (OSError, TypeError):  # no sources shipped: tell by the version (5.19 does not pass it, 5.25 does)
        import transformers
        from packaging.version import Version

        return Version(transformers.__version__) >= Version("5.25")
    return "num_frames_per_video=num_frames_per_video" in src


def patch_rows(frames: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, 3, H, W) -> (rows (F, Hp*Wp, p*p*3) in raster order, each patch (y, x, channel) flattened; positions
    (Hp*Wp, 2) of (x, y)): the Gemma-4 processors' ``convert_video_to_patches`` and patch grid."""
    F, C, H, W = frames.shape
    hp, wp = H // patch, W // patch
    rows = frames.reshape(F, C, hp, patch, wp, patch).permute(0, 2, 4, 3, 5, 1).reshape(F, hp * wp, -1)
    xs, ys = torch.meshgrid(torch.arange(wp), torch.arange(hp), indexing="xy")
    return rows, torch.stack([xs, ys], -1).reshape(-1, 2)


def aspect_preserving_hw(height: int, width: int, patch: int, max_patches: int, k: int) -> tuple[int, int]:
    """Gemma-4's resize (``get_aspect_ratio_preserving_size``): the largest (H, W) with the aspect kept, sides
    multiples of k * patch, at most ``max_patches`` patches."""
    target = max_patches * patch**2
    factor = math.sqrt(target / (height * width))
    side = k * patch
    h, w = math.floor(factor * height / side) * side, math.floor(factor * width / side) * side
    longest = (max_patches // k**2) * side
    if h == 0 and w == 0:
        raise ValueError(f"gemma4: a {height}x{width} frame resizes to 0 x 0")
    if h == 0:
        h, w = side, min(math.floor(width / height) * side, longest)
    elif w == 0:
        h, w = min(math.floor(height / width) * side, longest), side
    return h, w


class Gemma4Video(VideoFormat):
    """Gemma-4's video processor: each frame resized with the aspect kept to at most ``max_soft_tokens * k^2``
    patches (sides multiples of k * patch), rescaled to [0, 1] (no normalisation: the model maps it to [-1, 1]),
    patchified and padded to that budget with (-1, -1) positions; the placeholder becomes, per sampled frame,
    ``"mm:ss " + BOI + VIDEO * n + EOI``, frames joined by spaces (``replace_video_token``)."""

    video_token, image_token = "<|video|>", "<|image|>"
    vision_start, vision_end = "<|image>", "<image|>"  # boi / eoi (a real tokenizer's boi_token / eoi_token win)

    def defaults(self) -> dict[str, Any]:
        return {"size": {"max_patches": 70 * 3 * 3}, "mean": (0.0,) * 3, "std": (1.0,) * 3, "patch_size": 16,
                "merge_size": 3}

    def tiny(self, config: Any, side: int | None, frames: int) -> dict[str, Any]:
        vc = config.vision_config
        return {"size": {"max_patches": Gemma4Adapter.MAX_PATCHES}, "patch_size": vc.patch_size,
                "merge_size": vc.pooling_kernel_size}

    def builder_kwargs(self, config: Any) -> dict[str, Any]:
        return {}

    def target_hw(self, pre: Any, height: int, width: int, num_frames: int) -> tuple[int, int]:
        return aspect_preserving_hw(height, width, pre.patch_size, pre.size["max_patches"], pre.merge_size)

    def pack(self, pre: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        rows, pos = patch_rows(x, pre.patch_size)  # (F, n, 3p^2), (n, 2)
        F, n, T = rows.shape[0], rows.shape[1], pre.size["max_patches"]
        pixels = torch.zeros(F, T, rows.shape[-1])
        pixels[:, :n] = rows
        positions = torch.full((F, T, 2), -1, dtype=torch.long)
        positions[:, :n] = pos
        return {"pixel_values_videos": pixels, "video_position_ids": positions,
                "num_frames_per_video": torch.tensor([F]), "tokens_per_frame": torch.tensor(n // pre.merge_size**2)}

    def placeholder(self, b: Any, pixels: dict[str, torch.Tensor], timestamps: Sequence[float]) -> str:
        n = int(pixels["tokens_per_frame"])
        boi = getattr(b.tokenizer, "boi_token", None) or b.vision_start
        eoi = getattr(b.tokenizer, "eoi_token", None) or b.vision_end
        frames = int(pixels["num_frames_per_video"][0])
        stamps = [f"{int(t // 60):02d}:{int(t % 60):02d}" for t in list(timestamps)[:frames]]
        return " ".join(f"{t} {boi}{b.video_token * n}{eoi}" for t in stamps)

    def expand(self, b: Any, prompt: str, body: str) -> str:
        wrapped = f"{b.vision_start}{b.video_token}{b.vision_end}"  # a template that wraps it: the body has its own
        return prompt.replace(wrapped, body, 1) if wrapped in prompt else prompt.replace(b.video_token, body, 1)

    def extra_inputs(self, b: Any, ids: torch.Tensor, pixels: dict[str, torch.Tensor],
                     video: Any) -> dict[str, torch.Tensor]:
        return {"video_position_ids": pixels["video_position_ids"],
                "num_frames_per_video": pixels["num_frames_per_video"],
                "mm_token_type_ids": 2 * (ids == b.video_token_id).long()}


@ADAPTERS.register("gemma4")
class Gemma4Adapter(Gemma3Adapter):
    family = "gemma4"
    model_classes = ("Gemma4ForConditionalGeneration", "Gemma4Model")
    modalities = {"image": ("get_image_features", "image_token_id"),
                  "video": ("get_video_features", "video_token_id")}
    video = Gemma4Video() if video_forward_supported() else None  # None: no video rows / video-qa on 5.19
    derives_decode_positions = True  # given none, the VLM numbers a decode step from the (pruned) cache length
    token_types_key = "mm_token_type_ids"  # 1 image, 2 video, 3 audio

    @property
    def projector(self) -> nn.Module:
        return self.vlm.embed_vision

    def _text_config(self) -> Any:
        return self.config.get_text_config()

    # ------------------------------------------------------------------ decoder structure
    def layer_type(self, l: int) -> str:
        return self._text_config().layer_types[l]

    def _kv_roles(self) -> tuple[list[int], list[int]]:
        """(store layers, reuse layers) of KV sharing (both empty without it: a model may flag store layers
        that no layer reads)."""
        attn = [layer.self_attn for layer in self.decoder_layers]
        reuse = [l for l, a in enumerate(attn) if getattr(a, "is_kv_shared_layer", False)]
        store = [l for l, a in enumerate(attn) if getattr(a, "store_full_length_kv", False)]
        return (store if reuse else []), reuse

    def attention_layers(self) -> frozenset[int]:
        """Reuse layers of KV sharing compute no keys of their own (no ``k_proj``): no scoring there."""
        return frozenset(range(self.num_layers)) - frozenset(self._kv_roles()[1])

    def check(self, methods: list, positions: str) -> None:
        super().check(methods, positions)
        store, reuse = self._kv_roles()
        if not store:
            return
        for m in methods:
            bad = [K for K in m.layers if K > min(store)]
            if bad:
                raise ValueError(
                    f"method {m.name!r}: layer={bad[0]} is not supported on this gemma4 model: its layers {reuse} "
                    f"reuse the keys / values of layers {store} (KV sharing), which must see the same kept tokens as "
                    f"their readers; prune at layer <= {min(store)} (the first layer storing shared keys / values)")

    # ------------------------------------------------------------------ layout
    def _positions(self, modality: str, args: tuple, kwargs: dict) -> torch.Tensor:
        name = "image_position_ids" if modality == "image" else "video_position_ids"
        pos = kwargs.get(name, args[1] if len(args) > 1 else None)
        if pos is None:
            raise ValueError(f"gemma4: the {modality} feature call got no {name}; vtprune needs the patch positions")
        return pos

    def image_layouts(self, modality: str, args: tuple, kwargs: dict, output: Any, record: VisionRecord) -> None:
        pos = self._positions(modality, args, kwargs)  # (n_frames, max_patches, 2)
        k = self.config.vision_config.pooling_kernel_size
        members, grids = [], []
        for p in pos:  # one image or video frame at a time: its own grid
            mem, gh, gw = _pool_members(p, k)
            members.append(mem)
            grids.append((gh, gw))
        record.n_vit = pos.shape[0] * pos.shape[1]
        record.tokens_per_tile = record.features_per_tile = pos.shape[1]
        record.meta["members"] = members  # per frame (n_f, k*k): rows of its pooled patches
        feats = output.pooler_output  # per image (images) or per video (all its frames)
        per_item = [1] * pos.shape[0] if modality == "image" else self._frames_per_video(args, kwargs)
        if len(feats) != len(per_item):
            raise ValueError(f"gemma4: {len(feats)} {modality} feature blocks for {len(per_item)} {modality}s")
        offset = frame = 0
        for item, n_frames in enumerate(per_item):
            parts = []
            for f in range(n_frames):
                gh, gw = grids[frame + f]
                lay = ImageLayout.raster(offset + torch.arange(gh * gw), gh, gw, group=f)  # src counts LLM tokens
                lay.frame.fill_(f)
                parts.append(lay)
                offset += gh * gw
            frame += n_frames
            lay = ImageLayout(*(torch.cat(x) for x in zip(*((p.src, p.grid, p.line, p.frame) for p in parts))))
            if lay.num_tokens != feats[item].shape[0]:
                raise ValueError(f"gemma4: {modality} {item} has {feats[item].shape[0]} features but its patch "
                                 f"positions make {lay.num_tokens} tokens")
            record.images.append(lay)

    @staticmethod
    def _frames_per_video(args: tuple, kwargs: dict) -> list[int]:
        n = kwargs.get("num_frames_per_video", args[2] if len(args) > 2 else None)
        if n is None:
            raise ValueError("gemma4: get_video_features got no num_frames_per_video")
        return [int(f) for f in n]

    def default_layouts(self, modality: str, n_visual: int) -> VisionRecord | None:
        return None  # the split into images (each its own grid) is only known from the feature call

    # ------------------------------------------------------------------ vision-tower signals
    def vit_heads(self, vit_layer: int | None) -> tuple[int, int]:
        attn = self.vit_attention(vit_layer)  # keys: one head per key-value head
        return self.config.vision_config.num_key_value_heads, attn.head_dim

    def vit_attention_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        return {"x": x.detach(), "position_embeddings": kwargs.get("position_embeddings"),
                "position_ids": kwargs.get("position_ids")}

    def _vit_qk(self, attn: nn.Module, cap: dict[str, Any], key: bool) -> torch.Tensor:
        """(n, H, T, d) post-RoPE queries (or keys) of a Gemma-4 ViT attention layer, as its forward makes them."""
        x, (cos, sin), pos = cap["x"], cap["position_embeddings"], cap["position_ids"]
        proj, norm = (attn.k_proj, attn.k_norm) if key else (attn.q_proj, attn.q_norm)
        y = norm(proj(x).view(*x.shape[:2], -1, attn.head_dim))  # (n, T, H, d)
        return _modeling().apply_multidimensional_rope(y, cos, sin, pos).transpose(1, 2)

    def received_attention(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        real = (cap["position_ids"] != -1).all(-1)  # (n, T): padding rows are neither keys nor queries
        out = []
        for i in range(real.shape[0]):  # one image at a time bounds memory at H x T x T
            one = {key: v[i : i + 1] if torch.is_tensor(v) else tuple(t[i : i + 1] for t in v)
                   for key, v in cap.items()}
            q, k = self._vit_qk(attn, one, False).float(), self._vit_qk(attn, one, True).float()
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # GQA
            scores = (q @ k.transpose(-1, -2)) * attn.scaling  # (1, H, T, T)
            probs = scores.masked_fill(~real[i, None, None, None, :], float("-inf")).softmax(-1)
            out.append((probs * real[i, None, None, :, None]).sum(2).mean(1) / real[i].sum())  # (1, T)
        return torch.cat(out).reshape(-1)  # (n * T,)

    def vit_keys(self, attn: nn.Module, cap: dict[str, Any], record: VisionRecord) -> torch.Tensor:
        k = self._vit_qk(attn, cap, True)  # (n, Hkv, T, d)
        return k.transpose(1, 2).reshape(-1, k.shape[1] * k.shape[3])  # (n * T, Hkv * d)

    def rows_to_tokens(self, record: VisionRecord, rows: torch.Tensor, kind: str) -> list[torch.Tensor]:
        T = record.tokens_per_tile
        tokens = []
        for f, mem in enumerate(record.meta["members"]):  # per frame: (n_f, k*k, C), each token's patches
            blocks = rows[(f * T + mem).to(rows.device)]
            tokens.append(blocks.sum(1) if kind == "score" else blocks.flatten(1))
        tokens = torch.cat(tokens)
        return list(tokens.split([im.num_tokens for im in record.produced]))

    def vit_feature_rows(self, record: VisionRecord, src: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        feats = record.stash["features"]  # (sum n_i, Dv): the pooled tokens, the projector's input
        return feats[local.to(feats.device)]

    def projector_fn(self) -> Projector:
        return Projector(self.projector)

    # ------------------------------------------------------------------ the language model's inputs
    def _masks(self, embeds: torch.Tensor, mask2d: torch.Tensor, cache: Any, positions: Any,
               types: torch.Tensor | None) -> dict:
        """Gemma-4's mask dict for a cut sequence, as its VLM builds it: image / video runs bidirectional in the
        sliding layers when the config asks for it and token types were given, causal otherwise."""
        config = self._text_config()
        if types is None or config.use_bidirectional_attention != "vision":
            return masking_utils.create_masks_for_generate(config, embeds, mask2d, cache, positions)
        m = _modeling()
        blocks = m.get_block_sequence_ids_for_mask(types, embeds.device)
        return m.create_masks_for_vision_model(config, embeds, mask2d, cache, positions, blocks)

    def cut_llm_input(self, embeds: torch.Tensor, kwargs: dict, index: torch.Tensor, valid: torch.Tensor,
                      mask0: torch.Tensor, vlm_kwargs: dict) -> dict[str, Any]:
        new = super().cut_llm_input(embeds, kwargs, index, valid, mask0, vlm_kwargs)
        new.update(self.extra_lm_inputs(kwargs, index, valid))
        return new

    def extra_lm_inputs(self, kwargs: dict, index: torch.Tensor, valid: torch.Tensor) -> dict[str, Any]:
        ple = kwargs.get("per_layer_inputs")  # (B, L, layers, d): the token-identity part of PLE
        if ple is None:
            return {}
        return {"per_layer_inputs": _take_ple(ple, index, valid)}

    def cut_layer_mask(self, l: int, mask: Any, cut: LayerCut) -> Any:
        if cut.decode:  # a reuse layer attends over its store layer's cache
            l = self._kv_source(l)
        return super().cut_layer_mask(l, mask, cut)

    def _kv_source(self, l: int) -> int:
        """The layer whose cache layer ``l`` attends over (itself, or the store layer of its kind)."""
        store, reuse = self._kv_roles()
        if l not in reuse:
            return l
        return next(s for s in store if self.layer_type(s) == self.layer_type(l))

    def install_extra(self, engine: Any, patcher: Any) -> None:
        if not engine.layer_steps:
            return
        for l in range(min(engine.layer_steps), self.num_layers):  # after the engine's own layer pre-hooks
            patcher.pre_hook(self.decoder_layers[l], self._ple_hook(engine),
                             what=f"vtprune: per-layer inputs of decoder layer {l}")
        lm = self.language_model
        if hasattr(lm, "_maybe_slice_kv_shared_inputs"):  # transformers >= 5.25

            def wrap(original: Any) -> Any:
                def keep_all(hidden_states: Any, per_layer_inputs: Any, position_embeddings: Any,
                             causal_mask_mapping: Any, logits_to_keep: Any, cache: Any = None, **kw: Any) -> Any:
                    if engine.current_layer_map() is not None:  # the cut per-layer kwargs span every kept token
                        return hidden_states, per_layer_inputs, position_embeddings, causal_mask_mapping
                    return original(hidden_states, per_layer_inputs, position_embeddings, causal_mask_mapping,
                                    logits_to_keep, cache=cache, **kw)

                return keep_all

            patcher.wrap_method(lm, "_maybe_slice_kv_shared_inputs", wrap,
                                what="vtprune: reuse layers run every kept token behind an in-LLM step")

    @staticmethod
    def _ple_hook(engine: Any) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            m = engine.current_layer_map()  # prefill behind an in-LLM step: the layer's kept slots (None otherwise)
            if m is None or len(args) < 2 or args[1] is None:
                return None
            ple = args[1]  # (B, L0, d): the LLM input's per-layer input of this layer
            if ple.shape[1] != engine.call.fwd.base_mask.shape[1]:
                raise RuntimeError(f"gemma4: decoder layer got per-layer inputs of length {ple.shape[1]}, expected "
                                   f"the LLM input's {engine.call.fwd.base_mask.shape[1]}")
            return (args[0], _take_ple(ple, m.index.clamp(min=0), m.valid), *args[2:]), kwargs

        return hook

    # ------------------------------------------------------------------ tiny test model
    @classmethod
    def tiny_config(cls, text_layers: int) -> tuple[Any, type]:
        """5 px patches pooled 2 x 2; an image's grid follows its size (``tiny_image``). Sliding layers with
        bidirectional image blocks, every third layer and the last global; Per-Layer Embeddings on; no KV sharing
        (tests of it build a config with it)."""
        import transformers as T

        from vtprune.testing.tiny import BOS, EOS, IMAGE, PAD, VEND, VIDEO, VOCAB, VSTART

        types = [("full_attention" if i % 3 == 2 or i == text_layers - 1 else "sliding_attention")
                 for i in range(text_layers)]
        text = T.Gemma4TextConfig(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, global_head_dim=16, sliding_window=512,
                                  layer_types=types, use_bidirectional_attention="vision",
                                  hidden_size_per_layer_input=8, num_kv_shared_layers=0, max_position_embeddings=8192,
                                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
        vision = T.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, patch_size=5, pooling_kernel_size=2,
                                      position_embedding_size=64)
        cfg = T.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE,
                             video_token_id=VIDEO, boi_token_id=VSTART, eoi_token_id=VEND, audio_token_id=505,
                             boa_token_id=506, eoa_token_index=507)
        return cfg, T.Gemma4ForConditionalGeneration

    @classmethod
    def tiny_init(cls, model: nn.Module, generator: torch.Generator) -> None:
        table = model.model.vision_tower.patch_embedder.position_embedding_table  # all ones from the model's init
        with torch.no_grad():  # as small as the patch projection's output: frames differ by content, not position
            table.normal_(std=model.config.vision_config.initializer_range, generator=generator)

    MAX_PATCHES = 96  # the tiny processor's patch budget (a multiple of k^2): images are padded to it

    def tiny_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(Hp, Wp) patches of a tiny image of ``image_size`` (H, W) px: sides floored to whole k x k blocks."""
        vc = self.config.vision_config
        k, p = vc.pooling_kernel_size, vc.patch_size
        return tuple(max(1, s // (k * p)) * k for s in image_size)  # type: ignore[return-value]

    def _tiny_pixels(self, image_size: tuple[int, int], seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One frame: pixels (1, max_patches, 3 p^2) in [0, 1], raster (x, y) positions padded with -1, tokens."""
        hp, wp = self.tiny_grid(image_size)
        vc, T = self.config.vision_config, self.MAX_PATCHES
        if hp * wp > T:
            raise ValueError(f"tiny gemma4: an image of {image_size} px makes {hp * wp} patches > {T}")
        g = torch.Generator().manual_seed(seed)
        px = torch.zeros(1, T, 3 * vc.patch_size**2)
        px[0, : hp * wp] = torch.rand(hp * wp, px.shape[-1], generator=g)
        ys, xs = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
        pos = torch.full((1, T, 2), -1, dtype=torch.long)
        pos[0, : hp * wp] = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
        return px.to(self.model.dtype), pos, hp * wp // vc.pooling_kernel_size**2

    def tiny_image(self, image_size: tuple[int, int], seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        from vtprune.testing.tiny import IMAGE, VEND, VSTART

        px, pos, n = self._tiny_pixels(image_size, seed)
        return [VSTART] + [IMAGE] * n + [VEND], {"pixel_values": px, "image_position_ids": pos}

    def tiny_video(self, frames: int, image_size: tuple[int, int],
                   seed: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        """Every frame its own ``<t> BOI VIDEO* EOI`` run (the processor's ``"mm:ss "`` is one text token here)."""
        from vtprune.testing.tiny import TIMESTAMP, VEND, VIDEO, VSTART

        if self.video is None:
            raise NotImplementedError("gemma4 video needs transformers >= 5.25: this version's Gemma4Model.forward "
                                      "does not pass num_frames_per_video to get_video_features")
        parts = [self._tiny_pixels(image_size, seed + f) for f in range(frames)]
        ids = [t for _, _, n in parts for t in [TIMESTAMP, VSTART, *[VIDEO] * n, VEND]]
        return ids, {"pixel_values_videos": torch.cat([p for p, _, _ in parts]),
                     "video_position_ids": torch.cat([q for _, q, _ in parts]),
                     "num_frames_per_video": torch.tensor([frames])}

    def tiny_batch(self, input_ids: torch.Tensor, images: list[dict[str, torch.Tensor]],
                   videos: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        from vtprune.testing.tiny import IMAGE, VIDEO

        types = (input_ids == IMAGE).long() + 2 * (input_ids == VIDEO).long()
        return {"mm_token_type_ids": types, **Adapter.tiny_batch(self, input_ids, images, videos)}


def _take_ple(ple: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-layer inputs (B, L, ...) of the kept slots ``index`` (B, L'), zero on padding slots (``valid`` False)."""
    out = take(ple, index.to(ple.device))  # (B, L', ...)
    return out * valid.to(ple.device).reshape(*valid.shape, *[1] * (ple.dim() - 2)).to(out.dtype)
