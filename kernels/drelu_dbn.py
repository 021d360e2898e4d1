"""drelu_dbn_reduce: the start of a block's backward, on NHWC tensors (M = N·H·W rows, C channels innermost).

Per element, with dy the gradient of the block output y, a the pre-BN output of a unit, and that BN's mean / rstd::

    dz = dy·[y > 0]                  (the block's final ReLU; written out, in dy's dtype: a mask keeps it exact)
    Σdz[c], Σdz·x̂[c]                 x̂ = (a − mean)·rstd, rstd = 1/sqrt(var + eps), sums in fp32 per row tile

Without ``y`` the incoming gradient is already dz. A projection shortcut's BN reads the same dz: its Σdz·x̂ is
formed in the same pass (``second``; its Σdz is the main BN's), not in a second launch that reads dz again. With
stochastic depth (``sample_scale`` d, per sample n) the last unit's gradient is d[n]·dz, written as a tensor of its
own beside dz (which the shortcut takes) and summed for its BN; a projection's sums then take dz itself. The
per-tile sums are returned as partials: ``bn_finalize.dbn_finalize`` sums them in the launch that also forms the
dBN coefficients. rstd is formed here from the BN's variance, as the finalize kernels form it (no launch of its
own before the backward's first reduction). Reference twin: ``fused_resnet.backends.reference.drelu_dbn_reduce``
(after the mask).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import launches
from .bn_act import _rows_by_channels
from .conv import TilePartials, _sum_rows, _vectors


@triton.jit
def _sum_dz_xhat(dz, a_ptr, offs, ok, mean_ptr, var_ptr, eps, cols, col_ok, BLOCK_M: tl.constexpr):
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    rstd = tl.math.rsqrt(tl.load(var_ptr + cols, mask=col_ok, other=1.0) + eps)
    xhat = (tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
    return _sum_rows(dz * xhat, BLOCK_M)


@triton.jit
def drelu_dbn_reduce_kernel(
    g_ptr, y_ptr, a_ptr, mean_ptr, var_ptr, dz_ptr, sum_ptr, sumx_ptr,
    a2_ptr, mean2_ptr, var2_ptr, sumx2_ptr,  # SECOND: another BN of the same dz (a projection shortcut's)
    sample_ptr, dzb_ptr, sum2_ptr,  # SAMPLE_SCALE: d [N]; the branch's d·dz; the second BN's own Σdz
    M, C, HW, eps, eps2,
    MASK: tl.constexpr, SECOND: tl.constexpr, SAMPLE_SCALE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    ok = (rows[:, None] < M) & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    g = tl.load(g_ptr + offs, mask=ok, other=0.0)
    if MASK:
        y = tl.load(y_ptr + offs, mask=ok, other=0.0)
        g = tl.where(y > 0, g, 0.0).to(g_ptr.dtype.element_ty)
        tl.store(dz_ptr + offs, g, mask=ok)
    dz = tl.where(ok, g.to(tl.float32), 0.0)
    part = tl.program_id(0).to(tl.int64) * C + cols
    dzb = dz
    if SAMPLE_SCALE:
        d = tl.load(sample_ptr + rows // HW, mask=rows < M, other=0.0).to(tl.float32)
        # rounded to the stored dtype before the sums, as dz is: the BN's sums are of the tensor the convs read
        dzb = (dz * d[:, None]).to(dzb_ptr.dtype.element_ty)
        tl.store(dzb_ptr + offs, dzb, mask=ok)
        dzb = dzb.to(tl.float32)
    tl.store(sum_ptr + part, _sum_rows(dzb, BLOCK_M), mask=col_ok)
    tl.store(sumx_ptr + part, _sum_dz_xhat(dzb, a_ptr, offs, ok, mean_ptr, var_ptr, eps, cols, col_ok, BLOCK_M),
             mask=col_ok)
    if SECOND:  # without stochastic depth Σdz is the same for both BNs: only Σdz·x̂ is the second's own
        if SAMPLE_SCALE:
            tl.store(sum2_ptr + part, _sum_rows(dz, BLOCK_M), mask=col_ok)
        tl.store(sumx2_ptr + part, _sum_dz_xhat(dz, a2_ptr, offs, ok, mean2_ptr, var2_ptr, eps2, cols, col_ok,
                                                BLOCK_M), mask=col_ok)


def drelu_dbn_reduce(
    g: torch.Tensor, a: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
    y: Optional[torch.Tensor] = None, second: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = None,
    sample_scale: Optional[torch.Tensor] = None,
):
    """(dz, partials): dz = g·[y > 0] (g itself without y), channels_last in g's dtype; the per-row-tile fp32 Σdz
    and Σdz·x̂ with x̂ = (a − mean)/sqrt(var + eps). g, a (and y): channels_last 4-D tensors of one shape; mean,
    var: contiguous fp32 [C]. ``second`` = (a', mean', var', eps'): the same sums for another BN that dz flows
    into (a projection shortcut's), in the same pass over dz: (dz, partials, partials'). ``sample_scale`` d
    (contiguous [N]): the sums are of d[n]·dz, and the result (dz, d·dz, partials[, partials'])."""
    others = [("a", a), ("y", y)] + ([("the second a", second[0])] if second is not None else [])
    for name, t in others:
        if t is not None and (t.shape != g.shape or t.device != g.device):
            raise ValueError(f"drelu_dbn_reduce expects {name} with the gradient's shape {tuple(g.shape)}, got "
                             f"{tuple(t.shape)}")
    g2 = _rows_by_channels(g, "the gradient")
    m, c = g2.shape
    _vectors("drelu_dbn_reduce's mean and var", c, mean, var, *(second[1:3] if second is not None else ()))
    if sample_scale is not None and (sample_scale.shape != (g.shape[0],) or not sample_scale.is_contiguous()
                                     or sample_scale.device != g.device):
        raise ValueError(f"drelu_dbn_reduce expects sample_scale as a contiguous [{g.shape[0]}] tensor on "
                         f"{g.device}, got {tuple(sample_scale.shape)} on {sample_scale.device}")
    dz = torch.empty_like(g) if y is not None else g
    dzb = torch.empty_like(g) if sample_scale is not None else None
    block_c = min(64, triton.next_power_of_2(c))
    block_m = max(16, min(1024, 8192 // block_c))
    tiles = triton.cdiv(m, block_m)
    sums = torch.empty((tiles, c), dtype=torch.float32, device=g.device)
    sumx = torch.empty_like(sums)
    sumx2 = torch.empty_like(sums) if second is not None else None
    sum2 = torch.empty_like(sums) if second is not None and sample_scale is not None else None
    out = (dz,) + ((dzb,) if dzb is not None else ()) + (TilePartials(sums, sumx, block_m, m),)
    if second is not None:
        out += (TilePartials(sums if sum2 is None else sum2, sumx2, block_m, m),)
    launches.record("drelu_dbn_reduce_kernel", "reduction",
                    [g, y, a, mean, var, *(second[:3] if second else ()), sample_scale],
                    [dz if y is not None else None, dzb, sums, sumx, sumx2, sum2])
    if launches.dry():
        return out
    a2, mean2, var2, eps2 = second if second is not None else (a, mean, var, 0.0)
    drelu_dbn_reduce_kernel[(tiles, triton.cdiv(c, block_c))](
        g_ptr=g2, y_ptr=_rows_by_channels(y, "y") if y is not None else g2, a_ptr=_rows_by_channels(a, "a"),
        mean_ptr=mean, var_ptr=var, dz_ptr=_rows_by_channels(dz, "dz"), sum_ptr=sums, sumx_ptr=sumx,
        a2_ptr=_rows_by_channels(a2, "the second a"), mean2_ptr=mean2, var2_ptr=var2,
        sumx2_ptr=sumx2 if sumx2 is not None else sumx,
        sample_ptr=mean if sample_scale is None else sample_scale,
        dzb_ptr=_rows_by_channels(dz if dzb is None else dzb, "dz"), sum2_ptr=sums if sum2 is None else sum2,
        M=m, C=c, HW=max(1, g.shape[2] * g.shape[3]) if g.dim() == 4 else 1, eps=float(eps), eps2=float(eps2),
        MASK=y is not None, SECOND=second is not None, SAMPLE_SCALE=sample_scale is not None, BLOCK_M=block_m,
        BLOCK_C=block_c,
    )
    return out
