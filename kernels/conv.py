"""conv: implicit-GEMM convolution on NHWC activations and KRSC weights — fprop, dgrad and wgrad.

Layouts (all contiguous): input x [N, H, W, C], weight w [K, R, S, C] (a channels_last conv weight is already
this), output y [N, P, Q, K]. A Conv1d is the H = 1 case (R = 1). fp32 accumulation for every dtype.

* fprop: GEMM with M = N·P·Q (output pixels), N = K, reduction over (r, s, c): one pipelined loop over the R·S
  filter taps × C in BLOCK_K chunks (16-byte loads along C); for small C (the stem's 3 input channels) x and w
  get their channels zero-padded to 16 bytes and the loop runs over filter rows × chunks of the row's contiguous
  (s, c) window (``ROW``), so loads stay 16-byte and a tile is not mostly padding. Epilogue as constexpr:
  + bias (per K, fp32), + residual (``RES_MODE``, fused_resnet.spec.Residual: TENSOR an [N, P, Q, K] tensor;
  OPTION_A the option-A shortcut read from the
  block input x[n, p·s, q·s, k] for k < C_in and 0 above, never materialised), ReLU.
* dgrad: dx[n, h, w, c] = Σ_{r, s, k} dy[n, p, q, k]·w[k, r, s, c] with p = (h + pad − r)/stride where that is an
  integer in range (gather form), computed per stride phase (h mod stride, w mod stride): a phase loops only over
  the taps that land on an output pixel, so a stride-2 layer issues no MMA for a tap that would be masked off.
* wgrad: dw[k, r, s, c] = Σ_{n, p, q} dy[n, p, q, k]·x[n, p·stride − pad + r, q·stride − pad + s, c]; the
  N·P·Q reduction is split into chunks whose programs write fp32 partials, summed in a second stage
  (deterministic, no atomics). In training its input is the one dgrad's epilogue wrote (``relu_out``): one
  operand transformed on load, not two, keeps a wgmma in flight on sm_90.

An input pool (``POOL`` = k, timm's "-d" shortcut: AvgPool2d(k, k, ceil_mode=True, count_include_pad=False)
before a conv): fprop and wgrad read each pooled pixel as the mean of its window while loading the input operand;
dgrad's epilogue stores each pooled pixel's gradient divided by the window's count over that window. The pooled
tensor and its gradient are never written.

Shapes are runtime arguments (batch and spatial sizes are not specialised on), only the kernel size, features and
tiles are constexpr; autotuning is keyed on channel counts, stride, padding, kernel size and every constexpr
feature (``tuning_key_args``), so a new batch size reuses the tuned configuration and the compiled kernel, and no
variant inherits another's. A configuration whose compiled kernel spills registers is dropped before autotuning
benchmarks it (``selectable_tiles``). Tuned choices persist in Triton's on-disk cache across processes.

Reference twins: ``fused_resnet.backends.reference.conv`` (fprop) and ``...reference.conv_backward``.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import launches
from ..spec import Residual, pooled_size
from . import autotune_mode

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETED = tl.constexpr(INTERPRET)  # kernel code for the interpreter only, in branches a compile drops
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLAT_BELOW = 16  # input channels below this: fprop's row layout, wgrad's flattened (r, s, c) columns
_SIZE_ARGS = ["N", "H", "W", "P", "Q"]  # not specialised on: a new batch size must not recompile
_FPROP_SIZES = _SIZE_ARGS + ["RES_H", "RES_W", "XH", "XW"]
_DGRAD_SIZES = _SIZE_ARGS + ["RP", "RQ", "partial_rows", "XH", "XW"]
_WGRAD_SIZES = _SIZE_ARGS + ["chunk", "XH", "XW"]


def _configs(tiles: Sequence[Tuple[int, int, int, int, int]]):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tuples as autotune configs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in tiles]


# Hopper (sm_90) candidates: 128-row tiles feed wgmma; 3–4 stages keep loads in flight (device HOPPER.md). Few on
# purpose: every configuration is compiled for each specialisation (kernel size, dtype, stride, ...) it meets.
# 128x64 runs 8 warps: with 4, the DBN-on-load dgrad and the prologue wgrad reached 255 registers and spilled
# (bench/aot_check.py, sm_90, Triton 3.8); with 8 none of them does. A configuration whose compiled kernel spills
# is never benchmarked nor chosen, whatever the GPU and Triton version (``selectable_tiles``).
_GEMM_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3)]
_WGRAD_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4), (64, 64, 128, 4, 3)]
# What an epilogue adds (RES_MODE): the shared table of fused_resnet.spec.Residual.
RES_NONE = tl.constexpr(int(Residual.NONE))
RES_TENSOR = tl.constexpr(int(Residual.TENSOR))
RES_OPTION_A = tl.constexpr(int(Residual.OPTION_A))


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles: GROUP_M row tiles share each column tile while it is in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _output_tile(rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of a rows x cols GEMM: (row-tile index, row offsets, column offsets, row mask,
    column mask)."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), tl.cdiv(rows, BLOCK_M), tl.cdiv(cols, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_m, offs_m, offs_n, offs_m < rows, offs_n < cols


@triton.jit
def _split_pixels(offs, H, W):
    """Flat NHW pixel indices → (image, row, column)."""
    return offs // (H * W), (offs // W) % H, offs % W


@triton.jit
def _bn_relu_on_load(a, a_ok, scale_ptr, shift_ptr, c, c_ok):
    """relu(a·s[c] + t[c]) of a loaded input tile, in fp32, back in a's dtype; masked (padding) elements stay 0:
    the previous unit's BN-apply + ReLU, never materialised."""
    sc = tl.load(scale_ptr + c, mask=c_ok, other=0.0)
    sh = tl.load(shift_ptr + c, mask=c_ok, other=0.0)
    z = tl.maximum(a.to(tl.float32) * sc[None, :] + sh[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(a_ok, z, 0.0).to(a.dtype)


@triton.jit
def _pooled_on_load(x_ptr, img, h, w, chan, ok, XH, XW, XC, POOL: tl.constexpr):
    """The conv operand at pooled pixels (h, w) of an [N, XH, XW, XC] input x: the mean of its POOL x POOL window
    (AvgPool2d(POOL, POOL, ceil_mode=True, count_include_pad=False): a window cut by the edge divides by what it
    holds), summed in fp32 in torch's order, back in x's dtype, as torch's pool writes it; masked elements are 0.
    img, h, w broadcast to the tile (pixel per row or per element), ``chan`` to its channel offsets."""
    h0 = h * POOL
    w0 = w * POOL
    total = tl.zeros(ok.shape, dtype=tl.float32)
    for i in tl.static_range(POOL):
        for j in tl.static_range(POOL):
            m = ok & (h0 + i < XH) & (w0 + j < XW)
            total += tl.load(x_ptr + ((img.to(tl.int64) * XH + h0 + i) * XW + w0 + j) * XC + chan, mask=m,
                             other=0.0).to(tl.float32)
    return tl.where(ok, total / _window_count(h0, w0, XH, XW, POOL), 0.0).to(x_ptr.dtype.element_ty)


@triton.jit
def _window_count(h0, w0, XH, XW, POOL: tl.constexpr):
    """The divisor of the pool windows starting at (h0, w0) of an XH x XW input: what each holds inside it
    (count_include_pad=False); at least 1, so a masked lane divides by something."""
    return tl.maximum((tl.minimum(h0 + POOL, XH) - h0) * (tl.minimum(w0 + POOL, XW) - w0), 1).to(tl.float32)


@triton.jit
def _bound(n):
    """A loop bound: compiled, n itself (the branch is on a constexpr, so a compile contains nothing of it). Under
    the interpreter, n as a Python int: Triton 3.6's interpreter holds scalars as 1-element arrays and turns a
    loop bound into an index with int(), which NumPy 2.4 refuses for an array with a dimension. Returned, not
    assigned: the interpreter turns every assigned value back into a tensor."""
    if INTERPRETED:
        return int(n.handle.data.reshape(-1)[0])
    return n


@triton.jit
def _sum_rows(x, ROWS: tl.constexpr):
    """Column sums of a [ROWS, N] fp32 tile. The interpreter reduces over rows one row after another (error
    growing like ROWS·eps: 10x torch's own on the CPU tests); there the rows are summed in three levels, groups
    of 8, then 8, then the rest (error like (16 + ROWS/64)·eps). Compiled, tl.sum is a tree reduction already."""
    if INTERPRETED and ROWS >= 128:
        x4 = tl.reshape(x, (ROWS // 64, 8, 8, x.shape[1]))
        return tl.sum(tl.sum(tl.sum(x4, axis=2), axis=1), axis=0)
    return tl.sum(x, axis=0)


@triton.jit
def _dbn_on_load(g, a_ptrs, ok, mean_ptr, alpha_ptr, beta_ptr, gamma_ptr, ch, ch_ok, AXIS: tl.constexpr):
    """The BN backward applied to a loaded gradient tile: da = α·dz + β·(a − mean) + γ per channel (α = s, and
    with batch statistics β = −s·rstd·Σdz·x̂/M, γ = −s·Σdz/M), in fp32, back in dz's dtype; masked elements stay
    0. a − mean is formed first: folding the mean into γ would cancel catastrophically when |mean| ≫ std.
    Channels run along axis 1 of the tile (AXIS = 1) or axis 0."""
    a = tl.load(a_ptrs, mask=ok, other=0.0).to(tl.float32)
    mu = tl.load(mean_ptr + ch, mask=ch_ok, other=0.0)
    al = tl.load(alpha_ptr + ch, mask=ch_ok, other=0.0)
    be = tl.load(beta_ptr + ch, mask=ch_ok, other=0.0)
    ga = tl.load(gamma_ptr + ch, mask=ch_ok, other=0.0)
    if AXIS == 1:
        da = g.to(tl.float32) * al[None, :] + (a - mu[None, :]) * be[None, :] + ga[None, :]
    else:
        da = g.to(tl.float32) * al[:, None] + (a - mu[:, None]) * be[:, None] + ga[:, None]
    return tl.where(ok, da, 0.0).to(g.dtype)


@triton.jit
def _group_bases(group, C, K, GROUPED: tl.constexpr):
    """The first input and output channel of a group's GEMM: each group reads its own channels of x / dx, w and
    y / dy (row strides stay the whole tensors'). Ungrouped, constant zeros: the compiler then keeps what it
    proves of the channel offsets (contiguity, 16-byte alignment), which a program id times C would hide."""
    if GROUPED:
        return group * C, group * K
    return 0, 0


@triton.jit
def _mma(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # the interpreter's bf16 dot is wrong: multiply in fp32 there
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit(do_not_specialize=_FPROP_SIZES)
def conv_fprop_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, y_ptr,
    in_scale_ptr, in_shift_ptr,  # PROLOGUE: per input channel fp32 scale / shift applied on load, then ReLU
    mean_ptr, m2_ptr, tile_ptr,  # STATS: per (row tile, channel) fp32 mean and M2 of the stored output; BLOCK_M
    N, H, W, C, K, P, Q,  # C, K: one group's input and output channels
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, G,
    RES_H, RES_W, RES_C, res_stride_h, res_stride_w,  # option-A residual: block input [N, RES_H, RES_W, RES_C]
    XH, XW,  # POOL: x is [N, XH, XW, C·G], read average-pooled to H x W
    R: tl.constexpr, S: tl.constexpr, ROW: tl.constexpr, CP: tl.constexpr, GROUPED: tl.constexpr,
    PROLOGUE: tl.constexpr, POOL: tl.constexpr,
    STATS: tl.constexpr, HAS_BIAS: tl.constexpr, RES_MODE: tl.constexpr, RELU: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    pid_m, offs_m, offs_n, m_ok, n_ok = _output_tile(N * P * Q, K, BLOCK_M, BLOCK_N, GROUP_M)
    c_base, k_base = _group_bases(tl.program_id(1), C, K, GROUPED)
    CX = C * G
    KY = K * G
    img, p, q = _split_pixels(offs_m, P, Q)
    h0 = p * stride_h - pad_h
    w0 = q * stride_w - pad_w
    RSC = R * S * C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ROW:
        # Small C (the stem's 3): x and w come with their channels zero-padded to CP (16 bytes), so one filter
        # row's (s, c) window of an output pixel is S·CP contiguous elements starting on a 16-byte boundary. One
        # pipelined loop over (filter row, chunk of that window) loads it with 16-byte asynchronous copies (a
        # run of CP elements shares one mask), instead of gathering element by element.
        row_len = S * CP
        chunks = tl.cdiv(row_len, BLOCK_K)
        for t in range(0, _bound(R * chunks)):
            r = t // chunks
            kk = (t - r * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < row_len
            h = h0 + r * dil_h
            w = w0[:, None] + (kk // CP)[None, :] * dil_w
            a_ok = (m_ok & (h >= 0) & (h < H))[:, None] & k_ok[None, :] & (w >= 0) & (w < W)
            # dilated: the window's taps are dil_w pixels apart (a dil_w of 1, a constant, folds the term away)
            a_off = ((((img.to(tl.int64) * H + h) * W + w0) * CP)[:, None]
                     + (kk + (kk // CP) * ((dil_w - 1) * CP))[None, :])
            a = tl.load(x_ptr + a_off, mask=a_ok, other=0.0)
            if PROLOGUE:
                c = kk % CP
                a = _bn_relu_on_load(a, a_ok, in_scale_ptr, in_shift_ptr, c, k_ok & (c < C))
            b = tl.load(w_ptr + offs_n[None, :] * (R * row_len) + (r * row_len + kk)[:, None],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(acc, a, b, UPCAST, PRECISION)
    else:
        # One loop over (filter tap, channel chunk), so the software pipeline runs through the taps instead of
        # draining and refilling at each one (at C = 64 a tap is a single chunk).
        chunks = tl.cdiv(C, BLOCK_K)
        for t in range(0, _bound(R * S * chunks)):
            tap = t // chunks
            c = (t - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
            r = tap // S
            h = h0 + r * dil_h
            w = w0 + (tap - r * S) * dil_w
            c_ok = c < C
            a_ok = (m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W))[:, None] & c_ok[None, :]
            if POOL > 1:  # timm's "-d" shortcut: the avg-pool in the operand load, its output never written
                a = _pooled_on_load(x_ptr, img[:, None], h[:, None], w[:, None], c_base + c[None, :], a_ok, XH, XW,
                                    CX, POOL)
            else:
                a = tl.load(x_ptr + (((img.to(tl.int64) * H + h) * W + w) * CX + c_base)[:, None] + c[None, :],
                            mask=a_ok, other=0.0)
            if PROLOGUE:
                a = _bn_relu_on_load(a, a_ok, in_scale_ptr + c_base, in_shift_ptr + c_base, c, c_ok)
            b = tl.load(w_ptr + (k_base + offs_n)[None, :] * RSC + (tap * C + c)[:, None],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mma(acc, a, b, UPCAST, PRECISION)

    # epilogue: (+ bias) (+ residual) (ReLU), in fp32, one store
    out_ok = m_ok[:, None] & n_ok[None, :]
    k_out = k_base + offs_n
    out_off = offs_m[:, None].to(tl.int64) * KY + k_out[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k_out, mask=n_ok, other=0.0)[None, :]
    if RES_MODE == RES_TENSOR:
        acc += tl.load(res_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
    if RES_MODE == RES_OPTION_A:
        pix = (img.to(tl.int64) * RES_H + p * res_stride_h) * RES_W + q * res_stride_w
        r_ok = m_ok[:, None] & (k_out < RES_C)[None, :]
        acc += tl.load(res_ptr + pix[:, None] * RES_C + k_out[None, :], mask=r_ok, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + out_off, out, mask=out_ok)
    if STATS:  # this tile's per-channel mean and M2 of the stored (rounded) values, merged later (Chan)
        v = tl.where(out_ok, out.to(tl.float32), 0.0)
        count = tl.sum(m_ok.to(tl.float32), axis=0)
        mean = _sum_rows(v, BLOCK_M) / count
        d = tl.where(out_ok, v - mean[None, :], 0.0)
        part = pid_m.to(tl.int64) * KY + k_out
        tl.store(mean_ptr + part, mean, mask=n_ok)
        tl.store(m2_ptr + part, _sum_rows(d * d, BLOCK_M), mask=n_ok)
        tl.store(tile_ptr, BLOCK_M)


@triton.jit(do_not_specialize=_DGRAD_SIZES)
def conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    a_ptr, amean_ptr, alpha_ptr, beta_ptr, gamma_ptr,  # DBN: operand α·dy + β·(a − mean) + γ per channel
    prev_ptr, prev_s_ptr, prev_t_ptr, prev_mean_ptr, prev_rstd_ptr,  # MASK: ReLU mask of relu(prev·s + t); STATS
    sum_ptr, sumx_ptr, tile_ptr,  # STATS: per (phase, row tile, channel) Σdz and Σdz·x̂ of prev's BN; BLOCK_M
    relu_ptr,  # RELU_OUT: relu(prev·s + t) written out, x's shape (the conv's input, for the wgrad)
    res_ptr,  # RES_MODE TENSOR: + an [N, H, W, C] tensor; OPTION_A: + option A's gradient from [N, RP, RQ, RK]
    N, H, W, C, K, P, Q,  # C, K: one group's input and output channels
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, G, RP, RQ, RK, res_stride_h, res_stride_w, partial_rows,
    XH, XW,  # POOL: the conv read x [N, XH, XW, C·G] average-pooled to H x W; dx is x's gradient
    R: tl.constexpr, S: tl.constexpr, GROUPED: tl.constexpr, EVERY_TAP: tl.constexpr, DBN: tl.constexpr,
    POOL: tl.constexpr,
    MASK: tl.constexpr,
    STATS: tl.constexpr,
    RELU_OUT: tl.constexpr, RES_MODE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr = 8,
):
    # GEMM rows: input pixels (n, h, w) of one stride phase (h mod stride_h, w mod stride_w: program_id(1));
    # columns: input channels c; reduction: the taps that land on an output pixel from this phase × output
    # channels k. Only r ≡ h + pad_h (mod stride_h) does, so each phase loops over its own taps and a stride-2
    # layer does the MMAs it needs, not four times as many; stride 1 is the single phase with every tap. Dilation
    # d puts tap r at h + pad − r·d: with stride 1 or d = 1 the same phases hold; with both above 1 on an axis
    # (EVERY_TAP, no ResNet has it) each phase loops over every tap and masks those that land between pixels.
    # Groups: program_id(2) is the group.
    c_base, k_base = _group_bases(tl.program_id(2), C, K, GROUPED)
    CX = C * G
    KY = K * G
    phase = tl.program_id(1)
    ph = phase // stride_w
    pw = phase % stride_w
    hs = (H - ph + stride_h - 1) // stride_h  # this phase's rows and columns of dx (possibly none)
    ws = (W - pw + stride_w - 1) // stride_w
    rows_max = N * tl.cdiv(H, stride_h) * tl.cdiv(W, stride_w)  # the first phase's: the grid's
    pid_m, offs_m, offs_c, m_ok, c_ok = _output_tile(rows_max, C, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = m_ok & (offs_m < N * hs * ws)
    img, hh, ww = _split_pixels(offs_m, hs, ws)
    h_in = hh * stride_h + ph
    w_in = ww * stride_w + pw
    if EVERY_TAP:
        r0 = ph * 0
        s0 = pw * 0
        r_step = 1
        s_step = 1
    else:
        r0 = (ph + pad_h) % stride_h
        s0 = (pw + pad_w) % stride_w
        r_step = stride_h
        s_step = stride_w
    taps_s = (S - s0 + s_step - 1) // s_step
    taps = ((R - r0 + r_step - 1) // r_step) * taps_s
    RSC = R * S * C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    chunks = tl.cdiv(K, BLOCK_K)
    for t in range(0, _bound(taps * chunks)):  # one pipelined loop over (tap, channel chunk), as in fprop
        tap = t // chunks
        kk = (t - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K)
        i = tap // taps_s
        r = r0 + i * r_step
        s = s0 + (tap - i * taps_s) * s_step
        hp = h_in + pad_h - r * dil_h
        wq = w_in + pad_w - s * dil_w
        p = hp // stride_h  # exact where a multiple of the stride: the phase makes it one (EVERY_TAP: masked)
        q = wq // stride_w
        tap_ok = m_ok & (p >= 0) & (p < P) & (q >= 0) & (q < Q)
        if EVERY_TAP:
            tap_ok = tap_ok & (hp % stride_h == 0) & (wq % stride_w == 0)
        base = ((img.to(tl.int64) * P + p) * Q + q) * KY + k_base
        k_ok = kk < K
        a_ok = tap_ok[:, None] & k_ok[None, :]
        a = tl.load(dy_ptr + base[:, None] + kk[None, :], mask=a_ok, other=0.0)
        if DBN:
            a = _dbn_on_load(a, a_ptr + base[:, None] + kk[None, :], a_ok, amean_ptr, alpha_ptr, beta_ptr,
                             gamma_ptr, k_base + kk, k_ok, 1)
        b = tl.load(w_ptr + (k_base + kk)[:, None] * RSC + (r * S + s) * C + offs_c[None, :],
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = _mma(acc, a, b, UPCAST, PRECISION)
    out_ok = m_ok[:, None] & c_ok[None, :]
    c_out = c_base + offs_c
    out_off = (((img.to(tl.int64) * H + h_in) * W + w_in) * CX)[:, None] + c_out[None, :]
    if RES_MODE == RES_TENSOR:
        acc += tl.load(res_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
    if RES_MODE == RES_OPTION_A:  # dx[n, h, w, c] += dz[n, h / s, w / s, c] where the stride divides h and w
        sub = m_ok & (h_in % res_stride_h == 0) & (w_in % res_stride_w == 0)
        pix = (img.to(tl.int64) * RP + h_in // res_stride_h) * RQ + w_in // res_stride_w
        acc += tl.load(res_ptr + pix[:, None] * RK + c_out[None, :], mask=sub[:, None] & c_ok[None, :],
                       other=0.0).to(tl.float32)
    out = acc.to(dx_ptr.dtype.element_ty)
    if MASK:  # the previous unit's ReLU, recomputed from its pre-BN output: dz = dr·[prev·s + t > 0]
        prev = tl.load(prev_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
        ps = tl.load(prev_s_ptr + c_out, mask=c_ok, other=0.0)
        pt = tl.load(prev_t_ptr + c_out, mask=c_ok, other=0.0)
        out = tl.where(prev * ps[None, :] + pt[None, :] > 0, out, 0.0).to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + out_off, out, mask=out_ok)
        if STATS:  # Σdz and Σdz·x̂ of the previous BN, per tile
            mean = tl.load(prev_mean_ptr + c_out, mask=c_ok, other=0.0)
            rstd = tl.load(prev_rstd_ptr + c_out, mask=c_ok, other=0.0)
            dz = tl.where(out_ok, out.to(tl.float32), 0.0)
            part = (phase * partial_rows + pid_m).to(tl.int64) * CX + c_out
            tl.store(sum_ptr + part, _sum_rows(dz, BLOCK_M), mask=c_ok)
            tl.store(sumx_ptr + part, _sum_rows(dz * (prev - mean[None, :]) * rstd[None, :], BLOCK_M), mask=c_ok)
            tl.store(tile_ptr, BLOCK_M)
        if RELU_OUT:  # last, prev read again (just read: a cache hit) rather than kept live through the sums
            again = tl.load(prev_ptr + out_off, mask=out_ok, other=0.0).to(tl.float32)
            relu = tl.maximum(again * ps[None, :] + pt[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
            tl.store(relu_ptr + out_off, relu.to(relu_ptr.dtype.element_ty), mask=out_ok)
    elif POOL > 1:
        # the pool's backward as the epilogue's store: each pooled pixel's gradient (rounded as the conv's output
        # is) spread over its window, divided by the window's count; the windows tile x, so every element of dx
        # is written once
        share = out.to(tl.float32)
        h0 = h_in * POOL
        w0 = w_in * POOL
        share = (share / _window_count(h0, w0, XH, XW, POOL)[:, None]).to(dx_ptr.dtype.element_ty)
        for i in tl.static_range(POOL):
            for j in tl.static_range(POOL):
                ok = out_ok & ((h0 + i < XH) & (w0 + j < XW))[:, None]
                pix = (img.to(tl.int64) * XH + h0 + i) * XW + w0 + j
                tl.store(dx_ptr + (pix * CX)[:, None] + c_out[None, :], share, mask=ok)
    else:
        tl.store(dx_ptr + out_off, out, mask=out_ok)


@triton.jit(do_not_specialize=_WGRAD_SIZES)
def conv_wgrad_kernel(
    dy_ptr, x_ptr, ws_ptr,
    a_ptr, amean_ptr, alpha_ptr, beta_ptr, gamma_ptr,  # DBN: dy operand α·dy + β·(a − mean) + γ per channel
    in_scale_ptr, in_shift_ptr,  # PROLOGUE: the x operand is relu(x·s + t) per input channel
    N, H, W, C, K, P, Q,  # C, K: one group's input and output channels
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, G, chunk,
    XH, XW,  # POOL: x is [N, XH, XW, C·G], read average-pooled to H x W
    R: tl.constexpr, S: tl.constexpr, FLAT: tl.constexpr, CP: tl.constexpr, GROUPED: tl.constexpr,
    DBN: tl.constexpr, POOL: tl.constexpr,
    PROLOGUE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # GEMM rows: output channels k (BLOCK_M); columns: (r, s, c) (BLOCK_N); reduction: output pixels (BLOCK_K),
    # split into chunks of ``chunk`` pixels, one fp32 partial [K, R·S·C] per chunk in the workspace. Groups:
    # program_id(0) runs over (group, row tile), each group its own channels of dy and x and rows of the workspace.
    if GROUPED:
        k_tiles = tl.cdiv(K, BLOCK_M)
        pid_k = tl.program_id(0) % k_tiles
        c_base, k_base = _group_bases(tl.program_id(0) // k_tiles, C, K, GROUPED)
    else:
        pid_k = tl.program_id(0)
        c_base, k_base = _group_bases(0, C, K, GROUPED)
    KY = K * G
    pid_j = tl.program_id(1)
    pid_split = tl.program_id(2)
    offs_k = pid_k * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok = offs_k < K
    if FLAT:
        # Columns are the flattened (r, s, c) index over channels zero-padded to CP (16 bytes; x and the workspace
        # hold CP channels): CP consecutive columns are one pixel's channels, 16 contiguous, aligned bytes of x.
        XC = CP
        RSC = R * S * CP
        offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = offs_j < RSC
        c = offs_j % CP
        tap_s = (offs_j // CP) % S
        tap_r = offs_j // (CP * S)
        c_ok = j_ok & (c < C)
    else:  # columns are a C block of one filter tap
        XC = C * G
        RSC = R * S * C
        c_blocks = tl.cdiv(C, BLOCK_N)
        tap = pid_j // c_blocks
        c = (pid_j % c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = c < C
        tap_s = tl.zeros((BLOCK_N,), dtype=tl.int32) + tap % S
        tap_r = tl.zeros((BLOCK_N,), dtype=tl.int32) + tap // S
        offs_j = (tap_r * S + tap_s) * C + c
        c_ok = j_ok
    M = N * P * Q
    start = pid_split * chunk
    end = tl.minimum(start + chunk, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(_bound(start), _bound(end), BLOCK_K):
        mm = m0 + tl.arange(0, BLOCK_K)
        mm_ok = mm < end
        img, p, q = _split_pixels(mm, P, Q)
        a_ok = k_ok[:, None] & mm_ok[None, :]
        a_off = mm[None, :].to(tl.int64) * KY + (k_base + offs_k)[:, None]
        a = tl.load(dy_ptr + a_off, mask=a_ok, other=0.0)
        if DBN:
            a = _dbn_on_load(a, a_ptr + a_off, a_ok, amean_ptr, alpha_ptr, beta_ptr, gamma_ptr, k_base + offs_k, k_ok,
                             0)
        h = (p * stride_h - pad_h)[:, None] + tap_r[None, :] * dil_h
        w = (q * stride_w - pad_w)[:, None] + tap_s[None, :] * dil_w
        b_ok = mm_ok[:, None] & j_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        if POOL > 1:
            b = _pooled_on_load(x_ptr, img[:, None], h, w, c_base + c[None, :], b_ok, XH, XW, XC, POOL)
        else:
            b = tl.load(x_ptr + ((img[:, None].to(tl.int64) * H + h) * W + w) * XC + c_base + c[None, :],
                        mask=b_ok, other=0.0)
        if PROLOGUE:
            b = _bn_relu_on_load(b, b_ok, in_scale_ptr + c_base, in_shift_ptr + c_base, c, c_ok)
        acc = _mma(acc, a, b, UPCAST, PRECISION)
    ws_off = pid_split * KY * RSC + (k_base + offs_k)[:, None].to(tl.int64) * RSC + offs_j[None, :]
    tl.store(ws_ptr + ws_off, acc, mask=k_ok[:, None] & j_ok[None, :])


@triton.jit
def _reduce_split(ws_ptr, dw_ptr, block, split, total, C, CP, BLOCK: tl.constexpr):
    """Block ``block`` of dw[k, r, s, c] = Σ_i ws[i, k, r, s, c] over the split chunks, in fp32 and in order (as
    torch's sum over the outer dimension), c < C of the workspace's CP channels, stored once in dw's dtype."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    ptrs = ws_ptr + ((offs // C).to(tl.int64) * CP + offs % C)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(0, _bound(split)):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += total // C * CP  # one chunk's partial: K·R·S·CP elements
    tl.store(dw_ptr + offs, acc.to(dw_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["split"])
def wgrad_reduce_kernel(ws_ptr, dw_ptr, split, total, C, CP, BLOCK: tl.constexpr):
    _reduce_split(ws_ptr, dw_ptr, tl.program_id(0), split, total, C, CP, BLOCK)


# --------------------------------------------------------------------------------------------- host side
_TILES = {conv_fprop_kernel: _GEMM_TILES, conv_dgrad_kernel: _GEMM_TILES, conv_wgrad_kernel: _WGRAD_TILES}
_TILE_ARGS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


_NOT_SPECIALISED = {conv_fprop_kernel: _FPROP_SIZES, conv_dgrad_kernel: _DGRAD_SIZES, conv_wgrad_kernel: _WGRAD_SIZES}
Tile = Tuple[int, int, int, int, int]  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages


def tuning_key_args(kernel) -> list:
    """The arguments autotuning is keyed on: every integer argument Triton specialises on (channel counts,
    stride, padding, residual geometry: a value of 1 becomes a constant, a multiple of 16 is marked divisible)
    and every constexpr feature of the kernel (kernel size, prologue, statistics, residual mode, ...), so a
    configuration tuned — and checked for spills — for one compiled variant is never reused for another.
    (Triton adds the tensors' dtypes.) Batch and spatial sizes are left out: they are not specialised on."""
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    constexprs = constexpr_args(kernel)
    ints = [n for n in params if not n.endswith("_ptr") and n not in constexprs and n not in _NOT_SPECIALISED[kernel]]
    return ints + [n for n in constexprs if n not in _TILE_ARGS]


def constexpr_args(kernel) -> list:
    """The kernel's tl.constexpr parameters, in order (compiled or interpreted)."""
    params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    return [n for n, p in params.items() if p.annotation in (tl.constexpr, "tl.constexpr")]


def _config_tile(config) -> Tile:
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages


# ------------------------------------------------------------------------------- spills, from the compiled kernel
def compile_tile(kernel, kwargs: dict, tile: Tile):
    """The compiled kernel that a launch with ``kwargs`` runs with this tile: Triton's JIT binds and specialises
    the arguments exactly as for the launch (integers equal to 1 become constants, multiples of 16 and aligned
    pointers are marked divisible by 16), compiles for the current target, and caches it, so the launch or the
    benchmark that follows reuses it."""
    args = {n: v for n, v in kwargs.items() if n in kernel.arg_names and n not in _TILE_ARGS}
    compiled = kernel.warmup(grid=(1,), **args, **tile_options(tile))
    return compiled.result() if hasattr(compiled, "result") else compiled  # an asynchronous compile (Triton 3.6+)


def tile_options(tile: Tile) -> dict:
    """A tile's launch options, spelt as the autotuner passes them: the JIT's cache key holds the options as
    given, so every launch of a tile (pruning's compile, the benchmark, the tuned or heuristic launch) finds the
    same compiled kernel."""
    return _configs([tile])[0].all_kwargs()


def loaded_spill_bytes(compiled) -> int:
    """Per-thread local memory of a compiled kernel, loaded on the current GPU: the registers it spills. Triton
    reads it when it loads the module (``n_spills``, in 4-byte words); loading is what the launch does anyway."""
    compiled._init_handles()
    return 4 * compiled.n_spills


def _gpu_spills(kernel, kwargs: dict, tile: Tile) -> int:
    return loaded_spill_bytes(compile_tile(kernel, kwargs, tile))


_spill_probe = _gpu_spills
_spills: dict = {}  # (kernel, tuning key, tile) → spilled bytes, or None where it does not compile for this GPU


@contextlib.contextmanager
def spill_probe(probe):
    """Measure spills with ``probe(kernel, kwargs, tile) → bytes`` inside the block, from a fresh memo: how the
    pruning runs for a GPU that is not here (``fused_resnet.kernels.aot``: compiled for sm_90 on a CPU, the
    spill read from the cubin) and in the tests (an injected measurement)."""
    global _spill_probe, _spills
    saved = _spill_probe, _spills
    _spill_probe, _spills = probe, {}
    try:
        yield
    finally:
        _spill_probe, _spills = saved


def tile_spills(kernel, kwargs: dict, tile: Tile) -> Optional[int]:
    """Bytes the compiled kernel of this launch and tile spills, measured once per tuning key (which holds every
    argument the compiled kernel depends on, ``tuning_key_args``); None where it cannot run on this GPU (out of
    shared memory, ptxas refused it), as Triton's autotuner treats such a configuration."""
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources, PTXASError

    key = (kernel, tuning_key(_TUNED[kernel], kwargs), tile)
    if key not in _spills:
        try:
            _spills[key] = _spill_probe(kernel, kwargs, tile)
        except (OutOfResources, CompileTimeAssertionFailure, PTXASError):
            _spills[key] = None
    return _spills[key]


def selectable_tiles(kernel, kwargs: dict, tiles: Optional[Sequence[Tile]] = None) -> list:
    """The tiles (of ``tiles``, default every tile of the kernel, in that order) that may run this launch: those
    whose compiled kernel does not spill. If every one spills, the one that spills least (a launch needs one); if
    none compiles, all of them, for Triton to report why."""
    tiles = list(_TILES[kernel] if tiles is None else tiles)
    spills = [(tile_spills(kernel, kwargs, t), t) for t in tiles]
    clean = [t for b, t in spills if b == 0]
    if clean:
        return clean
    compiled = [(b, i) for i, (b, _) in enumerate(spills) if b is not None]
    return [tiles[min(compiled)[1]]] if compiled else tiles


def _prune(kernel):
    """Autotuning's early_config_prune: compiles each configuration for the launch (the benchmark would compile
    it next) and drops those that spill before any is benchmarked."""
    def prune(configs, named_args, **kwargs):
        by_tile = {_config_tile(c): c for c in configs}
        return [by_tile[t] for t in selectable_tiles(kernel, {**named_args, **kwargs}, list(by_tile))]
    return prune


def _autotuned(kernel, tiles):
    # Tuned configurations go to Triton's on-disk cache (keyed by Triton version, GPU architecture, kernel source,
    # tuning key and configs): a user benchmarks a variant once, not in every process. Older Triton: memory only.
    disk = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=_configs(tiles), key=tuning_key_args(kernel),
                           prune_configs_by={"early_config_prune": _prune(kernel)}, **disk)(kernel)


_TUNED = {kernel: _autotuned(kernel, tiles) for kernel, tiles in _TILES.items()}


def tuning_key(tuned, kwargs: dict) -> tuple:
    """The key under which Triton's Autotuner (``tuned``) caches its choice for a launch with ``kwargs``: the key
    arguments' values, then the dtype of every tensor argument (triton.runtime.autotuner.Autotuner.run)."""
    args = {k: v for k, v in kwargs.items() if k in tuned.arg_names}
    return tuple([args[k] for k in tuned.keys if k in args] + [str(v.dtype) for v in args.values()
                                                              if hasattr(v, "dtype")])


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def heuristic_order(tiles: Sequence[Tile], gemm_mnk: Tuple[int, int, int]) -> list:
    """The configurations FUSED_RESNET_AUTOTUNE=heuristic tries, best first, with no benchmarking: the tiles at
    most 128 columns wide that the GEMM's rows and columns fill, largest first; then the other tiles at most 128
    wide, smallest first; the 256-wide ones last (128 accumulator registers per thread: the first to spill, and
    never measured to be faster here). ``heuristic_tile`` launches the first that does not spill."""
    m, n, _ = gemm_mnk

    def area(t):
        return t[0] * t[1], t[2]

    narrow = [t for t in tiles if t[1] <= 128]
    fits = [t for t in narrow if t[0] <= max(m, 64) and t[1] <= max(n, 64)]
    rest = [t for t in narrow if t not in fits]
    wide = [t for t in tiles if t[1] > 128]
    return sorted(fits, key=area, reverse=True) + sorted(rest, key=area) + sorted(wide, key=area)


def heuristic_tile(kernel, kwargs: dict, gemm_mnk: Tuple[int, int, int]) -> Tile:
    """The configuration launched without benchmarking: the first of ``heuristic_order`` whose compiled kernel
    does not spill (compiled lazily, in that order: usually one compile per variant)."""
    order = heuristic_order(_TILES[kernel], gemm_mnk)
    for tile in order:
        if tile_spills(kernel, kwargs, tile) == 0:
            return tile
    return selectable_tiles(kernel, kwargs, order)[0]


_warned_untuned: set = set()


def _warn_untuned(kernel) -> None:
    if kernel not in _warned_untuned:
        _warned_untuned.add(kernel)
        warnings.warn(f"fused_resnet: {kernel.__name__} launched inside a CUDA graph capture for a variant not "
                      f"autotuned yet: it runs the heuristic configuration (run a warm-up step before capturing to "
                      f"capture the tuned one)", RuntimeWarning, stacklevel=3)


def _pow2(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(v)))


def conv_flops(n: int, k: int, c: int, r: int, s: int, p: int, q: int) -> int:
    """2·MACs of a convolution's fprop, dgrad or wgrad: each is one N·P·Q × K × C·R·S product."""
    return 2 * n * p * q * k * c * r * s


def _launch(kernel, grid, kwargs, gemm_mnk: Tuple[int, int, int], interpret_caps: Tuple[int, int, int],
            reads: Sequence[Optional[torch.Tensor]], writes: Sequence[Optional[torch.Tensor]], flops: int):
    """On the GPU ``_launch_tuned``. Under the interpreter, whose cost is per program and per loop step rather
    than per element, one tile fitted to the problem (capped by ``interpret_caps``) is launched directly:
    measured on a 2-core CPU, a 2x16x32x32 3x3 fprop takes 2.8 s with 32x32x16 tiles and 0.33 s with 1024x64x64.
    The launch is reported to ``fused_resnet.launches`` (what it reads and writes) and, in a dry run, skipped."""
    launches.record(kernel.__name__, "conv", reads, writes, flops)
    if launches.dry():
        return
    if not INTERPRET:
        _launch_tuned(kernel, grid, kwargs, gemm_mnk)
        return
    meta = {name: _pow2(v, 16, cap) for name, v, cap in zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), gemm_mnk,
                                                            interpret_caps, strict=True)}
    kernel[grid(meta)](**kwargs, **meta)


def _launch_tuned(kernel, grid, kwargs, gemm_mnk: Tuple[int, int, int]):
    """Autotuned launch among the configurations whose compiled kernel does not spill, or one configuration from
    ``heuristic_tile`` (see fused_resnet.kernels' autotune modes)."""
    tuned = _TUNED[kernel]
    if autotune_mode() == "full":
        # Benchmarking synchronises the device, which a CUDA graph capture forbids: inside one, a variant not
        # tuned before (warm up first) takes the heuristic configuration, once announced.
        if not _capturing() or tuning_key(tuned, kwargs) in tuned.cache:
            tuned[grid](**kwargs)
            return
        _warn_untuned(kernel)
    options = tile_options(heuristic_tile(kernel, kwargs, gemm_mnk))
    kernel[grid(options)](**kwargs, **options)


def _precision(dtype: torch.dtype) -> str:
    """fp32 convs follow torch's setting for cuDNN (TF32 products when torch.backends.cudnn.allow_tf32, else exact
    fp32); fp16/bf16 operands take Triton's default (tensor cores; the setting only concerns fp32 operands). The
    interpreter always multiplies exactly (its bf16 operands are upcast to fp32 first)."""
    if INTERPRET or (dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] (any layout) as a contiguous [N, H, W, C] tensor (no copy when t is channels_last)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _alloc(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (the tests poison it to catch unwritten elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_nchw_view(n: int, c: int, h: int, w: int, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A fresh channels_last [n, c, h, w] tensor in like's dtype and its [n, h, w, c] contiguous storage view."""
    storage = _alloc((n, h, w, c), like.dtype, like.device)
    return storage.permute(0, 3, 1, 2), storage


def _check(x: torch.Tensor, w: torch.Tensor, what: str) -> None:
    if x.dim() != 4 or w.dim() != 4:
        raise ValueError(f"{what} expects a 4-D input and a 4-D weight, got {x.dim()}-D and {w.dim()}-D")
    if x.dtype not in DTYPES or x.dtype != w.dtype:
        raise TypeError(f"{what} expects float32, float16 or bfloat16 tensors of one dtype, got {x.dtype} and "
                        f"{w.dtype}")
    if x.device != w.device:
        raise ValueError(f"{what} expects tensors on one device, got {x.device} and {w.device}")


def _out_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    if out < 1:
        raise ValueError(f"conv output size would be {out} (input {size}, kernel {kernel}, stride {stride}, "
                         f"padding {pad}, dilation {dilation})")
    return out


def _groups(what: str, channels: int, per_group: int, out_channels: int, groups: int) -> None:
    """Each of ``groups`` GEMMs takes ``per_group`` of the ``channels`` and makes out_channels / groups."""
    if groups < 1 or per_group * groups != channels or out_channels % groups:
        raise ValueError(f"{what}: groups={groups} does not split {channels} input channels ({per_group} per "
                         f"group in the weight) and {out_channels} output channels evenly")


class TilePartials(NamedTuple):
    """Two fp32 per-row-tile partials of an epilogue's reduction over ``m`` rows per group, ``groups`` groups of
    ``rows`` buffer rows each ([groups·rows, C]): per tile (mean, M2) of a conv output, or (Σdz, Σdz·x̂).
    ``tile``: rows per tile, an int or the 1-element int32 tensor the kernel wrote its BLOCK_M to (autotuning
    picks it); a group's first cdiv(m, tile) buffer rows hold tiles, the rest were never written. Merged on the
    device by ``fused_resnet.kernels.bn_finalize`` (torch twins: ``merge_tile_stats``, ``sum_tile_partials``)."""

    first: torch.Tensor
    second: torch.Tensor
    tile: Union[torch.Tensor, int]
    m: int
    groups: int = 1

    @property
    def rows(self) -> int:
        return self.first.shape[0] // self.groups


def _tile_counts(rows: int, tile: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, 1] fp32: how many of the m rows each row tile of ``tile[0]`` rows held (0 past the last tile)."""
    idx = torch.arange(rows, device=tile.device)
    return (m - idx * tile.to(idx.dtype)).clamp(min=0).minimum(tile.to(idx.dtype)).to(torch.float32)[:, None]


def _tile_rows(rows: int, tile: torch.Tensor, m: int) -> torch.Tensor:
    """[rows, 1] bool: which rows of a per-tile partial buffer were written by the tiles that ran."""
    return _tile_counts(rows, tile, m) > 0


def merge_tile_stats(partials: TilePartials):
    """Per-channel (mean, biased variance) over m rows from per-row-tile (mean, M2) partials (Chan's parallel
    merge: M2 = Σ M2_i + Σ n_i·(mean_i − mean)²) with torch ops: the twin of ``bn_finalize.bn_finalize``, which
    the backend launches instead (one kernel, not ~20). ``tile`` holds the BLOCK_M the kernel ran with, which
    fixes each tile's row count; rows of the partial buffers beyond the tiles that ran are ignored."""
    means, m2s, tile, m = partials.first, partials.second, partials.tile, partials.m
    counts = _tile_counts(means.shape[0], tile, m)
    valid = counts > 0
    mean = (torch.where(valid, means, 0.0) * counts).sum(0) / m
    dev = torch.where(valid, means - mean, 0.0)
    m2 = torch.where(valid, m2s, 0.0).sum(0) + (dev * dev * counts).sum(0)
    return mean, m2 / m


def sum_tile_partials(partials: TilePartials) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel sums of both partials over the rows each group's tiles wrote, with torch ops: the twin of the
    sums ``bn_finalize.dbn_finalize`` forms on the device."""
    p = partials
    tile = p.tile if isinstance(p.tile, torch.Tensor) else torch.tensor([p.tile], device=p.first.device)
    valid = _tile_rows(p.rows, tile, p.m)
    return tuple(torch.where(valid, v.view(p.groups, -1, v.shape[1]), 0.0).sum((0, 1)) for v in p[:2])


def _min_block_m(m: int) -> int:
    return _pow2(m, 16, 1024) if INTERPRET else min(t[0] for t in _GEMM_TILES)


def _tile_partials(m: int, channels: int, device: torch.device, groups: int = 1):
    """Two fp32 [row tiles, channels] partial buffers for an epilogue reduction over m rows (sized for the
    smallest BLOCK_M autotuning may pick; ``groups`` such blocks of rows, one per dgrad stride phase) and the
    1-element buffer the kernel writes its BLOCK_M to."""
    rows = groups * triton.cdiv(m, _min_block_m(m))
    return (_alloc((rows, channels), torch.float32, device), _alloc((rows, channels), torch.float32, device),
            _alloc((1,), torch.int32, device))


def _pool_input(x: torch.Tensor, avg_pool: int, groups: int, prologue: bool) -> Tuple[torch.Tensor, int]:
    """(the tensor a conv kernel reads, the POOL it pools that tensor with while loading). The pool runs in the
    operand load of the GEMM layouts whose loads are pixel gathers; a conv with fewer than FLAT_BELOW input
    channels (fprop's row layout, wgrad's flattened columns: loads of whole filter rows; no ResNet pools one) gets
    torch's own pool first, the same numbers."""
    if avg_pool < 1 or (avg_pool > 1 and prologue):
        raise ValueError(f"avg_pool={avg_pool}: a conv pools its input (k >= 1) only where it reads it unmodified")
    if avg_pool > 1 and x.shape[1] < FLAT_BELOW and groups == 1:
        pooled = F.avg_pool2d(x, avg_pool, avg_pool, ceil_mode=True, count_include_pad=False)
        launches.record("avg_pool2d", "elementwise", [x], [pooled])
        return pooled, 1
    return x, avg_pool


def _pooled_hw(x: torch.Tensor, avg_pool: int) -> Tuple[int, int]:
    """The spatial size a conv sees of x read through the pool: ceil(H / k) x ceil(W / k)."""
    return pooled_size(x.shape[2], avg_pool), pooled_size(x.shape[3], avg_pool)


def conv_fprop(
    x: torch.Tensor, w: torch.Tensor, stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
    bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None, relu: bool = False,
    option_a_stride: Optional[Sequence[int]] = None,
    in_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, stats: bool = False, *,
    dilation: Sequence[int] = (1, 1), groups: int = 1, avg_pool: int = 1,
):
    """y = [relu](conv2d(x', w, stride, padding, dilation, groups) [+ bias] [+ residual]), returned channels_last,
    where
    x' = relu(x·s + t) per input channel when ``in_affine`` = (s, t) (fp32; the previous BN-apply + ReLU done
    while loading, zero padding staying zero), x' = avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False)
    for ``avg_pool`` = k > 1 (pooled while loading) and x' = x otherwise.

    x [N, C, H, W], w [K, C / groups, R, S] in one dtype; bias fp32 [K]. ``groups``: one GEMM per group (the
    grid's second axis), depth-wise (groups = C) included: correct, but each GEMM then reduces over R·S values
    only, so the tensor cores mostly multiply zero padding. ``residual``: an [N, K, P, Q] tensor, or, with
    ``option_a_stride``, the block input of the option-A shortcut (x_blk[:, :, ::s, ::s] with zero channels
    appended up to K), read inside the kernel. With ``stats`` returns (y, partials): the epilogue's per-row-tile
    fp32 mean and M2 of y as stored (``TilePartials``), which ``bn_finalize`` merges into the mean and biased
    variance on the device."""
    _check(x, w, "conv_fprop")
    x, avg_pool = _pool_input(x, avg_pool, groups, in_affine is not None)
    n, c, xh, xw = x.shape
    h, wd = _pooled_hw(x, avg_pool)
    k, c_w, r, s = w.shape
    if c_w * groups != c:
        raise ValueError(f"conv_fprop: weight {tuple(w.shape)} with groups={groups} expects {c_w * groups} input "
                         f"channels, got input {tuple(x.shape)}")
    _groups("conv_fprop", c, c_w, k, groups)
    p = _out_size(h, r, stride[0], padding[0], dilation[0])
    q = _out_size(wd, s, stride[1], padding[1], dilation[1])
    y, y_st = _empty_nchw_view(n, k, p, q, x)
    x_st, w_st = _nhwc(x), _nhwc(w)
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (k,)):
        raise ValueError(f"conv_fprop expects the bias as float32 of shape ({k},), got {bias.dtype} "
                         f"{tuple(bias.shape)}")
    res_mode, res_st = Residual.NONE, x_st
    res_dims = dict(RES_H=1, RES_W=1, RES_C=1, res_stride_h=1, res_stride_w=1)
    if residual is not None:
        if residual.dtype != x.dtype:
            raise TypeError(f"conv_fprop expects the residual in {x.dtype}, got {residual.dtype}")
        res_st = _nhwc(residual)
        if option_a_stride is None:
            if residual.shape != (n, k, p, q):
                raise ValueError(f"conv_fprop expects a residual of shape {(n, k, p, q)}, got "
                                 f"{tuple(residual.shape)}")
            res_mode = Residual.TENSOR
        else:
            rn, rc, rh, rw = residual.shape
            ss = option_a_stride
            if rn != n or rc > k or (rh - 1) // ss[0] + 1 != p or (rw - 1) // ss[1] + 1 != q:
                raise ValueError(f"conv_fprop: option-A shortcut of {tuple(residual.shape)} with stride "
                                 f"{tuple(ss)} does not map onto the output {(n, k, p, q)}")
            res_mode = Residual.OPTION_A
            res_dims = dict(RES_H=rh, RES_W=rw, RES_C=rc, res_stride_h=ss[0], res_stride_w=ss[1])

    if in_affine is not None:
        _vectors("conv_fprop's in_affine", c, *in_affine)
    m = n * p * q
    if stats:
        means, m2s, tile = _tile_partials(m, k, x.device)
    else:
        means = m2s = tile = y_st
    scale, shift = in_affine if in_affine is not None else (y_st, y_st)

    kg = k // groups

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(kg, meta["BLOCK_N"]), groups)

    row = c < FLAT_BELOW and groups == 1
    cp = _row_channels(c, x.dtype) if row else 1  # a constexpr: 1 keeps one variant for every larger C
    if row and cp != c:  # the row layout's zero channels (the stem's input and weights: a small copy)
        x_st, w_st = (F.pad(t, (0, cp - c)) for t in (x_st, w_st))
    _launch(
        conv_fprop_kernel, grid,
        dict(x_ptr=x_st, w_ptr=w_st, bias_ptr=bias if bias is not None else y_st, res_ptr=res_st, y_ptr=y_st,
             in_scale_ptr=scale, in_shift_ptr=shift, mean_ptr=means, m2_ptr=m2s, tile_ptr=tile,
             N=n, H=h, W=wd, C=c_w, K=kg, P=p, Q=q, stride_h=stride[0], stride_w=stride[1], pad_h=padding[0],
             pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1], G=groups, **res_dims, XH=xh, XW=xw,
             R=r, S=s, ROW=row, CP=cp, GROUPED=groups > 1, PROLOGUE=in_affine is not None, POOL=avg_pool,
             STATS=stats, HAS_BIAS=bias is not None,
             RES_MODE=int(res_mode), RELU=relu, UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype)),
        (m, kg, s * cp if row else c_w), (1024, 256, 256),
        reads=[x_st, w_st, bias, res_st if residual is not None else None,
               *(in_affine if in_affine is not None else ())],
        writes=[y_st, *((means, m2s, tile) if stats else ())], flops=conv_flops(n, k, c_w, r, s, p, q),
    )
    if stats:
        return y, TilePartials(means, m2s, tile, m)
    return y


def _row_channels(c: int, dtype: torch.dtype) -> int:
    """fprop's row layout: C rounded up to whole 16-byte runs (8 channels in 16-bit types, 4 in float32)."""
    per_16_bytes = 16 // dtype.itemsize
    return -(-c // per_16_bytes) * per_16_bytes


def _vectors(what: str, n: int, *vs: torch.Tensor) -> None:
    for v in vs:
        if v.dtype != torch.float32 or v.shape != (n,) or not v.is_contiguous():
            raise ValueError(f"{what} expects contiguous float32 per-channel vectors of shape ({n},), got {v.dtype} "
                             f"{tuple(v.shape)}")


def _same_shape(what: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype:
        raise ValueError(f"{what} must match {tuple(like.shape)} {like.dtype}, got {tuple(t.shape)} {t.dtype}")


def conv_dgrad(
    dy: torch.Tensor, w: torch.Tensor, input_hw: Sequence[int], stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0), dbn: Optional[Tuple[torch.Tensor, ...]] = None,
    relu_of: Optional[Tuple[torch.Tensor, ...]] = None, residual: Optional[torch.Tensor] = None,
    option_a_stride: Optional[Sequence[int]] = None, relu_out: bool = False, *,
    dilation: Sequence[int] = (1, 1), groups: int = 1, avg_pool: int = 1,
):
    """dx of y = conv2d(x, w, stride, padding, dilation, groups) given dy [N, K, P, Q]; x's spatial size is
    ``input_hw`` (it is not implied by dy when the stride does not divide it). Returned channels_last, in dy's
    dtype. ``avg_pool`` = k > 1: the conv read x through avg_pool2d(x, k, k, ceil_mode=True,
    count_include_pad=False), and dx is x's gradient through it (the epilogue spreads each pooled pixel's
    gradient over its window; no other epilogue option then).

    Training-fusion options: ``dbn`` = (a, mean, α, β, γ): the gradient operand is α·dy + β·(a − mean) + γ per
    output channel (the BN backward applied while loading; a has dy's shape). ``residual``: added to dx (an [N, C, H, W]
    tensor, or with ``option_a_stride`` the option-A shortcut's gradient taken from that [N, K', P', Q']
    tensor). ``relu_of`` = (prev, s, t[, mean, rstd]): dx is multiplied by the ReLU mask [prev·s + t > 0] of
    the previous unit (prev: its pre-BN output, x's shape); with mean and rstd also returns that BN's Σdz and
    Σdz·x̂ as per-row-tile partials (``TilePartials``, summed by ``bn_finalize.dbn_finalize``): (dz, partials).
    ``relu_out`` (with ``relu_of``): the epilogue, which has prev in
    registers already, also writes relu(prev·s + t) — this conv's input, which the forward never wrote —
    returned last, channels_last: the wgrad reads it as a plain operand instead of recomputing it (a wgrad with
    both operands transformed on load waits for every wgmma on sm_90; with one it keeps one in flight)."""
    _check(dy, w, "conv_dgrad")
    n, k, p, q = dy.shape
    k_w, c_w, r, s = w.shape
    c = c_w * groups
    xh, xw = input_hw
    if avg_pool > 1 and (relu_of is not None or residual is not None or relu_out):
        raise ValueError("conv_dgrad: avg_pool spreads the gradient over the pool's windows: no relu_of, residual "
                         "or relu_out with it")
    h, wd = pooled_size(xh, avg_pool), pooled_size(xw, avg_pool)
    _groups("conv_dgrad", c, c_w, k, groups)
    if k_w != k or (_out_size(h, r, stride[0], padding[0], dilation[0]),
                    _out_size(wd, s, stride[1], padding[1], dilation[1])) != (p, q):
        raise ValueError(f"conv_dgrad: dy {tuple(dy.shape)} does not match weight {tuple(w.shape)}, input size "
                         f"{tuple(input_hw)}, stride {tuple(stride)}, padding {tuple(padding)}, dilation "
                         f"{tuple(dilation)}")
    dx, dx_st = _empty_nchw_view(n, c, xh, xw, dy)
    phases = stride[0] * stride[1]  # the kernel's program_id(1): one stride phase of dx each
    m_phase = n * triton.cdiv(h, stride[0]) * triton.cdiv(wd, stride[1])  # rows of the largest phase
    dummy = dx_st
    if relu_out and relu_of is None:
        raise ValueError("conv_dgrad: relu_out needs relu_of (the tensor and BN it recomputes the ReLU of)")
    relu, relu_st = _empty_nchw_view(n, c, h, wd, dy) if relu_out else (None, dummy)
    a = amean = alpha = beta = gamma = dummy
    if dbn is not None:
        a, amean, alpha, beta, gamma = dbn
        _same_shape("conv_dgrad: dbn's a", a, dy)
        _vectors("conv_dgrad's dbn", k, amean, alpha, beta, gamma)
        a = _nhwc(a)
    prev = ps = pt = pmean = prstd = sums = sumx = tile = dummy
    stats = relu_of is not None and len(relu_of) == 5
    if relu_of is not None:
        prev, ps, pt, *moments = relu_of
        _same_shape("conv_dgrad: relu_of's pre-BN tensor", prev, dx)
        _vectors("conv_dgrad's relu_of", c, ps, pt, *moments)
        prev = _nhwc(prev)
        if stats:
            pmean, prstd = moments
            sums, sumx, tile = _tile_partials(m_phase, c, dy.device, phases)
    res_mode, res = Residual.NONE, dummy
    res_dims = dict(RP=1, RQ=1, RK=1, res_stride_h=1, res_stride_w=1)
    if residual is not None:
        if residual.dtype != dy.dtype:
            raise TypeError(f"conv_dgrad expects the residual in {dy.dtype}, got {residual.dtype}")
        res = _nhwc(residual)
        if option_a_stride is None:
            _same_shape("conv_dgrad: residual", residual, dx)
            res_mode = Residual.TENSOR
        else:
            rn, rk, rp, rq = residual.shape
            ss = option_a_stride
            if rn != n or rk < c or (h - 1) // ss[0] + 1 != rp or (wd - 1) // ss[1] + 1 != rq:
                raise ValueError(f"conv_dgrad: option-A shortcut gradient {tuple(residual.shape)} with stride "
                                 f"{tuple(ss)} does not map onto dx {(n, c, h, wd)}")
            res_mode = Residual.OPTION_A
            res_dims = dict(RP=rp, RQ=rq, RK=rk, res_stride_h=ss[0], res_stride_w=ss[1])

    def grid(meta):
        return (triton.cdiv(m_phase, meta["BLOCK_M"]) * triton.cdiv(c_w, meta["BLOCK_N"]), phases, groups)

    every_tap = any(d > 1 and st > 1 for d, st in zip(dilation, stride))

    dy_st, w_st = _nhwc(dy), _nhwc(w)
    _launch(
        conv_dgrad_kernel, grid,
        dict(dy_ptr=dy_st, w_ptr=w_st, dx_ptr=dx_st, a_ptr=a, amean_ptr=amean, alpha_ptr=alpha,
             beta_ptr=beta, gamma_ptr=gamma, prev_ptr=prev, prev_s_ptr=ps, prev_t_ptr=pt, prev_mean_ptr=pmean,
             prev_rstd_ptr=prstd, sum_ptr=sums, sumx_ptr=sumx, tile_ptr=tile, relu_ptr=relu_st, res_ptr=res,
             N=n, H=h, W=wd, C=c_w, K=k // groups, P=p, Q=q, stride_h=stride[0], stride_w=stride[1],
             pad_h=padding[0], pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1], G=groups, **res_dims,
             partial_rows=sums.shape[0] // phases if stats else 0, XH=xh, XW=xw,
             R=r, S=s, GROUPED=groups > 1, EVERY_TAP=every_tap, DBN=dbn is not None, POOL=avg_pool,
             MASK=relu_of is not None, STATS=stats,
             RELU_OUT=relu_out,
             RES_MODE=int(res_mode),
             UPCAST=_upcast(dy.dtype), PRECISION=_precision(dy.dtype)),
        (m_phase, c_w, k // groups), (1024, 256, 256),
        reads=[dy_st, w_st, *(dbn if dbn is not None else ()), *(relu_of if relu_of is not None else ()),
               res if residual is not None else None],
        writes=[dx_st, relu_st if relu_out else None, *((sums, sumx, tile) if stats else ())],
        flops=conv_flops(n, k, c_w, r, s, p, q),
    )
    out = (dx,)
    if stats:  # one group of row tiles per stride phase, each sized for the largest phase
        out += (TilePartials(sums, sumx, tile, m_phase, phases),)
    if relu_out:
        out += (relu,)
    return out if len(out) > 1 else dx


def _wgrad_split(m: int, tiles: int, device: torch.device) -> int:
    """Reduction chunks for wgrad: enough programs to fill the GPU (~4 per SM) without chunks below 1024 pixels;
    one under the interpreter (fewer, larger programs run faster there)."""
    if INTERPRET:
        return 1
    sms = launches.ACCOUNT_SMS if launches.dry() else torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, (4 * sms) // max(tiles, 1))
    split = max(1, min(want, m // 1024, 64))
    return 1 << (split.bit_length() - 1)  # a power of two: few distinct autotune keys


def conv_wgrad(
    dy: torch.Tensor, x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int] = (1, 1),
    padding: Sequence[int] = (0, 0), dbn: Optional[Tuple[torch.Tensor, ...]] = None,
    in_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, defer: bool = False,
    dilation: Sequence[int] = (1, 1), groups: int = 1, avg_pool: int = 1,
):
    """dW [K, C / groups, R, S] of y = conv2d(x, W, stride, padding, dilation, groups) given dy [N, K, P, Q];
    accumulated in fp32 (split over
    the N·P·Q reduction, partials summed in fp32), returned channels_last in x's dtype. ``defer``: return the
    unreduced ``WgradWorkspace`` instead, for a later launch to reduce (``wgrad_reduce``, or the backward's next
    dBN launch, which does it in the same launch).

    Training-fusion options: ``dbn`` = (a, mean, α, β, γ) as in conv_dgrad; ``in_affine`` = (s, t): the input operand
    is relu(x·s + t) per input channel (the previous unit's BN + ReLU, recomputed while loading). Backend triton
    does not combine the two: with both operands transformed, the sm_90 main loop waits for every wgmma, so it
    reads the input conv_dgrad(relu_out=True) wrote instead (docs/TRITON.md). ``avg_pool`` = k > 1: the input
    operand is avg_pool2d(x, k, k, ceil_mode=True, count_include_pad=False), pooled while loading."""
    _check(x, dy, "conv_wgrad")
    x, avg_pool = _pool_input(x, avg_pool, groups, in_affine is not None)
    n, c, xh, xw = x.shape
    h, wd = _pooled_hw(x, avg_pool)
    n_dy, k, p, q = dy.shape
    r, s = kernel_size
    if groups < 1 or c % groups:
        raise ValueError(f"conv_wgrad: groups={groups} does not split {c} input channels evenly")
    cg = c // groups
    _groups("conv_wgrad", c, cg, k, groups)
    if n_dy != n or (_out_size(h, r, stride[0], padding[0], dilation[0]),
                     _out_size(wd, s, stride[1], padding[1], dilation[1])) != (p, q):
        raise ValueError(f"conv_wgrad: dy {tuple(dy.shape)} does not match input {tuple(x.shape)}, kernel "
                         f"{tuple(kernel_size)}, stride {tuple(stride)}, padding {tuple(padding)}, dilation "
                         f"{tuple(dilation)}")
    flat = c < FLAT_BELOW and groups == 1
    cp = _row_channels(c, x.dtype) if flat else 1  # flat: x and the workspace padded to cp channels
    x_st = _nhwc(x)
    if flat and cp != c:
        x_st = F.pad(x_st, (0, cp - c))
    m = n * p * q
    kg = k // groups
    cols = triton.cdiv(r * s * cp, 128) if flat else r * s * triton.cdiv(cg, 128)
    split = _wgrad_split(m, groups * triton.cdiv(kg, 128) * cols, x.device)
    chunk = triton.cdiv(triton.cdiv(m, split), 128) * 128  # a multiple of every BLOCK_K
    split = triton.cdiv(m, chunk)
    ws = _alloc((split, k, r, s, cp if flat else cg), torch.float32, x.device)
    a = amean = alpha = beta = gamma = scale = shift = ws
    if dbn is not None:
        a, amean, alpha, beta, gamma = dbn
        _same_shape("conv_wgrad: dbn's a", a, dy)
        _vectors("conv_wgrad's dbn", k, amean, alpha, beta, gamma)
        a = _nhwc(a)
    if in_affine is not None:
        scale, shift = in_affine
        _vectors("conv_wgrad's in_affine", c, scale, shift)

    def grid(meta):
        cols = triton.cdiv(r * s * cp, meta["BLOCK_N"]) if flat else r * s * triton.cdiv(cg, meta["BLOCK_N"])
        return (groups * triton.cdiv(kg, meta["BLOCK_M"]), cols, split)

    dy_st = _nhwc(dy)
    _launch(
        conv_wgrad_kernel, grid,
        dict(dy_ptr=dy_st, x_ptr=x_st, ws_ptr=ws, a_ptr=a, amean_ptr=amean, alpha_ptr=alpha, beta_ptr=beta,
             gamma_ptr=gamma, in_scale_ptr=scale, in_shift_ptr=shift,
             N=n, H=h, W=wd, C=cg, K=kg, P=p, Q=q, stride_h=stride[0], stride_w=stride[1], pad_h=padding[0],
             pad_w=padding[1], dil_h=dilation[0], dil_w=dilation[1], G=groups, chunk=chunk, XH=xh, XW=xw,
             R=r, S=s, FLAT=flat, CP=cp, GROUPED=groups > 1, DBN=dbn is not None, POOL=avg_pool,
             PROLOGUE=in_affine is not None,
             UPCAST=_upcast(x.dtype), PRECISION=_precision(x.dtype)),
        (kg, r * s * cp if flat else cg, chunk), (256, 256, 256),
        reads=[dy_st, x_st, *(dbn if dbn is not None else ()), *(in_affine if in_affine is not None else ())],
        writes=[ws], flops=conv_flops(n, k, cg, r, s, p, q),
    )
    work = WgradWorkspace(ws, cg, x.dtype)
    if defer:
        return work
    return work.direct() if work.direct() is not None else wgrad_reduce(work)


class WgradWorkspace(NamedTuple):
    """A wgrad's fp32 workspace [split, K, R, S, CP] (one partial per chunk of the reduction, channels padded to
    CP ≥ c) and what dW [K, c, R, S] is made of it: the chunks summed, the padding dropped, cast to ``dtype``."""

    ws: torch.Tensor
    c: int
    dtype: torch.dtype

    def direct(self) -> Optional[torch.Tensor]:
        """dW when the workspace is dW already (one chunk, no padding, float32), else None."""
        split, k, r, s, cp = self.ws.shape
        return self.ws[0].permute(0, 3, 1, 2) if split == 1 and cp == self.c and self.dtype == torch.float32 else None

    def output(self) -> torch.Tensor:
        """The buffer dW [K, R, S, c] is reduced into (every element written by the reduction)."""
        k, r, s = self.ws.shape[1:4]
        return _alloc((k, r, s, self.c), self.dtype, self.ws.device)

    def reduce_args(self, dw: torch.Tensor) -> dict:
        return dict(ws_ptr=self.ws, dw_ptr=dw, split=self.ws.shape[0], total=dw.numel(), C=self.c,
                    CP=self.ws.shape[4])


REDUCE_BLOCK = 1024


def wgrad_reduce(work: WgradWorkspace) -> torch.Tensor:
    """dW [K, c, R, S] (channels_last) from a wgrad workspace: the chunks summed, sliced and cast in one launch
    (``bn_finalize.dbn_finalize(reduce=...)`` does it inside the next dBN launch instead). Twin:
    ``wgrad_reduce_reference``."""
    dw = work.output()
    launches.record("wgrad_reduce_kernel", "reduction", [work.ws], [dw])
    if not launches.dry() and dw.numel():
        block = min(REDUCE_BLOCK, triton.next_power_of_2(dw.numel()))
        wgrad_reduce_kernel[(triton.cdiv(dw.numel(), block),)](**work.reduce_args(dw), BLOCK=block)
    return dw.permute(0, 3, 1, 2)


def wgrad_reduce_reference(work: WgradWorkspace) -> torch.Tensor:
    """``wgrad_reduce`` with torch ops (what conv_wgrad ran before: a sum, a slice and a cast)."""
    return work.ws.sum(dim=0)[..., :work.c].contiguous().to(work.dtype).permute(0, 3, 1, 2)
