"""tests/conftest.py's Triton-interpreter compatibility helper: with an interpreter whose scalar
``__index__`` is Triton 3.6's ``int(self.handle.data)`` and a NumPy that refuses ``int()`` of a
1-element array (2.4 and later), a kernel looping ``for c0 in range(0, C, BLOCK)`` fails; with the
helper it runs and gives the right value; a working interpreter is left alone."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import triton_interpreter_numpy_compat

HAS_INTERPRETER = importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not HAS_INTERPRETER, reason="triton missing or TRITON_INTERPRET != 1")

NUMPY_REFUSES = tuple(int(v) for v in np.__version__.split(".")[:2]) >= (2, 4)

if HAS_INTERPRETER:
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def _row_sum_kernel(x_ptr, out_ptr, C, BLOCK: tl.constexpr):
        # the pattern of fastedit's edit_metrics kernel: a loop bound that is a runtime scalar
        acc = tl.zeros([BLOCK], tl.float64)
        for c0 in range(0, C, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + cols, mask=cols < C, other=0.0)
        tl.store(out_ptr, tl.sum(acc, axis=0))


def _row_sum(x: torch.Tensor) -> float:
    out = torch.zeros(1, dtype=torch.float64)
    _row_sum_kernel[(1,)](x, out, x.numel(), BLOCK=8)
    return out.item()


@pytest.fixture
def triton_3_6_index(monkeypatch):
    """The interpreter's tensor patch with Triton 3.6's ``__index__`` (restored after the test)."""
    current = interpreter._patch_lang_tensor

    def like_triton_3_6(tensor, scope):
        current(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))  # triton 3.6, interpreter.py

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", like_triton_3_6)
    return like_triton_3_6


X = torch.arange(1, 20, dtype=torch.float64)  # 19 values over 3 chunks of 8; sum 190


def test_the_kernel_runs_in_this_session():
    assert _row_sum(X) == 190.0


@pytest.mark.skipif(not NUMPY_REFUSES, reason=f"NumPy {np.__version__} still converts 1-element arrays")
def test_triton_3_6_index_fails_with_this_numpy(triton_3_6_index):
    with pytest.raises(Exception, match="only 0-dimensional arrays can be converted"):
        _row_sum(X)


def test_helper_repairs_triton_3_6_index(triton_3_6_index):
    assert triton_interpreter_numpy_compat() is NUMPY_REFUSES  # patched exactly where it is needed
    assert (interpreter._patch_lang_tensor is triton_3_6_index) is not NUMPY_REFUSES
    before = tl.core.tensor.__dict__.get("__index__")
    assert _row_sum(X) == 190.0
    assert _row_sum(X[:5]) == 15.0  # one partial chunk
    # the repaired __index__ is undone after each launch, like the interpreter's own patches
    assert tl.core.tensor.__dict__.get("__index__") is before


def test_helper_leaves_a_working_interpreter_alone(monkeypatch):
    current = interpreter._patch_lang_tensor

    def working(tensor, scope):
        current(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", working)
    assert triton_interpreter_numpy_compat() is False
    assert interpreter._patch_lang_tensor is working
    assert _row_sum(X) == 190.0
