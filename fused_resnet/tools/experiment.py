"""``fused-resnet experiment depth | gradients``: the ResNet paper's argument, reproduced on fused blocks.

* ``depth``: plain and residual CIFAR networks of several depths trained with the same seed, data and schedule;
  training error per epoch (solid: residual, dashed: plain) and a table of final train and test error.
* ``gradients``: the gradient norm of every main-path conv weight (stem, then each block's convs; projection
  shortcuts are left out so plain and residual twins list the same layers) on a fixed batch, at initialisation
  and after some SGD steps, for plain and residual networks of increasing depth.

Every run uses :mod:`fused_resnet.tools.train` (fused blocks, SGD with momentum, warm-up, cosine schedule). Results go
to ``results.json``, a PNG and ``table.txt`` in the output folder; the table is also printed.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import backends
from . import data as datasets
from .train import (TrainConfig, Trainer, add_training_options, check_backend, config_from_args, figure, train,
                    write_json)

DEPTH_EPOCHS = 10  # experiment depth's default budget: about 4 minutes on a 2-core CPU (docs/EXPERIMENTS.md)
VARIANTS = (False, True)  # plain=False (residual), plain=True: every depth trains both, with the same seed


def parse_depths(text: str) -> list[int]:
    """"20,32,56" → [20, 32, 56], each a CIFAR ResNet depth (6n+2)."""
    try:
        depths = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"depths must be comma-separated integers, got {text!r}") from None
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise ValueError(f"CIFAR ResNet depths are 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), got {bad}")
    return depths


def _shared_options(base: TrainConfig) -> dict:
    """The options every run of an experiment shares (each run sets its own model and plain)."""
    return {k: v for k, v in dataclasses.asdict(base).items() if k not in ("model", "plain")}


def _name(plain: bool) -> str:
    return "plain" if plain else "residual"


def _variants(base: TrainConfig) -> list[tuple[str, bool, str | None]]:
    """(name, plain, residual scale) of the networks each depth trains: plain and residual, and with
    --residual-scale also the residual network with y = relu(α·bn(...) + shortcut)."""
    variants = [("plain", True, None), ("residual", False, None)]
    if base.residual_scale is not None:
        variants.append((f"α={base.residual_scale}", False, base.residual_scale))
    return variants


_STYLES = {"plain": "--", "residual": "-"}  # a residual-scale variant: dotted


def _plot(ax, xs: Sequence, ys: Sequence[float], depths: Sequence[int], depth: int, variant: str) -> None:
    """One run's line: a colour per depth, dashed for plain, solid for residual, dotted with a residual scale."""
    label = {"plain": "plain", "residual": "resnet"}.get(variant, f"resnet {variant}")
    ax.plot(xs, ys, _STYLES.get(variant, ":"), color=f"C{list(depths).index(depth)}", label=f"{label}-{depth}")


def _print_table(header: Sequence[str], rows: list[Sequence]) -> str:
    cells = [list(header)] + [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    text = "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])
    print(text)
    return text


def depth(base: TrainConfig, depths: Sequence[int], out: Path) -> dict:
    """Train plain and residual ``cifar_resnet<d>`` for each depth with ``base``'s options; write results.json,
    depth.png and table.txt to ``out``; return the results."""
    data = datasets.load(base.data, base.image_size)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    variants = _variants(base)
    for d, (name, plain, scale) in itertools.product(depths, sorted(variants, key=lambda v: v[1])):
        cfg = dataclasses.replace(base, model=f"cifar_resnet{d}", plain=plain, residual_scale=scale)
        start = time.perf_counter()
        history = train(cfg, data=data, quiet=True)
        runs.append({"depth": d, "plain": plain, "variant": name, "seconds": time.perf_counter() - start,
                     "history": history})
        last = history[-1]
        print(f"depth {d:4d} {name:8s}  train loss {last['train_loss']:.4f}  "
              f"train error {1 - last['train_acc']:.2%}  test error {1 - last['test_acc']:.2%}  "
              f"({runs[-1]['seconds']:.0f} s)", flush=True)

    final = {(r["depth"], r["variant"]): r["history"][-1] for r in runs}
    names = [v[0] for v in variants]
    rows = [[d] + [100 * (1 - final[d, v][key]) for key in ("train_acc", "test_acc") for v in names]
            + [final[d, v]["train_loss"] for v in names] for d in depths]
    print(f"\nfinal errors (%) after {base.epochs} epochs on {data.name}:")
    table = _print_table(["depth"] + [f"{v} {col}" for col in ("train", "test", "train loss") for v in names], rows)
    (out / "table.txt").write_text(table + "\n")
    results = {"config": _shared_options(base), "depths": list(depths), "runs": runs}
    write_json(out / "results.json", results)

    scaled = f", residual scale {base.residual_scale} (dotted)" if base.residual_scale is not None else ""
    fig, axes = figure(2, f"plain (dashed) vs residual (solid){scaled} on {data.name}, shortcut {base.shortcut}")
    for r in runs:
        epochs = [h["epoch"] for h in r["history"]]
        for ax, key in zip(axes, ("train_acc", "test_acc")):
            _plot(ax, epochs, [100 * (1 - h[key]) for h in r["history"]], depths, r["depth"], r["variant"])
    for ax, split in zip(axes, ("training", "test")):
        ax.set(xlabel="epoch", ylabel=f"{split} error (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(out / "depth.png", dpi=120)
    return results


def main_path_convs(model: nn.Module) -> list[nn.Module]:
    """The stem conv and every block's convs in forward order (projection shortcuts left out)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and "downsample" not in name]


def conv_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """‖∂loss/∂W‖ of every main-path conv weight, in forward order, for one train-mode pass on (x, y)."""
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    norms = [m.weight.grad.norm().item() for m in main_path_convs(model)]
    model.zero_grad(set_to_none=True)
    return norms


def gradients(base: TrainConfig, depths: Sequence[int], steps: int, out: Path) -> dict:
    """Per-layer conv gradient norms of plain and residual ``cifar_resnet<d>`` at initialisation and after
    ``steps`` SGD steps (schedule over those steps), on the first ``base.batch_size`` training examples; write
    results.json, gradients.png and table.txt to ``out``; return the results."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    data = datasets.load(base.data, base.image_size).subset(base.subset)
    out.mkdir(parents=True, exist_ok=True)
    probe_x, probe_y = next(iter(DataLoader(data.train, batch_size=base.batch_size)))
    runs = []
    for d, plain in itertools.product(depths, VARIANTS):
        cfg = dataclasses.replace(base, model=f"cifar_resnet{d}", plain=plain)
        loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(cfg.seed))
        trainer = Trainer(cfg, data, len(loader), steps)
        x, y = trainer.inputs(probe_x, probe_y)
        at_init = conv_grad_norms(trainer.model, x, y)
        weights_init = [m.weight.norm().item() for m in main_path_convs(trainer.model)]
        losses = [trainer.step(bx, by)[0] / len(by)
                  for bx, by in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)]
        after = conv_grad_norms(trainer.model, x, y)
        runs.append({"depth": d, "plain": plain, "init": at_init, "after": after, "losses": losses,
                     "weight_norms_init": weights_init,
                     "weight_norms_after": [m.weight.norm().item() for m in main_path_convs(trainer.model)]})
        print(f"depth {d:4d} {_name(plain):8s}  first/last layer gradient norm: init {at_init[0] / at_init[-1]:.3g}, "
              f"after {steps} steps {after[0] / after[-1]:.3g}; loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)

    rows = [[r["depth"], _name(r["plain"]), r["init"][0], r["init"][-1],
             r["init"][0] / r["init"][-1], r["after"][0], r["after"][-1], r["after"][0] / r["after"][-1],
             r["losses"][-1]] for r in runs]
    print(f"\nconv weight gradient norms on a fixed batch of {len(probe_y)} ({data.name}), at init and after {steps} "
          f"steps:")
    table = _print_table(["depth", "net", "init first", "init last", "init first/last", "after first",
                          "after last", "after first/last", "last loss"], rows)
    (out / "table.txt").write_text(table + "\n")
    results = {"config": _shared_options(base), "depths": list(depths), "steps": steps, "runs": runs}
    write_json(out / "results.json", results)

    fig, axes = figure(2, f"conv weight gradient norm per layer on {data.name} (dashed: plain, solid: residual)")
    for r in runs:
        for ax, key in zip(axes, ("init", "after")):
            _plot(ax, range(len(r[key])), r[key], depths, r["depth"], _name(r["plain"]))
    for ax, when in zip(axes, ("at initialisation", f"after {steps} steps")):
        ax.set(xlabel="conv layer (0 = stem)", ylabel="‖∂loss/∂W‖", yscale="log", title=when)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    fig.savefig(out / "gradients.png", dpi=120)
    return results


# --------------------------------------------------------------------------------------------- the command
def run(args: argparse.Namespace) -> int:
    check_backend(args, f"experiment {args.experiment}")
    try:
        depths = parse_depths(args.depths)
        out = args.out or Path("runs") / f"experiment-{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"blocks run on {device}: {backends.what_runs(args.backend, torch.device(device).type)}", flush=True)
        if args.experiment == "depth":
            depth(config_from_args(args), depths, out)
        else:
            gradients(config_from_args(args), depths, args.steps, out)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"fused-resnet experiment {args.experiment}: {e}") from e
    print(f"wrote {out}/results.json, table.txt, {args.experiment}.png")
    return 0


def add_command(sub) -> None:
    experiment = sub.add_parser("experiment", help="the ResNet paper's experiments on fused blocks: depth, gradients")
    kinds = experiment.add_subparsers(dest="experiment", required=True)
    depth_cmd = kinds.add_parser(
        "depth", help="plain vs residual networks at several depths: training error per epoch, final errors",
        description="Trains plain and residual CIFAR networks (dim=1 on mnist1d) of each depth with the same seed "
        "and data (with --residual-scale, also the residual network with that scale); writes results.json, "
        "depth.png (training error per epoch) and table.txt.",
    )
    depth_cmd.add_argument("--depths", default="20,32,56", help="comma-separated 6n+2 depths")
    add_training_options(depth_cmd, epochs=DEPTH_EPOCHS)
    depth_cmd.set_defaults(func=run)
    gradients_cmd = kinds.add_parser(
        "gradients", help="per-layer conv gradient norms of plain vs residual networks, at init and after N steps",
        description="For each depth, plain and residual: the gradient norm of every main-path conv weight on a "
        "fixed batch, at initialisation and after --steps SGD steps; writes results.json, gradients.png, table.txt.",
    )
    gradients_cmd.add_argument("--depths", default="20,56,110", help="comma-separated 6n+2 depths")
    gradients_cmd.add_argument("--steps", type=int, default=50, help="SGD steps between the two measurements")
    add_training_options(gradients_cmd, epochs=None)
    gradients_cmd.set_defaults(func=run)
