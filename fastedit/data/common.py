"""Shared pieces of :mod:`fastedit.data`: constants, conversions, augmentation, cache location.

Conventions used by every loader in this package:

* images are ``torch.uint8`` tensors, ``[N, H, W, C]`` for colour and ``[N, H, W]`` for greyscale;
* labels are ``torch.int64`` tensors ``[N]``;
* :func:`to_float_tensor` turns such images into the ``float32`` ``NCHW`` layout models expect.
"""
from __future__ import annotations

import logging
import operator
import os
import pathlib
from typing import Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger("fastedit.data")

#: The ten CIFAR-10 class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

#: Per-channel (RGB) normalisation of the pretrained CIFAR-10 ResNets (``load_pretrained_cifar_resnet``).
#: (These are the ImageNet statistics, which is what those checkpoints were trained with.)
CIFAR10_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR10_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

SPLITS = ("train", "test")


def check_split(split: str) -> str:
    """Return ``split`` if it is ``"train"`` or ``"test"``; raise ``ValueError`` otherwise."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def check_limit(limit: int | None) -> int | None:
    """Validate a ``limit`` argument (``None`` or a non-negative int)."""
    if limit is None:
        return None
    if isinstance(limit, bool):
        raise TypeError("limit must be None or an int, got bool")
    try:
        limit = operator.index(limit)
    except TypeError:
        raise TypeError(f"limit must be None or an int, got {type(limit).__name__}") from None
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return limit


def default_cache_dir() -> pathlib.Path:
    """``$FASTEDIT_CACHE`` if set, else ``~/.cache/fastedit``."""
    value = os.environ.get("FASTEDIT_CACHE")
    if value:
        return pathlib.Path(value).expanduser()
    return pathlib.Path.home() / ".cache" / "fastedit"


def _channel_values(values: float | Sequence[float] | torch.Tensor, channels: int, what: str,
                    device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{what} has {t.numel()} values but the images have {channels} channels")
    return t.view(1, channels, 1, 1)


def to_float_tensor(images, mean: float | Sequence[float] | None = None,
                    std: float | Sequence[float] | None = None) -> torch.Tensor:
    """Convert loader images to a ``float32`` ``NCHW`` tensor.

    ``images``: ``uint8`` ``[N, H, W, C]`` (colour) or ``[N, H, W]`` (greyscale, which becomes
    ``[N, 1, H, W]``); a tensor or anything :func:`torch.as_tensor` accepts (e.g. a numpy array).
    ``uint8`` values are divided by 255 to land in ``[0, 1]``; floating-point inputs are taken to
    be in ``[0, 1]`` already and only re-laid out. Then, if ``mean``/``std`` are given (one value
    per channel, or a single value for all), ``(x - mean) / std`` is applied per channel. Both or
    neither must be given. The result is contiguous and on the input's device.
    """
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(-1)
    if x.dim() != 4:
        raise ValueError(f"expected images of shape [N, H, W, C] or [N, H, W], got {tuple(x.shape)}")
    if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
        raise TypeError(f"expected uint8 (or floating-point in [0, 1]) images, got {x.dtype}")
    n, h, w, c = x.shape
    out = torch.empty((n, c, h, w), dtype=torch.float32, device=x.device)
    out.copy_(x.permute(0, 3, 1, 2))      # always a fresh tensor: the input is never modified
    if x.dtype == torch.uint8:
        out.div_(255.0)
    x = out
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        c = x.shape[1]
        m = _channel_values(mean, c, "mean", x.device)
        s = _channel_values(std, c, "std", x.device)
        if bool((s == 0).any()):
            raise ValueError("std must not contain zeros")
        x = x.sub_(m).div_(s)
    return x


def augment_cifar(x: torch.Tensor, generator: torch.Generator | None = None, *,
                  padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Standard CIFAR training augmentation on a batch: random crop with zero padding, random flip.

    ``x`` is ``[N, C, H, W]`` (any dtype, any device; normally the float output of
    :func:`to_float_tensor`). Each image is zero-padded by ``padding`` pixels on every side and an
    ``H x W`` window is cut at a uniformly random offset in ``[0, 2 * padding]`` along each axis
    (so offset ``padding`` is the identity); then, if ``flip``, it is mirrored left-right with
    probability 1/2. Randomness comes from ``generator`` (or torch's global RNG when ``None``):
    per image, first the row offsets, then the column offsets, then the flip decisions, each drawn
    as one batched call, so a generator seeded the same way gives the same result. The padding
    value is 0 in the units of ``x``: black for images in ``[0, 1]`` (as in the usual torchvision
    pipeline, which crops before normalising), the mean colour for normalised images.

    Returns a new contiguous tensor of the same shape, dtype and device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"expected a tensor [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, _, h, w = x.shape
    gen_device = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=gen_device).to(x.device)
    if flip:
        do_flip = torch.rand((n,), generator=generator, device=gen_device).lt(0.5).to(x.device)
    else:
        do_flip = torch.zeros((n,), dtype=torch.bool, device=x.device)
    if n == 0:
        return x.clone()
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = oy[:, None] + ar_h[None, :]                                   # [N, H]
    cols_src = torch.where(do_flip[:, None], ar_w.flip(0)[None, :], ar_w[None, :])
    cols = ox[:, None] + cols_src                                        # [N, W]
    batch = torch.arange(n, device=x.device)
    # Advanced indices separated by a slice: result is [N, H, W, C].
    out = padded[batch[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
