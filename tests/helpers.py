"""Helpers shared by the tests of every layer (importable as ``helpers``: pyproject.toml puts tests/
on pytest's ``pythonpath``).

* ``ROOT``: the repository root.
* ``bits``, ``snapshot``, ``assert_identical``: the one bit-exact "this model is unchanged" check.
* ``TinyNet``, ``make_model``, ``wrong_label``: the small BatchNorm CNN most editing tests use.
* ``require_extension``: skip (fail in CI) where the compiled extension ``fastedit._C`` is absent.
* ``encode_image``, ``write_jpeg_zip``: tiny files in the layout of the real CIFAR-10 JPEG archive.
"""
from __future__ import annotations

import io
import json
import os
import pathlib
import zipfile

import numpy as np
import pytest
import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# bit-exact model comparison
# ------------------------------------------------------------------------------------------------

_INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit pattern as a view of the integer dtype of the same width (complex: of its
    real and imaginary parts); other dtypes as they are. Unlike ``torch.equal`` on the values,
    ``torch.equal`` on these tells NaN payloads apart and -0.0 from 0.0, and a NaN equals itself."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        return t.view(_INT_OF_WIDTH[t.element_size()])
    return t


class Snapshot(dict):
    """``{state-dict key: a clone of the tensor}``, plus ``training`` and ``requires_grad`` (lists of
    (name, flag) pairs) and ``layout`` (``{key: (strides, data_ptr)}``, or None)."""

    training: list
    requires_grad: list
    layout: dict | None


def snapshot(model: nn.Module, *, layout: bool = False) -> Snapshot:
    """What a "the model is unchanged" check compares: a clone of every state-dict tensor, each
    module's ``training`` flag and each parameter's ``requires_grad`` (by name); with ``layout=True``
    also every state-dict tensor's strides and ``data_ptr`` (its memory format and storage)."""
    state = model.state_dict()
    snap = Snapshot((k, v.detach().clone()) for k, v in state.items())
    snap.training = [(n, m.training) for n, m in model.named_modules()]
    snap.requires_grad = [(n, p.requires_grad) for n, p in model.named_parameters()]
    snap.layout = {k: (v.stride(), v.data_ptr()) for k, v in state.items()} if layout else None
    return snap


def assert_identical(model: nn.Module, snap: Snapshot) -> None:
    """``model`` is bit for bit what ``snapshot`` saw: the same state-dict keys, shapes, dtypes and
    bits, training flags and requires_grad; and the same strides and storage if the snapshot has them."""
    now = model.state_dict()
    assert now.keys() == snap.keys(), "state-dict keys changed"
    for k, v in snap.items():
        assert now[k].shape == v.shape and now[k].dtype == v.dtype, f"{k}: shape or dtype changed"
        assert torch.equal(bits(now[k]), bits(v)), f"{k}: bits changed"
    if snap.layout is not None:
        for k, (stride, ptr) in snap.layout.items():
            assert now[k].stride() == stride and now[k].data_ptr() == ptr, f"{k}: strides or memory changed"
    assert [(n, m.training) for n, m in model.named_modules()] == snap.training, "a training flag changed"
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == snap.requires_grad, \
        "a requires_grad changed"


# ------------------------------------------------------------------------------------------------
# the small CNN of the editing tests
# ------------------------------------------------------------------------------------------------

class TinyNet(nn.Module):
    """Conv-BN trunk, a middle block and a head: enough structure for prefixes and BatchNorm."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(24, 16)
        self.out = nn.Linear(16, 10)
        self.to(dtype)

    def forward(self, x):
        h = self.pool(self.block(self.stem(x))).flatten(1)
        return self.out(torch.relu(self.head(h)))


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = TinyNet(dtype)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8, dtype=dtype))
    model.eval()
    return model


def wrong_label(model, x):
    with torch.no_grad():
        return (model(x).argmax(-1) + 3) % 10


# ------------------------------------------------------------------------------------------------
# the compiled extension
# ------------------------------------------------------------------------------------------------

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def require_extension() -> None:
    from fastedit.ops import _extension as ext

    if ext.load() is not None:
        return
    reason = ext.unavailable_reason()
    switched_off = any(_flag(var) for var in ext.DISABLE_ENV_VARS)
    if os.environ.get("CI", "").lower() == "true" and not switched_off:
        pytest.fail(f"fastedit._C not built in CI (a missing extension must not skip here): {reason}")
    pytest.skip(f"fastedit._C not built: {reason}")


# ------------------------------------------------------------------------------------------------
# tiny data files
# ------------------------------------------------------------------------------------------------

def encode_image(arr, fmt="JPEG"):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_jpeg_zip(path, n_train=3, n_test=5, seed=2, shuffle_members=True):
    """A tiny zip in the layout of cifar10-jpeg.zip. Returns {split: (encoded bytes list, labels)}."""
    from fastedit.data import CIFAR10_CLASSES

    rng = np.random.default_rng(seed)
    content = {}
    members = []
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for i in range(n):
            # smooth-ish image (so JPEG keeps it recognisable) with a per-index brightness
            base = np.linspace(0, 200, 32, dtype=np.float64)
            img = (base[None, :, None] * np.array([1.0, 0.5, 0.2]) + 5 * i).clip(0, 255)
            img = np.broadcast_to(img, (32, 32, 3)).astype(np.uint8).copy()
            img[i % 32, :, :] = 255 - img[i % 32, :, :]
            blob = encode_image(img)
            blobs.append(blob)
            members.append((f"{split}/{i:05d}.jpg", blob))
        labels = [int(v) for v in rng.integers(0, 10, n)]
        content[split] = (blobs, labels)
        members.append((f"{split}_labels.json", json.dumps(labels).encode()))
    members.append(("classes.json", json.dumps(list(CIFAR10_CLASSES)).encode()))
    if shuffle_members:
        order = rng.permutation(len(members))
        members = [members[i] for i in order]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, blob in members:
            zf.writestr(name, blob)
    return content
