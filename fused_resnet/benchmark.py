"""Measurement helpers shared by the benchmark scripts in bench/ (never used by tests to judge speed).

Timing: ``triton.testing.do_bench`` on a GPU (CUDA events, warm-up excluded, L2 flushed between calls, median);
on a CPU the median of ``time.perf_counter`` over repeated calls after warm-up. Every result row carries the
machine and versions it was measured with, in the results schema other tools read::

    {"model", "mode": "train"|"infer", "provider": "eager"|"compile"|"<backend>", "dtype", "batch",
     "img_per_s", "peak_mem_gib", "first_step_s", "gpu", "torch", "triton", "cudnn", "date"}
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, Optional

import torch


def environment() -> Dict[str, Optional[str]]:
    """Machine and versions for a results record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else f"none (CPU: {platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton_version,
        "cudnn": str(torch.backends.cudnn.version()) if cuda else None,
        "date": datetime.date.today().isoformat(),
    }


def bench_device(script: str) -> Optional[torch.device]:
    """The device a benchmark script runs on: CUDA, or the CPU under TRITON_INTERPRET=1 (a smoke run of the script
    itself, whose numbers mean nothing); None (after saying so) when neither is possible."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    print(f"{script} needs a CUDA GPU (or TRITON_INTERPRET=1 for a CPU smoke run); nothing measured")
    return None


def finish(result: dict, out: Optional[str], ok: bool) -> int:
    """Write the results JSON (when asked) and return the script's exit status: 0 when every check passed."""
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


def median_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Median milliseconds per call of ``fn`` (warm-up calls excluded)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    for _ in range(int(warmup_ms / 1e3 / once)):
        fn()
    times = []
    for _ in range(max(1, int(rep_ms / 1e3 / once))):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(fn: Callable[[], object], device: torch.device, batch: int, warmup_ms: float = 100,
            rep_ms: float = 500) -> Dict[str, float]:
    """img/s at the median step time, peak memory of a step (GiB, GPU only), and the first call's time
    (compilation / autotuning included)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    ms = median_ms(fn, device, warmup_ms, rep_ms)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"img_per_s": batch / (ms * 1e-3), "step_ms": ms, "peak_mem_gib": peak, "first_step_s": first}
