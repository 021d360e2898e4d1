"""Backend "cuda": the C++/CUDA extension (``torch.ops.fused_resnet_C``, built from csrc/).

Each block is one C++ op per direction — ``block_forward`` (training), ``block_inference`` (eval) and
``block_backward`` — so a block costs one Python round trip each way. Inside, convolutions run through ATen
(cuDNN) and everything memory-bound is the extension's NHWC kernels: BN statistics (fp32 Welford partials merged
with Chan's formula) and finalize, BN-apply + ReLU, the closing scale-shift + shortcut + ReLU (dual scale-shift
for a projection, option A read in place), the dReLU + Σdz / Σdz·x̂ reduction, the dBN apply with the dReLU
recomputed inside it, and the shortcut's gradient. The running-statistics update is one kernel as well
(``fused_resnet::bn_running_update`` uses it for CUDA tensors).

The ops' fake (meta) kernels and the block forward's autograd formula are registered by the op layer
(fused_resnet.ops) whenever the extension loads, so ``torch.compile`` traces them and ``torch.library.opcheck``
checks them. Saved pre-BN outputs stay channels_last (the kernels' layout).

cuDNN fusion graphs (csrc/cudnn_fusion.cpp, built when cudnn-frontend's headers are found): on float16 / bfloat16
CUDA tensors a unit's conv runs as one cuDNN graph with the previous BN-apply + ReLU on its operand load and the BN
statistics' sums in its epilogue; backward, dgrad carries the dReLU and the BN weight-gradient sums of the unit
below and wgrad the BN-apply + ReLU of its operand; eval runs conv + bias (+ shortcut) + ReLU with the BN folded.
A graph cuDNN has no engine for runs the path above for that unit and is counted: ``fusion_status()`` has the
tallies, ``fusion_switched(False)`` (or FUSED_RESNET_CUDNN_FUSION=0) turns the graphs off.

Every op is also registered for CPU tensors, running the same kernel bodies in host loops: that is how the CPU
test suite checks them. With ``FUSED_RESNET_EXT_ON_CPU=1`` (set by the tests on a machine without a GPU) the
backend also accepts CPU tensors; otherwise it needs CUDA tensors. The CPU path is for testing, not for speed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..spec import BlockSpec
from ..tensors import Forward, Grads, Params, unpack_forward, unpack_grads
from . import extension, folding, reference
from .registry import Backend, register

ENV_ON_CPU = "FUSED_RESNET_EXT_ON_CPU"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FOLDED_DTYPES = (torch.float16, torch.bfloat16)  # the fusion graphs' dtypes: eval folds BN into the weights


def on_cpu_for_testing() -> bool:
    return os.environ.get(ENV_ON_CPU, "0") == "1"


def runs_on(device_type: str) -> bool:
    """Whether the extension's kernels take tensors of this device type here (extension loaded; CUDA, or CPU in
    the tests' mode)."""
    if device_type == "cuda" or (device_type == "cpu" and on_cpu_for_testing()):
        return extension.load() is not None
    return False


def _ops():
    return torch.ops.fused_resnet_C


def _fusion_on_cpu_for_testing() -> None:
    """In the tests' CPU mode the fusion graphs are asked for on CPU tensors too: every build fails there (no GPU)
    and every call takes the counted fallback, so CI runs the fallback paths and their bookkeeping."""
    if on_cpu_for_testing():
        _ops().fusion_set_cpu_probe(True)


extension.on_load(_fusion_on_cpu_for_testing)


def cudnn_version_str() -> str:
    v = torch.backends.cudnn.version()
    return "unavailable" if v is None else f"{v // 10000}.{v % 10000 // 100}.{v % 100}"


def fusion_line() -> str:
    """``built (cudnn-frontend <version>, cuDNN <version>)``, or why the fusion graphs are not there."""
    if extension.load() is None:
        return f"not built: the extension is not loaded ({extension.status()['reason']})"
    info = _ops().fusion_info()
    if info.startswith("built ("):
        info = f"{info[:-1]}, cuDNN {cudnn_version_str()})"
    return info if fusion_enabled() else f"{info}; switched off (FUSED_RESNET_CUDNN_FUSION=0)"


def fusion_enabled() -> bool:
    return _ops().fusion_enabled()


@contextlib.contextmanager
def fusion_switched(on: bool) -> Iterator[None]:
    """The cuDNN fusion graphs on or off for the block ops called inside (process-wide)."""
    previous = _ops().fusion_set_enabled(on)
    try:
        yield
    finally:
        _ops().fusion_set_enabled(previous)


def fusion_status() -> Dict[str, object]:
    """``tallies``: per graph label (fused calls, calls that fell back to the unfused path);
    ``unsupported``: every graph key cuDNN had no engine for, with cuDNN's message."""
    labels, fused, fallback = _ops().fusion_tallies()
    keys, reasons = _ops().fusion_unsupported()
    return {"line": fusion_line(), "tallies": {k: (f, b) for k, f, b in zip(labels, fused, fallback)},
            "unsupported": dict(zip(keys, reasons))}


def fusion_reset() -> None:
    """Forget the built graphs, the tallies and the unsupported keys (a measurement's fresh start)."""
    _ops().fusion_reset()


def fusion_plan(spec: BlockSpec, x: Tensor, weights) -> Tuple[str, ...]:
    """Per unit of a block: "" when its convs may run fusion graphs for input ``x``, else why not."""
    return tuple(_ops().fusion_plan(x, list(weights), spec.ints, spec.floats))


class CudaBackend(Backend):
    name = "cuda"
    auto_rank = 0

    def unavailable_reason(self) -> Optional[str]:
        if extension.load() is None:
            return f"the C++/CUDA extension is not loaded: {extension.status()['reason']}"
        if not torch.cuda.is_available() and not on_cpu_for_testing():
            return (f"no CUDA device: the extension's ops run on CUDA tensors ({ENV_ON_CPU}=1 runs their CPU "
                    f"registrations, for testing)")
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype, spec: Optional[BlockSpec]) -> Optional[str]:
        if not runs_on(device_type):
            return f"input on {device_type}; backend 'cuda' needs CUDA tensors"
        if dtype not in _DTYPES and spec is not None:
            return f"dtype {dtype} (the extension's kernels run float32, float16 and bfloat16)"
        if spec is None and dtype != torch.float32:
            return f"running statistics computed in {dtype} (the update kernel takes float32 statistics)"
        return None  # groups and dilation: the convs are ATen's

    def saved_format(self, x: Tensor) -> torch.memory_format:
        return torch.channels_last

    def block_forward(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Forward:
        flat = _ops().block_forward(x, *params, residual, spec.ints, spec.floats)
        return unpack_forward(flat, len(spec.units))

    def block_inference(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Tensor:
        if x.is_cuda and x.dtype in _FOLDED_DTYPES:  # BN folded into the weights, cached (the Triton backend's)
            folded = folding.fold_block(params, spec.units)
            return _ops().block_inference_folded(x, [w for w, _ in folded], [t for _, t in folded], residual,
                                                 spec.ints, spec.floats)
        return _ops().block_inference(x, *params, residual, spec.ints, spec.floats)

    def block_backward(self, spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                       need_input_grad: bool) -> Grads:
        flat = _ops().block_backward(dy, x, saved.y, params.weights, params.gammas, params.betas, saved.acts,
                                     saved.means, saved.variances, spec.ints, spec.floats, need_input_grad,
                                     saved.counts)
        return unpack_grads(flat, len(spec.units), spec, need_input_grad)

    def bn_running_update(self, running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        if isinstance(count, Tensor):  # a synchronised BN's group count, on the device: a few torch ops
            reference.bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
            return
        _ops().bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)


register(CudaBackend())
