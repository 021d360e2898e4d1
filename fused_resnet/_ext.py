"""Loading the C++/CUDA extension (ops under ``torch.ops.fused_resnet_C``).

Two paths: the module ``fused_resnet._C`` built ahead of time by setup.py, or a just-in-time build with ninja
(torch.utils.cpp_extension.load) from the csrc/ folder of a source checkout, on request (``load(jit=True)``)
or when FUSED_RESNET_JIT=1. Loading never raises: ``status()`` says what happened and why.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

from . import _build

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_state: dict = {}


def _jit_build():
    from torch.utils import cpp_extension

    sources = [os.path.join(_REPO_ROOT, s) for s in _build.SOURCES]
    missing = [s for s in sources if not os.path.exists(s)]
    if missing:
        raise RuntimeError(f"JIT build needs the sources of a source checkout; missing {missing}")
    _build.set_build_env()
    return cpp_extension.load(
        name="fused_resnet_C",
        sources=sources,
        extra_include_paths=_build.include_dirs(),
        extra_cflags=_build.cxx_flags(),
        extra_cuda_cflags=_build.nvcc_flags(),
        verbose=os.environ.get("FUSED_RESNET_VERBOSE_BUILD", "0") == "1",
    )


def load(jit: Optional[bool] = None):
    """The extension module, or None (then ``status()["reason"]`` says why)."""
    if _state.get("module") is not None:
        return _state["module"]
    try:
        module = importlib.import_module("fused_resnet._C")
        _state.update(module=module, how="prebuilt (fused_resnet._C)", reason=None)
        return module
    except ImportError as e:
        reason = f"no prebuilt fused_resnet._C ({e})"
    if jit is None:
        jit = os.environ.get("FUSED_RESNET_JIT", "0") == "1"
    if jit:
        why_not = _build.unavailable_reason()
        if why_not is None:
            try:
                module = _jit_build()
                _state.update(module=module, how="just-in-time build", reason=None)
                return module
            except Exception as e:  # a failed compile is reported, not raised: the package stays usable
                reason += f"; JIT build failed: {type(e).__name__}: {str(e).strip()[-2000:]}"
        else:
            reason += f"; JIT build impossible: {why_not}"
    else:
        reason += "; JIT build not requested (FUSED_RESNET_JIT=1 or fused_resnet._ext.load(jit=True))"
    _state.update(module=None, how=None, reason=reason)
    return None


def status() -> dict:
    """{'loaded': bool, 'how': str | None, 'reason': str | None, 'ops': [...]} after trying to load (no JIT)."""
    if not _state:
        load(jit=None)
    module = _state.get("module")
    ops = []
    if module is not None:
        import torch

        ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fused_resnet_C::"))
    return {"loaded": module is not None, "how": _state.get("how"), "reason": _state.get("reason"), "ops": ops}
