"""CIFAR ResNet-18 as used in the Editable Training experiments (Sinitsin et al., ICLR 2020).

Layout::

    conv1 3x3 3->64 stride 1 (no bias, no max-pool) -> bn1 -> ReLU
    layer1: 2 BasicBlocks,  64 channels, stride 1
    layer2: 2 BasicBlocks, 128 channels, first block stride 2
    layer3: 2 BasicBlocks, 256 channels, first block stride 2
    layer4: 2 BasicBlocks, 512 channels, first block stride 2
    adaptive average pooling -> linear 512->num_classes

Shortcuts are "option B": a 1x1 convolution (no bias) + BN when the shape changes, the identity
otherwise (``layer{k}.{i}.shortcut.0`` is the convolution, ``.shortcut.1`` the BN). The paper's
"chains" 1-4 are ``layer1`` .. ``layer4``. 11,173,962 parameters for 10 classes. Traceable by torch.fx.
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet_cifar import BasicBlockB

__all__ = ["ResNet18Cifar", "resnet18_cifar"]


class ResNet18Cifar(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(64, 64, stride=1)
        self.layer2 = self._make_stage(64, 128, stride=2)
        self.layer3 = self._make_stage(128, 256, stride=2)
        self.layer4 = self._make_stage(256, 512, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(512, num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, stride: int, blocks: int = 2) -> nn.Sequential:
        layers = [BasicBlockB(in_planes, planes, stride)]
        layers += [BasicBlockB(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan-out) convolutions, BN to identity, PyTorch-default linear layer."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.flatten(self.avgpool(out)))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet18Cifar:
    """CIFAR ResNet-18 (Editable Training paper); editable "chains" are ``layer1`` .. ``layer4``."""
    return ResNet18Cifar(num_classes=num_classes, in_channels=in_channels)
