"""TorchScript: torch.jit.trace records a converted model's fused ops (their schemas hold no ``Tensor?[]``) and the
traced model gives torch's numbers, in training (running statistics included) and eval; torch.jit.script refuses
a converted model with one line naming fused_resnet.revert and torch.export, and scripts the reverted one."""
import copy
import warnings

import pytest
import torch
import torchvision

import fused_resnet


def _models():
    torch.manual_seed(0)
    # float64: in float32 the last stage's batch statistics (2 values a channel) amplify rounding past any bound
    tv = torchvision.models.resnet18(num_classes=4).double()
    return tv, fused_resnet.convert(copy.deepcopy(tv), backend="reference")


@pytest.mark.parametrize("train", [True, False])
def test_trace_records_the_fused_ops_and_matches_torch(train):
    tv, fused = _models()
    tv.train(train), fused.train(train)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fused, x.clone(), check_trace=False)
        tv(x.clone())  # the trace ran one step: torch's model takes it too
    assert any(n.kind() == "fused_resnet::block_forward" for n in traced.inlined_graph.nodes())
    outs = []
    for m in (traced, tv):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        y.square().sum().backward()
        outs.append((y, xi.grad))
    torch.testing.assert_close(outs[0], outs[1])
    for (name, b), c in zip(fused.named_buffers(), tv.buffers(), strict=True):
        torch.testing.assert_close(b, c, msg=name)


def test_script_refuses_in_one_line_and_scripts_the_reverted_model():
    tv, fused = _models()
    with pytest.raises(RuntimeError) as caught:
        torch.jit.script(fused)
    message = str(caught.value)
    assert "\n" not in message and "fused_resnet.revert" in message and "torch.export" in message
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    scripted = torch.jit.script(fused_resnet.revert(fused).eval())
    torch.testing.assert_close(scripted(x), tv.eval()(x))
