"""The float64 oracle per model family (testing.compare_models: BN randomised, batch 2, channels_last as the
kernels' layout, two training passes with an SGD step between them, then eval) on the backends whose CPU path the suite runs: reference, and cuda through the
extension's CPU registrations (backend triton's interpreter is too slow for whole models: tests/backends/
test_triton.py and tests/test_timm_blocks.py check it block by block). One representative per family, each built
the way the family's big models are (their block class, grouping, dilation, se / drop_path, avg-pool shortcut and
deep stem) but shallow: README's "Model coverage" table counts the big models' units without running them."""
import warnings

import pytest
import torch
import torchvision
from torchvision.models.resnet import Bottleneck, ResNet

import fused_resnet
from fused_resnet import backends, testing

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
    # drop_path_rate > 0: stochastic depth inside the op on reference, open blocks (timm's DropPath) on cuda; the
    # same draws in every run (seeded)
    "drop_path": (lambda: _timm("resnet18", drop_path_rate=0.2), 64, 5),
    # resnet26d / resnet50d: deep stem, avg-pool + conv + BN shortcut added as a tensor
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
