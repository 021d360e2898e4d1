"""timm's ResNet family (``timm.models.resnet``: resnet18..152, the "-d" and "-t" variants, wide and deep-stem
ResNets) fused in place, like torchvision's blocks: the block keeps its class's submodules, parameters and
state_dict keys, and runs the fused op while its structure is what the kernels implement.

A timm block fuses when its activations (act1, act2, act3) are ``nn.ReLU``, its drop_block and anti-aliasing
layers are identities, and it has no squeeze-excitation / attention module (``se``) and no stochastic depth
(``drop_path``). Its shortcut is the identity, a projection ``Sequential(conv, bn)``, or any other downsample
module (the "-d" variants' avg-pool + conv + BN), whose output enters the op as a tensor. Otherwise the block is
left as it is (``convert`` says why); a block changed after conversion runs timm's own forward for that call.

Imported by ``convert`` only when a model holds timm blocks (importing timm takes seconds).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from timm.models import resnet as timm_resnet
from torch import Tensor, nn

from . import guard
from .blocks import FusedBasicBlock, _FusedForward, fused_away, geometry_reason, settings_reason

_OPTIONAL_IDENTITIES = ("drop_block", "aa")  # nn.Identity when unused
_ABSENT = ("se", "drop_path")  # None when unused


def _units(block: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    n = 3 if hasattr(block, "conv3") else 2
    return [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1)]


def unfusable_reason(block: nn.Module, backend: Optional[str] = None) -> Optional[str]:
    """Why this timm block (fused or not) cannot run fused on ``backend`` (None: its own, or auto), or why a fused
    one runs its eager computation now, or None."""
    units = _units(block)
    return (geometry_reason(units, backend or getattr(block, "backend", "auto")) or structure_reason(block)
            or settings_reason(block, units))


def structure_reason(block: nn.Module) -> Optional[str]:
    """Why the submodules of this timm block are not what the kernels implement (slots, types, hooks), or None."""
    if block.se is not None:
        return f"se is {type(block.se).__name__} (attention runs between BN and the residual add)"
    if block.drop_path is not None:
        return f"drop_path is {type(block.drop_path).__name__} (stochastic depth)"
    for name in _OPTIONAL_IDENTITIES:
        if type(getattr(block, name)) is not nn.Identity:
            return f"{name} is {type(getattr(block, name)).__name__}"
    units = _units(block)
    activations = {f"act{i}": getattr(block, f"act{i}") for i in range(1, len(units) + 1)}
    away = fused_away(units, activations, block.downsample)
    away.update({name: getattr(block, name) for name in _OPTIONAL_IDENTITIES})
    return guard.blocker(units, activations, away)


class _TimmLayout:
    """The parts of a timm block the fused forward needs: its units, its blocker and its eager forward."""

    _timm_cls: type = nn.Module

    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        return _units(self)

    def _structure_blocker(self) -> Optional[str]:
        return structure_reason(self)

    def _eager(self, x: Tensor) -> Tensor:
        return self._timm_cls.forward(self, x)


class FusedTimmBasicBlock(_TimmLayout, _FusedForward, timm_resnet.BasicBlock):
    """timm's BasicBlock computed by the fused op (see the module docstring)."""

    _timm_cls = timm_resnet.BasicBlock
    extra_repr = FusedBasicBlock.extra_repr


class FusedTimmBottleneck(_TimmLayout, _FusedForward, timm_resnet.Bottleneck):
    """timm's Bottleneck computed by the fused op (see the module docstring)."""

    _timm_cls = timm_resnet.Bottleneck
    extra_repr = FusedBasicBlock.extra_repr


TO_FUSED = {timm_resnet.BasicBlock: FusedTimmBasicBlock, timm_resnet.Bottleneck: FusedTimmBottleneck}
TO_TIMM = {fused: timm_cls for timm_cls, fused in TO_FUSED.items()}
