"""Backend "triton": the block ops on the Triton implicit-GEMM conv engine (``fused_resnet.kernels.conv``).

* Eval mode (``block_inference``): every BN is folded into its conv (W' = W·s, bias t = β − mean·s, cached per
  parameter set and recomputed whenever a weight, γ, β or running statistic changes — tensors' version counters
  move on every in-place update, ``load_state_dict`` and optimizer steps included). Each conv is one kernel:
  conv + bias + ReLU, and for the block's last conv conv + bias + shortcut + ReLU, the shortcut being the block
  input (identity), the projection conv's output (computed first, by the same kernel with its BN folded), the
  option-A shortcut read from the block input inside the epilogue, or a residual tensor.
* Training forward (``block_forward``): each conv writes its pre-BN output and per-tile fp32 mean / M2 partials
  of it from its epilogue (merged exactly, Chan's formula); the next conv applies that BN + ReLU while loading
  its input, so the BN/ReLU output is never written; the block output y = relu(a·s + t + shortcut) is one
  Triton kernel (kernels/bn_act.py) reading the shortcut in place: the block input, the projection's pre-BN
  output through its own BN (dual affine), or the option-A subsample of the block input.
* Training backward (``block_backward``): one reduction kernel (kernels/drelu_dbn.py) masks dy with [y > 0]
  and sums Σdz, Σdz·x̂; every dgrad / wgrad applies the BN backward while loading its gradient operand, wgrad
  recomputes its input relu(a·s + t) while loading, each dgrad's epilogue applies the previous ReLU mask and
  sums the previous BN's Σdz, Σdz·x̂, and the block's first dgrad adds the shortcut gradient.

Triton is imported on first use, not when the package is imported. The kernels run on CUDA tensors, or on CPU
tensors when ``TRITON_INTERPRET=1`` was set before the first import (the tests' way of running them on a CPU).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends, reference


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _conv_kernels():
    from .kernels import conv

    return conv


def _pair(values: Sequence[int], i: int) -> Tuple[int, int]:
    return values[2 * i], values[2 * i + 1]


# --------------------------------------------------------------------------------------------- BN folding
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
        s, t, _ = reference.scale_shift(gamma, beta, running_mean.float(), running_var.float(), eps)
        t = t.contiguous()
        w_folded = (w.float() * s.view(-1, 1, 1, 1)).to(w.dtype).contiguous(memory_format=torch.channels_last)
    if versions is not None:
        def evict(_ref, key=key):
            _FOLD_CACHE.pop(key, None)

        _FOLD_CACHE[key] = ([weakref.ref(t_, evict) for t_ in tensors], versions, (w_folded, t))
    return w_folded, t


# --------------------------------------------------------------------------------------------- the backend
class TritonBackend(backends.Backend):
    name = "triton"

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _interpreting():
            return ("no CUDA device: the Triton kernels run on CUDA tensors (TRITON_INTERPRET=1, set before the "
                    "first import, runs them on CPU tensors for testing)")
        return None

    def unsupported_reason(self, x: Tensor, groups: Sequence[int], dilations: Sequence[int]) -> Optional[str]:
        if x.device.type != "cuda" and not _interpreting():
            return f"input on {x.device}; the Triton kernels need CUDA tensors"
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return f"dtype {x.dtype} (the Triton engine runs float32, float16 and bfloat16)"
        if any(g != 1 for g in groups):
            return f"groups {list(groups)} (the Triton engine implements groups=1)"
        if any(d != 1 for d in dilations):
            return f"dilation {list(dilations)} (the Triton engine implements dilation 1)"
        return None

    @staticmethod
    def block_backward(
        dy: Tensor, x: Tensor, y: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
        acts: List[Tensor], means: List[Tensor], variances: List[Tensor],
        strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
        batch_stats: List[bool], shortcut: int, shortcut_stride: List[int], need_input_grad: bool,
    ) -> Tuple[Optional[Tensor], Optional[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """Backward, same results as reference.block_backward. One reduction kernel masks dy with [y > 0] and sums
        Σdz, Σdz·x̂ of the last BN; each dgrad and wgrad applies that BN's backward while loading its gradient
        operand; wgrad recomputes its input relu(a·s + t) while loading; each dgrad's epilogue applies the
        previous unit's ReLU mask (recomputed from its pre-BN output) and sums the previous BN's Σdz, Σdz·x̂;
        the block's first dgrad adds the shortcut's gradient in its epilogue."""
        kernels = _conv_kernels()
        from .kernels.drelu_dbn import drelu_dbn_reduce

        cl = torch.channels_last
        n = len(weights)
        n_main = reference.num_main_units(weights, shortcut)
        acts = [a.contiguous(memory_format=cl) for a in acts]
        affine = [tuple(v.contiguous() for v in reference.scale_shift(gammas[i], betas[i], means[i], variances[i],
                                                                     eps[i])) for i in range(n)]  # (s, t, rstd)
        dws: List[Optional[Tensor]] = [None] * n
        dgammas: List[Optional[Tensor]] = [None] * n
        dbetas: List[Optional[Tensor]] = [None] * n

        def dbn(i: int, sum_dz: Tensor, sum_dz_xhat: Tensor) -> Tuple[Tensor, ...]:
            """Record unit i's dγ, dβ; return (a_i, mean_i, α, β, γ) of its BN backward
            da = α·dz + β·(a − mean) + γ."""
            dgammas[i], dbetas[i] = sum_dz_xhat.to(gammas[i].dtype), sum_dz.to(betas[i].dtype)
            s, _, rstd = affine[i]
            mean = means[i].contiguous()
            if not batch_stats[i]:  # fixed (running) statistics: da = s·dz
                zero = torch.zeros_like(s)
                return acts[i], mean, s, zero, zero
            count = acts[i].numel() // acts[i].shape[1]
            return acts[i], mean, s, (-s * rstd * sum_dz_xhat / count).contiguous(), (-s * sum_dz / count).contiguous()

        def wgrad(i: int, grad: Tensor, coeffs: Tuple[Tensor, ...], inp: Tensor, in_affine=None) -> None:
            dw = kernels.conv_wgrad(grad, inp, weights[i].shape[2:], _pair(strides, i), _pair(paddings, i),
                                    dbn=coeffs, in_affine=in_affine)
            dws[i] = dw.contiguous(memory_format=reference.memory_format_of(weights[i]))

        _, _, rstd_last = affine[n_main - 1]
        dz_out, sum_dz, sum_dz_xhat = drelu_dbn_reduce(
            dy.contiguous(memory_format=cl), acts[n_main - 1], means[n_main - 1].contiguous(), rstd_last,
            y=y.contiguous(memory_format=cl))
        closing: dict = {}  # the block's first dgrad adds the shortcut's gradient in its epilogue
        d_residual = None
        if shortcut == reference.SHORTCUT_IDENTITY:
            closing = {"residual": dz_out}
        elif shortcut == reference.SHORTCUT_PAD:
            closing = {"residual": dz_out, "pad_shortcut_stride": shortcut_stride}
        elif shortcut == reference.SHORTCUT_TENSOR:
            d_residual = dz_out.to(x.dtype).contiguous(memory_format=reference.memory_format_of(x))
        elif shortcut == reference.SHORTCUT_PROJECTION:
            _, sc_sum, sc_sum_x = drelu_dbn_reduce(dz_out, acts[n_main], means[n_main].contiguous(),
                                                  affine[n_main][2])
            coeffs = dbn(n_main, sc_sum, sc_sum_x)
            wgrad(n_main, dz_out, coeffs, x)
            if need_input_grad:
                closing = {"residual": kernels.conv_dgrad(dz_out, weights[n_main], x.shape[2:],
                                                          _pair(strides, n_main), _pair(paddings, n_main),
                                                          dbn=coeffs)}
        dz, dx = dz_out, None
        for i in reversed(range(n_main)):
            coeffs = dbn(i, sum_dz, sum_dz_xhat)
            if i > 0:
                s_prev, t_prev, rstd_prev = affine[i - 1]
                wgrad(i, dz, coeffs, acts[i - 1], in_affine=(s_prev, t_prev))
                dz, sum_dz, sum_dz_xhat = kernels.conv_dgrad(
                    dz, weights[i], acts[i - 1].shape[2:], _pair(strides, i), _pair(paddings, i), dbn=coeffs,
                    relu_of=(acts[i - 1], s_prev, t_prev, means[i - 1].contiguous(), rstd_prev))
            else:
                wgrad(0, dz, coeffs, x)
                if need_input_grad:
                    dx = kernels.conv_dgrad(dz, weights[0], x.shape[2:], _pair(strides, 0), _pair(paddings, 0),
                                            dbn=coeffs, **closing)
                    dx = dx.contiguous(memory_format=reference.memory_format_of(x))
        return dx, d_residual, dws, dgammas, dbetas

    @staticmethod
    def block_forward(
        x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
        running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]], residual: Optional[Tensor],
        strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
        batch_stats: List[bool], shortcut: int, shortcut_stride: List[int],
    ) -> List[Tensor]:
        """Training forward, same outputs as reference.block_forward. Each conv computes its output's BN
        statistics in its epilogue (per-tile partials merged exactly), and applies the previous unit's BN + ReLU
        while loading its input (r_i is never written); the block output is one BN-apply + shortcut + ReLU
        kernel (dual affine for a projection, in-place read for option A)."""
        kernels = _conv_kernels()
        from .kernels import bn_act as bn_act_kernel

        n_main = reference.num_main_units(weights, shortcut)
        acts, means, variances, affine = [], [], [], []
        for i in range(len(weights)):
            chained = 0 < i < n_main  # reads the previous unit's pre-BN output through its BN + ReLU
            inp, in_affine = (acts[i - 1], affine[i - 1]) if chained else (x, None)
            args = (inp, weights[i], _pair(strides, i), _pair(paddings, i))
            if batch_stats[i]:
                a, mean, var = kernels.conv_fprop(*args, in_affine=in_affine, stats=True)
            else:
                a = kernels.conv_fprop(*args, in_affine=in_affine)
                mean, var = running_means[i].float().clone(), running_vars[i].float().clone()
            s, t, _ = reference.scale_shift(gammas[i], betas[i], mean, var, eps[i])
            acts.append(a)
            means.append(mean)
            variances.append(var)
            affine.append((s.contiguous(), t.contiguous()))
        cl = torch.channels_last
        closing: dict = {}  # the closing kernel's shortcut: read in place, through its own BN for a projection
        if shortcut in (reference.SHORTCUT_IDENTITY, reference.SHORTCUT_PAD):
            closing["residual"] = x.contiguous(memory_format=cl)
            if shortcut == reference.SHORTCUT_PAD:
                closing["pad_shortcut_stride"] = shortcut_stride
        elif shortcut == reference.SHORTCUT_PROJECTION:
            closing = {"residual": acts[n_main], "residual_affine": affine[n_main]}
        elif shortcut == reference.SHORTCUT_TENSOR:
            closing["residual"] = residual.to(x.dtype).contiguous(memory_format=cl)
        y = bn_act_kernel.bn_act(acts[n_main - 1], *affine[n_main - 1], **closing)
        fmt = reference.memory_format_of(x)
        return [y.contiguous(memory_format=fmt)] + [a.contiguous(memory_format=fmt) for a in acts] + means + variances

    @staticmethod
    def block_inference(
        x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
        running_means: List[Tensor], running_vars: List[Tensor], residual: Optional[Tensor],
        strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
        shortcut: int, shortcut_stride: List[int],
    ) -> Tensor:
        """One conv kernel per conv, BN folded, bias / shortcut / ReLU in the epilogues."""
        conv_fprop = _conv_kernels().conv_fprop
        n_main = reference.num_main_units(weights, shortcut)
        folded = [fold_bn(weights[i], gammas[i], betas[i], running_means[i], running_vars[i], eps[i])
                  for i in range(len(weights))]
        closing: dict = {}  # the last conv's epilogue arguments
        if shortcut == reference.SHORTCUT_IDENTITY:
            closing = {"residual": x}
        elif shortcut == reference.SHORTCUT_PROJECTION:
            w_sc, b_sc = folded[n_main]
            closing = {"residual": conv_fprop(x, w_sc, _pair(strides, n_main), _pair(paddings, n_main), bias=b_sc)}
        elif shortcut == reference.SHORTCUT_PAD:
            closing = {"residual": x, "pad_shortcut_stride": shortcut_stride}
        elif shortcut == reference.SHORTCUT_TENSOR:
            closing = {"residual": residual.to(x.dtype)}
        h = x
        for i in range(n_main):
            w_i, b_i = folded[i]
            h = conv_fprop(h, w_i, _pair(strides, i), _pair(paddings, i), bias=b_i, relu=True,
                           **(closing if i == n_main - 1 else {}))
        return h.contiguous(memory_format=reference.memory_format_of(x))


backends.register(TritonBackend())
