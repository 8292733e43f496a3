"""Dataset loaders for local files (nothing is downloaded).

The text corpora (:mod:`fastedit.data.text`) return ``(texts, labels)`` (the verse pairs ``(english,
spanish)``); CMUdict (:mod:`fastedit.data.cmudict`) ``(words, pronunciations)``. Every image loader
returns ``(images, labels)``: ``images`` a ``torch.uint8`` tensor ``[N, H, W, C]`` (colour) or
``[N, H, W]`` (greyscale), ``labels`` ``torch.int64 [N]``. Use :func:`to_float_tensor` to get
``float32`` ``NCHW`` model inputs and :func:`augment_cifar` for training-time augmentation.
"""
from .cifar import load_cifar10_jpeg_zip, load_cifar10_lossless, load_cifar10_pickle
from .cmudict import load_cmudict, read_cmudict
from .common import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    augment_cifar,
    default_cache_dir,
    to_float_tensor,
)
from .digits import load_digits
from .mnist import load_mnist, read_idx
from .registry import DATASET_NAMES, load_dataset
from .text import (
    ROTTEN_TOMATOES_CLASSES,
    SMS_SPAM_CLASSES,
    TREC_COARSE_CLASSES,
    load_rotten_tomatoes,
    load_sms_spam,
    load_trec_questions,
    load_verse_pairs,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATASET_NAMES",
    "augment_cifar",
    "default_cache_dir",
    "load_cifar10_jpeg_zip",
    "load_cifar10_lossless",
    "load_cifar10_pickle",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
    "to_float_tensor",
    "load_rotten_tomatoes",
    "load_sms_spam",
    "load_trec_questions",
    "load_verse_pairs",
    "load_cmudict",
    "read_cmudict",
    "ROTTEN_TOMATOES_CLASSES",
    "SMS_SPAM_CLASSES",
    "TREC_COARSE_CLASSES",
]
