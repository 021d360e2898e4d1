"""Benchmarks: timing helpers for the scripts in bench/, and the model-level runs of ``fused-resnet bench``
(never used by tests to judge speed).

Timing: ``triton.testing.do_bench`` on a GPU (CUDA events, warm-up excluded, L2 flushed between calls, median);
on a CPU the median of ``time.perf_counter`` over repeated calls after warm-up. Every result row carries the
machine and versions it was measured with, in the results schema other tools read::

    {"model", "mode": "train"|"infer", "provider": "eager"|"compile"|"<backend>", "dtype", "batch",
     "img_per_s", "peak_mem_gib", "first_step_s", "gpu", "torch", "triton", "cudnn", "date"}
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .. import backends, blocks, models, testing
from ..convert import convert
from ..warmup import warm_up


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


def shape_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments of a benchmark over one model's layer shapes: --model, --batch, --dtype, --size, --limit
    (the first N shapes: smoke runs), --out (the results JSON)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--size", type=int, default=224, help="input image size")
    parser.add_argument("--limit", type=int, default=None, help="only the first N shapes (smoke runs)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    return parser


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


def copy_ceiling_gbps(device: torch.device, numel: int, warmup_ms: float = 100, rep_ms: float = 500) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second, GB/s) of a ``numel``-element bf16 buffer:
    the ceiling memory-bound kernels are measured against, in the same run."""
    src = torch.randn(numel, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup_ms, rep_ms)
    return 2 * numel * src.element_size() / (ms * 1e-3) / 1e9


def measure(fn: Callable[[], object], device: torch.device, batch: int, warmup_ms: float = 100,
            rep_ms: float = 500, steps: Optional[int] = None) -> Dict[str, float]:
    """img/s at the median step time, peak memory of a step (GiB, GPU only), the first call's time
    (compilation / autotuning included) and the host time of a step (until the call returns, the device idle
    before it: what Python and the launches cost; below step_ms the device is the bottleneck). ``steps``: time
    about that many steps (after a fifth as many warm-up steps) instead of ``warmup_ms`` / ``rep_ms``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - start
    if steps is not None:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        once_ms = 1e3 * (time.perf_counter() - start)
        warmup_ms, rep_ms = once_ms * max(1, steps // 5), once_ms * steps
    ms = median_ms(fn, device, warmup_ms, rep_ms)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    host = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(1e3 * (time.perf_counter() - start))
    return {"img_per_s": batch / (ms * 1e-3), "step_ms": ms, "peak_mem_gib": peak, "first_step_s": first,
            "host_ms": statistics.median(host)}


# --------------------------------------------------------------------------------------------- model level
MODES = ("train", "infer")


def build_model(name: str, num_classes: int = 1000) -> Tuple[nn.Module, Tuple[int, ...]]:
    """(torch model with torchvision's / the paper's architecture, per-image input shape) for a model name:
    resnet18..152 (3x224x224) or cifar_resnet<depth> (3x32x32)."""
    if name in models.IMAGENET_NAMES:
        return getattr(torchvision.models, name)(num_classes=num_classes), (3, 224, 224)
    depth = models.cifar_depth(name)
    if depth is not None:
        return models.cifar_resnet(depth, num_classes=num_classes, backend=None), (3, 32, 32)
    raise ValueError(f"unknown model {name!r}; expected resnet18/34/50/101/152 or cifar_resnet<6n+2>")


def provider_model(base: nn.Module, provider: str) -> nn.Module:
    """eager: a copy of ``base``; compile: torch.compile of a copy; a backend name (or ``cuda-unfused``): the
    converted copy."""
    model = copy.deepcopy(base)
    if provider == "eager":
        return model
    if provider == "compile":
        return torch.compile(model)
    backends.check_requested(provider)
    return convert(model, backend=provider, inplace=True)


def step_fn(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor,
            amp: Optional[torch.dtype] = None) -> Callable[[], object]:
    """One training step (forward, cross-entropy, backward, SGD update) or one eval forward under no_grad; with
    ``amp`` the forward runs under torch.autocast(amp)."""
    def autocast():
        return torch.autocast(x.device.type, dtype=amp, enabled=amp is not None)

    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast():
                return model(x)

        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return train_step


def _progress(items: list, enabled: bool):
    """tqdm's bar over ``items`` when tqdm is installed (the train extra), else a line per item."""
    try:
        from tqdm import tqdm
    except ImportError:
        class _Lines(list):
            def set_description(self, text: str) -> None:
                if enabled:
                    print(f"[{text}]", flush=True)

        return _Lines(items)
    return tqdm(items, disable=not enabled, unit="run")


def model_inputs(name: str, batch: int, device: torch.device, dtype: torch.dtype, fmt: torch.memory_format,
                 size: Optional[int] = None) -> Tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model in dtype and layout on device, seeded input batch, labels) for ``name``."""
    base, shape = build_model(name)
    if size is not None:
        shape = (shape[0], size, size)
    base = base.to(device, dtype).to(memory_format=fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=gen).to(device, dtype).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000 if name.startswith("resnet") else 10, (batch,), generator=gen).to(device)
    return base, x, y


def run_models(model_names: Sequence[str], modes: Sequence[str], providers: Sequence[str], dtype: str, batch: int,
               device: torch.device, *, channels_last: bool = True, size: Optional[int] = None,
               warmup_ms: float = 100, rep_ms: float = 500, steps: Optional[int] = None,
               progress: bool = True, amp: bool = False, rows_path: Optional[str] = None) -> List[dict]:
    """Every (model, mode, provider) measured in this one run: img/s at the median step, peak memory, first-step
    time, host time per step; rows in the results schema (plus step_ms, host_ms, layout, amp and the Triton
    autotune mode). ``amp``: float32 models under torch.autocast(dtype) instead of models in dtype.
    ``rows_path``: also append each row to this JSON-lines file as soon as it is measured (a run cut short keeps
    the rows it finished)."""
    from ..kernels import autotune_mode

    dt = testing.DTYPES[dtype]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    env = environment()
    jobs = [(m, mode, p) for m in model_names for mode in modes for p in providers]
    runs = []
    bar = _progress(jobs, progress)
    for name, mode, provider in bar:
        bar.set_description(f"{name} {mode} {provider}")
        base, x, y = model_inputs(name, batch, device, torch.float32 if amp else dt, fmt, size)
        fusion = provider == "cuda" and device.type == "cuda"
        if fusion:
            from ..backends.cuda import fusion as cudnn_fusion

            cudnn_fusion.reset()
        model = provider_model(base, provider)
        plans_s = 0.0
        if provider not in ("eager", "compile"):
            # per-shape plans (backend cuda's cuDNN graphs) built before the clock starts, in parallel, timed apart
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dt, enabled=amp):
                warm_up(model.train(mode == "train"), x)
            plans_s = time.perf_counter() - start
        fn = step_fn(model, mode, x, y, dt if amp else None)
        r = measure(fn, device, batch, warmup_ms, rep_ms, steps)
        runs.append({"model": name, "mode": mode, "provider": provider, "dtype": dtype, "batch": batch,
                     "img_per_s": r["img_per_s"], "peak_mem_gib": r["peak_mem_gib"],
                     "first_step_s": r["first_step_s"], **env, "step_ms": r["step_ms"], "host_ms": r["host_ms"],
                     "layout": "channels_last" if channels_last else "NCHW", "amp": amp, "plans_s": plans_s,
                     "autotune": autotune_mode()})
        if fusion:  # which graphs ran fused in this run, which fell back (and cuDNN's reasons), build times
            runs[-1]["cudnn_fusion"] = cudnn_fusion.status()
        if rows_path:
            with open(rows_path, "a") as f:
                f.write(json.dumps(runs[-1]) + "\n")
        del fn, base, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs


def table(runs: Sequence[dict]) -> str:
    """A Markdown table of the runs, with each provider's speedup over eager and torch.compile of the same
    model and mode (where those were measured)."""
    def base(r, provider):
        for o in runs:
            if (o["model"], o["mode"], o["provider"]) == (r["model"], r["mode"], provider):
                return o["img_per_s"]
        return None

    lines = ["| model | mode | provider | dtype | batch | img/s | vs eager | vs compile | peak GiB | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        rel = [f"{r['img_per_s'] / b:.2f}x" if b else "–" for b in (base(r, "eager"), base(r, "compile"))]
        peak = "–" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f}"
        lines.append(f"| {r['model']} | {r['mode']} | {r['provider']} | {r['dtype']} | {r['batch']} | "
                     f"{r['img_per_s']:,.0f} | {rel[0]} | {rel[1]} | {peak} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


def plot_throughput(runs: Sequence[dict], path: str) -> None:
    """Grouped bars: img/s per provider, one group per (model, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["model"], r["mode"]) for r in runs))
    providers = list(dict.fromkeys(r["provider"] for r in runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * len(providers) / 2), 4))
    width = 0.8 / len(providers)
    for j, p in enumerate(providers):
        vals = [next((r["img_per_s"] for r in runs if (r["model"], r["mode"], r["provider"]) == (*g, p)), 0)
                for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{m}\n{mode}" for m, mode in groups])
    ax.set_ylabel("images / s")
    r0 = runs[0]
    ax.set_title(f"{r0['gpu']}, {r0['dtype']}, batch {r0['batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(runs: Sequence[dict], out_dir: str) -> List[str]:
    """results.json ({"runs": [...]}), results.md and throughput.png in ``out_dir``; returns the paths written
    (no PNG, with a message, when matplotlib is not installed)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("results.json", "results.md")]
    with open(paths[0], "w") as f:
        json.dump({"runs": list(runs)}, f, indent=1)
    with open(paths[1], "w") as f:
        f.write(table(runs) + "\n")
    if can_plot():
        paths.append(os.path.join(out_dir, "throughput.png"))
        plot_throughput(runs, paths[-1])
    return paths


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('matplotlib is not installed: no PNG plots (pip install "fused_resnet[train]" or matplotlib)')
        return False
    return True


_BLOCK_TYPES = (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck, blocks._BlockLayout)


def _blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The residual blocks of a model: torchvision's, and fused_resnet's fused and eager ones."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BLOCK_TYPES)]


def _block_inputs(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    inputs: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].detach().clone()))
             for n, m in _blocks(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return inputs


def layer_times(base: nn.Module, providers: Sequence[str], mode: str, x: torch.Tensor, device: torch.device,
                warmup_ms: float = 25, rep_ms: float = 100) -> Dict[str, Dict[str, float]]:
    """Median ms of each residual block alone (forward, or forward + backward in ``train`` mode) per provider
    ('eager', 'compile' — torch.compile of each torchvision block — or a backend name), on the input that block
    sees in the model: {block name: {provider: ms}}."""
    inputs = _block_inputs(copy.deepcopy(base), x)
    times: Dict[str, Dict[str, float]] = {n: {} for n in inputs}
    for provider in providers:
        model = provider_model(base, "eager" if provider == "compile" else provider)
        for name, block in _blocks(model):
            if provider == "compile":  # a fresh compile per block: reused, dynamo's recompile limit would
                torch._dynamo.reset()  # silently fall back to eager after a few block shapes
                block = torch.compile(block)
            xin = inputs[name]
            if mode == "infer":
                block.eval()

                def fn(block=block, xin=xin):
                    with torch.no_grad():
                        return block(xin)
            else:
                block.train()
                xin = xin.clone().requires_grad_(True)

                def fn(block=block, xin=xin):
                    out = block(xin)
                    out.backward(torch.ones_like(out))
            times[name][provider] = median_ms(fn, device, warmup_ms, rep_ms)
    return times


def plot_layer_speedup(times: Dict[str, Dict[str, float]], title: str, path: str) -> None:
    """Bars per block: eager time / provider time for every non-eager provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(times)
    providers = [p for p in next(iter(times.values())) if p != "eager"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) * max(1, len(providers))), 4))
    width = 0.8 / max(1, len(providers))
    for j, p in enumerate(providers):
        ax.bar([i + j * width for i in range(len(names))], [times[n]["eager"] / times[n][p] for n in names], width,
               label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("speedup vs eager")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile(base: nn.Module, provider: str, mode: str, x: torch.Tensor, y: torch.Tensor, device: torch.device,
            top: int = 15, steps: int = 3) -> str:
    """Where the time goes for one provider: torch.profiler over ``steps`` steps after a warm-up step, with a
    a range per residual block, so the blocks and the ops / kernels that dominate can be read off one report."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    model = provider_model(base, provider)
    fn = step_fn(model, mode, x, y)
    fn()
    layers = [(f"layer:{n}", m) for n, m in _blocks(model)]
    stack: List = []
    hooks = []
    for label, m in layers:
        hooks.append(m.register_forward_pre_hook(lambda mod, args, label=label: stack.append(
            record_function(label).__enter__())))
        hooks.append(m.register_forward_hook(lambda mod, args, out: stack.pop().__exit__(None, None, None)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    layer_rows = sorted((e for e in events if e.key.startswith("layer:")),
                        key=lambda e: -(e.device_time_total if device.type == "cuda" else e.cpu_time_total))
    total_key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    lines = [f"## {provider}, {mode}: layers by total {'GPU' if device.type == 'cuda' else 'CPU'} time "
             f"({steps} steps; backward kernels are not attributed to layers)"]
    lines += [f"{e.key[6:]:<24} {getattr(e, total_key) / 1e3 / steps:9.3f} ms/step" for e in layer_rows[:top]]
    lines.append(f"\n## {provider}, {mode}: ops and kernels by self time")
    lines.append(events.table(sort_by=key, row_limit=top))
    return "\n".join(lines)
