"""``load_dataset``: one entry point that finds a dataset's local files by name."""
from __future__ import annotations

import os
import pathlib

from . import cifar, digits, mnist
from .common import check_limit, check_split, logger

DATASET_NAMES = ("cifar10", "cifar10-lossless", "cifar10-jpeg", "mnist", "digits")


def _data_dir(data_dir) -> pathlib.Path:
    if data_dir is None:
        value = os.environ.get("FASTEDIT_DATA")
        if not value:
            raise FileNotFoundError("no data_dir given and $FASTEDIT_DATA is not set: pass the folder "
                                    "holding cifar10/ and mnist/")
        data_dir = value
    return pathlib.Path(data_dir).expanduser()


def _first_file(candidates: list[pathlib.Path]) -> pathlib.Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _pickle_candidates(d: pathlib.Path) -> list[pathlib.Path]:
    return [d / cifar.PICKLE_FOLDER, d / "cifar10" / cifar.PICKLE_FOLDER]


def _lossless_candidates(d: pathlib.Path) -> list[pathlib.Path]:
    return [d / "cifar10" / cifar.LOSSLESS_NPZ_NAME, d / cifar.LOSSLESS_NPZ_NAME]


def _jpeg_candidates(d: pathlib.Path) -> list[pathlib.Path]:
    return [d / "cifar10" / cifar.JPEG_ZIP_NAME, d / cifar.JPEG_ZIP_NAME]


def load_dataset(name: str, data_dir=None, split: str = "test", limit: int | None = None, *,
                 cache_dir=None, progress: bool = True, return_info: bool = False):
    """Load a dataset by name from local files; returns ``(images, labels)``.

    ``name``:

    * ``"cifar10"``: the first available of (1) a ``cifar-10-batches-py`` folder (exact pixels,
      full splits), (2) for ``split="test"`` only, the lossless npz -- exact pixels but only the
      **first 1,017** test images, not 10,000 -- and (3) the JPEG zip (all images, lossy pixels).
      Which one was used is logged (logger ``fastedit.data``, level INFO) and given in the info
      dict when ``return_info=True``. Ask for ``"cifar10-jpeg"`` explicitly to get all 10,000
      test images when only the npz and the zip are present.
    * ``"cifar10-lossless"``: ``cifar10_lossless_subset.npz`` (8,068 train / 1,017 test images).
    * ``"cifar10-jpeg"``: ``cifar10-jpeg.zip`` (decoded once, cached; see
      :func:`~fastedit.data.load_cifar10_jpeg_zip`, which receives ``cache_dir`` and ``progress``).
    * ``"mnist"``: the idx files (in ``data_dir``, ``data_dir/mnist`` or ``data_dir/MNIST/raw``).
    * ``"digits"``: scikit-learn's bundled digits (``data_dir`` unused).

    CIFAR files are looked for in ``data_dir/cifar10/`` and in ``data_dir`` itself. ``data_dir``
    defaults to ``$FASTEDIT_DATA``. ``limit`` keeps the first ``limit`` items of the split.
    With ``return_info=True`` the result is ``(images, labels, info)``, ``info`` a dict with
    ``name``, ``source``, ``path``, ``split`` and ``count``.

    Raises ``FileNotFoundError`` naming the paths it tried when nothing is found, ``ValueError``
    for an unknown name or split.
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASET_NAMES}")
    check_split(split)
    limit = check_limit(limit)
    source = name
    path: pathlib.Path | None = None

    if name == "digits":
        images, labels = digits.load_digits(split)
    else:
        d = _data_dir(data_dir)
        tried: list[pathlib.Path] = []
        if name == "mnist":
            images, labels = mnist.load_mnist(d, split)
            path = d
        elif name == "cifar10-lossless":
            tried = _lossless_candidates(d)
            path = _first_file(tried)
        elif name == "cifar10-jpeg":
            tried = _jpeg_candidates(d)
            path = _first_file(tried)
        else:  # "cifar10": pick the best available source
            for cand in _pickle_candidates(d):
                tried.append(cand)
                needed = cand / ("test_batch" if split == "test" else "data_batch_1")
                if needed.is_file():
                    path, source = cand, "cifar10-pickle"
                    break
            if path is None and split == "test":
                tried += _lossless_candidates(d)
                path = _first_file(_lossless_candidates(d))
                source = "cifar10-lossless"
            if path is None:
                tried += _jpeg_candidates(d)
                path = _first_file(_jpeg_candidates(d))
                source = "cifar10-jpeg"
        if name != "mnist":
            if path is None:
                raise FileNotFoundError(f"dataset {name!r} (split {split!r}) not found under {d}; "
                                        "looked for: " + ", ".join(str(t) for t in tried))
            if source == "cifar10-pickle":
                images, labels = cifar.load_cifar10_pickle(path, split)
            elif source == "cifar10-lossless":
                images, labels = cifar.load_cifar10_lossless(path, split)
            else:
                images, labels = cifar.load_cifar10_jpeg_zip(path, split, cache_dir=cache_dir,
                                                             limit=limit, progress=progress)
    if limit is not None and limit < images.shape[0]:
        images, labels = images[:limit].clone(), labels[:limit].clone()
    info = {"name": name, "source": source, "path": None if path is None else str(path),
            "split": split, "count": int(images.shape[0])}
    logger.info("loaded %s %s split: %d items from %s (%s)", name, split, info["count"],
                info["path"] or "scikit-learn", source)
    if name == "cifar10" and source == "cifar10-lossless":
        logger.info("cifar10 test from the lossless subset: only the first 1,017 of 10,000 test images")
    if limit is not None and limit > images.shape[0]:
        logger.warning("%s %s: limit %d but only %d items available", name, split, limit, images.shape[0])
    if return_info:
        return images, labels, info
    return images, labels


__all__ = ["DATASET_NAMES", "load_dataset"]
