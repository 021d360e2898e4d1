"""Fused blocks against torchvision's blocks (and the eager twins for option A / plain / 1-D), with the
float64-oracle rule from fused_resnet.testing: outputs, input grad, every parameter grad, running statistics,
num_batches_tracked and eval outputs."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
from fused_resnet import testing

from conftest import DEVICES, assert_checks, case_id, make_block

CPU_DTYPES = ["float32", "float16", "bfloat16", "float64"]


def _compare(reference_block, case, dtype, device, channels_last=False, steps=2, autocast=False):
    n, h, w = case[5]
    gen = torch.Generator().manual_seed(7)
    testing.randomize_batchnorm(reference_block, gen, every=True)  # a small last γ would hide errors of that BN
    x = torch.randn(n, case[1], h, w, generator=gen)
    return testing.compare_models(
        reference_block, lambda m: fused_resnet.convert(m, backend="reference", inplace=True), x,
        testing.DTYPES[dtype], torch.device(device), channels_last=channels_last, train_steps=steps,
        autocast=autocast,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("case", testing.BLOCK_CASES, ids=case_id)
def test_block_matches_reference(case, dtype, device):
    assert_checks(_compare(make_block(case, fused=False), case, dtype, device), f"{case_id(case)} {dtype}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("case", testing.BLOCK_CASES[:4] + testing.BLOCK_CASES[6:8], ids=case_id)
def test_block_channels_last(case, dtype):
    assert_checks(_compare(make_block(case, fused=False), case, dtype, "cpu", channels_last=True))


@pytest.mark.parametrize("case", [testing.BLOCK_CASES[1], testing.BLOCK_CASES[7]], ids=case_id)
def test_block_autocast_bf16(case):
    assert_checks(_compare(make_block(case, fused=False), case, "bfloat16", "cpu", autocast=True))


def test_channels_last_output_layout():
    block = fused_resnet.FusedBasicBlock(8, 8, backend="reference")
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last)
    y = block(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert block(torch.randn(2, 8, 5, 5)).is_contiguous()


@pytest.mark.parametrize("shortcut,plain", [("identity", False), ("A", False), ("B", False), ("identity", True)])
def test_1d_blocks_match_eager(shortcut, plain):
    """dim=1 blocks (Conv1d/BatchNorm1d on (N, C, L)) against the eager twin."""
    stride, cin, cout = (1, 8, 8) if shortcut == "identity" else (2, 8, 16)
    ds = None
    if shortcut == "A":
        ds = fused_resnet.ShortcutA(stride, cout)
    elif shortcut == "B":
        ds = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))
    eager = fused_resnet.EagerBasicBlock(cin, cout, stride, ds, plain=plain, dim=1)
    gen = torch.Generator().manual_seed(3)
    testing.randomize_batchnorm(eager, gen)
    checks = testing.compare_models(eager, lambda m: fused_resnet.convert(m, backend="reference", inplace=True),
                                    torch.randn(3, cin, 21, generator=gen), torch.float32, torch.device("cpu"),
                                    train_steps=2)
    assert_checks(checks)


def test_bottleneck_1d():
    eager = fused_resnet.EagerBottleneck(16, 4, 2, nn.Sequential(nn.Conv1d(16, 16, 1, 2, bias=False),
                                                                 nn.BatchNorm1d(16)), dim=1)
    gen = torch.Generator().manual_seed(4)
    testing.randomize_batchnorm(eager, gen)
    assert_checks(testing.compare_models(eager, lambda m: fused_resnet.convert(m, backend="reference", inplace=True),
                                         torch.randn(2, 16, 17, generator=gen), torch.float32, torch.device("cpu")))


@pytest.mark.parametrize("cls_pair", [(torchvision.models.resnet.BasicBlock, fused_resnet.FusedBasicBlock),
                                      (torchvision.models.resnet.Bottleneck, fused_resnet.FusedBottleneck)])
def test_state_dict_round_trip_strict(cls_pair):
    tv_cls, fused_cls = cls_pair
    inplanes = 64 if tv_cls is torchvision.models.resnet.BasicBlock else 256
    ds = nn.Sequential(nn.Conv2d(inplanes, 128 * tv_cls.expansion, 1, 2, bias=False),
                       nn.BatchNorm2d(128 * tv_cls.expansion))
    tv = tv_cls(inplanes, 128, 2, ds)
    fused = fused_cls(inplanes, 128, 2, copy.deepcopy(ds))
    assert list(tv.state_dict().keys()) == list(fused.state_dict().keys())
    tv.bn1.running_mean.normal_()
    fused.load_state_dict(tv.state_dict(), strict=True)
    back = tv_cls(inplanes, 128, 2, copy.deepcopy(ds))
    back.load_state_dict(fused.state_dict(), strict=True)
    for k, v in tv.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_constructor_signature_matches_torchvision():
    import inspect

    for tv_cls, fused_cls in ((torchvision.models.resnet.BasicBlock, fused_resnet.FusedBasicBlock),
                              (torchvision.models.resnet.Bottleneck, fused_resnet.FusedBottleneck)):
        tv_params = list(inspect.signature(tv_cls.__init__).parameters.values())
        fused_params = list(inspect.signature(fused_cls.__init__).parameters.values())
        assert [(p.name, p.default) for p in tv_params] == [(p.name, p.default) for p in fused_params[:len(tv_params)]]
        assert all(p.kind is p.KEYWORD_ONLY for p in fused_params[len(tv_params):])
        assert fused_cls.expansion == tv_cls.expansion
    with pytest.raises(ValueError, match="groups=1 and base_width=64"):
        fused_resnet.FusedBasicBlock(8, 8, groups=2)
    with pytest.raises(NotImplementedError):
        fused_resnet.FusedBasicBlock(8, 8, dilation=2)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_variants_match_torch(momentum):
    """momentum=None (cumulative average), affine=False and track_running_stats=False (batch statistics in eval)
    behave as in torch, in train and eval."""
    def norm(c):
        return nn.BatchNorm2d(c, momentum=momentum)

    for norm_layer in (norm, lambda c: nn.BatchNorm2d(c, affine=False), lambda c: nn.BatchNorm2d(c, track_running_stats=False)):
        tv = torchvision.models.resnet.BasicBlock(6, 6, norm_layer=norm_layer).double()
        fused = fused_resnet.convert(tv, backend="reference")
        for step in range(3):
            x = torch.randn(2, 6, 5, 5, dtype=torch.float64) + step
            torch.testing.assert_close(fused(x), tv(x), rtol=1e-12, atol=1e-12)
        for (k, a), (_, b) in zip(tv.state_dict().items(), fused.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)
        tv.eval(), fused.eval()
        x = torch.randn(1, 6, 3, 3, dtype=torch.float64)
        if tv.bn1.track_running_stats:
            torch.testing.assert_close(fused(x), tv(x), rtol=1e-12, atol=1e-12)


def test_eval_batch_of_one_and_frozen_bn_in_train():
    """N=1 in eval mode; a BN frozen in eval inside a training block (fine-tuning) uses its running stats and
    still gets gradients."""
    tv = torchvision.models.resnet.Bottleneck(16, 4).double()
    testing.randomize_batchnorm(tv, torch.Generator().manual_seed(0))
    fused = fused_resnet.convert(tv, backend="reference")
    tv.eval(), fused.eval()
    x = torch.randn(1, 16, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(fused(x), tv(x), rtol=1e-12, atol=1e-12)
    tv.train(), fused.train()
    tv.bn2.eval(), fused.bn2.eval()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    tv(x).sum().backward()
    fused(x).sum().backward()
    for (n, a), (_, b) in zip(tv.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(fused.bn2.running_mean, tv.bn2.running_mean)
    assert fused.bn2.num_batches_tracked.item() == 0 and fused.bn1.num_batches_tracked.item() == 1


def test_no_input_grad_and_inference_path():
    """Input without requires_grad (the stem case), and no_grad eval (the inference op, nothing saved)."""
    tv = torchvision.models.resnet.BasicBlock(4, 4).double()
    fused = fused_resnet.convert(tv, backend="reference")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    tv(x).sum().backward()
    fused(x).sum().backward()
    torch.testing.assert_close(fused.conv1.weight.grad, tv.conv1.weight.grad, rtol=1e-10, atol=1e-12)
    tv.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-12, atol=1e-12)
