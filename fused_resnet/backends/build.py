"""Build settings of the CUDA extension, shared by setup.py (ahead of time) and
fused_resnet.backends.extension (just in time).

Environment flags:
  FUSED_RESNET_SKIP_CUDA_BUILD=1   setup.py builds no extension
  FUSED_RESNET_CUDA_ARCH_LIST      compute capabilities to build for (default "8.0;9.0"; e.g. "9.0" alone)
  FUSED_RESNET_DEBUG=1             -O0 -g -G device code, for cuda-gdb / compute-sanitizer
  MAX_JOBS                         parallel compile jobs (default: free RAM / 3 GiB, at most the core count)

Only os, sys and torch are imported here: setup.py loads this file by path before the package is installed.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

# relative to the repository root
SOURCES = ["csrc/ops.cpp", "csrc/block.cpp", "csrc/bn_stats.cu", "csrc/bn_act.cu", "csrc/dbn.cu"]
DEFAULT_ARCH_LIST = "8.0;9.0"


def arch_list() -> str:
    return os.environ.get("FUSED_RESNET_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)


def debug() -> bool:
    return os.environ.get("FUSED_RESNET_DEBUG", "0") == "1"


def skip_requested() -> bool:
    return os.environ.get("FUSED_RESNET_SKIP_CUDA_BUILD", "0") == "1"


def default_max_jobs() -> int:
    try:
        free_kib = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
        by_ram = max(1, free_kib // (3 * 1024 * 1024))
    except (OSError, StopIteration, ValueError):
        by_ram = 1
    return max(1, min(os.cpu_count() or 1, by_ram))


def set_build_env() -> None:
    """Arch list and parallel jobs for torch.utils.cpp_extension, unless the caller set them."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list())
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))


def include_dirs() -> List[str]:
    """CUDA headers that a pip-installed CUDA build of torch ships under site-packages/nvidia/ (cuBLAS, cuSPARSE
    and cuDNN headers that torch's own headers include, absent from a minimal toolkit)."""
    dirs = []
    for base in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cudnn/include", "nvidia/cu12/include"):
            path = os.path.join(base, sub)
            if os.path.isdir(path) and path not in dirs:
                dirs.append(path)
    return dirs


# c10's bfloat16 -> float conversion type-puns through a pointer cast; host code built with strict aliasing
# (g++ -O3's default) turned every bfloat16 load of the CPU path into 0. PyTorch builds itself without it, too.
NO_STRICT_ALIASING = "-fno-strict-aliasing"


def cxx_flags() -> List[str]:
    return [NO_STRICT_ALIASING] + (["-O0", "-g"] if debug() else ["-O3"])


def nvcc_flags() -> List[str]:
    flags = ["--expt-relaxed-constexpr", "-Xcompiler", NO_STRICT_ALIASING]  # the C++ standard: cpp_extension's
    return flags + (["-O0", "-g", "-G"] if debug() else ["-O3", "-lineinfo"])


def _find_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit before torch.utils.cpp_extension reads it. Torch guesses the parent of
    the `nvcc` on PATH, which is wrong when that nvcc is a wrapper script (e.g. /usr/local/bin/nvcc exec-ing
    /usr/local/cuda-13.0/bin/nvcc): the link step then finds no libcudart."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for home in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(os.path.join(home, "lib64")):
            os.environ["CUDA_HOME"] = home
            return


def unavailable_reason() -> Optional[str]:
    """None if the extension can be compiled here, else why not. Call before importing
    torch.utils.cpp_extension (it settles CUDA_HOME)."""
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return "torch is not importable at build time"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (a CUDA build of torch is needed to compile)"
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None
