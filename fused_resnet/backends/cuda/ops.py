"""The Python face of the extension's ops (``torch.ops.fused_resnet_C``, schemas in csrc/ops.cpp): a fake (meta)
kernel for every op and the block forward's autograd formula, registered whenever the extension loads (also by a
later just-in-time build), so ``torch.compile`` traces the ops and ``torch.library.opcheck`` checks them."""
from __future__ import annotations

import torch

from ...spec import BlockSpec, pooled_size
from ...tensors import Params, backward_fake, block_autograd, forward_fake, inference_fake
from .. import extension

LIB = "fused_resnet_C"


def cpp():
    return torch.ops.fused_resnet_C


def _vectors(like: torch.Tensor, count: int, k: int):
    return tuple(like.new_empty((count,), dtype=torch.float32) for _ in range(k))


def _register() -> None:
    def fake(name):
        return torch.library.register_fake(f"{LIB}::{name}")

    spec = BlockSpec.from_schema
    fake("bn_stats")(lambda a, gamma, beta, eps: _vectors(a, a.shape[1], 4))
    fake("bn_stats_from_sums")(lambda a, total, sq_sum, gamma, beta, eps: _vectors(a, a.shape[1], 4))
    fake("bn_scale_shift")(lambda gamma, beta, mean, var, eps: _vectors(mean, mean.shape[0], 3))
    fake("bn_running_update")(lambda running_mean, running_var, nbt, mean, var, count, momentum: None)
    fake("bn_act")(lambda a, scale, shift, residual, relu, residual_scale=None, residual_shift=None,
                   option_a_stride=(), sample_scale=None: torch.empty_like(a))
    fake("drelu_dbn_reduce")(lambda g, y, a, mean, rstd, scale, shift, sample_scale=None, mask=True:
                             _vectors(a, a.shape[1], 2))
    fake("dbn_apply")(lambda g, y, a, mean, rstd, scale, shift, sum_dz, sum_dz_xhat, batch_stats, sample_scale=None,
                      mask=True: torch.empty_like(a))
    fake("residual_grad")(lambda d_main, dy, y, like, option_a_stride: torch.empty_like(like))
    fake("avg_pool")(lambda x, k: x.new_empty((*x.shape[:2], pooled_size(x.shape[2], k), pooled_size(x.shape[3], k)))
                     .contiguous(memory_format=torch.channels_last))
    fake("avg_pool_grad_add")(lambda d_main, d_pooled, like, k: torch.empty_like(like))
    fake("block_forward")(lambda x, weights, gammas, betas, running_means, running_vars, residual, spec_ints,
                          spec_floats, graphs, sample_scale=None:
                          forward_fake(x, weights, spec(spec_ints, spec_floats), torch.channels_last))
    fake("block_inference")(lambda x, weights, gammas, betas, running_means, running_vars, residual, spec_ints,
                            spec_floats, graphs: inference_fake(x, weights, spec(spec_ints, spec_floats)))
    fake("block_inference_folded")(lambda x, weights, shifts, residual, spec_ints, spec_floats, graphs:
                                   inference_fake(x, weights, spec(spec_ints, spec_floats)))
    fake("block_backward")(lambda dy, x, y, weights, gammas, betas, acts, means, variances, spec_ints, spec_floats,
                           need_input_grad, graphs, sample_scale=None, counts=None:
                           backward_fake(x, y, Params(weights, gammas, betas, [], []), spec(spec_ints, spec_floats),
                                         need_input_grad))
    backward, setup_context = block_autograd(lambda *args, **kw: cpp().block_backward(*args, **kw))
    torch.library.register_autograd(f"{LIB}::block_forward", backward, setup_context=setup_context)


extension.on_load(_register)
