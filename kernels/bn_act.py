"""bn_act: BN-apply (scale-shift) + optional residual add + optional ReLU, on NHWC activations.

Forward, per element of a (M = N·H·W rows, C channels innermost) with per-channel fp32 scale s and shift t::

    y[m, c] = relu(a[m, c]·s[c] + t[c] + r[m, c])

computed in fp32, stored in a's dtype. Its backward (dz = dy·[y > 0], then the dBN reduction) belongs to the
drelu_dbn_reduce family; this kernel has none of its own. Reference twin: ``fused_resnet.reference.bn_act``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def bn_act_kernel(
    a_ptr,  # [M, C] activations (channels innermost), any float dtype
    scale_ptr,  # [C] fp32 per-channel scale s = γ·rstd
    shift_ptr,  # [C] fp32 per-channel shift t = β − mean·s
    res_ptr,  # [M, C] residual in a's dtype (read only when HAS_RES)
    y_ptr,  # [M, C] output in a's dtype
    M,
    C,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # 2-D tiles: rows over N·H·W, columns over channels, so scale/shift are loaded once per tile.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    mask = (rows[:, None] < M) & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    s = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    t = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    z = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32) * s[None, :] + t[None, :]
    if HAS_RES:
        z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        z = tl.maximum(z, 0.0)
    tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=mask)


def _rows_by_channels(t: torch.Tensor, what: str) -> torch.Tensor:
    """View a channels_last 4-D tensor (or a contiguous 2-D [M, C] one) as [M, C] without copying."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    if t.dim() == 2 and t.is_contiguous():
        return t
    raise ValueError(
        f"bn_act expects {what} as a channels_last (NHWC) 4-D tensor or a contiguous [M, C] tensor, got shape "
        f"{tuple(t.shape)} with strides {t.stride()}"
    )


def bn_act(
    a: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: Optional[torch.Tensor] = None,
    relu: bool = True, out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """relu(a·scale + shift [+ residual]) per channel; a channels_last (or [M, C]), scale/shift fp32 [C].
    ``out`` (optional) receives the result: same shape, dtype and layout as a."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"bn_act expects float32, float16 or bfloat16 activations, got {a.dtype}")
    a2 = _rows_by_channels(a, "the activations")
    m, c = a2.shape
    for name, v in (("scale", scale), ("shift", shift)):
        if v.dtype != torch.float32 or v.shape != (c,) or not v.is_contiguous() or v.device != a.device:
            raise ValueError(
                f"bn_act expects {name} as a contiguous float32 tensor of shape ({c},) on {a.device}, got "
                f"{v.dtype} {tuple(v.shape)} on {v.device}"
            )
    if residual is not None and (residual.shape != a.shape or residual.dtype != a.dtype):
        raise ValueError(
            f"bn_act expects the residual with the activations' shape {tuple(a.shape)} and dtype {a.dtype}, got "
            f"{tuple(residual.shape)} {residual.dtype}"
        )
    r2 = _rows_by_channels(residual, "the residual") if residual is not None else a2
    if out is not None and (out.shape != a.shape or out.dtype != a.dtype or out.device != a.device):
        raise ValueError(f"bn_act expects out with shape {tuple(a.shape)}, dtype {a.dtype} on {a.device}")
    y = torch.empty_like(a) if out is None else out
    y2 = _rows_by_channels(y, "the output")
    block_c = min(64, triton.next_power_of_2(c))
    block_m = max(1, 4096 // block_c)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    bn_act_kernel[grid](a2, scale, shift, r2, y2, m, c, HAS_RES=residual is not None, RELU=relu,
                        BLOCK_M=block_m, BLOCK_C=block_c)
    return y
