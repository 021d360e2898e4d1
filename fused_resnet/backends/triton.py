"""Backend "triton": the block ops on the Triton implicit-GEMM conv engine (``fused_resnet.kernels.conv``).

* Eval mode (``block_inference``): every BN is folded into its conv (W' = W·s, bias t = β − mean·s, in
  persistent buffers per parameter set, refolded in place whenever a weight, γ, β or running statistic changes
  and on every call inside a CUDA graph capture: see ``folding``). Each conv is one kernel:
  conv + bias + ReLU, and for the block's last conv conv + bias + shortcut + ReLU, the shortcut being the block
  input (identity), the projection conv's output (computed first, by the same kernel with its BN folded), the
  option-A shortcut read from the block input inside the epilogue, or a residual tensor.
* Training forward (``block_forward``): each conv writes its pre-BN output and per-tile fp32 mean / M2 partials
  of it from its epilogue (merged exactly, Chan's formula); the next conv applies that BN + ReLU while loading
  its input, so the BN/ReLU output is never written; the block output y = relu(a·s + t + shortcut) is one
  Triton kernel (kernels/bn_act.py) reading the shortcut in place: the block input, the projection's pre-BN
  output through its own BN (dual affine), or the option-A subsample of the block input.
* Training backward (``block_backward``): one reduction kernel (kernels/drelu_dbn.py) masks dy with [y > 0]
  and sums Σdz, Σdz·x̂; every dgrad / wgrad applies the BN backward while loading its gradient operand; each
  dgrad's epilogue applies the previous ReLU mask, sums the previous BN's Σdz, Σdz·x̂ and writes the unit's input
  relu(a·s + t) for its wgrad (which then has one transformed operand, not two: see docs/TRITON.md); the block's
  first dgrad adds the shortcut gradient.

Triton is imported on first use, not when the package is imported. The kernels run on CUDA tensors, or on CPU
tensors when ``TRITON_INTERPRET=1`` was set before the first import (the tests' way of running them on a CPU).
Every block op runs under its input's device guard: Triton launches on the current device and stream, which
need not be the tensors' (a model on cuda:1 while cuda:0 is current).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import distributed
from ..spec import BlockSpec, Shortcut, memory_format_of
from . import reference
from .folding import fold_block
from ..tensors import Forward, Grads, Params
from .registry import Backend, register

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CL = torch.channels_last


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernel modules (imported on first use: importing them imports Triton)."""
    from ..kernels import bn_act, bn_finalize, conv, drelu_dbn

    return conv, bn_act, drelu_dbn, bn_finalize


def _device_guard(device: torch.device):
    """The context under which a block op on ``device`` launches its kernels: that CUDA device made current (and
    with it its current stream, which Triton launches on); nothing for a CPU tensor (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_input_device(op):
    """Runs a block op under the device guard of its first tensor argument (x, or dy for the backward)."""
    @functools.wraps(op)
    def guarded(self, spec, first, *args, **kwargs):
        with _device_guard(first.device):
            return op(self, spec, first, *args, **kwargs)
    return guarded


class TritonBackend(Backend):
    name = "triton"
    auto_rank = 1

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _interpreting():
            return ("no CUDA device: the Triton kernels run on CUDA tensors (TRITON_INTERPRET=1, set before the "
                    "first import, runs them on CPU tensors for testing)")
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype, spec: Optional[BlockSpec]) -> Optional[str]:
        if device_type != "cuda" and not _interpreting():
            return f"input on {device_type}; the Triton kernels need CUDA tensors"
        if dtype not in _DTYPES:
            return f"dtype {dtype} (the Triton engine runs float32, float16 and bfloat16)"
        if spec is not None and any(u.groups != 1 for u in spec.units):
            return f"groups {[u.groups for u in spec.units]} (the Triton engine implements groups=1)"
        if spec is not None and any(u.dilation != (1, 1) for u in spec.units):
            return f"dilation {[u.dilation for u in spec.units]} (the Triton engine implements dilation 1)"
        return None

    def saved_format(self, x: Tensor) -> torch.memory_format:
        return _CL

    def bn_running_update(self, running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        """One launch per BN (kernels/bn_finalize.py; twin: reference.bn_running_update, ~15 torch launches)."""
        with _device_guard(mean.device):
            _kernels()[3].bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count,
                                            momentum)

    @_on_input_device
    def block_forward(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Forward:
        """Training forward, same outputs as reference.block_forward. Each conv computes its output's BN
        statistics in its epilogue (per-tile partials merged exactly), and applies the previous unit's BN + ReLU
        while loading its input (r_i is never written); the block output is one BN-apply + shortcut + ReLU
        kernel (dual affine for a projection, in-place read for option A)."""
        conv, bn_act, _, _ = _kernels()
        n_main = spec.n_main
        acts, means, variances, affine, counts = [], [], [], [], []
        for i, unit in enumerate(spec.units):
            chained = 0 < i < n_main  # reads the previous unit's pre-BN output through its BN + ReLU
            inp, in_affine = (acts[i - 1], affine[i - 1]) if chained else (x, None)
            args = (inp, params.weights[i], unit.stride, unit.padding)
            if unit.batch_stats:
                a, mean, var = conv.conv_fprop(*args, in_affine=in_affine, stats=True)
            else:
                a = conv.conv_fprop(*args, in_affine=in_affine)
                mean, var = params.running_means[i].float().clone(), params.running_vars[i].float().clone()
            counts.append(a.numel() // a.shape[1])
            if unit.sync_group:  # the group's statistics (batch statistics only), before anything reads them
                mean, var, counts[i] = distributed.merge_stats(unit.sync_group, mean, var, counts[i], unit.eps)
            s, t, _ = reference.scale_shift(params.gammas[i], params.betas[i], mean, var, unit.eps)
            acts.append(a)
            means.append(mean)
            variances.append(var)
            affine.append((s.contiguous(), t.contiguous()))
        closing: dict = {}  # the closing kernel's shortcut: read in place, through its own BN for a projection
        if spec.shortcut in (Shortcut.IDENTITY, Shortcut.OPTION_A):
            closing["residual"] = x.contiguous(memory_format=_CL)
            if spec.shortcut == Shortcut.OPTION_A:
                closing["option_a_stride"] = spec.option_a_stride
        elif spec.shortcut == Shortcut.PROJECTION:
            closing = {"residual": acts[n_main], "residual_affine": affine[n_main]}
        elif spec.shortcut == Shortcut.TENSOR:
            closing["residual"] = residual.to(x.dtype).contiguous(memory_format=_CL)
        y = bn_act.bn_act(acts[n_main - 1], *affine[n_main - 1], **closing)
        return Forward(y.contiguous(memory_format=memory_format_of(x)), acts, means, variances,
                       distributed.counts_tensor(counts, x) if spec.synced else None)

    @_on_input_device
    def block_backward(self, spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                       need_input_grad: bool) -> Grads:
        """Backward, same results as reference.block_backward. One reduction kernel masks dy with [y > 0] and sums
        Σdz, Σdz·x̂ of the last BN; each dgrad and wgrad applies that BN's backward while loading its gradient
        operand; each dgrad's epilogue applies the previous unit's ReLU mask (recomputed from its pre-BN output),
        sums the previous BN's Σdz, Σdz·x̂ and writes the unit's input relu(a·s + t), which its wgrad then reads
        (dgrad runs first); the block's first dgrad adds the shortcut's gradient in its epilogue."""
        conv, _, drelu_dbn, _ = _kernels()
        units, n_main, n = spec.units, spec.n_main, len(spec.units)
        weights, acts = params.weights, saved.acts
        means = [m.contiguous() for m in saved.means]
        affine = [tuple(v.contiguous() for v in reference.scale_shift(
            params.gammas[i], params.betas[i], saved.means[i], saved.variances[i], units[i].eps)) for i in range(n)]
        dws: List[Optional[Tensor]] = [None] * n
        dgammas: List[Optional[Tensor]] = [None] * n
        dbetas: List[Optional[Tensor]] = [None] * n

        def dbn(i: int, sum_dz: Tensor, sum_dz_xhat: Tensor) -> Tuple[Tensor, ...]:
            """Record unit i's dγ, dβ; return (a_i, mean_i, α, β, γ) of its BN backward
            da = α·dz + β·(a − mean) + γ."""
            dgammas[i] = sum_dz_xhat.to(params.gammas[i].dtype)  # this rank's sums, as torch's SyncBatchNorm
            dbetas[i] = sum_dz.to(params.betas[i].dtype)
            s, _, rstd = affine[i]
            if not units[i].batch_stats:  # fixed (running) statistics: da = s·dz
                zero = torch.zeros_like(s)
                return acts[i], means[i], s, zero, zero
            count = acts[i].numel() // acts[i].shape[1]
            if units[i].sync_group:  # called for the projection first, then the main path from the last unit
                sum_dz, sum_dz_xhat = distributed.reduce_grad_sums(units[i].sync_group, sum_dz, sum_dz_xhat, rstd)
                count = saved.counts[i]
            return (acts[i], means[i], s, (-s * rstd * sum_dz_xhat / count).contiguous(),
                    (-s * sum_dz / count).contiguous())

        def wgrad(i: int, grad: Tensor, coeffs: Tuple[Tensor, ...], inp: Tensor) -> None:
            dw = conv.conv_wgrad(grad, inp, weights[i].shape[2:], units[i].stride, units[i].padding, dbn=coeffs)
            dws[i] = dw.contiguous(memory_format=memory_format_of(weights[i]))

        dz_out, sum_dz, sum_dz_xhat = drelu_dbn.drelu_dbn_reduce(
            dy.contiguous(memory_format=_CL), acts[n_main - 1], means[n_main - 1], affine[n_main - 1][2],
            y=saved.y.contiguous(memory_format=_CL))
        closing: dict = {}  # the block's first dgrad adds the shortcut's gradient in its epilogue
        d_residual = None
        if spec.shortcut == Shortcut.IDENTITY:
            closing = {"residual": dz_out}
        elif spec.shortcut == Shortcut.OPTION_A:
            closing = {"residual": dz_out, "option_a_stride": spec.option_a_stride}
        elif spec.shortcut == Shortcut.TENSOR:
            d_residual = dz_out.to(x.dtype).contiguous(memory_format=memory_format_of(x))
        elif spec.shortcut == Shortcut.PROJECTION:
            _, sc_sum, sc_sum_x = drelu_dbn.drelu_dbn_reduce(dz_out, acts[n_main], means[n_main], affine[n_main][2])
            coeffs = dbn(n_main, sc_sum, sc_sum_x)
            wgrad(n_main, dz_out, coeffs, x)
            if need_input_grad:
                closing = {"residual": conv.conv_dgrad(dz_out, weights[n_main], x.shape[2:], units[n_main].stride,
                                                       units[n_main].padding, dbn=coeffs)}
        dz, dx = dz_out, None
        for i in reversed(range(n_main)):
            coeffs = dbn(i, sum_dz, sum_dz_xhat)
            if i > 0:
                s_prev, t_prev, rstd_prev = affine[i - 1]
                dz_prev, sum_dz, sum_dz_xhat, inp = conv.conv_dgrad(
                    dz, weights[i], acts[i - 1].shape[2:], units[i].stride, units[i].padding, dbn=coeffs,
                    relu_of=(acts[i - 1], s_prev, t_prev, means[i - 1], rstd_prev), relu_out=True)
                wgrad(i, dz, coeffs, inp)
                dz = dz_prev
            else:
                wgrad(0, dz, coeffs, x)
                if need_input_grad:
                    dx = conv.conv_dgrad(dz, weights[0], x.shape[2:], units[0].stride, units[0].padding,
                                         dbn=coeffs, **closing)
                    dx = dx.contiguous(memory_format=memory_format_of(x))
        return Grads(dx, d_residual, dws, dgammas, dbetas)

    @_on_input_device
    def block_inference(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Tensor:
        """One conv kernel per conv, BN folded, bias / shortcut / ReLU in the epilogues."""
        conv_fprop = _kernels()[0].conv_fprop
        units, n_main = spec.units, spec.n_main
        folded = fold_block(params, units)
        closing: dict = {}  # the last conv's epilogue arguments
        if spec.shortcut == Shortcut.IDENTITY:
            closing = {"residual": x}
        elif spec.shortcut == Shortcut.PROJECTION:
            w_sc, b_sc = folded[n_main]
            closing = {"residual": conv_fprop(x, w_sc, units[n_main].stride, units[n_main].padding, bias=b_sc)}
        elif spec.shortcut == Shortcut.OPTION_A:
            closing = {"residual": x, "option_a_stride": spec.option_a_stride}
        elif spec.shortcut == Shortcut.TENSOR:
            closing = {"residual": residual.to(x.dtype)}
        h = x
        for i in range(n_main):
            w_i, b_i = folded[i]
            h = conv_fprop(h, w_i, units[i].stride, units[i].padding, bias=b_i, relu=True,
                           **(closing if i == n_main - 1 else {}))
        return h.contiguous(memory_format=memory_format_of(x))


register(TritonBackend())
