"""Never silently wrong after an in-place edit: every public attribute and every registered parameter and buffer of
a fused block's convs, BNs and activation is changed after a first forward, and the next call must give torch's
own numbers (outputs, gradients, running statistics) or torch's own error, whether it runs the fused op or the
modules' eager forward; conversion_report's "runs eagerly now" must say which of the two the call ran.

The attributes are walked, not listed: one this file has no change for fails the test, so a setting torch adds to
these modules cannot be forgotten by ``spec.unit_reading`` without a test saying so."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import fused_resnet
from fused_resnet import ops, spec

TV = torchvision.models.resnet


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of passes over tiny tensors: one intra-op thread (on a loaded 2-core machine two threads made each
    tiny conv about 14x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
_ALTERNATIVES = {  # beyond the changes every value of a type gets (see _changes)
    "padding": ["same", "valid", (0, 1)],
    "padding_mode": ["circular", "reflect", "replicate"],
    "stride": [(1, 2)],
    "groups": [2, 4],
}


def _changes(name: str, value, registered: bool, channels: int):
    """Values to set ``name`` (a parameter or buffer where ``registered``) to, other than ``value``; None when the
    type is one this file does not know."""
    if isinstance(value, bool):
        out = [not value]
    elif isinstance(value, int):
        out = [value + 1, 0]
    elif isinstance(value, float):
        out = [value * 5, 0.0]
    elif isinstance(value, str):
        out = []
    elif isinstance(value, tuple) and all(type(v) is int for v in value):
        out = [tuple(v + 1 for v in value), list(value)]
    elif value is None and registered:  # a conv's bias, a BN's missing buffer
        out = [torch.randn(channels, dtype=torch.float64).abs() + 0.5]
    elif value is None:
        out = [0.3]  # momentum None: the cumulative average
    elif isinstance(value, torch.Tensor):
        value = value.detach()
        new = torch.randn_like(value.double()).to(value.dtype) if value.is_floating_point() else value + 3
        out = [new, value.float() if value.dtype == torch.float64 else value.double()]
    else:
        return None
    return out + [v for v in _ALTERNATIVES.get(name, []) if v != value] + ([None] if value is not None else [])


def _settings(module: nn.Module):
    """(name, value) of every public attribute, parameter and buffer of ``module``."""
    public = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    return [*public.items(), *module._parameters.items(), *module._buffers.items()]


def _set(module: nn.Module, name: str, value) -> None:
    if name in module._parameters and value is not None and not isinstance(value, nn.Parameter):
        value = nn.Parameter(value)
    setattr(module, name, value)


def _run(model: nn.Module, x: torch.Tensor):
    """(output, input grad, parameter grads, buffers) of one training step, or the exception's type."""
    x = x.clone().requires_grad_(True)
    try:
        y = model(x)
        y.square().sum().backward()
    except Exception as e:  # noqa: BLE001 (torch's error is the answer to compare with)
        return type(e)
    return (y, x.grad, {n: p.grad for n, p in model.named_parameters()},
            {n: b for n, b in model.named_buffers()})


def _agree(got, want) -> str:
    """Why ``got`` is not ``want`` (an empty string when they agree)."""
    if isinstance(want, type) or isinstance(got, type):
        if got is want:
            return ""
        return (f"got {getattr(got, '__name__', 'numbers')}, torch gives "
                f"{getattr(want, '__name__', 'numbers')}")
    try:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, equal_nan=True)
    except AssertionError as e:
        return str(e).splitlines()[0]
    return ""


def _block():
    """A block with a projection shortcut: (model, input shape, submodules walked, fused ops its next call runs)."""
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    return (TV.BasicBlock(4, 8, stride=2, downsample=down), (2, 4, 6, 6),
            ["conv1", "bn1", "relu", "conv2", "bn2", "downsample.0", "downsample.1"],
            lambda fused: int(fused._blocker() is None))


def _block_1d():
    """fused_resnet's 1-D block (Conv1d / BatchNorm1d, ``dim=1``), a projection shortcut too."""
    down = nn.Sequential(nn.Conv1d(4, 8, 1, stride=2, bias=False), nn.BatchNorm1d(8))
    return (fused_resnet.blocks.EagerBasicBlock(4, 8, stride=2, downsample=down, dim=1), (2, 4, 9),
            ["conv1", "bn1", "relu", "conv2", "bn2", "downsample.0", "downsample.1"],
            lambda fused: int(fused._blocker() is None))


def _block_sync():
    """Every BN an nn.SyncBatchNorm: one process, no process group initialised, so torch computes a BatchNorm (and
    refuses what its own forward refuses)."""
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.SyncBatchNorm(8))
    return (TV.BasicBlock(4, 8, stride=2, downsample=down, norm_layer=nn.SyncBatchNorm), (2, 4, 6, 6),
            ["conv1", "bn1", "relu", "conv2", "bn2", "downsample.0", "downsample.1"],
            lambda fused: int(fused._blocker() is None))


def _block_frozen():
    """Every BN torchvision's FrozenBatchNorm2d (detection backbones), its buffers away from the identity."""
    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), FrozenBatchNorm2d(8))
    block = TV.BasicBlock(4, 8, stride=2, downsample=down, norm_layer=FrozenBatchNorm2d)
    for bn in (block.bn1, block.bn2, down[1]):
        for name, low in (("weight", 0.5), ("bias", -0.5), ("running_mean", -0.5), ("running_var", 0.5)):
            getattr(bn, name).copy_(torch.rand(8) + low)
    return (block, (2, 4, 6, 6), ["conv1", "bn1", "relu", "conv2", "bn2", "downsample.0", "downsample.1"],
            lambda fused: int(fused._blocker() is None))


def _stem():
    """A ResNet's stem, the same way: its three blocks run fused whatever the stem's settings."""
    return (fused_resnet.models.cifar_resnet(8, width=4, num_classes=4, backend=None), (2, 3, 8, 8),
            ["conv1", "bn1", "relu"], lambda fused: 3 + int(fused._stem_plan()[0] is None))


CASES = {"block": _block, "block-1d": _block_1d, "block-syncbn": _block_sync, "block-frozenbn": _block_frozen,
         "stem": _stem}


def test_the_cases_walk_every_submodule_type_a_unit_can_hold():
    """Every conv and norm type the kernels implement (spec.CONV_TYPES, spec.BN_TYPES) and nn.ReLU is walked by
    some case below: a type added there without a case here fails."""
    torch.manual_seed(0)
    walked = set()
    for make in CASES.values():
        model, _, paths, _ = make()
        walked |= {type(model.get_submodule(p)) for p in paths}
    assert set(spec.CONV_TYPES) | set(spec.BN_TYPES) | {nn.ReLU} <= walked


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("make", list(CASES.values()), ids=list(CASES))
def test_every_setting_changed_after_a_first_forward_gives_torchs_numbers(make, mode, monkeypatch):
    calls = []
    real = ops.forward
    monkeypatch.setattr(ops, "forward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    base, shape, paths, fused_calls = make()
    base = base.double()
    getattr(base, mode)()
    x0, x = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    unknown, wrong, checked = [], [], 0
    for path in paths:
        for name, value in _settings(base.get_submodule(path)):
            module = base.get_submodule(path)
            registered = name in module._parameters or name in module._buffers
            changes = _changes(name, value, registered, getattr(module, "out_channels", 8))
            if changes is None:
                unknown.append(f"{path}.{name} ({type(value).__name__})")
                continue
            for new in changes:
                tv = copy.deepcopy(base)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fused = fused_resnet.convert(copy.deepcopy(base), backend="reference")
                    fused(x0), tv(x0)  # the first forward: a spec is built and kept
                    for m in (tv, fused):
                        _set(m.get_submodule(path), name, copy.deepcopy(new))
                    expected_calls = fused_calls(fused)
                    calls.clear()
                    got, want = _run(fused, x), _run(tv, x)
                checked += 1
                what = f"{path}.{name} = {new!r:.40}"
                reason = _agree(got, want)
                if reason:
                    wrong.append(f"{what}: {reason}")
                elif not isinstance(want, type) and expected_calls != len(calls):
                    wrong.append(f"{what}: by conversion_report's account {expected_calls} fused op call(s), the "
                                 f"call made {len(calls)}")
    assert not unknown, f"settings with no change in this test (add one to _changes): {unknown}"
    assert not wrong, "\n".join(wrong)
    assert checked > 15 * len(paths)


def test_a_conv_given_a_bias_after_a_forward_runs_eagerly_and_the_report_says_so():
    torch.manual_seed(0)
    tv = TV.BasicBlock(4, 4).double()
    fused = fused_resnet.convert(copy.deepcopy(tv), backend="reference")
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    fused(x)
    for m in (tv, fused):
        m.conv1.bias = nn.Parameter(torch.ones(4, dtype=torch.float64))
    assert "conv1 / bn1: conv has a bias" in fused_resnet.conversion_report(fused)
    with pytest.warns(RuntimeWarning, match="conv has a bias"):
        torch.testing.assert_close(fused(x), tv(x))
