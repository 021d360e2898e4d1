"""Backend "cuda": the C++/CUDA extension (``torch.ops.fused_resnet_C``, built from csrc/).

Each block is one C++ op per direction — ``block_forward`` (training), ``block_inference`` (eval) and
``block_backward`` — so a block costs one Python round trip each way. Inside, convolutions run through ATen
(cuDNN) and everything memory-bound is the extension's NHWC kernels: BN statistics (fp32 Welford partials merged
with Chan's formula) and finalize, BN-apply + ReLU, the closing scale-shift + shortcut + ReLU (dual scale-shift
for a projection, option A read in place), the dReLU + Σdz / Σdz·x̂ reduction, the dBN apply with the dReLU
recomputed inside it, and the shortcut's gradient. The running-statistics update is one kernel as well
(``fused_resnet::bn_running_update`` uses it for CUDA tensors).

This module gives the C++ ops their fake (meta) implementations and the block forward its autograd formula, so
``torch.compile`` traces them and ``torch.library.opcheck`` checks them.

Every op is also registered for CPU tensors, running the same kernel bodies in host loops: that is how the CPU
test suite checks them. With ``FUSED_RESNET_EXT_ON_CPU=1`` (set by the tests on a machine without a GPU) the
backend also accepts CPU tensors; otherwise it needs CUDA tensors. The CPU path is for testing, not for speed.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _ext, backends, reference

ENV_ON_CPU = "FUSED_RESNET_EXT_ON_CPU"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_registered = False


def on_cpu_for_testing() -> bool:
    return os.environ.get(ENV_ON_CPU, "0") == "1"


def _loaded() -> bool:
    """The extension is loaded (prebuilt, or built just in time earlier in this process) and its fakes and
    autograd formula are registered."""
    global _registered
    if _ext.load() is None:
        return False
    if not _registered:
        _register()
        _registered = True
    return True


def runs_on(t: Tensor) -> bool:
    """Whether the extension's kernels take tensors on t's device here (extension loaded; CUDA, or CPU in the
    tests' mode)."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and on_cpu_for_testing()):
        return _loaded()
    return False


class CudaBackend(backends.Backend):
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        if not _loaded():
            return f"the C++/CUDA extension is not loaded: {_ext.status()['reason']}"
        if not torch.cuda.is_available() and not on_cpu_for_testing():
            return (f"no CUDA device: the extension's ops run on CUDA tensors ({ENV_ON_CPU}=1 runs their CPU "
                    f"registrations, for testing)")
        return None

    def unsupported_reason(self, x: Tensor, groups: Sequence[int], dilations: Sequence[int]) -> Optional[str]:
        if not runs_on(x):
            return f"input on {x.device}; backend 'cuda' needs CUDA tensors"
        if x.dtype not in _DTYPES:
            return f"dtype {x.dtype} (the extension's kernels run float32, float16 and bfloat16)"
        return None  # groups and dilation: the convs are ATen's

    @staticmethod
    def block_forward(*args) -> List[Tensor]:
        return torch.ops.fused_resnet_C.block_forward(*args)

    @staticmethod
    def block_inference(*args) -> Tensor:
        return torch.ops.fused_resnet_C.block_inference(*args)

    @staticmethod
    def block_backward(*args) -> Tuple[Optional[Tensor], Optional[Tensor], List[Tensor], List[Tensor],
                                       List[Tensor]]:
        weights, shortcut, need_input_grad = args[3], args[15], args[17]
        n = len(weights)
        out = torch.ops.fused_resnet_C.block_backward(*args)
        dx = out[0] if need_input_grad else None
        d_res = out[1] if shortcut == reference.SHORTCUT_TENSOR else None
        return dx, d_res, list(out[2:2 + n]), list(out[2 + n:2 + 2 * n]), list(out[2 + 2 * n:2 + 3 * n])


# ------------------------------------------------------------------------------------- fakes and autograd
def _vectors(like: Tensor, count: int, k: int) -> Tuple[Tensor, ...]:
    return tuple(like.new_empty((count,), dtype=torch.float32) for _ in range(k))


def _register(lib: str = "fused_resnet_C") -> None:
    from . import ops  # the op layer's fakes and autograd formula are reused

    def fake(name):
        return torch.library.register_fake(f"{lib}::{name}")

    fake("bn_stats")(lambda a, gamma, beta, eps: _vectors(a, a.shape[1], 4))
    fake("bn_scale_shift")(lambda gamma, beta, mean, var, eps: _vectors(mean, mean.shape[0], 3))
    fake("bn_running_update")(lambda running_mean, running_var, nbt, mean, var, count, momentum: None)
    fake("bn_act")(lambda a, scale, shift, residual, relu, residual_scale=None, residual_shift=None,
                   pad_stride=(): torch.empty_like(a))
    fake("drelu_dbn_reduce")(lambda g, y, a, mean, rstd, scale, shift: _vectors(a, a.shape[1], 2))
    fake("dbn_apply")(lambda g, y, a, mean, rstd, scale, shift, sum_dz, sum_dz_xhat, batch_stats:
                      torch.empty_like(a))
    fake("residual_grad")(lambda d_main, dy, y, like, pad_stride: torch.empty_like(like))
    fake("block_forward")(lambda *args: ops._block_forward_fake(*args, backend="cuda"))
    fake("block_inference")(lambda *args: ops._block_inference_fake(*args, backend="cuda"))
    fake("block_backward")(lambda *args: ops._block_backward_fake(*args, backend="cuda"))
    backward, setup_context = ops.block_autograd(lambda *args: torch.ops.fused_resnet_C.block_backward(*args))
    torch.library.register_autograd(f"{lib}::block_forward", backward, setup_context=setup_context)


_loaded()  # registers the fakes and autograd now when the extension is prebuilt
backends.register(CudaBackend())
