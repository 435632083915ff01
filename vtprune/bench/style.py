"""One look per method in every plot: a distinct (colour, marker) pair, stable for a name across plots.

A registered method's pair comes from its position in ``METHODS.names()``, so ``kcenter`` looks the same in
demo.png, accuracy.png, the bench plots and ``vtprune report``. Labels with options (``kcenter(variant=todre)``,
``fastv:layer=2``) keep their method's colour with another marker and a dash-dot line; unknown labels take the
next free pairs in the order given. ``random`` (the reference baseline) is black and thicker; ``none``
(unpruned) grey and dashed. No matplotlib here: the styles are plain ``Axes.plot`` keyword arguments.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

# tab20 without its greys (grey means unpruned here), two of tab20b's dark shades in their place: ten dark shades
# first, then the light ones, so neighbouring indices differ in hue and a hue's dark/light twins are 10 apart.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf", "#393b79",
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#637939",
)
MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
BASELINE = "random"
UNPRUNED = ("none", "unpruned", "baseline")
BASELINE_COLOR = "#000000"
UNPRUNED_COLOR = "#808080"


def base_name(label: str) -> str:
    """The method name of a plot label: the text before its options (``(``, ``:``, a space or ``@``)."""
    return re.split(r"[(:\s@]", label.strip(), maxsplit=1)[0]


def _slot(i: int) -> tuple[str, str]:
    # Colour i mod 20, marker shifted by one per round of 20: pairs repeat only after 20 * len(MARKERS) slots, and
    # consecutive methods differ in colour AND marker.
    return PALETTE[i % len(PALETTE)], MARKERS[(i // len(PALETTE) + i) % len(MARKERS)]


def _registered() -> list[str]:
    try:
        from vtprune.registry import METHODS

        return METHODS.names()
    except Exception:  # a broken third-party entry point must not stop a plot
        return []


def _canonical(name: str) -> str | None:
    from vtprune.registry import METHODS

    try:
        return METHODS.canonical(name)
    except Exception:
        return None


def method_styles(names: Sequence[str], registered: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``{label: Axes.plot kwargs}`` (color, marker, linestyle, linewidth, markersize, zorder) for every label in
    ``names``; no two labels share (color, marker). ``registered`` defaults to ``METHODS.names()``."""
    registry = list(registered) if registered is not None else _registered()
    index = {n: i for i, n in enumerate(registry)}

    def canonical(name: str) -> str | None:
        if registered is not None:
            return name if name in index else None
        found = _canonical(name)
        return found if found in index else None

    out: dict[str, dict[str, Any]] = {}
    used: set[tuple[str, str]] = set()
    pending: list[str] = []
    for label in dict.fromkeys(names):
        base = canonical(base_name(label))
        plain = base is not None and base_name(label) == label.strip()  # a method name or alias, no options
        if label.strip().lower() in UNPRUNED:
            style = _style(UNPRUNED_COLOR, MARKERS[0], linestyle="--", linewidth=1.2, zorder=1)
        elif plain and base == BASELINE and (BASELINE_COLOR, MARKERS[0]) not in used:
            style = _style(BASELINE_COLOR, MARKERS[0], linewidth=2.6, zorder=3)
        elif plain and _slot(index[base]) not in used:
            style = _style(*_slot(index[base]))
        else:
            pending.append(label)
            continue
        out[label] = style
        used.add((style["color"], style["marker"]))
    plotted = {canonical(base_name(label)) for label in out}
    # every registered method's pair stays reserved, plotted or not, so an extra label never takes one
    reserved = {_slot(i) for i in range(len(registry))} | {(BASELINE_COLOR, MARKERS[0]), (UNPRUNED_COLOR, MARKERS[0])}
    next_free = len(registry)
    for label in pending:  # variants: their method's colour, the first free marker; unknown: the next free slot
        base = canonical(base_name(label))
        own = None if base is None else (BASELINE_COLOR, MARKERS[0]) if base == BASELINE else _slot(index[base])
        if own is not None and base not in plotted and own not in used:  # its method's only configuration here
            style = _style(*own, linewidth=2.6, zorder=3) if base == BASELINE else _style(*own)
        elif own is not None and (marker := next((m for m in MARKERS if (own[0], m) not in used | reserved),
                                                 None)):
            style = _style(own[0], marker, linestyle="-.", linewidth=2.0 if base == BASELINE else 1.4)
        else:
            while _slot(next_free) in used | reserved:
                next_free += 1
            style = _style(*_slot(next_free))
        plotted.add(base)
        out[label] = style
        used.add((style["color"], style["marker"]))
    return {label: out[label] for label in dict.fromkeys(names)}


def _style(color: str, marker: str, *, linestyle: str = "-", linewidth: float = 1.4, zorder: float = 2,
           ) -> dict[str, Any]:
    # a darker outline keeps the light shades' markers visible on white
    edge = "#" + "".join(f"{int(int(color[i:i + 2], 16) * 0.6):02x}" for i in (1, 3, 5))
    return {"color": color, "marker": marker, "linestyle": linestyle, "linewidth": linewidth, "markersize": 5,
            "markeredgecolor": edge, "markeredgewidth": 0.8, "zorder": zorder}


def legend_below(fig: Any, handles: Sequence[Any] | None = None, labels: Sequence[str] | None = None,
                 fontsize: float = 8) -> Any:
    """A figure legend under the axes, as many columns as the figure's width holds; save the figure with
    ``bbox_inches="tight"`` so the canvas grows to hold it (it never covers data)."""
    if handles is None:
        seen: dict[str, Any] = {}
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        labels, handles = list(seen), list(seen.values())
    if not handles:
        return None
    longest = max(len(str(lab)) for lab in labels)
    # width of one entry in inches: the marker and line sample plus the text at ~0.6 em per character
    entry = 0.55 + longest * 0.6 * fontsize / 72
    ncol = max(1, min(len(handles), int(fig.get_figwidth() / entry)))
    ncol = math.ceil(len(handles) / math.ceil(len(handles) / ncol))  # balanced rows
    return fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=fontsize,
                      frameon=False, handlelength=2.4, columnspacing=1.2)
