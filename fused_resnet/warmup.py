"""What a model's fused blocks will run for an input, ahead of the call: ``warm_up`` builds now what a backend
builds on first use (backend cuda's per-shape cuDNN plans), and ``unit_routes`` says per unit what each call runs
(``conversion_report(model, example)`` prints it).

Both need every fused block's input as its op will see it. A forward pass on a meta-device copy of the model
records them (shapes only: nothing is computed or allocated on the model's device, and the model itself is not
touched), with the dtype that autocast, if enabled now, would give the op.
"""
from __future__ import annotations

import copy
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

from . import backends
from .blocks import FusedStemMixin, _FusedForward, _runs_eagerly
from .functional import block_spec
from .spec import BlockSpec, Shortcut


class BlockCall(NamedTuple):
    """A fused block's (or stem's) op call for one input: where it is, its spec, the unit convs' names, and the
    input and weights as the op sees them (x on the input's device, without memory; weights on the meta
    device)."""

    name: str
    module: nn.Module
    backend: str
    spec: BlockSpec
    unit_names: List[str]
    x: Tensor
    weights: List[Tensor]


def _op_dtype(example: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype an op on ``example``'s device gets for a tensor of ``dtype``: autocast's, where enabled."""
    device_type = example.device.type
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return dtype
    return torch.get_autocast_dtype(device_type)


def _units(module: nn.Module) -> tuple:
    """(spec, convs) of a fused block or stem as it is now."""
    if isinstance(module, _FusedForward):
        structure = module._structure()
        return block_spec(module, *structure), structure[0]
    units = module._stem_units()
    convs = [c for c, _ in units]
    return block_spec(module, convs, [b for _, b in units], Shortcut.NONE), convs


def _op_targets(model: nn.Module) -> Dict[str, tuple]:
    """Module name in ``model`` whose input an op sees → (block or stem name, the block or stem, (spec, convs) of
    that op, or None for the block's or stem's own): every fused block and stem, and every shortcut unit a block
    runs as an op of its own (keyed by its conv)."""
    targets = {}
    for name, m in model.named_modules():
        if isinstance(m, _FusedForward):
            reason, planned = m._call_plan()
            if reason is not None:
                continue
            targets[name] = (name, m, None)
            shortcut = planned[2]
            if shortcut is not None:  # the op's input: its conv's, or the downsample's where it pools inside
                entry = shortcut[1] if shortcut[3] is None else m.downsample
                sub = next(n for n, c in m.named_modules() if c is entry)
                targets[f"{name}.{sub}" if name else sub] = (name, m, (shortcut[4], [shortcut[1]]))
        elif isinstance(m, FusedStemMixin) and m.backend is not None and m._stem_plan()[0] is None:
            targets[name] = (name, m, None)
    return targets


def block_calls(model: nn.Module, example: Tensor) -> List[BlockCall]:
    """Every fused op call of ``model``'s blocks, their shortcut units and stems for input ``example``, in the
    order their modules are entered (a block before its shortcut unit, whose op runs first)."""
    targets = _op_targets(model)
    shapes: Dict[str, torch.Size] = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, args[0].shape)
        return hook

    shadow = copy.deepcopy(model).to("meta")
    hooks = [m.register_forward_pre_hook(record(name)) for name, m in shadow.named_modules() if name in targets]
    for m in shadow.modules():  # the copy runs torch's modules: auto away from a GPU, a stem without a backend
        if isinstance(m, _FusedForward):
            m.backend = "auto"
        if isinstance(m, FusedStemMixin):
            m.backend = None
    with torch.no_grad():
        shadow(example.to("meta"))
    for h in hooks:
        h.remove()
    calls = []
    for target, shape in shapes.items():  # dict order: call order
        name, module, op = targets[target]
        x = torch.empty((), dtype=_op_dtype(example, example.dtype), device=example.device).expand(shape)
        first = module.conv1 if isinstance(module, _FusedForward) else module._stem_units()[0][0]
        if _runs_eagerly(module.backend, x, first) or x.numel() == 0:
            continue
        spec, convs = _units(module) if op is None else op
        names = {id(m): n for n, m in module.named_modules()}
        weights = [c.weight.to("meta", _op_dtype(example, c.weight.dtype)) for c in convs]
        if spec.dim == 1:  # the ops see a Conv1d as a Conv2d with H = 1
            x, weights = x.unsqueeze(2), [w.unsqueeze(2) for w in weights]
        calls.append(BlockCall(name or "<root>", module, module.backend, spec, [names[id(c)] for c in convs], x,
                               weights))
    return calls


def _train(model: nn.Module, train: Optional[bool]) -> bool:
    return model.training if train is None else train


def warm_up(model: nn.Module, example: Tensor, train: Optional[bool] = None) -> List[str]:
    """Builds now, for inputs shaped like ``example`` (and the autocast dtype enabled now), what the fused blocks'
    backends build on first use — backend cuda's cuDNN plans, one per graph and shape — so that a later call,
    a CUDA graph capture in particular (where none is built), finds them. ``train``: the training step (forward and
    backward) or eval; by default the model's mode. Returns what could not be built and why (those units run the
    unfused path, counted)."""
    problems = []
    for call in block_calls(model, example):
        backend = backends.resolve(call.backend, call.x, call.spec)
        problems += [f"{call.name}: {p}" for p in backend.prepare(call.spec, call.x, call.weights,
                                                                  _train(model, train))]
    return problems


def unit_routes(model: nn.Module, example: Tensor, train: Optional[bool] = None) -> Dict[str, List[str]]:
    """Block name → one line per unit (``conv1: ...``) where its backend has more than one route for a unit."""
    out = {}
    for call in block_calls(model, example):
        backend = backends.resolve(call.backend, call.x, call.spec)
        routes = backend.routes(call.spec, call.x, call.weights, _train(model, train))
        if routes is not None:  # a block's shortcut unit (an op of its own) adds its line to the block's
            out.setdefault(call.name, []).extend(f"{unit}: {route}" for unit, route in zip(call.unit_names, routes))
    return out
