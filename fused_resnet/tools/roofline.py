"""A roofline MODEL of a step's time from its account — a prediction, not a measurement.

Per launch: time = max(bytes / (B·η_mem), FLOPs / (P·η_flop)) + t_launch, summed over the step (kernels run one
after another on one stream). B and P are the spec sheets' figures: HBM bandwidth 3.35 TB/s (H100 SXM) or 4.8 TB/s
(H200), dense bf16 tensor-core peak 989 TFLOP/s on both.

Calibrated once, on one measurement (DESIGN.md §7, H100 80GB HBM3, 2026-11-23): eager ResNet-50, batch 256,
bf16, channels_last, training step with SGD, 3,951 img/s.

* η_flop = 377 / 989 = 0.381: cuDNN's measured 3x3 fprop on 256×64×56×56 (the same run), applied to every
  tensor-core kernel (convs of every shape and direction, matmuls).
* η_mem = 3,000 / 3,350 = 0.896: the device-to-device copy ceiling measured on that H100
  (bench/results/h100_2026-11-23/README.md: 3,000 GB/s read + write). The same η on the H200 gives 4.3 TB/s,
  the copy measured there (DESIGN.md §6).
* t_launch is then fitted so that the model gives exactly 3,951 img/s for that eager step. It is not a launch
  latency: it absorbs everything that keeps eager's kernels from the copy ceiling (ATen's BN and elementwise
  kernels reached 25–42 % of it in bench_bn_act), spread per launch.

One measurement fixes one unknown. Checked against the other eager measurements of that run (not fitted to them):
ResNet-50 inference 11,323 predicted against 12,639 measured (−10 %), ResNet-18 training 12,402 against 11,881
(+4 %). Fitting η_mem instead with t_launch = 0 (η_mem = 0.63) gives −8 % and +22 %; fitting both to ResNet-50's
training and inference needs a negative t_launch. docs/PERFORMANCE.md has the details.
"""
from __future__ import annotations

import functools
from typing import Dict, NamedTuple, Sequence

from ..launches import Launch
from .accounting import Account, Config, account


class GPU(NamedTuple):
    name: str
    bandwidth: float  # bytes/s, spec
    peak_flops: float  # dense bf16 tensor-core FLOP/s, spec


GPUS: Dict[str, GPU] = {
    "h100": GPU("H100 SXM (3.35 TB/s, 989 TFLOP/s bf16)", 3.35e12, 989e12),
    "h200": GPU("H200 (4.8 TB/s, 989 TFLOP/s bf16)", 4.8e12, 989e12),
}

ETA_FLOP = 377 / 989
ETA_MEM = 3000 / 3350
CALIBRATION = Config(model="resnet50", batch=256, dtype="bfloat16", channels_last=True, mode="train")
CALIBRATION_GPU = "h100"
CALIBRATION_IMG_PER_S = 3951.0


class Calibration(NamedTuple):
    eta_mem: float
    eta_flop: float
    launch_s: float  # seconds per launch


def _roof_s(launch: Launch, gpu: GPU, eta_mem: float, eta_flop: float) -> float:
    return max((launch.reads + launch.writes) / (gpu.bandwidth * eta_mem),
               launch.flops / (gpu.peak_flops * eta_flop))


def fit(eager: Account, img_per_s: float, gpu: GPU, eta_mem: float = ETA_MEM,
        eta_flop: float = ETA_FLOP) -> Calibration:
    """The per-launch time that makes ``eager``'s predicted throughput ``img_per_s`` on ``gpu``."""
    step_s = eager.config.batch / img_per_s
    roof = sum(_roof_s(launch, gpu, eta_mem, eta_flop) for launch in eager.launches)
    launch_s = (step_s - roof) / len(eager.launches)
    if launch_s < 0:
        raise ValueError(f"the roofline alone ({roof * 1e3:.1f} ms) exceeds the measured step ({step_s * 1e3:.1f} ms): "
                         f"no non-negative launch time fits")
    return Calibration(eta_mem, eta_flop, launch_s)


@functools.lru_cache(maxsize=None)
def calibration() -> Calibration:
    """The calibration of the module docstring (accounts the calibration step once per process)."""
    return fit(account(CALIBRATION, "eager"), CALIBRATION_IMG_PER_S, GPUS[CALIBRATION_GPU])


def kernel_s(launch: Launch, gpu: GPU, cal: Calibration) -> float:
    """Predicted seconds of one launch."""
    return _roof_s(launch, gpu, cal.eta_mem, cal.eta_flop) + cal.launch_s


def predict(acc: Account, gpu: GPU, cal: Calibration) -> Dict[str, float]:
    """Predicted step time and throughput, split into memory-bound, compute-bound and per-launch seconds."""
    memory = compute = 0.0
    for launch in acc.launches:
        t_mem = (launch.reads + launch.writes) / (gpu.bandwidth * cal.eta_mem)
        t_flop = launch.flops / (gpu.peak_flops * cal.eta_flop)
        if t_mem >= t_flop:
            memory += t_mem
        else:
            compute += t_flop
    overhead = len(acc.launches) * cal.launch_s
    step = memory + compute + overhead
    return {"step_s": step, "img_per_s": acc.config.batch / step, "memory_bound_s": memory,
            "compute_bound_s": compute, "launch_s": overhead}


def chart(accounts: Sequence[Account], path: str, title: str = "") -> None:
    """One stacked bar per account (provider): bytes per image by unit kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .accounting import UNIT_KINDS

    kinds = [k for k in UNIT_KINDS if any(k in a.units for a in accounts)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(accounts) + 3.5), 4.5))
    labels = [f"{a.provider}\n{a.config.model} {a.config.mode}" for a in accounts]
    bottom = [0.0] * len(accounts)
    for kind in kinds:
        values = [a.by_unit().get(kind, {}).get("bytes_per_image", 0.0) / 1e6 for a in accounts]
        ax.bar(range(len(accounts)), values, 0.6, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(accounts)))
    ax.set_xticklabels(labels)
    ax.set_ylabel("compulsory DRAM traffic, MB per image")
    ax.set_title(title or "bytes per image by unit kind (the account, not a measurement)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
