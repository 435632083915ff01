#!/usr/bin/env bash
# Install lmms-eval into a venv without letting pip touch torch or install torchvision.
#
# Why not `pip install lmms-eval`: its hard `torchvision` dependency either drags in a CUDA torch build
# (replacing the CPU wheel) or a torchvision that cannot load beside the installed torch, which then also
# breaks transformers' AutoProcessor (see README / eval/README.md). lmms-eval's import path for the
# evaluator, the task system and custom models needs only the modules listed below, so we install lmms-eval
# with --no-deps plus those, with the venv's current torch pinned by a constraints file.
#
# Usage: scripts/setup_lmms_eval.sh [VENV_DIR]   (default: .venv). Idempotent: exits early when installed.
# LMMS_EVAL_VERSION=0.7.x overrides the tested version.
set -euo pipefail

VENV="${1:-.venv}"
LMMS_EVAL_VERSION="${LMMS_EVAL_VERSION:-0.7.3}"
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "setup_lmms_eval: no python at $PY (create the venv first)" >&2; exit 1; }

# The modules lmms-eval's core import path (evaluator, tasks, api.model, registry_v2) needs ...
DEPS=(accelerate datasets evaluate huggingface_hub jinja2 loguru numpy pandas pillow pytz sacrebleu
      tenacity tqdm transformers pyyaml packaging pytablewriter jsonlines numexpr scikit-learn sentencepiece)
# ... and decord, which lmms-eval's llava_hf and Qwen classes import at module top (vtprune wraps them;
# a numpy-only wheel). Not qwen-vl-utils: it imports torchvision, so lmms-eval's Qwen classes need a
# torch + torchvision install (GPU machines); here the generic `--model vtprune` class serves Qwen models.
if [ "$(uname -m)" = "x86_64" ]; then DEPS+=(decord); fi

installed="$("$PY" - "$LMMS_EVAL_VERSION" <<'PYEOF'
import importlib.metadata as md, sys
try:
    ok = md.version("lmms-eval") == sys.argv[1]
    import lmms_eval.evaluator, lmms_eval.models.registry_v2  # noqa: F401  (the import path we rely on)
    import filelock._api  # noqa: F401  (see the filelock pin below)
except Exception:
    ok = False
print("yes" if ok else "no")
PYEOF
)"
if [ "$installed" = "yes" ]; then
    echo "setup_lmms_eval: lmms-eval $LMMS_EVAL_VERSION already installed in $VENV"
    exit 0
fi

torch_before="$("$PY" -c 'import torch; print(torch.__version__)')"
transformers_before="$("$PY" -c 'import importlib.metadata as md; print(md.version("transformers"))')"
constraints="$(mktemp)"
# Pin the torch that is installed, exactly (local version label included): pip may not replace it; nor the
# transformers the venv was made for (CI tests the oldest and the newest supported release).
echo "torch==$torch_before" > "$constraints"
echo "transformers==$transformers_before" >> "$constraints"
# lmms-eval 0.7.3's evaluator imports the private `filelock._api`, which filelock 4 removed.
echo "filelock<4" >> "$constraints"

log="$(mktemp)"
trap 'rm -f "$constraints" "$log"' EXIT
# pip's output goes to a log (it warns that lmms-eval's other ~40 requirements are missing: by design).
pip_install() {
    "$PY" -m pip install --disable-pip-version-check -c "$constraints" "$@" >>"$log" 2>&1 \
        || { grep -v "is ignored" "$log" | tail -30 >&2; echo "setup_lmms_eval: pip failed" >&2; exit 1; }
}
echo "setup_lmms_eval: installing lmms-eval $LMMS_EVAL_VERSION (--no-deps) and ${#DEPS[@]} modules into $VENV"
pip_install --no-deps "lmms-eval==$LMMS_EVAL_VERSION"
pip_install "${DEPS[@]}"

# Verify: same torch, no torchvision (a torchvision next to a mismatched torch breaks AutoProcessor).
"$PY" - "$torch_before" <<'PYEOF'
import importlib.util, sys
import torch
if torch.__version__ != sys.argv[1]:
    sys.exit(f"setup_lmms_eval: torch changed from {sys.argv[1]} to {torch.__version__}")
if importlib.util.find_spec("torchvision") is not None:
    sys.exit("setup_lmms_eval: torchvision is installed; uninstall it (it cannot load beside this torch)")
import lmms_eval.evaluator, lmms_eval.models.registry_v2  # noqa: F401
import filelock._api  # noqa: F401
import importlib.metadata as md
print(f"setup_lmms_eval: lmms-eval {md.version('lmms-eval')} ready (torch {torch.__version__}, no torchvision)")
PYEOF
