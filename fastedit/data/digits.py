"""scikit-learn's bundled 8x8 handwritten digits (no download needed), with a fixed split."""
from __future__ import annotations

import numpy as np
import torch

from .common import check_split


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``(train_indices, test_indices)``, each sorted ascending.

    For each class (in increasing label order) the class's indices are shuffled with
    ``numpy.random.default_rng(seed)`` and the first ``round(count * test_fraction)`` go to test.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        test.append(idx[: int(round(idx.size * test_fraction))])
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def load_digits(split: str = "train", test_fraction: float = 0.25,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 greyscale digits bundled with scikit-learn, split deterministically.

    Pixel values 0..16 are scaled to ``uint8`` 0..255 by ``v * 255 // 16``. The split is
    stratified by class (see :func:`stratified_split`), depends only on ``test_fraction`` and
    ``seed``, and keeps the original order within each part; train and test are disjoint and
    together cover the whole set. Requires scikit-learn.

    Returns ``(images uint8 [N, 8, 8], labels int64 [N])``.
    """
    check_split(split)
    from .._optional import require
    bunch = require("sklearn.datasets", "load_digits (the bundled digits)", "data").load_digits()
    raw = np.asarray(bunch.images)
    values = np.rint(raw).astype(np.int64)
    if values.min() < 0 or values.max() > 16 or not np.array_equal(values, raw):
        raise ValueError("unexpected pixel values in sklearn digits (expected integers 0..16)")
    images = (values * 255 // 16).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(labels, test_fraction, seed)
    idx = train_idx if split == "train" else test_idx
    return torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx])
