"""The float64 oracle per model family (testing.compare_models: BN randomised, batch 2, channels_last as the
kernels' layout, two training passes with an SGD step between them, then eval) on the backends whose CPU path the suite runs: reference, and cuda through the
extension's CPU registrations (backend triton's interpreter is too slow for whole models: tests/backends/
test_triton.py and tests/test_timm_blocks.py check it block by block). One representative per family, each built
the way the family's big models are (their block class, grouping, dilation, se / drop_path, avg-pool shortcut and
deep stem) but shallow: README's "Model coverage" table counts the big models' units without running them
(bench/family_oracle.py runs them). Then torchvision's backbone wrappers, whose stem is fused too."""
import warnings

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

import fused_resnet
from fused_resnet import backends, testing
from fused_resnet.spec import Shortcut

from conftest import assert_checks


def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, num_classes=4, **kwargs)


# family → (an unconverted model, input size, seed for the stochastic modules)
FAMILIES = {
    # resnext50_32x4d / resnext101_64x4d: grouped 3x3 convs (groups 8 of width 4 here)
    "resnext": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], groups=8, width_per_group=4, num_classes=4), 64, None),
    # deeplabv3_resnet50's backbone: layer3 and layer4 dilated instead of strided (output stride 8)
    "dilated": (lambda: ResNet(Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[False, True, True],
                               num_classes=4), 32, None),
    # seresnet50 / ecaresnet50d: open blocks, timm's SE module in the closing
    "seresnet": (lambda: _timm("seresnet18"), 64, None),
    # drop_path_rate > 0: stochastic depth inside the op's closing; the same draws in every run (seeded)
    "drop_path": (lambda: _timm("resnet18", drop_path_rate=0.2), 64, 5),
    # resnet26d / resnet50d: deep stem, avg-pool + conv + BN shortcut: the op's projection, pooling inside
    "resnet-d": (lambda: _timm("resnet26d"), 64, None),
}


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_representative_matches_the_float64_oracle(family, backend):
    reason = backends.backend_status()[backend]
    if reason is not None:
        pytest.skip(f"backend {backend!r} is not available here: {reason}")
    make, size, seed = FAMILIES[family]
    torch.manual_seed(0)
    model = testing.randomize_batchnorm(make(), torch.Generator().manual_seed(0))

    def fuse(m):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every block fuses
            return fused_resnet.convert(m, backend=backend, inplace=True)

    checks = testing.compare_models(model, fuse, torch.randn(2, 3, size, size), torch.float32, torch.device("cpu"),
                                    channels_last=True, train_steps=2, lr=0.01, seed=seed)
    assert_checks(checks, f"{family} on {backend}")


def _backbone(returned, fpn):
    """A shallow ResNet's torchvision backbone wrapper: IntermediateLayerGetter, inside BackboneWithFPN if ``fpn``
    (Faster R-CNN's, with FrozenBatchNorm2d as there)."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    net = ResNet(Bottleneck, [1, 1, 1, 1], norm_layer=FrozenBatchNorm2d if fpn else None)
    testing.randomize_batchnorm(net, torch.Generator().manual_seed(0))
    if fpn:
        return BackboneWithFPN(net, returned, [256, 512], 32)
    return IntermediateLayerGetter(net, returned)


@pytest.mark.parametrize("returned,fpn,stem_fused", [
    ({"layer1": "0", "layer2": "1"}, True, True),  # Faster R-CNN's: BackboneWithFPN's body
    ({"layer1": "low", "layer4": "out"}, False, True),  # DeepLabV3's
    ({"relu": "stem", "layer2": "out"}, False, False),  # a stem module's output returned: the stem runs its modules
])
def test_a_backbone_wrappers_stem_is_one_fused_op(returned, fpn, stem_fused, monkeypatch):
    """torchvision's IntermediateLayerGetter (alone, and as BackboneWithFPN's body) fuses its ResNet's stem unless
    it returns one of the stem's modules; float64: the unconverted wrapper's features, gradients and running
    statistics, train and eval; revert gives torchvision's class back."""
    from torchvision.models._utils import IntermediateLayerGetter

    model = _backbone(returned, fpn).double()
    fused = fused_resnet.convert(model, backend="reference")
    body = fused.body if fpn else fused
    assert type(body) is fused_resnet.blocks.IntermediateLayerGetter and list(fused.state_dict()) == list(
        model.state_dict())
    assert (body._stem_plan()[0] is None) == stem_fused
    assert ("stem fused, backend 'reference'" in fused_resnet.conversion_report(fused)) == stem_fused
    specs, real = [], fused_resnet.ops.forward
    monkeypatch.setattr(fused_resnet.ops, "forward", lambda spec, *a: specs.append(spec) or real(spec, *a))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for train in (True, True, False):
        model.train(train), fused.train(train)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        outs = [m(xi) for m, xi in zip((model, fused), xs)]
        assert list(outs[0]) == list(outs[1])
        for want, got in zip(outs[0].values(), outs[1].values()):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for xi, out in zip(xs, outs):
            sum(v.sum() for v in out.values()).backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-10, atol=1e-12)
    for (k, b), w in zip(fused.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, w, rtol=1e-12, atol=1e-12, msg=k)
    stems = [s for s in specs if s.shortcut == Shortcut.NONE]  # the stem's op: the blocks' have shortcuts
    blocks = sum(isinstance(m, fused_resnet.blocks.FusedBottleneck) for m in fused.modules())
    assert len(stems) == (3 if stem_fused else 0) and len(specs) == 3 * blocks + len(stems)
    reverted = fused_resnet.revert(fused)
    assert type(reverted.body if fpn else reverted) is IntermediateLayerGetter
