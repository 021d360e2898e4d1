"""The tensors a block op takes and returns: structured (``Params``, ``Forward``, ``Grads``, what backends see)
and flat (what the ``fused_resnet::`` ops of ops.py and the extension's ``fused_resnet_C::`` ops exchange).

Custom ops need flat schemas, so a block op takes its tensors, then the spec as ``spec`` (int[]) and
``spec_floats`` (float[]) — :attr:`BlockSpec.ints` / :attr:`BlockSpec.floats` — and the fused_resnet:: ops a
backend name last. Outputs are flat lists too:

* forward:  [y, a_0 .. a_{n-1}, mean_0 .. mean_{n-1}, var_0 .. var_{n-1}] (+ [counts] for a synchronised spec)
* backward: [dx, d_residual, dW_0 .., dγ_0 .., dβ_0 ..] (dx / d_residual: empty tensors when not produced, since
  outputs of a custom op may not alias each other)

Layout contract: y and dx follow the user's layout (:func:`~fused_resnet.spec.memory_format_of`); the saved
pre-BN outputs stay in the layout of the backend that made them (``Backend.saved_format``); statistics are
float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

from torch import Tensor

from .spec import BlockSpec, Shortcut


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


