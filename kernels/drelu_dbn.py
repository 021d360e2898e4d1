"""drelu_dbn_reduce: the start of a block's backward, on NHWC tensors (M = N·H·W rows, C channels innermost).

Per element, with dy the gradient of the block output y, a the pre-BN output of a unit, and that BN's mean / rstd::

    dz = dy·[y > 0]                  (the block's final ReLU; written out, in dy's dtype: a mask keeps it exact)
    Σdz[c], Σdz·x̂[c]                 x̂ = (a − mean)·rstd, sums in fp32 (per row tile, then over tiles)

Without ``y`` the incoming gradient is already dz (a projection shortcut's BN reads the same dz). Reference twin:
``fused_resnet.backends.reference.drelu_dbn_reduce`` (after the mask).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import launches
from .bn_act import _rows_by_channels
from .conv import _sum_rows, _vectors


@triton.jit
def drelu_dbn_reduce_kernel(
    g_ptr, y_ptr, a_ptr, mean_ptr, rstd_ptr, dz_ptr, sum_ptr, sumx_ptr,
    M, C,
    MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
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
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=col_ok, other=0.0)
    xhat = (tl.load(a_ptr + offs, mask=ok, other=0.0).to(tl.float32) - mean[None, :]) * rstd[None, :]
    dz = tl.where(ok, g.to(tl.float32), 0.0)
    part = tl.program_id(0).to(tl.int64) * C + cols
    tl.store(sum_ptr + part, _sum_rows(dz, BLOCK_M), mask=col_ok)
    tl.store(sumx_ptr + part, _sum_rows(dz * xhat, BLOCK_M), mask=col_ok)


def drelu_dbn_reduce(
    g: torch.Tensor, a: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, y: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, Σdz, Σdz·x̂): dz = g·[y > 0] (g itself without y), channels_last in g's dtype; sums fp32 [C].
    g, a (and y): channels_last 4-D tensors of one shape; mean, rstd: contiguous fp32 [C]."""
    for name, t in (("a", a), ("y", y)):
        if t is not None and (t.shape != g.shape or t.device != g.device):
            raise ValueError(f"drelu_dbn_reduce expects {name} with the gradient's shape {tuple(g.shape)}, got "
                             f"{tuple(t.shape)}")
    g2 = _rows_by_channels(g, "the gradient")
    m, c = g2.shape
    _vectors("drelu_dbn_reduce's mean and rstd", c, mean, rstd)
    dz = torch.empty_like(g) if y is not None else g
    block_c = min(64, triton.next_power_of_2(c))
    block_m = max(16, min(1024, 8192 // block_c))
    tiles = triton.cdiv(m, block_m)
    sums = torch.empty((tiles, c), dtype=torch.float32, device=g.device)
    sumx = torch.empty_like(sums)
    launches.record("drelu_dbn_reduce_kernel", "reduction", [g, y, a, mean, rstd],
                    [dz if y is not None else None, sums, sumx])
    if launches.dry():
        return dz, sums.sum(0), sumx.sum(0)
    drelu_dbn_reduce_kernel[(tiles, triton.cdiv(c, block_c))](
        g_ptr=g2, y_ptr=_rows_by_channels(y, "y") if y is not None else g2, a_ptr=_rows_by_channels(a, "a"),
        mean_ptr=mean, rstd_ptr=rstd, dz_ptr=_rows_by_channels(dz, "dz"), sum_ptr=sums, sumx_ptr=sumx, M=m, C=c,
        MASK=y is not None, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return dz, sums.sum(0), sumx.sum(0)
