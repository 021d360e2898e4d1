"""Triton kernels, installed as ``fused_resnet.kernels`` (the top-level name ``kernels`` belongs to another PyPI
package). One file per kernel family, named as in ``fused_resnet.backends.reference`` and
``csrc/``.

Importing a kernel module imports Triton. To run kernels on CPU tensors, set ``TRITON_INTERPRET=1`` before the
first import: Triton decides at decoration time whether a kernel is compiled or interpreted.

Autotuning of the conv kernels (``FUSED_RESNET_AUTOTUNE``): ``full`` (default) benchmarks every configuration of a
variant on its first launch and keeps the choice in Triton's on-disk cache, so later processes on the same GPU
architecture and versions skip the benchmark; ``heuristic`` launches one configuration chosen from the problem's
shape, with no benchmarking (quick runs: a first step that compiles one configuration per variant instead of four).
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


def autotune_description() -> str:
    """One line for ``fused-resnet info``: the active mode and where tuned choices are kept."""
    mode = autotune_mode()
    if mode == "heuristic":
        return (f"heuristic (one configuration per variant from its shape, no benchmarking; "
                f"{AUTOTUNE_ENV}=full|heuristic)")
    try:
        import triton

        where = triton.knobs.cache.dir
    except (ImportError, AttributeError):
        where = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")
    return (f"full (benchmarked on a variant's first launch, kept on disk in {where} per GPU architecture, Triton "
            f"version and variant; {AUTOTUNE_ENV}=full|heuristic)")
