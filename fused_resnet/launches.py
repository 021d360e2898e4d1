"""The one place kernel launches are collected: what a step launches, its compulsory DRAM bytes and its FLOPs.

Every provider of an account reports here through the same two calls: the eager account (torch's aten ops mapped
to the kernels eager PyTorch launches, ``fused_resnet.tools.accounting``) and, once they report, the fused
backends' launchers (Triton launchers, the extension's C++ ops through ``record_counts``). A launcher calls
``record`` where it launches; outside ``recording()`` that is one global check and nothing else.

What a launch counts (the account's definition of compulsory traffic): each DISTINCT tensor the kernel reads once
and each distinct tensor it writes once, whatever its access pattern inside the kernel (re-reads, L2 hits and
misses are not modelled). A tensor's bytes are its distinct elements (dimensions of stride 0, e.g. an expanded
per-channel vector, count once) times its element size; views of the same elements are one tensor. FLOPs are
2 × MACs of tensor-core work (convolutions, matmuls); memory-bound kernels report 0.

``dry`` tells launchers whether to run: a dry recording (the default) holds meta or fake tensors, and a launcher
must return outputs of the right shape without launching anything.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, NamedTuple, Optional, Sequence

from torch import Tensor

KINDS = ("conv", "gemm", "elementwise", "reduction", "graph", "copy")
# The GPU an account describes has this many SMs (H100 SXM and H200): launchers that size their grids or partial
# buffers from the SM count use it in a dry run (csrc/common.cuh kAccountSms is the C++ side's).
ACCOUNT_SMS = 132


class Launch(NamedTuple):
    """One kernel launch (or one cuDNN graph execution) of a step."""

    name: str    # kernel or graph name: "conv_fprop", "cudnn fprop+stats", "bn_act", ...
    kind: str    # one of KINDS
    reads: int   # bytes: each distinct tensor read, once
    writes: int  # bytes: each distinct tensor written, once
    flops: int   # 2 x MACs of tensor-core work; 0 for memory-bound kernels
    where: str   # the block or unit it belongs to ("layer1.0", "layer1.0.bn2", "loss"), from ``located``


# One global state, not thread-local: the autograd engine runs backward on its own threads for CUDA tensors, and
# their launches belong to the same step.
_ACTIVE: Optional[List[Launch]] = None
_DRY = True
_WHERE: List[str] = []


@contextlib.contextmanager
def recording(dry: bool = True) -> Iterator[List[Launch]]:
    """Collect every launch made inside into the list it yields. ``dry``: launchers must not run their kernels
    (the tensors are meta / fake tensors). Not re-entrant: an inner recording would hide launches from the outer
    one."""
    global _ACTIVE, _DRY
    if _ACTIVE is not None:
        raise RuntimeError("fused_resnet.launches.recording() is already active: recordings do not nest")
    launches: List[Launch] = []
    _ACTIVE, _DRY = launches, dry
    try:
        yield launches
    finally:
        _ACTIVE, _DRY = None, True


def active() -> Optional[List[Launch]]:
    """The list being filled, or None when nothing is recording."""
    return _ACTIVE


def dry() -> bool:
    """Whether launchers must skip their kernels (meaningful only while recording)."""
    return _ACTIVE is not None and _DRY


@contextlib.contextmanager
def located(where: str) -> Iterator[None]:
    """Name the block or unit that the launches recorded inside belong to (innermost wins)."""
    _WHERE.append(where)
    try:
        yield
    finally:
        _WHERE.pop()


def where() -> str:
    """The innermost ``located`` name, "" outside any."""
    return _WHERE[-1] if _WHERE else ""


def tensor_bytes(t: Tensor) -> int:
    """Distinct bytes of ``t``: its elements along dimensions of nonzero stride, times the element size."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _identity(t: Tensor) -> tuple:
    # Meta and fake tensors have no data pointer. Views that cover the same elements (x, x.t(), x.view(-1)) are the
    # same data: same storage, first element, element count and last element; x[:2] and x[:, :4] are not.
    try:
        storage = t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        storage = id(t)
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return storage, t.storage_offset(), tensor_bytes(t), last, t.element_size()


def _distinct_bytes(tensors: Sequence[Optional[Tensor]]) -> int:
    seen = set()
    total = 0
    for t in tensors:
        if t is None:
            continue
        key = _identity(t)
        if key not in seen:
            seen.add(key)
            total += tensor_bytes(t)
    return total


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"launch kind {kind!r}; expected one of {KINDS}")


def record(name: str, kind: str, reads: Sequence[Optional[Tensor]], writes: Sequence[Optional[Tensor]],
           flops: int = 0) -> None:
    """Record one launch that reads ``reads`` and writes ``writes`` (None entries are skipped; a tensor listed
    twice counts once). No-op when nothing is recording."""
    if _ACTIVE is None:
        return
    _check_kind(kind)
    _ACTIVE.append(Launch(name, kind, _distinct_bytes(reads), _distinct_bytes(writes), int(flops), where()))


def record_counts(name: str, kind: str, reads: int, writes: int, flops: int) -> None:
    """Record one launch from byte and FLOP counts (for launchers that know numbers, not tensors: the C++ side).
    No-op when nothing is recording."""
    if _ACTIVE is None:
        return
    _check_kind(kind)
    _ACTIVE.append(Launch(name, kind, int(reads), int(writes), int(flops), where()))
