"""Model coverage: how many of a model's conv-BN units ``convert`` fuses, per backend — README's "Model coverage"
table, recomputed by tests/test_coverage.py (``python -m fused_resnet.testing.coverage`` prints it)."""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Sequence, Tuple

import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

MODELS: Dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "resnet50": lambda: torchvision.models.resnet50(weights=None),
    "resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(weights=None),
    "wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(weights=None),
    "deeplabv3_resnet50 (backbone)": lambda: torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None).backbone,
}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, FrozenBatchNorm2d)  # nn.SyncBatchNorm is a _BatchNorm as BatchNorm2d is


def unit_count(model: nn.Module) -> int:
    """conv-BN units: in a ResNet every BN follows its own conv."""
    return sum(isinstance(m, _BNS) or type(m) is nn.SyncBatchNorm for m in model.modules())


def fused_unit_count(model: nn.Module) -> int:
    """The units a fused block or stem of ``model`` runs inside its op now (a block running eagerly counts none)."""
    from ..blocks import FusedStemMixin, _FusedForward

    fused = 0
    for m in model.modules():
        if isinstance(m, _FusedForward) and m._blocker() is None:
            fused += len(m._structure()[0])
        if isinstance(m, FusedStemMixin) and m.backend is not None and m._stem_blocker() is None:
            fused += 1
    return fused


def coverage(name: str, backend: str) -> Tuple[int, int]:
    """(fused units, units) of model ``name`` converted to ``backend``."""
    from ..convert import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # convert's list of unfused blocks: counted here instead
        model = convert(MODELS[name](), backend=backend, inplace=True)
    return fused_unit_count(model), unit_count(model)


def cell(fused: int, total: int) -> str:
    return f"{fused}/{total} ({100 * fused / total:.0f}%)"


def table(backend_names: Sequence[str]) -> str:
    """The markdown table: a row per model, a column per backend, each cell "fused/units (share)"."""
    lines = ["| model | " + " | ".join(f"`{b}`" for b in backend_names) + " |",
             "|---|" + "---|" * len(backend_names)]
    for name in MODELS:
        lines.append(f"| {name} | " + " | ".join(cell(*coverage(name, b)) for b in backend_names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    from .. import backends

    print(table(backends.names()))
