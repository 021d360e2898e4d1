"""Backend "cuda": the C++/CUDA extension (``torch.ops.fused_resnet_C``, built from csrc/).

Each block is one C++ op per direction — ``block_forward`` (training), ``block_inference`` (eval) and
``block_backward`` — so a block costs one Python round trip each way. Inside, convolutions run through ATen
(cuDNN) and everything memory-bound is the extension's NHWC kernels: BN statistics (fp32 Welford partials merged
with Chan's formula) and finalize, BN-apply + ReLU, the closing scale-shift + shortcut + ReLU (dual scale-shift
for a projection, option A read in place), the dReLU + Σdz / Σdz·x̂ reduction, the dBN apply with the dReLU
recomputed inside it, the shortcut's gradient, and the average pool a unit may read the block input through
(timm's "-d" shortcut; its gradient added to the rest of dx in the same pass). The running-statistics update is
one kernel as well (``fused_resnet::bn_running_update`` uses it for CUDA tensors).

Stochastic depth (timm's drop_path, the training ops' ``sample_scale`` d [N]) is inside the same kernels: the
closing computes y = relu(d_n·(a_last·s + t) + shortcut), and backward scales the last main unit's dz by d_n in its
dReLU + Σ reduction and its dBN apply, while the shortcut's gradient (a projection's BN included) stays unscaled.

The ops' fake (meta) kernels and the block forward's autograd formula are registered by :mod:`.ops` whenever the
extension loads, so ``torch.compile`` traces them and ``torch.library.opcheck`` checks them. Saved pre-BN outputs
stay channels_last (the kernels' layout).

cuDNN fusion graphs (csrc/cudnn_fusion.cpp, built when cudnn-frontend's headers are found; :mod:`.fusion`): on
float16 / bfloat16 CUDA tensors a unit's conv runs as one cuDNN graph with the previous BN-apply + ReLU on its
operand load and the BN statistics' sums in its epilogue; backward, dgrad carries the dReLU and the BN gradient sums
of the unit below and writes the wgrad's input; eval runs conv + bias (+ shortcut) + ReLU with the BN folded. A
graph cuDNN has no engine for runs the path above for that unit and is counted (``fusion.status()``). Backend
``cuda-unfused`` is the same backend with the graphs off: the unfused path, measurable beside the fused one.
``fused_resnet.warm_up`` builds a model's plans ahead (CUDA graph captures never build one).

An open block (``Shortcut.OPEN``, y = bn(a_last) for a module that closes the block in torch: timm's se, or a
drop_path the op does not compute, fused_resnet.timm_blocks) is one of the kinds the extension parses
(csrc/spec.h): its closing is the same BN-apply kernel without the ReLU and shortcut (in eval, the last unit's
conv + bias graph, or that kernel), and backward starts from dz = dy in the last unit's dBN kernels built without a
mask. Every op takes the spec as it is: no step of an open block runs outside the extension.

Every op is also registered for CPU tensors, running the same kernel bodies in host loops: that is how the CPU
test suite checks them. With ``FUSED_RESNET_EXT_ON_CPU=1`` (set by the tests on a machine without a GPU) the
backend also accepts CPU tensors; otherwise it needs CUDA tensors. The CPU path is for testing, not for speed.
"""
from __future__ import annotations

import os
from typing import List, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_map
from torch.utils._python_dispatch import _disable_current_modes

from ... import launches
from ...spec import BlockSpec
from ...tensors import Forward, Grads, Params, unpack_forward, unpack_grads
from .. import extension, folding, reference
from ..registry import Backend, Capabilities, register
from . import fusion
from .ops import cpp

ENV_ON_CPU = "FUSED_RESNET_EXT_ON_CPU"
_FOLDED_DTYPES = (torch.float16, torch.bfloat16)  # the fusion graphs' dtypes: eval folds BN into the weights


def on_cpu_for_testing() -> bool:
    return os.environ.get(ENV_ON_CPU, "0") == "1"


def runs_on(device_type: str) -> bool:
    """Whether the extension's kernels take tensors of this device type here (extension loaded; CUDA, or CPU in
    the tests' mode)."""
    if device_type == "cuda" or (device_type == "cpu" and on_cpu_for_testing()):
        return extension.load() is not None
    return False


def _cpu_twins_for_testing() -> None:
    """In the tests' CPU mode the fusion graphs run as their CPU twins, so CI executes the fused paths' plumbing."""
    if on_cpu_for_testing():
        fusion.set_cpu_twins(True)


extension.on_load(_cpu_twins_for_testing)


def _like(t, device):
    """An uninitialised tensor with t's sizes, strides and dtype on ``device`` (non-tensors as they are)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device) if isinstance(t, Tensor) else t


def run(name: str, device: torch.device, *args):
    """The extension's op ``name``. In a dry launch account (fused_resnet.launches) the same C++ function runs as
    its ``_account`` twin on meta copies of the arguments — every kernel, conv and graph it would launch recorded,
    nothing computed — and outputs shaped like the op's come back on ``device``; in a recording that is not dry the
    op runs and records the same launches. Either way the records are reported."""
    if launches.active() is None:
        return getattr(cpp(), name)(*args)
    if launches.dry():
        with _disable_current_modes():  # plain meta tensors reach the C++ code, outside any fake or dispatch mode
            meta_out = getattr(cpp(), f"{name}_account")(*tree_map(lambda t: _like(t, "meta"), args))
        out = tree_map(lambda t: _like(t, device), meta_out)  # under the caller's modes: fake ones in an account
    else:
        previous = cpp().account_set_recording(True)
        try:
            out = getattr(cpp(), name)(*args)
        finally:
            cpp().account_set_recording(previous)
    for record in zip(*cpp().account_take()):
        launches.record_counts(*record)
    return out


class CudaBackend(Backend):
    """``graphs``: units may run cuDNN fusion graphs (backend cuda), or never (cuda-unfused)."""

    # The convs are ATen's, so grouped and dilated ones run (a grouped unit's cuDNN graph is refused, and the
    # unit runs the unfused path: fusion.routes says so). Stochastic depth never touches a graph: its scale lives
    # in the closing kernel and in the last unit's BN backward, which run unfused in both backends.
    capabilities = Capabilities(groups=True, dilation=True, avg_pool=True, drop_path=True)

    def __init__(self, name: str, graphs: bool, auto_rank: Optional[int]):
        self.name, self.graphs, self.auto_rank = name, graphs, auto_rank

    def unavailable_reason(self) -> Optional[str]:
        if extension.load() is None:
            return f"the C++/CUDA extension is not loaded: {extension.status()['reason']}"
        if not torch.cuda.is_available() and not on_cpu_for_testing():
            return (f"no CUDA device: the extension's ops run on CUDA tensors ({ENV_ON_CPU}=1 runs their CPU "
                    f"registrations, for testing)")
        return None

    def device_refusal(self, device_type: str) -> Optional[str]:
        if not runs_on(device_type):
            return f"input on {device_type}; backend {self.name!r} needs CUDA tensors"
        return None

    def saved_format(self, x: Tensor) -> torch.memory_format:
        return torch.channels_last

    def block_forward(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor],
                      sample_scale: Optional[Tensor] = None) -> Forward:
        flat = run("block_forward", x.device, x, *params, residual, spec.ints, spec.floats, self.graphs,
                   sample_scale)
        return unpack_forward(flat, len(spec.units))

    def block_inference(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Tensor:
        # On the GPU (and in its launch account) float16 / bfloat16 eval folds BN into the weights, cached
        if (x.is_cuda or launches.dry()) and x.dtype in _FOLDED_DTYPES and self.graphs:
            folded = folding.fold_block(params, spec.units)
            return run("block_inference_folded", x.device, x, [w for w, _ in folded], [t for _, t in folded],
                       residual, spec.ints, spec.floats, self.graphs)
        return run("block_inference", x.device, x, *params, residual, spec.ints, spec.floats, self.graphs)

    def block_backward(self, spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                       need_input_grad: bool, sample_scale: Optional[Tensor] = None) -> Grads:
        flat = run("block_backward", x.device, dy, x, saved.y, params.weights, params.gammas, params.betas,
                   saved.acts, saved.means, saved.variances, spec.ints, spec.floats, need_input_grad,
                   self.graphs, sample_scale, saved.counts)
        return unpack_grads(flat, len(spec.units), spec, need_input_grad)

    def bn_running_update(self, running_mean, running_var, num_batches_tracked, mean, var, count, momentum):
        if isinstance(count, Tensor):  # a synchronised BN's group count, on the device: a few torch ops
            reference.bn_running_update(running_mean, running_var, num_batches_tracked, mean, var, count, momentum)
            return
        run("bn_running_update", mean.device, running_mean, running_var, num_batches_tracked, mean, var, count,
            momentum)

    def prepare(self, spec: BlockSpec, x: Tensor, weights: List[Tensor], train: bool) -> List[str]:
        return fusion.prepare(spec, x, weights, train, self.graphs)

    def capture_refusal(self, spec: BlockSpec, x: Tensor, weights: List[Tensor], train: bool) -> Optional[str]:
        return fusion.capture_refusal(spec, x, weights, train, self.graphs)

    def routes(self, spec: BlockSpec, x: Tensor, weights: List[Tensor], train: bool) -> List[str]:
        return fusion.routes(spec, x, weights, train, self.graphs)


register(CudaBackend("cuda", graphs=True, auto_rank=0))
register(CudaBackend("cuda-unfused", graphs=False, auto_rank=None))
