"""What a residual block is, apart from its tensors: the ``BlockSpec``, and the conventions every layer shares.

One block is a chain of conv → BN units joined by ReLUs, closed by a shortcut and a final ReLU (DESIGN §1), or left
open (``Shortcut.OPEN``: the last BN's output, for a module that closes the block in torch). Its
``BlockSpec`` holds, per unit, the conv geometry (stride, padding, dilation, groups) and the BN settings (eps,
momentum, whether it normalises with batch statistics, whether it updates running statistics), and for the block
the shortcut kind, option A's stride and the user's dimensionality. A 1-D block is stored as the 2-D block with
H = 1 (stride (1, s), padding (0, p)); ``dim`` says which one the user holds.

A spec is frozen and hashable: blocks build it once (``from_modules``) and keep it while their submodules'
settings stay the same, backends take it with the tensors, and it doubles as a cache key. Only the torch.library
layer (fused_resnet.ops) flattens it into schema arguments, ``spec.ints`` and ``spec.floats``; ``from_schema``
reads them back, and csrc/spec.h parses the same lists into one C++ struct (tests/test_spec.py holds the two
tables against each other).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import distributed


class Shortcut(enum.IntEnum):
    """What the block adds before its final ReLU (csrc/spec.h ``Shortcut``: the same kinds)."""

    NONE = 0  # plain network: y = relu(bn(a_last))
    IDENTITY = 1  # y = relu(bn(a_last) + x)
    PROJECTION = 2  # y = relu(bn(a_last) + bn_sc(conv_sc(x))); the projection is the last unit of the spec
    OPTION_A = 3  # y = relu(bn(a_last) + x[:, :, ::s, ::s] with channels zero-filled up to the output's)
    TENSOR = 4  # y = relu(bn(a_last) + residual), the residual computed by any module outside the op
    # y = bn(a_last): no shortcut and no final ReLU; the module closes the block itself in torch (timm's se, a
    # drop_path the op does not compute, its shortcut add and its last activation)
    OPEN = 5


class Residual(enum.IntEnum):
    """What a closing epilogue (a conv's, or the BN-apply kernel's) adds to its result: one table for the Triton
    kernels (``RES_MODE``) and the C++ kernels (csrc/spec.h ``Residual``)."""

    NONE = 0
    TENSOR = 1  # a tensor of the output's shape
    AFFINE = 2  # a tensor of the output's shape through its own per-channel scale and shift (a projection's BN)
    OPTION_A = 3  # the block input, subsampled by option A's stride, channels past its own zero; read in place


# Layout of the schema lists (csrc/spec.h has the same, checked by tests/test_spec.py).
HEADER_INTS = ("dim", "shortcut", "option_a_stride_h", "option_a_stride_w", "units")
UNIT_INTS = ("stride_h", "stride_w", "padding_h", "padding_w", "dilation_h", "dilation_w", "groups", "batch_stats",
             "update_running", "sync_group", "avg_pool")
UNIT_FLOATS = ("eps", "momentum")  # momentum None travels as NaN


@dataclasses.dataclass(frozen=True)
class UnitSpec:
    """One conv → BN unit. ``batch_stats``: the BN normalises with this batch's statistics (else its running
    ones); ``update_running``: the call updates its running statistics (torch's rule: training and tracking);
    ``sync_group``: 0, or the handle of the process group its statistics are reduced over (fused_resnet.distributed:
    an nn.SyncBatchNorm that torch would synchronise); ``avg_pool``: 1, or k: the conv reads its input average-
    pooled, ``AvgPool2d(k, k, ceil_mode=True, count_include_pad=False)`` (timm's "-d" shortcut), where the unit
    reads the block input (unit 0, or the projection)."""

    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    batch_stats: bool = True
    update_running: bool = True
    sync_group: int = 0
    avg_pool: int = 1


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """A block's units (the main path in order, then the projection shortcut's unit for ``Shortcut.PROJECTION``),
    its shortcut, option A's stride and the user's dimensionality (1 or 2)."""

    units: Tuple[UnitSpec, ...]
    shortcut: Shortcut = Shortcut.IDENTITY
    option_a_stride: Tuple[int, int] = (1, 1)
    dim: int = 2

    # torch.compile traces this whenever a block's spec is (re)built inside a compiled forward (a stem's first call,
    # train() / eval(), a changed momentum): nothing here may be what dynamo cannot trace on some supported torch
    # (2.11 traces neither an enum's constructor nor hash() of a tuple), so the shortcut is checked, not coerced,
    # and the hash is taken on first use, outside the traced code.
    def __post_init__(self) -> None:
        if not isinstance(self.shortcut, Shortcut):
            raise TypeError(f"shortcut must be a Shortcut, got {self.shortcut!r}")
        if not self.units:
            raise ValueError("a block needs at least one unit")
        if self.shortcut == Shortcut.PROJECTION and len(self.units) < 2:
            raise ValueError("a projection shortcut needs its unit after the main path's")
        for i, u in enumerate(self.units):
            # a pooled unit reads the block input, and the input's gradient is its alone where it is the first
            # unit (what the kernels spread back over the pool's windows is that unit's gradient only)
            first_alone = i != 0 or self.shortcut in (Shortcut.NONE, Shortcut.TENSOR, Shortcut.OPEN)
            if u.avg_pool != 1 and (u.avg_pool < 1 or not self.reads_input(i) or self.dim != 2 or not first_alone):
                raise ValueError(f"unit {i}: avg_pool {u.avg_pool} (k >= 1, on a 2-D block's projection, or its "
                                 f"first unit where the input has no other path)")
        ints = [self.dim, int(self.shortcut), *self.option_a_stride, len(self.units)]
        floats: List[float] = []
        for u in self.units:
            ints += [*u.stride, *u.padding, *u.dilation, u.groups, int(u.batch_stats), int(u.update_running),
                     u.sync_group, u.avg_pool]
            floats += [float(u.eps), math.nan if u.momentum is None else float(u.momentum)]
        # the schema form, computed once (not a cached_property: torch.compile cannot trace its lock)
        object.__setattr__(self, "_schema", (tuple(ints), tuple(floats)))

    def __hash__(self) -> int:
        # the spec is a cache key on every op call: hash it once (the schema form determines the fields)
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(self._schema[0]) ^ hash(tuple(u.eps for u in self.units))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def n_main(self) -> int:
        """Units on the main path: every unit but the projection shortcut's."""
        return len(self.units) - (1 if self.shortcut == Shortcut.PROJECTION else 0)

    def reads_input(self, i: int) -> bool:
        """Whether unit i's conv reads the block input (the first unit, and the projection's), not the unit
        below's output."""
        return i == 0 or i == self.n_main

    @property
    def pooled(self) -> bool:
        """Whether some unit reads its input average-pooled (``UnitSpec.avg_pool``)."""
        return any(u.avg_pool != 1 for u in self.units)

    @property
    def final_relu(self) -> bool:
        """Whether the block ends in a ReLU (every kind but ``Shortcut.OPEN``)."""
        return self.shortcut != Shortcut.OPEN

    @property
    def synced(self) -> bool:
        """Whether some unit reduces its statistics over a process group (its forward then returns the counts)."""
        return any(u.sync_group for u in self.units)

    @property
    def eps(self) -> Tuple[float, ...]:
        return tuple(u.eps for u in self.units)

    def with_batch_stats(self, batch_stats: Sequence[bool]) -> "BlockSpec":
        """The same block with these normalisation modes and no running-statistics update (eval: all False)."""
        units = tuple(dataclasses.replace(u, batch_stats=bool(b), update_running=False,
                                          sync_group=u.sync_group if b else 0)
                      for u, b in zip(self.units, batch_stats, strict=True))
        return dataclasses.replace(self, units=units)

    def with_shortcut(self, shortcut: Shortcut) -> "BlockSpec":
        """The same units closed by another kind (an open block beside its closed twin)."""
        return dataclasses.replace(self, shortcut=shortcut)

    # ------------------------------------------------------------------ the schema form (torch.library layer only)
    @property
    def ints(self) -> List[int]:
        return list(self._schema[0])

    @property
    def floats(self) -> List[float]:
        return list(self._schema[1])

    @staticmethod
    def from_schema(ints: Sequence[int], floats: Sequence[float]) -> "BlockSpec":
        """The spec of these schema lists. Under torch.compile a fake kernel may get them as SymInts / SymFloats
        (dynamic=True, or dynamo's automatic dynamic when a spec travels as a compiled frame's input and changes
        between calls): a spec is configuration, not a shape, so each is pinned to its value, which guards the
        graph on it (a different spec recompiles) and keeps the spec hashable."""
        ints, floats = tuple(ints), tuple(floats)
        if not _PLAIN_NUMBERS.issuperset(map(type, ints + floats)):  # a per-element isinstance costs 10x more
            ints, floats = tuple(int(v) for v in ints), tuple(float(v) for v in floats)
        return _from_schema(ints, floats)

    # ------------------------------------------------------------------ shapes
    def output_shapes(self, x_shape: Sequence[int], weight_shapes: Sequence[Sequence[int]]) -> List[List[int]]:
        """[N, K, P, Q] of every unit's conv output (2-D form), for an input of ``x_shape``."""
        shapes, h, w = [], x_shape[2], x_shape[3]
        for i, (u, ws) in enumerate(zip(self.units, weight_shapes, strict=True)):
            if i == self.n_main:  # the projection reads the block input
                h, w = x_shape[2], x_shape[3]
            h, w = pooled_size(h, u.avg_pool), pooled_size(w, u.avg_pool)
            h = conv_out_size(h, ws[2], u.stride[0], u.padding[0], u.dilation[0])
            w = conv_out_size(w, ws[3], u.stride[1], u.padding[1], u.dilation[1])
            shapes.append([x_shape[0], ws[0], h, w])
        return shapes


_PLAIN_NUMBERS = frozenset((int, float))


@functools.lru_cache(maxsize=1024)
def _from_schema(ints: Tuple[int, ...], floats: Tuple[float, ...]) -> BlockSpec:
    head, per = len(HEADER_INTS), len(UNIT_INTS)
    n = ints[4] if len(ints) >= head else -1
    if n < 1 or len(ints) != head + per * n or len(floats) != len(UNIT_FLOATS) * n:
        raise ValueError(f"malformed block spec: {len(ints)} ints and {len(floats)} floats for {n} unit(s)")
    units = []
    for i in range(n):
        v = ints[head + per * i: head + per * (i + 1)]
        eps, momentum = floats[2 * i: 2 * i + 2]
        units.append(UnitSpec((v[0], v[1]), (v[2], v[3]), (v[4], v[5]), v[6], eps,
                              None if math.isnan(momentum) else momentum, bool(v[7]), bool(v[8]), v[9], v[10]))
    return BlockSpec(tuple(units), Shortcut(ints[1]), (ints[2], ints[3]), ints[0])


# --------------------------------------------------------------------------------------------- reading modules
CONV_TYPES = (nn.Conv1d, nn.Conv2d)
# A frozen BN: running statistics, no update. A SyncBatchNorm: statistics over its process group where torch
# synchronises them (fused_resnet.distributed), else a BatchNorm.
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d)


def unit_types_reason(conv_t: type, bn_t: type) -> Optional[str]:
    """Why a conv of type ``conv_t`` followed by a norm layer of type ``bn_t`` is no unit the kernels implement, or
    None."""
    if conv_t not in CONV_TYPES:
        return f"conv is {conv_t.__name__}, expected nn.Conv1d or nn.Conv2d"
    if bn_t not in BN_TYPES:
        return (f"norm layer is {bn_t.__name__}, expected nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm or "
                f"FrozenBatchNorm2d")
    one_d = conv_t is nn.Conv1d
    if (bn_t is nn.BatchNorm1d and not one_d) or (one_d and bn_t in (nn.BatchNorm2d, FrozenBatchNorm2d)):
        return f"{conv_t.__name__} followed by {bn_t.__name__}"
    return None


def unit_reading(conv, bn) -> tuple:
    """Every setting of a (conv, BN) pair that the fused computation depends on, as plain values, read the way
    torch's forward of these modules reads them: the one place the blocks look at their submodules' settings.

    It is both a unit's cache key and the only input of its spec (:func:`unit_from_reading`), so the two cannot
    disagree: a setting left out here is one the spec cannot depend on. Tensor values, shapes and dtypes are not
    settings: the op reads them on every call (but for a FrozenBatchNorm2d's buffers' dtypes, which set the
    dtype its forward computes in). Attributes torch's forward does not read (a conv's kernel_size,
    in_channels, output_padding; a BN's affine, num_features) are left out for the same reason — changing them
    changes nothing torch computes (tests/test_settings.py changes every attribute to show it). Runs on every
    call, also inside torch.compile: plain attribute reads only."""
    tc, tb = type(conv), type(bn)
    if tc not in CONV_TYPES or tb not in BN_TYPES:
        return (tc, tb)  # unit_types_reason says why
    stride, padding, dilation = conv.stride, conv.padding, conv.dilation
    if type(stride) is not tuple or type(padding) is not tuple or type(dilation) is not tuple:
        # a list could change in place behind an equal key: frozen here
        stride, padding, dilation = _frozen(stride), _frozen(padding), _frozen(dilation)
    weight = _member(conv, conv._parameters, "weight")
    head = (tc, weight.dim() if isinstance(weight, Tensor) else None, _member(conv, conv._parameters, "bias") is None,
            conv.padding_mode, stride, padding, dilation, conv.groups, tb, bn.eps)
    buffers = bn._buffers
    if tb is FrozenBatchNorm2d:
        # its forward reads its four buffers and eps, nothing else; its output's dtype is the promotion of its
        # input's and its buffers' (no BatchNorm dtype rule), so their dtypes are settings here, read beside the
        # conv weight's (the input's outside autocast)
        frozen = [_member(bn, buffers, k) for k in _FROZEN_BUFFERS]
        return head + (any(t is None for t in frozen), weight.dtype if isinstance(weight, Tensor) else None,
                       tuple(t.dtype for t in frozen if isinstance(t, Tensor)))
    return head + (bn.training, bn.track_running_stats, bn.momentum, _member(bn, buffers, "running_mean") is None,
                   _member(bn, buffers, "running_var") is None, _member(bn, buffers, "num_batches_tracked") is None,
                   distributed.sync_handle(bn))


_FROZEN_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def _member(module, registered: dict, name: str):
    """``getattr(module, name)`` for a parameter or buffer, through the registry it lives in: nn.Module's
    ``__getattr__`` fallback costs ten times more, on every call. A name no longer registered (deleted, then set
    as a plain attribute) is read as torch's forward reads it."""
    return registered[name] if name in registered else getattr(module, name)


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


def _pair(value, one_d: bool, least: int) -> Optional[Tuple[int, int]]:
    """A conv's stride / padding / dilation as the (h, w) pair of the 2-D ops, or None where torch's own conv must
    judge it (a string padding, a wrong length, a value torch refuses: the eager call raises torch's error)."""
    if type(value) is int:
        value = (value,) if one_d else (value, value)
    if type(value) is not tuple or len(value) != (1 if one_d else 2) or not all(
            type(v) is int and v >= least for v in value):
        return None
    return ((1 if least else 0, value[0]) if one_d else value)


def unit_from_reading(reading: tuple) -> Union[UnitSpec, str]:
    """The spec of a unit from its :func:`unit_reading`, or why the fused op cannot compute that unit as torch
    would (then the call runs the modules' own forward). torch's BN rules: batch statistics in training or when
    there are no running buffers; running statistics updated in training when tracked; momentum None is the
    cumulative average, and with no num_batches_tracked torch's factor is 0. A frozen BN (torchvision's
    FrozenBatchNorm2d) always normalises with its buffers."""
    if len(reading) == 2:
        return unit_types_reason(*reading)
    conv_t, wdim, no_bias, padding_mode, stride, padding, dilation, groups, bn_t, eps, *bn_state = reading
    reason = unit_types_reason(conv_t, bn_t)
    if reason is not None:
        return reason
    one_d = conv_t is nn.Conv1d
    if wdim != (3 if one_d else 4):
        return f"the {conv_t.__name__}'s weight " + ("is None" if wdim is None else f"has {wdim} dimensions")
    if not no_bias:
        return "conv has a bias (ResNet convs feeding a BN have none)"
    if padding_mode != "zeros" or isinstance(padding, str):
        return f"conv padding {padding!r} / padding_mode {padding_mode!r} (need explicit zero padding)"
    geometry = (_pair(stride, one_d, 1), _pair(padding, one_d, 0), _pair(dilation, one_d, 1))
    if None in geometry or type(groups) is not int or groups < 1:
        return (f"conv stride {stride!r}, padding {padding!r}, dilation {dilation!r}, groups {groups!r}: left to "
                f"torch's own conv")
    if type(eps) not in (int, float):
        return f"eps {eps!r} is not a number"
    if bn_t is FrozenBatchNorm2d:
        missing, weight_dtype, dtypes = bn_state
        if missing:
            return "a FrozenBatchNorm2d buffer is None"
        if any(d != weight_dtype for d in dtypes):
            return (f"FrozenBatchNorm2d buffers in {', '.join(sorted({str(d) for d in dtypes}))} beside a "
                    f"{weight_dtype} conv weight (its forward computes in their promoted dtype)")
        return UnitSpec(*geometry, groups, float(eps), None, False, False)
    training, track, momentum, no_mean, no_var, no_count, sync = bn_state
    if not eps > 0:  # torch refuses it in training, and in eval too from some versions on: its own forward decides
        return f"eps {eps!r} <= 0: torch's own BatchNorm decides"
    if bn_t is nn.SyncBatchNorm and training and track and no_count:
        return "num_batches_tracked is None in training (torch's SyncBatchNorm refuses it)"
    if momentum is not None and type(momentum) not in (int, float):
        return f"momentum {momentum!r} is not a number"
    if no_mean != no_var:
        return "one of running_mean / running_var is None"
    if no_mean and training and track and not no_count:
        return "num_batches_tracked without running statistics (torch counts the batch)"
    update = bool(training and track and not no_mean)
    if update and momentum is None and no_count:
        momentum = 0.0  # torch's exponential_average_factor stays 0: the running statistics do not move
    return UnitSpec(*geometry, groups, float(eps), None if momentum is None else float(momentum),
                    batch_stats=bool(training or no_mean), update_running=update, sync_group=sync)


def unit_from_modules(conv, bn) -> UnitSpec:
    """A unit's spec from its torch conv (Conv1d or Conv2d) and BatchNorm; ValueError naming the reason where the
    fused op cannot compute it."""
    unit = unit_from_reading(unit_reading(conv, bn))
    if isinstance(unit, str):
        raise ValueError(unit)
    return unit


def pool_reading(pool: Optional[nn.Module]) -> Optional[tuple]:
    """Every setting of an average pool before a unit's conv that its forward reads (timm's "-d" shortcut:
    ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)``), as :func:`unit_reading` reads a unit's; None
    for no pool."""
    if pool is None:
        return None
    if type(pool) is not nn.AvgPool2d:
        return (type(pool),)
    return (nn.AvgPool2d, _frozen(pool.kernel_size), _frozen(pool.stride), _frozen(pool.padding), pool.ceil_mode,
            pool.count_include_pad, pool.divisor_override)


def avg_pool_from_reading(reading: Optional[tuple]) -> Union[int, str]:
    """``UnitSpec.avg_pool`` of a :func:`pool_reading` (1: none), or why the fused op does not pool as it does."""
    if reading is None:
        return 1
    if len(reading) == 1:
        return f"the pool is {reading[0].__name__}, the kernels pool as nn.AvgPool2d"
    _, kernel, stride, padding, ceil_mode, count_include_pad, divisor = reading
    k = kernel if type(kernel) is int else (kernel[0] if type(kernel) is tuple and len(kernel) == 2
                                            and kernel[0] == kernel[1] and type(kernel[0]) is int else None)
    if (k is None or k < 1 or stride not in (k, (k, k)) or padding not in (0, (0, 0)) or ceil_mode is not True
            or count_include_pad is not False or divisor is not None):
        return (f"AvgPool2d(kernel_size={kernel!r}, stride={stride!r}, padding={padding!r}, ceil_mode={ceil_mode!r}, "
                f"count_include_pad={count_include_pad!r}, divisor_override={divisor!r}): the kernels pool with "
                f"stride = kernel, no padding, ceil_mode=True, count_include_pad=False")
    return k


def spec_from_readings(readings: Sequence[tuple], shortcut: Shortcut, option_a_stride: int = 1,
                       pool: Optional[tuple] = None) -> Union[BlockSpec, Tuple[int, str]]:
    """The spec of a block whose units have these readings (the projection's last), the last unit's input
    average-pooled as ``pool`` (a :func:`pool_reading`) reads, or (index of the first unit that cannot run fused,
    why)."""
    units = []
    for i, reading in enumerate(readings):
        unit = unit_from_reading(reading)
        if isinstance(unit, str):
            return i, unit
        units.append(unit)
    dim = 1 if readings[0][0] is nn.Conv1d else 2
    if pool is not None:
        k = avg_pool_from_reading(pool) if dim == 2 else "an average pool before a Conv1d"
        if isinstance(k, str):
            return len(units) - 1, k
        units[-1] = dataclasses.replace(units[-1], avg_pool=k)
    stride = (1, option_a_stride) if dim == 1 else (option_a_stride, option_a_stride)
    return BlockSpec(tuple(units), shortcut, stride if shortcut == Shortcut.OPTION_A else (1, 1), dim)


def from_modules(convs: Sequence, bns: Sequence, shortcut: Shortcut, option_a_stride: int = 1) -> BlockSpec:
    """The spec of a block whose units are these (conv, bn) modules (the projection's last); ValueError naming
    the reason where the fused op cannot compute one of them."""
    spec = spec_from_readings([unit_reading(c, b) for c, b in zip(convs, bns, strict=True)], shortcut,
                              option_a_stride)
    if not isinstance(spec, BlockSpec):
        raise ValueError(f"unit {spec[0]}: {spec[1]}")
    return spec


# --------------------------------------------------------------------------------------------- conventions
def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / statistics dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """The user's layout, which y and dx follow: channels_last when x is, else contiguous (NCHW)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pooled_size(size: int, k: int) -> int:
    """The output size of ``AvgPool2d(k, k, ceil_mode=True)`` on ``size`` (>= 1): every window starts inside."""
    return -(-size // k)
