"""``fused-resnet info``: versions, the GPU, which backends can run here and why the others cannot, and the CUDA
extension's build status."""
from __future__ import annotations

import argparse
import platform
import sys

import torch
import torchvision

from .. import __version__, backends
from ..backends import extension
from ..kernels import autotune_description


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError as e:
        return f"not importable ({e})"


def run(args: argparse.Namespace) -> int:
    ext = extension.status()
    lines = [
        f"fused_resnet   {__version__}",
        f"python         {platform.python_version()} ({sys.executable})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"torchvision    {torchvision.__version__}",
        f"triton         {_triton_version()}",
        f"autotune       {autotune_description()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}          {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                         f"{p.total_memory / 2**30:.1f} GiB")
        lines.append(f"cudnn          {torch.backends.cudnn.version()}")
    else:
        lines.append("gpu            none (CUDA not available to torch)")
    lines.append("backends:")
    for name, reason in backends.backend_status().items():
        lines.append(f"  {name:<10}   {'available' if reason is None else 'unavailable: ' + reason}")
    if ext["loaded"]:
        lines.append(f"extension      loaded, {ext['how']}; ops: {', '.join(ext['ops'])}")
    else:
        lines.append(f"extension      unavailable: {ext['reason']}")
    print("\n".join(lines))
    return 0


def add_command(sub) -> None:
    sub.add_parser("info", help="versions, GPU, backends and extension build status").set_defaults(func=run)
