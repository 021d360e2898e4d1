"""Backend cuda's cuDNN fusion graphs (csrc/cudnn_fusion.cpp), seen from Python: what was built, what ran fused and
what fell back, a block's graphs listed, built ahead of a CUDA graph capture, or checked before one.

A block asks for its graphs by kind (``fprop``, ``dgrad``, ``wgrad``) and features; ``requests`` lists them for an
input, as the C++ block ops will ask (tests run blocks and compare), so the warm-up, the capture check and the
deviceless engine check (bench/cudnn_check.py) all use the list the block ops use.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...spec import BlockSpec
from .. import extension
from .ops import cpp

# csrc/cudnn_fusion.h Feature
PROLOGUE, STATS, BIAS, RESIDUAL, RELU = 1, 2, 4, 8, 16


class Request(NamedTuple):
    """One graph a block op asks for: kind, features, the asking unit's index in the block, its cache key on the
    input's device, the conv input's sizes (dgrad: its output's), the filter's sizes, and the conv's stride,
    padding and dilation."""

    graph: str
    features: int
    unit: int
    key: str
    x: Tuple[int, ...]
    w: Tuple[int, ...]
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]

    @property
    def args(self) -> tuple:
        """The request as the extension's fusion_* ops take it (before the dtype)."""
        return (self.graph, self.features, list(self.x), list(self.w), list(self.stride), list(self.padding),
                list(self.dilation))


def cudnn_version_str() -> str:
    v = torch.backends.cudnn.version()
    return "unavailable" if v is None else f"{v // 10000}.{v % 10000 // 100}.{v % 100}"


def line() -> str:
    """``built (cudnn-frontend <version>, cuDNN <version>)``, or why the fusion graphs are not there."""
    if extension.load() is None:
        return f"not built: the extension is not loaded ({extension.status()['reason']})"
    info = cpp().fusion_info()
    return f"{info[:-1]}, cuDNN {cudnn_version_str()})" if info.startswith("built (") else info


def built() -> bool:
    return extension.load() is not None and cpp().fusion_info().startswith("built")


def status() -> Dict[str, object]:
    """``tallies``: per graph label, calls that ran fused, calls that fell back to the unfused path, plans built and
    their build time (ms); ``unsupported``: every graph key without a graph (no engine, or its execution failed),
    with cuDNN's message."""
    labels, fused, fallback, n_built, build_ms = cpp().fusion_tallies()
    keys, reasons = cpp().fusion_unsupported()
    return {"line": line(),
            "tallies": {k: {"fused": f, "fallback": b, "built": n, "build_ms": round(ms, 1)}
                        for k, f, b, n, ms in zip(labels, fused, fallback, n_built, build_ms)},
            "unsupported": dict(zip(keys, reasons))}


def reset() -> None:
    """Forget the built graphs, the tallies and the unsupported keys (a measurement's fresh start)."""
    cpp().fusion_reset()


def plan(spec: BlockSpec, x: Tensor, weights: Sequence[Tensor], graphs: bool = True) -> Tuple[str, ...]:
    """Per unit of a block: "" when its convs may run fusion graphs for input ``x``, else why not."""
    return tuple(cpp().fusion_plan(x, list(weights), spec.ints, spec.floats, graphs))


def requests(spec: BlockSpec, x: Tensor, weights: Sequence[Tensor], train: bool, graphs: bool = True) -> List[Request]:
    """The graphs a block's ops ask for with input ``x`` (its sizes and dtype; x and the weights may be meta
    tensors): ``train`` the training forward and backward, else the eval forward."""
    kinds, features, units, keys, sizes = cpp().fusion_requests(x, list(weights), spec.ints, spec.floats, graphs,
                                                                train)
    out = []
    for i, (kind, f, unit, key) in enumerate(zip(kinds, features, units, keys)):
        v = sizes[14 * i:14 * (i + 1)]
        out.append(Request(kind, f, unit, key, tuple(v[0:4]), tuple(v[4:8]), tuple(v[8:10]), tuple(v[10:12]),
                           tuple(v[12:14])))
    return out


def prepare(spec: BlockSpec, x: Tensor, weights: Sequence[Tensor], train: bool, graphs: bool = True) -> List[str]:
    """Builds the plans of a block's graphs for ``x`` on its device (never inside a CUDA graph capture); returns
    the keys cuDNN had no engine for, with why (those units run the unfused path)."""
    return list(cpp().fusion_prepare(x, list(weights), spec.ints, spec.floats, graphs, train))


def routes(spec: BlockSpec, x: Tensor, weights: Sequence[Tensor], train: bool, graphs: bool = True) -> List[str]:
    """Per unit, in words: each of its graphs for this input and what it runs — the cuDNN graph, the unfused path
    for want of an engine (cuDNN's reason), or nothing yet (not built) — or why the unit runs the unfused path."""
    unsupported = dict(zip(*cpp().fusion_unsupported()))
    missing = set(cpp().fusion_missing(x, list(weights), spec.ints, spec.floats, graphs, train))
    per_unit: List[List[str]] = [[] for _ in spec.units]
    for r in requests(spec, x, weights, train, graphs):
        state = (f"no engine, runs unfused ({unsupported[r.key][:160]})" if r.key in unsupported
                 else "plan not built yet" if r.key in missing
                 else "cuDNN graph" if x.is_cuda else "the cuDNN graph's CPU twin")
        per_unit[r.unit].append(f"{r.key.split(' ')[0]}: {state}")
    return [f"unfused ({why})" if why else "; ".join(g) for why, g in zip(plan(spec, x, weights, graphs), per_unit)]


def capture_refusal(spec: BlockSpec, x: Tensor, weights: Sequence[Tensor], train: bool,
                    graphs: bool = True) -> Optional[str]:
    """Inside a CUDA graph capture: why this block cannot run (plans not built yet), or None."""
    missing = cpp().fusion_missing(x, list(weights), spec.ints, spec.floats, graphs, train)
    if not missing:
        return None
    return (f"{len(missing)} cuDNN fusion plan(s) for these shapes are not built, and none is built during a CUDA "
            f"graph capture (first: {missing[0]}): run the model once with these shapes before capturing, or call "
            f"fused_resnet.warm_up(model, x)")


def set_cpu_twins(on: bool) -> bool:
    """Tests: CPU tensors run each graph's CPU twin (its exact contract in ATen ops); returns the previous
    setting."""
    return cpp().fusion_set_cpu_twins(on)


def set_refused(graph: str, at: str) -> None:
    """Tests: one graph kind behaves as if cuDNN had no engine for it (``at="build"``: its calls fall back,
    counted), or as if its graphs failed to execute (``"execute"``: the key loses its graph, the call falls
    back); ``""`` undoes it."""
    cpp().fusion_set_refused(graph, at)


def set_capacity(keys: int) -> int:
    """At most ``keys`` graph keys are kept (least recently used first out); returns the previous bound."""
    return cpp().fusion_set_capacity(keys)
