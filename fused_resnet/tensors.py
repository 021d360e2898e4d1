"""The tensors a block op takes and returns: structured (``Params``, ``Forward``, ``Grads``, what backends see)
and flat (what the ``fused_resnet::`` ops of ops.py and the extension's ``fused_resnet_C::`` ops exchange).

Custom ops need flat schemas, so a block op takes its tensors, then the spec as ``spec`` (int[]) and
``spec_floats`` (float[]) — :attr:`BlockSpec.ints` / :attr:`BlockSpec.floats` — and the fused_resnet:: ops a
backend name last. Outputs are flat lists too:

* forward:  [y, a_0 .. a_{n-1}, mean_0 .. mean_{n-1}, var_0 .. var_{n-1}] (+ [counts] for a synchronised spec)
* backward: [dx, d_residual, dW_0 .., dγ_0 .., dβ_0 ..] (dx / d_residual: empty tensors when not produced, since
  outputs of a custom op may not alias each other)

The fakes of every block op (their outputs' shapes) and the autograd formula shared by the forward ops are here
too, written once for the fused_resnet:: ops and the extension's.

Layout contract: y and dx follow the user's layout (:func:`~fused_resnet.spec.memory_format_of`); the saved
pre-BN outputs stay in the layout of the backend that made them (``Backend.saved_format``); statistics are
float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .spec import BlockSpec, Shortcut, acc_dtype, memory_format_of


class Params(NamedTuple):
    """A block's parameters and running statistics, one entry per unit (the projection's last)."""

    weights: List[Tensor]
    gammas: List[Tensor]
    betas: List[Tensor]
    running_means: List[Optional[Tensor]]
    running_vars: List[Optional[Tensor]]


class Forward(NamedTuple):
    """A training forward's outputs: y in the user's layout; per unit the pre-BN conv output (in the backend's
    ``saved_format``) and the statistics its BN used (batch statistics with the biased variance, or the running
    ones), float32 (float64 for float64 inputs); for a synchronised spec (``BlockSpec.synced``) the element count
    behind each unit's statistics (the group's for a synchronised unit; float64, on the statistics' device),
    else None."""

    y: Tensor
    acts: List[Tensor]
    means: List[Tensor]
    variances: List[Tensor]
    counts: Optional[Tensor] = None


class Grads(NamedTuple):
    """A block backward's results: dx (None when not asked for), the gradient of a ``Shortcut.TENSOR`` residual
    (else None), and per unit dW, dγ, dβ."""

    dx: Optional[Tensor]
    d_residual: Optional[Tensor]
    dws: List[Tensor]
    dgammas: List[Tensor]
    dbetas: List[Tensor]


FORWARD_INPUTS = ("x", "weights", "gammas", "betas", "running_means", "running_vars", "residual", "spec",
                  "spec_floats")
BACKWARD_INPUTS = ("dy", "x", "y", "weights", "gammas", "betas", "acts", "means", "variances", "spec", "spec_floats",
                   "need_input_grad")  # then, in both block_backward ops, the forward's counts (synchronised specs)


def pack_forward(out: Forward) -> List[Tensor]:
    return [out.y, *out.acts, *out.means, *out.variances] + ([] if out.counts is None else [out.counts])


def unpack_forward(flat: Sequence[Tensor], n: int) -> Forward:
    counts = flat[1 + 3 * n] if len(flat) > 1 + 3 * n else None
    return Forward(flat[0], list(flat[1:1 + n]), list(flat[1 + n:1 + 2 * n]), list(flat[1 + 2 * n:1 + 3 * n]),
                   counts)


def pack_grads(grads: Grads, x: Tensor) -> List[Tensor]:
    dx = x.new_empty((0,)) if grads.dx is None else grads.dx
    d_res = x.new_empty((0,)) if grads.d_residual is None else grads.d_residual
    return [dx, d_res, *grads.dws, *grads.dgammas, *grads.dbetas]


def unpack_grads(flat: Sequence[Tensor], n: int, spec: BlockSpec, need_input_grad: bool) -> Grads:
    return Grads(flat[0] if need_input_grad else None, flat[1] if spec.shortcut == Shortcut.TENSOR else None,
                 list(flat[2:2 + n]), list(flat[2 + n:2 + 2 * n]), list(flat[2 + 2 * n:2 + 3 * n]))


# --------------------------------------------------------------------------------------------- fakes
# Empty outputs of the shapes, dtypes and layouts a block op returns: every backend's op and the extension's
# register these as their fake (meta) kernels.
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
    """(backward, setup_context) of a whole-block forward op with the forward inputs above, optionally followed by
    more arguments (the fused_resnet:: ops' backend name and stochastic depth's ``sample_scale``, a tensor saved
    as the others; the extension's ``graphs``); ``backward_op`` is the
    matching backward op, called with the backward inputs and the same trailing arguments."""
    n_in = len(FORWARD_INPUTS)

    def setup_context(ctx, inputs, output):
        x, weights, gammas, betas, _, _, residual, spec_ints, spec_floats = inputs[:n_in]
        ctx.n = len(weights)
        ctx.spec = (spec_ints, spec_floats)
        extra = tuple(inputs[n_in:])
        # a tensor among them (stochastic depth's sample_scale) is saved as autograd saves tensors
        ctx.extra_tensors = [i for i, e in enumerate(extra) if isinstance(e, Tensor)]
        ctx.extra = tuple(None if isinstance(e, Tensor) else e for e in extra)
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.save_for_backward(x, *weights, *gammas, *betas, *output, *(extra[i] for i in ctx.extra_tensors))
        # Only y's gradient is read: left to autograd, the saved outputs' absent gradients would arrive as zero
        # tensors, one activation-sized fill per saved pre-BN output in every backward (the launch account saw them)
        ctx.set_materialize_grads(False)

    def backward(ctx, grads):
        n = ctx.n
        x, *rest = ctx.saved_tensors
        extra = list(ctx.extra)
        for i in reversed(ctx.extra_tensors):
            extra[i] = rest.pop()
        weights, gammas, betas = rest[:n], rest[n:2 * n], rest[2 * n:3 * n]
        saved = unpack_forward(rest[3 * n:], n)
        nones = [None] * n
        none_tail = (None,) * (2 + len(ctx.extra))  # spec, spec_floats and the rest: not differentiable
        dy = grads[0]
        if dy is None:
            return (None, nones, nones, nones, nones, nones, None) + none_tail
        need_dx = bool(ctx.needs_input_grad[0])
        counts = {} if saved.counts is None else {"counts": saved.counts}  # a synchronised spec's
        flat = backward_op(dy, x, saved.y, list(weights), list(gammas), list(betas), saved.acts, saved.means,
                           saved.variances, *ctx.spec, need_dx, *extra, **counts)
        out = unpack_grads(flat, n, BlockSpec.from_schema(*ctx.spec), need_dx)
        d_res = out.d_residual.to(ctx.residual_dtype) if ctx.residual_dtype is not None else None
        return (out.dx, out.dws, out.dgammas, out.dbetas, nones, nones, d_res) + none_tail

    return backward, setup_context
