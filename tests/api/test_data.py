"""Tests of fastedit.data on small files written by the tests, plus a few on the real data."""
import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import encode_image as _encode
from helpers import write_jpeg_zip as _write_jpeg_zip
from PIL import Image

import fastedit.data as fd
from fastedit.data import cifar as cifar_mod

# ---------------------------------------------------------------------------------------------
# helpers that write tiny files in each format
# ---------------------------------------------------------------------------------------------

def _rng(seed=0):
    return np.random.default_rng(seed)


def _write_pickle_batch(path, images_hwc, labels, protocol=2):
    """Write a batch as the official files are laid out: CHW-planar rows, bytes keys."""
    data = np.ascontiguousarray(images_hwc.transpose(0, 3, 1, 2)).reshape(len(images_hwc), -1)
    obj = {b"batch_label": b"tiny batch", b"labels": [int(v) for v in labels], b"data": data,
           b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.fixture
def pickle_dir(tmp_path):
    rng = _rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = {}
    for name, n in (("data_batch_1", 3), ("data_batch_2", 2), ("test_batch", 4)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        _write_pickle_batch(folder / name, x, y)
        parts[name] = (x, y)
    return folder, parts


def _pillow_decode(data):
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _idx_bytes(arr, magic):
    arr = np.asarray(arr, dtype=np.uint8)
    return struct.pack(">i", magic) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()


def _write_mnist(folder, n_train=7, n_test=4, gz=True, seed=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        for stem, blob in ((f"{prefix}-images-idx3-ubyte", _idx_bytes(x, 2051)),
                           (f"{prefix}-labels-idx1-ubyte", _idx_bytes(y, 2049))):
            if gz:
                with gzip.open(folder / (stem + ".gz"), "wb") as f:
                    f.write(blob)
            else:
                (folder / stem).write_bytes(blob)
        out[split] = (x, y)
    return out


def _write_lossless(path, n_train=6, n_test=4, seed=4):
    rng = _rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.int64),
        "train_index": np.arange(n_train) * 3,
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.int64),
        "test_index": np.arange(n_test),
    }
    np.savez(path, **arrays)
    return arrays


def _check_pair(images, labels, shape):
    assert images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert tuple(images.shape) == shape
    assert tuple(labels.shape) == (shape[0],)
    assert images.is_contiguous()


# ---------------------------------------------------------------------------------------------
# constants
# ---------------------------------------------------------------------------------------------

def test_constants():
    assert fd.CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                  "horse", "ship", "truck")
    assert fd.CIFAR10_MEAN == (0.485, 0.456, 0.406)
    assert fd.CIFAR10_STD == (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 pickle
# ---------------------------------------------------------------------------------------------

def test_cifar_pickle_round_trip(pickle_dir):
    folder, parts = pickle_dir
    for root in (folder, folder.parent):
        x, y = fd.load_cifar10_pickle(root, "test")
        _check_pair(x, y, (4, 32, 32, 3))
        np.testing.assert_array_equal(x.numpy(), parts["test_batch"][0])
        np.testing.assert_array_equal(y.numpy(), parts["test_batch"][1])
    x, y = fd.load_cifar10_pickle(folder.parent, "train")
    _check_pair(x, y, (5, 32, 32, 3))
    np.testing.assert_array_equal(x.numpy(), np.concatenate([parts["data_batch_1"][0], parts["data_batch_2"][0]]))
    np.testing.assert_array_equal(y.numpy(), np.concatenate([parts["data_batch_1"][1], parts["data_batch_2"][1]]))


def test_cifar_pickle_planar_layout(tmp_path):
    # Row layout: R plane (1024 values, row-major), then G, then B.
    data = np.zeros((1, 3072), dtype=np.uint8)
    data[0, 0 * 1024 + 1 * 32 + 2] = 11    # R at (y=1, x=2)
    data[0, 1 * 1024 + 5 * 32 + 0] = 22    # G at (y=5, x=0)
    data[0, 2 * 1024 + 31 * 32 + 31] = 33  # B at (y=31, x=31)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": [7]}, f, protocol=2)
    x, y = fd.load_cifar10_pickle(tmp_path, "test")
    assert x[0, 1, 2, 0] == 11 and x[0, 5, 0, 1] == 22 and x[0, 31, 31, 2] == 33
    assert int(x.sum()) == 66 and y.tolist() == [7]


def test_cifar_pickle_newer_protocol_and_str_keys(tmp_path):
    x0 = _rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    data = np.ascontiguousarray(x0.transpose(0, 3, 1, 2)).reshape(2, -1)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({"data": data, "labels": [1, 2]}, f, protocol=pickle.HIGHEST_PROTOCOL)
    x, y = fd.load_cifar10_pickle(tmp_path)
    np.testing.assert_array_equal(x.numpy(), x0)
    assert y.tolist() == [1, 2]


class _Evil:
    def __reduce__(self):
        return (os.getpid, ())


def test_cifar_pickle_refuses_foreign_globals(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        fd.load_cifar10_pickle(tmp_path)


def test_cifar_pickle_errors(pickle_dir, tmp_path):
    folder, _ = pickle_dir
    with pytest.raises(FileNotFoundError):
        fd.load_cifar10_pickle(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        fd.load_cifar10_pickle(folder, "val")
    blob = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError):
        fd.load_cifar10_pickle(folder, "test")
    # wrong row length
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(ValueError, match="3072"):
        fd.load_cifar10_pickle(folder, "test")
    # labels/images count mismatch
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="labels"):
        fd.load_cifar10_pickle(folder, "test")
    # a gap in the batch numbering
    os.rename(folder / "data_batch_2", folder / "data_batch_3")
    with pytest.raises(ValueError, match="consecutive"):
        fd.load_cifar10_pickle(folder, "train")


# ---------------------------------------------------------------------------------------------
# CIFAR-10 JPEG zip
# ---------------------------------------------------------------------------------------------

def test_jpeg_zip_round_trip_and_order(tmp_path):
    zpath = tmp_path / "tiny.zip"
    content = _write_jpeg_zip(zpath)
    for split, n in (("test", 5), ("train", 3)):
        x, y = fd.load_cifar10_jpeg_zip(zpath, split, cache_dir=tmp_path / "cache", progress=False)
        _check_pair(x, y, (n, 32, 32, 3))
        blobs, labels = content[split]
        expected = np.stack([_pillow_decode(b) for b in blobs])
        np.testing.assert_array_equal(x.numpy(), expected)
        assert y.tolist() == labels
    # the images really differ from one index to the next (so order is checked above)
    assert len({bytes(im.numpy().tobytes()) for im in x}) == 3


def test_jpeg_zip_limit(tmp_path):
    zpath = tmp_path / "tiny.zip"
    content = _write_jpeg_zip(zpath)
    x_all, y_all = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path, progress=False)
    x, y = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path, limit=2, progress=False)
    _check_pair(x, y, (2, 32, 32, 3))
    assert torch.equal(x, x_all[:2]) and torch.equal(y, y_all[:2])
    x, y = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path, limit=50, progress=False)
    assert torch.equal(x, x_all) and y.tolist() == content["test"][1]
    x, y = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path, limit=0, progress=False)
    assert x.shape[0] == 0 and y.shape == (0,)
    with pytest.raises(ValueError):
        fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path, limit=-1)


def test_jpeg_zip_cache_used_on_second_call(tmp_path, monkeypatch):
    zpath = tmp_path / "tiny.zip"
    _write_jpeg_zip(zpath)
    cache = tmp_path / "cache"
    calls = []
    real_decode = cifar_mod._decode_image

    def counting(data):
        calls.append(1)
        return real_decode(data)

    monkeypatch.setattr(cifar_mod, "_decode_image", counting)
    x1, y1 = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=cache, progress=False)
    assert len(calls) == 5
    assert len(list(cache.glob("*.npz"))) == 1

    def boom(data):
        raise AssertionError("decoder called although a cache entry exists")

    monkeypatch.setattr(cifar_mod, "_decode_image", boom)
    x2, y2 = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=cache, progress=False)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # another split or limit is another cache entry
    with pytest.raises(AssertionError, match="decoder called"):
        fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=cache, limit=3, progress=False)
    # a rewritten zip (new size/mtime) is decoded again
    monkeypatch.setattr(cifar_mod, "_decode_image", counting)
    content = _write_jpeg_zip(zpath, n_test=6, seed=9)
    st = zpath.stat()
    os.utime(zpath, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls.clear()
    x3, y3 = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=cache, progress=False)
    assert len(calls) == 6 and y3.tolist() == content["test"][1]
    # a corrupt cache file is ignored (decoded again), not fatal
    for f in cache.glob("*.npz"):
        f.write_bytes(b"garbage")
    calls.clear()
    x4, _ = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=cache, progress=False)
    assert len(calls) == 6 and torch.equal(x3, x4)


def test_jpeg_zip_default_cache_dir_from_env(tmp_path, monkeypatch, capsys):
    zpath = tmp_path / "tiny.zip"
    _write_jpeg_zip(zpath)
    monkeypatch.setenv("FASTEDIT_CACHE", str(tmp_path / "envcache"))
    assert fd.default_cache_dir() == tmp_path / "envcache"
    fd.load_cifar10_jpeg_zip(zpath, "train", progress=True)   # progress bar must not break anything
    assert len(list((tmp_path / "envcache").glob("*.npz"))) == 1


def test_jpeg_zip_png_members_are_lossless(tmp_path):
    rng = _rng(7)
    imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    zpath = tmp_path / "png.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for i, im in enumerate(imgs):
            zf.writestr(f"test/{i:05d}.png", _encode(im, "PNG"))
        zf.writestr("test_labels.json", "[4, 0, 9]")
    x, y = fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(x.numpy(), imgs)
    assert y.tolist() == [4, 0, 9]


def test_jpeg_zip_errors(tmp_path):
    img = _encode(np.zeros((32, 32, 3), np.uint8))
    cases = {
        "count": ({"test/00000.jpg": img, "test/00001.jpg": img}, "[1]", "labels"),
        "gap": ({"test/00000.jpg": img, "test/00002.jpg": img}, "[1, 2]", "numbered"),
        "nolabels": ({"test/00000.jpg": img}, None, "test_labels.json"),
        "badlabel": ({"test/00000.jpg": img}, "[10]", "0..9"),
        "badimage": ({"test/00000.jpg": b"not an image"}, "[1]", "decode"),
        "sizes": ({"test/00000.jpg": img,
                   "test/00001.jpg": _encode(np.zeros((16, 16, 3), np.uint8))}, "[1, 2]", "expected"),
    }
    for name, (files, labels, match) in cases.items():
        zpath = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            for member, blob in files.items():
                zf.writestr(member, blob)
            if labels is not None:
                zf.writestr("test_labels.json", labels)
        with pytest.raises(ValueError, match=match):
            fd.load_cifar10_jpeg_zip(zpath, "test", cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "notzip.zip").write_bytes(b"PK but not really")
    with pytest.raises(ValueError, match="zip"):
        fd.load_cifar10_jpeg_zip(tmp_path / "notzip.zip", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(FileNotFoundError):
        fd.load_cifar10_jpeg_zip(tmp_path / "missing.zip", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# lossless npz
# ---------------------------------------------------------------------------------------------

def test_lossless_npz_round_trip(tmp_path):
    (tmp_path / "cifar10").mkdir()
    path = tmp_path / "cifar10" / "cifar10_lossless_subset.npz"
    arrays = _write_lossless(path)
    for where in (path, tmp_path / "cifar10", tmp_path):
        for split, n in (("train", 6), ("test", 4)):
            x, y = fd.load_cifar10_lossless(where, split)
            _check_pair(x, y, (n, 32, 32, 3))
            np.testing.assert_array_equal(x.numpy(), arrays[f"x_{split}"])
            np.testing.assert_array_equal(y.numpy(), arrays[f"y_{split}"])


def test_lossless_npz_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", x_test=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="y_test"):
        fd.load_cifar10_lossless(tmp_path / "bad.npz")
    np.savez(tmp_path / "bad2.npz", x_test=np.zeros((2, 32, 32, 3), np.float32), y_test=np.zeros(2))
    with pytest.raises(ValueError, match="uint8"):
        fd.load_cifar10_lossless(tmp_path / "bad2.npz")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(ValueError):
        fd.load_cifar10_lossless(tmp_path / "trunc.npz")
    with pytest.raises(FileNotFoundError):
        fd.load_cifar10_lossless(tmp_path / "nothing_here")


# ---------------------------------------------------------------------------------------------
# MNIST idx
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_round_trip(tmp_path, gz):
    arrays = _write_mnist(tmp_path / "m", gz=gz)
    for split, n in (("train", 7), ("test", 4)):
        x, y = fd.load_mnist(tmp_path / "m", split)
        _check_pair(x, y, (n, 28, 28))
        np.testing.assert_array_equal(x.numpy(), arrays[split][0])
        np.testing.assert_array_equal(y.numpy(), arrays[split][1])
    # root may also be the parent of a "mnist" folder
    (tmp_path / "m").rename(tmp_path / "mnist")
    x, _ = fd.load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(x.numpy(), arrays["test"][0])


def test_mnist_gz_and_raw_agree(tmp_path):
    a = _write_mnist(tmp_path / "gz", gz=True, seed=11)
    b = _write_mnist(tmp_path / "raw", gz=False, seed=11)
    np.testing.assert_array_equal(a["train"][0], b["train"][0])
    xg, yg = fd.load_mnist(tmp_path / "gz")
    xr, yr = fd.load_mnist(tmp_path / "raw")
    assert torch.equal(xg, xr) and torch.equal(yg, yr)


def test_mnist_bad_magic(tmp_path):
    folder = tmp_path / "m"
    _write_mnist(folder, gz=False)
    blob = bytearray((folder / "t10k-images-idx3-ubyte").read_bytes())
    blob[2:4] = struct.pack(">H", 2049)          # a labels magic on the images file
    (folder / "t10k-images-idx3-ubyte").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="magic"):
        fd.load_mnist(folder, "test")
    # swapped files: labels file where images are expected
    _write_mnist(folder, gz=False)
    (folder / "t10k-images-idx3-ubyte").write_bytes((folder / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(ValueError, match="2051"):
        fd.load_mnist(folder, "test")
    # unsupported data type (0x0D = float) in the magic
    with pytest.raises(ValueError, match="magic"):
        (tmp_path / "f.idx").write_bytes(struct.pack(">iii", 0x0D01, 1, 0))
        fd.read_idx(tmp_path / "f.idx")


def test_mnist_truncated_and_mismatched(tmp_path):
    folder = tmp_path / "m"
    _write_mnist(folder, gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    blob = path.read_bytes()
    path.write_bytes(blob[:-1])
    with pytest.raises(ValueError, match="truncated"):
        fd.load_mnist(folder, "test")
    path.write_bytes(blob[:10])
    with pytest.raises(ValueError, match="truncated header"):
        fd.load_mnist(folder, "test")
    path.write_bytes(blob[:2])
    with pytest.raises(ValueError, match="too short"):
        fd.load_mnist(folder, "test")
    path.write_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="trailing"):
        fd.load_mnist(folder, "test")
    # counts of images and labels differ
    path.write_bytes(_idx_bytes(np.zeros((3, 28, 28)), 2051))
    with pytest.raises(ValueError, match="3 images"):
        fd.load_mnist(folder, "test")
    # truncated gzip stream
    gzfolder = tmp_path / "g"
    _write_mnist(gzfolder, gz=True)
    gzpath = gzfolder / "train-labels-idx1-ubyte.gz"
    gzpath.write_bytes(gzpath.read_bytes()[:-12])
    with pytest.raises(ValueError):
        fd.load_mnist(gzfolder, "train")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        fd.load_mnist(tmp_path / "empty", "train")


# ---------------------------------------------------------------------------------------------
# sklearn digits
# ---------------------------------------------------------------------------------------------

def test_digits_split():
    from sklearn.datasets import load_digits as sk_load

    sk = sk_load()
    xtr, ytr = fd.load_digits("train")
    xte, yte = fd.load_digits("test")
    assert xtr.dtype == torch.uint8 and ytr.dtype == torch.int64
    assert xtr.shape[1:] == (8, 8) and xte.shape[1:] == (8, 8)
    assert xtr.shape[0] + xte.shape[0] == len(sk.target)
    assert abs(xte.shape[0] - 0.25 * len(sk.target)) <= 10
    assert int(xtr.max()) == 255 and int(xtr.min()) == 0
    # every item ends up in exactly one part, with the right scaled pixels
    expected = (sk.images.astype(np.int64) * 255 // 16).astype(np.uint8)
    key = {expected[i].tobytes() + bytes([sk.target[i]]) for i in range(len(sk.target))}
    got = [x.numpy().tobytes() + bytes([int(y)]) for x, y in zip(torch.cat([xtr, xte]), torch.cat([ytr, yte]))]
    assert set(got) == key
    # stratified: every class has about 25% of its items in test
    counts_all = np.bincount(sk.target, minlength=10)
    counts_test = np.bincount(yte.numpy(), minlength=10)
    assert np.all(np.abs(counts_test - 0.25 * counts_all) <= 1)
    # deterministic, and the seed matters
    x2, y2 = fd.load_digits("test")
    assert torch.equal(x2, xte) and torch.equal(y2, yte)
    x3, _ = fd.load_digits("test", seed=1)
    assert not torch.equal(x3, xte)
    x4, _ = fd.load_digits("test", test_fraction=0.5)
    assert abs(x4.shape[0] - 0.5 * len(sk.target)) <= 10
    with pytest.raises(ValueError):
        fd.load_digits("test", test_fraction=1.0)


# ---------------------------------------------------------------------------------------------
# to_float_tensor
# ---------------------------------------------------------------------------------------------

def test_to_float_tensor():
    x = torch.tensor([[[[0, 51, 255], [255, 0, 102]]]], dtype=torch.uint8)   # [1, 1, 2, 3]
    out = fd.to_float_tensor(x)
    assert out.dtype == torch.float32 and out.shape == (1, 3, 1, 2) and out.is_contiguous()
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    torch.testing.assert_close(out[0, :, 0, 1], torch.tensor([1.0, 0.0, 0.4]))
    norm = fd.to_float_tensor(x, fd.CIFAR10_MEAN, fd.CIFAR10_STD)
    m = torch.tensor(fd.CIFAR10_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(fd.CIFAR10_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm, (out - m) / s)
    # greyscale NHW -> N1HW, scalar mean/std, numpy input
    g = np.array([[[0, 255], [128, 64]]], dtype=np.uint8)
    og = fd.to_float_tensor(g)
    assert og.shape == (1, 1, 2, 2)
    torch.testing.assert_close(og[0, 0], torch.tensor([[0.0, 1.0], [128 / 255, 64 / 255]]))
    torch.testing.assert_close(fd.to_float_tensor(g, 0.5, 0.5), (og - 0.5) / 0.5)
    # floats pass through (already in [0, 1]); the input is never modified in place
    torch.testing.assert_close(fd.to_float_tensor(x.float() / 255), out)
    f1 = torch.rand(2, 4, 4, 1)
    f1_copy = f1.clone()
    torch.testing.assert_close(fd.to_float_tensor(f1, 0.5, 0.25), (f1_copy.permute(0, 3, 1, 2) - 0.5) / 0.25)
    assert torch.equal(f1, f1_copy)
    with pytest.raises(ValueError, match="channels"):
        fd.to_float_tensor(x, (0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="both"):
        fd.to_float_tensor(x, mean=fd.CIFAR10_MEAN)
    with pytest.raises(ValueError):
        fd.to_float_tensor(torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(TypeError):
        fd.to_float_tensor(torch.zeros(1, 2, 2, 3, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# augment_cifar
# ---------------------------------------------------------------------------------------------

def _reference_augment(x, generator, padding=4):
    """Per-image reference using the documented order of random draws."""
    n, _, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.rand((n,), generator=generator) < 0.5
    padded = F.pad(x, (padding,) * 4)
    out = []
    for i in range(n):
        crop = padded[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out), oy, ox, flips


def test_augment_cifar_shapes_and_determinism():
    x = torch.rand(64, 3, 32, 32)
    a = fd.augment_cifar(x, torch.Generator().manual_seed(123))
    b = fd.augment_cifar(x, torch.Generator().manual_seed(123))
    c = fd.augment_cifar(x, torch.Generator().manual_seed(124))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    # global RNG is used without a generator
    torch.manual_seed(5)
    d1 = fd.augment_cifar(x)
    torch.manual_seed(5)
    assert torch.equal(d1, fd.augment_cifar(x))
    # uint8 NCHW works too; padding=0 without flips is the identity
    u = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert fd.augment_cifar(u).dtype == torch.uint8
    assert torch.equal(fd.augment_cifar(u, padding=0, flip=False), u)
    with pytest.raises(ValueError):
        fd.augment_cifar(torch.rand(3, 32, 32))


def test_augment_cifar_matches_reference_crops_and_flips():
    x = torch.rand(64, 3, 32, 32) + 1.0        # strictly positive, so zero padding is visible
    out = fd.augment_cifar(x, torch.Generator().manual_seed(7))
    ref, oy, ox, flips = _reference_augment(x, torch.Generator().manual_seed(7))
    assert torch.equal(out, ref)
    # the draws cover real crops and real flips
    assert flips.any() and (~flips).any()
    assert set(oy.tolist()) | set(ox.tolist()) >= {0, 8}
    for i in range(64):
        top, left = 4 - int(oy[i]), 4 - int(ox[i])       # zero rows at top if > 0, bottom if < 0
        zero_rows = (out[i] == 0).all(dim=(0, 2))
        assert int(zero_rows.sum()) == abs(top)
        if top > 0:
            assert zero_rows[:top].all()
        elif top < 0:
            assert zero_rows[top:].all()
        zero_cols = (out[i] == 0).all(dim=(0, 1))
        assert int(zero_cols.sum()) == abs(left)
        # the non-padded part is the original image, shifted (and flipped if drawn)
        inner = out[i].flip(-1) if flips[i] else out[i]
        ys, xs = slice(max(top, 0), 32 + min(top, 0)), slice(max(left, 0), 32 + min(left, 0))
        src_y = slice(max(-top, 0), 32 - max(top, 0))
        src_x = slice(max(-left, 0), 32 - max(left, 0))
        assert torch.equal(inner[:, ys, xs], x[i][:, src_y, src_x])


def test_augment_cifar_crop_offset_zero_pads():
    # force offset (0, 0) and no flip: the image moves 4 px down and right, zeros above/left
    x = torch.arange(1, 1 + 2 * 32 * 32, dtype=torch.float32).view(1, 2, 32, 32)
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        _, oy, ox, flips = _reference_augment(x, torch.Generator().manual_seed(seed))
        if int(oy) == 0 and int(ox) == 0 and not bool(flips):
            out = fd.augment_cifar(x, g)
            assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, :4] == 0).all()
            assert torch.equal(out[0, :, 4:, 4:], x[0, :, :28, :28])
            break
    else:  # pragma: no cover
        pytest.fail("no seed gave offset (0, 0) without flip")


# ---------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------

def test_load_dataset_cifar10_source_order(tmp_path, pickle_dir):
    d = tmp_path / "data"
    (d / "cifar10").mkdir(parents=True)
    arrays = _write_lossless(d / "cifar10" / "cifar10_lossless_subset.npz")
    content = _write_jpeg_zip(d / "cifar10" / "cifar10-jpeg.zip")
    cache = tmp_path / "cache"

    x, y, info = fd.load_dataset("cifar10", d, "test", return_info=True, cache_dir=cache)
    assert info["source"] == "cifar10-lossless" and info["count"] == 4
    np.testing.assert_array_equal(x.numpy(), arrays["x_test"])
    # train: the lossless subset is not used for "cifar10", the zip is
    x, y, info = fd.load_dataset("cifar10", d, "train", return_info=True, cache_dir=cache, progress=False)
    assert info["source"] == "cifar10-jpeg" and y.tolist() == content["train"][1]
    # explicit names
    x, y = fd.load_dataset("cifar10-jpeg", d, "test", limit=2, cache_dir=cache, progress=False)
    assert x.shape == (2, 32, 32, 3) and y.tolist() == content["test"][1][:2]
    x, y = fd.load_dataset("cifar10-lossless", d, "train", limit=3)
    np.testing.assert_array_equal(x.numpy(), arrays["x_train"][:3])
    # a pickle folder wins over both
    folder, parts = pickle_dir
    os.rename(folder, d / "cifar-10-batches-py")
    x, y, info = fd.load_dataset("cifar10", d, "test", return_info=True)
    assert info["source"] == "cifar10-pickle"
    np.testing.assert_array_equal(x.numpy(), parts["test_batch"][0])
    x, y = fd.load_dataset("cifar10", d, "train", limit=4)
    assert x.shape == (4, 32, 32, 3)


def test_load_dataset_mnist_digits_env_and_errors(tmp_path, monkeypatch):
    d = tmp_path / "data"
    arrays = _write_mnist(d / "mnist")
    monkeypatch.setenv("FASTEDIT_DATA", str(d))
    x, y = fd.load_dataset("mnist", split="train", limit=5)
    np.testing.assert_array_equal(x.numpy(), arrays["train"][0][:5])
    x, y, info = fd.load_dataset("digits", split="train", return_info=True)
    assert x.shape[1:] == (8, 8) and info["source"] == "digits"
    with pytest.raises(FileNotFoundError) as exc:
        fd.load_dataset("cifar10", split="test")
    msg = str(exc.value)
    assert "cifar-10-batches-py" in msg and "cifar10_lossless_subset.npz" in msg and "cifar10-jpeg.zip" in msg
    assert str(d) in msg
    with pytest.raises(FileNotFoundError, match="cifar10-jpeg.zip"):
        fd.load_dataset("cifar10-jpeg", split="train")
    with pytest.raises(ValueError, match="unknown dataset"):
        fd.load_dataset("imagenet")
    monkeypatch.delenv("FASTEDIT_DATA")
    with pytest.raises(FileNotFoundError, match="FASTEDIT_DATA"):
        fd.load_dataset("mnist")


# ---------------------------------------------------------------------------------------------
# real data (skipped when $FASTEDIT_DATA is absent)
# ---------------------------------------------------------------------------------------------

def test_real_lossless_subset(shared_data_dir):
    path = shared_data_dir / "cifar10" / "cifar10_lossless_subset.npz"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    x, y = fd.load_cifar10_lossless(path, "test")
    _check_pair(x, y, (1017, 32, 32, 3))
    with np.load(path) as z:
        np.testing.assert_array_equal(y.numpy(), z["y_test"])
        np.testing.assert_array_equal(x[:8].numpy(), z["x_test"][:8])
    assert int(y.max()) == 9 and int(y.min()) == 0


def test_real_mnist(shared_data_dir):
    root = shared_data_dir / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not present in {root}")
    x, y = fd.load_mnist(root, "train")
    _check_pair(x, y, (60000, 28, 28))
    assert y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    header = struct.pack(">iiii", 2051, 60000, 28, 28)
    assert hashlib.md5(header + x.numpy().tobytes()).hexdigest() == "6bbc9ace898e44ae57da46a324031adb"
    xt, yt = fd.load_mnist(root, "test")
    _check_pair(xt, yt, (10000, 28, 28))
    assert yt[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]


def test_real_jpeg_zip_first_64(shared_data_dir, tmp_path):
    path = shared_data_dir / "cifar10" / "cifar10-jpeg.zip"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    x, y = fd.load_cifar10_jpeg_zip(path, "test", cache_dir=tmp_path, limit=64, progress=False)
    _check_pair(x, y, (64, 32, 32, 3))
    with zipfile.ZipFile(path) as zf:
        labels = json.loads(zf.read("test_labels.json"))
        classes = json.loads(zf.read("classes.json"))
        first = _pillow_decode(zf.read("test/00000.jpg"))
    assert y.tolist() == labels[:64]
    assert tuple(classes) == fd.CIFAR10_CLASSES
    np.testing.assert_array_equal(x[0].numpy(), first)
