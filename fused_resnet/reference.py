"""Pure-PyTorch reference of every fused op: the ``reference`` backend and the oracle's twin.

It follows the structure of the fused kernels exactly (what is saved for backward, what is recomputed), so that
a fused backend can be checked piece by piece against it, and it runs in any dtype, float64 included.

One residual block is a *chain* of conv→BN units joined by ReLU, closed by a shortcut add and a final ReLU.
For unit i (training mode, per output channel c, M = N·H·W elements per channel)::

    a_i  = conv_i(r_{i-1})              r_{-1} = x;  a_i is SAVED (the pre-BN conv output)
    s_i  = γ_i·rstd_i ; t_i = β_i − mean_i·s_i
    r_i  = relu(a_i·s_i + t_i)          NEVER saved: recomputed from a_i where needed
    y    = relu(a_last·s_last + t_last + sc)

with the shortcut ``sc`` one of: none (plain network), identity (x), projection (BN_sc(conv_sc(x)), its unit
stored after the main-path units), option A (x subsampled by the stride, channels zero-padded at the end),
or a tensor computed outside (any other downsample module).

Backward, given dy (mask from the stored y, no mask tensor)::

    dz    = dy·[y > 0]
    dβ_i  = Σ dz ;  dγ_i = Σ dz·x̂_i                   x̂_i = (a_i − mean_i)·rstd_i
    da_i  = s_i·(dz − dβ_i/M − x̂_i·dγ_i/M)            (s_i·dz with fixed running statistics)
    dr_{i-1}, dW_i = conv_iᵀ(da_i), Σ r_{i-1} ⊗ da_i   (dgrad, wgrad; r_{i-1} recomputed from a_{i-1})
    dz    = dr_{i-1}·[a_{i-1}·s_{i-1} + t_{i-1} > 0]   (ReLU mask recomputed)
    dx    = dgrad_0 + d_sc

Statistics and every elementwise step are computed in float32 (float64 when the input is float64); convolutions
run in the input dtype, as torch's do.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Shortcut kinds (the ``shortcut`` argument of the block ops).
SHORTCUT_NONE = 0  # plain network: y = relu(bn(a_last))
SHORTCUT_IDENTITY = 1  # y = relu(bn(a_last) + x)
SHORTCUT_PROJECTION = 2  # y = relu(bn(a_last) + bn_sc(conv_sc(x))); the projection is the last conv in the lists
SHORTCUT_PAD = 3  # option A: y = relu(bn(a_last) + pad_channels(x[:, :, ::s, ::s]))
SHORTCUT_TENSOR = 4  # y = relu(bn(a_last) + residual), residual computed by any module outside the op


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / statistics dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The layout every output of a block op follows: channels_last when x is, else contiguous (NCHW)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _channel_view(v: Tensor) -> Tensor:
    return v.view(1, -1, 1, 1)


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


# --------------------------------------------------------------------------------------------- primitives
def conv(x: Tensor, w: Tensor, stride, padding, dilation, groups: int, fmt: torch.memory_format) -> Tensor:
    """conv fprop (no bias), output in the block's memory format."""
    return F.conv2d(x, w, None, stride, padding, dilation, groups).contiguous(memory_format=fmt)


def conv_backward(
    dout: Tensor, inp: Tensor, w: Tensor, stride, padding, dilation, groups: int, need_input_grad: bool
) -> Tuple[Optional[Tensor], Tensor]:
    """conv dgrad and wgrad: (d_inp or None, dW)."""
    d_inp, dw, _ = torch.ops.aten.convolution_backward(
        dout, inp, w, None, list(stride), list(padding), list(dilation), False, [0, 0], groups,
        [need_input_grad, True, False],
    )
    return d_inp, dw


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


def bn_act(a: Tensor, s: Tensor, t: Tensor, residual: Optional[Tensor] = None, relu: bool = True) -> Tensor:
    """scale-shift(-add)(-ReLU): relu(a·s + t [+ residual]) computed in s's dtype, returned in a's dtype."""
    z = a.to(s.dtype) * _channel_view(s) + _channel_view(t)
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
    batch_stats: bool,
) -> Tensor:
    """da = s·(dz − Σdz/M − x̂·Σdz·x̂/M) with batch statistics; s·dz with fixed (running) statistics."""
    if not batch_stats:
        return (dz * _channel_view(s)).to(a.dtype)
    m = a.numel() // a.shape[1]
    xhat = (a.to(mean.dtype) - _channel_view(mean)) * _channel_view(rstd)
    da = _channel_view(s) * (dz - _channel_view(sum_dz / m) - xhat * _channel_view(sum_dz_xhat / m))
    return da.to(a.dtype)


def shortcut_pad(x: Tensor, stride: Sequence[int], channels: int, fmt: torch.memory_format) -> Tensor:
    """Option A: x[:, :, ::s, ::s] with channels [C_in, channels) zero-filled."""
    sub = x[:, :, :: stride[0], :: stride[1]]
    return F.pad(sub, (0, 0, 0, 0, 0, channels - x.shape[1])).contiguous(memory_format=fmt)


def shortcut_pad_backward(dz: Tensor, x: Tensor, stride: Sequence[int]) -> Tensor:
    """Gradient of option A w.r.t. x: dz's first C_in channels scattered back to the subsampled positions."""
    dx = torch.zeros(x.shape, dtype=dz.dtype, device=dz.device)
    dx[:, :, :: stride[0], :: stride[1]] = dz[:, : x.shape[1]]
    return dx


def bn_running_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
    mean: Tensor, var: Tensor, count: int, momentum: Optional[float],
) -> None:
    """torch's BN running-statistics update, in place: num_batches_tracked += 1; momentum=None is the cumulative
    average (factor 1/num_batches_tracked); running_var receives the unbiased variance var·M/(M−1)."""
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
def _pairs(values: Sequence[int], i: int) -> Tuple[int, int]:
    return values[2 * i], values[2 * i + 1]


def num_main_units(weights: Sequence, shortcut: int) -> int:
    """Units on the main path: every conv but the projection shortcut's, which the lists hold last."""
    return len(weights) - (1 if shortcut == SHORTCUT_PROJECTION else 0)


def block_forward(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    running_means: List[Optional[Tensor]], running_vars: List[Optional[Tensor]], residual: Optional[Tensor],
    strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
    batch_stats: List[bool], shortcut: int, shortcut_stride: List[int],
) -> List[Tensor]:
    """Training-capable block forward. Returns [y, a_0 .. a_{n-1}, mean_0 .. mean_{n-1}, var_0 .. var_{n-1}]:
    y, the pre-BN conv outputs (saved for backward) and the per-channel statistics each BN used (batch
    statistics — biased variance — where ``batch_stats[i]``, else the running statistics)."""
    fmt = memory_format_of(x)
    n_main = num_main_units(weights, shortcut)
    acts, means, variances, affine = [], [], [], []
    inp = x
    for i in range(len(weights)):
        if i == n_main:  # the projection shortcut reads the block input
            inp = x
        a = conv(inp, weights[i], _pairs(strides, i), _pairs(paddings, i), _pairs(dilations, i), groups[i], fmt)
        if batch_stats[i]:
            mean, var = bn_stats(a)
        else:
            mean = running_means[i].to(acc_dtype(a.dtype)).clone()
            var = running_vars[i].to(acc_dtype(a.dtype)).clone()
        s, t, _ = scale_shift(gammas[i], betas[i], mean, var, eps[i])
        acts.append(a)
        means.append(mean)
        variances.append(var)
        affine.append((s, t))
        if i < n_main - 1:
            inp = bn_act(a, s, t)
    s_last, t_last = affine[n_main - 1]
    sc = _shortcut_value(x, acts, affine, residual, shortcut, shortcut_stride, n_main, fmt, s_last.dtype)
    y = bn_act(acts[n_main - 1], s_last, t_last, sc)
    return [y] + acts + means + variances


def _shortcut_value(x, acts, affine, residual, shortcut, shortcut_stride, n_main, fmt, dtype) -> Optional[Tensor]:
    if shortcut == SHORTCUT_NONE:
        return None
    if shortcut == SHORTCUT_IDENTITY:
        return x
    if shortcut == SHORTCUT_PROJECTION:
        s_sc, t_sc = affine[n_main]
        return acts[n_main].to(dtype) * _channel_view(s_sc) + _channel_view(t_sc)
    if shortcut == SHORTCUT_PAD:
        return shortcut_pad(x, shortcut_stride, acts[n_main - 1].shape[1], fmt)
    if shortcut == SHORTCUT_TENSOR:
        return residual
    raise ValueError(f"unknown shortcut kind {shortcut}")


def block_inference(
    x: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    running_means: List[Tensor], running_vars: List[Tensor], residual: Optional[Tensor],
    strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
    shortcut: int, shortcut_stride: List[int],
) -> Tensor:
    """Eval-mode block forward with running statistics and nothing saved: returns y only."""
    n = len(weights)
    return block_forward(
        x, weights, gammas, betas, list(running_means), list(running_vars), residual, strides, paddings,
        dilations, groups, eps, [False] * n, shortcut, shortcut_stride,
    )[0]


def block_backward(
    dy: Tensor, x: Tensor, y: Tensor, weights: List[Tensor], gammas: List[Tensor], betas: List[Tensor],
    acts: List[Tensor], means: List[Tensor], variances: List[Tensor],
    strides: List[int], paddings: List[int], dilations: List[int], groups: List[int], eps: List[float],
    batch_stats: List[bool], shortcut: int, shortcut_stride: List[int], need_input_grad: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
    """Hand-derived block backward. Returns (dx or None, d_residual or None, dW list, dγ list, dβ list);
    d_residual (shortcut given as a tensor) is in x's dtype."""
    n = len(weights)
    n_main = num_main_units(weights, shortcut)
    acc = acc_dtype(x.dtype)
    affine = [scale_shift(gammas[i], betas[i], means[i], variances[i], eps[i]) for i in range(n)]
    dws: List[Optional[Tensor]] = [None] * n
    dgammas: List[Optional[Tensor]] = [None] * n
    dbetas: List[Optional[Tensor]] = [None] * n

    dz_out = dy.to(acc) * (y > 0)  # dz of the block output, shared by the last main unit and the shortcut

    def unit_backward(i: int, dz: Tensor, inp: Tensor, need_inp_grad: bool) -> Optional[Tensor]:
        s, _, rstd = affine[i]
        sum_dz, sum_dz_xhat = drelu_dbn_reduce(dz, acts[i], means[i], rstd)
        dgammas[i] = sum_dz_xhat.to(gammas[i].dtype)
        dbetas[i] = sum_dz.to(betas[i].dtype)
        da = dbn_apply(dz, acts[i], means[i], rstd, s, sum_dz, sum_dz_xhat, batch_stats[i])
        d_inp, dws[i] = conv_backward(
            da, inp, weights[i], _pairs(strides, i), _pairs(paddings, i), _pairs(dilations, i), groups[i],
            need_inp_grad,
        )
        return d_inp

    dz = dz_out
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
    d_sc = None
    if shortcut == SHORTCUT_IDENTITY:
        d_sc = dz_out
    elif shortcut == SHORTCUT_PROJECTION:
        d_sc = unit_backward(n_main, dz_out, x, need_input_grad)
    elif shortcut == SHORTCUT_PAD and need_input_grad:
        d_sc = shortcut_pad_backward(dz_out, x, shortcut_stride)
    elif shortcut == SHORTCUT_TENSOR:
        d_residual = dz_out.to(x.dtype).contiguous(memory_format=memory_format_of(x))
    if need_input_grad and d_sc is not None:
        dx = (dx.to(acc) + d_sc.to(acc)).to(x.dtype)
    if dx is not None:
        dx = dx.contiguous(memory_format=memory_format_of(x))
    return dx, d_residual, dws, dgammas, dbetas
