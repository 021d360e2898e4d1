"""The torch.library layer: every op the blocks call, with fake (meta) kernels and autograd — the one place where
a :class:`~fused_resnet.spec.BlockSpec` becomes schema arguments.

Ops (namespace ``fused_resnet``), each resolving its ``backend`` name at run time (also inside a
``torch.compile``-d graph) through :mod:`fused_resnet.backends`:

* ``block_forward``   — training-capable block forward: y plus what backward needs (pre-BN conv outputs,
  per-channel statistics). Differentiable through ``block_backward``.
* ``block_backward``  — the hand-derived backward of a whole block, one op.
* ``block_inference`` — eval-mode block forward that saves nothing.
* ``bn_running_update`` — torch's running-statistics update (mutates running_mean / running_var /
  num_batches_tracked), kept out of the differentiable op because torch.library autograd needs functional ops.
* ``sync_stats`` / ``sync_grad_sums`` — a synchronised BN's collectives (fused_resnet.distributed), which the
  extension's C++ block ops call through the dispatcher between their kernels.

The Python functions at the bottom (``forward``, ``inference``, ``running_update``) are what the functional layer
calls: they take the spec and tensor bundles and do the flattening. This module also registers the fakes and the
autograd formula of the extension's ``fused_resnet_C::`` ops whenever the extension loads.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import backends, distributed
from .backends import extension
from .spec import BlockSpec, Shortcut, acc_dtype, memory_format_of
from .tensors import FORWARD_INPUTS, Forward, Grads, Params, pack_forward, pack_grads, unpack_forward, unpack_grads


def _spec(spec_ints: Sequence[int], spec_floats: Sequence[float]) -> BlockSpec:
    return BlockSpec.from_schema(spec_ints, spec_floats)


# --------------------------------------------------------------------------------------------- fakes
def _empty(x: Tensor, shape, fmt: torch.memory_format) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt)


def forward_fake(x: Tensor, weights: Sequence[Tensor], spec: BlockSpec,
                 saved_format: torch.memory_format) -> List[Tensor]:
    shapes = spec.output_shapes(x.shape, [w.shape for w in weights])
    stat = acc_dtype(x.dtype)
    acts = [_empty(x, s, saved_format) for s in shapes]
    means = [x.new_empty((s[1],), dtype=stat) for s in shapes]
    variances = [x.new_empty((s[1],), dtype=stat) for s in shapes]
    counts = x.new_empty((len(shapes),), dtype=torch.float64) if spec.synced else None
    return pack_forward(Forward(_empty(x, shapes[spec.n_main - 1], memory_format_of(x)), acts, means, variances,
                                counts))


def inference_fake(x: Tensor, weights: Sequence[Tensor], spec: BlockSpec) -> Tensor:
    shapes = spec.output_shapes(x.shape, [w.shape for w in weights])
    return _empty(x, shapes[spec.n_main - 1], memory_format_of(x))


def backward_fake(x: Tensor, y: Tensor, params: Params, spec: BlockSpec, need_input_grad: bool) -> List[Tensor]:
    fmt = memory_format_of(x)
    dx = _empty(x, x.shape, fmt) if need_input_grad else None
    d_res = _empty(x, y.shape, fmt) if spec.shortcut == Shortcut.TENSOR else None
    grads = Grads(dx, d_res, [torch.empty_like(w) for w in params.weights],
                  [torch.empty_like(g) for g in params.gammas], [torch.empty_like(b) for b in params.betas])
    return pack_grads(grads, x)


# --------------------------------------------------------------------------------------------- autograd
def block_autograd(backward_op: Callable[..., List[Tensor]]):
    """(backward, setup_context) of a whole-block forward op with the forward inputs of :mod:`fused_resnet.tensors`
    (optionally followed by a backend name); ``backward_op`` is the matching backward op, called with the backward
    inputs and the same trailing arguments."""
    n_in = len(FORWARD_INPUTS)

    def setup_context(ctx, inputs, output):
        x, weights, gammas, betas, _, _, residual, spec_ints, spec_floats = inputs[:n_in]
        ctx.n = len(weights)
        ctx.spec = (spec_ints, spec_floats)
        ctx.extra = tuple(inputs[n_in:])
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x, *weights, *gammas, *betas, *output)

    def backward(ctx, grads):
        n = ctx.n
        x, *rest = ctx.saved_tensors
        weights, gammas, betas = rest[:n], rest[n:2 * n], rest[2 * n:3 * n]
        saved = unpack_forward(rest[3 * n:], n)
        nones = [None] * n
        none_tail = (None,) * (2 + len(ctx.extra))  # spec, spec_floats (, backend): not differentiable
        dy = grads[0]
        if dy is None:
            return (None, nones, nones, nones, nones, nones, None) + none_tail
        need_dx = bool(ctx.needs_input_grad[0])
        counts = {} if saved.counts is None else {"counts": saved.counts}  # a synchronised spec's
        flat = backward_op(dy, x, saved.y, list(weights), list(gammas), list(betas), saved.acts, saved.means,
                           saved.variances, *ctx.spec, need_dx, *ctx.extra, **counts)
        out = unpack_grads(flat, n, _spec(*ctx.spec), need_dx)
        d_res = out.d_residual.to(ctx.residual_dtype) if ctx.residual_dtype is not None else None
        return (out.dx, out.dws, out.dgammas, out.dbetas, nones, nones, d_res) + none_tail

    return backward, setup_context


# --------------------------------------------------------------------------------------------- block_forward
@torch.library.custom_op("fused_resnet::block_forward", mutates_args=())
def block_forward(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]], residual: Optional[Tensor],
    spec: List[int], spec_floats: List[float], backend: str,
) -> List[Tensor]:
    block = _spec(spec, spec_floats)
    params = Params(weights, gammas, betas, running_means, running_vars)
    return pack_forward(backends.resolve(backend, x, block).block_forward(block, x, params, residual))


@block_forward.register_fake
def _block_forward_fake(x, weights, gammas, betas, running_means, running_vars, residual, spec, spec_floats,
                        backend):
    block = _spec(spec, spec_floats)
    return forward_fake(x, weights, block, backends.resolve(backend, x, block).saved_format(x))


_backward, _setup_context = block_autograd(lambda *args, **kw: torch.ops.fused_resnet.block_backward(*args, **kw))
block_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- block_backward
@torch.library.custom_op("fused_resnet::block_backward", mutates_args=())
def block_backward(
    dy: Tensor, x: Tensor, y: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    acts: List[Tensor], means: List[Tensor], variances: List[Tensor], spec: List[int], spec_floats: List[float],
    need_input_grad: bool, backend: str, counts: Optional[Tensor] = None,
) -> List[Tensor]:
    block = _spec(spec, spec_floats)
    params = Params(weights, gammas, betas, [None] * len(weights), [None] * len(weights))
    grads = backends.resolve(backend, x, block).block_backward(
        block, dy, x, params, Forward(y, acts, means, variances, counts), need_input_grad)
    return pack_grads(grads, x)


@block_backward.register_fake
def _block_backward_fake(dy, x, y, weights, gammas, betas, acts, means, variances, spec, spec_floats,
                         need_input_grad, backend, counts=None):
    params = Params(weights, gammas, betas, [], [])
    return backward_fake(x, y, params, _spec(spec, spec_floats), need_input_grad)


# --------------------------------------------------------------------------------------------- block_inference
@torch.library.custom_op("fused_resnet::block_inference", mutates_args=())
def block_inference(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor], running_means: List[Tensor],
    running_vars: List[Tensor], residual: Optional[Tensor], spec: List[int], spec_floats: List[float], backend: str,
) -> Tensor:
    block = _spec(spec, spec_floats)
    params = Params(weights, gammas, betas, running_means, running_vars)
    return backends.resolve(backend, x, block).block_inference(block, x, params, residual)


@block_inference.register_fake
def _block_inference_fake(x, weights, gammas, betas, running_means, running_vars, residual, spec, spec_floats,
                          backend):
    return inference_fake(x, weights, _spec(spec, spec_floats))


# --------------------------------------------------------------------------------------------- bn_running_update
@torch.library.custom_op(
    "fused_resnet::bn_running_update", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def bn_running_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
    count: int, momentum: Optional[float], backend: str, group_count: Optional[Tensor] = None,
) -> None:
    """``group_count``: a synchronised BN's element count over its group (0-d, on the device), used instead of
    ``count``."""
    backends.resolve(backend, mean, None).bn_running_update(
        running_mean, running_var, num_batches_tracked, mean, var, count if group_count is None else group_count,
        momentum)


@bn_running_update.register_fake
def _bn_running_update_fake(running_mean, running_var, num_batches_tracked, mean, var, count, momentum, backend,
                            group_count=None):
    return None


# --------------------------------------------------------------------------------------------- synchronised BN
# The extension's block ops reach torch.distributed through these two ops, between their kernels (the collectives
# are Python's); the Python backends call fused_resnet.distributed directly.
@torch.library.custom_op("fused_resnet::sync_stats", mutates_args=())
def sync_stats(mean: Tensor, var: Tensor, count: int, eps: float, group: int) -> List[Tensor]:
    """[mean, biased variance, element count (float64, 0-d, on the device)] over the process group ``group``."""
    return list(distributed.merge_stats(group, mean, var, count, eps))


@torch.library.custom_op("fused_resnet::sync_grad_sums", mutates_args=())
def sync_grad_sums(sum_dz: Tensor, sum_dz_xhat: Tensor, rstd: Tensor, group: int) -> List[Tensor]:
    """[Σdz, Σdz·x̂] over the process group ``group``."""
    return list(distributed.reduce_grad_sums(group, sum_dz, sum_dz_xhat, rstd))


# --------------------------------------------------------------------------------------------- the calls
def forward(spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor], backend: str) -> Forward:
    """The training op on structured arguments."""
    flat = torch.ops.fused_resnet.block_forward(x, *params, residual, spec.ints, spec.floats, backend)
    return unpack_forward(flat, len(spec.units))


def inference(spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor], backend: str) -> Tensor:
    """The eval op on structured arguments."""
    return torch.ops.fused_resnet.block_inference(x, *params, residual, spec.ints, spec.floats, backend)


def running_update(bn, mean: Tensor, var: Tensor, count, momentum: Optional[float], backend: str) -> None:
    """Update ``bn``'s running statistics from one call's batch statistics of ``count`` elements per channel (an
    int, or a synchronised BN's group count as a 0-d tensor)."""
    group = {"group_count": count} if isinstance(count, Tensor) else {}
    torch.ops.fused_resnet.bn_running_update(bn.running_mean, bn.running_var, bn.num_batches_tracked, mean, var,
                                             0 if group else count, momentum, backend, **group)


# --------------------------------------------------------------------------------------------- extension ops
def _vectors(like: Tensor, count: int, k: int):
    return tuple(like.new_empty((count,), dtype=torch.float32) for _ in range(k))


def _register_extension_ops() -> None:
    """Fakes for every ``fused_resnet_C::`` op and the autograd formula of its block forward."""
    lib = "fused_resnet_C"

    def fake(name):
        return torch.library.register_fake(f"{lib}::{name}")

    fake("bn_stats")(lambda a, gamma, beta, eps: _vectors(a, a.shape[1], 4))
    fake("bn_scale_shift")(lambda gamma, beta, mean, var, eps: _vectors(mean, mean.shape[0], 3))
    fake("bn_running_update")(lambda running_mean, running_var, nbt, mean, var, count, momentum: None)
    fake("bn_act")(lambda a, scale, shift, residual, relu, residual_scale=None, residual_shift=None,
                   option_a_stride=(): torch.empty_like(a))
    fake("drelu_dbn_reduce")(lambda g, y, a, mean, rstd, scale, shift: _vectors(a, a.shape[1], 2))
    fake("dbn_apply")(lambda g, y, a, mean, rstd, scale, shift, sum_dz, sum_dz_xhat, batch_stats:
                      torch.empty_like(a))
    fake("residual_grad")(lambda d_main, dy, y, like, option_a_stride: torch.empty_like(like))

    def forward_c(x, weights, gammas, betas, running_means, running_vars, residual, spec, spec_floats):
        return forward_fake(x, weights, _spec(spec, spec_floats), torch.channels_last)

    def inference_c(x, weights, gammas, betas, running_means, running_vars, residual, spec, spec_floats):
        return inference_fake(x, weights, _spec(spec, spec_floats))

    def backward_c(dy, x, y, weights, gammas, betas, acts, means, variances, spec, spec_floats, need_input_grad,
                   counts=None):
        return backward_fake(x, y, Params(weights, gammas, betas, [], []), _spec(spec, spec_floats),
                             need_input_grad)

    fake("block_forward")(forward_c)
    fake("block_inference")(inference_c)
    fake("block_inference_folded")(lambda x, weights, shifts, residual, spec, spec_floats:
                                   inference_fake(x, weights, _spec(spec, spec_floats)))
    fake("block_backward")(backward_c)
    backward, setup_context = block_autograd(lambda *args, **kw: torch.ops.fused_resnet_C.block_backward(*args, **kw))
    torch.library.register_autograd(f"{lib}::block_forward", backward, setup_context=setup_context)


extension.on_load(_register_extension_ops)
