"""Learnable residual scale: y = relu(α·bn_last(conv_last(...)) + shortcut), α fixed or a parameter (SkipInit).

Every backend against the eager twin with the float64-oracle rule (α's gradient is one of the parameter grads
checked), the state_dict entry only when α is used, revert and the model constructors."""
import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import models, testing
from fused_resnet.blocks import RESIDUAL_SCALE, residual_scale_of, set_residual_scale

from conftest import assert_checks

BACKENDS = ["reference", "triton", "cuda"]
# (block class, inplanes, planes, stride, shortcut)
CASES = [("basic", 8, 8, 1, None), ("basic", 8, 16, 2, "A"), ("bottleneck", 16, 8, 2, "B"),
         ("basic", 8, 8, 1, "plain")]


def _eager_block(kind, inplanes, planes, stride, shortcut, residual_scale):
    out = planes * (1 if kind == "basic" else 4)
    downsample = None
    if shortcut == "A":
        downsample = fused_resnet.ShortcutA(stride, out)
    elif shortcut == "B":
        downsample = torch.nn.Sequential(torch.nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                         torch.nn.BatchNorm2d(out))
    cls = fused_resnet.EagerBasicBlock if kind == "basic" else fused_resnet.EagerBottleneck
    return cls(inplanes, planes, stride, downsample, plain=shortcut == "plain", residual_scale=residual_scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[4] or 'identity'}")
def test_learnable_scale_matches_oracle(case, backend):
    block = _eager_block(*case, residual_scale="learnable")
    with torch.no_grad():
        block.residual_scale.fill_(0.6)  # away from SkipInit's 0, so the main path counts
    gen = torch.Generator().manual_seed(3)
    testing.randomize_batchnorm(block, gen)
    x = torch.randn(3, case[1], 6, 6, generator=gen)
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend=backend, inplace=True), x,
                                    torch.float32, torch.device("cpu"), train_steps=2, lr=0.1)
    assert_checks(checks, f"{case} {backend}")


def test_fixed_scale_matches_eager_in_float64():
    eager = _eager_block("basic", 8, 8, 1, None, residual_scale=0.25).double()
    fused = fused_resnet.convert(eager, backend="reference")
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-12, atol=1e-12)
    assert isinstance(fused.residual_scale, torch.Tensor) and not isinstance(fused.residual_scale, torch.nn.Parameter)
    fused.eval()
    eager.eval()
    torch.testing.assert_close(fused(x), eager(x), rtol=1e-12, atol=1e-12)


def test_skipinit_blocks_start_as_identity():
    block = fused_resnet.FusedBasicBlock(8, 8, backend="reference", residual_scale="learnable")
    x = torch.rand(2, 8, 5, 5)  # non-negative: relu(0·bn(...) + x) = x
    y = block(x)
    torch.testing.assert_close(y, x)
    y.square().sum().backward()
    assert block.residual_scale.grad is not None and block.residual_scale.grad.abs() > 0
    assert block.conv1.weight.grad.abs().sum() == 0  # α = 0 cuts the main path's gradient


def test_state_dict_entry_only_when_used():
    plain = fused_resnet.FusedBasicBlock(8, 8, backend="reference")
    assert RESIDUAL_SCALE not in plain.state_dict()
    assert set(plain.state_dict()) == set(torchvision.models.resnet.BasicBlock(8, 8).state_dict())
    learn = fused_resnet.FusedBasicBlock(8, 8, backend="reference", residual_scale="learnable")
    fixed = fused_resnet.FusedBasicBlock(8, 8, backend="reference", residual_scale=0.5)
    assert RESIDUAL_SCALE in learn.state_dict() and RESIDUAL_SCALE in fixed.state_dict()
    assert RESIDUAL_SCALE in dict(learn.named_parameters()) and RESIDUAL_SCALE not in dict(fixed.named_parameters())
    fixed.load_state_dict(learn.state_dict())
    set_residual_scale(learn, None)
    assert RESIDUAL_SCALE not in learn.state_dict() and residual_scale_of(learn) is None


@pytest.mark.parametrize("bad", ["learned", True, [1.0]])
def test_bad_residual_scale_refused(bad):
    with pytest.raises(ValueError, match="residual_scale must be"):
        fused_resnet.FusedBasicBlock(8, 8, residual_scale=bad)


def test_revert_keeps_scale_in_eager_twin():
    model = models.resnet18(num_classes=10, residual_scale="learnable", backend="reference")
    n = sum(k.endswith(RESIDUAL_SCALE) for k in model.state_dict())
    assert n == 8
    eager = fused_resnet.revert(model)
    assert type(eager.layer1[0]) is fused_resnet.EagerBasicBlock
    assert sum(k.endswith(RESIDUAL_SCALE) for k in eager.state_dict()) == n
    eager_built = models.resnet18(num_classes=10, residual_scale="learnable", backend=None)
    eager_built.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    eager_built.eval()
    torch.testing.assert_close(model(x), eager_built(x), rtol=1e-5, atol=1e-5)


def test_cifar_resnet_takes_scale():
    model = models.cifar_resnet(20, residual_scale=0.5, backend="reference")
    assert all(float(b.residual_scale) == 0.5 for b in model.modules() if isinstance(b, fused_resnet.FusedBasicBlock))
    assert "residual_scale=0.5" in repr(model)
