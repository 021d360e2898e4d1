"""timm's ResNet family (``timm.models.resnet``: resnet18..152, the "-d" and "-t" variants, wide and deep-stem
ResNets, and the SE / ECA ResNets and stochastic-depth models built from the same blocks) fused in place, like
torchvision's blocks: the block keeps its class's submodules, parameters and state_dict keys, and runs the fused op
while its structure is what the kernels implement.

A timm block fuses when its inner activations are ``nn.ReLU`` and its drop_block and anti-aliasing layers are
identities. Without a squeeze-excitation / attention module (``se``) the op computes the whole block: its last
activation must be ``nn.ReLU`` too, and its shortcut is the identity, a projection ``Sequential(conv, bn)`` (the
"-d" variants' ``Sequential(pool, conv, bn)`` too, its average pool computed inside the op's projection conv on a
backend that declares ``avg_pool``, an nn.Identity in the pool's slot skipped), or any other downsample module,
whose output enters the op as a tensor (a conv-BN after a module of its own: computed by an op of its own, a
one-unit open block, after that module in torch). Stochastic depth
(timm's ``DropPath``, unhooked) is then part of the op's closing on a backend that declares ``drop_path``: the
block draws timm's per-sample mask itself, with timm's call on the same generator at the same point of the forward
(before the shortcut's downsample), so a seeded run drops the same samples.

Otherwise — an ``se``, a drop_path the op does not compute (another module, hooked, or a backend without the
capability), a last activation other than ``nn.ReLU`` beside a drop_path — the block is *open*
(``Shortcut.OPEN``): the op runs the chain of conv-BN(-ReLU) units and returns the last BN's output, and the
closing runs in torch exactly as timm's forward does — its own ``se``, then its ``drop_path`` (timm's module: the
same random draws), then its shortcut on the block input (a projection's conv-BN again an op of its own), the add
and its last activation (any module). A block that fits neither is left as it is (``convert`` says why); a block
changed after conversion runs timm's own forward for that call.

Imported by ``convert`` only when a model holds timm blocks (importing timm takes seconds).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from timm.layers import DropPath
from timm.models import resnet as timm_resnet
from torch import Tensor, nn

from . import backends, guard
from .blocks import FusedBasicBlock, FusedStemMixin, _FusedForward, fused_away, geometry_reason, settings_reason
from .spec import BlockSpec, Shortcut, UnitSpec

_OPTIONAL_IDENTITIES = ("drop_block", "aa")  # nn.Identity when unused


def _units(block: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
    n = 3 if hasattr(block, "conv3") else 2
    return [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1)]


# what a backend's drop_path capability is asked about: only the capability and a closing matter
_CLOSED = BlockSpec((UnitSpec(),), Shortcut.NONE)


def drop_path_closes(block: nn.Module, backend: Optional[str] = None) -> bool:
    """Whether the op computes this block's stochastic depth in its closing on ``backend`` (None: the block's):
    timm's DropPath, unhooked, no ``se`` before it, nn.ReLU last, and a backend that declares ``drop_path``."""
    dp, last = block.drop_path, getattr(block, _last_activation(block))
    return (block.se is None and type(dp) is DropPath and not guard.hooked(dp) and type(last) is nn.ReLU
            and backends.drop_path_refusal(backend or getattr(block, "backend", "auto"), _CLOSED) is None)


def is_open(block: nn.Module, backend: Optional[str] = None) -> bool:
    """Whether the block's closing runs in torch (on ``backend``; None: the block's): an ``se`` module, or a
    ``drop_path`` the op does not compute (:func:`drop_path_closes`), sits between its last BN and the add."""
    return block.se is not None or (block.drop_path is not None and not drop_path_closes(block, backend))


def _last_activation(block: nn.Module) -> str:
    return f"act{len(_units(block))}"


def unfusable_reason(block: nn.Module, backend: Optional[str] = None) -> Optional[str]:
    """Why this timm block (fused or not) cannot run fused on ``backend`` (None: its own, or auto), or why a fused
    one runs its eager computation now, or None."""
    backend = backend or getattr(block, "backend", "auto")
    units, open_ = _units(block), is_open(block, backend)
    return (geometry_reason(units, backend, shortcut=Shortcut.OPEN if open_ else Shortcut.NONE)
            or structure_reason(block, backend) or settings_reason(block, units, shortcut=not open_))


def structure_reason(block: nn.Module, backend: Optional[str] = None) -> Optional[str]:
    """Why the submodules of this timm block are not what the kernels implement (slots, types, hooks), or None.
    An open block's se, drop_path, downsample and last activation run as themselves: any module, hooks allowed."""
    for name in _OPTIONAL_IDENTITIES:
        if type(getattr(block, name)) is not nn.Identity:
            return f"{name} is {type(getattr(block, name)).__name__}"
    units, open_ = _units(block), is_open(block, backend)
    fused_acts = len(units) - 1 if open_ else len(units)
    activations = {f"act{i}": getattr(block, f"act{i}") for i in range(1, fused_acts + 1)}
    away = fused_away(units, activations, None if open_ else block.downsample)
    if not open_ and block.drop_path is not None:
        away["drop_path"] = block.drop_path
    away.update({name: getattr(block, name) for name in _OPTIONAL_IDENTITIES})
    return guard.blocker(units, activations, away)


class _TimmLayout:
    """The parts of a timm block the fused forward needs: its units, its blocker, its structure (open where timm's
    closing is not the op's), its closing and its eager forward."""

    _timm_cls: type = nn.Module

    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        return _units(self)

    def _structure_blocker(self) -> Optional[str]:
        return structure_reason(self, self.backend)

    def _structure(self):
        if is_open(self, self.backend):
            units = self._units()
            return [c for c, _ in units], [b for _, b in units], Shortcut.OPEN, 1, None
        return super()._structure()

    def _close(self, y: Tensor, x: Tensor, shortcut: Callable[[], Tensor]) -> Tensor:
        """timm's closing after its last BN, its own modules called in its order (their random draws are timm's);
        ``shortcut()`` is its downsample's value (a fused projection's op, or the module itself)."""
        out = y
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        sc = shortcut()
        if out is y or out._base is y:  # the op's output, saved for its backward: not modified in place
            out = out + sc
        else:
            out += sc  # timm's in-place add
        return getattr(self, _last_activation(self))(out)

    def _sample_scale(self, x: Tensor) -> Optional[Tensor]:
        """timm's drop_path mask for this call where the op computes it (training, drop_prob > 0): drawn as timm's
        drop_path draws it — ``bernoulli_(keep)`` on an [N] tensor in the last BN output's dtype, divided by keep
        where scale_by_keep — so the generator advances as in timm's forward and the same samples drop."""
        dp = self.drop_path
        if dp is None or not dp.training or dp.drop_prob == 0.0:
            return None
        keep = 1.0 - dp.drop_prob
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        scale = torch.empty((x.shape[0],), dtype=dtype, device=x.device).bernoulli_(keep)
        if keep > 0.0 and dp.scale_by_keep:
            scale.div_(keep)
        return scale

    def _torch_children(self) -> Tuple[str, ...]:
        return ("se", "drop_path", "downsample", _last_activation(self)) if is_open(self) else ()

    def _torch_part(self) -> Optional[str]:
        if not is_open(self):
            return super()._torch_part()
        reason, planned = self._call_plan()
        shortcut = None if reason is not None else planned[2]
        parts = [f"{name} ({type(getattr(self, name)).__name__})" for name in ("se", "drop_path")
                 if getattr(self, name) is not None]
        units = "conv-BN units fused"
        if shortcut is not None:
            first = "" if shortcut[0] is None else f", after its {type(shortcut[0]).__name__} in torch"
            pool = "" if shortcut[3] is None else f", its {type(shortcut[3]).__name__} inside"
            units += f" (the shortcut's as an op of its own{first}{pool})"
        elif self.downsample is not None:
            parts.append(f"downsample ({type(self.downsample).__name__})")
        last = _last_activation(self)
        return (f"{units}; closing in torch: {', '.join(parts)}, + shortcut, {last} "
                f"({type(getattr(self, last)).__name__})")

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


# Why the deep stem stays timm's: measured, not assumed (docs/NUMERICS.md, "timm's deep stem").
DEEP_STEM = "timm's deep stem runs in torch: fused, its first BN's gradient broke the 2x rule (docs/NUMERICS.md)"


class FusedTimmResNet(FusedStemMixin, timm_resnet.ResNet):
    """timm's ResNet with its 7x7 stem (conv1, bn1, act1) fused as one op in ``forward_features`` (what
    ``forward`` calls). The "-d" / "-t" deep stem (a Sequential of three convs with BNs and ReLUs between them),
    ``forward_intermediates`` and gradient checkpointing run timm's own stem modules. ``convert`` turns timm's
    ResNet into this class in place (no new parameters or buffers: the state_dict is unchanged)."""

    _stem_act = "act1"

    def _stem_layout(self):
        return DEEP_STEM if type(self.conv1) is nn.Sequential else super()._stem_layout()

    def forward_features(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing:  # timm's own checkpointed pass, its stem included
            return timm_resnet.ResNet.forward_features(self, x)
        x = self.maxpool(self._stem(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


TO_FUSED = {timm_resnet.BasicBlock: FusedTimmBasicBlock, timm_resnet.Bottleneck: FusedTimmBottleneck}
TO_FUSED_MODEL = {timm_resnet.ResNet: FusedTimmResNet}
TO_TIMM_MODEL = {fused: timm_cls for timm_cls, fused in TO_FUSED_MODEL.items()}
TO_TIMM = {fused: timm_cls for timm_cls, fused in TO_FUSED.items()}
