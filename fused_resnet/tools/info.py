"""``fused-resnet info``: versions, the GPU, which backends can run here and why the others cannot, the CUDA
extension's build status and its cuDNN fusion graphs (on a GPU: which units of a probe run them)."""
from __future__ import annotations

import argparse
import platform
import sys

import torch
import torchvision

from .. import __version__, backends
from ..backends import extension
from ..backends.cuda import fusion
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
    lines.append(f"cudnn fusion   {fusion.line()}")
    if ext["loaded"] and torch.cuda.is_available() and fusion.built():
        try:
            lines += _fusion_probe()
        except Exception as e:  # info reports; a failing probe is a finding, not a reason to print nothing
            lines.append(f"  probe failed: {type(e).__name__}: {str(e).strip()[:2000]}")
    print("\n".join(lines))
    return 0


def _fusion_probe() -> list:
    """One bf16 channels_last training step and one eval forward of a basic block on backend cuda (seven graphs:
    every kind but the projection's eval): each unit's route, calls that ran fused or fell back, plan-build
    times, and cuDNN's reason for any graph without an engine."""
    from torchvision.models.resnet import BasicBlock

    from ..convert import convert, conversion_report

    model = convert(BasicBlock(64, 64), backend="cuda").cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 64, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    fusion.reset()
    with torch.autocast("cuda", torch.bfloat16):
        model(x).float().sum().backward()
        routes = conversion_report(model, x, train=True).splitlines()[1:]
        model.eval()
        with torch.no_grad():
            model(x)
        routes += conversion_report(model, x, train=False).splitlines()[1:]
    status = fusion.status()
    lines = ["  probe (BasicBlock 64, bf16 autocast, train step + eval), each unit's graphs:"]
    lines += [f"  {route.strip()}" for route in routes]
    lines += [f"    {label:<30} fused {t['fused']}, fell back {t['fallback']}, {t['built']} plan(s) built in "
              f"{t['build_ms']:.0f} ms" for label, t in status["tallies"].items()]
    lines += [f"    no engine: {key}: {why}" for key, why in status["unsupported"].items()]
    return lines


def add_command(sub) -> None:
    sub.add_parser("info", help="versions, GPU, backends and extension build status").set_defaults(func=run)
