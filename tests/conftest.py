"""Test setup. Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET must be set before any
Triton kernel is defined, so it is set here, before fused_resnet.kernels can be imported), and backend "cuda"
runs the extension's CPU registrations of its ops (FUSED_RESNET_EXT_ON_CPU)."""
import contextlib
import copy
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
from fused_resnet.backends import registry  # noqa: E402
from fused_resnet.spec import BlockSpec, Shortcut, UnitSpec  # noqa: E402

GPU = torch.cuda.is_available()
_NEEDS_GPU = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run bench/gpu_suite.sh on the device machine)")


def requires_gpu(test):
    """Skip without a GPU; marked ``gpu`` so that ``pytest -m gpu`` (bench/gpu_suite.sh quick) selects it."""
    return pytest.mark.gpu(_NEEDS_GPU(test))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs only on a CUDA GPU (selected by bench/gpu_suite.sh quick)")
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


@contextlib.contextmanager
def registered(backend):
    """Register a test backend for the duration of a ``with`` block (replacing one of the same name), with fresh
    resolutions and one-time warnings before and after."""
    saved = dict(registry._REGISTRY)
    registry._warned.clear()
    registry.register(backend)
    try:
        yield backend
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)
        registry._warned.clear()
        registry.refresh()


def block_problem(shortcut: Shortcut, n_units: int, batch_stats: bool, groups: int = 1, dilation: int = 1,
                  seed: int = 0, avg_pool: int = 1) -> dict:
    """Random float64 inputs of the block ops and their spec: n_units main convs (3x3 for 1-2 units, 1x1-3x3-1x1
    for 3) plus a 1x1 projection for Shortcut.PROJECTION. Shape-changing shortcuts (projection, option A) use
    stride 2 and 4 → 6 channels; the others keep 6 channels and stride 1. groups/dilation apply to the 3x3 of a
    3-unit chain. ``avg_pool`` k: the projection (or, without one, the first unit) reads the input average-pooled
    by k (timm's "-d" shortcut; a pooled projection has stride 1), on a 5x4 input: the last row's windows are cut."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    changes = shortcut in (Shortcut.PROJECTION, Shortcut.OPTION_A)
    cin, cmid, cout, stride = (4, 6, 6, 2) if changes else (6, 6, 6, 1)
    if n_units == 3:  # (out, in, k, groups, dilation, stride)
        convs = [(cmid, cin, 1, 1, 1, 1), (cmid, cmid, 3, groups, dilation, stride), (cout, cmid, 1, 1, 1, 1)]
    elif n_units == 2:
        convs = [(cmid, cin, 3, 1, 1, stride), (cout, cmid, 3, 1, 1, 1)]
    else:
        convs = [(cout, cin, 3, 1, 1, stride)]
    if shortcut == Shortcut.PROJECTION:
        convs.append((cout, cin, 1, 1, 1, 1 if avg_pool > 1 else stride))
    pooled = len(convs) - 1 if shortcut == Shortcut.PROJECTION else 0
    units = tuple(UnitSpec((st, st), (d * (k // 2),) * 2, (d, d), gr, 1e-5, 0.1, batch_stats, batch_stats,
                           avg_pool=avg_pool if i == pooled else 1)
                  for i, (_, _, k, gr, d, st) in enumerate(convs))
    spec = BlockSpec(units, shortcut, (stride, stride) if shortcut == Shortcut.OPTION_A else (1, 1))
    out_hw = tuple(spec.output_shapes((2, cin, 5, 4), [(o, i // gr, k, k) for o, i, k, gr, _, _ in convs])
                   [spec.n_main - 1][2:])
    return dict(
        x=rnd(2, cin, 5, 4).requires_grad_(),
        weights=[rnd(o, i // gr, k, k).requires_grad_() for o, i, k, gr, _, _ in convs],
        gammas=[(rnd(c[0]) * 0.3 + 1).requires_grad_() for c in convs],
        betas=[(rnd(c[0]) * 0.3).requires_grad_() for c in convs],
        running_means=[rnd(c[0]) * 0.1 for c in convs],
        running_vars=[rnd(c[0]).abs() + 0.5 for c in convs],
        residual=rnd(2, cout, *out_hw).requires_grad_() if shortcut == Shortcut.TENSOR else None,
        spec=spec,
    )


def op_args(problem: dict, backend: str = "reference", sample_scale=None) -> tuple:
    """The flat arguments of fused_resnet::block_forward for a block_problem (``sample_scale``: stochastic
    depth's per-sample d, None: none)."""
    p = problem
    return (p["x"], p["weights"], p["gammas"], p["betas"], p["running_means"], p["running_vars"], p["residual"],
            p["spec"].ints, p["spec"].floats, backend, sample_scale)


GRADCHECK_CASES = [
    # (shortcut, units, batch_stats, groups, dilation)
    (Shortcut.IDENTITY, 2, True, 1, 1),
    (Shortcut.IDENTITY, 3, True, 1, 1),
    (Shortcut.PROJECTION, 2, True, 1, 1),
    (Shortcut.PROJECTION, 3, True, 1, 1),
    (Shortcut.OPTION_A, 2, True, 1, 1),
    (Shortcut.TENSOR, 2, True, 1, 1),
    (Shortcut.NONE, 1, True, 1, 1),
    (Shortcut.NONE, 2, False, 1, 1),
    (Shortcut.OPEN, 2, True, 1, 1),
    (Shortcut.PROJECTION, 3, False, 1, 1),
    (Shortcut.IDENTITY, 3, True, 2, 2),
]


def gradcheck_id(case) -> str:
    return f"{case[0].name.lower()}-u{case[1]}-bs{int(case[2])}-g{case[3]}-d{case[4]}"


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


def check_frozen_bn_and_no_input_grad(tv: nn.Module, backend: str, device) -> None:
    """A BN frozen in eval inside a training block (torchvision Bottleneck ``tv``, 16 channels, its bn2 frozen) uses
    running statistics (da = s·dz) and still gets γ/β gradients, checked against float64 with the rule; an input
    that needs no gradient skips the first dgrad."""
    tv = tv.to(device)
    fused = fused_resnet.convert(tv, backend=backend)
    oracle = copy.deepcopy(tv).double()
    for m in (tv, fused, oracle):
        m.train()
        m.bn2.eval()
    x = torch.randn(2, 16, 5, 5).to(device)
    for m, inp in ((fused, x.clone().requires_grad_(True)), (tv, x.clone().requires_grad_(True)),
                   (oracle, x.double())):
        m(inp).square().sum().backward()
    for (name, p_f), p_t, p_o in zip(fused.named_parameters(), tv.parameters(), oracle.parameters(), strict=True):
        c = testing.check(name, p_f.grad, p_o.grad, p_t.grad, p_o.grad, torch.float32)
        assert c.ok, c.row()
    assert fused.bn2.num_batches_tracked.item() == 0 and fused.bn1.num_batches_tracked.item() == 1
    fused.zero_grad()
    fused(x).sum().backward()  # x needs no gradient: the first dgrad is skipped
    assert all(p.grad is not None for p in fused.parameters())


def case_id(case) -> str:
    kind, inplanes, planes, stride, shortcut, nhw = case
    return f"{kind}-{inplanes}x{planes}-s{stride}-{shortcut}-N{nhw[0]}H{nhw[1]}W{nhw[2]}"


def assert_checks(checks, title=""):
    bad = [c for c in checks if not c.ok]
    if bad:
        lines = [title, testing.TABLE_HEADER] + [c.row() for c in checks]
        pytest.fail("\n".join(lines))
