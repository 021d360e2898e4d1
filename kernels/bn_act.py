"""bn_act: BN-apply (scale-shift) + optional residual add + optional ReLU, on NHWC activations.

Forward, per element of a (M = N·H·W rows, C channels innermost) with per-channel fp32 scale s and shift t::

    y[m, c] = relu(a[m, c]·s[c] + t[c] + r[m, c])      (stochastic depth: relu(d[n]·(a·s + t) + r), n = m // (H·W))

where the residual r is a tensor of a's shape, optionally through its own BN (a projection shortcut:
r·s_r + t_r, the "dual affine"), or the option-A shortcut read from the block input x[n, p·s, q·s, c] for
c < C_in and 0 above (never materialised).

computed in fp32, stored in a's dtype. Its backward (dz = dy·[y > 0], then the dBN reduction) belongs to the
drelu_dbn_reduce family; this kernel has none of its own. Reference twin: ``fused_resnet.backends.reference.bn_act``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import launches
from ..spec import Residual

# What the kernel adds (RES_MODE): the shared table of fused_resnet.spec.Residual.
RES_TENSOR = tl.constexpr(int(Residual.TENSOR))
RES_AFFINE = tl.constexpr(int(Residual.AFFINE))
RES_OPTION_A = tl.constexpr(int(Residual.OPTION_A))


@triton.jit
def bn_act_kernel(
    a_ptr,  # [M, C] activations (channels innermost), any float dtype
    scale_ptr,  # [C] fp32 per-channel scale s = γ·rstd
    shift_ptr,  # [C] fp32 per-channel shift t = β − mean·s
    res_ptr,  # RES_MODE TENSOR / AFFINE: [M, C] residual in a's dtype; OPTION_A: the block input [N, RH, RW, RC]
    res_scale_ptr,  # RES_MODE AFFINE: [C] fp32 scale / shift of the residual's own BN
    res_shift_ptr,
    y_ptr,  # [M, C] output in a's dtype
    sample_ptr,  # SAMPLE_SCALE: [N] stochastic depth's per-sample scale d (any float dtype)
    M,
    C,
    HW,  # rows per sample
    P, Q, RH, RW, RC, rs_h, rs_w,  # option A: a's spatial size P x Q, the block input's size and the stride
    RES_MODE: tl.constexpr,
    SAMPLE_SCALE: tl.constexpr,
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
    if SAMPLE_SCALE:
        z *= tl.load(sample_ptr + rows // HW, mask=rows < M, other=0.0).to(tl.float32)[:, None]
    if RES_MODE == RES_TENSOR or RES_MODE == RES_AFFINE:
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RES_MODE == RES_AFFINE:
            r = r * tl.load(res_scale_ptr + cols, mask=col_ok, other=0.0)[None, :] + tl.load(
                res_shift_ptr + cols, mask=col_ok, other=0.0)[None, :]
        z += r
    if RES_MODE == RES_OPTION_A:
        q = rows % Q
        p = (rows // Q) % P
        img = rows // (P * Q)
        pix = (img.to(tl.int64) * RH + p * rs_h) * RW + q * rs_w
        r_ok = (rows[:, None] < M) & (cols < RC)[None, :]
        z += tl.load(res_ptr + pix[:, None] * RC + cols[None, :], mask=r_ok, other=0.0).to(tl.float32)
    if RELU:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
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
    residual_affine: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    option_a_stride: Optional[Sequence[int]] = None, sample_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """relu(a·scale + shift [+ residual]) per channel; a channels_last (or [M, C]), scale/shift fp32 [C].
    ``sample_scale``: [N] contiguous, a 4-D: relu(d[n]·(a·scale + shift) [+ residual]) (stochastic depth).
    ``residual_affine`` = (s_r, t_r): the residual enters as residual·s_r + t_r (a projection shortcut's BN).
    ``option_a_stride``: the residual is the option-A block input [N, C_in, H, W] (channels_last),
    subsampled by the stride with channels C_in.. zero, read in place. ``out`` (optional) receives the result:
    same shape, dtype and layout as a."""
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"bn_act expects float32, float16 or bfloat16 activations, got {a.dtype}")
    a2 = _rows_by_channels(a, "the activations")
    m, c = a2.shape
    vectors = [("scale", scale), ("shift", shift)] + (
        [("residual scale", residual_affine[0]), ("residual shift", residual_affine[1])] if residual_affine else [])
    for name, v in vectors:
        if v.dtype != torch.float32 or v.shape != (c,) or not v.is_contiguous() or v.device != a.device:
            raise ValueError(
                f"bn_act expects {name} as a contiguous float32 tensor of shape ({c},) on {a.device}, got "
                f"{v.dtype} {tuple(v.shape)} on {v.device}"
            )
    dims = dict(P=1, Q=1, RH=1, RW=1, RC=1, rs_h=1, rs_w=1)
    res_mode = Residual.NONE if residual is None else Residual.AFFINE if residual_affine else Residual.TENSOR
    if residual is not None and residual.dtype != a.dtype:
        raise ValueError(f"bn_act expects the residual in the activations' dtype {a.dtype}, got {residual.dtype}")
    if residual is not None and option_a_stride is not None:
        ss = option_a_stride
        if (a.dim() != 4 or residual.dim() != 4 or residual.shape[0] != a.shape[0] or residual.shape[1] > c
                or (residual.shape[2] - 1) // ss[0] + 1 != a.shape[2]
                or (residual.shape[3] - 1) // ss[1] + 1 != a.shape[3]):
            raise ValueError(f"bn_act: option-A shortcut of {tuple(residual.shape)} with stride {tuple(ss)} does not "
                             f"map onto {tuple(a.shape)}")
        r2 = _rows_by_channels(residual, "the residual")
        res_mode = Residual.OPTION_A
        dims = dict(P=a.shape[2], Q=a.shape[3], RH=residual.shape[2], RW=residual.shape[3], RC=residual.shape[1],
                    rs_h=ss[0], rs_w=ss[1])
    elif residual is not None:
        if residual.shape != a.shape:
            raise ValueError(
                f"bn_act expects the residual with the activations' shape {tuple(a.shape)}, got "
                f"{tuple(residual.shape)}"
            )
        r2 = _rows_by_channels(residual, "the residual")
    else:
        r2 = a2
    if out is not None and (out.shape != a.shape or out.dtype != a.dtype or out.device != a.device):
        raise ValueError(f"bn_act expects out with shape {tuple(a.shape)}, dtype {a.dtype} on {a.device}")
    if sample_scale is not None and (a.dim() != 4 or sample_scale.shape != (a.shape[0],)
                                     or not sample_scale.is_contiguous() or sample_scale.device != a.device):
        raise ValueError(f"bn_act expects sample_scale as a contiguous [{a.shape[0]}] tensor on {a.device} with 4-D "
                         f"activations, got {tuple(sample_scale.shape)} on {sample_scale.device}")
    y = torch.empty_like(a) if out is None else out
    y2 = _rows_by_channels(y, "the output")
    rs, rt = residual_affine if residual_affine else (scale, shift)
    block_c = min(64, triton.next_power_of_2(c))
    block_m = max(1, 4096 // block_c)
    grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
    launches.record("bn_act_kernel", "elementwise",
                    [a2, scale, shift, r2 if residual is not None else None, *(residual_affine or ()),
                     sample_scale], [y2])
    if launches.dry():
        return y
    bn_act_kernel[grid](a_ptr=a2, scale_ptr=scale, shift_ptr=shift, res_ptr=r2, res_scale_ptr=rs, res_shift_ptr=rt,
                        y_ptr=y2, sample_ptr=scale if sample_scale is None else sample_scale, M=m, C=c,
                        HW=max(1, a.shape[2] * a.shape[3]) if a.dim() == 4 else 1, **dims, RES_MODE=int(res_mode),
                        SAMPLE_SCALE=sample_scale is not None, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    return y
