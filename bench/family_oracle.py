"""The float64 oracle on every model of README's coverage table (fused_resnet.testing.coverage.MODELS), full depth.

tests/test_model_families.py runs one shallow representative per family in CI; this runs the table's own models
— resnext101_64x4d, wide_resnet50_2, the Faster R-CNN and DeepLabV3 backbones, timm's seresnet50 and the rest —
each converted for a backend and compared by testing.compare_models (BN randomised, batch 2, channels_last, one
training pass — output, input and parameter gradients, running statistics — then eval; ``--steps 2`` adds an SGD
step and a second pass; the global RNG seeded before each training forward so timm's DropPath draws the same
samples in every run). A backbone's feature dict is flattened and concatenated into one output. One pass is the
default because after an SGD step these 1000-class models are in the chaotic regime docs/NUMERICS.md describes:
there PyTorch's own error is one draw of a wide distribution, and the 2x rule compares two such draws
(docs/NUMERICS.md, "After an SGD step"). Every block convert can fuse must fuse (a warning is an error here, except for the units the coverage
table lists as unfused: the stems); compare_models checks that every fused module called its fused op.

CPU only: backend cuda runs the extension's CPU registrations (FUSED_RESNET_EXT_ON_CPU=1, set here), triton its
interpreter (TRITON_INTERPRET=1: set before the start; slow, so only with --models). Writes one JSON row per
(model, backend): worst ratio (fused error / bound) and every check that failed.

    python bench/family_oracle.py --backends reference,cuda --size 64 --json bench/results/family_oracle_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

os.environ.setdefault("FUSED_RESNET_EXT_ON_CPU", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import fused_resnet  # noqa: E402
from fused_resnet import backends, testing  # noqa: E402
from fused_resnet.testing import coverage  # noqa: E402


class Flattened(nn.Module):
    """A backbone whose output is a dict of feature maps, as one (N, features) tensor the oracle can compare."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.backbone(x)
        if isinstance(out, dict):
            return torch.cat([v.flatten(1) for v in out.values()], 1)
        return out


def run(name: str, backend: str, size: int, steps: int, input_seed: int) -> dict:
    library, make = coverage.MODELS[name]
    torch.manual_seed(0)
    model = Flattened(make())
    testing.randomize_batchnorm(model, torch.Generator().manual_seed(0))
    seed = 5 if "drop_path" in name else None

    def fuse(m: nn.Module) -> nn.Module:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = fused_resnet.convert(m, backend=backend, inplace=True)
        left = [str(w.message) for w in caught if "left" in str(w.message) and "unfused" in str(w.message)]
        if left:
            raise RuntimeError(f"{name}: convert left blocks unfused on {backend}: {left}")
        return fused

    start = time.perf_counter()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(input_seed))
    checks = testing.compare_models(model, fuse, x, torch.float32, torch.device("cpu"), channels_last=True,
                                    train_steps=steps, lr=0.01, seed=seed)
    fused, units, _ = coverage.coverage_detail(name, backend)
    failed = [c.row() for c in checks if not c.ok]
    worst = max((c.err_fused / c.bound for c in checks if c.bound > 0), default=0.0)
    return {"model": name, "library": library, "backend": backend, "size": size, "batch": 2, "steps": steps,
            "input_seed": input_seed,
            "units_fused": fused, "units": units, "passed": not failed, "worst_ratio": round(worst, 3),
            "failed": failed, "seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="reference,cuda")
    ap.add_argument("--models", default=None, help="comma-separated rows of the coverage table (default: all)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1, help="training passes (an SGD step, lr 0.01, between them)")
    ap.add_argument("--input-seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = list(coverage.MODELS) if args.models is None else [m.strip() for m in args.models.split(",")]
    rows = []
    for backend in args.backends.split(","):
        reason = backends.backend_status()[backend]
        if reason is not None:
            print(f"{backend}: not available here ({reason})")
            continue
        for name in names:
            if not coverage.library_available(coverage.MODELS[name][0]):
                continue
            row = run(name, backend, args.size, args.steps, args.input_seed)
            rows.append(row)
            print(f"{'pass' if row['passed'] else 'FAIL'}  {backend:<10} {name:<40} units {row['units_fused']}/"
                  f"{row['units']}  worst err/bound {row['worst_ratio']:.2f}  {row['seconds']} s", flush=True)
            for f in row["failed"]:
                print(f"      {f}")
    if args.json:
        env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor()
               or platform.machine(), "threads": torch.get_num_threads(), "device": "cpu"}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0 if rows and all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
