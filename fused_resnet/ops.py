"""The torch.library op layer: every fused op the modules call, with fake (meta) kernels and autograd.

Ops (namespace ``fused_resnet``):

* ``block_forward``   — training-capable block forward; returns y plus what backward needs (pre-BN conv outputs,
  per-channel statistics). Differentiable through ``block_backward``.
* ``block_backward``  — the hand-derived backward of a whole block, one op.
* ``block_inference`` — eval-mode block forward that saves nothing.
* ``bn_running_update`` — torch's running-statistics update (mutates running_mean / running_var /
  num_batches_tracked); kept out of the differentiable op because torch.library autograd needs functional ops.
  One kernel of the C++/CUDA extension for CUDA tensors when the extension is loaded, torch ops otherwise.

The block ops take a ``backend`` name and resolve it at run time (see :mod:`fused_resnet.backends`), so the same
traced graph runs on whichever backend the module asks for. The layout contract, shared by every backend: every
activation output (y, the pre-BN outputs, dx) is channels_last when x is channels_last and NCHW-contiguous
otherwise; statistics are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import backends, reference

def conv_output_shapes(x: Tensor, weights, strides, paddings, dilations, shortcut: int) -> List[List[int]]:
    n_main = reference.num_main_units(weights, shortcut)
    shapes, h, w = [], x.shape[2], x.shape[3]
    for i, wt in enumerate(weights):
        if i == n_main:
            h, w = x.shape[2], x.shape[3]
        h = reference.conv_out_size(h, wt.shape[2], strides[2 * i], paddings[2 * i], dilations[2 * i])
        w = reference.conv_out_size(w, wt.shape[3], strides[2 * i + 1], paddings[2 * i + 1], dilations[2 * i + 1])
        shapes.append([x.shape[0], wt.shape[0], h, w])
    return shapes


def _empty_act(x: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(
        memory_format=reference.memory_format_of(x)
    )


# --------------------------------------------------------------------------------------------- block_forward
@torch.library.custom_op("fused_resnet::block_forward", mutates_args=())
def block_forward(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]], residual: Optional[Tensor],
    strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
    batch_stats: List[bool], shortcut: int, shortcut_stride: List[int], backend: str,
) -> List[Tensor]:
    impl = backends.resolve(backend, x, groups, dilations)
    return impl.block_forward(
        x, weights, gammas, betas, running_means, running_vars, residual, strides, paddings, dilations, groups,
        eps, batch_stats, shortcut, shortcut_stride,
    )


@block_forward.register_fake
def _block_forward_fake(x, weights, gammas, betas, running_means, running_vars, residual, strides, paddings,
                        dilations, groups, eps, batch_stats, shortcut, shortcut_stride, backend):
    shapes = conv_output_shapes(x, weights, strides, paddings, dilations, shortcut)
    n_main = reference.num_main_units(weights, shortcut)
    stat = reference.acc_dtype(x.dtype)
    acts = [_empty_act(x, s) for s in shapes]
    means = [x.new_empty((s[1],), dtype=stat) for s in shapes]
    variances = [x.new_empty((s[1],), dtype=stat) for s in shapes]
    return [_empty_act(x, shapes[n_main - 1])] + acts + means + variances


_BLOCK_FORWARD_CONFIG = 15  # block_forward's inputs up to shortcut_stride; a `backend` name may follow


def block_autograd(backward_op):
    """(backward, setup_context) of a whole-block forward op whose inputs are block_forward's, optionally followed
    by a backend name; ``backward_op`` is the matching whole-block backward op (same inputs, same name suffix).
    Used for ``fused_resnet::block_forward`` and for the extension's ``fused_resnet_C::block_forward``."""

    def setup_context(ctx, inputs, output):
        (x, weights, gammas, betas, _, _, residual, strides, paddings, dilations, groups, eps, batch_stats,
         shortcut, shortcut_stride) = inputs[:_BLOCK_FORWARD_CONFIG]
        n = len(weights)
        ctx.n = n
        ctx.config = (strides, paddings, dilations, groups, eps, batch_stats, shortcut, shortcut_stride)
        ctx.extra = tuple(inputs[_BLOCK_FORWARD_CONFIG:])
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x, output[0], *weights, *gammas, *betas, *output[1:])

    def backward(ctx, grads):
        n = ctx.n
        dy = grads[0]
        x, y, *rest = ctx.saved_tensors
        weights, gammas, betas = rest[:n], rest[n:2 * n], rest[2 * n:3 * n]
        acts, means, variances = rest[3 * n:4 * n], rest[4 * n:5 * n], rest[5 * n:6 * n]
        nones = [None] * n
        none_tail = (None,) * (8 + len(ctx.extra))  # strides .. shortcut_stride (, backend): not differentiable
        if dy is None:
            return (None, nones, nones, nones, nones, nones, None) + none_tail
        need_dx = bool(ctx.needs_input_grad[0])
        strides, paddings, dilations, groups, eps, batch_stats, shortcut, shortcut_stride = ctx.config
        out = backward_op(
            dy, x, y, list(weights), list(gammas), list(betas), list(acts), list(means), list(variances),
            strides, paddings, dilations, groups, eps, batch_stats, shortcut, shortcut_stride, need_dx, *ctx.extra,
        )
        dx = out[0] if need_dx else None
        d_res = out[1].to(ctx.residual_dtype) if ctx.residual_dtype is not None else None
        dws, dgs, dbs = out[2:2 + n], out[2 + n:2 + 2 * n], out[2 + 2 * n:2 + 3 * n]
        return (dx, list(dws), list(dgs), list(dbs), nones, nones, d_res) + none_tail

    return backward, setup_context


_block_forward_backward, _setup_block_forward = block_autograd(
    lambda *args: torch.ops.fused_resnet.block_backward(*args))
block_forward.register_autograd(_block_forward_backward, setup_context=_setup_block_forward)


# --------------------------------------------------------------------------------------------- block_backward
@torch.library.custom_op("fused_resnet::block_backward", mutates_args=())
def block_backward(
    dy: Tensor, x: Tensor, y: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    acts: List[Tensor], means: List[Tensor], variances: List[Tensor], strides: List[int], paddings: List[int],
    dilations: List[int], groups: List[int], eps: List[float], batch_stats: List[bool], shortcut: int,
    shortcut_stride: List[int], need_input_grad: bool, backend: str,
) -> List[Tensor]:
    """Returns [dx, d_residual, dW..., dγ..., dβ...]; dx / d_residual are empty tensors when not produced."""
    impl = backends.resolve(backend, x, groups, dilations)
    dx, d_res, dws, dgs, dbs = impl.block_backward(
        dy, x, y, weights, gammas, betas, acts, means, variances, strides, paddings, dilations, groups, eps,
        batch_stats, shortcut, shortcut_stride, need_input_grad,
    )
    # Outputs of a custom op may not alias each other: one fresh empty placeholder per missing gradient.
    dx = x.new_empty((0,)) if dx is None else dx
    d_res = x.new_empty((0,)) if d_res is None else d_res
    return [dx, d_res] + dws + dgs + dbs


@block_backward.register_fake
def _block_backward_fake(dy, x, y, weights, gammas, betas, acts, means, variances, strides, paddings, dilations,
                         groups, eps, batch_stats, shortcut, shortcut_stride, need_input_grad, backend):
    dx = _empty_act(x, x.shape) if need_input_grad else x.new_empty((0,))
    d_res = _empty_act(x, y.shape) if shortcut == reference.SHORTCUT_TENSOR else x.new_empty((0,))
    return ([dx, d_res] + [torch.empty_like(w) for w in weights] + [torch.empty_like(g) for g in gammas]
            + [torch.empty_like(b) for b in betas])


# --------------------------------------------------------------------------------------------- block_inference
@torch.library.custom_op("fused_resnet::block_inference", mutates_args=())
def block_inference(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor], running_means: List[Tensor],
    running_vars: List[Tensor], residual: Optional[Tensor], strides: List[int], paddings: List[int],
    dilations: List[int], groups: List[int], eps: List[float], shortcut: int, shortcut_stride: List[int],
    backend: str,
) -> Tensor:
    impl = backends.resolve(backend, x, groups, dilations)
    return impl.block_inference(
        x, weights, gammas, betas, running_means, running_vars, residual, strides, paddings, dilations, groups,
        eps, shortcut, shortcut_stride,
    )


@block_inference.register_fake
def _block_inference_fake(x, weights, gammas, betas, running_means, running_vars, residual, strides, paddings,
                          dilations, groups, eps, shortcut, shortcut_stride, backend):
    shapes = conv_output_shapes(x, weights, strides, paddings, dilations, shortcut)
    n_main = reference.num_main_units(weights, shortcut)
    return _empty_act(x, shapes[n_main - 1])


# --------------------------------------------------------------------------------------------- bn_running_update
@torch.library.custom_op(
    "fused_resnet::bn_running_update", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def bn_running_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
    count: int, momentum: Optional[float],
) -> None:
    from . import cuda_backend  # imports this module

    if mean.dtype == torch.float32 and cuda_backend.runs_on(mean):  # one kernel instead of ~8 small torch ops
        torch.ops.fused_resnet_C.bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count,
                                                   momentum)
    else:
        reference.bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


@bn_running_update.register_fake
def _bn_running_update_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
    return None
