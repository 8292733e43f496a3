"""Shared fixtures: where the real data and pretrained models are (if this machine has them)."""
import os

# Triton kernels are tested on CPU tensors through the interpreter, which must be chosen before
# any @triton.jit function is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
import pathlib

import pytest
import torch

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dir_from_env(var: str, fallback: pathlib.Path) -> pathlib.Path | None:
    value = os.environ.get(var)
    path = pathlib.Path(value) if value else fallback
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """`$FASTEDIT_DATA` (CI sets it to ../shared/data); skips the test when absent."""
    path = _dir_from_env("FASTEDIT_DATA", _ROOT.parent / "shared" / "data")
    if path is None:
        pytest.skip("real data not found: set FASTEDIT_DATA to the folder holding cifar10/ and mnist/")
    return path


@pytest.fixture(scope="session")
def shared_models_dir() -> pathlib.Path:
    """`$FASTEDIT_MODELS` (CI sets it to ../shared/models); skips the test when absent."""
    path = _dir_from_env("FASTEDIT_MODELS", _ROOT.parent / "shared" / "models")
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
