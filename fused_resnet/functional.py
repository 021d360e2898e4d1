"""Functional entry point of every fused module: a chain of (conv, BN) units with ReLUs, a shortcut, a final ReLU.

``block_plan`` gives a block's :class:`~fused_resnet.spec.BlockSpec`, or why its units cannot run fused now: it
reads every unit's settings on every call (``spec.unit_reading``), keeps the spec while they stay the same and
builds it from that reading alone (a BN switched to eval, a new momentum or a changed conv stride make a new one;
a conv given a bias or a circular padding makes a reason, and the call runs the modules' own forward). ``run_block``
validates the input (torch's error types and messages, raised before any state changes), applies autocast, maps
1-D convs onto the 2-D ops (a Conv1d is a Conv2d with H = 1), calls the op layer, then updates the BN running
statistics exactly as torch's BatchNorm does. Layout: the ops accept NCHW and channels_last and return y in the
input's layout; no copy is made here.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import backends, ops
from .spec import (BlockSpec, Shortcut, conv_out_size, pool_reading, spec_from_readings, unit_from_reading,
                   unit_reading)
from .tensors import Params

_SPEC_ATTR = "_fused_resnet_spec"  # (key, spec or why not) in the owning module's __dict__


def unit_unsupported_reason(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    """None if (conv, bn) can run as a fused unit as they are now, else why not."""
    unit = unit_from_reading(unit_reading(conv, bn))
    return unit if isinstance(unit, str) else None


def block_plan(owner: nn.Module, convs: Sequence[nn.Module], bns: Sequence[nn.Module], shortcut: Shortcut,
               option_a_stride: int = 1, pool: Optional[nn.Module] = None) -> Union[BlockSpec, str]:
    """The spec of ``owner``'s units (the last one's input average-pooled by ``pool``, where given), or why the
    fused op cannot compute them now (naming the submodule). Read on every call: the key is every unit's
    :func:`~fused_resnet.spec.unit_reading` (and the pool's), and the spec is built from that key alone, so an
    equal key is an equal spec; a changed setting makes a new spec (or a reason) on the next call."""
    key = (shortcut, option_a_stride, pool_reading(pool)) + tuple(unit_reading(c, b) for c, b in zip(convs, bns))
    cached = owner.__dict__.get(_SPEC_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = spec_from_readings(key[3:], shortcut, option_a_stride, key[2])
    if not isinstance(plan, BlockSpec):
        i, reason = plan
        names = {id(m): n for n, m in owner.named_modules()}
        what = (f"{names.get(id(pool), 'pool')} / " if pool is not None and i == len(convs) - 1 else "")
        plan = f"{what}{names.get(id(convs[i]), 'conv')} / {names.get(id(bns[i]), 'bn')}: {reason}"
    owner.__dict__[_SPEC_ATTR] = (key, plan)
    return plan


def block_spec(owner: nn.Module, convs: Sequence[nn.Module], bns: Sequence[nn.Module], shortcut: Shortcut,
               option_a_stride: int = 1, pool: Optional[nn.Module] = None) -> BlockSpec:
    """:func:`block_plan`'s spec; ValueError naming the reason where the units cannot run fused now."""
    plan = block_plan(owner, convs, bns, shortcut, option_a_stride, pool)
    if isinstance(plan, str):
        raise ValueError(f"{type(owner).__name__} cannot run fused now: {plan}")
    return plan


def _input_checks(x: Tensor, w: Tensor, groups: int, dim: int) -> None:
    expected = dim + 2
    if x.dim() > expected:  # torch's conv error
        raise RuntimeError(f"Expected {expected - 1}D (unbatched) or {expected}D (batched) input to "
                           f"conv{dim}d, but got input of size: {list(x.shape)}")
    if x.dim() < expected:  # torch's BatchNorm error (the conv would accept an unbatched input)
        raise ValueError(f"expected {expected}D input (got {x.dim()}D input)")
    if not x.is_floating_point():
        raise RuntimeError(
            f"expected a floating-point input (float32, float16, bfloat16 or float64), got {x.dtype}"
        )
    if x.device != w.device:
        raise RuntimeError(f"expected the input on the weights' device {w.device}, got {x.device}")
    if x.shape[1] != w.shape[1] * groups:
        raise RuntimeError(
            f"Given groups={groups}, weight of size {list(w.shape)}, expected input{list(x.shape)} to have "
            f"{w.shape[1] * groups} channels, but got {x.shape[1]} channels instead"
        )


def _shape_checks(spec: BlockSpec, x: Tensor, shapes, residual: Optional[Tensor]) -> None:
    for unit, shape in zip(spec.units, shapes):
        # torch's SyncBatchNorm checks the local count only without peers: here a synchronised unit has some
        if unit.batch_stats and not unit.sync_group and shape[0] * shape[2] * shape[3] == 1:
            size = torch.Size([shape[0], shape[1], shape[3]] if spec.dim == 1 else shape)
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    out_shape = shapes[spec.n_main - 1]
    kind = spec.shortcut
    if kind == Shortcut.IDENTITY and list(x.shape) != out_shape:
        raise RuntimeError(
            f"identity shortcut needs the block to keep the input's shape {list(x.shape)}, but the main path "
            f"produces {out_shape}: give the block a downsample"
        )
    if kind == Shortcut.PROJECTION and shapes[-1] != out_shape:
        raise RuntimeError(f"projection shortcut produces {shapes[-1]}, main path produces {out_shape}")
    if kind == Shortcut.OPTION_A:
        sub = [conv_out_size(x.shape[k], 1, spec.option_a_stride[k - 2], 0, 1) for k in (2, 3)]
        if sub != out_shape[2:] or x.shape[1] > out_shape[1]:
            stride = list(spec.option_a_stride[1:] if spec.dim == 1 else spec.option_a_stride)
            raise RuntimeError(
                f"option-A shortcut maps {list(x.shape)} with stride {stride} onto {out_shape}: spatial sizes "
                f"must agree and channels may only grow"
            )
    if kind == Shortcut.TENSOR and (residual is None or list(residual.shape) != out_shape):
        got = None if residual is None else list(residual.shape)
        raise RuntimeError(f"the shortcut tensor has shape {got}, the main path produces {out_shape}")


def _bn_dtypes(dtype: torch.dtype) -> tuple:
    """The dtypes torch's BatchNorm takes its parameters and buffers in for an input of ``dtype``."""
    return (dtype, torch.float32) if dtype in (torch.float16, torch.bfloat16) else (dtype,)


def _bn_dtype_checks(bns: Sequence[nn.Module], dtype: torch.dtype) -> None:
    allowed = _bn_dtypes(dtype)
    for bn in bns:
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(bn, name)
            if t is not None and t.dtype not in allowed:  # torch's BatchNorm refuses it too
                raise RuntimeError(f"expected the BatchNorm's {name} in {' or '.join(map(str, allowed))} for a "
                                   f"{dtype} input, got {t.dtype}")


def _affine(t: Optional[Tensor], shape, fill: float, x: Tensor) -> Tensor:
    return torch.full((shape[1],), fill, dtype=_bn_dtypes(x.dtype)[-1], device=x.device) if t is None else t


def capturing(x: Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's stream now (never asked while torch.compile traces)."""
    return x.is_cuda and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()


def run_block(x: Tensor, spec: BlockSpec, convs: Sequence[nn.Module], bns: Sequence[nn.Module],
              residual: Optional[Tensor] = None, backend: str = "auto",
              residual_scale: Optional[Tensor] = None, name: str = "a fused block",
              sample_scale: Optional[Tensor] = None) -> Tensor:
    """y = relu(α·d_n·bn_last(conv_last(... relu(bn_0(conv_0(x))) ...)) + shortcut) through the op layer.

    ``convs``/``bns`` list the spec's units (the projection shortcut's last); ``residual`` is the shortcut tensor
    of ``Shortcut.TENSOR``; ``residual_scale`` is α (a 0-d tensor; None: 1); ``name`` names the block in errors;
    ``sample_scale``: stochastic depth's d [N] (timm's drop_path: 0 for a dropped sample, 1/keep for a kept one;
    None: 1), training only, on a backend that declares ``drop_path``."""
    one_d = spec.dim == 1
    _input_checks(x, convs[0].weight, spec.units[0].groups, spec.dim)
    weights = [c.weight for c in convs]
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weights = x.to(dt), [w.to(dt) for w in weights]
        residual = None if residual is None else residual.to(dt)
    for w in weights:
        if w.dtype != x.dtype:
            raise RuntimeError(f"expected the input's dtype to match the conv weights' {w.dtype}, got {x.dtype}")
    _bn_dtype_checks(bns, x.dtype)
    if one_d:
        x = x.unsqueeze(2)
        weights = [w.unsqueeze(2) for w in weights]
        residual = None if residual is None else residual.unsqueeze(2)

    shapes = spec.output_shapes(x.shape, [w.shape for w in weights])
    _shape_checks(spec, x, shapes, residual)
    if sample_scale is not None and (tuple(sample_scale.shape) != (x.shape[0],) or sample_scale.device != x.device):
        raise RuntimeError(f"stochastic depth's per-sample scale has shape {list(sample_scale.shape)} on "
                           f"{sample_scale.device}, the batch {x.shape[0]} samples on {x.device}")
    # what torch's BN passes on: its weight and bias whatever ``affine`` says (an attribute its forward never
    # reads), None standing for γ = 1, β = 0 (FrozenBatchNorm2d: buffers)
    gammas = [_affine(bn.weight, shape, 1.0, x) for bn, shape in zip(bns, shapes)]
    betas = [_affine(bn.bias, shape, 0.0, x) for bn, shape in zip(bns, shapes)]
    if residual_scale is not None:
        # α·bn(a) is the BN with γ·α and β·α: α folds into the closing kernel's scale and shift on every backend,
        # and autograd takes dα = Σ γ·dγ' + β·dβ' from the op's own fused reductions; the statistics do not move.
        last = spec.n_main - 1
        gammas[last], betas[last] = gammas[last] * residual_scale, betas[last] * residual_scale
    params = Params(weights, gammas, betas, [bn.running_mean for bn in bns], [bn.running_var for bn in bns])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or any(w.requires_grad for w in weights)
        or any(t.requires_grad for t in gammas + betas)
        or (residual is not None and residual.requires_grad)
    )
    # stochastic depth is a training-time closing: the training op computes it even where nothing else needs it
    train = needs_grad or any(u.batch_stats for u in spec.units) or sample_scale is not None
    if capturing(x):  # what a backend builds on first use cannot be built inside a capture: refused, named
        reason = backends.resolve(backend, x, spec, sample_scale is not None).capture_refusal(spec, x, weights, train)
        if reason is not None:
            raise RuntimeError(f"fused_resnet: {name}: {reason}")
    if not train:
        y = ops.inference(spec, x, params, residual, backend)
    else:
        out = ops.forward(spec, x, params, residual, backend, sample_scale)
        y = out.y
        with torch.no_grad():
            for i, (unit, bn, shape) in enumerate(zip(spec.units, bns, shapes)):
                if unit.update_running:  # a synchronised spec's counts are the group's (0-d tensors)
                    count = shape[0] * shape[2] * shape[3] if out.counts is None else out.counts[i]
                    ops.running_update(bn, out.means[i], out.variances[i], count, unit.momentum, backend)
    return y.squeeze(2) if one_d else y

