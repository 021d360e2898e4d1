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
calls: they take the spec and tensor bundles and do the flattening. The fakes' shapes and the autograd formula are
:mod:`fused_resnet.tensors`'; the extension's ``fused_resnet_C::`` ops get theirs from backend cuda
(``fused_resnet.backends.cuda.ops``).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import backends, distributed
from .spec import BlockSpec
from .tensors import (Forward, Params, backward_fake, block_autograd, forward_fake, inference_fake, pack_forward,
                      pack_grads, unpack_forward)


def _spec(spec_ints: Sequence[int], spec_floats: Sequence[float]) -> BlockSpec:
    return BlockSpec.from_schema(spec_ints, spec_floats)


# --------------------------------------------------------------------------------------------- block_forward
@torch.library.custom_op("fused_resnet::block_forward", mutates_args=())
def block_forward(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor], running_means: List[Tensor],
    running_vars: List[Tensor], residual: Optional[Tensor], spec: List[int], spec_floats: List[float], backend: str,
    sample_scale: Optional[Tensor],
) -> List[Tensor]:
    """``running_means`` / ``running_vars``: an empty tensor for a BN without running statistics (see
    :func:`forward`); ``sample_scale``: stochastic depth's per-sample d [N] (None: none). No default: torch 2.11's
    autograd compares the backward's results with the inputs as passed, leaving out defaulted ones, while
    ``setup_context`` sees them all."""
    block = _spec(spec, spec_floats)
    params = Params(weights, gammas, betas, _present(running_means), _present(running_vars))
    return pack_forward(backends.resolve(backend, x, block, sample_scale is not None).block_forward(
        block, x, params, residual, **_sample_scale(sample_scale)))


def _sample_scale(sample_scale: Optional[Tensor]) -> dict:
    """The keyword a backend's block ops take stochastic depth's d by: only where there is one (a backend without
    the capability never sees the argument)."""
    return {} if sample_scale is None else {"sample_scale": sample_scale}


@block_forward.register_fake
def _block_forward_fake(x, weights, gammas, betas, running_means, running_vars, residual, spec, spec_floats,
                        backend, sample_scale):
    block = _spec(spec, spec_floats)
    return forward_fake(x, weights, block,
                        backends.resolve(backend, x, block, sample_scale is not None).saved_format(x))


_backward, _setup_context = block_autograd(lambda *args, **kw: torch.ops.fused_resnet.block_backward(*args, **kw))
block_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- block_backward
@torch.library.custom_op("fused_resnet::block_backward", mutates_args=())
def block_backward(
    dy: Tensor, x: Tensor, y: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    acts: List[Tensor], means: List[Tensor], variances: List[Tensor], spec: List[int], spec_floats: List[float],
    need_input_grad: bool, backend: str, sample_scale: Optional[Tensor] = None, counts: Optional[Tensor] = None,
) -> List[Tensor]:
    block = _spec(spec, spec_floats)
    params = Params(weights, gammas, betas, [None] * len(weights), [None] * len(weights))
    grads = backends.resolve(backend, x, block, sample_scale is not None).block_backward(
        block, dy, x, params, Forward(y, acts, means, variances, counts), need_input_grad,
        **_sample_scale(sample_scale))
    return pack_grads(grads, x)


@block_backward.register_fake
def _block_backward_fake(dy, x, y, weights, gammas, betas, acts, means, variances, spec, spec_floats,
                         need_input_grad, backend, sample_scale=None, counts=None):
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
    backends.resolve_running_update(backend, mean).bn_running_update(
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
def _present(stats: List[Tensor]) -> List[Optional[Tensor]]:
    return [None if t.numel() == 0 else t for t in stats]


def forward(spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor], backend: str,
            sample_scale: Optional[Tensor] = None) -> Forward:
    """The training op on structured arguments."""
    # No Tensor?[] in the schema (torch.jit.trace cannot record one): an empty tensor stands for a missing running
    # statistic, never a real one (a BN has at least one channel).
    absent = x.new_empty(0)
    means, variances = ([absent if t is None else t for t in ts] for ts in (params.running_means, params.running_vars))
    flat = torch.ops.fused_resnet.block_forward(x, params.weights, params.gammas, params.betas, means, variances,
                                                residual, spec.ints, spec.floats, backend, sample_scale)
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
