"""Backend registry: which implementations exist, which can run here, and which one a call uses.

A backend implements the block ops (``block_forward``, ``block_backward``, ``block_inference``) and the BN
running-statistics update, each taking a :class:`~fused_resnet.spec.BlockSpec` and tensors; the reference backend
defines the semantics. Registration checks that every method is there: a backend never inherits another's
computation silently.

What a backend runs is data, its :class:`Capabilities` (dtypes, grouped and dilated convs, dimensionality,
shortcut kinds, synchronised BN, residual scale, stochastic depth, pooled inputs, the running-statistics update's
dtypes): dispatch
(``resolve``), ``convert`` and ``conversion_report`` (``block_refusal``) all ask ``Capabilities.refusal``, the one
place that compares a block with what a backend declares. Only where a backend runs (its device types, probed
at run time) is code, ``device_refusal``.

Decided once: whether a backend can run on this machine is probed once per process (``refresh()`` probes again,
e.g. after a just-in-time build of the extension), and which backend serves a call is cached per (requested name,
device type, dtype, spec). An explicitly requested backend that cannot take a configuration falls back to the
reference backend, and ``auto`` to the next candidate, each with a one-time warning naming what runs instead.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
from torch import Tensor

from ..spec import BlockSpec, Shortcut
from ..tensors import Forward, Grads, Params

KERNEL_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
FLOAT_DTYPES = KERNEL_DTYPES | {torch.float64}


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a backend computes exactly, as data. Each field is one capability (its name is what a refusal
    names): ``dtypes`` of the block ops' tensors; ``groups``: convs with groups > 1 (depth-wise included);
    ``dilation``: convs with dilation > 1; ``dims``: the user's dimensionalities (1: Conv1d / BatchNorm1d);
    ``shortcuts``: the closing kinds; ``synced_bn``: BNs synchronised over a process group; ``residual_scale``:
    y = relu(α·bn(...) + shortcut); ``drop_path``: stochastic depth in the closing, y = relu(d_n·bn(...) +
    shortcut) with a per-sample d (the ops' ``sample_scale``; off by default: a backend opts in); ``avg_pool``: a
    unit that reads the block input average-pooled (``UnitSpec.avg_pool``, timm's "-d" shortcut; opt-in);
    ``running_update_dtypes``: the dtypes of the batch statistics the running-statistics update takes."""

    dtypes: FrozenSet[torch.dtype] = KERNEL_DTYPES
    groups: bool = False
    dilation: bool = False
    dims: FrozenSet[int] = frozenset({1, 2})
    shortcuts: FrozenSet[Shortcut] = frozenset(Shortcut)
    synced_bn: bool = True
    residual_scale: bool = True
    drop_path: bool = False
    avg_pool: bool = False
    running_update_dtypes: FrozenSet[torch.dtype] = frozenset({torch.float32})

    def refusal(self, spec: BlockSpec, dtype: Optional[torch.dtype] = None, residual_scale: bool = False,
                drop_path: bool = False) -> Optional[str]:
        """None when a block of ``spec`` (in ``dtype``; None: any; with a residual scale α; with stochastic depth
        in its closing) is within these capabilities, else the first it lacks, named: "capability 'groups'
        (groups [1, 32, 1])"."""
        if dtype is not None and dtype not in self.dtypes:
            return f"capability 'dtypes' (dtype {dtype}; runs {_names(self.dtypes)})"
        if not self.groups and any(u.groups != 1 for u in spec.units):
            return f"capability 'groups' (groups {[u.groups for u in spec.units]})"
        if not self.dilation and any(u.dilation != (1, 1) for u in spec.units):
            return f"capability 'dilation' (dilation {[u.dilation for u in spec.units]})"
        if spec.dim not in self.dims:
            return f"capability 'dims' ({spec.dim}-D; runs {sorted(self.dims)}-D)"
        if spec.shortcut not in self.shortcuts:
            return f"capability 'shortcuts' (shortcut {spec.shortcut.name})"
        if not self.synced_bn and spec.synced:
            return "capability 'synced_bn' (a BN synchronised over a process group)"
        if not self.residual_scale and residual_scale:
            return "capability 'residual_scale' (a residual scale α)"
        if not self.avg_pool and spec.pooled:
            return f"capability 'avg_pool' (avg_pool {[u.avg_pool for u in spec.units]})"
        if not self.drop_path and drop_path:
            return "capability 'drop_path' (stochastic depth in the closing)"
        if drop_path and not spec.final_relu:
            return f"capability 'drop_path' (stochastic depth with shortcut {spec.shortcut.name}: no closing)"
        return None

    def running_update_refusal(self, dtype: torch.dtype) -> Optional[str]:
        if dtype not in self.running_update_dtypes:
            return (f"capability 'running_update_dtypes' (batch statistics in {dtype}; takes "
                    f"{_names(self.running_update_dtypes)})")
        return None


def _names(dtypes) -> str:
    return ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))


def _within_capabilities(op):
    """A block op that refuses, with NotImplementedError naming the capability, a spec or dtype its backend does
    not declare: a direct call never computes what the backend does not claim (dispatch never makes one). Checked
    once per (spec, dtype, stochastic depth)."""
    @functools.wraps(op)
    def checked(self, spec, first, *args, **kwargs):
        accepted = self.__dict__.setdefault("_accepted", set())
        drop_path = kwargs.get("sample_scale") is not None
        key = (spec, first.dtype, drop_path)
        if key not in accepted:
            reason = self.capabilities.refusal(spec, first.dtype, drop_path=drop_path)
            if reason is not None:
                raise NotImplementedError(f"backend {self.name!r} does not run this block: it lacks {reason}")
            accepted.add(key)
        return op(self, spec, first, *args, **kwargs)
    checked.within_capabilities = True
    return checked


class Backend:
    """Interface of a backend. Subclasses set ``name`` and ``capabilities`` and implement every method below that
    raises."""

    name = ""
    # Where ``auto`` tries this backend on a CUDA tensor: lower first; None: never picked by auto.
    auto_rank: Optional[int] = None
    capabilities = Capabilities()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for op in ("block_forward", "block_inference", "block_backward"):
            fn = cls.__dict__.get(op)
            if fn is not None and not getattr(fn, "within_capabilities", False):
                setattr(cls, op, _within_capabilities(fn))

    def unavailable_reason(self) -> Optional[str]:
        """None when the backend can run on this machine, else a sentence saying why not (probed once)."""
        return None

    def device_refusal(self, device_type: str) -> Optional[str]:
        """None when this backend takes tensors of this device type here, else why not."""
        return None

    def unsupported_reason(self, device_type: str, dtype: torch.dtype, spec: BlockSpec) -> Optional[str]:
        """None when this backend runs the block ops on tensors of this device type and dtype with this spec,
        else why not (its device, or the capability it lacks)."""
        return self.device_refusal(device_type) or self.capabilities.refusal(spec, dtype)

    def running_update_unsupported_reason(self, device_type: str, dtype: torch.dtype) -> Optional[str]:
        """None when this backend runs the running-statistics update on batch statistics of this device type and
        dtype, else why not."""
        return self.device_refusal(device_type) or self.capabilities.running_update_refusal(dtype)

    def saved_format(self, x: Tensor) -> torch.memory_format:
        """The layout of the pre-BN outputs a training forward saves for backward."""
        raise NotImplementedError

    def block_forward(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor],
                      sample_scale: Optional[Tensor] = None) -> Forward:
        """Training forward; ``sample_scale`` (keyword, only where ``capabilities.drop_path``): stochastic depth's
        per-sample d [N] (reference.py's docstring)."""
        raise NotImplementedError

    def block_inference(self, spec: BlockSpec, x: Tensor, params: Params, residual: Optional[Tensor]) -> Tensor:
        """Eval forward with running statistics; nothing saved."""
        raise NotImplementedError

    def block_backward(self, spec: BlockSpec, dy: Tensor, x: Tensor, params: Params, saved: Forward,
                       need_input_grad: bool, sample_scale: Optional[Tensor] = None) -> Grads:
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


def gpu_candidates(name: str) -> List[str]:
    """The backends that would serve ``name`` on a GPU, before the reference fallback: ``name`` itself, or for
    ``auto`` its ranked candidates (those usable here; where none is, every ranked one: a GPU machine's)."""
    if name != "auto":
        return [name]
    ranked = [n for n in _candidates("auto", "cuda") if n != "reference"]
    return ranked or [n for _, n in sorted((b.auto_rank, n) for n, b in _REGISTRY.items() if b.auto_rank is not None)]


def block_refusal(name: str, spec: BlockSpec, residual_scale: bool = False) -> Optional[str]:
    """Why ``convert`` leaves a block of ``spec`` unfused for backend ``name`` (for ``auto``: no backend that
    auto picks on a GPU declares what the block needs), or None. The reference backend runs everything, but a
    block that only it would run is left as torch's modules, which are faster."""
    reasons = []
    for cand in gpu_candidates(name):
        reason = _REGISTRY[cand].capabilities.refusal(spec, residual_scale=residual_scale)
        if reason is None:
            return None
        reasons.append(f"backend {cand!r} lacks {reason}")
    return "; ".join(reasons) or None


def drop_path_refusal(name: str, spec: BlockSpec) -> Optional[str]:
    """Why a block of ``spec`` with stochastic depth cannot have it inside its op on backend ``name``, or None:
    every backend that may serve the call (for ``auto``, each it may pick on a GPU, so that auto's choice never
    moves a block to another backend for its drop_path) declares ``drop_path``. A block refused here runs its
    drop_path in torch (an open block), exactly."""
    reasons = [f"backend {cand!r} lacks {reason}" for cand in gpu_candidates(name)
               if (reason := _REGISTRY[cand].capabilities.refusal(spec, drop_path=True)) is not None]
    return "; ".join(reasons) or None


def resolve(name: str, x: Tensor, spec: BlockSpec, drop_path: bool = False) -> Backend:
    """The backend that runs a block op on x (the first candidate that takes it; with stochastic depth in the
    closing, ``drop_path``, one that declares it), cached; falling back past a candidate warns once, naming the
    reason and the backend that runs instead."""
    def refusal(b: Backend) -> Optional[str]:
        return b.unsupported_reason(x.device.type, x.dtype, spec) or b.capabilities.refusal(spec, drop_path=drop_path)
    return _resolve(name, x, (spec, drop_path), refusal)


def resolve_running_update(name: str, stats: Tensor) -> Backend:
    """``resolve`` for the running-statistics update, given the batch statistics."""
    return _resolve(name, stats, "running update",
                    lambda b: b.running_update_unsupported_reason(stats.device.type, stats.dtype))


def _resolve(name: str, x: Tensor, what, refusal) -> Backend:
    key = (name, x.device.type, x.dtype, what)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    skipped = []
    for cand in _candidates(name, x.device.type):
        reason = refusal(_REGISTRY[cand])
        if reason is None:
            if skipped:
                _warn_once((name, cand, tuple(skipped)),
                           f"fused_resnet: {'; '.join(skipped)}; running it on backend {cand!r} instead.")
            _RESOLVED[key] = _REGISTRY[cand]
            return _REGISTRY[cand]
        skipped.append(f"backend {cand!r} does not support this configuration ({reason})")
    raise RuntimeError(f"fused_resnet: no backend runs this call: {'; '.join(skipped)}")
