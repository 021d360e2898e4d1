"""fused_resnet: fused conv → BatchNorm → ReLU (+ residual add) ResNet blocks with matching backward passes.

Public API: ``FusedBasicBlock``, ``FusedBottleneck`` (drop-in for torchvision's blocks), ``convert`` / ``revert``,
``warm_up`` (build per-shape plans ahead, e.g. before a CUDA graph capture), ``available_backends``, ``models``
(resnet18..152, cifar_resnet), ``BlockSpec`` / ``Shortcut`` (what a block is, apart from its tensors) and
``backends`` (the registry; ``backends.reference`` is the pure-PyTorch backend).

Layers: spec → ops (torch.library) → functional → blocks → convert → models; ``backends/`` runs the ops,
``testing/`` checks them, ``tools/`` holds the command line (never imported by the library).
"""
from . import backends, models
from . import ops  # registers the torch.library ops  # noqa: F401
from .backends import available_backends
from .blocks import EagerBasicBlock, EagerBottleneck, FusedBasicBlock, FusedBottleneck, ShortcutA
from .convert import conversion_report, convert, revert
from .spec import BlockSpec, Shortcut
from .warmup import warm_up

__version__ = "0.1.0"

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "EagerBasicBlock",
    "EagerBottleneck",
    "ShortcutA",
    "BlockSpec",
    "Shortcut",
    "convert",
    "revert",
    "conversion_report",
    "warm_up",
    "available_backends",
    "backends",
    "models",
    "__version__",
]
