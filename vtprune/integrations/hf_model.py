"""A generic lmms-eval model over any supported Hugging Face VLM whose processor renders its prompt (chat template,
or ``<image>`` placeholders); :class:`vtprune.integrations.lmms_eval.VTPruneHF` adds pruning to it."""

from __future__ import annotations

import json
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm


# ============================================================================ generic model
def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    out: list[Any] = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out.extend(_flatten(v) if isinstance(v, (list, tuple)) else [v])
    return out


def _resolve_dtype(dtype: Any) -> Any:
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. float32, bfloat16, float16, auto)")
    return value


class HFVisionLanguageModel(lmms):
    """A plain lmms-eval model for any HF VLM loadable with its ``AutoProcessor`` (pruning comes from
    :class:`VTPruneHF`). Images only; videos need the wrapped lmms-eval classes.

    Args:
        pretrained: a local directory (or hub id) with the model and its processor.
        device: "cpu", "cuda", "cuda:1"...; default: cuda if available. Ignored under ``accelerate
            launch`` (each process takes its own GPU) and with ``device_map``.
        device_map: e.g. "auto" to split a large model over the visible GPUs (single process).
        dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16".
        batch_size: prompts per ``generate`` call (left padded).
        attn_implementation: "sdpa" (default of transformers), "eager", "flash_attention_2".
        max_new_tokens: used when a task's ``generation_kwargs`` does not set it.
        use_chat_template: render prompts with the processor's chat template when it has one; else
            ``<image>\\n`` placeholders are prepended to the task's text.
        system_prompt: an optional system message (chat template only).
        max_batch_size: accepted because lmms-eval passes it to every model; unused.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        device_map: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int = 128,
        use_chat_template: bool = True,
        system_prompt: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        import transformers
        from accelerate import Accelerator

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            if device_map:
                raise ValueError("device_map (one model split over GPUs) and `accelerate launch` data "
                                 "parallelism are exclusive: use one process with device_map=auto")
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self.batch_size_per_gpu = 1 if str(batch_size) == "auto" else int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        self.use_chat_template = bool(use_chat_template)
        self.system_prompt = system_prompt
        self.pretrained = pretrained

        load: dict[str, Any] = {"dtype": _resolve_dtype(dtype), "trust_remote_code": trust_remote_code}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        if device_map:
            load["device_map"] = device_map
        config = transformers.AutoConfig.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        archs = [a for a in (getattr(config, "architectures", None) or []) if hasattr(transformers, a)]
        model_cls = getattr(transformers, archs[0]) if archs else transformers.AutoModelForImageTextToText
        self._model = model_cls.from_pretrained(pretrained, **load).eval()
        if not device_map:
            self._model.to(self._device)
        self.processor = transformers.AutoProcessor.from_pretrained(pretrained,
                                                                    trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # every row must end where its answer starts

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the embedding table's device (differs from ``device`` under a device_map)."""
        return self._model.get_input_embeddings().weight.device

    # ------------------------------------------------------------------ prompts
    def build_prompt(self, context: str, n_images: int) -> str:
        """The model's prompt for ``context`` with ``n_images`` images before it."""
        image_token = getattr(self.processor, "image_token", None)
        if image_token and image_token in context:
            n_images = 0  # the task placed its own placeholders
        template = (getattr(self.processor, "chat_template", None)
                    or getattr(self.tokenizer, "chat_template", None))
        if self.use_chat_template and template:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                system = [{"type": "text", "text": self.system_prompt}]
                messages.insert(0, {"role": "system", "content": system})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if n_images and not image_token:
            raise ValueError(f"{type(self).__name__}: the processor has neither a chat template nor an "
                             "image_token; cannot place the images in the prompt")
        return f"{image_token}\n" * n_images + context

    def encode(self, texts: list[str], images: list[list[Any]]) -> dict[str, Any]:
        """Processor outputs on the input device, floating tensors in the model's dtype. ``images``: each prompt's
        images, passed nested to the processor (SmolVLM's and Gemma's read a flat list as one prompt's)."""
        if len(images) != len(texts):
            raise ValueError(f"encode: {len(texts)} prompts but {len(images)} image lists (one per prompt)")
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images[0] if len(texts) == 1 else images
        batch = self.processor(**kwargs)
        dev, dtype = self.input_device, self._model.dtype
        out: dict[str, Any] = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(dev, dtype) if v.is_floating_point() else v.to(dev)
            out[k] = v
        return out

    @staticmethod
    def _images(visuals: Any, owner: str) -> list[Any]:
        flat = _flatten(visuals)
        if any(isinstance(v, (str, dict)) for v in flat):
            raise NotImplementedError(f"{owner}: video / audio inputs are not supported by the generic "
                                      "model; use vtprune_llava_hf or vtprune_qwen*_vl (lmms-eval's loaders)")
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in flat]

    # ------------------------------------------------------------------ requests
    def generate_until(self, requests: list[Instance]) -> list[str]:
        # Group by task and generation settings, docs in order: batches are deterministic and match a
        # direct evaluation that walks the same docs with the same batch size.
        groups: dict[tuple[str, str], list[int]] = {}
        for i, req in enumerate(requests):
            _, gen_kwargs, _, doc_id, task, _ = req.args
            groups.setdefault((task, json.dumps(gen_kwargs, sort_keys=True, default=str)), []).append(i)
        out: list[str] = [""] * len(requests)
        setting = getattr(getattr(self, "prune_config", None), "label", "")
        desc = f"{getattr(self, 'model_id', 'hf')} [{setting}]"
        bar = tqdm(total=len(requests), desc=desc, disable=self.rank != 0, leave=False)
        for idx in groups.values():
            idx.sort(key=lambda i: requests[i].args[3])
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                texts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    doc = self.task_dict[task][split][doc_id]
                    imgs = self._images(doc_to_visual(doc), type(self).__name__)
                    texts.append(self.build_prompt(context, len(imgs)))
                    images.append(imgs)
                gen_kwargs = dict(requests[chunk[0]].args[1])
                for i, text in zip(chunk, self._generate(texts, images, gen_kwargs), strict=True):
                    out[i] = text
                    context, kwargs = requests[i].args[:2]
                    self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                bar.update(len(chunk))
        bar.close()
        return out

    @torch.inference_mode()
    def _generate(self, texts: list[str], images: list[list[Any]], gen_kwargs: dict[str, Any]) -> list[str]:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        tok = self.tokenizer
        args: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            "do_sample": temperature > 0,  # lmms-eval tasks ask for greedy decoding with temperature 0
            "num_beams": int(gen_kwargs.get("num_beams", 1) or 1),
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        if args["do_sample"]:
            args["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                args["top_p"] = float(gen_kwargs["top_p"])
        inputs = self.encode(texts, images)
        seq = self._model.generate(**inputs, **args)
        decoded = tok.batch_decode(seq[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        result = []
        for text in decoded:
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            result.append(text.strip())
        return result

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        res = []
        for req in tqdm(requests, desc="loglikelihood", disable=self.rank != 0, leave=False):
            context, continuation, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            cont = continuation if isinstance(continuation, str) else continuation(doc)
            images = self._images(doc_to_visual(doc), type(self).__name__)
            prompt = self.build_prompt(context, len(images))
            n_prompt = self.encode([prompt], [images])["input_ids"].shape[1]
            inputs = self.encode([prompt + cont], [images])
            ids = inputs["input_ids"][0]
            n_cont = ids.shape[0] - n_prompt
            if n_cont <= 0:
                res.append((0.0, True))
                continue
            # Pruned models return logits for kept positions only; the continuation is text at the end
            # of the sequence, which is never dropped, so counting from the end stays exact.
            logits = self._model(**inputs).logits[0, -n_cont - 1:-1].float()
            target = ids[-n_cont:].to(logits.device)
            logp = torch.log_softmax(logits, dim=-1)
            greedy = bool((logp.argmax(-1) == target).all())
            res.append((float(logp.gather(-1, target[:, None]).sum()), greedy))
        return res

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(f"{type(self).__name__} does not support multi-round generation")
