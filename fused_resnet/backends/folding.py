"""BN folded into its conv for eval mode, shared by the backends' inference paths.

In eval mode BN(conv(x, W)) = conv(x, W·s) + t with s = γ/sqrt(running_var + eps), t = β − running_mean·s. The
folded pair is cached per tensor identity and recomputed whenever a version counter of W, γ, β, running_mean or
running_var moves (in-place updates, ``load_state_dict`` and optimizer steps all move them); entries go when
their tensors do (weak references).
"""
from __future__ import annotations

import weakref
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .reference import scale_shift


_FOLD_CACHE: Dict[tuple, tuple] = {}


def _versions(tensors: Sequence[Tensor]) -> Optional[tuple]:
    try:
        return tuple(t._version for t in tensors)
    except RuntimeError:  # inference-mode tensors have no version counter: never cache them
        return None


def fold_bn(w: Tensor, gamma: Tensor, beta: Tensor, running_mean: Tensor, running_var: Tensor,
            eps: float) -> Tuple[Tensor, Tensor]:
    """(W·s in W's dtype, channels_last; t in fp32) with s = γ/sqrt(running_var + eps), t = β − running_mean·s:
    conv(x, W') + t equals BN(conv(x, W)) in eval mode. Cached until any of the five tensors changes."""
    tensors = (w, gamma, beta, running_mean, running_var)
    key = tuple(id(t) for t in tensors) + (eps,)
    versions = _versions(tensors)
    hit = _FOLD_CACHE.get(key)
    if hit is not None and hit[1] == versions and all(ref() is t for ref, t in zip(hit[0], tensors, strict=True)):
        return hit[2]
    with torch.no_grad():
        s, t, _ = scale_shift(gamma, beta, running_mean.float(), running_var.float(), eps)
        t = t.contiguous()
        w_folded = (w.float() * s.view(-1, 1, 1, 1)).to(w.dtype).contiguous(memory_format=torch.channels_last)
    if versions is not None:
        def evict(_ref, key=key):
            _FOLD_CACHE.pop(key, None)

        _FOLD_CACHE[key] = ([weakref.ref(t_, evict) for t_ in tensors], versions, (w_folded, t))
    return w_folded, t
