"""The plugin's configuration: ``additional_config={"vtprune": {...}}`` -> validated steps, and the kept count
of an image from its size alone.

    {"method": "kcenter", "keep": 64}
    {"method": "visionzip", "ratio": 0.889, "positions": "compact"}
    {"method": ["visionzip", "kcenter"], "keep": 64}          # composed, in stage order
    {"method": "random:seed=3", "keep": 64}                   # a method's options in its spec ...
    {"method": "random", "seed": 3, "keep": 64}               # ... or beside it
    {"method": "kcenter", "keep": 64, "record": "kept.jsonl"}  # append each image's kept indices to a file

vLLM fixes each image's placeholder count when it processes the prompt, before the encoder runs, so the kept
count must follow from the image's size: ``keep=`` and ``ratio=`` per image (``budget="per_frame"``, the default,
or ``"per_image"``); the sample-wide and temporal budgets are refused, and so are in-LLM methods (``layer=K``),
whose cut would have to change a sequence vLLM's scheduler has already laid out in the KV cache (vllm#25756).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vtprune.api import plan
from vtprune.engine.capture import capture_points
from vtprune.engine.state import Step
from vtprune.integrations.vllm.families import VllmAdapter, family_for

KEY = "vtprune"
ATTR = "vtprune_plan"  # where the validated config travels with the model config (every vLLM process)
OPTIONS = ("method", "ratio", "keep", "budget", "positions", "newlines", "record")
BUDGETS = ("per_frame", "per_image")
#: signals that need the prompt's text, which vLLM's encoder path (features of an image, cached by its content
#: hash and shared by every request showing it) never sees
PROMPT_SIGNALS = frozenset({"instruction", "instruction_ids", "text_tokens", "prompt_positions"})


@dataclass(frozen=True)
class PluginConfig:
    """The user's ``vtprune`` entry, normalised (JSON-safe, so it travels with the model config)."""

    method: Any  # a spec string / dict, or a list of them
    ratio: float | None = None
    keep: int | None = None
    budget: str = "per_frame"
    positions: str = "original"
    newlines: str = "row"
    options: tuple[tuple[str, Any], ...] = ()  # the method's own options given beside it
    record: str | None = None  # a JSON-lines file: one line per encoded image (pixel checksum, kept, select_ms)

    @classmethod
    def parse(cls, raw: Any) -> PluginConfig:
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"vtprune: the additional_config entry is not JSON ({exc.msg}): {raw!r}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"vtprune: additional_config['vtprune'] must be an object such as "
                             f'{{"method": "kcenter", "keep": 64}}, got {raw!r}')
        if "method" not in raw:
            raise ValueError(f"vtprune: additional_config['vtprune'] needs a method, e.g. "
                             f'{{"method": "kcenter", "keep": 64}}; got keys {sorted(raw)}')
        method = raw["method"]
        if isinstance(method, tuple):
            method = list(method)
        options = tuple(sorted((k, v) for k, v in raw.items() if k not in OPTIONS))
        return cls(method=method, ratio=raw.get("ratio"), keep=raw.get("keep"),
                   budget=raw.get("budget", "per_frame"), positions=raw.get("positions", "original"),
                   newlines=raw.get("newlines", "row"), options=options, record=raw.get("record"))

    def to_json(self) -> dict[str, Any]:
        out = {"method": self.method, "budget": self.budget, "positions": self.positions, "newlines": self.newlines,
               **dict(self.options)}
        if self.ratio is not None:
            out["ratio"] = self.ratio
        if self.keep is not None:
            out["keep"] = self.keep
        if self.record is not None:
            out["record"] = self.record
        return out


def steps_for(cfg: PluginConfig, adapter: VllmAdapter) -> list[Step]:
    """The validated steps of ``cfg`` on ``adapter``'s family, or a ValueError saying what vLLM cannot run."""
    if cfg.budget not in BUDGETS:
        raise ValueError(f"vtprune: budget={cfg.budget!r} cannot run in vLLM, which fixes each image's token count "
                         f"before the encoder runs (the kept count must follow from the image's size); allowed: "
                         f"{', '.join(map(repr, BUDGETS))}")
    from vtprune.spec import parse as parse_spec

    specs = cfg.method if isinstance(cfg.method, list) else [cfg.method]
    methods = []
    for spec in specs:
        name, opts = parse_spec(spec)
        if "layer" in opts and opts["layer"] is not None:
            raise ValueError(f"vtprune: method {name!r} with layer={opts['layer']!r} acts inside the LLM, which the "
                             "vLLM plugin does not do (the cut would change a sequence vLLM has already laid out in "
                             "its KV cache; see docs/vllm.md); use a vision or input stage method")
        methods.append({"method": name, **opts, **(dict(cfg.options) if len(specs) == 1 else {})})
    if cfg.options and len(specs) > 1:
        raise ValueError(f"vtprune: with several methods give each one's options in its spec "
                         f"(e.g. \"random:seed=3\"), not beside them (got {sorted(dict(cfg.options))})")
    from vtprune.spec import build

    built = []
    for m in methods:
        try:
            built.append(build(m))
        except KeyError as exc:
            raise ValueError(f"vtprune: {exc.args[0] if exc.args else exc}") from None
    for m in built:
        if m.layers or not m.pre_llm_ok:
            raise ValueError(f"vtprune: method {m.name!r} acts inside the LLM (its stage is 'layer'), which the vLLM "
                             "plugin does not do (see docs/vllm.md); use a vision or input stage method: "
                             f"{', '.join(sorted(vision_methods()))}")
        if m.span == "video":
            raise ValueError(f"vtprune: method {m.name!r} prunes videos, which the vLLM plugin does not serve; vLLM "
                             "runs EVS and VidCom2 itself (--video-pruning-rate, --video-pruning-method), and "
                             "vtprune's evs / vidcom2 select the same tokens (tests/vllm_host/test_video_prune.py)")
        depth = int(getattr(adapter.config.get_text_config(), "num_hidden_layers", 32))
        inner = [s.name for s in m.resolve(depth).expand(depth) if s.layers]
        if inner:
            raise ValueError(f"vtprune: method {m.name!r} adds an in-LLM step ({', '.join(inner)}), which the vLLM "
                             "plugin does not do (see docs/vllm.md); configure it without that step (e.g. vscan's "
                             "drop_layer=None, kcenter's drop_layer=None)")
        needs = m.required_signals(adapter.has_cls)
        text = sorted(needs & PROMPT_SIGNALS)
        if text:
            raise ValueError(f"vtprune: method {m.name!r} reads the prompt's text ({', '.join(text)}), which vLLM's "
                             "encoder path never sees (an image's features are computed once per image and shared by "
                             "every request showing it); choose a method that needs no text")
    # plan() refuses signals whose capture source the adapter lacks (the vLLM adapters list what vLLM serves)
    steps = plan(adapter, built, cfg.ratio, keep=cfg.keep, budget=cfg.budget, positions=cfg.positions,
                 newlines=cfg.newlines)
    if adapter.structural and cfg.newlines != "all":
        raise ValueError(f"vtprune: newlines={cfg.newlines!r} keeps {adapter.family}'s image_newline tokens only where "
                         "their canvas row keeps a token, a count known after selection, and vLLM fixes each image's "
                         "token count before the encoder runs; add \"newlines\": \"all\" (every newline kept; "
                         "vtprune.prune(..., newlines=\"all\") keeps the same tokens)")
    return steps


def vision_methods() -> list[str]:
    """Registered methods the vLLM host can run: acting before the LLM by default, reading no prompt text."""
    from vtprune.registry import METHODS

    return [n for n in METHODS.names() if METHODS.get(n).stage in ("vision", "input")
            and not set(METHODS.get(n).requires) & PROMPT_SIGNALS]


def kept_count(steps: list[Step], n: int, num_layers: int) -> int:
    """Tokens an image of ``n`` candidates keeps after ``steps`` (each step's own count of what reaches it; a
    method counting differently from its budget overrides ``keep_count``)."""
    cur = n
    for s in steps:
        cur = cur if s.budget.count(n) >= n else min(cur, s.method.keep_count(s.budget, cur, n, num_layers, s.layer))
    return cur


@dataclass
class Plan:
    """A configured plugin on one model: the family adapter, the steps, the position rule."""

    config: PluginConfig
    adapter: VllmAdapter
    steps: list[Step]

    @property
    def original_positions(self) -> bool:
        return self.config.positions == "original"

    def kept(self, n: int) -> int:
        return kept_count(self.steps, n, self.adapter.num_layers)

    def kept_item(self, n: int, frames: int = 1, structural: int = 0) -> int:
        """Placeholders of a media item of ``n`` tokens in ``frames`` equal frames (each a span of a per-frame
        budget; a per-image budget pools them), ``structural`` of them never candidates and all kept."""
        if structural:
            return self.kept_item(n - structural, frames) + structural
        if self.config.budget == "per_frame" and frames > 1:
            if n % frames:
                raise ValueError(f"vtprune: a video of {n} tokens in {frames} frames has unequal frames")
            return frames * self.kept(n // frames)
        return self.kept(n)


def plan_of(hf_config: Any, architecture: str, model: Any = None) -> Plan | None:
    """The plugin's plan stored on a model config at engine start (None: vtprune is not configured)."""
    raw = getattr(hf_config, ATTR, None)
    if raw is None:
        return None
    cfg = PluginConfig.parse(raw)
    adapter = family_for(hf_config, architecture, model)
    return Plan(cfg, adapter, steps_for(cfg, adapter))


def configure(vllm_config: Any) -> None:
    """At engine start (vLLM's per-architecture config hook, main process): validate ``additional_config
    ["vtprune"]`` and store it on the model config, which every vLLM process receives. Without the key, nothing
    changes. A 1-D RoPE family keeping original positions gets vLLM's M-RoPE path (one row carries them)."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    raw = extra.get(KEY) if isinstance(extra, dict) else None
    model_config = vllm_config.model_config
    if raw is None or model_config is None:
        return
    hf_config = model_config.hf_config
    cfg = PluginConfig.parse(raw)
    adapter = family_for(hf_config, model_config.architecture)
    steps = steps_for(cfg, adapter)  # raises with vtprune's message: the engine does not start
    compiled = getattr(getattr(vllm_config, "compilation_config", None), "compile_mm_encoder", False)
    if compiled and any(source != "pixels" for source, _ in capture_points(adapter, steps)):
        raise ValueError(f"vtprune: method {cfg.method!r} reads signals from inside the vision encoder, which "
                         "compilation_config.compile_mm_encoder=True compiles; run without compile_mm_encoder, or "
                         "with a method that reads the token sequence only (kcenter, pool, random)")
    setattr(hf_config, ATTR, cfg.to_json())
    if cfg.positions == "original" and not adapter.mrope:
        text = hf_config.get_text_config()
        rope = dict(getattr(text, "rope_parameters", None) or {"rope_type": "default"})
        if rope.get("rope_type", "default") != "default" or rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"vtprune: positions='original' in vLLM needs plain RoPE for {adapter.family} (got "
                             f"{rope}); use positions='compact'")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        rope["mrope_section"] = [head_dim // 2, 0, 0]  # every frequency on row 0: plain RoPE on the original positions
        text.rope_parameters = rope
