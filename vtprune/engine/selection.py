"""The selection core: one step (a method and its budget) on one sequence's spans -> which tokens stay.

It knows nothing of hooks, caches or transformers: a host describes the current sequence as a
:class:`Candidates` (which slots are candidates, their spans, the structural tokens) and hands over a
:class:`~vtprune.signals.SignalSource`; the core groups spans of equal size, calls the method, checks what it
returns, applies the structural rule and reports the stage's statistics. The Hugging Face host
(:mod:`vtprune.engine.hf`) and the vLLM host call the same function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vtprune.budget import Budget
from vtprune.engine.state import Step
from vtprune.methods.base import Selection
from vtprune.signals import SignalSource, Signals
from vtprune.types import SpanStats, StageStats


@dataclass
class Candidates:
    """One step's view of the current sequence, all (B, Lc) in its slot order."""

    valid: torch.Tensor  # bool: slots holding a token (not padding a host added)
    cand: torch.Tensor  # bool: visual tokens a method may select
    span: torch.Tensor  # long: span of each candidate (``budget.span_ids``), -1 elsewhere
    span_owner: torch.Tensor  # (S_all,) long: image (or batch row) of every span id
    span_size: torch.Tensor  # (S_all,) long: candidates of every span in the prompt, before any stage
    image: torch.Tensor  # long: image / video of each token (-1 text), for the statistics
    frame: torch.Tensor  # long: frame of each token
    line: torch.Tensor  # long: canvas row of each token for the structural rule (-1 none)
    structural: torch.Tensor  # bool: visual tokens that are never candidates (LLaVA-NeXT's newlines)


@dataclass
class Selected:
    """What one step keeps: ``keep`` (B, Lc) bool over the current slots, merged representations
    (rows (M,), slots (M,), values (M, D)) for merging methods, and the stage's statistics."""

    keep: torch.Tensor
    merged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    stage: StageStats
    changed: bool  # False: every slot stays (nothing to cut)


def select(step: Step, c: Candidates, source: SignalSource, num_layers: int, *, grad: bool = False) -> Selected:
    """Run ``step`` on the candidates. ``grad``: the forward is being differentiated, so merged values (which
    carry no gradient) are refused."""
    t0 = time.perf_counter()
    device = c.valid.device
    method, budget = step.method, step.budget
    b_idx, p_idx = c.cand.nonzero(as_tuple=True)  # row-major: a span's tokens stay in sequence order
    ids = c.span[b_idx, p_idx]
    srt = torch.argsort(ids, stable=True)
    b_idx, p_idx, ids = b_idx[srt], p_idx[srt], ids[srt]
    span_list, counts = torch.unique_consecutive(ids, return_counts=True)
    counts_l, span_l = counts.tolist(), span_list.tolist()
    starts = (torch.cumsum(counts, 0) - counts).tolist()
    rows_l = b_idx[torch.tensor(starts, dtype=torch.long, device=device)].tolist() if counts_l else []
    keep = c.valid & ~c.cand  # text, structural tokens, the caller's padding
    before = c.cand.sum(1).tolist()
    per_frame = budget.policy in ("per_frame", "temporal")
    # a budget keeping the whole span (as the prompt had it) keeps it, whatever the method; otherwise the method
    # counts, also below the budget (schedules: PyramidDrop's later stages keep fewer than k)
    if method.span == "video":  # a whole video per span, counted by the method from its frames
        pairs = torch.unique(torch.stack([ids, c.frame[b_idx, p_idx]]), dim=1)
        frames = torch.bincount(pairs[0], minlength=int(c.span_size.numel())).tolist()
        ks = [min(n, method.video_count(budget, n, frames[s])) for n, s in zip(counts_l, span_l)]
    else:
        ks = [n if budget.count(n0) >= n0 else min(n, method.keep_count(budget, n, n0, num_layers, step.layer))
              for n, n0 in ((n, int(c.span_size[s])) for n, s in zip(counts_l, span_l))]
    ordinals, seen = [], {}
    for r in rows_l:  # index of each span among the spans of its row (stable under batching)
        ordinals.append(seen.get(r, 0))
        seen[r] = ordinals[-1] + 1
    span_rows = (rows_l, ordinals, p_idx, starts, counts_l)
    if budget.policy == "temporal":
        alloc = _temporal(budget, counts_l, span_l, c.span_owner,
                          lambda s: _span_signals(step, source, span_rows, [s], device).tokens[0])
        ks = [a if k < n else k for k, a, n in zip(ks, alloc, counts_l)]
    groups: dict[tuple[int, int], list[int]] = {}
    stats = []
    for s, (n, r, k) in enumerate(zip(counts_l, rows_l, ks)):
        first = p_idx[starts[s]]
        stats.append(SpanStats(row=r, image=int(c.image[r, first]), frame=int(c.frame[r, first]) if per_frame else -1,
                               n=n, kept=k, budget=k))
        if k >= n and not (method.gate and budget.count(n) < n):  # gates run unless nothing may go
            keep[r, p_idx[starts[s] : starts[s] + n]] = True
        else:
            groups.setdefault((n, k), []).append(s)
    merged = []
    for (n, k), spans in groups.items():
        sig = _span_signals(step, source, span_rows, spans, device)
        out = method.select(sig, k)
        sel, values = (out.index, out.values) if isinstance(out, Selection) else (out, None)
        _check(method.name, sel, values, len(spans), n, k, grad)
        kept = sig.positions.gather(1, sel.to(device))  # (S, k) current slots
        rows = sig.rows
        drop = out.drop if isinstance(out, Selection) else None
        if drop is not None:  # a gate dropped these whole spans (e.g. ToDRE's information migration)
            drop = drop.to(device)
            kept, rows = kept[~drop], rows[~drop]
            values = values[~drop.to(values.device)] if values is not None else None
            for j in drop.nonzero()[:, 0].tolist():
                stats[spans[j]].kept = 0
        if kept.numel():
            keep[rows[:, None].expand_as(kept), kept] = True
            if values is not None:
                merged.append((rows[:, None].expand_as(kept).reshape(-1), kept.reshape(-1),
                               values.reshape(-1, values.shape[-1])))
    changed = bool(groups) and not bool(keep.eq(c.valid).all())
    if changed and step.newlines == "row" and bool(c.structural.any()):  # AnyRes rule: a newline survives iff
        # its canvas row keeps a token ("all": every newline survives, a count known before selection)
        kept_lines = torch.unique(c.line[keep & c.cand & (c.line >= 0)])
        keep = torch.where(c.structural, torch.isin(c.line, kept_lines), keep)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    after = (c.cand & keep).sum(1).tolist() if changed else before
    stage = StageStats(stage=step.label, method=method.name, before=before, after=after, spans=stats,
                       select_ms=(time.perf_counter() - t0) * 1e3)
    values_out = tuple(torch.cat([m[i] for m in merged]) for i in range(3)) if merged and changed else None
    return Selected(keep=keep, merged=values_out, stage=stage, changed=changed)


def _span_signals(step: Step, source: SignalSource, span_rows: tuple, spans: list[int],
                  device: torch.device) -> Signals:
    """Signals of equal-sized spans: their rows (S,), their candidates' slots (S, n), their ordinals (S,)."""
    rows_l, ordinals, p_idx, starts, counts = span_rows
    n = counts[spans[0]]
    pos = torch.stack([p_idx[starts[s] : starts[s] + n] for s in spans])  # (S, n)
    return Signals(source, stage=step.label.split(":")[0], layer=step.layer,
                   rows=torch.tensor([rows_l[s] for s in spans], device=device), positions=pos,
                   ordinals=torch.tensor([ordinals[s] for s in spans], device=device), owner=step.method.name,
                   budget=step.budget)


def _temporal(budget: Budget, counts: list[int], span_ids: list[int], owner: torch.Tensor,
              tokens_of: Callable[[int], torch.Tensor]) -> list[int]:
    """``budget="temporal"``: re-allocate each video's per-frame budgets by frame novelty (1 - cosine of the
    mean tokens of consecutive frames; the first frame counts as fully novel)."""
    out = [budget.count(n) for n in counts]
    by_video: dict[int, list[int]] = {}
    for s, sid in enumerate(span_ids):  # spans come sorted by (image, frame)
        by_video.setdefault(int(owner[sid]), []).append(s)
    for spans in by_video.values():
        if len(spans) < 2:
            continue
        means = [tokens_of(s).float().mean(0) for s in spans]
        novelty = [1.0] + [float(1 - torch.nn.functional.cosine_similarity(a, b, dim=0))
                           for a, b in zip(means[:-1], means[1:])]
        alloc = Budget.allocate(sum(out[s] for s in spans), [max(v, 1e-3) for v in novelty],
                                [counts[s] for s in spans])
        for s, k in zip(spans, alloc):
            out[s] = k
    return out


def _check(name: str, sel: torch.Tensor, values: torch.Tensor | None, S: int, n: int, k: int, grad: bool) -> None:
    """A method's answer must be exactly k distinct in-range indices per span, and finite merged values."""
    if sel.shape != (S, k) or sel.dtype not in (torch.int64, torch.int32):
        raise RuntimeError(f"method {name!r} returned indices of shape {tuple(sel.shape)} / {sel.dtype}; "
                           f"expected ({S}, {k}) integers")
    if bool((sel < 0).any() or (sel >= n).any()):
        raise RuntimeError(f"method {name!r} returned indices outside [0, {n})")
    hit = torch.zeros(S, n, dtype=torch.bool, device=sel.device).scatter_(1, sel.long(), True)
    if bool((hit.sum(1) != k).any()):
        raise RuntimeError(f"method {name!r} returned duplicate indices; it must keep exactly {k} distinct tokens")
    if values is None:
        return
    if grad:
        raise NotImplementedError(
            f"method {name!r} merges tokens, and its merged values carry no gradient; training through vtprune "
            "supports methods that only select (run merging methods under torch.no_grad())")
    if not bool(torch.isfinite(values).all()):
        raise FloatingPointError(f"method {name!r} produced non-finite merged values; refusing them")
