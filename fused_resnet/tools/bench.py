"""``fused-resnet bench``: model throughput, peak memory and first-step time of the fused backends beside eager
PyTorch and torch.compile, measured in one run (the machinery is :mod:`fused_resnet.tools.benchmark`)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import backends
from ..testing import DTYPES
from . import benchmark


def _bench_setup(args: argparse.Namespace) -> tuple:
    """(device, models, providers, dtype, batch, channels_last) for ``bench``: GPU defaults, or the tiny CPU
    comparison (reference backend against eager) when there is no GPU."""
    if torch.cuda.is_available():
        kernel_backends = [b for b in ("cuda", "triton") if backends.backend_status()[b] is None]
        unfused = ["cuda-unfused"] if "cuda" in kernel_backends else []  # backend cuda with its graphs off
        providers = args.providers or ",".join(["eager", "compile"] + kernel_backends + unfused)
        return (torch.device("cuda"), args.model or "resnet18,resnet50", providers, args.dtype or "bfloat16",
                args.batch or 256, not args.nchw)
    print("no CUDA GPU here: running the tiny CPU comparison (the reference backend against eager; CPU timings "
          "say nothing about GPU speed)")
    return (torch.device("cpu"), args.model or "cifar_resnet20", args.providers or "eager,reference",
            args.dtype or "float32", args.batch or 8, args.channels_last)


def run(args: argparse.Namespace) -> int:
    device, model_arg, provider_arg, dtype, batch, channels_last = _bench_setup(args)
    model_names = [m.strip() for m in model_arg.split(",")]
    providers = [p.strip() for p in provider_arg.split(",")]
    modes = [m.strip() for m in args.mode.split(",")]
    try:
        for name in model_names:
            benchmark.build_model(name)
        for p in providers:
            if p not in ("eager", "compile"):
                backends.check_requested(p)
        bad = [m for m in modes if m not in benchmark.MODES]
        if bad:
            raise ValueError(f"unknown mode {bad[0]!r}; expected train and/or infer")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"fused-resnet bench: {e}") from e
    out = args.out or str(Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    Path(out).mkdir(parents=True, exist_ok=True)
    runs = benchmark.run_models(model_names, modes, providers, dtype, batch, device, channels_last=channels_last,
                                size=args.size, steps=args.steps, progress=not args.quiet, amp=args.amp,
                                rows_path=str(Path(out) / "rows.jsonl"))
    print(benchmark.table(runs))
    paths = benchmark.write_results(runs, out)
    fused = [p for p in providers if p not in ("eager", "compile")]
    dt = DTYPES[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if args.layers and fused:
        block_providers = ["eager"] + (["compile"] if "compile" in providers else []) + fused
        for name in model_names:
            for mode in modes:
                base, x, _ = benchmark.model_inputs(name, batch, device, dt, fmt, args.size)
                times = benchmark.layer_times(base, block_providers, mode, x, device)
                with open(Path(out) / f"layers_{name}_{mode}.json", "w") as f:
                    json.dump(times, f, indent=1)
                if benchmark.can_plot():
                    path = str(Path(out) / f"layers_{name}_{mode}.png")
                    benchmark.plot_layer_speedup(times, f"{name} {mode}, {dtype}, batch {batch}", path)
                    paths.append(path)
    if args.profile:
        for name in model_names:
            base, x, y = benchmark.model_inputs(name, batch, device, dt, fmt, args.size)
            for provider in [p for p in providers if p != "compile"]:
                for mode in modes:
                    report = benchmark.profile(base, provider, mode, x, y, device)
                    path = Path(out) / f"profile_{name}_{provider}_{mode}.txt"
                    path.write_text(report + "\n")
                    print(f"\n# {name}\n{report}")
                    paths.append(str(path))
    print(f"wrote {', '.join(paths)}")
    return 0


def add_command(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="model throughput, peak memory and first-step time: fused backends beside eager and torch.compile",
        description="Measures training-step and inference img/s (median step, warm-up excluded), peak memory and "
        "first-step time (compilation / autotuning) for each model, mode and provider in one run, prints a table "
        "and writes results.json, results.md, rows.jsonl (each row as soon as it is measured), throughput.png "
        "and a per-layer speedup chart. Without a GPU it says "
        "so and runs a tiny CPU comparison of the reference backend against eager.",
    )
    bench.add_argument("--model", default=None, help="comma-separated: resnet18/34/50/101/152, cifar_resnet<6n+2> "
                       "(default resnet18,resnet50 on a GPU, cifar_resnet20 on a CPU)")
    bench.add_argument("--mode", default="train,infer", help="train and/or infer")
    bench.add_argument("--providers", "--backend", default=None,
                       help="comma-separated: eager, compile, backend names and cuda-unfused (backend cuda with its "
                       "cuDNN fusion graphs off) (default on a GPU: eager, compile, every available kernel backend "
                       "and cuda-unfused; on a CPU: eager,reference)")
    bench.add_argument("--batch", type=int, default=None, help="default 256 on a GPU, 8 on a CPU")
    bench.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on a CPU")
    bench.add_argument("--amp", action="store_true",
                       help="float32 models under torch.autocast(--dtype) instead of models cast to --dtype")
    bench.add_argument("--size", type=int, default=None, help="input image size (default: the model's)")
    bench.add_argument("--steps", type=int, default=None,
                       help="time about this many steps per run (default: 0.5 s of steps after 0.1 s warm-up)")
    layout = bench.add_mutually_exclusive_group()
    layout.add_argument("--channels-last", action="store_true", help="channels_last (the default on a GPU)")
    layout.add_argument("--nchw", action="store_true", help="NCHW inputs and weights on a GPU")
    bench.add_argument("--no-layers", dest="layers", action="store_false",
                       help="skip the per-block timings and speedup charts (each residual block alone, forward or "
                       "forward+backward, every provider incl. torch.compile of the block)")
    bench.add_argument("--profile", action="store_true",
                       help="also profile each provider (torch.profiler): time per block and the top ops / kernels")
    bench.add_argument("--out", default=None, help="results folder (default runs/bench-<time>)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(func=run)
