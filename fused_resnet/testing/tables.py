"""The one tolerance table and the one shape table, imported by tests and benchmarks alike: block cases, conv
problems (small ones for the kernel tests, and every conv of a torchvision ResNet traced on the meta device).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# dtype → (factor on torch's own error, floor). The floor is 4× the dtype's machine epsilon (relative error),
# except in float64, where PyTorch's same-dtype run *is* the oracle (its error is exactly 0) and the floor alone
# bounds the reassociation error of a different summation order through a deep network (measured up to 1.4e-12;
# the logic errors injected in testing showed 1e-3 and more).
TOLERANCE: Dict[torch.dtype, tuple] = {
    torch.float64: (2.0, 1e-10),
    torch.float32: (2.0, 4 * torch.finfo(torch.float32).eps),
    torch.float16: (2.0, 4 * torch.finfo(torch.float16).eps),
    torch.bfloat16: (2.0, 4 * torch.finfo(torch.bfloat16).eps),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

# Block cases for tests: (block, inplanes, planes, stride, shortcut, (N, H, W)).
# shortcut: "identity", "A" (zero-padded identity), "B" (projection where the shape changes; here it does),
# "C" (projection where it does not), "plain" (no shortcut), "tensor" (a downsample module the op does not
# recognise, e.g. avg-pool + projection: its output is added as a tensor). Awkward sizes on purpose: odd channel
# counts (3, 24, 40), H ≠ W, odd spatial sizes, N = 1.
BLOCK_CASES = [
    ("basic", 16, 16, 1, "identity", (2, 8, 8)),
    ("basic", 16, 24, 2, "B", (2, 9, 7)),
    ("basic", 8, 24, 2, "A", (3, 8, 6)),
    ("basic", 24, 24, 1, "C", (2, 5, 6)),
    ("basic", 3, 40, 2, "plain", (2, 7, 7)),
    ("basic", 16, 32, 2, "tensor", (2, 8, 8)),
    ("bottleneck", 40, 10, 1, "identity", (2, 6, 5)),
    ("bottleneck", 24, 6, 2, "B", (1, 9, 9)),
    ("bottleneck", 16, 8, 1, "C", (2, 4, 4)),
    ("bottleneck", 32, 16, 2, "A", (2, 6, 6)),
]


def _meta_trace(model_name: str, batch: int, size: int, types, record, named=lambda name: True) -> list:
    """Run torchvision's ``model_name`` on the meta device (no memory, no compute) and collect
    ``record(module, input)`` for every module of ``types`` whose qualified name passes ``named``, distinct
    values in order of first appearance."""
    import torchvision

    model = getattr(torchvision.models, model_name)().to("meta").eval()
    found: list = []
    hooks = [m.register_forward_hook(lambda m, i, o: found.append(record(m, i[0])))
             for name, m in model.named_modules() if isinstance(m, types) and named(name)]
    model(torch.empty(batch, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    return list(dict.fromkeys(found))


def bn_input_shapes(model_name: str, batch: int, size: int = 224) -> List[tuple]:
    """Every distinct (N, C, H, W) that a BatchNorm of torchvision's ``model_name`` sees."""
    return _meta_trace(model_name, batch, size, nn.BatchNorm2d, lambda m, x: tuple(x.shape))


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution problem: input (n, c, h, w), k filters of r x s, stride (both axes), padding (h, w)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: int
    pad: Tuple[int, int]

    @property
    def out_hw(self) -> Tuple[int, int]:
        return ((self.h + 2 * self.pad[0] - self.r) // self.stride + 1,
                (self.w + 2 * self.pad[1] - self.s) // self.stride + 1)

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of one fprop (dgrad and wgrad have the same count)."""
        p, q = self.out_hw
        return 2 * self.n * p * q * self.k * self.c * self.r * self.s

    def problem(self, dtype: torch.dtype, device, seed: int = 0, channels_last: bool = True):
        """Seeded (x, w, dy) for this problem on ``device`` in ``dtype``: standard-normal input and output gradient,
        weights scaled by 1/sqrt(fan-in)."""
        g = torch.Generator(device=device).manual_seed(seed)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        fan_in = self.c * self.r * self.s
        shapes = ((self.n, self.c, self.h, self.w), (self.k, self.c, self.r, self.s), (self.n, self.k, *self.out_hw))
        x, w, dy = (torch.randn(s, device=device, generator=g) for s in shapes)
        return [t.to(dtype).contiguous(memory_format=fmt) for t in (x, w / fan_in**0.5, dy)]

    def backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dgrad: bool = True, wgrad: bool = True):
        """torch's (dx, dW) of this conv (None where not requested), in the inputs' dtype."""
        dx, dw, _ = torch.ops.aten.convolution_backward(dy, x, w, None, [self.stride] * 2, list(self.pad), [1, 1],
                                                        False, [0, 0], 1, [dgrad, wgrad, False])
        return dx, dw

    def torch_pass(self, which: str, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """torch's result of one pass: "fprop" (y), "dgrad" (dx) or "wgrad" (dW)."""
        if which == "fprop":
            return F.conv2d(x, w, None, self.stride, self.pad)
        dx, dw = self.backward(dy, x, w, dgrad=which == "dgrad", wgrad=which == "wgrad")
        return dx if which == "dgrad" else dw

    def triton_pass(self, which: str, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """The Triton conv engine's result of the same pass (imports Triton)."""
        from ..kernels import conv as kernels

        stride = (self.stride, self.stride)
        if which == "fprop":
            return kernels.conv_fprop(x, w, stride, self.pad)
        if which == "dgrad":
            return kernels.conv_dgrad(dy, w, (self.h, self.w), stride, self.pad)
        return kernels.conv_wgrad(dy, x, (self.r, self.s), stride, self.pad)

    def __str__(self) -> str:
        pad = f"{self.pad[0]},{self.pad[1]}"
        return f"{self.n}x{self.c}x{self.h}x{self.w}-k{self.k}-{self.r}x{self.s}-s{self.stride}-p{pad}"


def conv_shapes(model_name: str, batch: int, size: int = 224, chained: bool = False) -> List[ConvShape]:
    """Every distinct convolution of torchvision's ``model_name`` (stem included) at this batch and image size;
    with ``chained``, only the convs whose input is the previous unit's BN + ReLU inside a block (a block's
    ``conv2`` and ``conv3``)."""
    def record(m: nn.Conv2d, x: torch.Tensor) -> ConvShape:
        return ConvShape(x.shape[0], x.shape[1], x.shape[2], x.shape[3], m.out_channels, *m.kernel_size,
                         m.stride[0], tuple(m.padding))

    def named(name: str) -> bool:
        return not chained or name.rsplit(".", 1)[-1] in ("conv2", "conv3")

    return _meta_trace(model_name, batch, size, nn.Conv2d, record, named)


# Small conv problems for the kernel tests (CPU interpreter and GPU): stride 1 and 2, padding 0/1/3, kernels 1x1,
# 3x3, 7x7 and 1x3 (a Conv1d as H = 1), odd channel counts (3, 24, 40), N = 1, H ≠ W, 1x1 and 7x7 spatial sizes,
# C < 16 (the flattened reduction path), and problems larger than the interpreter's tiles (1024 rows, 256 channels)
# in every GEMM dimension, so that multi-tile grids and multi-step reduction loops run on the CPU too.
CONV_CASES = [
    ConvShape(2, 3, 13, 11, 16, 7, 7, 2, (3, 3)),
    ConvShape(2, 24, 8, 7, 40, 3, 3, 1, (1, 1)),
    ConvShape(1, 16, 7, 9, 24, 3, 3, 2, (1, 1)),
    ConvShape(2, 40, 7, 7, 24, 1, 1, 2, (0, 0)),
    ConvShape(3, 40, 7, 7, 40, 3, 3, 1, (1, 1)),
    ConvShape(2, 32, 1, 1, 16, 1, 1, 1, (0, 0)),
    ConvShape(2, 16, 3, 3, 8, 3, 3, 1, (0, 0)),
    ConvShape(2, 16, 1, 20, 24, 1, 3, 1, (0, 1)),
    ConvShape(2, 1, 1, 40, 16, 1, 3, 1, (0, 1)),
    ConvShape(2, 80, 24, 24, 72, 3, 3, 1, (1, 1)),
    ConvShape(1, 272, 5, 4, 264, 3, 3, 1, (1, 1)),
]
