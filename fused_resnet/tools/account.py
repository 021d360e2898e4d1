"""``fused-resnet account``: every kernel one step launches, its compulsory DRAM bytes and FLOPs, per provider,
with a roofline model's predicted throughput — counted on the CPU (fake tensors, nothing computed), no GPU needed.
What is counted and how the model is calibrated: docs/PERFORMANCE.md."""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

from . import accounting, roofline
from .accounting import Account, Config


def _summary_rows(accounts: List[Account], gpu: str, cal: roofline.Calibration) -> List[str]:
    g = roofline.GPUS[gpu]
    lines = [f"| provider | model | mode | launches | aten ops | GB/image | GFLOP/image | FLOP/B | "
             f"predicted img/s ({gpu.upper()}, model) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in accounts:
        t = a.totals()
        p = roofline.predict(a, g, cal)
        lines.append(f"| {a.provider} | {a.config.model} | {a.config.mode} | {t['launches']} | {len(a.aten_ops)} | "
                     f"{t['bytes_per_image'] / 1e9:.3g} | {t['flops_per_image'] / 1e9:.3g} | {t['intensity']:.1f} | "
                     f"{p['img_per_s']:,.0f} |")
    return lines


def _unit_rows(accounts: List[Account]) -> List[str]:
    lines = ["| provider | mode | unit kind | launches | MB/image | GFLOP/image |", "|---|---|---|---|---|---|"]
    for a in accounts:
        for unit, t in a.by_unit().items():
            lines.append(f"| {a.provider} | {a.config.mode} | {unit} | {t['launches']} | "
                         f"{t['bytes_per_image'] / 1e6:.1f} | {t['flops_per_image'] / 1e9:.3f} |")
    return lines


def _block_rows(a: Account) -> List[str]:
    lines = [f"{a.provider} {a.config.mode}: per block", "| block | launches | MB/image | GFLOP/image |",
             "|---|---|---|---|"]
    for block, t in a.by_block().items():
        lines.append(f"| {block} | {t['launches']} | {t['bytes_per_image'] / 1e6:.1f} | "
                     f"{t['flops_per_image'] / 1e9:.3f} |")
    return lines


def _kernel_rows(a: Account, gpu: str, cal: roofline.Calibration) -> List[str]:
    g = roofline.GPUS[gpu]
    lines = [f"{a.provider} {a.config.mode}: every launch (predicted µs: the model, {gpu.upper()})",
             "| # | where | unit kind | kernel | kind | read MB | written MB | GFLOP | µs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, (launch, unit) in enumerate(zip(a.launches, a.units)):
        lines.append(f"| {i} | {launch.where or '-'} | {unit} | {launch.name} | {launch.kind} | "
                     f"{launch.reads / 1e6:.3f} | {launch.writes / 1e6:.3f} | {launch.flops / 1e9:.3f} | "
                     f"{roofline.kernel_s(launch, g, cal) * 1e6:.1f} |")
    return lines


def _config(args: argparse.Namespace, mode: str) -> Config:
    return Config(model=args.model, batch=args.batch, size=args.size, dtype=args.dtype,
                  channels_last=not args.nchw, mode=mode, amp=args.amp, optimizer=not args.no_optimizer,
                  dim=args.dim)


def run(args: argparse.Namespace) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    try:
        for p in providers:
            accounting.provider(p)
        bad = [m for m in modes if m not in accounting.MODES]
        if bad:
            raise ValueError(f"unknown mode {bad[0]!r}; expected train and/or eval")
        accounts = [accounting.account(_config(args, mode), p) for p in providers for mode in modes]
    except (ValueError, NotImplementedError) as e:
        raise SystemExit(f"fused-resnet account: {e}") from e
    cal = roofline.calibration()
    c = accounts[0].config
    print(f"{c.model}, batch {c.batch}, {'autocast ' if c.amp else ''}{c.dtype}, {c.layout}"
          f"{'' if c.optimizer else ', no optimizer step'}: compulsory DRAM traffic (each distinct tensor a kernel "
          f"reads or writes, once per kernel) and FLOPs (2 x MACs) of every launch; predicted img/s is a roofline "
          f"model (spec bandwidth x {cal.eta_mem:.3f}, spec bf16 peak x {cal.eta_flop:.3f}, "
          f"{cal.launch_s * 1e6:.1f} µs per launch, fitted to eager ResNet-50's 3,951 img/s on the H100)\n")
    print("\n".join(_summary_rows(accounts, args.gpu, cal)))
    print()
    print("\n".join(_unit_rows(accounts)))
    if args.blocks:
        for a in accounts:
            print()
            print("\n".join(_block_rows(a)))
    if args.kernels:
        for a in accounts:
            print()
            print("\n".join(_kernel_rows(a, args.gpu, cal)))
    if args.json:
        out: Dict[str, object] = {
            "model": "roofline: per launch max(bytes / (bandwidth x eta_mem), flops / (peak x eta_flop)) + launch_s",
            "calibration": cal._asdict(),
            "accounts": [dict(a.to_json(), predicted={g: roofline.predict(a, roofline.GPUS[g], cal)
                                                      for g in roofline.GPUS}) for a in accounts],
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.json}")
    if args.chart:
        roofline.chart(accounts, args.chart, f"{c.model}, batch {c.batch}, {c.dtype}, {c.layout}: MB per image "
                                            f"by unit kind (account)")
        print(f"wrote {args.chart}")
    return 0


def add_command(subparsers) -> None:
    p = subparsers.add_parser("account", help="count every kernel launch of a step: DRAM bytes, FLOPs, launches, "
                                              "predicted img/s (a roofline model); CPU only, nothing computed",
                              description=__doc__)
    p.add_argument("--model", default="resnet50", help="resnet18..152 or cifar_resnet<6n+2> (default resnet50)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=None,
                   help="image side (sequence length with --dim 1); default the model's own (224, 32, 40)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--nchw", action="store_true", help="NCHW tensors (default channels_last)")
    p.add_argument("--amp", action="store_true", help="a float32 model under torch.autocast(--dtype)")
    p.add_argument("--dim", type=int, default=2, choices=[1, 2],
                   help="1: the CIFAR net built from Conv1d/BatchNorm1d (MNIST-1D input, (N, 1, 40))")
    p.add_argument("--mode", default="train", help="train (forward, loss, backward, SGD step) and/or eval, "
                                                   "comma-separated")
    p.add_argument("--no-optimizer", action="store_true", help="a training step without the SGD step")
    p.add_argument("--providers", default="eager,reference",
                   help=f"comma-separated, of {', '.join(accounting.PROVIDERS)} (default eager,reference)")
    p.add_argument("--gpu", default="h100", choices=sorted(roofline.GPUS), help="for the predicted img/s")
    p.add_argument("--json", default=None, help="write every launch, the totals and the predictions here")
    p.add_argument("--chart", default=None, help="write a PNG: MB per image by unit kind, one bar per provider")
    p.add_argument("--blocks", action="store_true", help="also print the totals per block")
    p.add_argument("--kernels", action="store_true", help="also print every launch")
    p.set_defaults(func=run)
