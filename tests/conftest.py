"""Shared fixtures: where the real data and pretrained models are (if this machine has them)."""
import os

# Triton kernels are tested on CPU tensors through the interpreter, which must be chosen before
# any @triton.jit function is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
import importlib.util
import operator
import pathlib
import types

import pytest
import torch


def triton_interpreter_numpy_compat() -> bool:
    """Make the Triton interpreter's scalar-to-int conversion work with every NumPy; returns whether
    it had to be patched.

    In the interpreter a scalar kernel argument is a 1-element array. Where a kernel uses one as a
    Python int (``for c0 in range(0, C, BLOCK_C)``), Triton 3.6 (the version torch 2.11 pins) calls
    ``int()`` on that array, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted to
    Python scalars"; deprecated since NumPy 1.25), so every interpreted launch of such a kernel fails
    there; Triton 3.9 squeezes the array first. A probe runs this interpreter's tensor patch on a
    stand-in class: only if its ``__index__`` fails on a 1-element array is the patch wrapped so that
    ``__index__`` reads the element (``int(data.item())``, the same value); otherwise nothing changes.
    Compiled kernels never do this conversion: it is a test-only concern, hence here."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return False
    import numpy as np
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None:  # another interpreter layout: leave it alone
        return False

    class _Scope:  # the part of interpreter._LangPatchScope the patch uses
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class _Tensor:
        pass

    probe = _Tensor()
    probe.handle = types.SimpleNamespace(data=np.array([3], dtype=np.int32))
    try:
        patch(_Tensor, _Scope())
        if operator.index(probe) == 3:
            return False
    except TypeError:
        pass  # the NumPy >= 2.4 refusal
    except Exception:  # an interpreter this probe does not understand: leave it alone
        return False

    def patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        # recorded by the scope like the original patch, so it is undone after each launch too
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


TRITON_INTERPRETER_PATCHED = triton_interpreter_numpy_compat()



def _dir_from_env(var: str) -> pathlib.Path | None:
    value = os.environ.get(var)
    return pathlib.Path(value) if value and pathlib.Path(value).is_dir() else None


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """`$FASTEDIT_DATA` (CI sets it); skips the test when it is not set or not a folder."""
    path = _dir_from_env("FASTEDIT_DATA")
    if path is None:
        pytest.skip("real data not found: set FASTEDIT_DATA to the folder holding cifar10/ and mnist/")
    return path


@pytest.fixture(scope="session")
def shared_models_dir() -> pathlib.Path:
    """`$FASTEDIT_MODELS` (CI sets it); skips the test when it is not set or not a folder."""
    path = _dir_from_env("FASTEDIT_MODELS")
    if path is None:
        pytest.skip("pretrained models not found: set FASTEDIT_MODELS to the folder of resnet*.th")
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads cost more than they give on a 2-core machine (one thread, restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


REAL_DATA_FIXTURES = frozenset({"shared_data_dir", "shared_models_dir"})


def pytest_collection_modifyitems(config, items):
    """Every test that uses the real data or the pretrained models (directly or through another
    fixture) gets the ``real_data`` marker, so that ``-m "not real_data"`` leaves them out."""
    for item in items:
        if REAL_DATA_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_data)
