"""Backend "triton": the block ops on the Triton implicit-GEMM conv engine (``fused_resnet.kernels.conv``).

* Eval mode (``block_inference``): every BN is folded into its conv (W' = W·s, bias t = β − mean·s, in
  persistent buffers per parameter set, refolded in place whenever a weight, γ, β or running statistic changes
  and on every call inside a CUDA graph capture: see ``folding``). Each conv is one kernel:
  conv + bias + ReLU, and for the block's last conv conv + bias + shortcut + ReLU, the shortcut being the block
  input (identity), the projection conv's output (computed first, by the same kernel with its BN folded), the
  option-A shortcut read from the block input inside the epilogue, or a residual tensor.
* Training forward (``block_forward``): each conv writes its pre-BN output and per-tile fp32 mean / M2 partials
  of it from its epilogue; one small kernel per BN (kernels/bn_finalize.py) merges them exactly (Chan's
  formula) and writes mean, var, s, t; the next conv applies that BN + ReLU while loading its input, so the
  BN/ReLU output is never written; the block output y = relu(a·s + t + shortcut) is one Triton kernel
  (kernels/bn_act.py) reading the shortcut in place: the block input, the projection's pre-BN output through
  its own BN (dual affine), or the option-A subsample of the block input.
* Training backward (``block_backward``): one reduction kernel (kernels/drelu_dbn.py) masks dy with [y > 0]
  and sums Σdz, Σdz·x̂ per tile (a projection's BN in the same pass); per unit one small kernel turns such sums
  into dγ, dβ and the dBN coefficients (and the previous unit's s, t, rstd, and the previous wgrad's split
  reduction); every dgrad / wgrad applies the BN backward while loading its gradient operand; each dgrad's
  epilogue applies the previous ReLU mask, sums the previous BN's Σdz, Σdz·x̂ and writes the unit's input
  relu(a·s + t) for its wgrad (which then has one transformed operand, not two: see docs/TRITON.md); the block's
  first dgrad adds the shortcut gradient.

The per-channel arithmetic runs in those small kernels, not as torch ops: each torch op on a per-channel vector
was a GPU launch and tens of microseconds of host time, and they added up to more launches than eager
PyTorch's whole step. What torch ops remain are layout copies of tensors not in channels_last and the stem's
channel padding.

Grouped convs (one GEMM per group, a grid axis) and dilated ones (the taps' offsets) run in the same kernels: the
backend declares both in its capabilities. So does a unit that reads the block input average-pooled (timm's "-d"
shortcut, capability ``avg_pool``): its fprop and wgrad pool while loading the input, its dgrad's epilogue
spreads the gradient back over the pool's windows. An open block (``Shortcut.OPEN``: its module closes it in torch) ends
with the last BN-apply without ReLU (eval: the last conv's epilogue without ReLU), and its backward's first
reduction reads dy unmasked. Stochastic depth (capability ``drop_path``) is one more per-sample factor in the
closing kernel, and in the backward's first reduction, which then writes the last unit's scaled gradient beside
the shortcut's.

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
from .folding import fold_block
from ..tensors import Forward, Grads, Params
from .registry import Backend, Capabilities, register

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


def _geometry(unit) -> dict:
    """The conv kernels' keywords for a unit's dilation, groups and input pool (stride and padding go
    positionally)."""
    return {"dilation": unit.dilation, "groups": unit.groups, "avg_pool": unit.avg_pool}


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
    capabilities = Capabilities(groups=True, dilation=True, drop_path=True, avg_pool=True)

    def unavailable_reason(self) -> Optional[str]:
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _interpreting():
            return ("no CUDA device: the Triton kernels run on CUDA tensors (TRITON_INTERPRET=1, set before the "
                    "first import, runs them on CPU tensors for testing)")
        return None

    def device_refusal(self, device_type: str) -> Optional[str]:
        if device_type != "cuda" and not _interpreting():
            return f"input on {device_type}; the Triton kernels need CUDA tensors"
        return None

    def saved_format(self, x: Tensor) -> torch.memory_format:
        return _CL

    def bn_running_update(self, running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        """One launch per BN (kernels/bn_finalize.py; twin: reference.bn_running_update, ~15 torch launches)."""
        with _device_guard(mean.device):
            _kernels()[3].bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count,
                                            momentum)

    @_on_input_device
    def block_forward(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor],
                      sample_scale: Optional[Tensor] = None) -> Forward:
        """Training forward, same outputs as reference.block_forward. Each conv computes its output's BN
        statistics in its epilogue (per-tile partials, merged exactly by one small launch that also forms s and
        t), and applies the previous unit's BN + ReLU while loading its input (r_i is never written); the block
        output is one BN-apply (× stochastic depth's d) + shortcut + ReLU kernel (dual affine for a projection,
        in-place read for option A)."""
        conv, bn_act, _, fin = _kernels()
        n_main = spec.n_main
        acts, means, variances, affine, counts = [], [], [], [], []
        for i, unit in enumerate(spec.units):
            chained = 0 < i < n_main  # reads the previous unit's pre-BN output through its BN + ReLU
            inp, in_affine = (acts[i - 1], affine[i - 1]) if chained else (x, None)
            args = (inp, params.weights[i], unit.stride, unit.padding)
            gamma, beta = params.gammas[i], params.betas[i]
            if not unit.batch_stats:  # fixed statistics: fp32 copies of the running ones, s and t, one launch
                a = conv.conv_fprop(*args, in_affine=in_affine, **_geometry(unit))
                mean, var, s, t = fin.bn_finalize(gamma, beta, unit.eps,
                                                  stats=(params.running_means[i], params.running_vars[i]))
            else:
                a, partials = conv.conv_fprop(*args, in_affine=in_affine, stats=True, **_geometry(unit))
                if unit.sync_group:  # the group's statistics, before anything reads them
                    mean, var, _, _ = fin.bn_finalize(None, None, unit.eps, partials=partials)
                    mean, var, count = distributed.merge_stats(unit.sync_group, mean, var, partials.m, unit.eps)
                    _, _, s, t = fin.bn_finalize(gamma, beta, unit.eps, stats=(mean, var), stats_out=False)
                else:  # the epilogue's partials merged, s and t: one launch
                    mean, var, s, t = fin.bn_finalize(gamma, beta, unit.eps, partials=partials)
            counts.append(count if unit.sync_group and unit.batch_stats else a.numel() // a.shape[1])
            acts.append(a)
            means.append(mean)
            variances.append(var)
            affine.append((s, t))
        closing: dict = {}  # the closing kernel's shortcut: read in place, through its own BN for a projection
        if spec.shortcut in (Shortcut.IDENTITY, Shortcut.OPTION_A):
            closing["residual"] = x.contiguous(memory_format=_CL)
            if spec.shortcut == Shortcut.OPTION_A:
                closing["option_a_stride"] = spec.option_a_stride
        elif spec.shortcut == Shortcut.PROJECTION:
            closing = {"residual": acts[n_main], "residual_affine": affine[n_main]}
        elif spec.shortcut == Shortcut.TENSOR:
            closing["residual"] = residual.to(x.dtype).contiguous(memory_format=_CL)
        if sample_scale is not None:
            closing["sample_scale"] = sample_scale.contiguous()
        y = bn_act.bn_act(acts[n_main - 1], *affine[n_main - 1], relu=spec.final_relu, **closing)
        return Forward(y.contiguous(memory_format=memory_format_of(x)), acts, means, variances,
                       distributed.counts_tensor(counts, x) if spec.synced else None)

    @_on_input_device
    def block_backward(self, spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                       need_input_grad: bool, sample_scale: Optional[Tensor] = None) -> Grads:
        """Backward, same results as reference.block_backward. One reduction kernel masks dy with [y > 0] and sums
        Σdz, Σdz·x̂ of the last BN (and of a projection's); per unit, one small launch turns such sums into dγ, dβ
        and the dBN coefficients; each dgrad and wgrad applies that BN's backward while loading its gradient
        operand; each dgrad's epilogue applies the previous unit's ReLU mask (recomputed from its pre-BN output),
        sums the previous BN's Σdz, Σdz·x̂ and writes the unit's input relu(a·s + t), which its wgrad then reads
        (dgrad runs first); the block's first dgrad adds the shortcut's gradient in its epilogue. With stochastic
        depth the reduction also writes the last unit's d[n]·dz, from which its sums and its convs' BN backward
        are formed (the shortcut's stays dz)."""
        conv, _, drelu_dbn, fin = _kernels()
        units, n_main, n = spec.units, spec.n_main, len(spec.units)
        weights, acts = params.weights, saved.acts
        means = [m.contiguous() for m in saved.means]
        variances = [v.contiguous() for v in saved.variances]
        dws: List[Optional[Tensor]] = [None] * n
        dgammas: List[Optional[Tensor]] = [None] * n
        dbetas: List[Optional[Tensor]] = [None] * n
        unreduced: list = []  # (unit, workspace) of the last wgrad: the next dBN launch reduces it

        def set_dw(i: int, dw: Tensor) -> None:
            dws[i] = dw.contiguous(memory_format=memory_format_of(weights[i]))

        def dbn(i: int, sums, prev: Optional[int] = None) -> Tuple[Tuple[Tensor, ...], Optional[Tuple[Tensor, ...]]]:
            """Unit i's BN backward from its Σdz, Σdz·x̂ (per-tile partials), one launch: records dγ, dβ and returns
            (a_i, mean_i, α, β, γ) of da = α·dz + β·(a − mean) + γ, and unit ``prev``'s (s, t, rstd), which the
            dgrad that runs next needs for its ReLU-mask epilogue; the same launch reduces the previous wgrad's
            workspace into its dW."""
            unit = units[i]
            gamma, beta, var = params.gammas[i], params.betas[i], variances[i]
            before = None if prev is None else (params.gammas[prev], params.betas[prev], means[prev],
                                                variances[prev], units[prev].eps)
            owner, work = unreduced.pop() if unreduced else (None, None)
            if unit.batch_stats and unit.sync_group:
                # dγ, dβ are this rank's sums (as torch's SyncBatchNorm); the coefficients take the group's
                local = fin.dbn_finalize(sums, gamma, beta, var, unit.eps, acts[i].numel() // acts[i].shape[1],
                                         coeffs=False, sums_out=True, reduce=work)
                dgammas[i], dbetas[i], dw = local.dgamma, local.dbeta, local.dw
                sum_dz, sum_dz_xhat, rstd = local.sums
                group_sums = distributed.reduce_grad_sums(unit.sync_group, sum_dz, sum_dz_xhat, rstd)
                out = fin.dbn_finalize(tuple(v.contiguous() for v in group_sums), gamma, beta, var, unit.eps,
                                       saved.counts[i], grads=False, prev=before)
            else:
                out = fin.dbn_finalize(sums, gamma, beta, var, unit.eps, acts[i].numel() // acts[i].shape[1],
                                       batch_stats=unit.batch_stats, prev=before, reduce=work)
                dgammas[i], dbetas[i], dw = out.dgamma, out.dbeta, out.dw
            if work is not None:
                set_dw(owner, dw)
            return (acts[i], means[i], *out.coeffs), out.prev

        def wgrad(i: int, grad: Tensor, coeffs: Tuple[Tensor, ...], inp: Tensor) -> None:
            work = conv.conv_wgrad(grad, inp, weights[i].shape[2:], units[i].stride, units[i].padding, dbn=coeffs,
                                   defer=True, **_geometry(units[i]))
            if work.direct() is not None:
                set_dw(i, work.direct())
            else:
                unreduced.append((i, work))

        last = n_main - 1
        projection = spec.shortcut == Shortcut.PROJECTION  # its BN's sums come from the same pass over dz
        dz_out, *reduced = drelu_dbn.drelu_dbn_reduce(
            dy.contiguous(memory_format=_CL), acts[last], means[last], variances[last], units[last].eps,
            y=saved.y.contiguous(memory_format=_CL) if spec.final_relu else None,  # open: dz = dy, no mask
            second=(acts[n_main], means[n_main], variances[n_main], units[n_main].eps) if projection else None,
            sample_scale=None if sample_scale is None else sample_scale.contiguous())
        dz_branch = dz_out if sample_scale is None else reduced.pop(0)  # the last unit's gradient
        sums, *sc_sums = reduced
        closing: dict = {}  # the block's first dgrad adds the shortcut's gradient in its epilogue
        d_residual = None
        if spec.shortcut == Shortcut.IDENTITY:
            closing = {"residual": dz_out}
        elif spec.shortcut == Shortcut.OPTION_A:
            closing = {"residual": dz_out, "option_a_stride": spec.option_a_stride}
        elif spec.shortcut == Shortcut.TENSOR:
            d_residual = dz_out.to(x.dtype).contiguous(memory_format=memory_format_of(x))
        elif projection:
            coeffs, _ = dbn(n_main, sc_sums[0])
            wgrad(n_main, dz_out, coeffs, x)
            if need_input_grad:
                closing = {"residual": conv.conv_dgrad(dz_out, weights[n_main], x.shape[2:], units[n_main].stride,
                                                       units[n_main].padding, dbn=coeffs,
                                                       **_geometry(units[n_main]))}
        dz, dx = dz_branch, None
        for i in reversed(range(n_main)):
            coeffs, prev_affine = dbn(i, sums, prev=i - 1 if i > 0 else None)
            if i > 0:
                s_prev, t_prev, rstd_prev = prev_affine
                dz_prev, sums, inp = conv.conv_dgrad(
                    dz, weights[i], acts[i - 1].shape[2:], units[i].stride, units[i].padding, dbn=coeffs,
                    relu_of=(acts[i - 1], s_prev, t_prev, means[i - 1], rstd_prev), relu_out=True,
                    **_geometry(units[i]))
                wgrad(i, dz, coeffs, inp)
                dz = dz_prev
            else:
                wgrad(0, dz, coeffs, x)
                if need_input_grad:
                    dx = conv.conv_dgrad(dz, weights[0], x.shape[2:], units[0].stride, units[0].padding,
                                         dbn=coeffs, **closing, **_geometry(units[0]))
                    dx = dx.contiguous(memory_format=memory_format_of(x))
        for i, work in unreduced:  # the block's first unit's: no dBN launch follows in this op
            set_dw(i, conv.wgrad_reduce(work))
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
            closing = {"residual": conv_fprop(x, w_sc, units[n_main].stride, units[n_main].padding, bias=b_sc,
                                              **_geometry(units[n_main]))}
        elif spec.shortcut == Shortcut.OPTION_A:
            closing = {"residual": x, "option_a_stride": spec.option_a_stride}
        elif spec.shortcut == Shortcut.TENSOR:
            closing = {"residual": residual.to(x.dtype)}
        h = x
        for i in range(n_main):
            w_i, b_i = folded[i]
            last = i == n_main - 1
            h = conv_fprop(h, w_i, units[i].stride, units[i].padding, bias=b_i, relu=spec.final_relu or not last,
                           **_geometry(units[i]), **(closing if last else {}))
        return h.contiguous(memory_format=memory_format_of(x))


register(TritonBackend())
