"""Method specs as text: one parser for the CLI, lmms-eval model args, sweep configs and the video script.

    "kcenter"                            -> ("kcenter", {})
    "fastv:layer=2:keep=64"              -> ("fastv", {"layer": 2, "keep": 64})
    "transition:layer=[7,9,12]"          -> ("transition", {"layer": (7, 9, 12)})
    {"method": "fastv", "layer": 2}      -> ("fastv", {"layer": 2})

Values are booleans, ints, floats, None, lists (``[7,9,12]``, or ``7;9;12`` where commas already separate
arguments) or strings; :func:`build` turns a spec into a validated method, casting each value to the type of
the method's field (a list becomes a tuple where the field is one).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

from vtprune.methods.base import Method
from vtprune.methods.base import build as build_method
from vtprune.registry import METHODS


def split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, so ``transition:layer=[7,9,12]`` stays whole; strips the parts."""
    parts, depth, cur = [], 0, []
    for ch in text:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse_value(text: Any) -> Any:
    """A text value as Python: true / false, none / null, int, float, a bracketed or ``;``-separated list."""
    if not isinstance(text, str):
        return text
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if s[:1] in "[(":
        try:
            return json.loads(s.replace("(", "[").replace(")", "]"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{s!r} is not a valid list ({exc.msg})") from None
    if ";" in s:
        return [parse_value(x) for x in s.split(";") if x.strip()]
    for cast in (int, float):
        try:
            return cast(s)
        except ValueError:
            pass
    return s


def parse_pairs(pairs: Sequence[str] | str, *, sep: str = ",") -> dict[str, Any]:
    """``"a=1,b=[2,3]"`` or ``["a=1", "b=[2,3]"]`` -> ``{"a": 1, "b": [2, 3]}``."""
    items = split_top(pairs, sep) if isinstance(pairs, str) else list(pairs)
    out = {}
    for pair in items:
        if "=" not in pair:
            raise ValueError(f"option {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def parse(spec: str | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A method spec -> (registry name, options): ``"fastv:layer=2"`` or ``{"method": "fastv", "layer": 2}``."""
    if isinstance(spec, dict):
        opts = dict(spec)
        name = opts.pop("method", None) or opts.pop("name", None)
        if not name:
            raise ValueError(f"a method entry needs method: <name>, got {spec!r}")
        return str(name), {k: parse_value(v) for k, v in opts.items()}
    name, *pairs = split_top(str(spec), ":")
    try:
        return name, parse_pairs(pairs)
    except ValueError as exc:
        raise ValueError(f"method spec {spec!r}: {exc}") from None


def fields(name: str) -> dict[str, str]:
    """The options of method ``name``: field name -> its annotation (as text)."""
    return {f.name: str(f.type) for f in dataclasses.fields(METHODS.get(name)) if f.init and not f.name.startswith("_")}


def coerce(name: str, value: Any, annotation: str) -> Any:
    """A parsed value as the field's type: lists become tuples for tuple fields (and ``layer``), whole floats
    become ints for int fields."""
    value = parse_value(value)
    integral = name == "layer" or ("int" in annotation and "float" not in annotation)

    def whole(v: Any) -> Any:
        return int(v) if integral and isinstance(v, float) and v.is_integer() else v

    if isinstance(value, list) and (name == "layer" or "tuple" in annotation):
        return tuple(whole(v) for v in value)
    return whole(value)


def build(spec: str | dict[str, Any], **extra: Any) -> Method:
    """A validated method object from a spec (``extra``: more options, e.g. a budget)."""
    name, opts = parse(spec)
    types = fields(name)
    return build_method(METHODS.get(name), {k: coerce(k, v, types.get(k, "")) for k, v in {**opts, **extra}.items()})
