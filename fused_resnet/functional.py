"""Functional entry point of every fused module: a chain of (conv, BN) units with ReLUs, a shortcut, a final ReLU.

``run_units`` validates the input (torch's error types and messages, raised before any state changes), applies
autocast, maps 1-D convs onto the 2-D ops (a Conv1d is a Conv2d with H = 1), calls the op layer, then updates the
BN running statistics exactly as torch's BatchNorm does. Layout: the ops accept NCHW and channels_last and return
the input's layout; no copy is made here.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops, reference

_CONV_TYPES = (nn.Conv1d, nn.Conv2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


def unit_unsupported_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """None if (conv, bn) can run as a fused unit, else why not."""
    if type(conv) not in _CONV_TYPES:
        return f"conv is {type(conv).__name__}, expected nn.Conv1d or nn.Conv2d"
    if conv.bias is not None:
        return "conv has a bias (ResNet convs feeding a BN have none)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"conv padding {conv.padding!r} / padding_mode {conv.padding_mode!r} (need explicit zero padding)"
    if type(bn) not in _BN_TYPES:
        return f"norm layer is {type(bn).__name__}, expected nn.BatchNorm1d or nn.BatchNorm2d"
    if (type(conv) is nn.Conv1d) != (type(bn) is nn.BatchNorm1d):
        return f"{type(conv).__name__} followed by {type(bn).__name__}"
    return None


def _conv_params(conv: nn.Module, is1d: bool) -> Tuple[List[int], List[int], List[int]]:
    if is1d:
        return [1, conv.stride[0]], [0, conv.padding[0]], [1, conv.dilation[0]]
    return list(conv.stride), list(conv.padding), list(conv.dilation)


def _input_checks(x: Tensor, w: Tensor, groups: int, is1d: bool) -> None:
    expected = 3 if is1d else 4
    if x.dim() > expected:  # torch's conv error
        raise RuntimeError(f"Expected {expected - 1}D (unbatched) or {expected}D (batched) input to "
                           f"conv{expected - 2}d, but got input of size: {list(x.shape)}")
    if x.dim() < expected:  # torch's BatchNorm error (the conv would accept an unbatched input)
        raise ValueError(f"expected {expected}D input (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise RuntimeError(
            f"expected a floating-point input (float32, float16, bfloat16 or float64), got {x.dtype}"
        )
    if x.device != w.device:
        raise RuntimeError(f"expected the input on the weights' device {w.device}, got {x.device}")
    if x.shape[1] != w.shape[1] * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(w.shape)}, expected input{list(x.shape)} to have "
            f"{w.shape[1] * groups} channels, but got {x.shape[1]} channels instead"
        )


def run_units(
    x: Tensor,
    convs: Sequence[nn.Module],
    bns: Sequence[nn.Module],
    *,
    shortcut: int,
    shortcut_stride: Sequence[int] = (1, 1),
    residual: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """y = relu(bn_last(conv_last(... relu(bn_0(conv_0(x))) ...)) + shortcut) through the fused op layer.

    ``convs``/``bns`` list the main path, then the projection shortcut's conv/BN when ``shortcut`` is
    ``reference.SHORTCUT_PROJECTION``. ``residual`` is the shortcut tensor for ``SHORTCUT_TENSOR``.
    """
    is1d = type(convs[0]) is nn.Conv1d
    _input_checks(x, convs[0].weight, convs[0].groups, is1d)
    weights = [c.weight for c in convs]

    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dt), [w.to(dt) for w in weights]
        residual = None if residual is None else residual.to(dt)
    for w in weights:
        if w.dtype != x.dtype:
            raise RuntimeError(f"expected the input's dtype to match the conv weights' {w.dtype}, got {x.dtype}")

    strides, paddings, dilations = [], [], []
    for c in convs:
        s, p, d = _conv_params(c, is1d)
        strides += s
        paddings += p
        dilations += d
    groups = [c.groups for c in convs]
    sc_stride = [1, shortcut_stride[0]] if is1d else list(shortcut_stride)
    if is1d:
        x = x.unsqueeze(2)
        weights = [w.unsqueeze(2) for w in weights]
        residual = None if residual is None else residual.unsqueeze(2)

    shapes = ops.conv_output_shapes(x, weights, strides, paddings, dilations, shortcut)
    batch_stats = [bool(bn.training or not bn.track_running_stats) for bn in bns]
    for bn, shape, use_batch in zip(bns, shapes, batch_stats):
        if use_batch and shape[0] * shape[2] * shape[3] == 1:
            size = torch.Size([shape[0], shape[1], shape[3]] if is1d else shape)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    n_main = reference.num_main_units(convs, shortcut)
    out_shape = shapes[n_main - 1]
    if shortcut == reference.SHORTCUT_IDENTITY and list(x.shape) != out_shape:
        raise RuntimeError(
            f"identity shortcut needs the block to keep the input's shape {list(x.shape)}, but the main path "
            f"produces {out_shape}: give the block a downsample"
        )
    if shortcut == reference.SHORTCUT_PROJECTION and shapes[-1] != out_shape:
        raise RuntimeError(f"projection shortcut produces {shapes[-1]}, main path produces {out_shape}")
    if shortcut == reference.SHORTCUT_PAD:
        sub = [reference.conv_out_size(x.shape[k], 1, sc_stride[k - 2], 0, 1) for k in (2, 3)]
        if sub != out_shape[2:] or x.shape[1] > out_shape[1]:
            raise RuntimeError(
                f"option-A shortcut maps {list(x.shape)} with stride {sc_stride} onto {out_shape}: spatial sizes "
                f"must agree and channels may only grow"
            )
    if shortcut == reference.SHORTCUT_TENSOR and (residual is None or list(residual.shape) != out_shape):
        got = None if residual is None else list(residual.shape)
        raise RuntimeError(f"the shortcut tensor has shape {got}, the main path produces {out_shape}")

    gammas = [bn.weight if bn.affine else torch.ones(bn.num_features, device=x.device) for bn in bns]
    betas = [bn.bias if bn.affine else torch.zeros(bn.num_features, device=x.device) for bn in bns]
    eps = [float(bn.eps) for bn in bns]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or any(w.requires_grad for w in weights)
        or any(t.requires_grad for t in gammas + betas)
        or (residual is not None and residual.requires_grad)
    )
    if not needs_grad and not any(batch_stats):
        y = ops.block_inference(
            x, weights, gammas, betas, [bn.running_mean for bn in bns], [bn.running_var for bn in bns], residual,
            strides, paddings, dilations, groups, eps, shortcut, sc_stride, backend,
        )
    else:
        n = len(convs)
        out = ops.block_forward(
            x, weights, gammas, betas, [bn.running_mean for bn in bns], [bn.running_var for bn in bns], residual,
            strides, paddings, dilations, groups, eps, batch_stats, shortcut, sc_stride, backend,
        )
        y, means, variances = out[0], out[1 + n:1 + 2 * n], out[1 + 2 * n:1 + 3 * n]
        with torch.no_grad():
            for bn, shape, mean, var in zip(bns, shapes, means, variances):
                if bn.training and bn.track_running_stats:
                    ops.bn_running_update(
                        bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, var,
                        shape[0] * shape[2] * shape[3], bn.momentum,
                    )
    return y.squeeze(2) if is1d else y


def conv_bn_relu(x: Tensor, conv: nn.Module, bn: nn.Module, backend: str = "auto") -> Tensor:
    """relu(bn(conv(x))) as one fused unit (the ResNet stem)."""
    return run_units(x, [conv], [bn], shortcut=reference.SHORTCUT_NONE, backend=backend)
