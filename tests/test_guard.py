"""Never silently different: a fused block whose submodules are not what the kernels implement (an activation
swapped, a hook, a pruning pre-hook, a norm layer swapped, a global module hook) is left unfused by convert, or
runs its exact eager computation for that call with one warning naming it; an empty batch leaves the running
statistics exactly as torch does. Each test compares with torch's own module in the same state."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

import fused_resnet
from fused_resnet import ops

TV = torchvision.models.resnet


@pytest.fixture
def op_calls(monkeypatch):
    """How many times the fused training op ran."""
    calls = []
    real = ops.forward
    monkeypatch.setattr(ops, "forward", lambda *a: calls.append(1) or real(*a))
    return calls


def _pair(block=None):
    torch.manual_seed(0)
    tv = block or TV.BasicBlock(8, 8)
    return tv, fused_resnet.convert(tv, backend="reference")


def _close(got, want, msg=None):
    """float32 agreement, relative to the tensor's scale (fused and eager sum in different orders)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-7, msg=msg)


def _same(fused, tv, x, steps=2):
    """Train-mode outputs, input gradients, parameter gradients and buffers agree over a few passes."""
    for _ in range(steps):
        outs = []
        for m in (fused, tv):
            xi = x.clone().requires_grad_(True)
            y = m(xi)
            y.square().sum().backward()
            outs.append((y, xi.grad))
        _close(outs[0][0], outs[1][0])
        _close(outs[0][1], outs[1][1])
    for (n, p), q in zip(fused.named_parameters(), tv.parameters(), strict=True):
        _close(p.grad, q.grad, msg=n)
    for (n, b), c in zip(fused.named_buffers(), tv.buffers(), strict=True):
        _close(b, c, msg=n)


def test_convert_leaves_a_block_with_another_activation_unfused_and_says_which():
    tv = TV.BasicBlock(8, 8)
    tv.relu = nn.SiLU()
    model = nn.Sequential(tv)
    with pytest.warns(RuntimeWarning, match=r"left 1 block\(s\) unfused: 0 \(activation relu is SiLU"):
        fused = fused_resnet.convert(model, backend="reference")
    assert type(fused[0]) is TV.BasicBlock


def test_convert_leaves_a_hooked_block_unfused_and_its_hook_keeps_firing():
    tv = TV.BasicBlock(8, 8)
    seen = []
    tv.bn1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with pytest.warns(RuntimeWarning, match="hooks on bn1"):
        fused = fused_resnet.convert(nn.Sequential(tv), backend="reference")
    fused(torch.randn(2, 8, 4, 4))
    assert len(seen) == 1 and type(fused[0]) is TV.BasicBlock


@pytest.mark.parametrize("change", ["activation", "forward hook", "pre-hook", "full backward hook", "group norm"])
def test_a_change_after_convert_runs_the_eager_computation_once_warned(change, op_calls):
    tv, fused = _pair()
    fired = []
    for m in (tv, fused):
        if change == "activation":
            m.relu = nn.GELU()
        elif change == "forward hook":
            m.conv2.register_forward_hook(lambda mod, i, o: fired.append(1))
        elif change == "pre-hook":
            m.bn2.register_forward_pre_hook(lambda mod, i: fired.append(1))
        elif change == "full backward hook":
            m.conv1.register_full_backward_hook(lambda mod, gi, go: fired.append(1))
        elif change == "group norm":
            m.bn2 = nn.GroupNorm(2, 8)
    x = torch.randn(2, 8, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _same(fused, tv, x)
    assert not op_calls
    messages = [str(w.message) for w in caught if "eager torch computation" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("fused_resnet: <root> runs its eager"), messages
    if change.endswith("hook"):
        assert len(fired) == 4  # two passes of each model


def test_pruning_after_convert_is_honoured_over_steps():
    tv, fused = _pair()
    for m in (tv, fused):
        prune.l1_unstructured(m.conv1, "weight", amount=0.5)
    with pytest.warns(RuntimeWarning, match="hooks on conv1"):
        _same(fused, tv, torch.randn(2, 8, 5, 5), steps=3)


def test_a_sync_bn_swapped_in_after_convert_is_fused_with_torchs_rule(op_calls):
    """Without a process group of several processes (and in eval) torch's SyncBatchNorm is a BatchNorm: the fused
    block computes it as one, in training and eval (tests/test_distributed.py: with one)."""
    tv, fused = _pair()
    for m in (tv, fused):
        m.bn1 = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(m.bn1))[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no eager fallback warning
        _same(fused, tv, torch.randn(2, 8, 5, 5), steps=2)
        for m in (tv, fused):
            m.eval()
        with torch.no_grad():
            torch.testing.assert_close(fused(torch.ones(2, 8, 5, 5)), tv(torch.ones(2, 8, 5, 5)))
    assert op_calls


def test_a_frozen_bn_swapped_in_after_convert_is_fused_as_one(op_calls):
    tv, fused = _pair()
    for m in (tv, fused):
        m.bn1 = torchvision.ops.misc.FrozenBatchNorm2d(8)
        m.bn1.running_mean.fill_(0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _same(fused, tv, torch.randn(2, 8, 5, 5))
    assert len(op_calls) == 2 and not fused.block_spec().units[0].batch_stats


def test_removing_the_hook_fuses_again(op_calls):
    tv, fused = _pair()
    handle = fused.relu.register_forward_hook(lambda *a: None)
    x = torch.randn(2, 8, 4, 4)
    with pytest.warns(RuntimeWarning, match="hooks on relu"):
        fused(x)
    assert not op_calls
    handle.remove()
    fused(x)
    assert len(op_calls) == 1


def test_a_global_module_hook_runs_the_eager_computation(op_calls):
    tv, fused = _pair()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    try:
        with pytest.warns(RuntimeWarning, match="global module hooks"):
            fused(torch.randn(2, 8, 4, 4))
    finally:
        handle.remove()
    assert not op_calls and {"Conv2d", "BatchNorm2d", "ReLU"} <= set(seen)


def test_a_converted_stem_honours_a_hook_too(op_calls):
    model = torchvision.models.resnet18(num_classes=4)
    fused = fused_resnet.convert(model, backend="reference")
    seen = []
    fused.bn1.register_forward_hook(lambda *a: seen.append(1))
    with pytest.warns(RuntimeWarning, match="stem: hooks on bn1"):
        fused(torch.randn(2, 3, 32, 32))
    assert seen == [1] and len(op_calls) == 8  # the stem ran eagerly, the 8 blocks fused


@pytest.mark.parametrize("build", [lambda: TV.BasicBlock(8, 8), lambda: torchvision.models.resnet18(num_classes=4)],
                         ids=["block", "resnet18"])
def test_an_empty_training_batch_leaves_running_statistics_as_torch_does(build):
    torch.manual_seed(0)
    tv = build()
    fused = fused_resnet.convert(tv, backend="reference")
    shape = (0, 8, 5, 5) if isinstance(tv, TV.BasicBlock) else (0, 3, 32, 32)
    for m in (tv, fused):
        y = m(torch.randn(shape))
        assert y.shape[0] == 0
    for (name, b), c in zip(fused.named_buffers(), tv.buffers(), strict=True):
        assert torch.equal(b, c), name
        assert not b.is_floating_point() or not torch.isnan(b).any(), name
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), tv.eval()(x))


def test_deepcopy_of_a_hooked_fused_block_is_guarded_too(op_calls):
    tv, fused = _pair()
    twin = copy.deepcopy(fused)
    twin.conv1.register_forward_pre_hook(lambda *a: None)
    with pytest.warns(RuntimeWarning, match="hooks on conv1"):
        twin(torch.randn(2, 8, 4, 4))
    fused(torch.randn(2, 8, 4, 4))
    assert len(op_calls) == 1


def test_a_model_with_nothing_to_fuse_says_so():
    class BasicBlock(nn.Module):  # another library's block of the same name: not torchvision's
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.act1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.act1(self.bn1(self.conv1(x))) + x

    with pytest.warns(RuntimeWarning, match="fused nothing in this Sequential"):
        fused_resnet.convert(nn.Sequential(BasicBlock(), BasicBlock()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_resnet.convert(TV.BasicBlock(4, 4))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fx_feature_extraction_traces_a_converted_model_and_matches(backend):
    """torchvision's create_feature_extractor traces a converted ResNet on every backend, the default included (the
    blocks trace their submodules, never asking a Proxy for its device) and gives torch's features; the converted
    model itself stays fused."""
    from torchvision.models.feature_extraction import create_feature_extractor

    tv = torchvision.models.resnet18(num_classes=4).eval()
    fused = fused_resnet.convert(tv, backend=backend)
    nodes = ["layer1", "layer3.1.relu_1", "layer4"]
    x = torch.randn(2, 3, 32, 32)
    got, want = create_feature_extractor(fused, nodes)(x), create_feature_extractor(tv, nodes)(x)
    for k in nodes:
        torch.testing.assert_close(got[k], want[k])
    assert type(fused.layer1[0]) is fused_resnet.FusedBasicBlock


def test_frozen_batchnorm_backbones_fuse_and_match_torch(op_calls):
    """A detection backbone (torchvision ResNet-50 with FrozenBatchNorm2d): every block and the stem fuse, in train
    mode too (the BN uses its buffers, nothing updates), with torch's outputs and gradients."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d, num_classes=4)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = fused_resnet.convert(tv, backend="reference")
    x = torch.randn(2, 3, 64, 64)
    _same(fused.train(), tv.train(), x, steps=1)
    assert len(op_calls) == 17  # 16 blocks and the stem
    with torch.no_grad():
        torch.testing.assert_close(fused.eval()(x), tv.eval()(x))


def test_checkpointing_updates_running_statistics_once_as_documented():
    """README: under non-reentrant checkpointing torch's block counts the batch twice, a fused block once."""
    from torch.utils.checkpoint import checkpoint

    tv, fused = _pair()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    for m in (tv, fused):
        checkpoint(m, x, use_reentrant=False).sum().backward()
    assert (tv.bn1.num_batches_tracked.item(), fused.bn1.num_batches_tracked.item()) == (2, 1)


def test_auto_on_a_cpu_runs_torchs_own_modules(op_calls):
    """backend auto away from a GPU is the block's own torch computation (bit for bit torch's, as fast as eager);
    the fused ops' PyTorch twin runs only when asked for."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=4)
    auto = fused_resnet.convert(tv)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(auto(x), tv(x)) and not op_calls
    fused_resnet.convert(tv, backend="reference")(x)
    assert len(op_calls) == 9
    assert "torch's own modules" in fused_resnet.backends.what_runs("auto", "cpu")
    assert fused_resnet.backends.what_runs("reference", "cpu") == "backend 'reference'"


def test_conversion_report_lists_every_block_and_why():
    model = torchvision.models.resnet18(num_classes=4)
    model.layer2[1].relu = nn.SiLU()
    with pytest.warns(RuntimeWarning, match="conversion_report"):
        fused = fused_resnet.convert(model, backend="reference")
    fused.layer3[0].bn1.register_forward_hook(lambda *a: None)
    lines = fused_resnet.conversion_report(fused).splitlines()
    assert len(lines) == 9  # the stem and 8 blocks
    assert lines[0].split()[:3] == ["<root>", "ResNet", "stem"] and "backend 'reference'" in lines[0]
    status = {line.split()[0]: line for line in lines}
    assert "not fused: activation relu is SiLU" in status["layer2.1"]
    assert "runs eagerly now: hooks on bn1" in status["layer3.0"]
    assert "fused, backend 'reference'" in status["layer4.1"]
    assert "no residual block" in fused_resnet.conversion_report(nn.Linear(2, 2))
