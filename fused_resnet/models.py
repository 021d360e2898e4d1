"""ResNet zoo built from fused blocks.

* ``resnet18/34/50/101/152``: torchvision's architecture, initialisation (``zero_init_residual`` included) and
  state_dict keys, with fused blocks and a fused stem (conv-BN-ReLU; the max-pool stays a torch op).
* ``cifar_resnet(depth, ...)``: the ResNet paper's CIFAR networks (depth 6n+2: 20, 32, 44, 56, 110, 1202) with
  shortcut options A/B/C, their plain twins, and a 1-D variant for sequences.
* Every model takes ``residual_scale``: None (the paper's blocks), a fixed α or ``"learnable"`` (α = 0 at
  initialisation, SkipInit): y = relu(α·bn_last(...) + shortcut).

``backend=None`` builds the same network from plain torch modules (the eager twin used as a reference).
"""
from __future__ import annotations

import re
from typing import Optional, Union

import torch
import torchvision
from torch import Tensor, nn

from .blocks import (EagerBasicBlock, EagerBottleneck, FusedBasicBlock, FusedStemMixin, ResNet, ShortcutA, _BlockLayout,
                     _conv, set_residual_scale)
from .convert import convert

__all__ = ["ResNet", "CifarResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "cifar_resnet"]
ResidualScale = Union[None, float, str]  # None, a fixed α, or "learnable" (see blocks.set_residual_scale)
IMAGENET_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def cifar_depth(name: str) -> Optional[int]:
    """The depth of a ``cifar_resnet<depth>`` model name, or None for any other name (depth not validated)."""
    match = re.fullmatch(r"cifar_resnet(\d+)", name)
    return int(match.group(1)) if match else None


def _torchvision_twin(name: str, weights, progress: bool, backend: Optional[str], residual_scale: ResidualScale,
                      kwargs) -> nn.Module:
    model = getattr(torchvision.models, name)(weights=weights, progress=progress, **kwargs)
    if backend is not None:
        model = convert(model, backend=backend, inplace=True)
    if residual_scale is not None:
        _TV = torchvision.models.resnet
        for block in model.modules():
            if type(block) in (_TV.BasicBlock, _TV.Bottleneck):  # torchvision's forward has no α: its eager twin
                block.plain, block.dim = False, 2
                block.__class__ = EagerBasicBlock if type(block) is _TV.BasicBlock else EagerBottleneck
            if isinstance(block, _BlockLayout):
                set_residual_scale(block, residual_scale)
    return model


def resnet18(*, weights=None, progress: bool = True, backend: Optional[str] = "auto",
             residual_scale: ResidualScale = None, **kwargs) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); arguments as torchvision.models.resnet18."""
    return _torchvision_twin("resnet18", weights, progress, backend, residual_scale, kwargs)


def resnet34(*, weights=None, progress: bool = True, backend: Optional[str] = "auto",
             residual_scale: ResidualScale = None, **kwargs) -> nn.Module:
    """ResNet-34 (BasicBlock, [3, 4, 6, 3]); arguments as torchvision.models.resnet34."""
    return _torchvision_twin("resnet34", weights, progress, backend, residual_scale, kwargs)


def resnet50(*, weights=None, progress: bool = True, backend: Optional[str] = "auto",
             residual_scale: ResidualScale = None, **kwargs) -> nn.Module:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); arguments as torchvision.models.resnet50."""
    return _torchvision_twin("resnet50", weights, progress, backend, residual_scale, kwargs)


def resnet101(*, weights=None, progress: bool = True, backend: Optional[str] = "auto",
             residual_scale: ResidualScale = None, **kwargs) -> nn.Module:
    """ResNet-101 (Bottleneck, [3, 4, 23, 3]); arguments as torchvision.models.resnet101."""
    return _torchvision_twin("resnet101", weights, progress, backend, residual_scale, kwargs)


def resnet152(*, weights=None, progress: bool = True, backend: Optional[str] = "auto",
             residual_scale: ResidualScale = None, **kwargs) -> nn.Module:
    """ResNet-152 (Bottleneck, [3, 8, 36, 3]); arguments as torchvision.models.resnet152."""
    return _torchvision_twin("resnet152", weights, progress, backend, residual_scale, kwargs)


class CifarResNet(FusedStemMixin, nn.Module):
    """The ResNet paper's CIFAR network: 3x3 stem with ``width`` channels, three stages of n BasicBlocks with
    width, 2·width, 4·width channels (stride 2 at the first block of stages 2 and 3), global average pool, fc."""

    def __init__(self, depth: int, shortcut: str = "A", plain: bool = False, num_classes: int = 10,
                 in_channels: int = 3, width: int = 16, dim: int = 2, *, backend: Optional[str] = "auto",
                 residual_scale: ResidualScale = None):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth}")
        if shortcut not in ("A", "B", "C"):
            raise ValueError(f"shortcut must be 'A', 'B' or 'C', got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.shortcut, self.plain, self.dim = depth, shortcut, plain, dim
        self.residual_scale = residual_scale
        self.conv1 = _conv(dim, in_channels, width, 3)
        self.bn1 = (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(width)
        self.relu = nn.ReLU(inplace=True)
        self._inplanes = width
        self.layer1 = self._make_layer(width, n, 1, backend)
        self.layer2 = self._make_layer(2 * width, n, 2, backend)
        self.layer3 = self._make_layer(4 * width, n, 2, backend)
        del self._inplanes
        self.avgpool = (nn.AdaptiveAvgPool2d if dim == 2 else nn.AdaptiveAvgPool1d)(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.backend = backend

    def _downsample(self, planes: int, stride: int) -> Optional[nn.Module]:
        changes = stride != 1 or self._inplanes != planes
        if self.plain or (self.shortcut != "C" and not changes):
            return None
        if self.shortcut == "A":
            return ShortcutA(stride, planes)
        bn = (nn.BatchNorm2d if self.dim == 2 else nn.BatchNorm1d)(planes)
        return nn.Sequential(_conv(self.dim, self._inplanes, planes, 1, stride), bn)

    def _make_layer(self, planes: int, blocks: int, stride: int, backend: Optional[str]) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            args = (self._inplanes, planes, s, self._downsample(planes, s))
            kw = dict(plain=self.plain, dim=self.dim, residual_scale=self.residual_scale)
            layers.append(EagerBasicBlock(*args, **kw) if backend is None
                          else FusedBasicBlock(*args, backend=backend, **kw))
            self._inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self._stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def extra_repr(self) -> str:
        scale = "" if self.residual_scale is None else f", residual_scale={self.residual_scale!r}"
        return f"depth={self.depth}, shortcut={self.shortcut!r}, plain={self.plain}, dim={self.dim}{scale}"


def cifar_resnet(depth: int, shortcut: str = "A", plain: bool = False, num_classes: int = 10, in_channels: int = 3,
                 width: int = 16, dim: int = 2, *, backend: Optional[str] = "auto",
                 residual_scale: ResidualScale = None) -> CifarResNet:
    """CIFAR ResNet-{depth} (6n+2). shortcut: "A" zero-padded identity (default, as in the paper), "B" 1x1
    projection where the shape changes, "C" projection on every block; ``plain=True`` removes every shortcut
    (``shortcut`` is then ignored); ``dim=1`` builds it from Conv1d/BatchNorm1d for (N, C, L) sequences;
    ``residual_scale`` gives every block y = relu(α·bn(...) + shortcut): a fixed α or "learnable" (α = 0 at init)."""
    return CifarResNet(depth, shortcut, plain, num_classes, in_channels, width, dim, backend=backend,
                       residual_scale=residual_scale)
