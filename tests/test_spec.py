"""The BlockSpec: its schema form round-trips, Python / Triton / C++ share one table of kinds and one list layout,
it follows torch's BatchNorm rules, and a block builds it once and rebuilds it exactly when a setting changes."""
import copy
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import fused_resnet
from fused_resnet import ops, spec as spec_mod
from fused_resnet.backends import extension
from fused_resnet.spec import BlockSpec, Residual, Shortcut, UnitSpec, from_modules
from fused_resnet.tensors import BACKWARD_INPUTS, FORWARD_INPUTS

ROOT = Path(__file__).resolve().parent.parent
TV = torchvision.models.resnet

SPECS = [
    BlockSpec((UnitSpec((2, 2), (1, 1)), UnitSpec(padding=(1, 1))), Shortcut.IDENTITY),
    BlockSpec((UnitSpec(momentum=None), UnitSpec((1, 2), (0, 1), (1, 3), 2, 1e-3), UnitSpec((2, 2))),
              Shortcut.PROJECTION, dim=1),
    BlockSpec((UnitSpec(batch_stats=False, update_running=False),), Shortcut.OPTION_A, (2, 2)),
    BlockSpec((UnitSpec(eps=0.5, momentum=0.0),), Shortcut.TENSOR),
    BlockSpec((UnitSpec(), UnitSpec(batch_stats=True, update_running=False)), Shortcut.NONE),
    BlockSpec((UnitSpec(), UnitSpec((2, 2), (1, 1), groups=2)), Shortcut.OPEN),
    BlockSpec((UnitSpec((2, 2), (1, 1)), UnitSpec(padding=(1, 1)), UnitSpec(avg_pool=2)), Shortcut.PROJECTION),
    BlockSpec((UnitSpec(avg_pool=3),), Shortcut.OPEN),
]


@pytest.mark.parametrize("spec", SPECS, ids=range(len(SPECS)))
def test_schema_round_trip(spec):
    back = BlockSpec.from_schema(spec.ints, spec.floats)
    assert back == spec and hash(back) == hash(spec)
    assert len(spec.ints) == len(spec_mod.HEADER_INTS) + len(spec_mod.UNIT_INTS) * len(spec.units)
    assert len(spec.floats) == len(spec_mod.UNIT_FLOATS) * len(spec.units)


def test_malformed_schema_is_refused():
    good = SPECS[0]
    with pytest.raises(ValueError, match="malformed block spec"):
        BlockSpec.from_schema(good.ints[:-1], good.floats)
    bad = good.ints
    bad[1] = 9
    with pytest.raises(ValueError, match="9 is not a valid Shortcut"):
        BlockSpec.from_schema(bad, good.floats)
    with pytest.raises(ValueError, match="projection shortcut needs"):
        BlockSpec((UnitSpec(),), Shortcut.PROJECTION)
    with pytest.raises(TypeError, match="shortcut must be a Shortcut"):
        BlockSpec((UnitSpec(),), 1)


@pytest.mark.parametrize("units,shortcut,dim", [
    ((UnitSpec(), UnitSpec(avg_pool=2)), Shortcut.IDENTITY, 2),  # the second unit reads the first's output
    ((UnitSpec(avg_pool=2), UnitSpec()), Shortcut.PROJECTION, 2),  # the input reaches the projection too
    ((UnitSpec(avg_pool=0),), Shortcut.OPEN, 2),
    ((UnitSpec(avg_pool=2),), Shortcut.OPEN, 1),
])
def test_a_pool_is_only_where_a_unit_alone_reads_the_block_input(units, shortcut, dim):
    with pytest.raises(ValueError, match="avg_pool"):
        BlockSpec(units, shortcut, dim=dim)


def test_pooled_output_shapes_are_avg_pool2d_ceil_mode():
    spec = SPECS[6]
    shapes = spec.output_shapes((2, 4, 7, 9), [(6, 4, 3, 3), (6, 6, 3, 3), (6, 4, 1, 1)])
    pooled = torch.nn.functional.avg_pool2d(torch.zeros(2, 4, 7, 9), 2, 2, ceil_mode=True, count_include_pad=False)
    assert shapes[0] == [2, 6, 4, 5] and shapes[2] == [2, 6, *pooled.shape[2:]]


def test_compiled_code_builds_specs():
    """A compiled forward builds specs whenever a block's settings change (eval(), train(), a new momentum):
    from_modules traces with fullgraph=True on every supported torch (2.11 traces neither an enum's constructor
    nor hash() of a tuple), and what it returns is the eager spec, hash included."""
    torch._dynamo.reset()
    convs = [nn.Conv2d(4, 8, 3, 2, 1, bias=False), nn.Conv2d(4, 8, 1, 2, bias=False)]
    bns = [nn.BatchNorm2d(8, momentum=None), nn.BatchNorm2d(8).eval()]
    build = torch.compile(lambda c, b: from_modules(c, b, Shortcut.PROJECTION), backend="eager", fullgraph=True)
    traced, eager = build(convs, bns), from_modules(convs, bns, Shortcut.PROJECTION)
    assert traced == eager and hash(traced) == hash(eager) and traced.ints == eager.ints


def _header():
    return (ROOT / "csrc" / "spec.h").read_text()


def _enum(text: str, name: str) -> dict:
    body = re.search(rf"enum (?:class )?{name}\b[^{{]*{{([^}}]*)}}", text).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


def test_cpp_tables_are_the_python_ones():
    text = _header()
    cpp_shortcut = _enum(text, "Shortcut")
    assert {k[1:].lower(): v for k, v in cpp_shortcut.items()} == {
        m.name.replace("_", "").lower(): m.value for m in Shortcut}
    cpp_residual = _enum(text, "Residual")
    assert {k[len("kResidual"):].lower(): v for k, v in cpp_residual.items()} == {
        m.name.replace("_", "").lower(): m.value for m in Residual}
    constants = {k: int(v) for k, v in re.findall(r"constexpr int64_t (kSpec\w+) = (\d+);", text)}
    assert constants == {"kSpecHeaderInts": len(spec_mod.HEADER_INTS), "kSpecUnitInts": len(spec_mod.UNIT_INTS),
                         "kSpecUnitFloats": len(spec_mod.UNIT_FLOATS)}
    layout = re.search(r"ints\s+= \[(.*?)\]\n//\s+floats = \[(.*?)\]", text, re.S)
    words = re.findall(r"[a-z_]+", layout.group(1).replace("per unit", ""))
    assert words == list(spec_mod.HEADER_INTS) + list(spec_mod.UNIT_INTS)


def test_triton_tables_are_the_python_ones():
    pytest.importorskip("triton")
    from fused_resnet.kernels import bn_act, conv

    assert (conv.RES_NONE.value, conv.RES_TENSOR.value, conv.RES_OPTION_A.value) == (
        Residual.NONE, Residual.TENSOR, Residual.OPTION_A)
    assert (bn_act.RES_TENSOR.value, bn_act.RES_AFFINE.value, bn_act.RES_OPTION_A.value) == (
        Residual.TENSOR, Residual.AFFINE, Residual.OPTION_A)


def _input_names(op) -> tuple:
    return tuple(a.name for a in op.default._schema.arguments)


def test_op_schemas_take_the_flat_spec():
    # stochastic depth's per-sample scale: the training ops' (eval has none)
    assert _input_names(torch.ops.fused_resnet.block_forward) == FORWARD_INPUTS + ("backend", "sample_scale")
    assert _input_names(torch.ops.fused_resnet.block_inference) == FORWARD_INPUTS + ("backend",)
    assert _input_names(torch.ops.fused_resnet.block_backward) == BACKWARD_INPUTS + ("backend", "sample_scale",
                                                                                     "counts")
    if extension.load() is None:
        pytest.skip(f"extension not built: {extension.status()['reason']}")
    # the extension's: the same trailing order, backend's place taken by graphs
    assert _input_names(torch.ops.fused_resnet_C.block_forward) == FORWARD_INPUTS + ("graphs", "sample_scale")
    assert _input_names(torch.ops.fused_resnet_C.block_inference) == FORWARD_INPUTS + ("graphs",)
    assert _input_names(torch.ops.fused_resnet_C.block_backward) == BACKWARD_INPUTS + ("graphs", "sample_scale",
                                                                                       "counts")


def test_from_modules_follows_torch_batchnorm_rules():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    bn = nn.BatchNorm2d(4, momentum=None, eps=1e-3)
    unit = from_modules([conv], [bn], Shortcut.NONE).units[0]
    assert (unit.batch_stats, unit.update_running, unit.momentum, unit.eps) == (True, True, None, 1e-3)
    bn.eval()
    assert not from_modules([conv], [bn], Shortcut.NONE).units[0].batch_stats
    bn.track_running_stats = False  # buffers still there: torch normalises with them in eval, updates nothing
    unit = from_modules([conv], [bn], Shortcut.NONE).units[0]
    assert (unit.batch_stats, unit.update_running) == (False, False)
    bn.train()
    unit = from_modules([conv], [bn], Shortcut.NONE).units[0]
    assert (unit.batch_stats, unit.update_running) == (True, False)
    no_buffers = nn.BatchNorm2d(4, track_running_stats=False).eval()
    unit = from_modules([conv], [no_buffers], Shortcut.NONE).units[0]
    assert (unit.batch_stats, unit.update_running) == (True, False)
    conv1d = nn.Conv1d(4, 4, 3, stride=2, padding=1, dilation=1, bias=False)
    spec = from_modules([conv1d], [nn.BatchNorm1d(4)], Shortcut.OPTION_A, 2)
    assert spec.dim == 1 and spec.units[0].stride == (1, 2) and spec.units[0].padding == (0, 1)
    assert spec.option_a_stride == (1, 2)


def test_eval_with_tracking_switched_off_normalises_like_torch():
    """torch's rule in eval with track_running_stats=False but buffers present: the running statistics are used."""
    tv = TV.BasicBlock(4, 4)
    with torch.no_grad():
        tv.bn1.running_mean.normal_()
        tv.bn1.running_var.uniform_(0.5, 2)
    fused = fused_resnet.convert(tv, backend="reference")
    for m in (tv, fused):
        m.eval()
        m.bn1.track_running_stats = False
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(fused(x), tv(x))


def test_a_block_builds_its_spec_once_and_again_when_a_setting_changes():
    block = fused_resnet.FusedBasicBlock(8, 8, backend="reference")
    first = block.block_spec()
    x = torch.randn(2, 8, 4, 4)
    block(x)
    assert block.block_spec() is first
    block.eval()
    assert not block.block_spec().units[0].batch_stats
    block.train()
    block.bn2.momentum = None
    assert block.block_spec().units[1].momentum is None and block.block_spec().units[0].momentum == 0.1


def test_settings_changed_after_convert_are_honoured():
    """momentum switched to the cumulative average mid-training, and a 3x3 conv turned into a dilated one the way
    segmentation code does it (stride 1, dilation 2, padding 2, in place): the fused block follows torch."""
    tv = TV.Bottleneck(16, 4)
    fused = fused_resnet.convert(tv, backend="reference")
    x = torch.randn(2, 16, 6, 6)
    for change in (lambda m: setattr(m.bn1, "momentum", None),
                   lambda m: setattr(m.conv2, "dilation", (2, 2)) or setattr(m.conv2, "padding", (2, 2))):
        for m in (tv, fused):
            change(m)
        for _ in range(2):
            torch.testing.assert_close(fused(x), tv(x), rtol=1e-4, atol=1e-5)
    for name, buf in fused.named_buffers():
        torch.testing.assert_close(buf, dict(tv.named_buffers())[name], msg=name)
    assert fused.block_spec().units[1].dilation == (2, 2)


def test_deepcopy_and_revert_keep_or_drop_the_cached_spec():
    block = fused_resnet.FusedBasicBlock(8, 8, backend="reference")
    twin = copy.deepcopy(block)
    assert twin.block_spec() == block.block_spec()
    plain = fused_resnet.revert(block)
    assert not any(k.startswith("_fused_resnet") for k in vars(plain))


def test_momentum_none_travels_as_nan():
    spec = BlockSpec((UnitSpec(momentum=None),), Shortcut.NONE)
    assert math.isnan(spec.floats[1]) and BlockSpec.from_schema(spec.ints, spec.floats).units[0].momentum is None


def test_running_update_is_the_backends_method(monkeypatch):
    """backend="reference" updates running statistics with torch ops only, even where the extension is loaded."""
    from fused_resnet.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "cpp", lambda: pytest.fail("the extension ran under backend='reference'"))
    bn = nn.BatchNorm2d(3)
    mean, var = torch.randn(3), torch.rand(3) + 0.5
    ops.running_update(bn, mean, var, 10, 0.1, "reference")
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
