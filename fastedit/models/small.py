"""Small models for quick experiments: 8x8 digits (scikit-learn ``load_digits``) and MNIST.

Module names are chosen so that parameter selections read naturally: ``params="classifier"``
(the last linear layer), ``params="head"`` (the hidden linear layer), ``params="features"``
(the convolutional trunk). Both models are traceable by torch.fx.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["SmallCNN", "MLP"]


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN-ReLU, adaptive average pool, flatten, head-ReLU-classifier.

    ``features``: ``Sequential(conv(in->w), BN, ReLU, conv(w->2w), BN, ReLU)`` (padding 1, stride 1);
    ``pool``: adaptive average pooling to ``pool_size x pool_size`` (2 by default, 1 = global);
    ``head``: ``Linear(2w * pool_size**2 -> hidden)`` (``hidden`` defaults to ``2w``), then ReLU;
    ``classifier``: ``Linear(hidden -> num_classes)``. Works for any input size >= 1x1
    (8x8 digits, 28x28 MNIST, 32x32 CIFAR with ``in_channels=3``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        hidden: int | None = None,
        pool_size: int = 2,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width), ("pool_size", pool_size)):
            if int(v) < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        hidden = 2 * width if hidden is None else int(hidden)
        if hidden < 1:
            raise ValueError(f"hidden must be positive, got {hidden}")
        self.num_classes = int(num_classes)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        self.head = nn.Linear(2 * width * pool_size * pool_size, hidden)
        self.act = nn.ReLU()
        self.classifier = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(self.pool(self.features(x)))
        return self.classifier(self.act(self.head(x)))


class MLP(nn.Module):
    """Flatten, then ``features`` (Linear-ReLU per hidden width), then ``classifier`` Linear.

    ``hidden`` is one width or a sequence of widths (empty: a linear model). Inputs of any shape
    ``[N, ...]`` are flattened to ``[N, in_features]``.
    """

    def __init__(self, in_features: int = 64, hidden: int | Sequence[int] = 128, num_classes: int = 10) -> None:
        super().__init__()
        widths = [int(hidden)] if isinstance(hidden, int) else [int(h) for h in hidden]
        for name, v in [("in_features", in_features), ("num_classes", num_classes)] + [("hidden", h) for h in widths]:
            if int(v) < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        self.in_features = int(in_features)
        self.num_classes = int(num_classes)
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        prev = self.in_features
        for w in widths:
            layers += [nn.Linear(prev, w), nn.ReLU()]
            prev = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.flatten(x)))
