"""Backend registry: which implementations exist, which can run here, and which one a call uses.

A backend implements the three block ops of :mod:`fused_resnet.ops` (``block_forward``, ``block_backward``,
``block_inference``) with the signatures of :mod:`fused_resnet.reference`. The op layer resolves the backend
name *inside* the op implementation, so the choice (and the one-time fallback warning) happens at run time,
also in a ``torch.compile``-d graph.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence

import torch

from . import reference

KNOWN_BACKENDS = ("reference", "triton", "cuda")
BACKEND_CHOICES = ("auto",) + KNOWN_BACKENDS


class Backend:
    """Interface of a backend. Subclasses set ``name`` and implement the block ops."""

    name = ""

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run on this machine, else a sentence saying why not."""
        return None

    def unsupported_reason(self, x: torch.Tensor, groups: Sequence[int], dilations: Sequence[int]) -> Optional[str]:
        """None when this call's configuration is supported, else why not (the call then runs on reference)."""
        return None

    block_forward = staticmethod(reference.block_forward)
    block_backward = staticmethod(reference.block_backward)
    block_inference = staticmethod(reference.block_inference)


class ReferenceBackend(Backend):
    """Pure PyTorch, any device and dtype: the CPU default and the oracle's twin."""

    name = "reference"


_REGISTRY: Dict[str, Backend] = {"reference": ReferenceBackend()}
# Order in which `auto` tries backends on a CUDA tensor (until per-layer measurement replaces it).
_AUTO_ORDER_CUDA = ("cuda", "triton", "reference")
_warned: set = set()


def register(backend: Backend) -> None:
    """Make a backend selectable by name (used by the Triton and CUDA backends when they load)."""
    if backend.name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend name {backend.name!r}; expected one of {KNOWN_BACKENDS}")
    _REGISTRY[backend.name] = backend


def backend_status() -> Dict[str, Optional[str]]:
    """Every known backend name → None if usable here, else the reason it is not."""
    status: Dict[str, Optional[str]] = {}
    for name in KNOWN_BACKENDS:
        impl = _REGISTRY.get(name)
        status[name] = "not registered" if impl is None else impl.unavailable_reason()
    return status


def available_backends() -> List[str]:
    """The backend names usable on this machine ("reference" always)."""
    return [name for name, reason in backend_status().items() if reason is None]


def check_requested(name: str) -> None:
    """Raise a clear error for an unknown backend name, or an explicit backend that cannot run here."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_CHOICES}")
    if name != "auto":
        reason = backend_status()[name]
        if reason is not None:
            raise RuntimeError(
                f"backend {name!r} is not available here: {reason}. Available: {available_backends()} "
                f"(or backend='auto')."
            )


def _warn_once(key, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve(name: str, x: torch.Tensor, groups: Sequence[int], dilations: Sequence[int]) -> Backend:
    """The backend that runs this call: ``auto`` picks per device; an unsupported configuration falls back to
    reference with a one-time warning (never a wrong number)."""
    if name == "auto":
        if x.device.type != "cuda":
            return _REGISTRY["reference"]  # the Triton interpreter is for testing, never picked by auto
        candidates = [n for n in _AUTO_ORDER_CUDA if n in _REGISTRY and _REGISTRY[n].unavailable_reason() is None]
    else:
        check_requested(name)
        candidates = [name]
    for cand in candidates:
        impl = _REGISTRY[cand]
        reason = impl.unsupported_reason(x, groups, dilations)
        if reason is None:
            return impl
        _warn_once(
            (cand, reason),
            f"fused_resnet: backend {cand!r} does not support this configuration ({reason}); "
            f"running it on the 'reference' backend instead.",
        )
    return _REGISTRY["reference"]
