"""Where a low-precision gradient is far from float64: ReLU / max-pool branch flips, or arithmetic?

Runs what ``fused-resnet verify`` runs (the same model, BN randomisation, input and seeds; testing.compare_models),
keeps every run's gradients, and adds a float64 run with its own branch decisions. For each parameter gradient
(and the input gradient) of PyTorch in --dtype and of the fused model, it reports

    total   ‖g − g64‖ / ‖g64‖                  against float64 with float64's own decisions
    arith   ‖g − g64_replay‖ / ‖g64_replay‖     against float64 replaying this run's decisions (what verify checks)
    flips   ‖g64_replay − g64‖ / ‖g64‖          what this run's branch decisions alone move in float64

so that "total ≫ arith, flips ≈ total" says the distance is the branch flips, and "arith ≈ total" says it is
arithmetic; and the fused/PyTorch ratio of arith over every parameter (the rule: ≤ 2, + floor).

    python bench/oracle_flips.py --model resnet50 --batch 2 --size 128 --dtype float32 --backend reference \
        --random-bn --json flips.json

CPU only; backend cuda needs FUSED_RESNET_EXT_ON_CPU=1, triton TRITON_INTERPRET=1 (both set before the start).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torchvision

import fused_resnet
from fused_resnet import testing

PASSES = 2  # verify's default --steps

def _reference(args):
    """The model and input ``fused-resnet verify`` builds for an ImageNet ResNet (fused_resnet/tools/verify.py)."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    model = getattr(torchvision.models, args.model)(num_classes=10)
    return (testing.randomize_batchnorm(model, gen, args.random_bn),
            torch.randn(args.batch, 3, args.size, args.size, generator=gen))


def _own_float64(reference, x, passes: int):
    """Input and parameter gradients of float64 with its own decisions, in the last of ``passes`` train passes with
    compare_models' output gradients (one draw per pass; weights fixed, so only the last pass's draw matters)."""
    model = copy.deepcopy(reference).double().train()
    gen = torch.Generator().manual_seed(1234)
    for _ in range(passes):
        model.zero_grad(set_to_none=True)
        xin = x.double().requires_grad_(True)
        out = model(xin)
        out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64))
    return xin.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-bn", action="store_true", help="as verify's: every BN's γ in [0.5, 1.5]")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    reference, x = _reference(args)
    record: dict = {}
    checks = testing.compare_models(reference, lambda m: fused_resnet.convert(m, backend=args.backend, inplace=True),
                                    x, dtype, torch.device("cpu"), train_steps=PASSES, record=record)
    own_x, own = _own_float64(reference, x, PASSES)
    rel = testing.rel_error
    rows = []
    for name in list(record["grads"]["same"]) + ["input"]:
        g = record["xgrads"] if name == "input" else {k: record["grads"][k][name] for k in record["grads"]}
        g64 = own_x if name == "input" else own[name]
        row = {"name": name}
        for run, replay in (("same", "ref_same"), ("fused", "ref_fused")):
            row[run] = {"total": rel(g[run], g64), "arith": rel(g[run], g[replay]), "flips": rel(g[replay], g64)}
        rows.append(row)
    ratios = sorted((r["fused"]["arith"] / r["same"]["arith"], r["name"]) for r in rows if r["same"]["arith"] > 0)
    summary = {
        "model": args.model, "backend": args.backend, "dtype": args.dtype, "batch": args.batch, "size": args.size,
        "seed": args.seed, "random_bn": args.random_bn, "torch": torch.__version__,
        "flips": record["flips"], "checks": [c.__dict__ | {"ok": c.ok} for c in checks],
        "ratio_arith": {"median": statistics.median(r for r, _ in ratios),
                        "p90": ratios[int(0.9 * (len(ratios) - 1))][0], "max": ratios[-1][0],
                        "max_at": ratios[-1][1]},
        "seconds": time.perf_counter() - start,
    }
    for run in ("same", "fused"):
        worst = max(rows, key=lambda r: r[run]["total"])
        summary[f"worst_total_{run}"] = {"name": worst["name"], **worst[run]}
        summary[f"max_arith_{run}"] = max(r[run]["arith"] for r in rows)
    print(f"{args.model}, backend {args.backend}, {args.dtype}, batch {args.batch}, {args.size} px, "
          f"random_bn={args.random_bn}, torch {torch.__version__} ({summary['seconds']:.0f} s)")
    print(f"branch flips vs float64 over both passes: PyTorch {record['flips']['same']}, "
          f"fused {record['flips']['fused']}")
    r = summary["ratio_arith"]
    print(f"fused/PyTorch arithmetic error over {len(ratios)} gradients: median {r['median']:.2f}, "
          f"p90 {r['p90']:.2f}, max {r['max']:.2f} ({r['max_at']})")
    for run, label in (("same", "PyTorch"), ("fused", "fused")):
        w = summary[f"worst_total_{run}"]
        print(f"{label}: farthest gradient from float64 {w['name']}: total {w['total']:.2e}, arithmetic "
              f"{w['arith']:.2e}, its flips alone {w['flips']:.2e}; largest arithmetic error "
              f"{summary[f'max_arith_{run}']:.2e}")
    testing.print_table("verify's checks", checks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "gradients": rows}, f, indent=1)


if __name__ == "__main__":
    main()
