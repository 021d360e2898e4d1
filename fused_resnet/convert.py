"""``convert`` swaps fused blocks into an existing model; ``revert`` swaps plain torch blocks back.

Both work by changing a block's class in place (the fused and torch blocks share one layout), so parameters,
buffers, hooks and state_dict keys are carried unchanged; with ``inplace=False`` (the default) the model is
deep-copied first.
"""
from __future__ import annotations

import copy
import warnings
from typing import List, Optional

import torchvision
from torch import Tensor, nn

from . import backends
from . import guard
from .blocks import (EagerBasicBlock, EagerBottleneck, FusedBasicBlock, FusedBottleneck, FusedStemMixin,
                     IntermediateLayerGetter, ResNet, ShortcutA, _FusedForward, block_blocker, geometry_reason,
                     residual_scale_of)
from .warmup import unit_routes

_TV = torchvision.models.resnet
_TO_FUSED = {
    _TV.BasicBlock: FusedBasicBlock,
    _TV.Bottleneck: FusedBottleneck,
    EagerBasicBlock: FusedBasicBlock,
    EagerBottleneck: FusedBottleneck,
}
_TO_EAGER = {FusedBasicBlock: (_TV.BasicBlock, EagerBasicBlock), FusedBottleneck: (_TV.Bottleneck, EagerBottleneck)}
# torchvision's modules whose stem convert fuses (a subclass of each: same submodules and state), and back
_STEM_FUSED = {_TV.ResNet: ResNet, torchvision.models._utils.IntermediateLayerGetter: IntermediateLayerGetter}
_STEM_UNFUSED = {fused: tv for tv, fused in _STEM_FUSED.items()}


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy sharing the process groups of its SyncBatchNorms (a group is a handle to the processes; it
    cannot be copied)."""
    memo = {id(m.process_group): m.process_group for m in model.modules()
            if isinstance(m, nn.SyncBatchNorm) and m.process_group is not None}
    return copy.deepcopy(model, memo)


_ASKED_ATTR = "_fused_resnet_asked"  # in the __dict__ of a block convert left unfused: the backend it was asked for


def _unfusable_reason(block: nn.Module, backend: str) -> Optional[str]:
    units = block._units() if hasattr(block, "_units") else _tv_units(block)
    return block_blocker(block, units) or geometry_reason(units, backend, residual_scale_of(block) is not None)


def _tv_units(block: nn.Module):
    n = 3 if isinstance(block, _TV.Bottleneck) else 2
    return [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, n + 1)]


def _timm_blocks(t: type):
    """fused_resnet.timm_blocks when ``t`` is one of timm's ResNet block classes (or their fused twins), else
    None; imported only then (importing timm takes seconds)."""
    if t.__module__ in ("timm.models.resnet", "fused_resnet.timm_blocks") and (
            t.__name__.endswith(("BasicBlock", "Bottleneck"))):
        from . import timm_blocks

        return timm_blocks
    return None


def _timm_model(t: type):
    """fused_resnet.timm_blocks when ``t`` is timm's ResNet class itself (not a subclass: its forward may differ),
    else None."""
    if t.__module__ == "timm.models.resnet" and t.__name__ == "ResNet":
        from . import timm_blocks

        return timm_blocks if t in timm_blocks.TO_FUSED_MODEL else None
    return None


def _fuse(m: nn.Module, fused_cls: type, backend: str, path: str) -> None:
    """Turn block ``m`` into ``fused_cls`` in place (a subclass of its class: same submodules and state)."""
    if not hasattr(m, "plain"):  # torchvision's and timm's blocks: always a shortcut, always 2-D
        m.plain, m.dim = False, 2
    m.__dict__.pop(_ASKED_ATTR, None)
    m.__class__ = fused_cls
    _retarget(m, backend, path)


def _retarget(m: nn.Module, backend: str, path: str) -> None:
    m.backend = backend
    m._call_plan()  # the spec, built now rather than on the first call
    guard.set_name(m, path or "<root>")


def _convert(m: nn.Module, backend: str, skipped: List[str], path: str) -> None:
    t = type(m)
    timm_blocks = _timm_blocks(t)
    if isinstance(m, _FusedForward):
        _retarget(m, backend, path)
    elif t in _TO_FUSED or (timm_blocks is not None and t in timm_blocks.TO_FUSED):
        reason = _unfusable_reason(m, backend) if t in _TO_FUSED else timm_blocks.unfusable_reason(m, backend)
        if reason is not None:
            skipped.append(f"{path or '<root>'} ({reason})")
            m.__dict__[_ASKED_ATTR] = backend  # conversion_report says why for the backend convert was asked for
            return
        _fuse(m, _TO_FUSED[t] if t in _TO_FUSED else timm_blocks.TO_FUSED[t], backend, path)
        return
    elif t in _STEM_FUSED or (timm_model := _timm_model(t)) is not None:
        m.__class__ = _STEM_FUSED[t] if t in _STEM_FUSED else timm_model.TO_FUSED_MODEL[t]
        m.backend = backend
        guard.set_name(m, path or type(m).__name__)
    elif isinstance(m, FusedStemMixin):
        m.backend = backend
        guard.set_name(m, path or type(m).__name__)
    for name, child in m.named_children():
        _convert(child, backend, skipped, f"{path}.{name}" if path else name)


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False, sync_bn: bool = False,
            process_group=None) -> nn.Module:
    """Return ``model`` with every torchvision / fused_resnet BasicBlock and Bottleneck running on fused ops, and
    the stem fused for torchvision's and timm's ResNet classes and fused_resnet models. Already-fused blocks are
    re-targeted to ``backend``. Blocks that cannot be fused (a conv geometry the backend does not declare in its capabilities:
    every registered backend declares groups and dilation, one registered with fewer may not; a norm layer other
    than BatchNorm, another activation than nn.ReLU, hooks on their submodules) stay as they are, with one warning
    listing them and why; a model in which nothing could be fused (e.g. other libraries' blocks) gets a warning
    saying so.

    ``sync_bn=True`` first turns every BatchNorm into ``nn.SyncBatchNorm`` over ``process_group`` (None: the
    default group), as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does; SyncBatchNorms already in the model keep
    their groups. A fused unit with a SyncBatchNorm reduces its statistics over the group wherever torch would
    (training, torch.distributed initialised, more than one process): see fused_resnet.distributed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    backends.check_requested(backend)
    if not inplace:
        model = _copy(model)
    if sync_bn:
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
        if converted is not model:  # the model itself was a BatchNorm
            model = converted
    skipped: List[str] = []
    _convert(model, backend, skipped, "")
    if skipped:
        warnings.warn(
            f"fused_resnet.convert left {len(skipped)} block(s) unfused: {', '.join(skipped)} "
            f"(fused_resnet.conversion_report(model) lists every block)", RuntimeWarning,
            stacklevel=2,
        )
    if not any(isinstance(m, (_FusedForward, FusedStemMixin)) for m in model.modules()):
        warnings.warn(
            f"fused_resnet.convert fused nothing in this {type(model).__name__}: it fuses the BasicBlock / "
            f"Bottleneck of torchvision, timm and fused_resnet and those ResNets' stems, and found none it could fuse",
            RuntimeWarning, stacklevel=2)
    return model


def conversion_report(model: nn.Module, example: Optional[Tensor] = None, train: Optional[bool] = None) -> str:
    """One line per residual block and stem that convert knows, in module order: fused (and on which backend), or
    why it runs its eager computation now, or why convert left it unfused. With an ``example`` input (and the
    autocast state now; ``train``: the training step or eval, by default the model's mode), each fused block whose
    backend has more than one route per unit (backend cuda: its cuDNN graphs or the unfused path) also gets one
    line per unit saying what it runs for that input."""
    routes = {} if example is None else unit_routes(model, example, train)
    lines = []
    for name, m in model.named_modules():
        path = name or "<root>"
        t = type(m)
        timm_blocks = _timm_blocks(t)
        if isinstance(m, _FusedForward):
            reason = m._blocker()
            part = m._torch_part() if reason is None else None
            status = (f"fused, backend {m.backend!r}{_auto_note(m)}{'' if part is None else f'; {part}'}"
                      if reason is None else f"fused, runs eagerly now: {reason}")
        elif t in _TO_FUSED:
            status = f"not fused: {_unfusable_reason(m, _asked(m)) or 'convert has not run on it'}"
        elif timm_blocks is not None and t in timm_blocks.TO_FUSED:
            status = f"not fused: {timm_blocks.unfusable_reason(m, _asked(m)) or 'convert has not run on it'}"
        elif isinstance(m, FusedStemMixin):
            layout = m._stem_layout()
            status = "stem fused" if m.backend is not None else "stem not fused"
            if m.backend is not None and isinstance(layout, str):  # not a chain the op computes
                status = f"stem not fused: {layout}"
            elif m.backend is not None:
                reason = m._stem_plan()[0]
                status += (f", backend {m.backend!r}{_auto_note(m)}" if reason is None
                           else f", runs eagerly now: {reason}")
        else:
            continue
        lines.append(f"{path:<24} {t.__name__:<22} {status}")
        lines += [f"{'':<26}{route}" for route in routes.get(path, [])]
    if not lines:
        return f"no residual block or stem that fused_resnet knows in this {type(model).__name__}"
    return "\n".join(lines)


def _auto_note(m: nn.Module) -> str:
    """What backend auto runs for a module whose parameters are off the GPU (what its next call gets)."""
    if m.backend != "auto":
        return ""
    device = next(m.parameters(), None)
    device_type = "cpu" if device is None else device.device.type
    return f" (on {device_type} tensors: torch's own modules)" if backends.auto_runs_eager(device_type) else ""


def _asked(block: nn.Module) -> str:
    return block.__dict__.get(_ASKED_ATTR, "auto")


def _forget(m: nn.Module) -> None:
    """Drop what a fused module keeps in its __dict__ (spec, guard and name caches) when it stops being fused."""
    for key in [k for k in vars(m) if k.startswith("_fused_resnet")]:
        del m.__dict__[key]


def _revert(m: nn.Module) -> None:
    t = type(m)
    timm_blocks = _timm_blocks(t)
    if t in _TO_EAGER:
        tv_cls, eager_cls = _TO_EAGER[t]
        torchvision_like = (not m.plain and m.dim == 2 and type(m.downsample) is not ShortcutA
                            and residual_scale_of(m) is None)
        del m.backend
        _forget(m)
        if torchvision_like:
            del m.plain, m.dim
        m.__class__ = tv_cls if torchvision_like else eager_cls
        return
    if timm_blocks is not None and t in timm_blocks.TO_TIMM:
        del m.backend, m.plain, m.dim
        _forget(m)
        m.__class__ = timm_blocks.TO_TIMM[t]
        return
    if t in _STEM_UNFUSED:
        del m.backend
        m.__class__ = _STEM_UNFUSED[t]
    elif t.__module__ == "fused_resnet.timm_blocks" and t.__name__ == "FusedTimmResNet":
        from . import timm_blocks

        del m.backend
        m.__class__ = timm_blocks.TO_TIMM_MODEL[t]
    elif isinstance(m, FusedStemMixin):
        m.backend = None
    _forget(m)
    for child in m.children():
        _revert(child)


def revert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` computed by plain torch modules again: fused blocks become torchvision's BasicBlock /
    Bottleneck where torchvision has the configuration, else fused_resnet's eager twins (option A, plain, 1-D, a
    residual scale)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = _copy(model)
    _revert(model)
    return model
