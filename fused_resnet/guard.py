"""Never silently different: what a fused module checks before each call runs fused.

A fused block computes its submodules' work inside one op, so their own ``forward`` never runs. That is exact only
while the submodules are the ones the kernels implement: convs of the plain types with zero padding and no bias,
BatchNorms of the plain types, ``nn.ReLU`` as the activation, and no hooks (a module hook, a pruning or other
forward pre-hook, a global module hook) that would expect those forwards to run. ``blocker`` says what breaks
that; a fused module keeps its answer until a cheap ``signature`` of its submodules (identity, type, hook counts)
changes. Their settings (a conv's bias, padding mode, stride; a BN's mode, momentum, buffers) can change behind an
unchanged signature, so they are read on every call (``spec.unit_reading``, through ``functional.block_plan``).
A call that cannot run fused runs the exact eager computation of its submodules instead, after one warning naming
the module and the reason (``warn_eager``).
"""
from __future__ import annotations

import warnings
import weakref
from typing import Dict, Iterable, Optional, Sequence, Tuple

from torch import nn
from torch.nn.modules import module as _module

from .spec import unit_types_reason

_GLOBAL_HOOKS = (_module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
                 _module._global_backward_pre_hooks)
_NAME_ATTR = "_fused_resnet_name"  # the module's path in its model, set by convert
# module → reasons already warned; weak, so a new module that reuses a freed one's id still warns
_warned: "weakref.WeakKeyDictionary[nn.Module, set]" = weakref.WeakKeyDictionary()


def _hook_counts(m: nn.Module) -> Tuple[int, int, int, int]:
    return len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), len(m._backward_pre_hooks)


def hooked(m: nn.Module) -> bool:
    """Whether ``m`` has a forward, pre-forward or backward hook of its own."""
    return any(_hook_counts(m))


def signature(modules: Iterable[Optional[nn.Module]]) -> tuple:
    """Identity, type and hook counts of ``modules`` and the count of global module hooks: equal signatures mean
    an unchanged structure."""
    return tuple(len(h) for h in _GLOBAL_HOOKS) + tuple(
        (id(m), type(m)) + _hook_counts(m) for m in modules if m is not None)


def blocker(units: Sequence[Tuple[nn.Module, nn.Module]], activations: Dict[str, nn.Module],
            fused_away: Dict[str, nn.Module]) -> Optional[str]:
    """None when the units' types, the activations (name → module) and the modules whose forward the fused op
    replaces (``fused_away``: name → module, the units and the activations included) are what the kernels
    implement; else why not. The units' settings (a conv bias, a padding mode, ...) are read on every call
    instead (``functional.block_plan``): a setting changes behind an unchanged signature."""
    for conv, bn in units:
        reason = unit_types_reason(type(conv), type(bn))
        if reason is not None:
            return reason
    for name, act in activations.items():
        if type(act) is not nn.ReLU:
            return f"activation {name} is {type(act).__name__}, the kernels apply nn.ReLU"
    for name, m in fused_away.items():
        if any(_hook_counts(m)):
            return f"hooks on {name} (forward, pre-forward or backward hooks run only in its eager forward)"
    if any(_GLOBAL_HOOKS):
        return "global module hooks are registered (nn.modules.module.register_module_forward_hook and kin)"
    return None


def name_of(owner: nn.Module) -> str:
    return owner.__dict__.get(_NAME_ATTR) or type(owner).__name__


def set_name(owner: nn.Module, name: str) -> None:
    owner.__dict__[_NAME_ATTR] = name


def warn_eager(owner: nn.Module, reason: str) -> None:
    """One warning per module and reason: this call runs the module's exact eager computation."""
    reasons = _warned.setdefault(owner, set())
    if reason not in reasons:
        reasons.add(reason)
        warnings.warn(f"fused_resnet: {name_of(owner)} runs its eager torch computation, not the fused op: {reason}",
                      RuntimeWarning, stacklevel=3)
