"""Bad input gets torch's error type (and a message naming what was expected), raised before any state changes;
unsupported configurations fall back to reference with a one-time warning, never a wrong number."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet
from fused_resnet import backends
from fused_resnet.backends import reference
from fused_resnet.spec import BlockSpec, UnitSpec

from conftest import registered

TV = torchvision.models.resnet


def _pair():
    tv = TV.BasicBlock(8, 8)
    return tv, fused_resnet.convert(tv, backend="reference")


BAD_INPUTS = [
    ("integer dtype", lambda: torch.randint(0, 5, (2, 8, 4, 4)), RuntimeError, "floating-point"),
    ("wrong channels", lambda: torch.randn(2, 4, 4, 4), RuntimeError, "to have 8 channels, but got 4"),
    ("3-D input", lambda: torch.randn(8, 4, 4), ValueError, "expected 4D input"),
    ("5-D input", lambda: torch.randn(1, 8, 1, 1, 1), RuntimeError, "Expected 3D \\(unbatched\\) or 4D"),
    ("one value per channel", lambda: torch.randn(1, 8, 1, 1), ValueError, "more than 1 value per channel"),
    ("dtype mismatch", lambda: torch.randn(2, 8, 4, 4, dtype=torch.float64), RuntimeError, "dtype"),
]


@pytest.mark.parametrize("name,make,exc,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_same_error_type_as_torch_and_no_state_change(name, make, exc, match):
    tv, fused = _pair()
    x = make()
    with pytest.raises(exc):
        tv(x)
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(exc, match=match):
        fused(x)
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, "1d"],
                         ids=["bn", "syncbn", "frozenbn", "bn1d"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_an_unbatched_input_gives_what_torchs_modules_give(norm, train):
    """A conv takes an unbatched input ((C, H, W), (C, L)); the norm layers then differ (BatchNorm2d refuses it,
    FrozenBatchNorm2d broadcasts it into a batch of one, SyncBatchNorm and BatchNorm1d read its first axis as the
    batch): the fused block gives torch's numbers or torch's exception type."""
    if norm == "1d":
        tv, x = fused_resnet.blocks.EagerBasicBlock(5, 5, dim=1), torch.randn(5, 5, dtype=torch.float64)
    else:
        tv, x = TV.BasicBlock(4, 4, norm_layer=norm), torch.randn(4, 5, 5, dtype=torch.float64)
    tv = tv.double().train(train)
    fused = fused_resnet.convert(copy.deepcopy(tv), backend="reference")
    results = []
    for m in (tv, fused):
        try:
            results.append(m(x))
        except Exception as e:  # noqa: BLE001 (torch's error is the answer to compare with)
            results.append(type(e))
    if isinstance(results[0], type):
        assert results[1] is results[0]
    else:
        torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)


def test_wrong_shortcut_shapes_are_clear_errors():
    block = fused_resnet.FusedBasicBlock(8, 16, stride=2, backend="reference")  # no downsample: identity cannot match
    with pytest.raises(RuntimeError, match="give the block a downsample"):
        block(torch.randn(2, 8, 6, 6))
    with pytest.raises(RuntimeError, match="option-A shortcut"):
        fused_resnet.FusedBasicBlock(16, 8, stride=1, downsample=fused_resnet.ShortcutA(1, 8),
                                     backend="reference")(torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="plain block"):
        fused_resnet.FusedBasicBlock(8, 8, downsample=nn.Identity(), plain=True)


def test_unsupported_modules_rejected_at_construction():
    with pytest.raises(ValueError, match="norm layer is GroupNorm"):
        fused_resnet.FusedBasicBlock(8, 8, norm_layer=lambda c: nn.GroupNorm(2, c))
    with pytest.raises(ValueError, match="unknown backend"):
        fused_resnet.FusedBasicBlock(8, 8, backend="fastest")
    with pytest.raises(ValueError, match="dim must be"):
        fused_resnet.FusedBasicBlock(8, 8, dim=3)
    with pytest.raises(TypeError, match="nn.Module"):
        fused_resnet.convert("resnet18")


class _DecliningBackend(reference.ReferenceBackend):
    """A test backend that declines float64 and must never compute anything itself."""

    name = "triton"

    def unsupported_reason(self, device_type, dtype, spec):
        return "float64 on a GPU backend" if dtype == torch.float64 else None

    def block_forward(self, *args):
        raise AssertionError("the declining backend must not run")

    block_backward = block_inference = block_forward


@pytest.fixture
def declining_backend():
    with registered(_DecliningBackend()):
        yield


def test_unsupported_config_falls_back_to_reference_with_one_warning(declining_backend):
    assert "triton" in fused_resnet.available_backends()
    tv = TV.BasicBlock(4, 4).double()
    fused = fused_resnet.convert(tv, backend="triton")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            y = fused(x)
            y.sum().backward()
    fallback = [w for w in caught if "running it on backend 'reference' instead" in str(w.message)]
    assert len(fallback) == 1 and "float64 on a GPU backend" in str(fallback[0].message)
    torch.testing.assert_close(y, tv(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(AssertionError, match="must not run"):
        fused.float()(x.float())


def test_auto_on_cpu_is_reference_even_when_triton_exists(declining_backend):
    x = torch.randn(2, 4, 5, 5)
    assert backends.resolve("auto", x, BlockSpec((UnitSpec(),))).name == "reference"


@pytest.mark.parametrize("backend", ["reference", "cuda", "triton"])
def test_a_nan_reaches_the_output_wherever_torch_puts_one(backend):
    """torch.relu keeps NaN: a NaN in the input must come out wherever eager's output has one, never as a 0 that
    hides it (eval mode: running statistics keep the NaN local, so the pattern says where each ReLU let it through)."""
    if backend not in fused_resnet.available_backends():
        pytest.skip(f"backend {backend} is not available here")
    tv = TV.BasicBlock(8, 8).eval()
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    x[0, 3, 2, 2] = float("nan")
    fused = fused_resnet.convert(copy.deepcopy(tv), backend=backend).eval()
    with torch.no_grad():
        expected, got = torch.isnan(tv(x)), torch.isnan(fused(x))
    assert expected.sum() > 1 and torch.equal(got, expected), (int(expected.sum()), int(got.sum()))
