"""The reference backend's hand-derived backward against torch autograd (gradcheck, float64), and its BN
running-statistics update against torch's BatchNorm."""
import pytest
import torch
from torch import nn

from fused_resnet import ops
from fused_resnet.backends import reference
from fused_resnet.spec import Shortcut

from conftest import DEVICES, GRADCHECK_CASES, block_problem, gradcheck_id, op_args


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=gradcheck_id)
def test_block_backward_gradcheck(case):
    """The hand-derived backward (registered through torch.library) against finite differences."""
    shortcut, units, batch_stats, groups, dilation = case
    a = block_problem(shortcut, units, batch_stats, groups, dilation)
    n = len(a["weights"])
    names = ["x"] + [f"w{i}" for i in range(n)] + [f"g{i}" for i in range(n)] + [f"b{i}" for i in range(n)]
    leaves = [a["x"]] + a["weights"] + a["gammas"] + a["betas"]
    if a["residual"] is not None:
        names.append("residual")
        leaves.append(a["residual"])

    def f(*tensors):
        kw = dict(a)
        kw["x"] = tensors[0]
        kw["weights"] = list(tensors[1:1 + n])
        kw["gammas"] = list(tensors[1 + n:1 + 2 * n])
        kw["betas"] = list(tensors[1 + 2 * n:1 + 3 * n])
        if a["residual"] is not None:
            kw["residual"] = tensors[-1]
        return ops.block_forward(*op_args(kw))[0]

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5), names


def test_block_forward_matches_eager_math():
    """y of the op equals conv → BN → ReLU → conv → BN → + x → ReLU written with torch.nn.functional."""
    a = block_problem(Shortcut.IDENTITY, 2, True)
    y = ops.block_forward(*op_args(a))[0]
    import torch.nn.functional as F

    h = F.conv2d(a["x"], a["weights"][0], padding=1)
    h = F.relu(F.batch_norm(h, None, None, a["gammas"][0], a["betas"][0], training=True))
    h = F.conv2d(h, a["weights"][1], padding=1)
    h = F.batch_norm(h, None, None, a["gammas"][1], a["betas"][1], training=True)
    torch.testing.assert_close(y, F.relu(h + a["x"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_bn_running_update_matches_torch(momentum, device):
    """Three updates (momentum, and the cumulative average for momentum=None) match nn.BatchNorm2d exactly."""
    bn = nn.BatchNorm2d(5, momentum=momentum).double().to(device)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for step in range(3):
        a = torch.randn(3, 5, 4, 2, dtype=torch.float64, device=device) * (step + 1) + step
        bn.train()(a)
        mean, var = reference.bn_stats(a)
        ops.bn_running_update(rm, rv, nbt, mean, var, a.numel() // 5, momentum, "reference")
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-14, atol=1e-14)
        assert nbt.item() == bn.num_batches_tracked.item() == step + 1


def test_option_a_and_backward():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    y = reference.option_a(x, (2, 2), 7, torch.contiguous_format)
    assert y.shape == (2, 7, 3, 2)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 3:]) == 0
    dz = torch.randn_like(y)
    (auto,) = torch.autograd.grad(y, x, dz)
    torch.testing.assert_close(reference.option_a_backward(dz, x, (2, 2)), auto)
