"""Test setup. Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET must be set before any
Triton kernel is defined, so it is set here, before fused_resnet.kernels can be imported), and backend "cuda"
runs the extension's CPU registrations of its ops (FUSED_RESNET_EXT_ON_CPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FUSED_RESNET_EXT_ON_CPU", "1")

import pytest  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet import testing  # noqa: E402

GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run bench/gpu_suite.sh on the device machine)")
DEVICES = ["cpu"] + (["cuda"] if GPU else [])


@pytest.fixture(autouse=True)
def _seeded():
    """Module initialisation draws from the global RNG: seed it per test so no result depends on test order."""
    torch.manual_seed(0)


# Small models for whole-model tests: name → an unconverted model (torch's own for the ImageNet ResNets).
MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "cifar20-A": lambda: fused_resnet.models.cifar_resnet(20, "A", backend=None),
    "cifar20-B-1d": lambda: fused_resnet.models.cifar_resnet(20, "B", dim=1, in_channels=1, backend=None),
}


def make_block(case, fused: bool, backend: str = "reference"):
    """A block for one row of testing.BLOCK_CASES: torchvision's class where torchvision has the configuration,
    fused_resnet's eager twin otherwise (option A, plain), or the fused block."""
    kind, inplanes, planes, stride, shortcut, _ = case
    expansion = 1 if kind == "basic" else 4
    out = planes * expansion
    downsample = None
    if shortcut in ("B", "C"):
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))
    elif shortcut == "A":
        downsample = fused_resnet.ShortcutA(stride, out)
    elif shortcut == "tensor":  # avg-pool + projection ("ResNet-D"): added as a tensor by the fused op
        downsample = nn.Sequential(nn.AvgPool2d(stride), nn.Conv2d(inplanes, out, 1, bias=False), nn.BatchNorm2d(out))
    plain = shortcut == "plain"
    if fused:
        cls = fused_resnet.FusedBasicBlock if kind == "basic" else fused_resnet.FusedBottleneck
        return cls(inplanes, planes, stride, downsample, backend=backend, plain=plain)
    if shortcut in ("A", "plain"):
        cls = fused_resnet.EagerBasicBlock if kind == "basic" else fused_resnet.EagerBottleneck
        return cls(inplanes, planes, stride, downsample, plain=plain)
    cls = torchvision.models.resnet.BasicBlock if kind == "basic" else torchvision.models.resnet.Bottleneck
    return cls(inplanes, planes, stride, downsample)


def case_id(case) -> str:
    kind, inplanes, planes, stride, shortcut, nhw = case
    return f"{kind}-{inplanes}x{planes}-s{stride}-{shortcut}-N{nhw[0]}H{nhw[1]}W{nhw[2]}"


def assert_checks(checks, title=""):
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = [title, testing.TABLE_HEADER] + [c.row() for c in checks]
        pytest.fail("\n".join(lines))
