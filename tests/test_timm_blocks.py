"""timm's ResNet family fused in place (fused_resnet/timm_blocks.py): every block of resnet18, resnet50d (avg-pool
downsample, deep stem), resnet26t and wide_resnet50_2 fuses, and the converted model matches timm's against the
float64 oracle over training passes; blocks with squeeze-excitation or stochastic depth are left as timm's with
a warning; a block changed after convert runs timm's own forward; revert gives timm's classes back."""
import warnings

import pytest
import torch

import fused_resnet
from fused_resnet import testing

from conftest import assert_checks

timm = pytest.importorskip("timm")
from fused_resnet import timm_blocks  # noqa: E402  (needs timm)

FUSED = (timm_blocks.FusedTimmBasicBlock, timm_blocks.FusedTimmBottleneck)
TIMM = (timm.models.resnet.BasicBlock, timm.models.resnet.Bottleneck)


def _model(name, **kwargs):
    torch.manual_seed(0)
    return testing.randomize_batchnorm(timm.create_model(name, num_classes=4, **kwargs),
                                       torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50d", 16), ("resnet26t", 8),
                                         ("wide_resnet50_2", 16)])
def test_timm_resnets_fuse_every_block_and_match_timm(name, blocks):
    model = _model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fused_resnet.convert(model, backend="reference")
    assert sum(isinstance(m, FUSED) for m in fused.modules()) == blocks
    assert list(fused.state_dict()) == list(model.state_dict())
    checks = testing.compare_models(model, lambda m: fused_resnet.convert(m, backend="reference", inplace=True),
                                    torch.randn(2, 3, 48, 48), torch.float32, torch.device("cpu"), train_steps=2,
                                    lr=0.01)
    assert_checks(checks, name)


@pytest.mark.parametrize("name,kwargs,reason", [
    ("seresnet50", {}, "se is SEModule"),
    ("resnet18", {"drop_path_rate": 0.1}, "drop_path is DropPath"),
])
def test_blocks_timm_cannot_fuse_are_left_as_timms(name, kwargs, reason):
    model = _model(name, **kwargs)
    with pytest.warns(RuntimeWarning, match=reason):
        fused = fused_resnet.convert(model, backend="reference")
    blocks = [m for m in fused.modules() if isinstance(m, TIMM)]
    assert all(isinstance(m, FUSED) == (m.se is None and m.drop_path is None) for m in blocks)
    assert any(not isinstance(m, FUSED) for m in blocks)


def test_a_timm_block_changed_after_convert_runs_timms_forward():
    model = _model("resnet18").eval()
    fused = fused_resnet.convert(model, backend="reference")
    for m in (model, fused):
        m.layer2[0].act1 = torch.nn.GELU()
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match=r"layer2.0 runs its eager torch computation.*act1 is GELU"):
        got = fused(x)
    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_revert_gives_timms_classes_and_state_back():
    model = _model("resnet50d")
    fused = fused_resnet.convert(model, backend="reference")
    back = fused_resnet.revert(fused)
    assert {type(m) for m in back.modules() if isinstance(m, TIMM)} <= set(TIMM)
    assert not any(isinstance(m, FUSED) or hasattr(m, "backend") for m in back.modules())
    back.load_state_dict(model.state_dict(), strict=True)


def test_timm_fx_feature_extraction_runs_forward_and_backward_on_the_default_backend():
    """timm's own FX route (timm.models._features_fx, which its forward_fx / backward_fx model tests use) traces a
    model converted for the default backend, in train and eval mode, and gives timm's outputs and gradients."""
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names

    model = _model("resnet18")
    fused = fused_resnet.convert(model)
    x = torch.randn(2, 3, 32, 32)
    for train in (True, False):
        outs = []
        for m in (model, fused):
            m.train(train)
            last = get_graph_node_names(m)[0 if train else 1][-1]
            xi = x.clone().requires_grad_(True)
            y = create_feature_extractor(m, [last])(xi)[last]
            y.square().sum().backward()
            outs.append((y, xi.grad))
        torch.testing.assert_close(outs[0], outs[1])
