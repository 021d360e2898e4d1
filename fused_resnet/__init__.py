"""fused_resnet: fused conv → BatchNorm → ReLU (+ residual add) ResNet blocks with matching backward passes.

Public API: ``FusedBasicBlock``, ``FusedBottleneck`` (drop-in for torchvision's blocks), ``convert`` / ``revert``,
``available_backends``, ``models`` (resnet18..152, cifar_resnet) and ``reference`` (the pure-PyTorch backend).
"""
from . import ops  # registers the torch.library ops  # noqa: F401
from . import cuda_backend  # registers backend "cuda" (the C++/CUDA extension, when it was built)  # noqa: F401
from . import triton_backend  # registers backend "triton" (Triton itself is imported on first use)  # noqa: F401
from . import models, reference
from .backends import available_backends
from .convert import convert, revert
from .modules import EagerBasicBlock, EagerBottleneck, FusedBasicBlock, FusedBottleneck, ShortcutA

__version__ = "0.1.0"

__all__ = [
    "FusedBasicBlock",
    "FusedBottleneck",
    "EagerBasicBlock",
    "EagerBottleneck",
    "ShortcutA",
    "convert",
    "revert",
    "available_backends",
    "models",
    "reference",
    "__version__",
]
