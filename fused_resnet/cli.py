"""``fused-resnet`` command line: ``info``, ``verify``, ``bench``, ``train`` and ``experiment depth | gradients``."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torchvision

from . import __version__, _ext, backends, benchmark, data, experiments, models, testing, train
from .convert import convert

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
DEPTH_EPOCHS = 10  # experiment depth's default budget: about 4 minutes on a 2-core CPU (docs/EXPERIMENTS.md)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError as e:
        return f"not importable ({e})"


def cmd_info(args: argparse.Namespace) -> int:
    ext = _ext.status()
    lines = [
        f"fused_resnet   {__version__}",
        f"python         {platform.python_version()} ({sys.executable})",
        f"torch          {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
        f"torchvision    {torchvision.__version__}",
        f"triton         {_triton_version()}",
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


def _reference_model(name: str, args: argparse.Namespace):
    """(reference torch model, input tensor) for a model name."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if name in models.IMAGENET_NAMES:
        model = getattr(torchvision.models, name)(num_classes=args.num_classes)
        return testing.randomize_batchnorm(model, gen), torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    depth = models.cifar_depth(name)
    if depth in CIFAR_DEPTHS:
        in_ch = 3 if args.dim == 2 else 1
        model = models.cifar_resnet(depth, shortcut=args.shortcut, plain=args.plain,
                                    num_classes=args.num_classes, in_channels=in_ch, dim=args.dim, backend=None)
        shape = (args.batch, in_ch, 32, 32) if args.dim == 2 else (args.batch, in_ch, 40)
        return testing.randomize_batchnorm(model, gen), torch.randn(*shape, generator=gen)
    raise SystemExit(f"unknown model {name!r}; expected one of {models.IMAGENET_NAMES} or "
                     f"cifar_resnet{{{CIFAR_DEPTHS}}}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def cmd_verify(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = testing.DTYPES[args.dtype]
    backends.check_requested(args.backend)
    failed: List[str] = []
    records = []
    for name in args.model.split(","):
        start = time.perf_counter()
        reference, x = _reference_model(name.strip(), args)
        checks = testing.compare_models(
            reference, lambda m: convert(m, backend=args.backend, inplace=True), x, dtype, device,
            channels_last=args.channels_last, train_steps=args.steps, autocast=args.autocast, lr=args.lr,
        )
        layout = "channels_last" if args.channels_last else "NCHW"
        title = (f"\n{name}: backend={args.backend}, {'autocast ' if args.autocast else ''}{args.dtype}, {device}, "
                 f"{layout}, input {tuple(x.shape)}, {args.steps} train pass(es), lr {args.lr} ({time.perf_counter() - start:.1f} s)")
        testing.print_table(title, checks)
        failed += [f"{name}: {c.name}" for c in checks if not c.ok]
        records.append({"model": name, "backend": args.backend, "dtype": args.dtype, "autocast": args.autocast,
                        "device": str(device), "layout": layout, "input": list(x.shape), "passes": args.steps,
                        "seed": args.seed, "checks": [dataclasses.asdict(c) | {"ok": c.ok} for c in checks]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device_name": _device_name(device), "runs": records}, f,
                      indent=1)
    if failed:
        print(f"\nFAILED {len(failed)} check(s): " + "; ".join(failed))
        return 1
    print("\nall checks passed (fused error ≤ 2 × PyTorch's own error against the float64 oracle, + floor)")
    return 0


def _train_config(args: argparse.Namespace) -> train.TrainConfig:
    fields = dataclasses.fields(train.TrainConfig)
    return train.TrainConfig(**{f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)})


def cmd_train(args: argparse.Namespace) -> int:
    try:
        cfg = _train_config(args)
        out = args.out or (args.resume.parent if args.resume else train.default_out(cfg))
        print(f"training {cfg.model}{' (plain)' if cfg.plain else ''} on {cfg.data}, {cfg.epochs} epochs, "
              f"lr {cfg.lr} -> {out}")
        history = train.train(cfg, out=out, resume=args.resume, quiet=args.quiet)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"fused-resnet train: {e}") from e
    last = history[-1]
    print(f"final: train loss {last['train_loss']:.4f}, train error {1 - last['train_acc']:.2%}, "
          f"test error {1 - last['test_acc']:.2%}; wrote {out}/checkpoint.pt, history.json, curves.png")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    try:
        depths = experiments.parse_depths(args.depths)
        out = args.out or Path("runs") / f"experiment-{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        if args.experiment == "depth":
            experiments.depth(_train_config(args), depths, out)
        else:
            experiments.gradients(_train_config(args), depths, args.steps, out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"fused-resnet experiment {args.experiment}: {e}") from e
    print(f"wrote {out}/results.json, table.txt, {args.experiment}.png")
    return 0


def _add_training_options(p: argparse.ArgumentParser, epochs: int | None) -> None:
    """Options shared by ``train`` and the experiments (``epochs``: the default, None for no --epochs option)."""
    p.add_argument("--data", default="mnist1d", help=f"one of {', '.join(data.DATA_SPECS)} (default mnist1d; see "
                   "docs/EXPERIMENTS.md for the folder layouts; nothing is downloaded)")
    if epochs is not None:
        p.add_argument("--epochs", type=int, default=epochs, help=f"default {epochs}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate (default 0.05 on mnist1d, else 0.1), warmed up linearly, then cosine to 0")
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--shortcut", default="A", choices=("A", "B", "C"), help="CIFAR models' shortcut option")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=backends.BACKEND_CHOICES)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--subset", type=int, default=None, help="use only the first N examples of each split")
    p.add_argument("--image-size", type=int, default=224, help="crop size for imagefolder data")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<name>-<timestamp>)")


def _bench_setup(args: argparse.Namespace) -> tuple:
    """(device, models, providers, dtype, batch, channels_last) for ``bench``: GPU defaults, or the tiny CPU
    comparison (reference backend against eager) when there is no GPU."""
    if torch.cuda.is_available():
        kernel_backends = [b for b in ("cuda", "triton") if backends.backend_status()[b] is None]
        providers = args.providers or ",".join(["eager", "compile"] + kernel_backends)
        return (torch.device("cuda"), args.model or "resnet18,resnet50", providers, args.dtype or "bfloat16",
                args.batch or 256, not args.nchw)
    print("no CUDA GPU here: running the tiny CPU comparison (the reference backend against eager; CPU timings "
          "say nothing about GPU speed)")
    return (torch.device("cpu"), args.model or "cifar_resnet20", args.providers or "eager,reference",
            args.dtype or "float32", args.batch or 8, args.channels_last)


def cmd_bench(args: argparse.Namespace) -> int:
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
        if dtype not in testing.DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(testing.DTYPES)}")
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"fused-resnet bench: {e}") from e
    out = args.out or str(Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = benchmark.run_models(model_names, modes, providers, dtype, batch, device, channels_last, args.size,
                                steps=args.steps, progress=not args.quiet)
    print(benchmark.table(runs))
    paths = benchmark.write_results(runs, out)
    fused = [p for p in providers if p not in ("eager", "compile")]
    dt = testing.DTYPES[dtype]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-resnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, GPU, backends and extension build status")
    info.set_defaults(func=cmd_info)
    verify = sub.add_parser(
        "verify",
        help="compare converted ResNets with their torch twins against a float64 oracle",
        description="Builds each reference ResNet and its converted twin, runs train-mode forward+backward and an "
        "eval forward, and checks outputs, input grad, every parameter grad and running statistics with the "
        "rule  fused error ≤ 2 × PyTorch's same-dtype error + floor  (errors relative, against float64).",
    )
    verify.add_argument("--model", default="resnet18,resnet50,cifar_resnet20",
                        help="comma-separated: resnet18/34/50/101/152, cifar_resnet20/32/44/56/110/1202")
    verify.add_argument("--backend", default="auto", choices=backends.BACKEND_CHOICES)
    verify.add_argument("--dtype", default="float32", choices=sorted(testing.DTYPES))
    verify.add_argument("--autocast", action="store_true", help="float32 models under torch.autocast(--dtype)")
    verify.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    verify.add_argument("--batch", type=int, default=4)
    verify.add_argument("--size", type=int, default=64, help="input height and width of the ImageNet models")
    verify.add_argument("--steps", type=int, default=2,
                        help="train-mode forward+backward passes (running statistics accumulate over them)")
    verify.add_argument("--lr", type=float, default=0.0, help="SGD learning rate between passes (0: weights fixed)")
    verify.add_argument("--channels-last", action="store_true")
    verify.add_argument("--num-classes", type=int, default=10)
    verify.add_argument("--shortcut", default="A", choices=("A", "B", "C"), help="CIFAR models")
    verify.add_argument("--plain", action="store_true", help="CIFAR models without shortcuts")
    verify.add_argument("--dim", type=int, default=2, choices=(1, 2), help="CIFAR models: 1 for Conv1d on length 40")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--json", default=None, help="also write every check to this JSON file")
    verify.set_defaults(func=cmd_verify)

    bench = sub.add_parser(
        "bench",
        help="model throughput, peak memory and first-step time: fused backends beside eager and torch.compile",
        description="Measures training-step and inference img/s (median step, warm-up excluded), peak memory and "
        "first-step time (compilation / autotuning) for each model, mode and provider in one run, prints a table "
        "and writes results.json, results.md, throughput.png and a per-layer speedup chart. Without a GPU it says "
        "so and runs a tiny CPU comparison of the reference backend against eager.",
    )
    bench.add_argument("--model", default=None, help="comma-separated: resnet18/34/50/101/152, cifar_resnet<6n+2> "
                       "(default resnet18,resnet50 on a GPU, cifar_resnet20 on a CPU)")
    bench.add_argument("--mode", default="train,infer", help="train and/or infer")
    bench.add_argument("--providers", "--backend", default=None,
                       help="comma-separated: eager, compile and backend names (default on a GPU: eager, compile "
                       "and every available kernel backend; on a CPU: eager,reference)")
    bench.add_argument("--batch", type=int, default=None, help="default 256 on a GPU, 8 on a CPU")
    bench.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on a CPU")
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
    bench.set_defaults(func=cmd_bench)

    train_cmd = sub.add_parser(
        "train", help="train a fused ResNet (progress, per-epoch metrics, checkpoint/resume, JSON + PNG curves)",
        description="Trains with fused blocks (the reference backend on a CPU): SGD with momentum 0.9 and weight "
        "decay, linear warm-up, then cosine schedule. Writes checkpoint.pt, history.json and curves.png to --out "
        "after every epoch; --resume continues a run exactly.",
    )
    train_cmd.add_argument("--model", default="cifar_resnet20",
                           help="cifar_resnet<depth> (6n+2: 20, 32, 44, 56, 110, ...) or resnet18/34/50/101/152")
    _add_training_options(train_cmd, epochs=10)
    train_cmd.add_argument("--plain", action="store_true", help="CIFAR models without shortcuts (the plain twin)")
    train_cmd.add_argument("--resume", type=Path, default=None,
                           help="continue from this checkpoint.pt (same options; output goes to its folder by default)")
    train_cmd.add_argument("--channels-last", action="store_true",
                           help="2-D models: channels_last weights and inputs")
    train_cmd.add_argument("--amp", default=None, choices=("bfloat16", "float16"), help="train under torch.autocast")
    train_cmd.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    train_cmd.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    train_cmd.set_defaults(func=cmd_train)

    experiment = sub.add_parser("experiment", help="the ResNet paper's experiments on fused blocks: depth, gradients")
    kinds = experiment.add_subparsers(dest="experiment", required=True)
    depth = kinds.add_parser(
        "depth", help="plain vs residual networks at several depths: training error per epoch, final errors",
        description="Trains plain and residual CIFAR networks (dim=1 on mnist1d) of each depth with the same seed "
        "and data; writes results.json, depth.png (training error per epoch) and table.txt.",
    )
    depth.add_argument("--depths", default="20,32,56", help="comma-separated 6n+2 depths")
    _add_training_options(depth, epochs=DEPTH_EPOCHS)
    depth.set_defaults(func=cmd_experiment)
    gradients = kinds.add_parser(
        "gradients", help="per-layer conv gradient norms of plain vs residual networks, at init and after N steps",
        description="For each depth, plain and residual: the gradient norm of every main-path conv weight on a "
        "fixed batch, at initialisation and after --steps SGD steps; writes results.json, gradients.png, table.txt.",
    )
    gradients.add_argument("--depths", default="20,56,110", help="comma-separated 6n+2 depths")
    gradients.add_argument("--steps", type=int, default=50, help="SGD steps between the two measurements")
    _add_training_options(gradients, epochs=None)
    gradients.set_defaults(func=cmd_experiment)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
