"""Pure-PyTorch reference of every fused op: the ``reference`` backend and the oracle's twin.

It follows the structure of the fused kernels exactly (what is saved for backward, what is recomputed), so that
a fused backend can be checked piece by piece against it, and it runs in any dtype, float64 included.

One residual block is a *chain* of conv→BN units joined by ReLU, closed by a shortcut add and a final ReLU.
For unit i (training mode, per output channel c, M = N·H·W elements per channel)::

    a_i  = conv_i(r_{i-1})              r_{-1} = x;  a_i is SAVED (the pre-BN conv output)
    s_i  = γ_i·rstd_i ; t_i = β_i − mean_i·s_i
    r_i  = relu(a_i·s_i + t_i)          NEVER saved: recomputed from a_i where needed
    y    = relu(a_last·s_last + t_last + sc)        (stochastic depth: relu(d_n·(a_last·s_last + t_last) + sc))

where a unit reading the block input with ``avg_pool`` k reads
avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False) instead of x (timm's "-d" shortcut; its gradient goes
back through the pool), and with the shortcut ``sc`` one of: none (plain network), identity (x), projection
(BN_sc(conv_sc(x)), its unit stored after the main-path units), option A (x subsampled by the stride, channels
zero-padded at the end), or a tensor computed outside (any other downsample module). An open block
(``Shortcut.OPEN``) returns y = a_last·s_last + t_last, no shortcut and no ReLU: its module closes it (backward:
dz = dy, no mask).

Stochastic depth (timm's drop_path) scales the last BN's output of sample n by d_n (0 for a dropped sample, 1/keep
for a kept one), drawn by the block: ``sample_scale`` [N] in x's dtype.

Backward, given dy (mask from the stored y, no mask tensor)::

    dz    = dy·[y > 0]                             (the shortcut's; the last unit's is d_n·dz)
    dβ_i  = Σ dz ;  dγ_i = Σ dz·x̂_i                   x̂_i = (a_i − mean_i)·rstd_i
    da_i  = s_i·(dz − dβ_i/M − x̂_i·dγ_i/M)            (s_i·dz with fixed running statistics)
    dr_{i-1}, dW_i = conv_iᵀ(da_i), Σ r_{i-1} ⊗ da_i   (dgrad, wgrad; r_{i-1} recomputed from a_{i-1})
    dz    = dr_{i-1}·[a_{i-1}·s_{i-1} + t_{i-1} > 0]   (ReLU mask recomputed)
    dx    = dgrad_0 + d_sc

Statistics and every elementwise step are computed in float32 (float64 when the input is float64); convolutions
run in the input dtype, as torch's do.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import distributed
from ..spec import BlockSpec, Shortcut, UnitSpec, acc_dtype, memory_format_of
from ..tensors import Forward, Grads, Params
from .registry import FLOAT_DTYPES, Backend, Capabilities, register


def _channel_view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------- primitives
def conv(x: Tensor, w: Tensor, unit: UnitSpec, fmt: torch.memory_format) -> Tensor:
    """conv fprop (no bias) with the unit's geometry, output in ``fmt``."""
    return F.conv2d(x, w, None, unit.stride, unit.padding, unit.dilation, unit.groups).contiguous(memory_format=fmt)


def conv_backward(dout: Tensor, inp: Tensor, w: Tensor, unit: UnitSpec,
                  need_input_grad: bool) -> Tuple[Optional[Tensor], Tensor]:
    """conv dgrad and wgrad: (d_inp or None, dW)."""
    d_inp, dw, _ = torch.ops.aten.convolution_backward(
        dout, inp, w, None, list(unit.stride), list(unit.padding), list(unit.dilation), False, [0, 0], unit.groups,
        [need_input_grad, True, False],
    )
    return d_inp, dw


def pool(x: Tensor, unit: UnitSpec) -> Tensor:
    """A unit's conv input from the block input: x itself, or average-pooled as timm's "-d" shortcut pools
    (``UnitSpec.avg_pool``), in x's layout."""
    if unit.avg_pool == 1:
        return x
    k = unit.avg_pool
    return F.avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False).contiguous(memory_format=memory_format_of(x))


def pool_backward(d: Optional[Tensor], x: Tensor, unit: UnitSpec) -> Optional[Tensor]:
    """The gradient at the block input from the gradient ``d`` at :func:`pool`'s output."""
    if unit.avg_pool == 1 or d is None:
        return d
    k = unit.avg_pool
    return torch.ops.aten.avg_pool2d_backward(d, x, [k, k], [k, k], [0, 0], True, False, None)


def bn_stats(a: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of a (N, C, H, W), in the accumulator dtype."""
    var, mean = torch.var_mean(a.to(acc_dtype(a.dtype)), dim=(0, 2, 3), correction=0)
    return mean, var


def scale_shift(gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """BN as a per-channel affine map: (s, t, rstd) with bn(a) = a·s + t."""
    rstd = torch.rsqrt(var + eps)
    s = gamma.to(var.dtype) * rstd
    t = beta.to(var.dtype) - mean * s
    return s, t, rstd


def _sample_view(v: Tensor, dtype: torch.dtype) -> Tensor:
    return v.to(dtype).view(-1, 1, 1, 1)


def bn_act(a: Tensor, s: Tensor, t: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
           sample_scale: Optional[Tensor] = None) -> Tensor:
    """scale-shift(-scale per sample)(-add)(-ReLU): relu(d_n·(a·s + t) [+ residual]) computed in s's dtype,
    returned in a's dtype (d: ``sample_scale``, [N]; None: 1)."""
    z = a.to(s.dtype) * _channel_view(s) + _channel_view(t)
    if sample_scale is not None:
        z = z * _sample_view(sample_scale, s.dtype)
    if residual is not None:
        z = z + residual.to(s.dtype)
    if relu:
        z = torch.relu(z)
    return z.to(a.dtype)


def drelu_dbn_reduce(dz: Tensor, a: Tensor, mean: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Σdz and Σdz·x̂ per channel (dz already masked, in the accumulator dtype)."""
    xhat = (a.to(mean.dtype) - _channel_view(mean)) * _channel_view(rstd)
    return dz.sum(dim=(0, 2, 3)), (dz * xhat).sum(dim=(0, 2, 3))


def dbn_apply(
    dz: Tensor, a: Tensor, mean: Tensor, rstd: Tensor, s: Tensor, sum_dz: Tensor, sum_dz_xhat: Tensor,
    batch_stats: bool, count: Union[None, int, Tensor] = None,
) -> Tensor:
    """da = s·(dz − Σdz/M − x̂·Σdz·x̂/M) with batch statistics (M: ``count``, a's elements per channel unless the
    statistics came from a whole process group); s·dz with fixed (running) statistics."""
    if not batch_stats:
        return (dz * _channel_view(s)).to(a.dtype)
    m = a.numel() // a.shape[1] if count is None else count
    xhat = (a.to(mean.dtype) - _channel_view(mean)) * _channel_view(rstd)
    da = _channel_view(s) * (dz - _channel_view(sum_dz / m) - xhat * _channel_view(sum_dz_xhat / m))
    return da.to(a.dtype)


def option_a(x: Tensor, stride: Sequence[int], channels: int, fmt: torch.memory_format) -> Tensor:
    """Option A: x[:, :, ::s, ::s] with channels [C_in, channels) zero-filled."""
    sub = x[:, :, :: stride[0], :: stride[1]]
    return F.pad(sub, (0, 0, 0, 0, 0, channels - x.shape[1])).contiguous(memory_format=fmt)


def option_a_backward(dz: Tensor, x: Tensor, stride: Sequence[int]) -> Tensor:
    """Gradient of option A w.r.t. x: dz's first C_in channels scattered back to the subsampled positions."""
    dx = torch.zeros(x.shape, dtype=dz.dtype, device=dz.device)
    dx[:, :, :: stride[0], :: stride[1]] = dz[:, : x.shape[1]]
    return dx


def bn_running_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
    mean: Tensor, var: Tensor, count: Union[int, Tensor], momentum: Optional[float],
) -> None:
    """torch's BN running-statistics update, in place: num_batches_tracked += 1; momentum=None is the cumulative
    average (factor 1/num_batches_tracked); running_var receives the unbiased variance var·M/(M−1) (M: ``count``,
    a 0-d tensor for a synchronised BN's group count)."""
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:
        factor = 1.0 / num_batches_tracked.to(mean.dtype)
    else:
        factor = momentum
    unbiased = var * (count / (count - 1))
    running_mean.copy_(running_mean.to(mean.dtype) * (1 - factor) + mean * factor)
    running_var.copy_(running_var.to(var.dtype) * (1 - factor) + unbiased * factor)


# --------------------------------------------------------------------------------------------- block ops
def block_forward(spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor],
                  sample_scale: Optional[Tensor] = None) -> Forward:
    """Training-capable block forward: y, the pre-BN conv outputs (saved for backward, in x's layout) and the
    per-channel statistics each BN used (batch statistics — biased variance — where the unit's ``batch_stats``,
    else its running statistics). ``sample_scale``: stochastic depth's d [N] (see the module docstring)."""
    fmt = memory_format_of(x)
    n_main = spec.n_main
    acts, means, variances, affine, counts = [], [], [], [], []
    inp = x
    for i, unit in enumerate(spec.units):
        if spec.reads_input(i):  # the first unit and the projection read the block input (pooled, maybe)
            inp = pool(x, unit)
        a = conv(inp, params.weights[i], unit, fmt)
        counts.append(a.numel() // a.shape[1])
        if unit.batch_stats:
            mean, var = bn_stats(a) if counts[i] else (a.new_zeros(a.shape[1], dtype=acc_dtype(a.dtype)),) * 2
            if unit.sync_group:  # the group's statistics, before anything reads them
                mean, var, counts[i] = distributed.merge_stats(unit.sync_group, mean, var, counts[i], unit.eps)
        else:
            mean = params.running_means[i].to(acc_dtype(a.dtype)).clone()
            var = params.running_vars[i].to(acc_dtype(a.dtype)).clone()
        s, t, _ = scale_shift(params.gammas[i], params.betas[i], mean, var, unit.eps)
        acts.append(a)
        means.append(mean)
        variances.append(var)
        affine.append((s, t))
        if i < n_main - 1:
            inp = bn_act(a, s, t)
    s_last, t_last = affine[n_main - 1]
    sc = _shortcut_value(spec, x, acts, affine, residual, fmt, s_last.dtype)
    return Forward(bn_act(acts[n_main - 1], s_last, t_last, sc, relu=spec.final_relu, sample_scale=sample_scale),
                   acts, means, variances, distributed.counts_tensor(counts, x) if spec.synced else None)


def _shortcut_value(spec: BlockSpec, x, acts, affine, residual, fmt, dtype) -> Optional[Tensor]:
    kind, n_main = spec.shortcut, spec.n_main
    if kind in (Shortcut.NONE, Shortcut.OPEN):
        return None
    if kind == Shortcut.IDENTITY:
        return x
    if kind == Shortcut.PROJECTION:
        s_sc, t_sc = affine[n_main]
        return acts[n_main].to(dtype) * _channel_view(s_sc) + _channel_view(t_sc)
    if kind == Shortcut.OPTION_A:
        return option_a(x, spec.option_a_stride, acts[n_main - 1].shape[1], fmt)
    return residual


def block_inference(spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Tensor:
    """Eval-mode block forward with running statistics and nothing saved: returns y only."""
    if any(u.batch_stats for u in spec.units):
        spec = spec.with_batch_stats([False] * len(spec.units))
    return block_forward(spec, x, params, residual).y


def block_backward(spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                   need_input_grad: bool, sample_scale: Optional[Tensor] = None) -> Grads:
    """Hand-derived block backward; d_residual (shortcut given as a tensor) is in x's dtype; ``sample_scale``: the
    forward's stochastic-depth d."""
    n, n_main = len(spec.units), spec.n_main
    acc = acc_dtype(x.dtype)
    weights, gammas, acts, means = params.weights, params.gammas, saved.acts, saved.means
    affine = [scale_shift(gammas[i], params.betas[i], means[i], saved.variances[i], spec.units[i].eps)
              for i in range(n)]
    dws: List[Optional[Tensor]] = [None] * n
    dgammas: List[Optional[Tensor]] = [None] * n
    dbetas: List[Optional[Tensor]] = [None] * n

    # dz of the block output, shared by the last main unit and the shortcut (an open block has no final ReLU)
    dz_out = dy.to(acc) * (saved.y > 0) if spec.final_relu else dy.to(acc)

    def unit_backward(i: int, dz: Tensor, inp: Tensor, need_inp_grad: bool) -> Optional[Tensor]:
        """Unit i's BN and conv backward: the gradient at its input ``inp`` (the block input's, through the
        unit's pool, where it reads the block input)."""
        s, _, rstd = affine[i]
        unit = spec.units[i]
        sum_dz, sum_dz_xhat = drelu_dbn_reduce(dz, acts[i], means[i], rstd)
        dgammas[i] = sum_dz_xhat.to(gammas[i].dtype)  # this rank's sums, as torch's SyncBatchNorm gives
        dbetas[i] = sum_dz.to(params.betas[i].dtype)
        count = None
        if unit.sync_group and unit.batch_stats:
            sum_dz, sum_dz_xhat = distributed.reduce_grad_sums(unit.sync_group, sum_dz, sum_dz_xhat, rstd)
            count = saved.counts[i]
        da = dbn_apply(dz, acts[i], means[i], rstd, s, sum_dz, sum_dz_xhat, unit.batch_stats, count)
        if not spec.reads_input(i):
            d_inp, dws[i] = conv_backward(da, inp, weights[i], unit, need_inp_grad)
            return d_inp
        d_inp, dws[i] = conv_backward(da, pool(inp, unit), weights[i], unit, need_inp_grad)
        return pool_backward(d_inp, inp, unit)

    # The projection's unit goes first, then the main path's from the last: every backend reduces synchronised
    # statistics in this order (and torch's autograd runs eager SyncBatchNorms in it: the later-created first).
    d_sc = None
    if spec.shortcut == Shortcut.PROJECTION:
        d_sc = unit_backward(n_main, dz_out, x, need_input_grad)
    dz = dz_out if sample_scale is None else dz_out * _sample_view(sample_scale, acc)
    dx = None
    for i in reversed(range(n_main)):
        if i > 0:
            s_prev, t_prev, _ = affine[i - 1]
            pre = acts[i - 1].to(acc) * _channel_view(s_prev) + _channel_view(t_prev)  # recomputed, never saved
            d_inp = unit_backward(i, dz, torch.relu(pre).to(x.dtype), True)
            dz = d_inp.to(acc) * (pre > 0)
        else:
            dx = unit_backward(0, dz, x, need_input_grad)

    d_residual = None
    if spec.shortcut == Shortcut.IDENTITY:
        d_sc = dz_out
    elif spec.shortcut == Shortcut.OPTION_A and need_input_grad:
        d_sc = option_a_backward(dz_out, x, spec.option_a_stride)
    elif spec.shortcut == Shortcut.TENSOR:
        d_residual = dz_out.to(x.dtype).contiguous(memory_format=memory_format_of(x))
    if need_input_grad and d_sc is not None:
        dx = (dx.to(acc) + d_sc.to(acc)).to(x.dtype)
    if dx is not None:
        dx = dx.contiguous(memory_format=memory_format_of(x))
    return Grads(dx, d_residual, dws, dgammas, dbetas)


class ReferenceBackend(Backend):
    """Pure PyTorch, any device and dtype: the semantics every backend matches, and the oracle's twin."""

    name = "reference"
    capabilities = Capabilities(dtypes=FLOAT_DTYPES, groups=True, dilation=True, drop_path=True, avg_pool=True,
                                running_update_dtypes=FLOAT_DTYPES)

    def saved_format(self, x: Tensor) -> torch.memory_format:
        return memory_format_of(x)

    def block_forward(self, spec, x, params, residual, sample_scale=None):
        return block_forward(spec, x, params, residual, sample_scale)

    def block_inference(self, spec, x, params, residual):
        return block_inference(spec, x, params, residual)

    def block_backward(self, spec, dy, x, params, saved, need_input_grad, sample_scale=None):
        return block_backward(spec, dy, x, params, saved, need_input_grad, sample_scale)

    def bn_running_update(self, running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


register(ReferenceBackend())
