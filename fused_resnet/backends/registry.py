"""Backend registry: which implementations exist, which can run here, and which one a call uses.

A backend implements the block ops (``block_forward``, ``block_backward``, ``block_inference``) and the BN
running-statistics update, each taking a :class:`~fused_resnet.spec.BlockSpec` and tensors; the reference backend
defines the semantics. Registration checks that every method is there: a backend never inherits another's
computation silently.

Decided once: whether a backend can run on this machine is probed once per process (``refresh()`` probes again,
e.g. after a just-in-time build of the extension), and which backend serves a call is cached per (requested name,
device type, dtype, spec). An explicitly requested backend that cannot take a configuration falls back to the
reference backend, and ``auto`` to the next candidate, each with a one-time warning naming what runs instead.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..spec import BlockSpec
from ..tensors import Forward, Grads, Params


class Backend:
    """Interface of a backend. Subclasses set ``name`` and implement every method below that raises."""

    name = ""
    # Where ``auto`` tries this backend on a CUDA tensor: lower first; None: never picked by auto.
    auto_rank: Optional[int] = None

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run on this machine, else a sentence saying why not (probed once)."""
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype, spec: Optional[BlockSpec]) -> Optional[str]:
        """None when this backend takes tensors of this device type and dtype with this spec (None: the
        running-statistics update alone), else why not."""
        return None

    def saved_format(self, x: Tensor) -> torch.memory_format:
        """The layout of the pre-BN outputs a training forward saves for backward."""
        raise NotImplementedError

    def block_forward(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Forward:
        raise NotImplementedError

    def block_inference(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Tensor:
        """Eval forward with running statistics; nothing saved."""
        raise NotImplementedError

    def block_backward(self, spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                       need_input_grad: bool) -> Grads:
        raise NotImplementedError

    def bn_running_update(self, running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                          mean: Tensor, var: Tensor, count, momentum: Optional[float]) -> None:
        """torch's running-statistics update, in place; ``count`` is an int, or a 0-d tensor on the device (a
        synchronised BN's group count)."""
        raise NotImplementedError

    # Optional: a backend that builds per-shape plans on first use (backend cuda's cuDNN graphs) says so here.
    def prepare(self, spec: BlockSpec, x: Tensor, weights: List[Tensor], train: bool) -> List[str]:
        """Build now what a call with input ``x`` would build on first use (``train``: the training forward and
        backward, else eval); returns what could not be built, with why (those parts run another exact path)."""
        return []

    def capture_refusal(self, spec: BlockSpec, x: Tensor, weights: List[Tensor], train: bool) -> Optional[str]:
        """Inside a CUDA graph capture: why a call with input ``x`` cannot be captured now, or None."""
        return None

    def routes(self, spec: BlockSpec, x: Tensor, weights: List[Tensor], train: bool) -> Optional[List[str]]:
        """Per unit, in words, what a call with input ``x`` runs, where a backend has more than one route; None
        where each unit has one."""
        return None


_METHODS = ("saved_format", "block_forward", "block_inference", "block_backward", "bn_running_update")
_REGISTRY: Dict[str, Backend] = {}
_AVAILABILITY: Dict[str, Optional[str]] = {}
_RESOLVED: Dict[tuple, Backend] = {}
_warned: set = set()


def register(backend: Backend) -> None:
    """Make a backend selectable by name. Every method of :class:`Backend` must be its own."""
    missing = [m for m in _METHODS if getattr(type(backend), m) is getattr(Backend, m)]
    if missing:
        raise TypeError(f"backend {backend.name!r} does not implement {', '.join(missing)}")
    if not backend.name or backend.name == "auto":
        raise ValueError(f"invalid backend name {backend.name!r}")
    _REGISTRY[backend.name] = backend
    refresh()


def refresh() -> None:
    """Forget availability and resolutions: call when something that decides them changed (a JIT build)."""
    _AVAILABILITY.clear()
    _RESOLVED.clear()


def names() -> Tuple[str, ...]:
    """Registered backend names, reference first."""
    return tuple(sorted(_REGISTRY, key=lambda n: (n != "reference", n)))


def choices() -> Tuple[str, ...]:
    return ("auto",) + names()


def get(name: str) -> Backend:
    return _REGISTRY[name]


def backend_status() -> Dict[str, Optional[str]]:
    """Every registered backend name → None if usable here, else the reason it is not (probed once)."""
    status: Dict[str, Optional[str]] = {}
    for name in names():
        if name not in _AVAILABILITY:  # probing may load the extension, which refreshes: keep what was probed
            _AVAILABILITY[name] = _REGISTRY[name].unavailable_reason()
        status[name] = _AVAILABILITY.get(name)
    return status


def available_backends() -> List[str]:
    """The backend names usable on this machine ("reference" always)."""
    return [name for name, reason in backend_status().items() if reason is None]


def check_requested(name: str) -> None:
    """Raise a clear error for an unknown backend name, or an explicit backend that cannot run here."""
    if name not in choices():
        raise ValueError(f"unknown backend {name!r}; expected one of {choices()}")
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
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def auto_runs_eager(device_type: str) -> bool:
    """``auto`` away from a GPU is the block's own torch computation (as fast as eager there): the Triton
    interpreter and the extension's CPU path are for testing, and ``reference`` runs only when asked for."""
    return device_type != "cuda"


def what_runs(name: str, device_type: str) -> str:
    """In words, what computes a block asked for backend ``name`` on this device type (for the commands' logs)."""
    if name == "auto" and auto_runs_eager(device_type):
        return "torch's own modules (backend auto on a CPU; --backend reference runs the fused ops' PyTorch twin)"
    if name == "auto":
        return f"backend {_candidates(name, device_type)[0]!r} (auto on CUDA)"
    return f"backend {name!r}"


def _candidates(name: str, device_type: str) -> List[str]:
    if name != "auto":
        check_requested(name)
        return [name, "reference"] if name != "reference" else [name]
    if device_type != "cuda":
        return ["reference"]  # the Triton interpreter and the extension's CPU path are for testing, never auto
    status = backend_status()
    ranked = sorted((b.auto_rank, n) for n, b in _REGISTRY.items() if b.auto_rank is not None and status[n] is None)
    return [n for _, n in ranked] + ["reference"]


def resolve(name: str, x: Tensor, spec: Optional[BlockSpec]) -> Backend:
    """The backend that runs a call on x (the first candidate that takes it), cached; falling back past a
    candidate warns once, naming the reason and the backend that runs instead."""
    key = (name, x.device.type, x.dtype, spec)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    skipped = []
    for cand in _candidates(name, x.device.type):
        reason = _REGISTRY[cand].unsupported_reason(x.device.type, x.dtype, spec)
        if reason is None:
            if skipped:
                _warn_once((name, cand, tuple(skipped)),
                           f"fused_resnet: {'; '.join(skipped)}; running it on backend {cand!r} instead.")
            _RESOLVED[key] = _REGISTRY[cand]
            return _REGISTRY[cand]
        skipped.append(f"backend {cand!r} does not support this configuration ({reason})")
    raise RuntimeError(f"fused_resnet: no backend runs this call: {'; '.join(skipped)}")
