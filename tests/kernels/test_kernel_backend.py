"""Backend dispatch: "auto" / "torch" / "triton", $VTPRUNE_BACKEND, and life without Triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import vtprune.kernels as K
from vtprune.kernels import _backend


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("VTPRUNE_BACKEND", raising=False)
    return monkeypatch


def small_gather_inputs():
    hidden = torch.randn(2, 8, 4)
    index = torch.tensor([[0, 3, 5], [1, 1, 7]])
    valid = torch.tensor([[True, True, True], [False, True, True]])
    return hidden, index, valid


def test_auto_is_torch_on_cpu(no_env):
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert _backend.resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend='cuda'"):
        _backend.resolve_backend("cuda", torch.device("cpu"))


def test_auto_is_triton_on_cuda_when_installed(no_env):
    expect = "triton" if _backend.triton_available() else "torch"
    assert _backend.resolve_backend("auto", torch.device("cuda")) == expect


def test_env_overrides_auto_only(no_env):
    pytest.importorskip("triton")
    no_env.setenv("TRITON_INTERPRET", "1")
    no_env.setenv("VTPRUNE_BACKEND", "triton")
    assert _backend.resolve_backend("auto", torch.device("cpu")) == "triton"
    assert _backend.resolve_backend("torch", torch.device("cpu")) == "torch"  # an explicit choice wins
    no_env.setenv("VTPRUNE_BACKEND", "torch")
    assert _backend.resolve_backend("auto", torch.device("cuda")) == "torch"
    no_env.setenv("VTPRUNE_BACKEND", "fast")
    with pytest.raises(ValueError, match="VTPRUNE_BACKEND"):
        _backend.resolve_backend("auto", torch.device("cpu"))


def test_env_routes_every_op_to_triton(no_env):
    """With VTPRUNE_BACKEND=triton, backend="auto" calls reach the Triton launchers (spied on)."""
    pytest.importorskip("triton")
    from vtprune.kernels import attention_rows_triton, gather_triton, greedy_triton

    calls: list[str] = []

    def spy(module, name):
        real = getattr(module, name)
        no_env.setattr(module, name, lambda *a, **kw: calls.append(name) or real(*a, **kw))

    spy(gather_triton, "gather_sequence_triton")
    spy(attention_rows_triton, "attention_rows_triton")
    spy(greedy_triton, "greedy_kcenter_triton")
    no_env.setenv("VTPRUNE_BACKEND", "triton")
    hidden, index, valid = small_gather_inputs()
    K.gather_sequence(hidden, index, valid)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 8, 16)
    K.attention_rows(q, k, scale=0.25, key_valid=torch.ones(1, 8, dtype=torch.bool))
    K.greedy_kcenter(torch.randn(1, 8, 4), 3, torch.zeros(1, dtype=torch.long))
    assert calls == ["gather_sequence_triton", "attention_rows_triton", "greedy_kcenter_triton"]
    no_env.setenv("VTPRUNE_BACKEND", "torch")
    K.gather_sequence(hidden, index, valid)
    assert len(calls) == 3


def test_missing_triton(no_env):
    no_env.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    assert not _backend.triton_available()
    hidden, index, valid = small_gather_inputs()
    assert _backend.resolve_backend("auto", torch.device("cuda")) == "torch"
    out = K.gather_sequence(hidden, index, valid)  # auto -> torch, works
    assert torch.equal(out.hidden, K.gather_sequence_ref(hidden, index, valid).hidden)
    with pytest.raises(ImportError, match="needs the `triton` package"):
        K.gather_sequence(hidden, index, valid, backend="triton")
    no_env.setenv("VTPRUNE_BACKEND", "triton")
    with pytest.raises(ImportError, match="triton"):
        K.greedy_kcenter(torch.randn(1, 8, 4), 2, torch.zeros(1, dtype=torch.long))


def test_triton_on_cpu_needs_the_interpreter(no_env):
    pytest.importorskip("triton")
    no_env.setenv("TRITON_INTERPRET", "0")
    hidden, index, valid = small_gather_inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.gather_sequence(hidden, index, valid, backend="triton")


def test_import_has_no_triton_side_effects():
    """`import vtprune.kernels` imports no Triton and decorates no kernel; works with Triton absent."""
    code = textwrap.dedent("""
        import sys
        import vtprune.kernels as K
        assert "triton" not in sys.modules, "importing vtprune.kernels imported triton"
        assert not [m for m in sys.modules if m.startswith("vtprune.kernels.") and m.endswith("_triton")]
        sys.modules["triton"] = None  # now behave as if triton were not installed
        import torch
        h = torch.randn(1, 5, 3)
        out = K.gather_sequence(h, torch.tensor([[4, 0]]), torch.tensor([[True, True]]))
        assert torch.equal(out.hidden, h[:, [4, 0]])
        try:
            K.gather_sequence(h, torch.tensor([[4, 0]]), torch.tensor([[True, True]]), backend="triton")
        except ImportError as e:
            print("ok:", e)
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "VTPRUNE_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok:")


def test_kernels_decorated_for_cuda_refuse_cpu_tensors(no_env):
    pytest.importorskip("triton")
    from vtprune.kernels import gather_triton

    no_env.setattr(gather_triton, "INTERPRETED", False)  # as if first used without TRITON_INTERPRET
    hidden, index, valid = small_gather_inputs()
    with pytest.raises(RuntimeError, match="compiled for CUDA"):
        K.gather_sequence(hidden, index, valid, backend="triton")
