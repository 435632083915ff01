"""The Hugging Face host as the reference every other host is checked against: state paired with the forward
(or KV cache) it belongs to, copies, gradients and labels. Each test here failed before its fix."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import vtprune
from cases import ROWS, rows_for
from vtprune.testing.reference import masked_forward
from vtprune.testing.tiny import IMAGE, Row, build, make_inputs

ATOL, RTOL = 2e-5, 1e-4


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------ decode state per step
@pytest.mark.parametrize("rows", [1, 2], ids=["one-row", "padded-batch"])
def test_decode_positions_advance_at_every_step(rows):
    """fastv + positions="compact": layer K's decode positions advance by one per step (a per-step memo keyed
    by id() of freed tensors used to hand later steps an earlier step's positions: 16, 16, 16, ...)."""
    model = build("llava", text_layers=3)
    inputs = make_inputs(model, ROWS[:rows], padding="left")
    seen: list[torch.Tensor] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == 1:  # decode steps
            seen.append(kwargs["position_ids"].clone())

    with vtprune.prune(model, "fastv", ratio=0.5, layer=2, positions="compact"):
        hook = model.model.language_model.layers[2].register_forward_pre_hook(record, with_kwargs=True)
        try:
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=8, do_sample=False)
        finally:
            hook.remove()
    assert len(seen) == 7
    steps = torch.cat(seen, dim=1)  # (B, 7)
    assert torch.equal(steps[:, 1:] - steps[:, :-1], torch.ones(rows, 6, dtype=steps.dtype)), steps


# ------------------------------------------------------------------------------------ signals of the right images
def _encode(model, inputs):
    """What generate() does before its first forward: the feature call, then the inputs without pixels."""
    fn = model.model.get_image_features
    enc = fn(**{k: v for k, v in inputs.items() if k in inspect.signature(fn).parameters}, return_dict=True)
    rest = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
    return enc, rest


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "qwen2_vl", "qwen2_5_vl", "gemma3"])
def test_precomputed_features_are_scored_with_their_own_signals(family):
    """Encode image A, then image B, then run A's encoder outputs: A's tokens must be selected with A's signals
    (the engine used to take the signals of the LAST feature call, B's)."""
    model = build(family)
    a = make_inputs(model, [ROWS[0]])
    b = make_inputs(model, [Row(before=3, after=4, seed=9, image_size=ROWS[0].image_size)])
    with vtprune.prune(model, "cls_attention", keep=5) as handle, torch.no_grad():
        want = model(**a).logits
        kept = handle.stats.kept_positions
        enc_a, rest_a = _encode(model, a)
        _encode(model, b)
        got = model(**rest_a, mm_encoder_outputs={"image": enc_a}).logits
        assert [k.tolist() for k in handle.stats.kept_positions] == [k.tolist() for k in kept]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_features_encoded_before_prune_are_refused_by_signal_methods():
    """Features encoded outside vtprune's hooks carry no vision-tower signals: a clear error, not B's."""
    model = build("llava")
    a = make_inputs(model, [ROWS[0]])
    with torch.no_grad():
        enc_a, rest_a = _encode(model, a)
        with vtprune.prune(model, "cls_attention", keep=5):
            _encode(model, make_inputs(model, [Row(before=3, after=4, seed=9)]))
            with pytest.raises(RuntimeError, match="vision-tower signals are unavailable"):
                model(**rest_a, mm_encoder_outputs={"image": enc_a})
        with vtprune.prune(model, "kcenter", keep=5) as handle:  # token-only methods need no ViT signal
            model(**rest_a, mm_encoder_outputs={"image": enc_a})
            assert handle.stats.visual_after == [5]


_TEXT_SIGNALS = {"instruction", "instruction_ids", "text_tokens", "text_attention"}


def _no_cache_cases():
    from cases import METHOD_CASES

    out = [pytest.param("llava", c, id=f"llava-{c.id}") for c in METHOD_CASES if c.id == "cls_attention"]
    return out + [pytest.param(f, c, id=f"{f}-{c.id}") for f in ("qwen2_vl", "qwen3_vl") for c in METHOD_CASES]


@pytest.mark.parametrize("family,case", _no_cache_cases())
def test_generate_without_cache(family, case):
    """generate(use_cache=False) re-runs the whole sequence with the pre-encoded features at every step (it used
    to fail: "no get_image_features call"). Each forward prunes its own input; a selection that does not read
    the text is the same at every step, so the logits equal the cached generation's."""
    model = build(family)
    inputs = make_inputs(model, rows_for(model), padding="left")
    with case.prune(model) as handle:
        kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True)
        uncached = model.generate(**inputs, use_cache=False, **kw)
        assert handle.stats.pruned
        cached = model.generate(**inputs, use_cache=True, **kw)
        reads_text = any(s.layer is not None or s.method.required_signals(handle.adapter.has_cls) & _TEXT_SIGNALS
                         for s in handle.steps)
    if not reads_text and not case.merges:
        for a, b in zip(uncached.logits, cached.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ copies
def test_deepcopy_gives_an_independent_pruned_copy():
    model = build("llava")
    inputs = make_inputs(model, ROWS)
    base, unpruned_hooks = _logits(model, inputs), _hooks(model)
    handle = vtprune.prune(model, "cls_attention", keep=5)
    pruned = _logits(model, inputs)
    hooks, attrs = _hooks(model), set(model.__dict__)
    clone = copy.deepcopy(model)
    assert handle.active and _hooks(model) == hooks and set(model.__dict__) == attrs  # the original as it was
    twin = vtprune.handle_of(clone)
    assert twin is not None and twin is not handle and twin.active and twin.model is clone
    assert torch.equal(_logits(clone, inputs), pruned)
    assert twin.stats.visual_after == handle.stats.visual_after
    # the copy selects with its OWN vision tower (the copy used to call the original's feature function)
    with torch.no_grad():
        for p in clone.model.vision_tower.parameters():
            p.mul_(0.5)
    changed = _logits(clone, inputs)
    assert torch.equal(_logits(model, inputs), pruned)
    twin.remove()
    assert vtprune.handle_of(clone) is None and "__deepcopy__" not in clone.__dict__
    with vtprune.prune(clone, "cls_attention", keep=5):  # pruning the changed copy from scratch
        assert torch.equal(_logits(clone, inputs), changed)
    assert not torch.equal(changed, pruned)
    handle.remove()
    assert torch.equal(_logits(model, inputs), base) and _hooks(model) == unpruned_hooks


def test_deepcopy_of_model_and_handle_together():
    model = build("llava")
    handle = vtprune.prune(model, "kcenter", ratio=0.5)
    clone, twin = copy.deepcopy((model, handle))
    assert twin is vtprune.handle_of(clone) and twin is not handle and twin.model is clone
    handle.remove()
    twin.remove()
    clone, twin = copy.deepcopy((model, handle))  # a removed handle copies as a removed handle
    assert vtprune.handle_of(clone) is None and not twin.active and twin.model is clone


def test_pickling_a_pruned_model_says_why_it_cannot():
    model = build("llava")
    with vtprune.prune(model, "kcenter", ratio=0.5):
        with pytest.raises(TypeError, match="pruned by vtprune cannot be pickled.*deepcopy.*save_pretrained"):
            pickle.dumps(model)
        with pytest.raises(TypeError, match="cannot be pickled"):
            torch.save(model, io.BytesIO())
    pickle.loads(pickle.dumps(model))  # unpruned: pickles as before


# ------------------------------------------------------------------------------------ gradients and labels
GRAD_CASES = [("random", {"ratio": 0.5}), ("kcenter", {"ratio": 0.5}), ("cls_attention", {"keep": 5}),
              ("fastv", {"ratio": 0.5, "layer": 1}), ("random", {"ratio": 0.4, "layer": (1, 2)})]


def _labels(inputs, visual, pattern: str) -> torch.Tensor:
    """"sft": only the text after the image is learned (image and prompt rows ignored); "all": every real
    token, so rows of dropped tokens have targets too (which a pruned forward cannot predict: ignored)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    labels = ids.masked_fill(~mask | visual, -100)
    labels[:, 0] = -100
    first = mask.long().argmax(1)  # the first real token: no row predicts it
    labels[torch.arange(len(ids)), first] = -100
    if pattern == "sft":
        last_vis = (visual.long() * torch.arange(ids.shape[1])).argmax(1)
        labels[torch.arange(ids.shape[1])[None] <= last_vis[:, None]] = -100
    return labels


@pytest.mark.parametrize("pattern", ["sft", "all"])
@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "qwen2_vl", "qwen3_vl", "qwen3_5", "gemma3"])
@pytest.mark.parametrize("method,kwargs", GRAD_CASES, ids=[f"{m}{'@' + str(k['layer']) if 'layer' in k else ''}"
                                                          for m, k in GRAD_CASES])
def test_training_through_pruning_matches_the_masked_reference(family, method, kwargs, pattern):
    """loss.backward() through a pruned forward: the loss and every parameter's gradient (vision tower,
    projector, the layers below K) equal those of the masked reference. labels= are cut with the tokens."""
    model = build(family)
    inputs = make_inputs(model, [r for r in rows_for(model) if not r.video_frames] or ROWS, padding="left")
    visual = inputs["input_ids"] == IMAGE
    labels = _labels(inputs, visual, pattern)
    with vtprune.prune(model, method, **kwargs) as handle:
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        stats = handle.stats
    assert stats.pruned
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logits = masked_forward(model, inputs, stats, differentiable=True)  # (B, L, V)
    target = F.pad(labels, (0, 1), value=-100)[:, 1:].clone()  # the next-token target of every position
    last = max(stats.positions_by_layer)
    for b, kept in enumerate(stats.positions_at(last)):
        dropped = torch.ones(labels.shape[1], dtype=torch.bool)
        dropped[kept] = False
        target[b, dropped] = -100  # a dropped token has no logits row
    ref = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    ref_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(ref_grads)
    assert any(n.startswith("model.vision_tower") or ".visual." in n or n.startswith("model.visual") for n in grads)
    for n, g in ref_grads.items():  # float32 sums: tolerance relative to the gradient's scale (tied embeddings)
        torch.testing.assert_close(grads[n], g, atol=1e-6 * max(1.0, float(g.abs().max())), rtol=1e-4, msg=n)


def test_labels_without_pruning_give_the_models_own_loss():
    model = build("llava")
    inputs = make_inputs(model, ROWS, padding="left")
    labels = _labels(inputs, inputs["input_ids"] == IMAGE, "all")
    with torch.no_grad():
        want = model(**inputs, labels=labels)
        with vtprune.prune(model, "kcenter", ratio=0.0):
            got = model(**inputs, labels=labels)
        assert torch.equal(got.loss, want.loss) and list(got.keys())[0] == "loss"
        with vtprune.prune(model, "kcenter", ratio=0.5):
            as_dict = model(**inputs, labels=labels)
            as_tuple = model(**inputs, labels=labels, return_dict=False)
        assert torch.equal(as_tuple[0], as_dict.loss) and torch.equal(as_tuple[1], as_dict.logits)


def test_merging_methods_refuse_to_train():
    model = build("llava")
    inputs = make_inputs(model, ROWS)
    with vtprune.prune(model, "visionzip", keep=6):
        with pytest.raises(NotImplementedError, match="visionzip.*merges tokens.*no gradient"):
            model(**inputs).logits.sum().backward()
        with torch.no_grad():
            model(**inputs)  # inference is unaffected
