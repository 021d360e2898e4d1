"""Build settings of the CUDA extension, shared by setup.py (ahead of time) and
fused_resnet.backends.extension (just in time).

Environment flags:
  FUSED_RESNET_SKIP_CUDA_BUILD=1   setup.py builds no extension
  FUSED_RESNET_CUDA_ARCH_LIST      compute capabilities to build for (default "8.0;9.0"; e.g. "9.0" alone)
  FUSED_RESNET_DEBUG=1             -O0 -g -G device code, for cuda-gdb / compute-sanitizer
  MAX_JOBS                         parallel compile jobs (default: free RAM / 3 GiB, at most the core count)
  FUSED_RESNET_CUDNN_FRONTEND_INCLUDE  folder holding cudnn_frontend.h (default: the installed package
                                   nvidia-cudnn-frontend, else .deps/cudnn_frontend/include of the checkout);
                                   "none" builds without the cuDNN fusion graphs

Only os, sys and torch are imported here: setup.py loads this file by path before the package is installed.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

# relative to the repository root
SOURCES = ["csrc/ops.cpp", "csrc/block.cpp", "csrc/cudnn_fusion.cpp", "csrc/account.cpp", "csrc/bn_stats.cu", "csrc/bn_act.cu",
           "csrc/dbn.cu", "csrc/pool.cu"]
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


_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDNN_FRONTEND_ENV = "FUSED_RESNET_CUDNN_FRONTEND_INCLUDE"
# Where bench/gpu_suite.sh's machine finds the headers: a copy of the installed package's, made by
# `python fused_resnet/backends/build.py --stage-cudnn-frontend` and carried with the working tree (not committed).
CUDNN_FRONTEND_STAGED = os.path.join(".deps", "cudnn_frontend", "include")


def cudnn_frontend_include() -> Optional[str]:
    """The folder holding cudnn-frontend's headers (header-only C++; PyPI nvidia-cudnn-frontend installs them
    under site-packages/include), or None: the extension is then built without the cuDNN fusion graphs."""
    chosen = os.environ.get(CUDNN_FRONTEND_ENV)
    if chosen == "none":
        return None
    candidates = [chosen] if chosen else (
        [os.path.join(base, "include") for base in sys.path if base]
        + [os.path.join(sys.prefix, "include"), os.path.join(_ROOT, CUDNN_FRONTEND_STAGED)])
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cudnn_frontend.h")):
            return os.path.abspath(path)
    return None


def include_dirs() -> List[str]:
    """cudnn-frontend's headers where found, and the CUDA headers that a pip-installed CUDA build of torch ships
    under site-packages/nvidia/ (cuBLAS, cuSPARSE and cuDNN headers that torch's own headers include, absent from
    a minimal toolkit)."""
    frontend = cudnn_frontend_include()
    dirs = [frontend] if frontend else []
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
    # cudnn-frontend reaches cuDNN through dlsym on the library torch loaded (csrc/cudnn_fusion.cpp)
    fusion = (["-DFUSED_RESNET_WITH_CUDNN_FRONTEND", "-DNV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING"]
              if cudnn_frontend_include() else [])
    return [NO_STRICT_ALIASING] + fusion + (["-O0", "-g"] if debug() else ["-O3"])


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


def stage_cudnn_frontend(dest: str = CUDNN_FRONTEND_STAGED) -> str:
    """Copies the installed cudnn-frontend headers into the checkout (dest, relative to its root), for a machine
    without network that receives the working tree; returns the copy's path."""
    import shutil

    source = cudnn_frontend_include()
    if source is None:
        raise SystemExit("cudnn-frontend's headers are not installed here: pip install --no-deps nvidia-cudnn-frontend")
    target = os.path.join(_ROOT, dest)
    if os.path.abspath(source) != os.path.abspath(target):
        shutil.rmtree(target, ignore_errors=True)
        # the folder may hold other packages' headers: only cudnn-frontend's travel
        shutil.copytree(source, target, ignore=lambda folder, names: [
            name for name in names if (folder == source and not name.startswith("cudnn")) or name.endswith(".md")])
    return target


if __name__ == "__main__":
    if sys.argv[1:] == ["--stage-cudnn-frontend"]:
        print(stage_cudnn_frontend())
    else:
        raise SystemExit("usage: python fused_resnet/backends/build.py --stage-cudnn-frontend")
