"""``fused-resnet train``: training with fused blocks, also the runs of ``fused-resnet experiment``.

Optimiser: SGD with momentum 0.9 and weight decay 1e-4 (the ResNet paper's), learning rate 0.1 on images (the
paper's) and 0.05 on MNIST-1D, warmed up linearly over the first epoch, then cosine-annealed to 0, stepped every
batch. Training loss and accuracy of an epoch are averages over its batches in train mode (as the paper's
training-error curves); test loss and accuracy are measured in eval mode.

Reproducibility: the seed sets torch's global RNG (weights, augmentation) and the generator of the training
DataLoader (shuffling); with ``num_workers=0`` a CPU run is exactly repeatable. A checkpoint is written after every
epoch with the model, optimiser, scheduler, grad scaler, both RNG states and the history, so a resumed run
continues exactly where the interrupted one stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from .. import backends, models
from ..convert import convert
from . import data as datasets

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# The paper's 0.1 for images; on MNIST-1D 0.05 reached lower training loss and test error (docs/EXPERIMENTS.md).
DEFAULT_LR = {"mnist1d": 0.05}
# The option that may differ between an interrupted run and its resumption (only the arithmetic changes with it).
RESUME_MAY_DIFFER = ("device",)


@dataclasses.dataclass
class TrainConfig:
    """One training run. ``lr=None`` takes the data's DEFAULT_LR (0.1 if none); ``shortcut``/``plain`` apply to
    cifar_resnet models; ``subset`` keeps the first n examples of each split; ``image_size`` is for ImageFolder
    data; ``amp`` is an autocast dtype (bfloat16 or float16)."""

    model: str = "cifar_resnet20"
    data: str = "mnist1d"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    plain: bool = False
    shortcut: str = "A"
    backend: str = "auto"
    device: str | None = None
    channels_last: bool = False
    amp: str | None = None
    subset: int | None = None
    image_size: int = 224
    num_workers: int = 0
    residual_scale: str | None = None  # None, a float or "learnable" (models' residual_scale)
    ddp: bool = False
    sync_bn: bool = False

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be positive, got {self.epochs} and {self.batch_size}")
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.data, 0.1)
        if self.amp is not None and self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {self.amp!r}")
        parse_residual_scale(self.residual_scale)
        if self.sync_bn and not self.ddp:
            raise ValueError("--sync-bn synchronises BN over the processes of --ddp; give --ddp too")


def parse_residual_scale(text: str | None):
    """--residual-scale: None, "learnable" or a float."""
    if text is None or text == "learnable":
        return text
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"residual scale must be 'learnable' or a number, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "Distributed":
        missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
        if missing:
            raise ValueError(f"--ddp runs under torchrun (or another launcher setting RANK, WORLD_SIZE and "
                             f"LOCAL_RANK); {', '.join(missing)} not set")
        return Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))

    def sum(self, *values: float) -> list[float]:
        """``values`` summed over the processes (as they are with one)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64,
                         device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
        torch.distributed.all_reduce(t)
        return t.tolist()


def build_model(cfg: TrainConfig, data: datasets.Data) -> nn.Module:
    """The fused model named by ``cfg.model`` for ``data`` (channels, classes, 1-D or 2-D)."""
    backends.check_requested(cfg.backend)
    depth = models.cifar_depth(cfg.model)
    if depth is not None:
        return models.cifar_resnet(depth, shortcut=cfg.shortcut, plain=cfg.plain,
                                   num_classes=data.num_classes, in_channels=data.in_channels, dim=data.dim,
                                   backend=cfg.backend, residual_scale=parse_residual_scale(cfg.residual_scale))
    if cfg.model not in models.IMAGENET_NAMES:
        raise ValueError(f"unknown model {cfg.model!r}; expected cifar_resnet<depth> (depth 6n+2: 20, 32, 44, 56, "
                         f"110, ...) or one of {', '.join(models.IMAGENET_NAMES)}")
    if cfg.plain or cfg.shortcut != "A":
        raise ValueError(f"--plain and --shortcut apply to cifar_resnet models; {cfg.model} has torchvision's "
                         f"projection shortcuts")
    if data.dim != 2:
        raise ValueError(f"{cfg.model} takes images; {data.name} is 1-D: use a cifar_resnet model")
    return getattr(models, cfg.model)(num_classes=data.num_classes, backend=cfg.backend,
                                      residual_scale=parse_residual_scale(cfg.residual_scale))


def device_name(cfg: TrainConfig) -> str:
    """The run's device: --device, else cuda when available (a --ddp process then takes its LOCAL_RANK's GPU)."""
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: nn.Module, cfg: TrainConfig, total_steps: int, warmup_steps: int):
    """SGD (momentum, weight decay) and a per-step schedule: linear warm-up over ``warmup_steps``, then cosine
    annealing to 0 at ``total_steps``."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(total_steps - warmup_steps, 1)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Trainer:
    """A model, its optimiser and schedule, and the device, layout and autocast settings of one run."""

    def __init__(self, cfg: TrainConfig, data: datasets.Data, steps_per_epoch: int, total_steps: int,
                 dist: Distributed = Distributed()):
        if cfg.channels_last and data.dim != 2:
            raise ValueError("channels_last applies to 2-D (image) models only")
        self.cfg = cfg
        self.dist = dist
        self.device = torch.device(device_name(cfg))
        if cfg.ddp and self.device.type == "cuda":
            self.device = torch.device("cuda", dist.local_rank)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, data).to(self.device)
        if cfg.sync_bn:
            convert(self.model, backend=cfg.backend, inplace=True, sync_bn=True)
        self.layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model.to(memory_format=self.layout)
        # the model steps through DDP's wrapper (gradient averaging, buffers from rank 0); states and eval use
        # the model itself, so checkpoints carry no "module." prefix
        self.net = self.model
        if cfg.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        warmup = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg, total_steps, warmup)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "float16")

    def inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.layout) if x.dim() == 4 else x, y.to(self.device, non_blocking=True)

    def _autocast(self):
        if self.cfg.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.cfg.amp])

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        """One SGD step in train mode; (summed loss, correct predictions) of the batch."""
        x, y = self.inputs(x, y)
        self.net.train()
        with self._autocast():
            logits = self.net(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item() * len(y), int((logits.argmax(1) == y).sum())

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> tuple[float, float]:
        """(mean loss, accuracy) over a loader (this process's share of it under --ddp: summed over all), in eval
        mode."""
        self.model.eval()
        total, correct, n = 0.0, 0, 0
        for x, y in loader:
            x, y = self.inputs(x, y)
            with self._autocast():
                logits = self.model(x).float()
            total += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
        total, correct, n = self.dist.sum(total, correct, n)
        return total / n, correct / n

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def _check_resumable(saved: dict, cfg: TrainConfig) -> None:
    current = dataclasses.asdict(cfg)
    diff = [f"{k}={saved[k]!r} (now {current[k]!r})" for k in current
            if k not in RESUME_MAY_DIFFER and saved.get(k) != current[k]]
    if diff:
        raise ValueError("the checkpoint was trained with other options; resume with the same ones: " + ", ".join(diff))


def _save(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a run killed while saving leaves the previous checkpoint intact


def default_out(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.model}{'-plain' if cfg.plain else ''}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: TrainConfig, out: Path | None = None, resume: Path | None = None,
          data: datasets.Data | None = None, quiet: bool = False) -> list[dict]:
    """Train ``cfg.epochs`` epochs; return the history (one dict per epoch). With ``out``, write checkpoint.pt,
    history.json and curves.png there after every epoch. ``resume`` continues from a checkpoint.pt written with
    the same options. ``data`` overrides ``cfg.data`` with already loaded datasets."""
    tqdm = datasets.optional_import("tqdm").tqdm
    dist = Distributed.from_env() if cfg.ddp else Distributed()
    quiet = quiet or not dist.main  # under --ddp rank 0 logs and writes
    out = out if dist.main else None
    data = (data or datasets.load(cfg.data, cfg.image_size)).subset(cfg.subset)
    loader_gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.ddp:  # each process a disjoint share of every epoch (--batch-size is per process), reshuffled per epoch
        sampler = DistributedSampler(data.train, dist.world_size, dist.rank, shuffle=True, seed=cfg.seed)
        train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler,
                                  num_workers=cfg.num_workers)
        test_loader = DataLoader(data.test, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                 sampler=DistributedSampler(data.test, dist.world_size, dist.rank, shuffle=False))
    else:
        sampler = None
        train_loader = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, generator=loader_gen,
                                  num_workers=cfg.num_workers)
        test_loader = DataLoader(data.test, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    trainer = Trainer(cfg, data, len(train_loader), cfg.epochs * len(train_loader), dist)
    history: list[dict] = []
    if resume is not None:
        if not Path(resume).is_file():
            raise FileNotFoundError(f"no checkpoint at {resume}")
        state = torch.load(resume, map_location="cpu")  # the RNG states stay on the CPU
        _check_resumable(state["config"], cfg)
        trainer.load_state_dict(state)
        history = state["history"]
        torch.set_rng_state(state["rng_torch"])
        loader_gen.set_state(state["rng_loader"])
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"blocks run on {trainer.device}: {backends.what_runs(cfg.backend, trainer.device.type)}", flush=True)
    for epoch in range(len(history) + 1, cfg.epochs + 1):
        start = time.perf_counter()
        loss_sum, correct, n = 0.0, 0, 0
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = tqdm(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, dynamic_ncols=True,
                       disable=quiet or not sys.stderr.isatty())
        for x, y in batches:
            batch_loss, batch_correct = trainer.step(x, y)
            loss_sum, correct, n = loss_sum + batch_loss, correct + batch_correct, n + len(y)
            batches.set_postfix(loss=f"{loss_sum / n:.4f}", acc=f"{correct / n:.1%}", refresh=False)
        loss_sum, correct, n = dist.sum(loss_sum, correct, n)
        test_loss, test_acc = trainer.evaluate(test_loader)
        history.append({"epoch": epoch, "train_loss": loss_sum / n, "train_acc": correct / n, "test_loss": test_loss,
                        "test_acc": test_acc, "seconds": time.perf_counter() - start})
        if not quiet:
            h = history[-1]
            print(f"epoch {epoch}/{cfg.epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}  "
                  f"test loss {h['test_loss']:.4f} acc {h['test_acc']:.2%}  {h['seconds']:.1f} s", flush=True)
        if out is not None:
            _save(trainer.state_dict() | {"config": dataclasses.asdict(cfg), "history": history,
                                          "rng_torch": torch.get_rng_state(), "rng_loader": loader_gen.get_state()},
                  out / "checkpoint.pt")
            write_json(out / "history.json", {"config": dataclasses.asdict(cfg), "epochs": history})
            plot_curves(history, out / "curves.png", f"{cfg.model}{' plain' if cfg.plain else ''} on {data.name}")
    return history


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def figure(ncols: int, title: str):
    """A matplotlib Figure on the non-interactive Agg canvas (pyplot and its global state are not used)."""
    mpl_figure = datasets.optional_import("matplotlib.figure")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.ticker import MaxNLocator

    fig = mpl_figure.Figure(figsize=(5.5 * ncols, 4), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, layer indices
    return fig, axes


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Loss and error (%) per epoch, train and test."""
    fig, (ax_loss, ax_err) = figure(2, title)
    epochs = [h["epoch"] for h in history]
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(epochs, [h[f"{split}_loss"] for h in history], style, marker=".", label=split)
        ax_err.plot(epochs, [100 * (1 - h[f"{split}_acc"]) for h in history], style, marker=".", label=split)
    for ax, label in ((ax_loss, "loss"), (ax_err, "error (%)")):
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------- the command
def config_from_args(args: argparse.Namespace) -> TrainConfig:
    fields = dataclasses.fields(TrainConfig)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields if hasattr(args, f.name)})


def check_backend(args: argparse.Namespace, command: str) -> None:
    """An unknown or unavailable --backend is one line and exit status 2, before anything runs."""
    try:
        backends.check_requested(args.backend)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"fused-resnet {command}: {e}") from None


def _init_distributed(cfg: TrainConfig, dist: Distributed) -> None:
    """torch.distributed for --ddp: NCCL with CUDA, gloo on the CPU (DistributedDataParallel takes SyncBatchNorm
    only in GPU modules, so --sync-bn needs CUDA)."""
    cuda = device_name(cfg).startswith("cuda")
    if cfg.sync_bn and not cuda:
        raise ValueError("--sync-bn needs CUDA: torch's DistributedDataParallel takes SyncBatchNorm only in GPU "
                         "modules")
    if cuda:
        torch.cuda.set_device(dist.local_rank)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")


def run(args: argparse.Namespace) -> int:
    check_backend(args, "train")
    try:
        cfg = config_from_args(args)
        dist = Distributed.from_env() if cfg.ddp else Distributed()
        if cfg.ddp:
            _init_distributed(cfg, dist)
        out = args.out or (args.resume.parent if args.resume else default_out(cfg))
        if dist.main:
            world = f", {dist.world_size} processes" if cfg.ddp else ""
            print(f"training {cfg.model}{' (plain)' if cfg.plain else ''} on {cfg.data}, {cfg.epochs} epochs, "
                  f"lr {cfg.lr}{world} -> {out}")
        history = train(cfg, out=out, resume=args.resume, quiet=args.quiet)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"fused-resnet train: {e}") from e
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    last = history[-1]
    if dist.main:
        print(f"final: train loss {last['train_loss']:.4f}, train error {1 - last['train_acc']:.2%}, "
              f"test error {1 - last['test_acc']:.2%}; wrote {out}/checkpoint.pt, history.json, curves.png")
    return 0


def add_training_options(p: argparse.ArgumentParser, epochs: int | None) -> None:
    """Options shared by ``train`` and the experiments (``epochs``: the default, None for no --epochs option)."""
    p.add_argument("--data", default="mnist1d", help=f"one of {', '.join(datasets.DATA_SPECS)} (default mnist1d; see "
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
    p.add_argument("--backend", default="auto", choices=backends.choices())
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--subset", type=int, default=None, help="use only the first N examples of each split")
    p.add_argument("--image-size", type=int, default=224, help="crop size for imagefolder data")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/<name>-<timestamp>)")
    p.add_argument("--residual-scale", default=None,
                   help="y = relu(α·bn(...) + shortcut) in every block: a number, or 'learnable' (α = 0 at init)")


def add_command(sub) -> None:
    train_cmd = sub.add_parser(
        "train", help="train a fused ResNet (progress, per-epoch metrics, checkpoint/resume, JSON + PNG curves)",
        description="Trains with fused blocks (backend auto on a CPU runs torch's own modules; it says what ran): "
        "SGD with momentum 0.9 and weight "
        "decay, linear warm-up, then cosine schedule. Writes checkpoint.pt, history.json and curves.png to --out "
        "after every epoch; --resume continues a run exactly.",
    )
    train_cmd.add_argument("--model", default="cifar_resnet20",
                           help="cifar_resnet<depth> (6n+2: 20, 32, 44, 56, 110, ...) or resnet18/34/50/101/152")
    add_training_options(train_cmd, epochs=10)
    train_cmd.add_argument("--plain", action="store_true", help="CIFAR models without shortcuts (the plain twin)")
    train_cmd.add_argument("--resume", type=Path, default=None,
                           help="continue from this checkpoint.pt (same options; output goes to its folder by default)")
    train_cmd.add_argument("--channels-last", action="store_true",
                           help="2-D models: channels_last weights and inputs")
    train_cmd.add_argument("--amp", default=None, choices=("bfloat16", "float16"), help="train under torch.autocast")
    train_cmd.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    train_cmd.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")
    train_cmd.add_argument("--ddp", action="store_true",
                           help="DistributedDataParallel under torchrun (NCCL on GPUs, gloo on CPUs; --batch-size per "
                           "process; rank 0 logs and writes checkpoints)")
    train_cmd.add_argument("--sync-bn", action="store_true",
                           help="with --ddp: BatchNorm statistics over all processes (SyncBatchNorm, fused; CUDA)")
    train_cmd.set_defaults(func=run)
