"""CIFAR-10 loaders for three local formats: the python-pickle batches, a JPEG zip, a lossless npz.

All return ``(images, labels)``: ``uint8 [N, 32, 32, 3]`` (RGB, HWC) and ``int64 [N]``, in the
official CIFAR-10 order. Nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import tempfile
import zipfile

import numpy as np
import torch

from .common import check_limit, check_split, default_cache_dir, logger

PICKLE_FOLDER = "cifar-10-batches-py"
JPEG_ZIP_NAME = "cifar10-jpeg.zip"
LOSSLESS_NPZ_NAME = "cifar10_lossless_subset.npz"

_CIFAR_PIXELS = 3 * 32 * 32


# --------------------------------------------------------------------------------------------
# python-pickle batches
# --------------------------------------------------------------------------------------------

# The only globals a CIFAR-10 batch pickle needs: numpy's array/dtype reconstruction helpers
# (module paths of numpy 1.x and 2.x), plus ``_codecs.encode``, which Python 3 uses to write
# ``bytes`` in protocol-2 pickles (re-pickled copies of the batches). Anything else is refused.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray",
                   "numpy.core.numeric", "numpy._core.numeric", "numpy")
    for name in ("_reconstruct", "ndarray", "dtype", "_frombuffer", "scalar")
} | {("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load global {module}.{name}: not part of the CIFAR-10 batch format")


def _unpickle_batch(path: pathlib.Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def _batch_arrays(path: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle_batch(path)

    def get(key: str):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
        raise ValueError(f"{path}: missing key {key!r} (keys: {sorted(map(repr, d))})")

    data = np.asarray(get("data"))
    labels = np.asarray(get("labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(f"{path}: 'data' must be uint8 [N, {_CIFAR_PIXELS}], "
                         f"got {data.dtype} {list(data.shape)}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)     # CHW-planar -> HWC
    return images, labels.astype(np.int64)


def find_cifar10_pickle_dir(root) -> pathlib.Path | None:
    """``root`` itself if it holds the batch files, else ``root/cifar-10-batches-py``, else None."""
    root = pathlib.Path(root).expanduser()
    for cand in (root, root / PICKLE_FOLDER):
        if (cand / "test_batch").is_file() or (cand / "data_batch_1").is_file():
            return cand
    return None


def load_cifar10_pickle(root, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 from the official python-pickle folder ``cifar-10-batches-py``.

    ``root`` is that folder or its parent. ``split="test"`` reads ``test_batch``; ``"train"``
    reads ``data_batch_1``, ``data_batch_2``, ... in order (the official folder has five; a folder
    with fewer consecutive batches is accepted with a warning). Each batch is a pickled dict with
    ``b"data"`` (uint8 ``[n, 3072]``, each row the R, G, B planes of a 32x32 image) and
    ``b"labels"``.

    Security: the format *is* a pickle, so it is read with the pickle protocol
    (equivalent to ``pickle.load(f, encoding="bytes")``), but through an unpickler that only
    resolves the numpy array/dtype constructors the format needs and refuses every other global,
    so a crafted file cannot call arbitrary functions. Still, only load files you trust.

    Returns ``(images uint8 [N, 32, 32, 3], labels int64 [N])``. Raises ``FileNotFoundError`` if
    the folder or a batch is missing, ``ValueError`` for malformed or truncated batches.
    """
    check_split(split)
    folder = find_cifar10_pickle_dir(root)
    if folder is None:
        raise FileNotFoundError(
            f"no CIFAR-10 pickle batches in {root} or {pathlib.Path(root) / PICKLE_FOLDER} "
            f"(looked for test_batch / data_batch_1)")
    if split == "test":
        paths = [folder / "test_batch"]
        if not paths[0].is_file():
            raise FileNotFoundError(f"{paths[0]} not found")
    else:
        paths = []
        k = 1
        while (folder / f"data_batch_{k}").is_file():
            paths.append(folder / f"data_batch_{k}")
            k += 1
        if not paths:
            raise FileNotFoundError(f"{folder / 'data_batch_1'} not found")
        extra = sorted(p.name for p in folder.glob("data_batch_*")
                       if p.name not in {q.name for q in paths})
        if extra:
            raise ValueError(f"{folder}: batches {extra} present but not consecutive from data_batch_1")
        if len(paths) != 5:
            logger.warning("%s: found %d training batches (the official folder has 5)", folder, len(paths))
    parts = [_batch_arrays(p) for p in paths]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else np.ascontiguousarray(parts[0][0])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


# --------------------------------------------------------------------------------------------
# lossless npz subset
# --------------------------------------------------------------------------------------------

def load_cifar10_lossless(path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Load the lossless CIFAR-10 subset npz (``x_train``, ``y_train``, ``x_test``, ``y_test``).

    ``path`` is the ``.npz`` file, or a folder holding ``cifar10_lossless_subset.npz`` (directly
    or under ``cifar10/``). The shared file holds 8,068 training images (a subset, see its
    ``train_index``) and the *first 1,017* images of the official test set, with original
    pixels. Read with ``allow_pickle=False``.

    Returns ``(images uint8 [N, H, W, 3], labels int64 [N])``.
    """
    check_split(split)
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
        for cand in (p / LOSSLESS_NPZ_NAME, p / "cifar10" / LOSSLESS_NPZ_NAME):
            if cand.is_file():
                p = cand
                break
        else:
            raise FileNotFoundError(f"no {LOSSLESS_NPZ_NAME} in {p} or {p / 'cifar10'}")
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found")
    try:
        with np.load(p, allow_pickle=False) as z:
            kx, ky = f"x_{split}", f"y_{split}"
            missing = [k for k in (kx, ky) if k not in z.files]
            if missing:
                raise ValueError(f"{p}: missing arrays {missing} (has {z.files})")
            x = z[kx]
            y = z[ky]
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{p}: not a readable npz ({exc})") from exc
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{p}: {kx} must be uint8 [N, H, W, 3], got {x.dtype} {list(x.shape)}")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{p}: {ky} must be integer [{x.shape[0]}], got {y.dtype} {list(y.shape)}")
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))


# --------------------------------------------------------------------------------------------
# JPEG zip, decoded once and cached
# --------------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _decode_image(data: bytes) -> np.ndarray:
    """Decode one encoded image to an ``uint8 [H, W, 3]`` RGB array with Pillow."""
    from .._optional import require
    Image = require("PIL.Image", "reading JPEG datasets")

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _jpeg_cache_path(path: pathlib.Path, split: str, limit: int | None,
                     cache_dir: pathlib.Path) -> tuple[pathlib.Path, str]:
    import PIL

    st = path.stat()
    key = "|".join([str(path.resolve()), str(st.st_size), str(st.st_mtime_ns), split,
                    "all" if limit is None else str(limit), "pillow-" + PIL.__version__, "v1"])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    name = f"cifar10-jpeg-{split}-{'all' if limit is None else limit}-{digest}.npz"
    return cache_dir / name, key


def _read_cache(cache_file: pathlib.Path, key: str):
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            images, labels = z["images"], z["labels"]
    except Exception as exc:  # a broken cache is never fatal: decode again
        logger.warning("ignoring unreadable cache %s (%s)", cache_file, exc)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        logger.warning("ignoring malformed cache %s", cache_file)
        return None
    return images, labels


def _write_cache(cache_file: pathlib.Path, key: str, images: np.ndarray, labels: np.ndarray) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_file.stem + ".", suffix=".tmp.npz", dir=cache_file.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, labels=labels, key=np.array(key))
            os.replace(tmp, cache_file)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        logger.warning("could not write cache %s (%s); continuing without it", cache_file, exc)


def _zip_members(zf: zipfile.ZipFile, split: str, zpath) -> tuple[list[str], str]:
    """Image member names of ``split`` in index order, and the labels member name."""
    names = zf.namelist()
    label_name = f"{split}_labels.json"
    label_members = [n for n in names if n == label_name or n.endswith("/" + label_name)]
    if len(label_members) != 1:
        raise ValueError(f"{zpath}: expected one {label_name} in the zip, found {len(label_members)}")
    prefix = label_members[0][: -len(label_name)] + split + "/"
    pattern = re.compile(re.escape(prefix) + r"(\d+)(\.[A-Za-z]+)$")
    found = []
    for n in names:
        m = pattern.match(n)
        if m and m.group(2).lower() in _IMAGE_SUFFIXES:
            found.append((int(m.group(1)), n))
    found.sort()
    indices = [i for i, _ in found]
    if indices != list(range(len(indices))):
        raise ValueError(f"{zpath}: images under {prefix} are not numbered 0..{len(indices) - 1} "
                         f"without gaps or duplicates")
    return [n for _, n in found], label_members[0]


def load_cifar10_jpeg_zip(path, split: str = "test", cache_dir=None, limit: int | None = None,
                          progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10 from the JPEG zip (``train/00000.jpg`` ..., ``test/...``, ``*_labels.json``).

    Images are decoded with Pillow to RGB once; the decoded arrays are then cached as an
    uncompressed ``.npz`` in ``cache_dir`` (default ``$FASTEDIT_CACHE`` or ``~/.cache/fastedit``).
    The cache entry is keyed by the zip's resolved path, size and modification time, the split,
    ``limit`` and the Pillow version, so a second call reads the cache without opening the zip;
    a changed zip gets a new entry (old entries are not deleted). An unwritable cache folder only
    logs a warning. ``limit`` keeps the first ``limit`` images of the split (official order).
    ``progress`` shows a tqdm bar while decoding.

    JPEG is lossy: these pixels differ from the original CIFAR-10 (mean abs error ~5.8/255 for the
    shared file), so train and evaluate on the same version.

    Returns ``(images uint8 [N, H, W, 3], labels int64 [N])``. Raises ``FileNotFoundError`` if the
    zip is missing and ``ValueError`` if it is malformed (bad zip, missing labels, numbering gaps,
    label/image count mismatch, images of different sizes).
    """
    check_split(split)
    limit = check_limit(limit)
    zpath = pathlib.Path(path).expanduser()
    if not zpath.is_file():
        raise FileNotFoundError(f"CIFAR-10 JPEG zip {zpath} not found")
    cache_root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache_file, key = _jpeg_cache_path(zpath, split, limit, cache_root)
    cached = _read_cache(cache_file, key)
    if cached is not None:
        logger.debug("CIFAR-10 %s from cache %s", split, cache_file)
        return torch.from_numpy(cached[0]), torch.from_numpy(cached[1].astype(np.int64))

    try:
        zf = zipfile.ZipFile(zpath)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{zpath}: not a zip file ({exc})") from exc
    with zf:
        members, label_member = _zip_members(zf, split, zpath)
        try:
            labels = np.asarray(json.loads(zf.read(label_member)), dtype=np.int64)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{zpath}: {label_member} is not a JSON list of ints ({exc})") from exc
        if labels.ndim != 1 or labels.shape[0] != len(members):
            raise ValueError(f"{zpath}: {label_member} has {labels.size} labels "
                             f"but the zip has {len(members)} {split} images")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{zpath}: {label_member} has labels outside 0..9")
        n = len(members) if limit is None else min(limit, len(members))
        members, labels = members[:n], labels[:n]
        try:
            from tqdm import tqdm
        except ImportError:  # tqdm is optional
            def tqdm(it, **_):
                return it
        images = None
        for i, name in enumerate(tqdm(members, desc=f"decoding CIFAR-10 {split}", unit="img",
                                      disable=not progress)):
            try:
                arr = _decode_image(zf.read(name))
            except (OSError, zipfile.BadZipFile, SyntaxError) as exc:
                raise ValueError(f"{zpath}: cannot decode {name} ({exc})") from exc
            if images is None:
                images = np.empty((n,) + arr.shape, dtype=np.uint8)
            elif arr.shape != images.shape[1:]:
                raise ValueError(f"{zpath}: {name} is {arr.shape}, expected {images.shape[1:]}")
            images[i] = arr
    if images is None:
        images = np.empty((0, 32, 32, 3), dtype=np.uint8)
    _write_cache(cache_file, key, images, labels)
    return torch.from_numpy(images), torch.from_numpy(labels)
