"""Synchronised BatchNorm for the fused ops: BN statistics reduced over a torch.distributed process group.

A fused unit whose BN is an ``nn.SyncBatchNorm`` that torch would synchronise (training, torch.distributed
initialised, a group of more than one process) carries a ``sync_group`` handle in its
:class:`~fused_resnet.spec.UnitSpec`; the spec is plain data, so the process group itself stays in the table here.
A backend calls :func:`merge_stats` between a conv's statistics and their use, and :func:`reduce_grad_sums`
between the backward's Σdz, Σdz·x̂ and the dBN apply: one collective per BN per direction.

The messages are torch's own (torch.nn.modules._functions.SyncBatchNorm): forward all-gathers [mean, invstd, count]
of every rank and merges them with the counts (ranks may hold different batch sizes, or none); backward
all-reduces [Σdy, Σdy·(x − mean)]. So the statistics are torch's, rounding included, and a rank running torch's
SyncBatchNorm meets a rank running the fused op message for message. dγ and dβ stay per-rank sums, as torch's
(DistributedDataParallel averages them).
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

_GROUPS: List[object] = []  # handle - 1 → process group (dist.group.WORLD for a SyncBatchNorm without one)
_HANDLES: Dict[int, int] = {}  # id(process group) → handle


def _handle(group) -> int:
    key = id(group)
    if key not in _HANDLES:
        _GROUPS.append(group)
        _HANDLES[key] = len(_GROUPS)
    return _HANDLES[key]


def group(handle: int):
    return _GROUPS[handle - 1]


def sync_handle(bn: nn.Module) -> int:
    """The ``sync_group`` of a unit with this BN: 0 (none) unless torch's SyncBatchNorm would synchronise it on this
    call (its rule: training, torch.distributed initialised, more than one process in its group)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return 0
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    pg = bn.process_group or dist.group.WORLD
    return _handle(pg) if dist.get_world_size(pg) > 1 else 0


def world_size(handle: int) -> int:
    return dist.get_world_size(group(handle))


def merge_stats(handle: int, mean: Tensor, var: Tensor, count: int, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(mean, biased variance, element count) over the group, from this rank's statistics of ``count`` elements per
    channel (any values when ``count`` is 0). The count stays on the device (a float64 0-d tensor: exact, and
    nothing is read on the host, so a CUDA graph can capture it)."""
    c = mean.shape[0]
    if count > 0:
        local = torch.cat([mean, torch.rsqrt(var + eps), mean.new_full((1,), float(count))])
    else:  # an empty rank sends zeros, as torch's does, and still takes part
        local = mean.new_zeros(2 * c + 1)
    gathered = [torch.empty_like(local) for _ in range(world_size(handle))]
    dist.all_gather(gathered, local, group(handle))
    every = torch.stack(gathered)
    means, invstds, counts = every[:, :c], every[:, c:2 * c], every[:, 2 * c:]
    has = counts > 0
    variances = torch.where(has, 1.0 / (invstds * invstds) - eps, torch.zeros_like(invstds))
    means = torch.where(has, means, torch.zeros_like(means))
    total = counts.double().sum()  # each rank's count is exact in float32 (< 2^24); their sum need not be
    merged_mean = (counts * means).sum(0) / total
    merged_var = (counts * (variances + (means - merged_mean) ** 2)).sum(0) / total
    return merged_mean, merged_var, total


def reduce_grad_sums(handle: int, sum_dz: Tensor, sum_dz_xhat: Tensor, rstd: Tensor) -> Tuple[Tensor, Tensor]:
    """Σdz and Σdz·x̂ over the group (x̂ with the merged statistics every rank shares), from this rank's."""
    c = sum_dz.shape[0]
    combined = torch.cat([sum_dz, sum_dz_xhat / rstd])  # torch's message: Σdy, Σdy·(x − mean)
    dist.all_reduce(combined, dist.ReduceOp.SUM, group(handle))
    return combined[:c], combined[c:] * rstd


def counts_tensor(counts: List[Union[int, Tensor]], like: Tensor) -> Tensor:
    """The element count behind each unit's statistics (a synchronised unit's: its group's, a 0-d tensor), as a
    block forward returns it for a synchronised spec: float64 on ``like``'s device, filled there (no copy from
    the host)."""
    return torch.stack([c if isinstance(c, Tensor) else torch.full((), c, dtype=torch.float64, device=like.device)
                        for c in counts])
