"""Triton kernels, installed as ``fused_resnet.kernels`` (the top-level name ``kernels`` belongs to another PyPI
package). One file per kernel family, named as in ``fused_resnet.backends.reference`` and
``csrc/``.

Importing a kernel module imports Triton. To run kernels on CPU tensors, set ``TRITON_INTERPRET=1`` before the
first import: Triton decides at decoration time whether a kernel is compiled or interpreted.

Autotuning of the conv kernels (``FUSED_RESNET_AUTOTUNE``): ``full`` (default) benchmarks every configuration of a
variant on its first launch; ``heuristic`` launches one configuration chosen from the problem's shape, with no
benchmarking (quick runs: a first step that compiles one configuration per variant instead of four).
"""
import os

AUTOTUNE_ENV = "FUSED_RESNET_AUTOTUNE"
AUTOTUNE_MODES = ("full", "heuristic")


def autotune_mode() -> str:
    """The Triton conv kernels' autotune mode (read when a kernel launches; Triton is not imported here)."""
    mode = os.environ.get(AUTOTUNE_ENV, "full")
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}={mode!r}; expected one of {AUTOTUNE_MODES}")
    return mode
