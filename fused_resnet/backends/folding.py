"""BN folded into its conv for eval mode, shared by the backends' inference paths.

In eval mode BN(conv(x, W)) = conv(x, W·s) + t with s = γ/sqrt(running_var + eps), t = β − running_mean·s.

The folded pair of a unit lives in two persistent tensors owned by a cache entry (W·s in W's dtype, channels_last;
t in fp32), keyed by the identities of W, γ, β, running_mean and running_var and refreshed in place (``out=``)
whenever one of their version counters moves (in-place updates, ``load_state_dict`` and optimizer steps all move
them) or W's storage is swapped (``param.data = ...`` keeps the version counter). The returned tensors therefore
keep their addresses for as long as the entry lives, which is what a captured CUDA graph needs: it reads the
entry's current values, never memory freed by a refold. An entry goes when one of its tensors does (weak
references); a refresh that finds W in another dtype, device or shape allocates buffers that fit.

Inside a CUDA graph capture the fold is recorded on every call — into the entry's buffers when an earlier eager
call made the entry, into the call's own tensors otherwise — so each replay refolds from the weights and running
statistics of that moment, whatever changed between replays; the cost is five small elementwise kernels per unit
and replay (six for running statistics not in fp32): four on per-channel vectors, one weight-sized multiply. No
entry is created while capturing, so the cache never holds a graph pool's memory. Not cached (folded on every
call): inference-mode tensors, which have no version counter, and per-call tensors (autocast's weight copies, a
1-D conv's 2-D weight view, γ·α of a residual scale), whose entries die with them.

Not seen by eager calls: edits through ``tensor.data`` (torch's rule: ``.data`` has its own version counter) and
running statistics updated by torch's own BatchNorm, which does not move their version counters.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import launches
from ..tensors import Params

Folded = Tuple[Tensor, Tensor]


class _Entry:
    """One unit's folded buffers, the weak references to their sources, and the sources' state they hold the fold
    of (None: not yet folded)."""

    __slots__ = ("refs", "state", "w", "t")

    def __init__(self, refs: List[weakref.ref], w: Tensor, t: Tensor):
        self.refs, self.state, self.w, self.t = refs, None, w, t

    def fits(self, w: Tensor) -> bool:
        return self.w.shape == w.shape and self.w.dtype == w.dtype and self.w.device == w.device


_FOLD_CACHE: Dict[tuple, _Entry] = {}


def _state(sources: Sequence[Tensor]) -> Optional[tuple]:
    """The sources' version counters and W's address: equal states mean equal folds. None for inference-mode
    tensors (they have no version counter)."""
    try:
        return tuple(t._version for t in sources) + (sources[0].data_ptr(),)
    except RuntimeError:
        return None


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph. Nothing can capture before CUDA is initialised, and
    asking first spares a machine without a usable driver the error that asking raises there."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _buffers(w: Tensor) -> Folded:
    # Built outside inference mode even when called inside it: an inference tensor could not be refolded in
    # place by a later call outside inference mode.
    with torch.inference_mode(False):
        return (torch.empty_like(w, memory_format=torch.channels_last),
                torch.empty(w.shape[0], dtype=torch.float32, device=w.device))


def _fold_into(out: Folded, sources: Sequence[Tensor], eps: float) -> Folded:
    """Writes the fold into ``out`` with ``out=`` ops only, computed in fp32 (type promotion of the fp32 s)."""
    w, gamma, beta, running_mean, running_var = sources
    w_out, t_out = out
    with torch.no_grad():
        s = gamma * torch.rsqrt(running_var.float() + eps)
        torch.addcmul(beta, running_mean, s, value=-1, out=t_out)
        torch.mul(w, s.view(-1, *([1] * (w.dim() - 1))), out=w_out)
    return out


def _fold(sources: Sequence[Tensor], eps: float, capture: bool) -> Folded:
    w = sources[0]
    state = _state(sources)
    if state is None:
        return _fold_into(_buffers(w), sources, eps)
    key = tuple(map(id, sources)) + (eps,)
    entry = _FOLD_CACHE.get(key)
    if entry is not None and not all(ref() is t for ref, t in zip(entry.refs, sources, strict=True)):
        entry = None  # the key's ids now name other tensors: never trust an id alone
    if capture:
        if entry is None or not entry.fits(w):
            return _fold_into(_buffers(w), sources, eps)
        # Recorded, not run: the buffers hold the last eager fold (of entry.state) or a replay's fold of a later
        # state, which the next eager call sees as moved versions. entry.state needs no change.
        return _fold_into((entry.w, entry.t), sources, eps)
    if entry is None:
        def evict(_ref: weakref.ref, key=key) -> None:
            _FOLD_CACHE.pop(key, None)

        entry = _Entry([weakref.ref(t, evict) for t in sources], *_buffers(w))
        _FOLD_CACHE[key] = entry
    elif entry.state == state:
        return entry.w, entry.t
    elif not entry.fits(w):  # W converted in place (module.to keeps parameter objects): the old buffers are void
        entry.w, entry.t = _buffers(w)
    _fold_into((entry.w, entry.t), sources, eps)
    entry.state = state  # the sources' versions, not the buffers': writing the buffers moves nothing compared here
    return entry.w, entry.t


def fold_bn(w: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
            eps: float) -> Folded:
    """(W·s in W's dtype, channels_last; t in fp32) with s = γ/sqrt(running_var + eps), t = β − running_mean·s:
    conv(x, W') + t equals BN(conv(x, W)) in eval mode. The same two tensors for the same five sources, refolded
    in place when any of them changes; inside a CUDA graph capture the fold is recorded on every call."""
    return _fold((w, gamma, beta, running_mean, running_var), eps, capturing())


def fold_block(params: Params, units) -> List[Folded]:
    """``fold_bn`` of every unit of a block (``units``: the spec's), asking once whether a capture is under way.
    A dry launch account (fused_resnet.launches) counts eval's steady state, where the cache holds every fold:
    the buffers' shapes, no fold."""
    if launches.dry():
        return [(torch.empty_like(w, memory_format=torch.channels_last), w.new_empty(w.shape[0], dtype=torch.float32))
                for w in params.weights]
    capture = capturing()
    return [_fold(sources, u.eps, capture) for *sources, u in zip(*params, units, strict=True)]
