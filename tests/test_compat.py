"""Where transformers releases differ (vtprune/compat.py, tested at both ends of the supported range in CI),
the repository's kernels/ folder next to the PyPI package ``kernels``, and first use from several threads."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import vtprune
from cases import ROWS
from vtprune import compat
from vtprune.testing.tiny import build, make_inputs

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` started in the repository root, so '' (the root) is first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _has_kernels_dist() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# ------------------------------------------------------------------------------------ kernels/ never shadows
def test_repository_kernels_folder_never_shadows_the_pypi_package():
    """transformers >= 5.25 imports the PyPI package ``kernels`` (hub kernels); run from the repository root,
    ``import kernels`` used to find the repo's kernels/ instead ("cannot import name 'CUDAProperties')."""
    out = _run("import transformers.models.llava.modeling_llava, kernels, vtprune.kernels as vk\n"
               "print(kernels.__file__); print(vk.__name__, callable(vk.gather_sequence))")
    assert out.returncode == 0, out.stderr[-2000:]
    kernels_file, vk = out.stdout.split("\n")[:2]
    assert vk == "vtprune.kernels True"
    if _has_kernels_dist():  # the real package, loaded in the folder's place
        assert kernels_file != "None" and not Path(kernels_file).is_relative_to(ROOT / "kernels")
        assert _run("from kernels import get_kernel").returncode == 0
    else:  # nothing installed: an empty namespace, as for a folder without __init__.py (transformers: absent)
        assert kernels_file == "None"


def test_pytest_from_the_repository_root_collects():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_core.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


# ------------------------------------------------------------------------------------ the cache argument
def test_cache_argument_name_is_the_installed_releases():
    from transformers.models.llama.modeling_llama import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    assert compat.CACHE_KWARG in params
    assert (compat.CACHE_KWARG == "cache") == (compat.TRANSFORMERS >= Version("5.24"))


def test_cache_is_read_under_either_name():
    sentinel = object()
    assert compat.cache_in({"cache": sentinel}) is sentinel
    assert compat.cache_in({"past_key_values": sentinel}) is sentinel
    assert compat.cache_in({"cache": None, "past_key_values": sentinel}) is sentinel
    assert compat.cache_in({}) is None
    model = build("llava")
    with torch.no_grad():
        out = model(**make_inputs(model, ROWS[:1]), use_cache=True)
    cache = compat.cache_out(out)
    assert cache is not None and cache.get_seq_length() == make_inputs(model, ROWS[:1])["input_ids"].shape[1]


@pytest.mark.skipif(compat.TRANSFORMERS < Version("5.24"), reason="one argument name before 5.24")
def test_the_deprecated_cache_name_still_decodes_pruned():
    """5.24+ still accepts ``past_key_values=`` (renamed by a decorator after vtprune's pre-hooks ran)."""
    model = build("llava")
    inputs = make_inputs(model, ROWS[:1])
    runs = []
    with vtprune.prune(model, "kcenter", ratio=0.5), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("cache", "past_key_values"):
            out = model(**inputs, use_cache=True)
            cache, logits = compat.cache_out(out), [out.logits[:, -1]]
            for _ in range(2):
                out = model(input_ids=logits[-1].argmax(-1)[:, None], **{name: cache}, use_cache=True)
                logits.append(out.logits[:, -1])
            runs.append(torch.stack(logits))
    assert torch.equal(runs[0], runs[1])


def test_releases_outside_the_supported_range(monkeypatch):
    monkeypatch.setattr(compat, "TRANSFORMERS", Version("5.18.0"))
    with pytest.raises(RuntimeError, match=r"transformers >= 5.19 \(installed: 5.18.0\).*5.19 ... 5.25"):
        compat.check_transformers()
    monkeypatch.setattr(compat, "TRANSFORMERS", Version("5.26.1"))
    with pytest.warns(UserWarning, match="5.26.1 is newer than the releases vtprune was tested on"):
        compat.check_transformers()
    monkeypatch.setattr(compat, "TRANSFORMERS", Version("5.25.3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.check_transformers()


# ------------------------------------------------------------------------------------ threads
def test_first_use_from_several_threads():
    """The method registry fills itself on first use; other threads used to see it half-filled ("Unknown
    method 'kcenter'. Available: ."). Fresh interpreters, eight threads each."""
    code = ("import threading, vtprune\n"
            "errors = []\n"
            "def go():\n"
            "    try:\n"
            "        vtprune.method('kcenter'); vtprune.method('fastv')\n"
            "    except Exception as e:\n"
            "        errors.append(repr(e))\n"
            "ts = [threading.Thread(target=go) for _ in range(8)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(errors)\n")
    for _ in range(3):
        out = _run(code)
        assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]
