"""The reference backend's hand-derived backward against torch autograd (gradcheck, float64), and its BN
running-statistics update against torch's BatchNorm."""
import pytest
import torch
from torch import nn

from fused_resnet import ops, reference

from conftest import DEVICES


def _block_args(shortcut, n_units, batch_stats, groups=1, dilation=1, seed=0):
    """Random float64 inputs for the block op: n_units main convs (3x3 for 1-2 units, 1x1-3x3-1x1 for 3) plus a
    1x1 projection for SHORTCUT_PROJECTION. Shape-changing shortcuts (projection, pad) use stride 2 and 4 → 6
    channels; the others keep 6 channels and stride 1. groups/dilation apply to the 3x3 of a 3-unit chain."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    changes = shortcut in (reference.SHORTCUT_PROJECTION, reference.SHORTCUT_PAD)
    cin, cmid, cout, stride = (4, 6, 6, 2) if changes else (6, 6, 6, 1)
    if n_units == 3:  # (out, in, k, groups, dilation, stride)
        convs = [(cmid, cin, 1, 1, 1, 1), (cmid, cmid, 3, groups, dilation, stride), (cout, cmid, 1, 1, 1, 1)]
    elif n_units == 2:
        convs = [(cmid, cin, 3, 1, 1, stride), (cout, cmid, 3, 1, 1, 1)]
    else:
        convs = [(cout, cin, 3, 1, 1, stride)]
    if shortcut == reference.SHORTCUT_PROJECTION:
        convs.append((cout, cin, 1, 1, 1, stride))
    x = rnd(2, cin, 5, 4).requires_grad_()
    weights = [rnd(o, i // gr, k, k).requires_grad_() for o, i, k, gr, _, _ in convs]
    gammas = [(rnd(c[0]) * 0.3 + 1).requires_grad_() for c in convs]
    betas = [(rnd(c[0]) * 0.3).requires_grad_() for c in convs]
    rms = [rnd(c[0]) * 0.1 for c in convs]
    rvs = [rnd(c[0]).abs() + 0.5 for c in convs]
    strides = [v for c in convs for v in (c[5], c[5])]
    paddings = [v for c in convs for v in (c[4] * (c[2] // 2),) * 2]
    dilations = [v for c in convs for v in (c[4], c[4])]
    out_hw = ((5 - 1) // stride + 1, (4 - 1) // stride + 1)
    residual = rnd(2, cout, *out_hw).requires_grad_() if shortcut == reference.SHORTCUT_TENSOR else None
    return dict(x=x, weights=weights, gammas=gammas, betas=betas, running_means=rms, running_vars=rvs,
                residual=residual, strides=strides, paddings=paddings, dilations=dilations,
                groups=[c[3] for c in convs], eps=[1e-5] * len(convs), batch_stats=[batch_stats] * len(convs),
                shortcut=shortcut, shortcut_stride=[stride, stride], backend="reference")


GRADCHECK_CASES = [
    # (shortcut, units, batch_stats, groups, dilation)
    (reference.SHORTCUT_IDENTITY, 2, True, 1, 1),
    (reference.SHORTCUT_IDENTITY, 3, True, 1, 1),
    (reference.SHORTCUT_PROJECTION, 2, True, 1, 1),
    (reference.SHORTCUT_PROJECTION, 3, True, 1, 1),
    (reference.SHORTCUT_PAD, 2, True, 1, 1),
    (reference.SHORTCUT_TENSOR, 2, True, 1, 1),
    (reference.SHORTCUT_NONE, 1, True, 1, 1),
    (reference.SHORTCUT_NONE, 2, False, 1, 1),
    (reference.SHORTCUT_PROJECTION, 3, False, 1, 1),
    (reference.SHORTCUT_IDENTITY, 3, True, 2, 2),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=lambda c: f"sc{c[0]}-u{c[1]}-bs{int(c[2])}-g{c[3]}-d{c[4]}")
def test_block_backward_gradcheck(case):
    """The hand-derived backward (registered through torch.library) against finite differences."""
    shortcut, units, batch_stats, groups, dilation = case
    a = _block_args(shortcut, units, batch_stats, groups, dilation)
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
        out = ops.block_forward(**kw)
        return out[0]

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5), names


def test_block_forward_matches_eager_math():
    """y of the op equals conv → BN → ReLU → conv → BN → + x → ReLU written with torch.nn.functional."""
    a = _block_args(reference.SHORTCUT_IDENTITY, 2, True)
    y = ops.block_forward(**a)[0]
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
        ops.bn_running_update(rm, rv, nbt, mean, var, a.numel() // 5, momentum)
        torch.testing.assert_close(rm, bn.running_mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(rv, bn.running_var, rtol=1e-14, atol=1e-14)
        assert nbt.item() == bn.num_batches_tracked.item() == step + 1


def test_shortcut_pad_and_backward():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    y = reference.shortcut_pad(x, (2, 2), 7, torch.contiguous_format)
    assert y.shape == (2, 7, 3, 2)
    torch.testing.assert_close(y[:, :3], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 3:]) == 0
    dz = torch.randn_like(y)
    (auto,) = torch.autograd.grad(y, x, dz)
    torch.testing.assert_close(reference.shortcut_pad_backward(dz, x, (2, 2)), auto)
