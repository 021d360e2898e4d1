"""bn_finalize: a BN's per-channel vector arithmetic between the big kernels, one small launch per BN and step.

The conv epilogues and the dBN reduction leave per-row-tile partials ([row tiles, C] fp32, ``TilePartials``);
what a BN then needs per channel is a few flops on C values. Done with torch ops it was ~20 launches per BN and
direction (merge, where, sum, rsqrt, casts), each a real GPU launch and ~20–40 µs of host time: more launches than
eager PyTorch's whole step. Here each job is one kernel, fp32 math, no host read (the row-tile size the conv ran
with is read on the device):

* ``bn_finalize`` (forward): merge the conv epilogue's per-tile mean / M2 partials exactly (Chan's parallel
  formula, as ``conv.merge_tile_stats``), or take given statistics (running ones, a process group's), and write
  mean, biased variance, s = γ·rstd and t = β − mean·s (γ, β read in their own dtype).
* ``dbn_finalize`` (backward): sum the per-tile Σdz, Σdz·x̂ partials, write dγ, dβ in the parameters' dtypes and
  the dBN coefficients the dgrad / wgrad prologues read, da = α·dz + β·(a − mean) + γ with α = s,
  β = −s·rstd·Σdz·x̂/M, γ = −s·Σdz/M (batch statistics; β = γ = 0 with fixed ones); in the same launch, the
  previous unit's s, t, rstd, which the dgrad that runs next needs for its ReLU-mask epilogue.
* ``bn_running_update``: torch's running-statistics update, num_batches_tracked included, in one launch.

Reference twins (the torch code these replace): ``conv.merge_tile_stats``, ``reference.scale_shift``,
``reference.bn_running_update``, and ``dbn_finalize_reference`` below.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import launches
from .conv import (INTERPRET, REDUCE_BLOCK, TilePartials, WgradWorkspace, _bound, _reduce_split, _sum_rows,
                   sum_tile_partials)


def _block_c(c: int) -> int:
    # A program owns its channels' every partial row (the merge's order is fixed, no atomics), so a narrow BN
    # gets narrower blocks for more programs: 16 channels (64-byte row segments) up to 256 channels, then 32.
    return 16 if c <= 256 else 32


def _block_rows(rows: int) -> int:
    # The interpreter pays per loop step, not per element: fewer, larger steps there. Compiled: 128 rows per step,
    # 8–16 KB of loads per partial buffer and program in each.
    return triton.next_power_of_2(max(min(rows, 1024), 16)) if INTERPRET else 128


def _grid(c: int) -> Tuple[int]:
    return (triton.cdiv(c, _block_c(c)),)


@triton.jit
def _tiles_run(tile_ptr, tile, m, rows, TILE_PTR: tl.constexpr):
    """(rows per tile, tiles that ran) of a group: cdiv(m, tile), never beyond the buffer (a tile size read from
    a buffer no kernel wrote, e.g. a traced launch, bounds the work and the reads)."""
    if TILE_PTR:
        tile = tl.load(tile_ptr)
    tile = tl.minimum(tl.maximum(tile, 1), tl.maximum(m, 1))
    return tile, tl.minimum(tl.cdiv(m, tile), rows)


@triton.jit
def _scale_shift(gamma_ptr, beta_ptr, mean, var, eps, cols, ok):
    """(s, t, rstd) of a BN with these statistics, as reference.scale_shift: rstd = 1/sqrt(var + eps), s = γ·rstd,
    t = β − mean·s; γ, β loaded in their own dtype."""
    rstd = tl.math.rsqrt(var + eps)
    s = tl.load(gamma_ptr + cols, mask=ok, other=0.0).to(tl.float32) * rstd
    t = tl.load(beta_ptr + cols, mask=ok, other=0.0).to(tl.float32) - mean * s
    return s, t, rstd


# Sizes that follow the batch are not specialised on (as the conv kernels' sizes): a new batch size must not
# compile a new variant, and a size of 1 must not turn into a constant that the arithmetic below cannot take.
@triton.jit(do_not_specialize=["rows", "M"])
def bn_finalize_kernel(
    mean_part_ptr, m2_part_ptr, tile_ptr,  # PARTIALS: [rows, C] per-tile mean and M2; the tiles' BLOCK_M
    mean_in_ptr, var_in_ptr,  # not PARTIALS: the statistics to use, any float dtype
    gamma_ptr, beta_ptr,  # AFFINE: γ, β, their own dtype
    mean_ptr, var_ptr, scale_ptr, shift_ptr,  # fp32 [C]: STATS_OUT mean, biased variance; AFFINE s, t
    rows, M, C, eps,
    PARTIALS: tl.constexpr, STATS_OUT: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if PARTIALS:
        # Chan's merge, in merge_tile_stats' order: mean = Σ n_i·mean_i / M, then M2 = Σ M2_i + Σ n_i·(mean_i −
        # mean)², tile i holding n_i = clamp(M − i·tile, 0, tile) rows.
        tile, tiles = _tiles_run(tile_ptr, 0, M, rows, True)
        total = M * 1.0
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for r0 in range(0, _bound(tiles), BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            ok = (r < tiles)[:, None] & col_ok[None, :]
            n = tl.minimum(tl.maximum(M - r.to(tl.int64) * tile, 0), tile).to(tl.float32)
            mu = tl.load(mean_part_ptr + r[:, None].to(tl.int64) * C + cols[None, :], mask=ok, other=0.0)
            acc += _sum_rows(tl.where(ok, mu * n[:, None], 0.0), BLOCK_R)
        mean = acc / total
        m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        spread = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for r0 in range(0, _bound(tiles), BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            ok = (r < tiles)[:, None] & col_ok[None, :]
            n = tl.minimum(tl.maximum(M - r.to(tl.int64) * tile, 0), tile).to(tl.float32)
            off = r[:, None].to(tl.int64) * C + cols[None, :]
            dev = tl.where(ok, tl.load(mean_part_ptr + off, mask=ok, other=0.0) - mean[None, :], 0.0)
            m2 += _sum_rows(tl.where(ok, tl.load(m2_part_ptr + off, mask=ok, other=0.0), 0.0), BLOCK_R)
            spread += _sum_rows(dev * dev * n[:, None], BLOCK_R)
        var = (m2 + spread) / total
    else:
        mean = tl.load(mean_in_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        var = tl.load(var_in_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if STATS_OUT:
        tl.store(mean_ptr + cols, mean, mask=col_ok)
        tl.store(var_ptr + cols, var, mask=col_ok)
    if AFFINE:
        s, t, _ = _scale_shift(gamma_ptr, beta_ptr, mean, var, eps, cols, col_ok)
        tl.store(scale_ptr + cols, s, mask=col_ok)
        tl.store(shift_ptr + cols, t, mask=col_ok)


def _fp32(c: int, like: Tensor) -> Tensor:
    return torch.empty((c,), dtype=torch.float32, device=like.device)


def _check_partials(p: TilePartials, what: str) -> int:
    c = p.first.shape[1]
    for v in (p.first, p.second):
        if v.dtype != torch.float32 or v.dim() != 2 or v.shape != p.first.shape or not v.is_contiguous():
            raise ValueError(f"{what} expects two contiguous float32 [rows, C] partial buffers of one shape, got "
                             f"{v.dtype} {tuple(v.shape)}")
    if p.first.shape[0] % p.groups:
        raise ValueError(f"{what}: {p.first.shape[0]} partial rows do not split into {p.groups} groups")
    if isinstance(p.tile, Tensor) and (p.tile.dtype != torch.int32 or p.tile.numel() != 1):
        raise ValueError(f"{what} expects the tile size as a 1-element int32 tensor, got {p.tile.dtype} "
                         f"{tuple(p.tile.shape)}")
    return c


def _vector(what: str, v: Tensor, c: int, device) -> None:
    if v.shape != (c,) or not v.is_contiguous() or not v.dtype.is_floating_point or v.device != device:
        raise ValueError(f"{what} expects a contiguous floating-point vector of shape ({c},) on {device}, got "
                         f"{v.dtype} {tuple(v.shape)} on {v.device}")


def bn_finalize(
    gamma: Optional[Tensor], beta: Optional[Tensor], eps: float, *, partials: Optional[TilePartials] = None,
    stats: Optional[Tuple[Tensor, Tensor]] = None, stats_out: bool = True,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(mean, var, s, t), fp32 [C], in one launch. The statistics: merged from a conv's per-tile ``partials``
    (mean, M2), or the given ``stats`` (mean, var; any float dtype, e.g. running statistics), written out as fp32
    copies unless ``stats_out`` is False (then returned as given). s, t: None without γ (``gamma`` None: the
    statistics only)."""
    if (partials is None) == (stats is None):
        raise ValueError("bn_finalize takes either partials or stats")
    if partials is not None:
        c = _check_partials(partials, "bn_finalize")
        device = partials.first.device
        if partials.groups != 1 or not isinstance(partials.tile, Tensor):
            raise ValueError("bn_finalize merges one group of partials whose tile size a kernel wrote")
        stats_out = True
    else:
        c = stats[0].shape[0]
        device = stats[0].device
        for name, v in zip(("mean", "var"), stats):
            _vector(f"bn_finalize's {name}", v, c, device)
    affine = gamma is not None
    if affine:
        for name, v in (("gamma", gamma), ("beta", beta)):
            _vector(f"bn_finalize's {name}", v, c, device)
    like = partials.first if partials is not None else stats[0]
    mean, var = (_fp32(c, like), _fp32(c, like)) if stats_out else stats
    s, t = (_fp32(c, like), _fp32(c, like)) if affine else (None, None)
    reads = [*(partials[:3] if partials is not None else ()), *(stats if stats is not None else ()), gamma, beta]
    launches.record("bn_finalize_kernel", "reduction" if partials is not None else "elementwise", reads,
                    [*((mean, var) if stats_out else ()), s, t])
    if launches.dry() or c == 0:
        return mean, var, s, t
    first = partials.first if partials is not None else like
    bn_finalize_kernel[_grid(c)](
        mean_part_ptr=first, m2_part_ptr=partials.second if partials is not None else first,
        tile_ptr=partials.tile if partials is not None else first,
        mean_in_ptr=stats[0] if stats is not None else first, var_in_ptr=stats[1] if stats is not None else first,
        gamma_ptr=gamma if affine else first, beta_ptr=beta if affine else first,
        mean_ptr=mean, var_ptr=var, scale_ptr=s if affine else mean, shift_ptr=t if affine else mean,
        rows=partials.rows if partials is not None else 0, M=partials.m if partials is not None else 0, C=c,
        eps=float(eps), PARTIALS=partials is not None, STATS_OUT=stats_out, AFFINE=affine,
        BLOCK_R=_block_rows(partials.rows if partials is not None else 1), BLOCK_C=_block_c(c),
    )
    return mean, var, s, t


@triton.jit
def _sum_partials(part_ptr, cols, col_ok, C, groups, rows, tiles, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel sum of the rows that tiles wrote: the first ``tiles`` rows of each group of ``rows``."""
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for g in range(0, _bound(groups)):
        for r0 in range(0, _bound(tiles), BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            ok = (r < tiles)[:, None] & col_ok[None, :]
            off = (g * rows + r[:, None]).to(tl.int64) * C + cols[None, :]
            acc += _sum_rows(tl.where(ok, tl.load(part_ptr + off, mask=ok, other=0.0), 0.0), BLOCK_R)
    return acc


@triton.jit(do_not_specialize=["groups", "rows", "m", "tile", "split"])
def dbn_finalize_kernel(
    sum_part_ptr, sumx_part_ptr, tile_ptr,  # PARTIALS: [groups·rows, C] per (group, row tile) Σdz, Σdz·x̂
    sum_in_ptr, sumx_in_ptr,  # not PARTIALS: [C] fp32 Σdz, Σdz·x̂ (a process group's)
    gamma_ptr, var_ptr, count_ptr,  # this BN's γ (own dtype) and variance; COUNT_PTR: its element count (fp64)
    dgamma_ptr, dbeta_ptr,  # GRADS: Σdz·x̂ and Σdz in γ's and β's dtypes
    sum_ptr, sumx_ptr, rstd_ptr,  # SUMS_OUT: fp32 Σdz, Σdz·x̂ and rstd, for a process group's reduction
    alpha_ptr, coef_beta_ptr, coef_gamma_ptr,  # COEFFS: fp32 α, β, γ of da = α·dz + β·(a − mean) + γ
    prev_gamma_ptr, prev_beta_ptr, prev_mean_ptr, prev_var_ptr,  # PREV: the previous unit's BN ...
    prev_scale_ptr, prev_shift_ptr, prev_rstd_ptr,  # ... and its fp32 s, t, rstd
    ws_ptr, dw_ptr,  # REDUCE: a wgrad's workspace, reduced into dW by the programs after the first ``jobs``
    groups, rows, m, tile, C, eps, count, PC, prev_eps, jobs, split, total, WC, WCP,
    PARTIALS: tl.constexpr, TILE_PTR: tl.constexpr, GRADS: tl.constexpr, SUMS_OUT: tl.constexpr,
    COEFFS: tl.constexpr, BATCH_STATS: tl.constexpr, COUNT_PTR: tl.constexpr, PREV: tl.constexpr,
    REDUCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid = tl.program_id(0)
    if REDUCE:  # a job of its own in the same launch: the backward's previous wgrad's split reduction
        if pid >= jobs:
            _reduce_split(ws_ptr, dw_ptr, pid - jobs, split, total, WC, WCP, BLOCK_W)
    if pid < jobs:
        _dbn_job(pid, sum_part_ptr, sumx_part_ptr, tile_ptr, sum_in_ptr, sumx_in_ptr, gamma_ptr, var_ptr, count_ptr,
                 dgamma_ptr, dbeta_ptr, sum_ptr, sumx_ptr, rstd_ptr, alpha_ptr, coef_beta_ptr, coef_gamma_ptr,
                 prev_gamma_ptr, prev_beta_ptr, prev_mean_ptr, prev_var_ptr, prev_scale_ptr, prev_shift_ptr,
                 prev_rstd_ptr, groups, rows, m, tile, C, eps, count, PC, prev_eps, PARTIALS, TILE_PTR, GRADS,
                 SUMS_OUT, COEFFS, BATCH_STATS, COUNT_PTR, PREV, BLOCK_R, BLOCK_C)


@triton.jit
def _dbn_job(
    pid, sum_part_ptr, sumx_part_ptr, tile_ptr, sum_in_ptr, sumx_in_ptr, gamma_ptr, var_ptr, count_ptr,
    dgamma_ptr, dbeta_ptr, sum_ptr, sumx_ptr, rstd_ptr, alpha_ptr, coef_beta_ptr, coef_gamma_ptr,
    prev_gamma_ptr, prev_beta_ptr, prev_mean_ptr, prev_var_ptr, prev_scale_ptr, prev_shift_ptr, prev_rstd_ptr,
    groups, rows, m, tile, C, eps, count, PC, prev_eps,
    PARTIALS: tl.constexpr, TILE_PTR: tl.constexpr, GRADS: tl.constexpr, SUMS_OUT: tl.constexpr,
    COEFFS: tl.constexpr, BATCH_STATS: tl.constexpr, COUNT_PTR: tl.constexpr, PREV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    if PARTIALS:
        _, tiles = _tiles_run(tile_ptr, tile, m, rows, TILE_PTR)
        sum_dz = _sum_partials(sum_part_ptr, cols, col_ok, C, groups, rows, tiles, BLOCK_R, BLOCK_C)
        sum_dzx = _sum_partials(sumx_part_ptr, cols, col_ok, C, groups, rows, tiles, BLOCK_R, BLOCK_C)
    else:
        sum_dz = tl.load(sum_in_ptr + cols, mask=col_ok, other=0.0)
        sum_dzx = tl.load(sumx_in_ptr + cols, mask=col_ok, other=0.0)
    if GRADS:  # this rank's sums, as torch's SyncBatchNorm gives dγ, dβ
        tl.store(dgamma_ptr + cols, sum_dzx.to(dgamma_ptr.dtype.element_ty), mask=col_ok)
        tl.store(dbeta_ptr + cols, sum_dz.to(dbeta_ptr.dtype.element_ty), mask=col_ok)
    if SUMS_OUT or COEFFS:
        rstd = tl.math.rsqrt(tl.load(var_ptr + cols, mask=col_ok, other=1.0) + eps)
    if SUMS_OUT:
        tl.store(sum_ptr + cols, sum_dz, mask=col_ok)
        tl.store(sumx_ptr + cols, sum_dzx, mask=col_ok)
        tl.store(rstd_ptr + cols, rstd, mask=col_ok)
    if COEFFS:
        s = tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32) * rstd
        tl.store(alpha_ptr + cols, s, mask=col_ok)
        if BATCH_STATS:  # in reference.dbn_apply's order: −s·rstd·Σdz·x̂ / M and −s·Σdz / M
            if COUNT_PTR:
                n = tl.load(count_ptr).to(tl.float32)
            else:
                n = count
            tl.store(coef_beta_ptr + cols, -s * rstd * sum_dzx / n, mask=col_ok)
            tl.store(coef_gamma_ptr + cols, -s * sum_dz / n, mask=col_ok)
        else:  # fixed (running) statistics: da = s·dz
            tl.store(coef_beta_ptr + cols, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=col_ok)
            tl.store(coef_gamma_ptr + cols, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=col_ok)
    if PREV:
        prev_ok = cols < PC
        mean = tl.load(prev_mean_ptr + cols, mask=prev_ok, other=0.0)
        var = tl.load(prev_var_ptr + cols, mask=prev_ok, other=0.0)
        ps, pt, prstd = _scale_shift(prev_gamma_ptr, prev_beta_ptr, mean, var, prev_eps, cols, prev_ok)
        tl.store(prev_scale_ptr + cols, ps, mask=prev_ok)
        tl.store(prev_shift_ptr + cols, pt, mask=prev_ok)
        tl.store(prev_rstd_ptr + cols, prstd, mask=prev_ok)


class Dbn(NamedTuple):
    """What ``dbn_finalize`` wrote (None where not asked for): dγ, dβ; the coefficients (α, β, γ); fp32 Σdz,
    Σdz·x̂ and rstd (``sums_out``); the previous unit's (s, t, rstd) (``prev``); dW reduced from ``reduce``
    ([K, C, R, S], channels_last)."""

    dgamma: Optional[Tensor]
    dbeta: Optional[Tensor]
    coeffs: Optional[Tuple[Tensor, Tensor, Tensor]]
    sums: Optional[Tuple[Tensor, Tensor, Tensor]]
    prev: Optional[Tuple[Tensor, Tensor, Tensor]]
    dw: Optional[Tensor] = None


def dbn_finalize(
    sums: Union[TilePartials, Tuple[Tensor, Tensor]], gamma: Tensor, beta: Tensor, var: Tensor, eps: float,
    count: Union[int, Tensor], *, batch_stats: bool = True, grads: bool = True, coeffs: bool = True,
    sums_out: bool = False, prev: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, float]] = None,
    reduce: Optional[WgradWorkspace] = None,
) -> Dbn:
    """One BN's backward vectors in one launch. ``sums``: per-tile partials of Σdz, Σdz·x̂ (a dgrad epilogue's or
    drelu_dbn_reduce's), or the fp32 sums themselves. ``gamma``, ``beta``: the BN's parameters (``grads``: dγ, dβ
    are written in their dtypes; β is read for nothing else); ``var``: fp32 statistics it normalised with;
    ``count``: elements per channel behind them (an int, or a 0-d float64 tensor on the device: a process
    group's). ``coeffs``: α = s and, with ``batch_stats``, β = −s·rstd·Σdz·x̂/count, γ = −s·Σdz/count (else 0).
    ``sums_out``: fp32 Σdz, Σdz·x̂ and rstd (what a process group reduces). ``prev`` = (γ, β, mean, var, eps) of
    the previous unit: its s, t, rstd too. ``reduce``: a wgrad's workspace, reduced into dW by further programs
    of the same launch (the backward's previous wgrad: one launch fewer per unit than reducing it alone)."""
    partial = isinstance(sums, TilePartials)
    if partial:
        c = _check_partials(sums, "dbn_finalize")
        like = sums.first
    else:
        like = sums[0]
        c = like.shape[0]
        for v in sums:
            if v.dtype != torch.float32 or v.shape != (c,) or not v.is_contiguous():
                raise ValueError(f"dbn_finalize expects the sums as contiguous float32 [{c}] vectors, got {v.dtype} "
                                 f"{tuple(v.shape)}")
    device = like.device
    for name, v in (("gamma", gamma), ("beta", beta), ("var", var)):
        _vector(f"dbn_finalize's {name}", v, c, device)
    if var.dtype != torch.float32:
        raise ValueError(f"dbn_finalize expects the variance in float32, got {var.dtype}")
    count_ptr = isinstance(count, Tensor)
    if count_ptr and (count.numel() != 1 or count.dtype != torch.float64):
        raise ValueError(f"dbn_finalize expects a tensor count as one float64 element, got {count.dtype} "
                         f"{tuple(count.shape)}")
    pc = 0
    if prev is not None:
        pc = prev[2].shape[0]
        for name, v in zip(("gamma", "beta", "mean", "var"), prev[:4]):
            _vector(f"dbn_finalize's previous {name}", v, pc, device)
        if prev[2].dtype != torch.float32 or prev[3].dtype != torch.float32:
            raise ValueError("dbn_finalize expects the previous unit's statistics in float32")
    dgamma = torch.empty((c,), dtype=gamma.dtype, device=device) if grads else None
    dbeta = torch.empty((c,), dtype=beta.dtype, device=device) if grads else None
    co = tuple(_fp32(c, like) for _ in range(3)) if coeffs else None
    so = tuple(_fp32(c, like) for _ in range(3)) if sums_out else None
    po = tuple(_fp32(pc, like) for _ in range(3)) if prev is not None else None
    tile_t = partial and isinstance(sums.tile, Tensor)
    dw = reduce.output() if reduce is not None else None
    launches.record(
        "dbn_finalize_kernel", "reduction" if partial or reduce is not None else "elementwise",
        [*(sums[:2] if partial else sums), sums.tile if tile_t else None, gamma if coeffs else None,
         var if coeffs or sums_out else None, count if count_ptr and coeffs and batch_stats else None,
         *(prev[:4] if prev is not None else ()), reduce.ws if reduce is not None else None],
        [dgamma, dbeta, *(co or ()), *(so or ()), *(po or ()), dw])
    out = Dbn(dgamma, dbeta, co, so, po, dw.permute(0, 3, 1, 2) if dw is not None else None)
    jobs = _grid(max(c, pc))[0]
    block_w = min(REDUCE_BLOCK, triton.next_power_of_2(max(dw.numel(), 1))) if dw is not None else 1
    grid = jobs + (triton.cdiv(dw.numel(), block_w) if dw is not None else 0)
    if launches.dry() or grid == 0:
        return out
    pg, pb, pm, pv, peps = prev if prev is not None else (like,) * 4 + (0.0,)
    reduce_args = reduce.reduce_args(dw) if reduce is not None else dict(ws_ptr=like, dw_ptr=like, split=0, total=0,
                                                                            C=1, CP=1)
    reduce_args = {("W" + k if k in ("C", "CP") else k): v for k, v in reduce_args.items()}
    dbn_finalize_kernel[(grid,)](
        sum_part_ptr=sums[0], sumx_part_ptr=sums[1], tile_ptr=sums.tile if tile_t else like,
        sum_in_ptr=sums[0], sumx_in_ptr=sums[1], gamma_ptr=gamma, var_ptr=var, count_ptr=count if count_ptr else like,
        dgamma_ptr=dgamma if grads else like, dbeta_ptr=dbeta if grads else like,
        sum_ptr=so[0] if so else like, sumx_ptr=so[1] if so else like, rstd_ptr=so[2] if so else like,
        alpha_ptr=co[0] if co else like, coef_beta_ptr=co[1] if co else like, coef_gamma_ptr=co[2] if co else like,
        prev_gamma_ptr=pg, prev_beta_ptr=pb, prev_mean_ptr=pm, prev_var_ptr=pv,
        prev_scale_ptr=po[0] if po else like, prev_shift_ptr=po[1] if po else like,
        prev_rstd_ptr=po[2] if po else like,
        groups=sums.groups if partial else 1, rows=sums.rows if partial else 0, m=sums.m if partial else 0,
        tile=0 if tile_t or not partial else int(sums.tile), C=c, eps=float(eps),
        count=0.0 if count_ptr else float(count), PC=pc, prev_eps=float(peps),
        PARTIALS=partial, TILE_PTR=tile_t, GRADS=grads, SUMS_OUT=sums_out, COEFFS=coeffs,
        BATCH_STATS=batch_stats, COUNT_PTR=count_ptr, PREV=prev is not None, jobs=jobs, **reduce_args,
        REDUCE=reduce is not None, BLOCK_R=_block_rows(sums.rows if partial else 1), BLOCK_C=_block_c(max(c, pc)),
        BLOCK_W=block_w,
    )
    return out


def dbn_finalize_reference(
    sums: Union[TilePartials, Tuple[Tensor, Tensor]], gamma: Tensor, beta: Tensor, var: Tensor, eps: float,
    count: Union[int, Tensor], *, batch_stats: bool = True,
    prev: Optional[Tuple[Tensor, Tensor, Tensor, Tensor, float]] = None,
) -> Dbn:
    """``dbn_finalize``'s torch twin (the torch ops the backend ran before), every output asked for by default
    and ``prev``, computed in var's dtype (float64 in, float64 out)."""
    from ..backends import reference

    sum_dz, sum_dzx = sum_tile_partials(sums) if isinstance(sums, TilePartials) else sums
    rstd = torch.rsqrt(var + eps)
    s = gamma.to(var.dtype) * rstd
    if batch_stats:
        co = (s, -s * rstd * sum_dzx / count, -s * sum_dz / count)
    else:
        co = (s, torch.zeros_like(s), torch.zeros_like(s))
    po = reference.scale_shift(*prev) if prev is not None else None
    return Dbn(sum_dzx.to(gamma.dtype), sum_dz.to(beta.dtype), co, (sum_dz, sum_dzx, rstd), po)


@triton.jit
def bn_running_update_kernel(
    rmean_ptr, rvar_ptr, nbt_ptr, mean_ptr, var_ptr, count_ptr,
    C, keep, take, ratio,
    TRACKED: tl.constexpr, CUMULATIVE: tl.constexpr, COUNT_PTR: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program: num_batches_tracked is read, incremented and (cumulative average) turned into the factor
    # before any channel is updated, with no other program to race with.
    if TRACKED:
        nbt = tl.load(nbt_ptr) + 1
        tl.store(nbt_ptr, nbt)
        if CUMULATIVE:  # momentum=None: factor 1/num_batches_tracked, in fp32 as torch
            take = 1.0 / nbt.to(tl.float32)
            keep = 1.0 - take
    if COUNT_PTR:  # a process group's count (float64): M/(M − 1) in float64, then fp32 as torch's 0-d tensor op
        n = tl.load(count_ptr)
        ratio = (n / (n - 1.0)).to(tl.float32)
    for c0 in range(0, _bound(C), BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        ok = cols < C
        rm = tl.load(rmean_ptr + cols, mask=ok, other=0.0)
        rv = tl.load(rvar_ptr + cols, mask=ok, other=0.0)
        mean = tl.load(mean_ptr + cols, mask=ok, other=0.0)
        var = tl.load(var_ptr + cols, mask=ok, other=0.0)
        tl.store(rmean_ptr + cols, (rm.to(tl.float32) * keep + mean * take).to(rm.dtype), mask=ok)
        tl.store(rvar_ptr + cols, (rv.to(tl.float32) * keep + var * ratio * take).to(rv.dtype), mask=ok)


def bn_running_update(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
    count: Union[int, Tensor], momentum: Optional[float],
) -> None:
    """reference.bn_running_update in one launch (its twin): num_batches_tracked += 1; running statistics moved
    towards mean and the unbiased variance var·M/(M − 1) by momentum (None: the cumulative average, factor
    1/num_batches_tracked). ``count``: M, an int or a process group's 0-d float64 tensor on the device."""
    c = mean.shape[0]
    for name, v in (("mean", mean), ("var", var)):
        if v.dtype != torch.float32 or v.shape != (c,) or not v.is_contiguous():
            raise ValueError(f"bn_running_update expects the batch {name} as a contiguous float32 [{c}] vector, got "
                             f"{v.dtype} {tuple(v.shape)}")
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        _vector(f"bn_running_update's {name}", v, c, mean.device)
    if momentum is None and num_batches_tracked is None:
        raise ValueError("bn_running_update: momentum=None (cumulative average) needs num_batches_tracked")
    count_ptr = isinstance(count, Tensor)
    if count_ptr and (count.numel() != 1 or count.dtype != torch.float64):
        raise ValueError(f"bn_running_update expects a tensor count as one float64 element, got {count.dtype}")
    launches.record("bn_running_update_kernel", "elementwise",
                    [running_mean, running_var, num_batches_tracked, mean, var, count if count_ptr else None],
                    [running_mean, running_var, num_batches_tracked])
    if launches.dry():
        return
    take = 0.0 if momentum is None else float(momentum)
    bn_running_update_kernel[(1,)](
        rmean_ptr=running_mean, rvar_ptr=running_var,
        nbt_ptr=num_batches_tracked if num_batches_tracked is not None else mean, mean_ptr=mean, var_ptr=var,
        count_ptr=count if count_ptr else mean, C=c, keep=1.0 - take, take=take,
        ratio=0.0 if count_ptr else count / (count - 1),
        TRACKED=num_batches_tracked is not None, CUMULATIVE=momentum is None, COUNT_PTR=count_ptr,
        BLOCK_C=min(4096 if INTERPRET else 256, triton.next_power_of_2(max(c, 1))),
    )
