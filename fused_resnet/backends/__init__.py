"""What runs the block ops: the registry and every backend, one module each.

Importing this package imports every module in this folder; a backend module registers itself, so a new backend
is one new file here. Support modules live beside them: ``registry`` (selection and dispatch), ``folding`` (BN
folded into conv weights, shared by the backends' eval paths), ``build`` and ``extension`` (compiling and loading
the C++/CUDA extension).
"""
from __future__ import annotations

import importlib
import pkgutil

from .registry import (Backend, Capabilities, auto_runs_eager, available_backends, backend_status, block_refusal,
                       check_requested, choices, drop_path_refusal, get, names, refresh, register, resolve,
                       resolve_running_update, what_runs)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Backend", "Capabilities", "auto_runs_eager", "available_backends", "backend_status", "block_refusal",
           "check_requested", "choices", "drop_path_refusal", "get", "names", "refresh", "register", "resolve", "resolve_running_update",
           "what_runs"]
