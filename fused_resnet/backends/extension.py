"""Loading the C++/CUDA extension (ops under ``torch.ops.fused_resnet_C``).

Two paths: the module ``fused_resnet._C`` built ahead of time by setup.py, or a just-in-time build with ninja
(torch.utils.cpp_extension.load) from the csrc/ folder of a source checkout, on request (``load(jit=True)``)
or when FUSED_RESNET_JIT=1. Loading never raises: ``status()`` says what happened and why. Whoever needs to act
when the ops appear (the op layer registers their fakes and autograd) subscribes with ``on_load``.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, List, Optional

import torch

from . import build
from . import registry

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_state: dict = {}
_on_load: List[Callable[[], None]] = []


def on_load(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the extension's ops are registered: now if they are, else when a later load
    (a just-in-time build) brings them."""
    _on_load.append(callback)
    if _state.get("module") is not None:
        callback()


def _loaded(module, how: str):
    _state.update(module=module, how=how, reason=None)
    registry.refresh()  # backends' availability may change with the ops
    for callback in _on_load:
        callback()
    return module


def _jit_build():
    from torch.utils import cpp_extension

    sources = [os.path.join(_REPO_ROOT, s) for s in build.SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise RuntimeError(f"JIT build needs the sources of a source checkout; missing {missing}")
    build.set_build_env()
    return cpp_extension.load(
        name="fused_resnet_C",
        sources=sources,
        extra_include_paths=build.include_dirs(),
        extra_cflags=build.cxx_flags(),
        extra_cuda_cflags=build.nvcc_flags(),
        verbose=os.environ.get("FUSED_RESNET_VERBOSE_BUILD", "0") == "1",
    )


def load(jit: Optional[bool] = None):
    """The extension module, or None (then ``status()["reason"]`` says why)."""
    if _state.get("module") is not None:
        return _state["module"]
    try:
        prebuilt = importlib.import_module("fused_resnet._C")
    except ImportError as e:
        prebuilt, reason = None, f"no prebuilt fused_resnet._C ({e})"
    if prebuilt is not None:
        return _loaded(prebuilt, "prebuilt (fused_resnet._C)")
    if jit is None:
        jit = os.environ.get("FUSED_RESNET_JIT", "0") == "1"
    if jit:
        why_not = build.unavailable_reason()
        if why_not is None:
            try:
                built = _jit_build()
            except Exception as e:  # a failed compile is reported, not raised: the package stays usable
                built, reason = None, reason + f"; JIT build failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
            if built is not None:
                return _loaded(built, "just-in-time build")
        else:
            reason += f"; JIT build impossible: {why_not}"
    else:
        reason += "; JIT build not requested (FUSED_RESNET_JIT=1 or fused_resnet.backends.extension.load(jit=True))"
    _state.update(module=None, how=None, reason=reason)
    return None


def status() -> dict:
    """{'loaded': bool, 'how': str | None, 'reason': str | None, 'ops': [...]} after trying to load (no JIT)."""
    if not _state:
        load(jit=None)
    module = _state.get("module")
    ops = []
    if module is not None:
        ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_resnet_C::"))
    return {"loaded": module is not None, "how": _state.get("how"), "reason": _state.get("reason"), "ops": ops}
