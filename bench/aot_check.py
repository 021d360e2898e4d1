"""GPU readiness on the CPU: every Triton conv-kernel variant a converted model launches, compiled for a GPU
target with every tile configuration autotuning may pick, and what each compile gives (registers, spilled bytes,
shared memory, wgmma / mma, asynchronous loads).

Two child processes: one traces the kernel launches of a train step (forward and backward) and an eval forward
of the model converted to backend triton, under the Triton interpreter with the conv launches recorded instead of
run (shapes flow, values do not matter); one compiles the distinct variants without the interpreter
(fused_resnet.kernels.aot).

    python bench/aot_check.py --model resnet50 --dtype bfloat16 --arch sm_90 --json aot.json

JSON: {"arch", "triton", "model", "dtype", "kernels": [{"kernel", "features": {flag: value}, "config":
"BMxBNxBK/wW/sS", "divisible_by_16", "ok", "error", "regs", "spill_bytes", "smem_bytes", "mma",
"async_copy", "pipelined", "mma_overlap", "selectable", "heuristic"}], "targets": {...}}. Each variant is
compiled with the integer specialisation its traced launches get (arguments divisible by 16, pointers
aligned), as a launch compiles it. "pipelined": the MMAs sit in one software-pipelined loop fed by asynchronous copies
(fused_resnet.kernels.aot.pipelined, read from Triton's GPU IR). "selectable": autotuning may pick this
configuration for this variant (kernels.conv.spill_reason prunes the others); "mma_overlap": a wgmma stays in
flight while the next is issued (kernels.aot.mma_overlap); "heuristic": what
FUSED_RESNET_AUTOTUNE=heuristic picks for the variant's traced problem sizes.

The static targets (the "targets" object, and the exit status): every compile succeeds, no selectable
configuration spills, every selectable one is pipelined with asynchronous copies and uses wgmma (sm_90), every
variant keeps at least two selectable configurations, and every wgrad overlaps its MMAs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def trace(model_name: str, dtype: str, size: int) -> list:
    """The distinct conv-kernel variants (kernel name, features, dtype) that one train step and one eval forward
    of ``model_name`` converted to backend triton launch. Needs TRITON_INTERPRET=1 (the CPU runs the rest)."""
    import torch
    import torchvision

    import fused_resnet
    from fused_resnet import models
    from fused_resnet.kernels import conv

    found = {}

    def record(kernel, grid, kwargs, gemm_mnk, caps):
        constexprs = conv.constexpr_args(kernel)
        names = [n for n in constexprs if n not in conv._TILE_ARGS + ("UPCAST", "PRECISION")]
        features = {n: kwargs[n] for n in names}
        ints = {n: v for n, v in kwargs.items() if n not in constexprs and isinstance(v, int)}
        entry = found.setdefault((kernel.__name__, json.dumps(features, sort_keys=True)), (features, []))
        if (ints, list(gemm_mnk)) not in entry[1]:
            entry[1].append((ints, list(gemm_mnk)))

    conv._launch = record
    depth = models.cifar_depth(model_name)
    base = (models.cifar_resnet(depth, backend=None) if depth is not None
            else getattr(torchvision.models, model_name)(num_classes=10))
    model = fused_resnet.convert(base, backend="triton").to(getattr(torch, dtype))
    x = torch.randn(2, 3, size, size, dtype=getattr(torch, dtype))
    model.train()
    model(x).float().sum().backward()
    with torch.no_grad():
        model.eval()(x)
    return [{"kernel": name, "features": features, "problems": problems}
            for (name, _), (features, problems) in sorted(found.items())]


def compile_variants(variants: list, dtype: str, arch: int) -> list:
    """Every variant (features and the integer specialisation its launches get) × every tile configuration of its
    kernel, compiled for sm_<arch> (no interpreter)."""
    from fused_resnet.kernels import aot, conv

    kernels = {k.__name__: k for k in conv._TILES}
    rows = []
    for v in variants:
        kernel = kernels[v["kernel"]]
        tiles = conv._TILES[kernel]
        by_spec: dict = {}  # divisible-by-16 integer arguments → the GEMM sizes launched with them
        for ints, mnk in v["problems"]:
            by_spec.setdefault(tuple(aot.specialized(kernel, ints)), []).append(tuple(mnk))
        for divisible, problems in by_spec.items():
            heuristic = {conv.heuristic_tile(conv.selectable_tiles(kernel, v["features"]), mnk) for mnk in problems}
            for bm, bn, bk, warps, stages in tiles:
                constexprs = dict(v["features"], UPCAST=False, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_K=bk)
                row = aot.compile_variant(kernel, constexprs, dtype, warps, stages, arch, divisible)
                tile = (bm, bn, bk, warps, stages)
                rows.append({"kernel": v["kernel"], "features": v["features"], "divisible_by_16": list(divisible),
                             "config": f"{bm}x{bn}x{bk}/w{warps}/s{stages}", **row,
                             "selectable": conv.spill_reason(kernel, tile, v["features"]) is None,
                             "heuristic": tile in heuristic})
    return rows


def _child(args: list, interpret: bool) -> list:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"aot_check: {' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="resnet18..152 or cifar_resnet<6n+2>")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--arch", default="sm_90", help="sm_90 (Hopper) or sm_80 (Ampere)")
    parser.add_argument("--size", type=int, default=32, help="traced input size (variants do not depend on it)")
    parser.add_argument("--limit", type=int, default=None, help="compile only the first N variants")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arch = int(args.arch.removeprefix("sm_"))
    if args.trace:
        print(json.dumps(trace(args.model, args.dtype, args.size)))
        return 0
    if args.compile:
        print(json.dumps(compile_variants(json.load(open(args.compile)), args.dtype, arch)))
        return 0
    variants = _child(["--trace", "--model", args.model, "--dtype", args.dtype, "--size", str(args.size)], True)
    variants = variants[:args.limit] if args.limit else variants
    path = (args.json or "aot_check") + ".variants.tmp"
    with open(path, "w") as f:
        json.dump(variants, f)
    try:
        rows = _child(["--compile", path, "--dtype", args.dtype, "--arch", args.arch], False)
    finally:
        os.remove(path)
    import triton

    report = {"arch": args.arch, "triton": triton.__version__, "model": args.model, "dtype": args.dtype,
              "kernels": rows}
    print(f"{'kernel':<18} {'features':<58} {'config':<18} {'ok':<3} {'regs':>4} {'spill':>6} {'smem':>7} mma")
    for r in rows:
        feats = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["features"].items())
        print(f"{r['kernel']:<18} {feats[:58]:<58} {r['config']:<18} {'ok' if r['ok'] else 'NO':<3} "
              f"{r['regs'] or 0:>4} {r['spill_bytes'] or 0:>6} {r['smem_bytes'] or 0:>7} {r['mma']}")
    spilling = [r for r in rows if r["ok"] and r["spill_bytes"]]
    heuristic_spills = sum(bool(r["heuristic"] and r["spill_bytes"]) for r in rows)
    print(f"\n{len(variants)} variants, {len(rows)} compiles for {args.arch}: {sum(not r['ok'] for r in rows)} "
          f"failed, {len(spilling)} spill ({heuristic_spills} of them heuristic choices), "
          f"{sum(r['mma'] == 'wgmma' for r in rows)} use wgmma, {sum(bool(r['pipelined']) for r in rows)} pipelined")
    report["targets"] = targets(rows, arch)
    for name, ok in report["targets"].items():
        print(f"target {name:<48} {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(report["targets"].values()) else 1


def targets(rows: list, arch: int) -> dict:
    """The static targets of the report, each True when met."""
    chosen = [r for r in rows if r["selectable"]]
    per_variant: dict = {}
    for r in rows:
        key = (r["kernel"], json.dumps(r["features"], sort_keys=True), tuple(r["divisible_by_16"]))
        per_variant[key] = per_variant.get(key, 0) + bool(r["selectable"])
    return {
        "every compile succeeds": all(r["ok"] for r in rows),
        "no selectable configuration spills": all(r["ok"] and not r["spill_bytes"] for r in chosen),
        "every selectable configuration is pipelined": all(r["pipelined"] and r["async_copy"] for r in chosen),
        "every MMA is wgmma" if arch >= 90 else "every MMA is mma": all(
            r["mma"] == ("wgmma" if arch >= 90 else "mma") for r in chosen),
        "every variant keeps two or more configurations": all(n >= 2 for n in per_variant.values()),
        "every wgrad overlaps its MMAs": all(r["mma_overlap"] for r in chosen if r["kernel"] == "conv_wgrad_kernel")
        if arch >= 90 else True,
    }


if __name__ == "__main__":
    sys.exit(main())
