"""Running steps on a :class:`~vtprune.engine.state.Forward`: its candidates in current coordinates, the selection
core, and the pre-LLM loop (merged values written into the embeddings, the map cut after each step).

Both hosts call these: the Hugging Face host on a prompt batch, the vLLM host on the images of one encoder call
(one row per image). Nothing here installs a hook.
"""

from __future__ import annotations

import torch

from vtprune.adapters.base import Adapter
from vtprune.budget import span_ids
from vtprune.engine.selection import Candidates, Selected, select
from vtprune.engine.sequence import kept_order
from vtprune.engine.state import Forward, IndexMap, Step
from vtprune.engine.view import StageView
from vtprune.types import PruneStats


def run_step(adapter: Adapter, step: Step, fwd: Forward, cur: IndexMap, tokens: torch.Tensor | None,
             stats: PruneStats, *, local: torch.Tensor | None = None, prev: IndexMap | None = None,
             layer_kwargs: dict | None = None, grad: bool = False) -> Selected:
    """One step on the current sequence (``cur``): its candidates, its signal view, the selection core."""
    with torch.no_grad():
        lay = fwd.layout
        orig = fwd.original(cur, step.layer is not None)  # (B, Lc) original positions
        key = ("spans", step.budget.policy)
        if key not in fwd.cache:  # span ids of the prompt's candidates, and their sizes
            ids0, owner = span_ids(step.budget.policy, lay.image, lay.frame, lay.cand)
            fwd.cache[key] = (ids0, owner, torch.bincount(ids0[ids0 >= 0], minlength=owner.numel()))
        ids0, owner, size0 = fwd.cache[key]
        cand = cur.valid & lay.cand.gather(1, orig)
        line = lay.line.gather(1, orig)
        c = Candidates(valid=cur.valid, cand=cand, span=torch.where(cand, ids0.gather(1, orig), -1),
                       span_owner=owner, span_size=size0, image=lay.image.gather(1, orig),
                       frame=lay.frame.gather(1, orig), line=line,
                       structural=cur.valid & ~cand & lay.visual.gather(1, orig) & (line >= 0))
        view = StageView(adapter, fwd, step, orig, tokens, local, prev, cur, layer_kwargs)
        chosen = select(step, c, view, adapter.num_layers, grad=grad)
        _record(chosen, orig, cur.valid & lay.visual.gather(1, orig))
    stats.stages.append(chosen.stage)
    return chosen


def _record(chosen: Selected, orig: torch.Tensor, visual: torch.Tensor) -> None:
    """The stage's kept visual tokens and merged tokens (positions and values) in original positions, for
    vtprune.masks and the merging methods' masked-forward reference."""
    kept = chosen.keep & visual  # (B, Lc)
    B = kept.shape[0]
    chosen.stage.kept_positions = [orig[b][kept[b]] for b in range(B)]
    if chosen.merged is None:
        return
    rows, slots, vals = chosen.merged
    positions, values = [], []
    for b in range(B):
        mine = (rows == b).nonzero()[:, 0]
        order = torch.argsort(slots[mine])
        positions.append(orig[b, slots[mine][order]])
        values.append(vals[mine][order].detach())
    chosen.stage.merged_positions, chosen.stage.merged_values = positions, values


def run_pre_llm(adapter: Adapter, steps: list[Step], fwd: Forward, stats: PruneStats, *,
                grad: bool = False) -> IndexMap:
    """The pre-LLM steps in order on ``fwd.base``; merged values are written into ``fwd.embeds`` (a copy of
    ``fwd.projected``). Returns the map of the kept LLM input onto the original sequence."""
    cur = fwd.base
    for step in steps:
        chosen = run_step(adapter, step, fwd, cur, None, stats, grad=grad)
        if chosen.changed:
            if chosen.merged is not None:  # before the LLM: merged values go into the embeddings
                rows, slots, vals = chosen.merged
                fwd.embeds = fwd.embeds.clone() if fwd.embeds is fwd.projected else fwd.embeds
                fwd.embeds[rows, cur.index.clamp(min=0)[rows, slots]] = vals.to(fwd.embeds.dtype)
            cur = cur.then(*kept_order(chosen.keep))
    return cur
