"""What eager PyTorch launches on a CUDA GPU for each aten op of a ResNet step: the account's one mapping, as data.

``TABLE`` maps an aten op (by name, every overload alike) to the kernels its CUDA implementation launches, each
with what it reads and writes and its FLOPs; ``NO_KERNEL`` lists the ops that launch nothing (views, allocations,
metadata queries). An op in neither is an error (``UnmappedOp``): the account never counts an unknown op as zero.

The rows follow torch 2.x's CUDA implementations (ATen's Normalization.cu/.cuh, DilatedMaxPool2d.cu, Loss.cu,
MultiTensorApply.cuh, cuDNN through ConvShared.cpp); where a GPU library decides internally, the table states the
model it takes:

* **convolutions** are cuDNN's: one kernel per fprop, dgrad and wgrad. cuDNN's tensor-core engines work in NHWC:
  every operand that is not NHWC-dense (an NCHW activation or weight, a 1-D conv's (N, C, L) tensor) costs one
  layout-transform kernel before the call, and a result the caller wants in NCHW one transform after it. Split-K
  reductions, dgrad zero-fills and workspace traffic inside cuDNN are not counted.
* **BatchNorm** in bfloat16 (input or weight) runs ATen's own kernels (torch never gives bfloat16 BN to cuDNN);
  float32, and float16 with float32 weights, run cuDNN's BN (one kernel per direction). ATen's channels-last
  statistics and gradient reductions use a grid-wide reduction when the grid has more than one row of blocks:
  then a zero-fill of its semaphores runs first and a staging buffer is written and read (both counted; the grid
  is ATen's ``flexible_launch_configs``, replicated below).
* **multi-tensor ops** (``_foreach_*``, the SGD step) launch ``multi_tensor_apply`` kernels, as many as its
  chunking gives with CUDA ≥ 12.1's 32 KB kernel arguments (the GPU machines' CUDA 13).

Operand references in the rows: a schema argument name (a tensor list means every tensor in it); ``out0`` ..
``outN`` the op's outputs; ``nhwc:<ref>`` the NHWC-dense tensor a cuDNN call reads or writes in place of
``<ref>`` (``<ref>`` itself when it already is, else a temporary of its size); ``sem``, ``staging2``,
``staging4``, ``chan0``, ``chan1`` ATen's BN scratch tensors (semaphores, staging buffers of 2 or 4 floats per
channel and grid row, per-channel float sums); ``saved_mean``, ``saved_invstd`` the float vectors BN saves per
channel (on CUDA in eval too).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import launches


class Kernel(NamedTuple):
    """One kernel an op launches. ``when``: condition names that must all hold (``CONDITIONS``); ``flops``: a
    formula name (``FLOPS``); ``plan``: a launch plan that repeats the kernel (``multi_tensor_apply``)."""

    name: str
    kind: str
    reads: Tuple[str, ...]
    writes: Tuple[str, ...]
    flops: str = ""
    when: Tuple[str, ...] = ()
    plan: str = ""


class UnmappedOp(RuntimeError):
    """An op the account has no row for: counting it as zero would be a silent error."""


def _k(name, kind, reads, writes, flops="", when=(), plan="") -> Kernel:
    return Kernel(name, kind, tuple(reads), tuple(writes), flops, tuple(when), plan)


def _fill(name: str, out: str = "out0", when=()) -> Kernel:
    return _k(name, "elementwise", (), (out,), when=when)


def _pointwise(name: str, reads=("self", "other"), writes=("out0",)) -> Tuple[Kernel, ...]:
    return (_k(name, "elementwise", reads, writes),)


def _conv_call(name: str, inputs: Sequence[str], output: str, when: Tuple[str, ...]) -> Tuple[Kernel, ...]:
    """A cuDNN call in NHWC: transforms for the operands that are not NHWC-dense, the conv, the result's
    transform back."""
    rows = [_k(f"layout transform ({ref} to NHWC)", "copy", (ref,), (f"nhwc:{ref}",), when=when + (f"not_nhwc:{ref}",))
            for ref in inputs]
    rows.append(_k(name, "conv", [f"nhwc:{ref}" for ref in inputs], (f"nhwc:{output}",), "conv", when))
    rows.append(_k(f"layout transform ({output} to NCHW)", "copy", (f"nhwc:{output}",), (output,),
                   when=when + (f"not_nhwc:{output}",)))
    return tuple(rows)


TABLE: Dict[str, Tuple[Kernel, ...]] = {
    # ------------------------------------------------------------------ convolutions (cuDNN)
    "aten::convolution": _conv_call("cudnn conv fprop", ("input", "weight"), "out0", ()) + (
        _k("conv bias add", "elementwise", ("out0", "bias"), ("out0",), when=("defined:bias",)),
    ),
    "aten::convolution_backward": (
        _conv_call("cudnn conv dgrad", ("grad_output", "weight"), "out0", ("mask:0",))
        + _conv_call("cudnn conv wgrad", ("grad_output", "input"), "out1", ("mask:1",))
        + (_k("conv bias grad (sum)", "reduction", ("grad_output",), ("out2",), when=("mask:2",)),)
    ),
    # ------------------------------------------------------------------ BatchNorm
    "aten::native_batch_norm": (
        _k("cudnn bn fwd training", "reduction", ("input", "weight", "bias", "running_mean", "running_var"),
           ("out0", "saved_mean", "saved_invstd", "running_mean", "running_var"), when=("bn:cudnn", "train")),
        _k("cudnn bn fwd inference", "elementwise", ("input", "weight", "bias", "running_mean", "running_var"),
           ("out0",), when=("bn:cudnn", "eval")),
        _fill("fill (bn stats semaphores)", "sem", when=("bn:native", "train", "bn_grid:input")),
        _k("bn stats (channels-last, grid reduction)", "reduction", ("input", "staging4"),
           ("saved_mean", "saved_invstd", "staging4"), when=("bn:channels_last", "train", "bn_grid:input")),
        _k("bn stats (channels-last)", "reduction", ("input",), ("saved_mean", "saved_invstd"),
           when=("bn:channels_last", "train", "no_bn_grid:input")),
        _k("bn stats (NCHW)", "reduction", ("input",), ("saved_mean", "saved_invstd"), when=("bn:nchw", "train")),
        _k("bn stats (var_mean)", "reduction", ("input",), ("saved_mean", "saved_invstd"),
           when=("bn:general", "train")),
        _k("bn update running stats + invstd", "elementwise",
           ("saved_mean", "saved_invstd", "running_mean", "running_var"),
           ("running_mean", "running_var", "saved_invstd"), when=("bn:native", "train", "defined:running_mean")),
        _k("bn invstd", "elementwise", ("saved_invstd",), ("saved_invstd",),
           when=("bn:native", "train", "undefined:running_mean")),
        _k("copy (running mean to saved mean)", "copy", ("running_mean",), ("saved_mean",),
           when=("bn:native", "eval")),
        _k("bn invstd", "elementwise", ("running_var",), ("saved_invstd",), when=("bn:native", "eval")),
        _k("bn apply", "elementwise", ("input", "weight", "bias", "saved_mean", "saved_invstd"), ("out0",),
           when=("bn:native",)),
    ),
    "aten::native_batch_norm_backward": (
        _k("cudnn bn bwd", "reduction", ("grad_out", "input", "weight", "saved_mean", "saved_invstd"),
           ("out0", "out1", "out2"), when=("bn:cudnn", "train")),
        _k("bn bwd (NCHW, reduce + apply)", "reduction",
           ("grad_out", "input", "weight", "saved_mean", "saved_invstd"), ("out0", "out1", "out2"),
           when=("bn:native_or_eval", "bn_bwd_fused")),
        _fill("fill (bn grad semaphores)", "sem",
              when=("bn:native_or_eval", "bn_bwd_split", "needs_reduction", "bn_grid:input")),
        _k("bn bwd reduce (channels-last, grid reduction)", "reduction",
           ("grad_out", "input", "saved_mean", "saved_invstd", "staging2"),
           ("chan0", "chan1", "out1", "out2", "staging2"),
           when=("bn:native_or_eval", "bn_bwd_split", "needs_reduction", "bn_grid:input")),
        _k("bn bwd reduce", "reduction", ("grad_out", "input", "saved_mean", "saved_invstd"),
           ("chan0", "chan1", "out1", "out2"),
           when=("bn:native_or_eval", "bn_bwd_split", "needs_reduction", "no_bn_grid:input")),
        _k("bn bwd apply", "elementwise",
           ("grad_out", "input", "saved_mean", "saved_invstd", "weight", "chan0", "chan1"), ("out0",),
           when=("bn:native_or_eval", "bn_bwd_split", "mask:0", "train")),
        _k("bn bwd apply (running statistics)", "elementwise", ("grad_out", "saved_invstd", "weight"), ("out0",),
           when=("bn:native_or_eval", "bn_bwd_split", "mask:0", "eval")),
    ),
    # ------------------------------------------------------------------ activations, residual adds, arithmetic
    "aten::relu": _pointwise("relu", ("self",)),
    "aten::relu_": _pointwise("relu (in place)", ("self",), ("self",)),
    "aten::threshold_backward": _pointwise("threshold_backward (relu grad)", ("grad_output", "self")),
    "aten::add": _pointwise("add"),
    "aten::add_": _pointwise("add (in place)", ("self", "other"), ("self",)),
    "aten::sub": _pointwise("sub"),
    "aten::mul": _pointwise("mul"),
    "aten::mul_": _pointwise("mul (in place)", ("self", "other"), ("self",)),
    "aten::div": _pointwise("div"),
    "aten::div_": _pointwise("div (in place)", ("self", "other"), ("self",)),
    "aten::rsqrt": _pointwise("rsqrt", ("self",)),
    "aten::gt": _pointwise("gt"),
    "aten::where": _pointwise("where", ("condition", "self", "other")),
    "aten::pow": _pointwise("pow"),
    "aten::rsub": _pointwise("rsub"),
    "aten::neg": _pointwise("neg", ("self",)),
    "aten::sqrt": _pointwise("sqrt", ("self",)),
    "aten::reciprocal": _pointwise("reciprocal", ("self",)),
    "aten::minimum": _pointwise("minimum"),
    "aten::maximum": _pointwise("maximum"),
    "aten::clamp": _pointwise("clamp", ("self",)),
    "aten::clamp_min": _pointwise("clamp_min", ("self",)),
    "aten::lt": _pointwise("lt"),
    "aten::ge": _pointwise("ge"),
    "aten::eq": _pointwise("eq"),
    "aten::addcmul": _pointwise("addcmul", ("self", "tensor1", "tensor2")),
    # ------------------------------------------------------------------ pooling
    "aten::max_pool2d_with_indices": (
        _k("max_pool2d (values + int64 indices)", "elementwise", ("self",), ("out0", "out1")),
    ),
    "aten::max_pool2d_with_indices_backward": (
        _fill("fill (max_pool2d grad zero)"),
        _k("max_pool2d backward (scatter by indices)", "elementwise", ("grad_output", "indices"), ("out0",)),
    ),
    "aten::avg_pool2d": (_k("avg_pool2d", "elementwise", ("self",), ("out0",)),),
    "aten::avg_pool2d_backward": (_k("avg_pool2d backward", "elementwise", ("grad_output",), ("out0",)),),
    "aten::mean": (_k("mean (reduce)", "reduction", ("self",), ("out0",)),),
    "aten::sum": (_k("sum (reduce)", "reduction", ("self",), ("out0",)),),
    "aten::var_mean": (_k("var_mean (reduce)", "reduction", ("self",), ("out0", "out1")),),
    # ------------------------------------------------------------------ classifier and loss
    "aten::addmm": (_k("gemm + bias (cuBLASLt)", "gemm", ("self", "mat1", "mat2"), ("out0",), "addmm"),),
    "aten::mm": (_k("gemm (cuBLAS)", "gemm", ("self", "mat2"), ("out0",), "mm"),),
    "aten::_log_softmax": (_k("log_softmax", "reduction", ("self",), ("out0",)),),
    "aten::_log_softmax_backward_data": (
        _k("log_softmax backward", "reduction", ("grad_output", "output"), ("out0",)),
    ),
    "aten::nll_loss_forward": (_k("nll_loss forward", "reduction", ("self", "target"), ("out0", "out1")),),
    "aten::nll_loss_backward": (
        _fill("fill (nll_loss grad zero)"),
        _k("nll_loss backward", "elementwise", ("grad_output", "target", "total_weight"), ("out0",)),
    ),
    # ------------------------------------------------------------------ copies, fills, pads
    "aten::_to_copy": (_k("copy (dtype / layout cast)", "copy", ("self",), ("out0",)),),
    "aten::copy_": (_k("copy", "copy", ("src",), ("self",)),),
    "aten::clone": (_k("copy (clone)", "copy", ("self",), ("out0",)),),
    "aten::ones_like": (_fill("fill (ones_like)"),),
    "aten::zeros_like": (_fill("fill (zeros_like)"),),
    "aten::zeros": (_fill("fill (zeros)"),),
    "aten::new_zeros": (_fill("fill (new_zeros)"),),
    "aten::new_ones": (_fill("fill (new_ones)"),),
    "aten::full": (_fill("fill (full)"),),
    "aten::fill_": (_fill("fill", "self"),),
    "aten::arange": (_fill("arange"),),
    "aten::zero_": (_fill("fill (zero)", "self"),),
    "aten::constant_pad_nd": (
        _fill("fill (pad value)"),
        _k("copy (into padded)", "copy", ("self",), ("out0",)),
    ),
    "aten::slice_backward": (
        _fill("fill (slice grad zero)"),
        _k("copy (slice grad)", "copy", ("grad_output",), ("out0",)),
    ),
    # ------------------------------------------------------------------ optimizer (multi_tensor_apply)
    "aten::_foreach_mul_": (_k("multi_tensor_apply (mul_)", "elementwise", ("self", "other"), ("self",),
                               plan="multi_tensor_apply"),),
    "aten::_foreach_add_": (_k("multi_tensor_apply (add_)", "elementwise", ("self", "other"), ("self",),
                               plan="multi_tensor_apply"),),
    "aten::_foreach_addcmul_": (_k("multi_tensor_apply (addcmul_)", "elementwise",
                                   ("self", "tensor1", "tensor2"), ("self",), plan="multi_tensor_apply"),),
}

# Ops that launch no kernel: views and aliases, allocations (their memory is written by the kernel that fills it),
# metadata queries a tensor subclass dispatches, profiler markers.
NO_KERNEL = frozenset({
    "aten::detach", "aten::t", "aten::view", "aten::_unsafe_view", "aten::expand", "aten::as_strided",
    "aten::as_strided_", "aten::squeeze", "aten::unsqueeze", "aten::slice", "aten::select", "aten::permute",
    "aten::transpose", "aten::alias", "aten::_reshape_alias", "aten::split", "aten::unbind", "aten::lift_fresh",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::_local_scalar_dense", "aten::is_same_size", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::set_", "aten::resize_",
    "prim::device", "prim::layout",
    "profiler::_record_function_enter", "profiler::_record_function_enter_new", "profiler::_record_function_exit",
})


# ---------------------------------------------------------------------------------------------- one op's call
class Call:
    """One dispatched op: its arguments by schema name and its outputs, with the scratch tensors the table's
    rows refer to made on demand (meta tensors: only their sizes matter)."""

    def __init__(self, func, args: tuple, kwargs: dict, out) -> None:
        self.func = func
        self.name = func._schema.name
        self.args: Dict[str, object] = {}
        for i, arg in enumerate(func._schema.arguments):
            if i < len(args):
                self.args[arg.name] = args[i]
            elif arg.name in kwargs:
                self.args[arg.name] = kwargs[arg.name]
            elif arg.has_default_value():
                self.args[arg.name] = arg.default_value
            else:
                self.args[arg.name] = None
        self.outs: List[Optional[Tensor]] = list(out) if isinstance(out, (tuple, list)) else [out]
        self._scratch: Dict[str, Tensor] = {}

    def tensors(self, ref: str) -> List[Tensor]:
        """The tensors a row's operand reference names."""
        if ref.startswith("nhwc:"):
            inner = self.tensors(ref[5:])
            return [t if is_nhwc(t) else self._temp(ref, t) for t in inner]
        if ref.startswith("out") and ref[3:].isdigit():
            i = int(ref[3:])
            t = self.outs[i] if i < len(self.outs) else None
            return [t] if isinstance(t, Tensor) else []
        if ref in _SCRATCH:
            return [self._scratch.setdefault(ref, _SCRATCH[ref](self))]
        value = self.args.get(ref)
        if isinstance(value, Tensor):
            return [value]
        if isinstance(value, (list, tuple)):
            return [v for v in value if isinstance(v, Tensor)]
        return []

    def tensor(self, ref: str) -> Optional[Tensor]:
        found = self.tensors(ref)
        return found[0] if found else None

    def _temp(self, ref: str, like: Tensor) -> Tensor:
        if ref not in self._scratch:
            self._scratch[ref] = torch.empty(like.shape, dtype=like.dtype, device="meta")
        return self._scratch[ref]


def is_nhwc(t: Tensor) -> bool:
    """Whether a conv operand is NHWC-dense as cuDNN's NHWC engines read it (a 1-D conv's (N, C, L) tensor is
    (N, C, 1, L): NHWC-dense when C is innermost)."""
    if t.dim() == 4:
        return t.is_contiguous(memory_format=torch.channels_last)
    if t.dim() == 3:
        return t.permute(0, 2, 1).is_contiguous()
    return True


# ---------------------------------------------------------------------------------------------- BatchNorm choices
def _last_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def bn_grid(reduction: int, stride: int, coop: bool = True) -> Tuple[int, int]:
    """(grid.x, grid.y) of ATen's ``flexible_launch_configs`` for a channels-last BN kernel over
    ``reduction`` elements per channel and ``stride`` channels (MAX_BLOCK_SIZE 512, 16 elements per thread,
    tile width 32, at most 128 block rows; ``coop``: a grid reduction only from 8 rows up)."""
    block_x = min(_last_pow2(stride), 32)
    block_y = min(_last_pow2(math.ceil(reduction / 16)), 512 // block_x)
    if block_x * block_y != 512:
        block_x = min(_last_pow2(stride), 512 // block_y)
    grid_x = math.ceil(stride / block_x)
    grid_y = min(math.ceil(reduction / (block_y * 16)), 128)
    if coop and grid_y < 8:
        grid_y = 1
    return grid_x, grid_y


def _bn_geometry(call: Call) -> Tuple[int, int]:
    x = call.tensor("input")
    channels = x.shape[1]
    return x.numel() // max(channels, 1), channels


def _fits_int32(t: Tensor) -> bool:
    # ATen's canUse32BitIndexMath: the largest offset reachable fits a signed 32-bit index.
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) < 2 ** 31 - 1


def _bn_impl(t: Tensor) -> str:
    # ATen's batch_norm_choose_impl for one tensor.
    if not _fits_int32(t):
        return "general"
    if t.is_contiguous():
        return "channels_last" if t.dim() > 1 and t.stride(1) == 1 else "nchw"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "general"


def bn_backend(call: Call) -> str:
    """'cudnn', or ATen's kernel family: 'channels_last', 'nchw', 'general' — torch's choice for a CUDA input
    (ATen's _select_batch_norm_backend: never cuDNN for bfloat16, float16 only with float32 weights)."""
    x, w, b = call.tensor("input"), call.tensor("weight"), call.tensor("bias")
    train = _train(call)
    has_running = call.tensor("running_mean") is not None
    if call.name == "aten::native_batch_norm_backward":
        b = w  # the backward takes no bias; the forward that chose cuDNN had one with the weight
    cudnn = (w is not None and b is not None
             and x.dtype != torch.bfloat16 and w.dtype != torch.bfloat16
             and (x.dtype != torch.float16 or w.dtype == torch.float32)
             and (has_running or train) and x.dim() >= 3
             and (x.shape[0] <= 880801 if train else x.shape[0] <= 65535)
             and x.numel() < 2 ** 31 - 1)
    if cudnn:
        return "cudnn"
    impl = _bn_impl(x)
    if call.name == "aten::native_batch_norm_backward" and impl != "general":
        other = _bn_impl(call.tensor("grad_out"))
        impl = impl if other == impl else "general"
    return impl


def _train(call: Call) -> bool:
    return bool(call.args.get("training", call.args.get("train")))


def _mask(call: Call, i: int) -> bool:
    return bool(call.args["output_mask"][i])


def _bn_bwd_fused(call: Call) -> bool:
    # ATen fuses reduction and apply into one kernel for a non-channels-last input with 32-bit indexing.
    x, dy = call.tensor("input"), call.tensor("grad_out")
    channels_last = x.is_contiguous(memory_format=torch.channels_last) if x.dim() == 4 else False
    channels_last = channels_last or (x.is_contiguous() and x.dim() > 1 and x.stride(1) == 1)
    needs = _train(call) or _mask(call, 1) or _mask(call, 2)
    return needs and _mask(call, 0) and not channels_last and _fits_int32(x) and _fits_int32(dy)


def _bn_grid_rows(call: Call) -> bool:
    reduction, stride = _bn_geometry(call)
    return bn_backend(call) == "channels_last" and bn_grid(reduction, stride)[1] > 1


def _condition(call: Call, name: str) -> bool:
    head, _, ref = name.partition(":")
    if head == "train":
        return _train(call)
    if head == "eval":
        return not _train(call)
    if head == "mask":
        return _mask(call, int(ref))
    if head == "defined":
        return call.tensor(ref) is not None
    if head == "undefined":
        return call.tensor(ref) is None
    if head == "not_nhwc":
        t = call.tensor(ref)
        return t is not None and not is_nhwc(t)
    if head == "bn":
        backend = bn_backend(call)
        if ref == "native_or_eval":  # torch hands cuDNN only training backward passes
            return backend != "cudnn" or not _train(call)
        if ref == "native":
            return backend != "cudnn"
        return backend == ref
    if head == "bn_grid":
        return _bn_grid_rows(call)
    if head == "no_bn_grid":
        return not _bn_grid_rows(call)
    if head == "bn_bwd_fused":
        return _bn_bwd_fused(call)
    if head == "bn_bwd_split":
        return not _bn_bwd_fused(call)
    if head == "needs_reduction":
        return _train(call) or _mask(call, 1) or _mask(call, 2)
    raise KeyError(f"kernel table: unknown condition {name!r}")


def _scratch_f32(n: int) -> Tensor:
    return torch.empty(n, dtype=torch.float32, device="meta")


def _staging(floats_per_row: int) -> Callable[[Call], Tensor]:
    def make(call: Call) -> Tensor:
        reduction, stride = _bn_geometry(call)
        return _scratch_f32(floats_per_row * stride * bn_grid(reduction, stride)[1])
    return make


def _saved(call: Call) -> Tensor:
    # On CUDA, BN saves its mean and invstd per channel in the accumulate type (float for 16-bit inputs), in eval
    # too; a CPU run saves them in the input's dtype, and empty in eval. The kernels read and write CUDA's.
    x = call.tensor("input")
    return torch.empty(x.shape[1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                       device="meta")


_SCRATCH: Dict[str, Callable[[Call], Tensor]] = {
    "saved_mean": _saved,
    "saved_invstd": _saved,
    "sem": lambda call: torch.empty(bn_grid(*_bn_geometry(call))[0], dtype=torch.int32, device="meta"),
    "staging4": _staging(4),
    "staging2": _staging(2),
    "chan0": lambda call: _scratch_f32(call.tensor("input").shape[1]),
    "chan1": lambda call: _scratch_f32(call.tensor("input").shape[1]),
}


# ---------------------------------------------------------------------------------------------- FLOPs
def _conv_flops(call: Call) -> int:
    weight = call.tensor("weight")
    out = call.tensor("grad_output") if call.name == "aten::convolution_backward" else call.tensor("out0")
    # 2 x MACs: every output element sums C_in/groups x kernel-size products.
    return 2 * out.numel() * math.prod(weight.shape[1:])


def _mm_flops(a: Tensor, b: Tensor) -> int:
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


FLOPS: Dict[str, Callable[[Call], int]] = {
    "conv": _conv_flops,
    "addmm": lambda call: _mm_flops(call.tensor("mat1"), call.tensor("mat2")),
    "mm": lambda call: _mm_flops(call.tensor("self"), call.tensor("mat2")),
}


# ---------------------------------------------------------------------------------------------- multi_tensor_apply
CHUNK = 65536
MAX_TENSORS = {1: 770, 2: 448, 3: 336, 4: 252, 5: 210}  # 32 KB kernel arguments (CUDA >= 12.1, sm >= 70)
MAX_BLOCKS = 2240


def multi_tensor_apply_launches(numels: Sequence[int], depth: int) -> List[List[Tuple[int, int]]]:
    """ATen's ``multi_tensor_apply`` chunking: per launch, the (tensor index, elements) it processes."""
    plans: List[List[Tuple[int, int]]] = []
    current: Dict[int, int] = {}
    blocks = tensors = 0
    for t, numel in enumerate(numels):
        if numel == 0:
            continue
        tensors += 1
        chunks = math.ceil(numel / CHUNK)
        for chunk in range(chunks):
            current[t] = current.get(t, 0) + min(CHUNK, numel - chunk * CHUNK)
            blocks += 1
            tensors_full = tensors == MAX_TENSORS[depth] and chunk == chunks - 1
            if tensors_full or blocks == MAX_BLOCKS:
                plans.append(sorted(current.items()))
                current, blocks = {}, 0
                tensors = 0 if chunk == chunks - 1 else 1
    if blocks:
        plans.append(sorted(current.items()))
    return plans


def _record_multi_tensor_apply(call: Call, row: Kernel) -> None:
    lists = [[t for t in call.tensors(ref)] for ref in row.reads]
    lists = [lst for lst in lists if lst]
    inplace = call.name.endswith("_")
    depth = len(lists) + (0 if inplace else 1)
    selves = lists[0]
    for plan in multi_tensor_apply_launches([t.numel() for t in selves], depth):
        reads = sum(n * lst[t].element_size() for lst in lists for t, n in plan)
        writes = sum(n * selves[t].element_size() for t, n in plan)
        launches.record_counts(row.name, row.kind, reads, writes, 0)


# ---------------------------------------------------------------------------------------------- the mapping
def kernels(call: Call) -> List[Kernel]:
    """The rows of ``TABLE`` that run for this call (conditions evaluated)."""
    if call.name in NO_KERNEL:
        return []
    rows = TABLE.get(call.name)
    if rows is None:
        raise UnmappedOp(f"the account has no kernel mapping for {call.func} (fused_resnet/tools/kernel_table.py)")
    return [row for row in rows if all(_condition(call, c) for c in row.when)]


def record_call(call: Call) -> int:
    """Record the kernels eager PyTorch launches on CUDA for this call into the active recording; returns how
    many."""
    n = 0
    for row in kernels(call):
        if row.plan == "multi_tensor_apply":
            before = len(launches.active() or [])
            _record_multi_tensor_apply(call, row)
            n += len(launches.active() or []) - before
            continue
        reads = [t for ref in row.reads for t in call.tensors(ref)]
        writes = [t for ref in row.writes for t in call.tensors(ref)]
        launches.record(row.name, row.kind, reads, writes, FLOPS[row.flops](call) if row.flops else 0)
        n += 1
    return n


def is_known(name: str) -> bool:
    """Whether the table says what an op launches (possibly nothing)."""
    return name in NO_KERNEL or name in TABLE
