"""``fused-resnet verify``: converted ResNets against their torch twins and the float64 oracle."""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from typing import List

import torch
import torchvision

from .. import backends, models
from ..convert import convert
from ..testing import DTYPES, compare_models, print_table, randomize_batchnorm

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _reference_model(name: str, args: argparse.Namespace):
    """(reference torch model, input tensor) for a model name."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    if name in models.IMAGENET_NAMES:
        model = getattr(torchvision.models, name)(num_classes=args.num_classes)
        return (randomize_batchnorm(model, gen, args.random_bn),
                torch.randn(args.batch, 3, args.size, args.size, generator=gen))
    depth = models.cifar_depth(name)
    if depth in CIFAR_DEPTHS:
        in_ch = 3 if args.dim == 2 else 1
        model = models.cifar_resnet(depth, shortcut=args.shortcut, plain=args.plain,
                                    num_classes=args.num_classes, in_channels=in_ch, dim=args.dim, backend=None)
        shape = (args.batch, in_ch, 32, 32) if args.dim == 2 else (args.batch, in_ch, 40)
        return randomize_batchnorm(model, gen, args.random_bn), torch.randn(*shape, generator=gen)
    raise SystemExit(f"fused-resnet verify: unknown model {name!r}; expected one of {models.IMAGENET_NAMES} or "
                     f"cifar_resnet{{{CIFAR_DEPTHS}}}")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def _checked(args: argparse.Namespace) -> torch.device:
    """The device to verify on, after the options a user can get wrong (one line and exit status 2 each)."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise SystemExit(f"fused-resnet verify: --device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fused-resnet verify: --device cuda, but torch sees no CUDA device here")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"fused-resnet verify: --device {device}: expected cpu or cuda")
    if args.steps < 1:
        raise SystemExit(f"fused-resnet verify: --steps must be at least 1 (train passes checked), got {args.steps}")
    if args.batch < 2:
        raise SystemExit(f"fused-resnet verify: --batch must be at least 2 (training BN), got {args.batch}")
    try:
        backends.check_requested(args.backend)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"fused-resnet verify: {e}") from None
    if args.backend == "auto" and backends.auto_runs_eager(device.type):
        # auto on a CPU is torch's own computation: verify the fused path that runs here instead, never torch
        # against itself
        print(f"backend auto on {device.type} runs torch's own modules; verifying backend 'reference', the fused "
              f"ops' path on a {device.type} (--backend triton / cuda where their test paths are enabled)")
        args.backend = "reference"
    return device


def run(args: argparse.Namespace) -> int:
    device = _checked(args)
    dtype = DTYPES[args.dtype]
    failed: List[str] = []
    records = []
    for name in args.model.split(","):
        start = time.perf_counter()
        reference, x = _reference_model(name.strip(), args)
        checks = compare_models(
            reference, lambda m: convert(m, backend=args.backend, inplace=True), x, dtype, device,
            channels_last=args.channels_last, train_steps=args.steps, autocast=args.autocast, lr=args.lr,
        )
        layout = "channels_last" if args.channels_last else "NCHW"
        title = (f"\n{name}: backend={args.backend}, {'autocast ' if args.autocast else ''}{args.dtype}, {device}, "
                 f"{layout}, input {tuple(x.shape)}, {args.steps} train pass(es), lr {args.lr} "
                 f"({time.perf_counter() - start:.1f} s)")
        print_table(title, checks)
        failed += [f"{name}: {c.name}" for c in checks if not c.ok]
        records.append({"model": name, "backend": args.backend, "dtype": args.dtype, "autocast": args.autocast,
                        "device": str(device), "layout": layout, "input": list(x.shape), "passes": args.steps,
                        "seed": args.seed, "random_bn": args.random_bn, "checks": [dataclasses.asdict(c) | {"ok": c.ok} for c in checks]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "device_name": _device_name(device), "runs": records}, f,
                      indent=1)
    if failed:
        print(f"\nFAILED {len(failed)} check(s): " + "; ".join(failed))
        return 1
    print("\nall checks passed (fused error ≤ 2 × PyTorch's own error against the float64 oracle, + floor)")
    return 0


def add_command(sub) -> None:
    verify = sub.add_parser(
        "verify",
        help="compare converted ResNets with their torch twins against a float64 oracle",
        description="Builds each reference ResNet and its converted twin, runs train-mode forward+backward and an "
        "eval forward, and checks outputs, input grad, every parameter grad and running statistics with the "
        "rule  fused error ≤ 2 × PyTorch's same-dtype error + floor  (errors relative, against float64).",
    )
    verify.add_argument("--model", default="resnet18,resnet50,cifar_resnet20",
                        help="comma-separated: resnet18/34/50/101/152, cifar_resnet20/32/44/56/110/1202")
    verify.add_argument("--backend", default="auto", choices=backends.choices())
    verify.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
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
    verify.add_argument("--random-bn", action="store_true",
                        help="every BN's γ in [0.5, 1.5], the last of each residual branch too (default: that one "
                             "gets a small γ; docs/NUMERICS.md)")
    verify.add_argument("--json", default=None, help="also write every check to this JSON file")
    verify.set_defaults(func=run)
