"""bn_finalize: a BN's per-channel vector arithmetic between the big kernels, one small launch per BN and step.

* ``bn_running_update``: torch's running-statistics update, num_batches_tracked included, in one launch (as torch
  ops it was ~15 launches per BN and step: the increment, casts, products and sums of C-element vectors, each a
  real GPU launch and tens of microseconds of host time).

Reference twin (the torch code this replaces): ``reference.bn_running_update``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import launches
from .conv import INTERPRET, _bound


def _vector(what: str, v: Tensor, c: int, device) -> None:
    if v.shape != (c,) or not v.is_contiguous() or not v.dtype.is_floating_point or v.device != device:
        raise ValueError(f"{what} expects a contiguous floating-point vector of shape ({c},) on {device}, got "
                         f"{v.dtype} {tuple(v.shape)} on {v.device}")


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
