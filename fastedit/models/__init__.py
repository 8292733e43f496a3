"""Model zoo for fastedit: CIFAR ResNets (He et al. 2015), the Editable Training CIFAR ResNet-18,
small models for digits / MNIST, and the pretrained g2p-en grapheme-to-phoneme GRU encoder–decoder
(:class:`G2P`). Every model is traceable by ``torch.fx.symbolic_trace``.

``get_model(name, num_classes=10, weights=None, **kwargs)`` builds a model by name; ``weights`` is a
checkpoint path (for the CIFAR ResNets, the pretrained ``resnet<depth>-<hash>.th`` files).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from torch import nn

from .g2p import G2P, load_g2p
from .resnet18_cifar import ResNet18Cifar, resnet18_cifar
from .resnet_cifar import (
    CIFAR_MEAN,
    CIFAR_STD,
    BasicBlock,
    BasicBlockA,
    BasicBlockB,
    CifarResNet,
    PadShortcut,
    cifar_resnet,
    load_pretrained_cifar_resnet,
    load_state_dict_strict,
    read_state_dict,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
)
from .small import MLP, SmallCNN

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "PadShortcut",
    "BasicBlock",
    "BasicBlockA",
    "BasicBlockB",
    "CifarResNet",
    "ResNet18Cifar",
    "SmallCNN",
    "MLP",
    "G2P",
    "load_g2p",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet18_cifar",
    "load_pretrained_cifar_resnet",
    "read_state_dict",
    "load_state_dict_strict",
    "get_model",
    "MODEL_NAMES",
]

_CIFAR_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56}

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet18": resnet18_cifar,
    "small_cnn": SmallCNN,
    "mlp": MLP,
}

#: Names accepted by :func:`get_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def get_model(
    name: str,
    num_classes: int = 10,
    weights: str | os.PathLike | Mapping | None = None,
    **kwargs,
) -> nn.Module:
    """Build a model by name (see ``MODEL_NAMES``).

    ``weights``: a checkpoint path (or a state dict). For ``resnet20/32/44/56`` it is loaded with
    :func:`load_pretrained_cifar_resnet` (depth and class count checked against the file); for the
    other models the state dict (``module.`` prefixes stripped) is loaded strictly into the model
    built with ``num_classes`` and ``kwargs``. A model loaded from weights is returned in eval
    mode; a fresh one in train mode. ``kwargs`` go to the constructor (e.g. ``width`` for
    ``small_cnn``, ``in_features``/``hidden`` for ``mlp``).
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    if weights is not None and key in _CIFAR_DEPTHS:
        if kwargs:
            raise TypeError(f"unexpected arguments for a pretrained {key}: {sorted(kwargs)}")
        model = load_pretrained_cifar_resnet(weights, depth=_CIFAR_DEPTHS[key])
        if model.num_classes != num_classes:
            raise ValueError(
                f"{weights} has {model.num_classes} classes, not the requested num_classes={num_classes}"
            )
        return model
    model = _BUILDERS[key](num_classes=num_classes, **kwargs)
    if weights is not None:
        where = "state dict" if isinstance(weights, Mapping) else str(weights)
        load_state_dict_strict(model, read_state_dict(weights), where)
        model.eval()
    return model
