"""MNIST from the four official idx files (gzip-compressed or raw)."""
from __future__ import annotations

import gzip
import pathlib
import struct
import zlib

import numpy as np
import torch

from .common import check_split

IDX_IMAGES_MAGIC = 2051   # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049   # 0x00000801: unsigned bytes, 1 dimension

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_bytes(path: pathlib.Path) -> bytes:
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (EOFError, OSError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({exc})") from exc
    return path.read_bytes()


def read_idx(path, expected_magic: int | None = None) -> np.ndarray:
    """Read an idx file of unsigned bytes (``.gz`` or raw) into a ``uint8`` numpy array.

    Header: a big-endian int32 magic ``0x0000 08 ND`` (``08`` = unsigned byte, ``ND`` = number
    of dimensions), then ``ND`` big-endian int32 sizes, then the data. Raises ``ValueError`` on a
    wrong magic (or one differing from ``expected_magic``), a short header, or a payload that is
    shorter or longer than the sizes say.
    """
    path = pathlib.Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an idx header ({len(data)} bytes)")
    (magic,) = struct.unpack(">i", data[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: bad magic number {magic} (expected {expected_magic})")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: bad magic number {magic}: only unsigned-byte idx files "
                         f"(magic 0x000008NN) are supported")
    ndim = magic & 0xFF
    if ndim < 1:
        raise ValueError(f"{path}: bad magic number {magic}: zero dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header ({len(data)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if any(d < 0 for d in dims):
        raise ValueError(f"{path}: negative size in header {dims}")
    expected = int(np.prod(dims, dtype=np.int64))
    got = len(data) - header
    if got < expected:
        raise ValueError(f"{path}: truncated: header {dims} needs {expected} data bytes, found {got}")
    if got > expected:
        raise ValueError(f"{path}: {got - expected} unexpected trailing bytes after {dims} items")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(root: pathlib.Path, stem: str) -> pathlib.Path:
    folders = [root, root / "mnist", root / "MNIST" / "raw"]
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise FileNotFoundError(f"MNIST file {stem}[.gz] not found in any of: "
                            + ", ".join(str(f) for f in folders))


def load_mnist(root, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST from idx files in ``root`` (also looked for in ``root/mnist``, ``root/MNIST/raw``).

    Standard names: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (``split="train"``)
    and ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (``split="test"``), each either
    raw or with ``.gz`` (the raw file wins if both exist). Checks the magic numbers (2051 images,
    2049 labels), that the images are ``[N, H, W]`` and that the two counts agree, raising a
    ``ValueError`` otherwise (also for truncated files).

    Returns ``(images uint8 [N, 28, 28], labels int64 [N])``.
    """
    check_split(split)
    root = pathlib.Path(root).expanduser()
    img_stem, lbl_stem = _FILES[split]
    img_path, lbl_path = _find(root, img_stem), _find(root, lbl_stem)
    images = read_idx(img_path, IDX_IMAGES_MAGIC)
    labels = read_idx(lbl_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: {images.shape[0]} images in {img_path} "
                         f"but {labels.shape[0]} labels in {lbl_path}")
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
