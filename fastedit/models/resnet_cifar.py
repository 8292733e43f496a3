"""CIFAR-10 ResNets of He et al. 2015 (section 4.2), "option A" shortcuts.

Layout (depth = 6n + 2)::

    conv1 3x3 3->16 (no bias) -> bn1 -> ReLU
    layer1: n BasicBlocks, 16 channels, stride 1
    layer2: n BasicBlocks, 32 channels, first block stride 2
    layer3: n BasicBlocks, 64 channels, first block stride 2
    global average pooling -> linear 64->num_classes

BasicBlock: conv3x3 (no bias) -> BN -> ReLU -> conv3x3 (no bias) -> BN, plus the shortcut, then ReLU.
The option-A shortcut has no parameters: when the shape changes the input is subsampled with
``x[:, :, ::2, ::2]`` and zero-padded with ``planes // 4`` channels on each side.

Parameter and buffer names match the widely used pretrained checkpoints once their ``module.``
prefix is stripped (``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv1|bn1|conv2|bn2``, ``linear``). Every
module is torch.fx symbolically traceable.
"""
from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CIFAR_MEAN",
    "CIFAR_STD",
    "PadShortcut",
    "BasicBlock",
    "BasicBlockA",
    "BasicBlockB",
    "CifarResNet",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "load_pretrained_cifar_resnet",
    "read_state_dict",
]

#: Input normalisation the pretrained CIFAR ResNets expect (RGB in [0, 1], then (x - mean) / std).
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::stride, ::stride]`` zero-padded with ``pad`` channels per side.

    No parameters and no buffers; traceable by torch.fx (slicing and ``F.pad`` only).
    """

    def __init__(self, pad: int, stride: int = 2) -> None:
        super().__init__()
        self.pad = int(pad)
        self.stride = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        # F.pad pads the last dimensions first: (W_left, W_right, H_top, H_bottom, C_front, C_back).
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU.

    When the shape changes, ``shortcut="A"`` (He et al.'s CIFAR ResNets) subsamples and zero-pads
    channels, with no parameters; ``shortcut="B"`` (the ResNet-18 of the Editable paper) projects
    with a 1x1 conv + BN. Otherwise the shortcut is the identity.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))
        else:
            if in_planes + 2 * (planes // 4) != planes:
                raise ValueError(
                    f"option-A shortcut pads planes//4 channels per side; it cannot map "
                    f"{in_planes} to {planes} channels"
                )
            self.shortcut = PadShortcut(planes // 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


def BasicBlockA(in_planes: int, planes: int, stride: int = 1) -> BasicBlock:
    """A :class:`BasicBlock` with the option-A (parameter-free) shortcut."""
    return BasicBlock(in_planes, planes, stride, shortcut="A")


def BasicBlockB(in_planes: int, planes: int, stride: int = 1) -> BasicBlock:
    """A :class:`BasicBlock` with the option-B (1x1 conv + BN projection) shortcut."""
    return BasicBlock(in_planes, planes, stride, shortcut="B")


class CifarResNet(nn.Module):
    """He et al. 2015 CIFAR ResNet with ``n`` blocks per stage (depth = 6n + 2)."""

    def __init__(self, num_blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        n = int(num_blocks_per_stage)
        if n < 1:
            raise ValueError(f"need at least one block per stage, got {n}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.depth = 6 * n + 2
        self.num_classes = int(num_classes)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(16, 16, n, stride=1)
        self.layer2 = self._make_stage(16, 32, n, stride=2)
        self.layer3 = self._make_stage(32, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(64, num_classes)
        self.reset_parameters()

    @staticmethod
    def _make_stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlockA(in_planes, planes, stride)]
        blocks += [BasicBlockA(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def reset_parameters(self) -> None:
        """Kaiming-normal weights for convolutions and the linear layer, BN to identity."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.flatten(self.avgpool(out)))


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet of the given depth (20, 32, 44, 56, 110, ...: any 6n + 2 with n >= 1)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, ...), got {depth!r}")
    return CifarResNet((depth - 2) // 6, num_classes=num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return cifar_resnet(56, num_classes)


# ----------------------------------------------------------------------------------------------
# checkpoints

_PathOrDict = str | os.PathLike | Mapping


def read_state_dict(source: _PathOrDict, map_location="cpu") -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` state dict from a checkpoint file or an in-memory mapping.

    Accepts ``{"state_dict": {...}, ...}`` (the pretrained CIFAR ResNets), ``{"model": {...}}`` and
    plain state dicts; strips a leading ``module.`` (DataParallel) from every key. Files are read
    with ``torch.load(..., weights_only=True)``.
    """
    if isinstance(source, Mapping):
        obj = source
        where = "the given mapping"
    else:
        path = pathlib.Path(source)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # pickle errors, zip errors, disallowed globals, ...
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model_state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            obj = inner
            break
    if not obj:
        raise ValueError(f"{where} holds an empty state dict")
    out: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{where} is not a state dict: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def _fill_num_batches_tracked(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Old checkpoints (torch < 0.4.1) lack BN's ``num_batches_tracked``; add it as 0."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            if f"{name}.running_mean" in state and key not in state:
                state[key] = torch.tensor(0, dtype=torch.long)


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> nn.Module:
    """``model.load_state_dict(state, strict=True)`` with a readable error message."""
    state = dict(state)
    _fill_num_batches_tracked(model, state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise ValueError(f"{where} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


_STAGE_BLOCK = re.compile(r"^layer1\.(\d+)\.conv1\.weight$")
_NAME_DEPTH = re.compile(r"resnet(\d+)", re.IGNORECASE)


def _depth_from_state(state: Mapping[str, torch.Tensor], where: str) -> int:
    blocks = {int(m.group(1)) for k in state if (m := _STAGE_BLOCK.match(k))}
    if not blocks or "conv1.weight" not in state or "linear.weight" not in state:
        raise ValueError(
            f"{where} is not a CIFAR ResNet checkpoint (expected keys conv1.weight, "
            f"layer1.<i>.conv1.weight, linear.weight; found e.g. {list(state)[:4]})"
        )
    n = max(blocks) + 1
    if sorted(blocks) != list(range(n)):
        raise ValueError(f"{where}: layer1 blocks are not numbered 0..n-1: {sorted(blocks)}")
    return 6 * n + 2


def load_pretrained_cifar_resnet(
    path: _PathOrDict, depth: int | None = None, map_location="cpu"
) -> CifarResNet:
    """Load a pretrained CIFAR ResNet checkpoint; returns the model in eval mode.

    ``path``: a ``resnet<depth>-<hash>.th`` file (``{"state_dict": ..., "best_prec1": ...}`` with
    ``module.``-prefixed keys), a plain state-dict file, or a state dict in memory. When ``depth``
    is None it is taken from the number of blocks in the state dict; a depth in the file name
    (``resnet20-...``) or given explicitly must agree with it. The number of classes is read from
    the ``linear`` layer. Loading is strict.
    """
    where = "state dict" if isinstance(path, Mapping) else str(path)
    state = read_state_dict(path, map_location=map_location)
    found = _depth_from_state(state, where)
    if depth is not None and depth != found:
        raise ValueError(f"{where} holds a ResNet-{found}, not the requested ResNet-{depth}")
    if not isinstance(path, Mapping):
        m = _NAME_DEPTH.search(pathlib.Path(path).name)
        if m and int(m.group(1)) != found:
            raise ValueError(
                f"{where}: the file name says ResNet-{m.group(1)} but the weights are a ResNet-{found}"
            )
    num_classes = int(state["linear.weight"].shape[0])
    model = cifar_resnet(found, num_classes=num_classes)
    load_state_dict_strict(model, state, where)
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model.to(map_location)
    return model.eval()
