"""Model coverage: how many of a model's conv-BN units ``convert`` fuses, per backend, and why the others are not —
README's "Model coverage" table, recomputed by tests/test_coverage.py (``python -m fused_resnet.testing.coverage``
prints it).

Models are built with ``weights=None`` on the meta device (no memory, no initialisation: the whole table takes
seconds) and converted in place; nothing runs a forward. A unit is fused when a fused block or stem computes it
inside its op on the next call; every other unit is named by its kind (the stem, a block's shortcut, a whole block
left unfused) with the reason.
"""
from __future__ import annotations

import collections
import warnings
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

_TV = torchvision.models


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm  # imported only for these rows (seconds)

        return timm.create_model(name, pretrained=False, **kwargs)
    return make


# row label → (library, an unconverted model of it)
MODELS: Dict[str, Tuple[str, Callable[[], nn.Module]]] = {
    "resnet18": ("torchvision", lambda: _TV.resnet18(weights=None)),
    "resnet50": ("torchvision", lambda: _TV.resnet50(weights=None)),
    "resnet101": ("torchvision", lambda: _TV.resnet101(weights=None)),
    "resnext50_32x4d": ("torchvision", lambda: _TV.resnext50_32x4d(weights=None)),
    "resnext101_64x4d": ("torchvision", lambda: _TV.resnext101_64x4d(weights=None)),
    "wide_resnet50_2": ("torchvision", lambda: _TV.wide_resnet50_2(weights=None)),
    "fasterrcnn_resnet50_fpn (backbone)": ("torchvision", lambda: _TV.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None).backbone),
    "deeplabv3_resnet50 (backbone)": ("torchvision", lambda: _TV.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None).backbone),
    "timm resnet18": ("timm", _timm("resnet18")),
    "timm resnet26": ("timm", _timm("resnet26")),
    "timm resnet26d": ("timm", _timm("resnet26d")),
    "timm resnet26t": ("timm", _timm("resnet26t")),
    "timm resnet50d": ("timm", _timm("resnet50d")),
    "timm resnet101": ("timm", _timm("resnet101")),
    "timm resnext50_32x4d": ("timm", _timm("resnext50_32x4d")),
    "timm wide_resnet50_2": ("timm", _timm("wide_resnet50_2")),
    "timm seresnet50": ("timm", _timm("seresnet50")),
    "timm ecaresnet50d": ("timm", _timm("ecaresnet50d")),
    "timm resnet50 (drop_path_rate=0.05)": ("timm", _timm("resnet50", drop_path_rate=0.05)),
}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, FrozenBatchNorm2d)  # nn.SyncBatchNorm is a _BatchNorm as BatchNorm2d is


def library_available(library: str) -> bool:
    if library == "torchvision":
        return True
    import importlib.util

    return importlib.util.find_spec(library) is not None


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, _BNS) or type(m) is nn.SyncBatchNorm


def unit_count(model: nn.Module) -> int:
    """conv-BN units: in a ResNet every BN follows its own conv."""
    return sum(_is_bn(m) for m in model.modules())


def _residual_blocks(model: nn.Module) -> List[nn.Module]:
    """The residual blocks convert knows (fused or not), outermost only."""
    from ..convert import _TO_FUSED, _timm_blocks
    from ..blocks import _FusedForward

    found, inside = [], set()
    for m in model.modules():
        if id(m) in inside:
            continue
        t = type(m)
        timm_blocks = _timm_blocks(t)
        if isinstance(m, _FusedForward) or t in _TO_FUSED or (timm_blocks is not None and t in timm_blocks.TO_FUSED):
            found.append(m)
            inside.update(id(s) for s in m.modules())
    return found


def unfused_units(model: nn.Module) -> Tuple[int, Dict[str, int]]:
    """(fused units, {kind of unfused unit and why: count}) of a converted ``model``: the units its fused blocks
    and stems compute inside their ops on the next call, and every other unit named by what it is."""
    from ..blocks import FusedStemMixin, _FusedForward
    from ..convert import _unfusable_reason, _asked, _timm_blocks
    from ..spec import Shortcut

    fused, why = 0, collections.Counter()
    in_blocks = set()
    for block in _residual_blocks(model):
        bns = [m for m in block.modules() if _is_bn(m)]
        in_blocks.update(id(b) for b in bns)
        reason = block._blocker() if isinstance(block, _FusedForward) else None
        if not isinstance(block, _FusedForward) or reason is not None:
            if reason is None:
                timm_blocks = _timm_blocks(type(block))
                reason = (timm_blocks.unfusable_reason(block, _asked(block)) if timm_blocks is not None
                          else _unfusable_reason(block, _asked(block)))
            why[f"units of a block left unfused ({reason})"] += len(bns)
            continue
        inside = {id(b) for op in block._next_ops() for b in op}
        fused += len(inside)
        kind = block._structure()[2]
        for b in bns:
            if id(b) in inside:
                continue
            if kind == Shortcut.OPEN:
                why["shortcut BN of an se / drop_path block (its downsample module, in torch)"] += 1
            elif kind == Shortcut.TENSOR:
                why["shortcut BN (its downsample module, in torch; the op adds its output)"] += 1
            else:
                why["a BN the block's op does not compute"] += 1
    stem_bns = {id(b) for m in model.modules() if isinstance(m, FusedStemMixin) and m.backend is not None
                and m._stem_plan()[0] is None for _, b in m._stem_units()}
    stem_reason = model._stem_plan()[0] if isinstance(model, FusedStemMixin) and model.backend is not None else None
    for m in model.modules():
        if not _is_bn(m) or id(m) in in_blocks:
            continue
        if id(m) in stem_bns:
            fused += 1
        else:
            owner = type(model)
            label = f"timm's {owner.__name__}" if owner.__module__.startswith("timm.") else owner.__name__
            default = f"convert fuses the stems of torchvision's and timm's ResNet classes, not {label}'s"
            why[f"stem ({stem_reason or default})"] += 1
    return fused, dict(why)


def fused_unit_count(model: nn.Module) -> int:
    """The units a fused block or stem of ``model`` runs inside its op now (a block running eagerly counts none)."""
    return unfused_units(model)[0]


def build(name: str) -> nn.Module:
    """Model ``name`` of MODELS on the meta device (``weights=None``: nothing is allocated or initialised)."""
    with torch.device("meta"):
        return MODELS[name][1]()


def coverage_detail(name: str, backend: str) -> Tuple[int, int, Dict[str, int]]:
    """(fused units, units, {unfused kind and why: count}) of model ``name`` converted to ``backend``."""
    from ..convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convert's list of unfused blocks: counted here instead
        model = convert(build(name), backend=backend, inplace=True)
    fused, why = unfused_units(model)
    return fused, unit_count(model), why


def coverage(name: str, backend: str) -> Tuple[int, int]:
    """(fused units, units) of model ``name`` converted to ``backend``."""
    return coverage_detail(name, backend)[:2]


def cell(fused: int, total: int) -> str:
    return f"{fused}/{total} ({100 * fused / total:.0f}%)"


def why_cell(per_backend: Dict[str, Dict[str, int]]) -> str:
    """The table's last column: each kind of unfused unit, how many, and why; prefixed by the backends it applies
    to where they differ."""
    def words(why: Dict[str, int]) -> str:
        return "; ".join(f"{n} × {kind}" for kind, n in why.items())

    texts = {b: words(w) for b, w in per_backend.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values())) or "—"
    return "; ".join(f"`{b}`: {t or 'none'}" for b, t in texts.items())


def row(name: str, backend_names: Sequence[str]) -> List[str]:
    """A table row: the model, a cell per backend, the why column."""
    details = {b: coverage_detail(name, b) for b in backend_names}
    return [name, MODELS[name][0]] + [cell(*d[:2]) for d in details.values()] + [
        why_cell({b: d[2] for b, d in details.items()})]


HEADER_TAIL = "not fused (units × kind: why)"


def table(backend_names: Sequence[str]) -> str:
    """The markdown table: a row per model, a column per backend, each cell "fused/units (share)", and what is not
    fused and why."""
    lines = ["| model | library | " + " | ".join(f"`{b}`" for b in backend_names) + f" | {HEADER_TAIL} |",
             "|---|---|" + "---|" * len(backend_names) + "---|"]
    for name in MODELS:
        if library_available(MODELS[name][0]):
            lines.append("| " + " | ".join(row(name, backend_names)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from .. import backends

    print(table(backends.names()))
