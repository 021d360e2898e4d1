"""Drop-in residual blocks.

``FusedBasicBlock`` / ``FusedBottleneck`` take torchvision's constructor signature (inplanes, planes, stride=1,
downsample=None, groups=1, base_width=64, dilation=1, norm_layer=None) plus keyword-only ``backend``, ``plain``
(no shortcut: the plain twin of the depth experiment), ``dim`` (2, or 1 for Conv1d/BatchNorm1d sequence
models) and ``residual_scale`` (y = relu(α·bn_last(...) + shortcut), α fixed or learnable; see
``set_residual_scale``). Submodule, parameter and buffer names are torchvision's (conv1, bn1, conv2, bn2, conv3, bn3,
downsample.0, downsample.1), so state_dicts load both ways with strict=True.

``EagerBasicBlock`` / ``EagerBottleneck`` are the same layouts computed with plain torch modules: what
``revert`` produces for blocks torchvision has no class for (option A, plain, 1-D).
"""
from __future__ import annotations

import collections
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from . import backends, guard
from .functional import block_plan, block_spec, run_block, unit_unsupported_reason
from .spec import BlockSpec, Shortcut, UnitSpec, avg_pool_from_reading, pool_reading, unit_types_reason

_GUARD_ATTR = "_fused_resnet_guard"  # (signature, blocker) in the module's __dict__


def _conv(dim: int, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, dilation: int = 1):
    cls = nn.Conv2d if dim == 2 else nn.Conv1d
    padding = dilation if kernel == 3 else 0
    return cls(cin, cout, kernel, stride=stride, padding=padding, groups=groups, bias=False, dilation=dilation)


def _check_dim(dim: int) -> None:
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 (Conv1d/BatchNorm1d) or 2 (Conv2d/BatchNorm2d), got {dim}")


class ShortcutA(nn.Module):
    """Option-A shortcut (the ResNet paper's CIFAR networks): identity subsampled by ``stride``, with the extra
    output channels zero-filled (appended after the input channels). Parameter-free; used as ``downsample``."""

    def __init__(self, stride: int, out_channels: int):
        super().__init__()
        self.stride = stride
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] > self.out_channels:
            raise RuntimeError(f"option A cannot shrink channels: input has {x.shape[1]}, target {self.out_channels}")
        sub = x[..., :: self.stride, :: self.stride] if x.dim() == 4 else x[..., :: self.stride]
        pad = (0, 0) * (x.dim() - 2) + (0, self.out_channels - x.shape[1])
        return F.pad(sub, pad)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, out_channels={self.out_channels}"


class _BlockLayout(nn.Module):
    """Submodules shared by the eager and fused blocks; ``_units()`` lists the main path's (conv, bn) pairs."""

    expansion: int = 1
    _n_units = 0

    def _setup(self, downsample: Optional[nn.Module], stride: int, plain: bool, dim: int) -> None:
        if plain and downsample is not None:
            raise ValueError("a plain block has no shortcut, so it takes no downsample module")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.plain = plain
        self.dim = dim

    def _units(self) -> List[Tuple[nn.Module, nn.Module]]:
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(1, self._n_units + 1)]

    def extra_repr(self) -> str:
        scale = residual_scale_of(self)
        return ", ".join(filter(None, ["plain=True" if self.plain else "",
                                       "" if scale is None else f"residual_scale={_describe_scale(scale)}"]))


RESIDUAL_SCALE = "residual_scale"  # the parameter / buffer name, in the state_dict only when a block uses one


def set_residual_scale(block: nn.Module, residual_scale: Union[None, float, str]) -> None:
    """Give ``block`` y = relu(α·bn_last(conv_last(...)) + shortcut): ``None`` (no α, torchvision's block), a float
    (α a fixed buffer) or ``"learnable"`` (α a parameter, 0 at initialisation so that every block starts as the
    identity: SkipInit). The state_dict holds ``residual_scale`` only when α is used."""
    learnable = isinstance(residual_scale, str) and residual_scale == "learnable"
    fixed = isinstance(residual_scale, (int, float)) and not isinstance(residual_scale, bool)
    if not (residual_scale is None or learnable or fixed):
        raise ValueError(f"residual_scale must be None, a float or 'learnable', got {residual_scale!r}")
    if residual_scale_of(block) is not None:
        delattr(block, RESIDUAL_SCALE)
    device = block.conv1.weight.device
    if learnable:
        block.register_parameter(RESIDUAL_SCALE, nn.Parameter(torch.zeros((), device=device)))
    elif fixed:
        block.register_buffer(RESIDUAL_SCALE, torch.tensor(float(residual_scale), device=device))


def residual_scale_of(block: nn.Module) -> Optional[Tensor]:
    """The block's α (a 0-d parameter or buffer), or None."""
    return block._parameters.get(RESIDUAL_SCALE, block._buffers.get(RESIDUAL_SCALE))


def _describe_scale(scale: Tensor) -> str:
    return "'learnable'" if isinstance(scale, nn.Parameter) else f"{float(scale):g}"


def _norm(norm_layer: Optional[Callable[..., nn.Module]], dim: int) -> Callable[..., nn.Module]:
    if norm_layer is not None:
        return norm_layer
    return nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d


class _BasicLayout(_BlockLayout):
    expansion = 1
    _n_units = 2

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, plain=False, dim=2, residual_scale=None):
        super().__init__()
        _check_dim(dim)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        norm_layer = _norm(norm_layer, dim)
        self.conv1 = _conv(dim, inplanes, planes, 3, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv(dim, planes, planes, 3)
        self.bn2 = norm_layer(planes)
        self._setup(downsample, stride, plain, dim)
        set_residual_scale(self, residual_scale)


class _BottleneckLayout(_BlockLayout):
    expansion = 4
    _n_units = 3

    def __init__(self, inplanes, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1,
                 norm_layer=None, *, plain=False, dim=2, residual_scale=None):
        super().__init__()
        _check_dim(dim)
        norm_layer = _norm(norm_layer, dim)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv(dim, inplanes, width, 1)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv(dim, width, width, 3, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv(dim, width, planes * self.expansion, 1)
        self.bn3 = norm_layer(planes * self.expansion)
        self._setup(downsample, stride, plain, dim)
        set_residual_scale(self, residual_scale)


class _EagerForward:
    """torchvision's forward, generalised to plain blocks and any number of units."""

    def forward(self, x: Tensor) -> Tensor:
        units = self._units()
        out = x
        for i, (conv, bn) in enumerate(units):
            out = bn(conv(out))
            if i < len(units) - 1:
                out = self.relu(out)
        scale = residual_scale_of(self)
        if scale is not None:
            out = out * scale  # a 0-d tensor: out keeps its dtype
        if not self.plain:
            out += x if self.downsample is None else self.downsample(x)  # in place, as torchvision: no broadcast
        return self.relu(out)


def _is_projection(module: nn.Module) -> bool:
    """A downsample the op computes itself: Sequential(conv, BN) of the types the kernels implement (its settings
    are read on every call with the other units')."""
    unit = shortcut_unit(module)
    return unit is not None and unit[0] is None


def shortcut_unit(downsample: Optional[nn.Module]):
    """A downsample that is one conv-BN unit of the types the kernels implement, alone (a projection) or after one
    module of its own that runs in torch first (timm's "-d" avg-pool): (that module or None, conv, bn); else
    None."""
    if type(downsample) is not nn.Sequential or len(downsample) not in (2, 3):
        return None
    mods = list(downsample)
    if unit_types_reason(type(mods[-2]), type(mods[-1])) is not None:
        return None
    return (mods[0] if len(mods) == 3 else None), mods[-2], mods[-1]


def inner_projection(downsample: Optional[nn.Module],
                     backend: str) -> Optional[Tuple[Optional[nn.Module], nn.Module, nn.Module]]:
    """(pool or None, conv, bn) of a downsample the op computes as its projection although a module comes first:
    an nn.Identity (None), or an average pool whose pooling the op computes on ``backend`` (the backends serving
    it declare ``avg_pool``): timm's "-d" shortcut, AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) or
    nn.Identity, then a 1x1 conv and a BN. Nothing on it hooked and its unit's settings fused (else it runs as its
    modules, or as an op of its own). None otherwise. Its settings are read again on every call with the units'."""
    sc = shortcut_unit(downsample)
    if (sc is None or type(sc[0]) not in (nn.Identity, nn.AvgPool2d) or any(guard.hooked(m) for m in (downsample, *sc))
            or unit_unsupported_reason(sc[1], sc[2]) is not None):  # a conv bias, ...: the op adds its output
        return None
    if type(sc[0]) is nn.Identity:
        return None, sc[1], sc[2]
    k = avg_pool_from_reading(pool_reading(sc[0]))
    if isinstance(k, str) or geometry_reason([sc[1:]], backend, shortcut=Shortcut.OPEN, avg_pool=k) is not None:
        return None
    return sc


def fused_away(units: List[Tuple[nn.Module, nn.Module]], activations: Dict[str, nn.Module],
               downsample: Optional[nn.Module]) -> Dict[str, nn.Module]:
    """name → module of every submodule of a residual block whose forward the fused op replaces: the units, the
    activations, and a projection or option-A shortcut (any other downsample module runs as itself)."""
    mods: Dict[str, nn.Module] = {}
    for i, (conv, bn) in enumerate(units, start=1):
        mods[f"conv{i}"], mods[f"bn{i}"] = conv, bn
    mods.update(activations)
    if downsample is not None and (type(downsample) is ShortcutA or _is_projection(downsample)):
        mods["downsample"] = downsample
        mods.update({f"downsample.{k}": m for k, m in downsample._modules.items()})
    return mods


def geometry_reason(units: List[Tuple[nn.Module, nn.Module]], backend: str = "auto",
                    residual_scale: bool = False, shortcut: Shortcut = Shortcut.NONE,
                    avg_pool: int = 1) -> Optional[str]:
    """Why convert leaves these units unfused on ``backend``: what their convs need (groups, dilation,
    dimensionality; a residual scale; an open closing, ``shortcut=Shortcut.OPEN``; the first unit's input pooled,
    ``avg_pool``) that the backends serving it do not declare (backends.block_refusal), or None."""
    dim = 1 if units[0][0].weight.dim() == 3 else 2
    spec = BlockSpec(tuple(UnitSpec(dilation=((1,) + tuple(c.dilation))[-2:], groups=c.groups,
                                    avg_pool=avg_pool if i == 0 else 1) for i, (c, _) in enumerate(units)),
                     shortcut, dim=dim)
    return backends.block_refusal(backend, spec, residual_scale)


def structure_blocker(block: nn.Module, units: List[Tuple[nn.Module, nn.Module]]) -> Optional[str]:
    """Why the submodules of this residual block (fused or torchvision's) are not what the kernels implement (types,
    activations, hooks), or None; their settings are :func:`settings_reason`'s."""
    activations = {"relu": block.relu}
    downsample = None if getattr(block, "plain", False) else block.downsample
    return guard.blocker(units, activations, fused_away(units, activations, downsample))


def settings_reason(block: nn.Module, units: List[Tuple[nn.Module, nn.Module]],
                    shortcut: bool = True) -> Optional[str]:
    """Why the settings of these units, or of the block's projection shortcut (unless ``shortcut`` is False: it
    runs as itself), keep the fused op from computing them as torch would (a conv bias, a circular padding, ...),
    naming the submodule; or None."""
    ds = None if getattr(block, "plain", False) or not shortcut else getattr(block, "downsample", None)
    pairs = list(units) + ([(ds[0], ds[1])] if ds is not None and _is_projection(ds) else [])
    names = None
    for conv, bn in pairs:
        reason = unit_unsupported_reason(conv, bn)
        if reason is not None:
            names = names or {id(m): n for n, m in block.named_modules()}
            return f"{names.get(id(conv), 'conv')} / {names.get(id(bn), 'bn')}: {reason}"
    return None


def block_blocker(block: nn.Module, units: List[Tuple[nn.Module, nn.Module]]) -> Optional[str]:
    """Why this residual block (fused or torchvision's) cannot run fused now, or None."""
    return structure_blocker(block, units) or settings_reason(block, units)


# Under torch.fx.symbolic_trace, not torch.export or torch.compile (they trace the fused op itself).
_is_fx_tracing = torch.fx._symbolic_trace.is_fx_symbolic_tracing


def _runs_eagerly(backend: str, x: Tensor, conv: Optional[nn.Module] = None) -> bool:
    """Whether this call runs the modules' own forward whatever they are: under torch.fx symbolic tracing (asked
    first: x is then a Proxy, whose device a traced program cannot branch on; feature extraction sees the
    submodules), for backend auto away from a GPU, or for an unbatched input to ``conv``, the first conv (see
    :func:`_unbatched`)."""
    return (_is_fx_tracing() or (backend == "auto" and backends.auto_runs_eager(x.device.type))
            or _unbatched(x, conv))


def _unbatched(x: Tensor, conv: Optional[nn.Module]) -> bool:
    """Whether x is an unbatched input to ``conv`` ((C, H, W) for a Conv2d, (C, L) for a Conv1d). The conv takes
    it and each norm layer then judges it its own way — BatchNorm2d refuses it, torchvision's FrozenBatchNorm2d
    broadcasts it into a batch of one, SyncBatchNorm reads its first axis as the channels — so torch's own modules
    decide what it gives."""
    w = None if conv is None else conv._parameters.get("weight")
    return isinstance(w, Tensor) and x.dim() == w.dim() - 1


def _empty_unsynced(spec, x: Tensor) -> bool:
    """An empty batch runs eagerly, unless a BN is synchronised over a process group: then the rank still takes
    part in the group's collectives, through the fused op (see ``_backend_for``)."""
    return x.numel() == 0 and not spec.synced


def _backend_for(backend: str, x: Tensor) -> str:
    """The reference backend for an empty batch (the kernels launch no empty grids; its outputs are exact, and its
    collectives are every backend's), else ``backend``."""
    return "reference" if x.numel() == 0 else backend


def _guarded(owner: nn.Module, key: tuple, find_blocker) -> Optional[str]:
    """``find_blocker()``'s answer, kept on ``owner`` while ``key`` (a guard.signature) stays the same."""
    cached = owner.__dict__.get(_GUARD_ATTR)
    if cached is None or cached[0] != key:
        cached = (key, find_blocker())
        owner.__dict__[_GUARD_ATTR] = cached
    return cached[1]


# torch.jit.script compiles a forward from its Python source: a fused module's is Python around torch.library ops
NO_SCRIPT = ("torch.jit.script cannot compile fused_resnet's modules: script fused_resnet.revert(model) (torch's own "
             "modules), or capture the converted model with torch.export.export (or torch.jit.trace)")


def _refuse_script(self) -> None:
    raise RuntimeError(NO_SCRIPT)


class _FusedForward:
    """Forward through the fused op layer (see :func:`fused_resnet.functional.run_block`), or, for a call the
    kernels cannot compute exactly (a submodule swapped or hooked after conversion, see :mod:`fused_resnet.guard`;
    a setting such as a conv bias, see :func:`fused_resnet.spec.unit_reading`; an empty batch), the exact eager
    computation of the submodules. A block layout other than torchvision's overrides ``_structure_blocker`` and
    ``_eager`` (fused_resnet.timm_blocks), and where its closing is not one the op computes (timm's se /
    drop_path), ``_structure`` (``Shortcut.OPEN``: the op runs the units) and ``_close`` (the rest, in torch)."""

    __prepare_scriptable__ = _refuse_script

    def _structure_blocker(self) -> Optional[str]:
        return structure_blocker(self, self._units())

    def _eager(self, x: Tensor) -> Tensor:
        return _EagerForward.forward(self, x)

    def _init_fused(self, backend: str) -> None:
        backends.check_requested(backend)
        for conv, bn in self._units():
            reason = unit_unsupported_reason(conv, bn)
            if reason is not None:
                raise ValueError(f"{type(self).__name__} cannot fuse this block: {reason}")
        self.backend = backend
        self.block_spec()

    def _plan(self):
        """(why the submodules are not what the kernels implement, or None; else the block's structure, see
        ``_structure``, and its shortcut unit, see ``_shortcut_op``), kept while the signature of the submodules
        (and option A's stride, and the backend) stays the same."""
        ds = self.downsample
        watched = [*self._modules.values(), *(ds._modules.values() if ds is not None else ())]
        key = (self.plain, getattr(ds, "stride", None), getattr(self, "backend", None)) + guard.signature(watched)
        cached = self.__dict__.get(_GUARD_ATTR)
        if cached is None or cached[0] != key:
            reason = self._structure_blocker()
            fused = reason is None
            cached = (key, reason, self._structure() if fused else None, self._shortcut_op() if fused else None)
            self.__dict__[_GUARD_ATTR] = cached
        return cached[1], cached[2], cached[3]

    def _call_plan(self):
        """What the next call runs, as forward decides it: (None, (structure, spec, shortcut)) for the fused op —
        ``shortcut``: (the module run first in torch or None, conv, bn, the pool the op computes or None, spec) of a
        shortcut unit run as an op of its own, or None — or (why it runs the eager computation, None). The
        structure is kept while the submodules' signature stays; every unit's settings are read again
        (``block_plan``)."""
        reason, structure, shortcut = self._plan()
        if reason is not None:
            return reason, None
        plan = block_plan(self, *structure)
        if isinstance(plan, str):
            return plan, None
        if shortcut is not None:  # a setting the op cannot compute (a bias, ...): the downsample runs as itself
            sc_plan = block_plan(self.downsample, [shortcut[1]], [shortcut[2]], Shortcut.OPEN, 1, shortcut[3])
            shortcut = None if isinstance(sc_plan, str) else (*shortcut, sc_plan)
        return None, (structure, plan, shortcut)

    def _shortcut_op(self):
        """(module run first in torch or None, conv, bn, pool the op computes or None) of a shortcut whose conv-BN
        unit the block runs as an op of its own, a one-unit open block (``Shortcut.OPEN``), whose output the main
        op adds as a tensor or an open block's closing adds: a downsample the main op does not compute itself
        (timm's "-d" avg-pool + conv + BN where the backend does not pool, an open block's projection), nothing
        watching it (hooks: then it runs as its own modules), on a backend that declares it. None otherwise."""
        kind = self._structure()[2]
        sc = shortcut_unit(self.downsample) if kind in (Shortcut.TENSOR, Shortcut.OPEN) else None
        if sc is None or any(guard.hooked(m) for m in (self.downsample, sc[1], sc[2])):
            return None
        backend = getattr(self, "backend", "auto")
        inner = inner_projection(self.downsample, backend)
        if inner is not None:  # the op computes its first module too
            return None, inner[1], inner[2], inner[0]
        if geometry_reason([sc[1:]], backend, shortcut=Shortcut.OPEN) is not None:
            return None
        return (*sc, None)

    def _next_ops(self) -> List[List[nn.Module]]:
        """The BNs of each op the next call runs (the block's, then its shortcut unit's); none when it runs its
        eager computation."""
        reason, planned = self._call_plan()
        if reason is not None:
            return []
        (_, bns, *_), _, shortcut = planned
        return [list(bns)] + ([[shortcut[2]]] if shortcut is not None else [])

    def _shortcut(self, x: Tensor, shortcut, backend: str) -> Tensor:
        """The shortcut's value for block input x: its conv-BN unit's op (after its first module, in torch), or the
        downsample module itself, or x."""
        if shortcut is None:
            return x if self.downsample is None else self.downsample(x)
        first, conv, bn, _, spec = shortcut
        inp = x if first is None else first(x)
        return run_block(inp, spec, [conv], [bn], backend=backend, name=f"{guard.name_of(self)} shortcut")

    def _blocker(self) -> Optional[str]:
        """Why the next call runs the eager computation (the submodules or their settings), or None."""
        return self._call_plan()[0]

    def _eager_reason(self) -> Optional[str]:
        return self._blocker()

    def _structure(self):
        """(convs, bns, shortcut kind, option A's stride, the projection's input pool or None) of the block as its
        submodules are now: a downsample of an average pool (where the backend pools) or an identity before a
        conv-BN unit is the op's projection too (``inner_projection``)."""
        units = self._units()
        convs, bns = [c for c, _ in units], [b for _, b in units]
        ds = self.downsample
        if self.plain:
            return convs, bns, Shortcut.NONE, 1, None
        if ds is None:
            return convs, bns, Shortcut.IDENTITY, 1, None
        if type(ds) is ShortcutA:
            return convs, bns, Shortcut.OPTION_A, ds.stride, None
        if _is_projection(ds):
            return convs + [ds[0]], bns + [ds[1]], Shortcut.PROJECTION, 1, None
        inner = inner_projection(ds, getattr(self, "backend", "auto"))
        if inner is not None:
            return convs + [inner[1]], bns + [inner[2]], Shortcut.PROJECTION, 1, inner[0]
        return convs, bns, Shortcut.TENSOR, 1, None

    def _sample_scale(self, x: Tensor) -> Optional[Tensor]:
        """Stochastic depth's per-sample scale for this call, drawn now, where the op's closing computes it (a
        layout with a drop_path: fused_resnet.timm_blocks); None: none."""
        return None

    def _close(self, y: Tensor, x: Tensor, shortcut: Callable[[], Tensor]) -> Tensor:
        """An open block's closing in torch, from the op's output y = bn_last(...), the block input x and
        ``shortcut()``, which computes the shortcut's value (call it where the layout computes its downsample)."""
        raise NotImplementedError(f"{type(self).__name__} has no open closing")

    def _torch_children(self) -> Tuple[str, ...]:
        """The names of the submodules this block calls itself in torch when it runs fused (an open block's
        closing; the oracle tapes their activations)."""
        return ()

    def _torch_part(self) -> Optional[str]:
        """What of this fused block runs in torch around the op (its closing, a downsample module), in words, or
        None where the op computes all of it (conversion_report)."""
        reason, planned = self._call_plan()
        if reason is not None or planned[0][2] != Shortcut.TENSOR:
            return None
        shortcut = planned[2]
        if shortcut is None:
            return f"the shortcut's downsample ({type(self.downsample).__name__}) in torch, added by the op"
        first = "" if shortcut[0] is None else f" after its {type(shortcut[0]).__name__} in torch"
        pool = "" if shortcut[3] is None else f" with its {type(shortcut[3]).__name__}"
        return f"the shortcut's conv-BN{pool} fused as an op of its own{first}, added by the block's op"

    def block_spec(self):
        """This block's :class:`~fused_resnet.spec.BlockSpec` (built once, rebuilt when a setting changes)."""
        return block_spec(self, *self._structure())

    def forward(self, x: Tensor) -> Tensor:
        # Eager also for an empty batch (torch leaves the running statistics as they are, and counts the batch).
        if _runs_eagerly(self.backend, x, self.conv1):
            return self._eager(x)
        reason, planned = self._call_plan()
        if reason is not None:
            guard.warn_eager(self, reason)
            return self._eager(x)
        (convs, bns, kind, *_), spec, shortcut = planned
        if _empty_unsynced(spec, x):
            return self._eager(x)
        backend = _backend_for(self.backend, x)
        sample_scale = None if kind == Shortcut.OPEN else self._sample_scale(x)  # before the shortcut, as timm
        residual = self._shortcut(x, shortcut, backend) if kind == Shortcut.TENSOR else None
        y = run_block(x, spec, convs, bns, residual, backend, residual_scale_of(self), guard.name_of(self),
                      sample_scale)
        if kind == Shortcut.OPEN:
            return self._close(y, x, lambda: self._shortcut(x, shortcut, backend))
        return y

    def extra_repr(self) -> str:
        return ", ".join(filter(None, [f"backend={self.backend!r}", _BlockLayout.extra_repr(self)]))


class FusedBasicBlock(_FusedForward, _BasicLayout):
    """torchvision BasicBlock (two 3x3 conv-BN units, stride on the first) computed by fused ops."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, backend: str = "auto",
                 plain: bool = False, dim: int = 2, residual_scale: Union[None, float, str] = None):
        _BasicLayout.__init__(self, inplanes, planes, stride, downsample, groups, base_width, dilation, norm_layer,
                              plain=plain, dim=dim, residual_scale=residual_scale)
        self._init_fused(backend)


class FusedBottleneck(_FusedForward, _BottleneckLayout):
    """torchvision Bottleneck (1x1 → 3x3 → 1x1, stride on the 3x3, expansion 4) computed by fused ops."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 groups: int = 1, base_width: int = 64, dilation: int = 1,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, *, backend: str = "auto",
                 plain: bool = False, dim: int = 2, residual_scale: Union[None, float, str] = None):
        _BottleneckLayout.__init__(self, inplanes, planes, stride, downsample, groups, base_width, dilation,
                                   norm_layer, plain=plain, dim=dim, residual_scale=residual_scale)
        self._init_fused(backend)


class EagerBasicBlock(_EagerForward, _BasicLayout):
    """BasicBlock layout in plain PyTorch, with ``plain`` and ``dim`` like the fused block."""


class EagerBottleneck(_EagerForward, _BottleneckLayout):
    """Bottleneck layout in plain PyTorch, with ``plain`` and ``dim`` like the fused block."""


class FusedStemMixin:
    """A model whose stem — a chain of conv-BN units joined by ReLUs and ending in one, by default torchvision's
    ``self.conv1``, ``self.bn1``, ``self.relu`` — runs as one fused op (a plain block's spec, ``Shortcut.NONE``)
    when ``self.backend`` is a backend name, and as its own torch modules when it is None. A model whose stem
    activation has another name sets ``_stem_act`` (timm's ``act1``); another layout overrides ``_stem_layout``
    (fused_resnet.timm_blocks: timm's deep stem is not one the op computes)."""

    backend: Optional[str] = None
    _stem_act = "relu"  # the attribute holding the stem's ReLU, after conv1 and bn1

    def __prepare_scriptable__(self):
        if self.backend is not None:
            _refuse_script(self)
        return self

    def _stem_layout(self):
        """(units [(conv, bn)], the ReLUs after each {name: module}, every module the fused stem replaces
        {name: module}), or a string saying why the stem's modules are not a chain the op computes."""
        acts = {self._stem_act: getattr(self, self._stem_act)}
        return [(self.conv1, self.bn1)], acts, {"conv1": self.conv1, "bn1": self.bn1, **acts}

    def _stem_eager(self, x: Tensor) -> Tensor:
        return getattr(self, self._stem_act)(self.bn1(self.conv1(x)))

    def _stem_units(self) -> List[Tuple[nn.Module, nn.Module]]:
        """The stem's conv-BN units as its modules are now (none where they are not a chain the op computes)."""
        layout = self._stem_layout()
        return [] if isinstance(layout, str) else layout[0]

    def _stem_blocker(self) -> Optional[str]:
        """Why the stem cannot run fused now, or None."""
        layout = self._stem_layout()
        return layout if isinstance(layout, str) else guard.blocker(*layout)

    def _stem_plan(self):
        """What the stem's next call runs: (None, spec) for the fused op, or (why it runs eagerly, None)."""
        layout = self._stem_layout()
        watched = list(layout[2].values()) if not isinstance(layout, str) else []
        reason = layout if isinstance(layout, str) else _guarded(self, guard.signature(watched), self._stem_blocker)
        if reason is not None:
            return reason, None
        units = layout[0]
        plan = block_plan(self, [c for c, _ in units], [b for _, b in units], Shortcut.NONE)
        return (plan, None) if isinstance(plan, str) else (None, plan)

    def _stem(self, x: Tensor) -> Tensor:
        units = self._stem_units()
        if self.backend is not None and units and not _runs_eagerly(self.backend, x, units[0][0]):
            reason, spec = self._stem_plan()
            if reason is None:
                if not _empty_unsynced(spec, x):
                    return run_block(x, spec, [c for c, _ in units], [b for _, b in units],
                                     backend=_backend_for(self.backend, x), name=f"{guard.name_of(self)} stem")
            else:
                guard.warn_eager(self, f"stem: {reason}")
        return self._stem_eager(x)


class ResNet(FusedStemMixin, torchvision.models.resnet.ResNet):
    """torchvision's ResNet with the stem conv-BN-ReLU fused; ``convert`` turns a torchvision ResNet into this
    class in place (no new parameters or buffers, so the state_dict is unchanged)."""

    def _forward_impl(self, x: Tensor) -> Tensor:
        x = self.maxpool(self._stem(x))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class IntermediateLayerGetter(FusedStemMixin, torchvision.models._utils.IntermediateLayerGetter):
    """torchvision's backbone wrapper (segmentation models' backbone, BackboneWithFPN's body) with its ResNet's stem
    fused: its first three modules, conv1, bn1 and relu, as one op when none of them is a returned layer (else the
    wrapper returns one of them, and runs them one by one). ``convert`` turns the wrapper into this class in place
    (the state_dict is unchanged)."""

    def _stem_layout(self):
        names = list(self.keys())[:3]
        if names != ["conv1", "bn1", "relu"]:
            return f"the wrapper's first modules are {names}, not a ResNet's conv1, bn1, relu"
        returned = [n for n in names if n in self.return_layers]
        if returned:
            return f"the wrapper returns {returned[0]}'s output"
        return super()._stem_layout()

    def forward(self, x: Tensor):
        out = collections.OrderedDict()
        items = list(self.items())
        if self._stem_units():  # the stem's modules in order, none of them returned
            x, items = self._stem(x), items[3:]
        for name, module in items:
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out
