"""GPU readiness on the CPU: every Triton conv kernel a converted model launches, compiled for a GPU target as
Triton's JIT compiles it there, with every tile configuration autotuning may try, and what each compile gives
(registers, spilled bytes, shared memory, wgmma / mma, asynchronous loads, pipelining).

Two child processes: one traces the conv-kernel launches of the model converted to backend triton, under the
Triton interpreter with the launches recorded instead of run (shapes flow, values do not matter), on every path a
user reaches: a training step (forward and backward), an eval forward, and an eval forward and backward (BN
frozen: running statistics inside a differentiable block), each with NCHW and with channels_last tensors. The
other compiles without the interpreter: each launch's own arguments go through the JIT's binding and
specialisation for the target (``fused_resnet.kernels.aot``: integers equal to 1 become constants, multiples of 16
and aligned pointers are marked divisible by 16), so the kernels counted and measured are those a GPU builds.

    python bench/aot_check.py --model resnet50 --dtype bfloat16 --arch sm_90 --json aot.json

JSON: {"arch", "triton", "torch", "model", "dtype", "paths", "launches", "kernels": [{"kernel", "features":
{constexpr: value}, "equal_to_1", "divisible_by_16", "config": "BMxBNxBK/wW/sS", "ok", "error", "regs",
"spill_bytes", "smem_bytes", "mma", "async_copy", "pipelined", "mma_overlap", "selectable", "heuristic",
"paths"}],
"summary": {...}, "targets": {...}, "seconds"}. One row per distinct compiled kernel. "equal_to_1" /
"divisible_by_16": what the JIT specialised (kernels.aot.specialisation). "selectable": autotuning may pick the
configuration — the rule the GPU applies at autotune time (kernels.conv.selectable_tiles: a configuration whose
compiled kernel spills is dropped), here with the spill read from the sm_90 cubin. "heuristic": what
FUSED_RESNET_AUTOTUNE=heuristic launches for the traced problem sizes (kernels.conv.heuristic_tile, same rule).
"pipelined": the MMAs sit in one software-pipelined loop fed by asynchronous copies; "mma_overlap": a wgmma stays
in flight while the next is issued; "paths": the traced paths that launch the kernel.

The static targets (the "targets" object, and the exit status): every compile succeeds, no selectable
configuration spills, every selectable one is pipelined with asynchronous copies and uses wgmma (sm_90), every
wgrad overlaps its MMAs, and the autotuning key determines the compiled kernel (what the spill pruning relies
on). Reported, not a target: the variants left with a single configuration that does not spill ("summary":
"one_configuration"; autotuning launches it without benchmarking).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PATHS = ("train", "eval", "eval+autograd")
DILATED = "-dilated"  # a torchvision ResNet as DeepLabV3's backbone: its last two stages dilated, not strided
LAYOUTS = ("nchw", "channels_last")


def trace(model_name: str, dtype: str, size: int) -> list:
    """The distinct conv-kernel launches ({"kernel", "args": kernels.aot.describe'd keyword arguments, "gemm_mnk"})
    that the model converted to backend triton makes on every path of PATHS × LAYOUTS. Needs TRITON_INTERPRET=1
    (the CPU runs the rest)."""
    import copy

    import torch
    import torchvision

    import fused_resnet
    from fused_resnet import models
    from fused_resnet.kernels import aot, conv

    found = {}
    path = []  # the path being traced, named in each launch it makes

    def record(kernel, grid, kwargs, gemm_mnk, caps, **_traffic):
        entry = {"kernel": kernel.__name__, "args": aot.describe(kwargs), "gemm_mnk": list(gemm_mnk)}
        paths = found.setdefault(json.dumps(entry, sort_keys=True), dict(entry, paths=[]))["paths"]
        if path[-1] not in paths:
            paths.append(path[-1])

    conv._launch = record
    depth = models.cifar_depth(model_name)
    dilated = model_name.endswith(DILATED)
    base = (models.cifar_resnet(depth, backend=None) if depth is not None
            else getattr(torchvision.models, model_name.removesuffix(DILATED))(
                num_classes=10, **({"replace_stride_with_dilation": [False, True, True]} if dilated else {})))
    dt = getattr(torch, dtype)
    for layout in LAYOUTS:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = fused_resnet.convert(copy.deepcopy(base), backend="triton").to(dt, memory_format=fmt)
        x = torch.randn(2, 3, size, size, dtype=dt).contiguous(memory_format=fmt)
        path.append(f"train {layout}")
        model.train()
        model(x).float().sum().backward()
        path.append(f"eval {layout}")
        model.eval()
        with torch.no_grad():
            model(x)
        path.append(f"eval+autograd {layout}")  # frozen BN; the gradient of the input too
        model(x.clone().requires_grad_(True)).float().sum().backward()
    return sorted(found.values(), key=lambda e: (e["kernel"], json.dumps(e, sort_keys=True)))


def _on_gpu(kernel, kwargs: dict) -> dict:
    """The launch's arguments as the GPU's launcher passes them: the interpreter's upcast and exact products are
    its own (kernels.conv._upcast, _precision: this process runs without the interpreter)."""
    from fused_resnet.kernels import conv

    first = kwargs[kernel.arg_names[0]]
    return dict(kwargs, UPCAST=conv._upcast(first.dtype), PRECISION=conv._precision(first.dtype))


def compile_launches(launches: list, arch: int, limit=None) -> dict:
    """Every traced launch × every tile configuration of its kernel, compiled for sm_<arch> through the JIT: one
    row per distinct compiled kernel, with what autotuning (and the heuristic choice) may select for the launches
    that reach it."""
    from fused_resnet.kernels import aot, conv

    kernels = {k.__name__: k for k in conv._TILES}
    groups: dict = {}  # (kernel, tuning key) → [(kwargs, gemm_mnk, paths)]: where autotuning decides once
    for launch in launches:
        kernel = kernels[launch["kernel"]]
        kwargs = _on_gpu(kernel, aot.rebuild(launch["args"]))
        groups.setdefault((kernel, conv.tuning_key(conv._TUNED[kernel], kwargs)), []).append(
            (kwargs, tuple(launch["gemm_mnk"]), launch["paths"]))
    items = list(groups.items())[:limit] if limit else list(groups.items())
    rows: dict = {}
    choices, key_mismatches = [], 0
    with conv.spill_probe(aot.spill_probe(arch)):
        for (kernel, key), members in items:
            tiles = conv._TILES[kernel]
            try:
                selectable = conv.selectable_tiles(kernel, members[0][0])
                heuristic = {conv.heuristic_tile(kernel, kw, mnk) for kw, mnk, _ in members}
            except Exception:  # a compile failure: reported per configuration below
                selectable, heuristic = [], set()
            choices.append({"kernel": kernel.__name__, "key": list(key), "selectable": [list(t) for t in selectable]})
            per_tile: dict = {}
            for kwargs, _, paths in members:
                for tile in tiles:
                    row = _row(kernel, kwargs, tile, arch, rows)
                    row["selectable"] = row["selectable"] or tile in selectable
                    row["heuristic"] = row["heuristic"] or tile in heuristic
                    row["paths"] += [p for p in paths if p not in row["paths"]]
                    per_tile.setdefault(tile, set()).add(row["id"])
            key_mismatches += sum(len(ids) > 1 for ids in per_tile.values())
    out = [dict(r) for r in rows.values()]
    for r in out:
        del r["id"]
    return {"kernels": out, "choices": choices, "tuning_key_mismatches": key_mismatches, "tuning_keys": len(items)}


def _row(kernel, kwargs: dict, tile, arch: int, rows: dict) -> dict:
    from fused_resnet.kernels import aot, conv

    bm, bn, bk, warps, stages = tile
    names = [n for n in conv.constexpr_args(kernel) if n not in conv._TILE_ARGS + ("UPCAST", "PRECISION")]
    base = {"kernel": kernel.__name__, "features": {n: kwargs[n] for n in names},
            "config": f"{bm}x{bn}x{bk}/w{warps}/s{stages}", "selectable": False, "heuristic": False, "paths": []}
    try:
        compiled = aot.compile_tile(kernel, kwargs, tile, arch)
    except Exception as e:  # a compile failure is a result, reported per configuration
        key = json.dumps([base["kernel"], base["features"], base["config"]], sort_keys=True)
        return rows.setdefault(key, {**base, "id": key, "ok": False, "error": f"{type(e).__name__}: "
                                     f"{str(e).strip()[:1500]}", "equal_to_1": None, "divisible_by_16": None})
    if compiled.hash not in rows:
        rows[compiled.hash] = {**base, "id": compiled.hash, **aot.specialisation(compiled), "ok": True,
                               "error": None, **aot.analyse(compiled)}
    return rows[compiled.hash]


def summary(rows: list, choices: list) -> dict:
    ok = [r for r in rows if r["ok"]]
    keys = [(r["kernel"], json.dumps(r["features"], sort_keys=True), tuple(r["equal_to_1"]),
             tuple(r["divisible_by_16"])) for r in ok]  # a kernel: what is compiled, the tile aside
    variants = set(keys)
    wgrads = [r for r in ok if r["kernel"] == "conv_wgrad_kernel" and r["selectable"]]
    spills = [r["spill_bytes"] for r in ok if r["spill_bytes"]]
    return {
        "kernels": len(variants), "compiles": len(rows), "failed": len(rows) - len(ok),
        "spilling": len(spills), "spilling_selectable": sum(bool(r["selectable"] and r["spill_bytes"]) for r in ok),
        "spilling_heuristic": sum(bool(r["heuristic"] and r["spill_bytes"]) for r in ok),
        "largest_spill": max(spills, default=0), "selectable": sum(r["selectable"] for r in ok),
        "wgmma": sum(r["mma"] == "wgmma" for r in ok), "pipelined": sum(bool(r["pipelined"]) for r in ok),
        "async_copy": sum(bool(r["async_copy"]) for r in ok),
        "wgrad_selectable": len(wgrads), "wgrad_selectable_overlapping": sum(bool(r["mma_overlap"]) for r in wgrads),
        "one_configuration": [c for c in choices if len(c["selectable"]) < 2],
        "kernels_by_path": {p: len({v for v, r in zip(keys, ok) if p in r["paths"]})
                            for p in sorted({p for r in ok for p in r["paths"]})},
        "kernels_train_and_eval": len({v for v, r in zip(keys, ok)
                                       if any(not p.startswith("eval+autograd") for p in r["paths"])}),
    }


def targets(rows: list, arch: int, key_mismatches: int) -> dict:
    """The static targets of the report, each True when met."""
    chosen = [r for r in rows if r["selectable"]]
    return {
        "every compile succeeds": all(r["ok"] for r in rows),
        "no selectable configuration spills": all(r["ok"] and not r["spill_bytes"] for r in chosen),
        "every selectable configuration is pipelined": all(r["pipelined"] and r["async_copy"] for r in chosen),
        "every MMA is wgmma" if arch >= 90 else "every MMA is mma": all(
            r["mma"] == ("wgmma" if arch >= 90 else "mma") for r in chosen),
        "every wgrad overlaps its MMAs": all(r["mma_overlap"] for r in chosen if r["kernel"] == "conv_wgrad_kernel")
        if arch >= 90 else True,
        "the tuning key determines the compiled kernel": key_mismatches == 0,
    }


def dumps(report: dict) -> str:
    """The report as JSON, one line per kernel row (a readable diff between two reports)."""
    head = {k: v for k, v in report.items() if k != "kernels"}
    rows = ",\n".join(" " + json.dumps(r) for r in report["kernels"])
    return json.dumps(head, indent=1)[:-2] + f',\n "kernels": [\n{rows}\n ]\n}}\n'


def _child(args: list, interpret: bool) -> object:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"aot_check: {' '.join(args[:1])} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50",
                        help="resnet18..152, resnext50_32x4d, wide_resnet50_2, ..., cifar_resnet<6n+2>; a "
                             f"torchvision ResNet name + '{DILATED}' dilates its last two stages (DeepLabV3's)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--arch", default="sm_90", help="sm_90 (Hopper) or sm_80 (Ampere)")
    parser.add_argument("--size", type=int, default=32, help="traced input size (the kernels do not depend on it)")
    parser.add_argument("--limit", type=int, default=None,
                        help="compile only the launches of the first N tuning keys (kernel variants)")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arch = int(args.arch.removeprefix("sm_"))
    if args.trace:
        print(json.dumps(trace(args.model, args.dtype, args.size)))
        return 0
    if args.compile:
        with open(args.compile) as f:
            print(json.dumps(compile_launches(json.load(f), arch, args.limit)))
        return 0
    start = time.time()
    launches = _child(["--trace", "--model", args.model, "--dtype", args.dtype, "--size", str(args.size)], True)
    path = (args.json or "aot_check") + ".launches.tmp"
    with open(path, "w") as f:
        json.dump(launches, f)
    try:
        result = _child(["--compile", path, "--arch", args.arch] + (["--limit", str(args.limit)] if args.limit
                                                                    else []), False)
    finally:
        os.remove(path)
    import torch
    import triton

    rows = result["kernels"]
    report = {"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__, "model": args.model,
              "dtype": args.dtype, "paths": [f"{p} {lay}" for lay in LAYOUTS for p in PATHS],
              "launches": len(launches), "tuning_keys": result["tuning_keys"], "kernels": rows}
    print(f"{'kernel':<18} {'features':<52} {'=1 / %16':<9} {'config':<17} {'ok':<3} {'regs':>4} {'spill':>5} "
          f"{'smem':>6} {'mma':<5} sel heur")
    for r in rows:
        feats = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["features"].items())
        spec = f"{len(r['equal_to_1'] or [])}/{len(r['divisible_by_16'] or [])}"
        print(f"{r['kernel']:<18} {feats[:52]:<52} {spec:<9} {r['config']:<17} {'ok' if r['ok'] else 'NO':<3} "
              f"{r.get('regs') or 0:>4} {r.get('spill_bytes') or 0:>5} {r.get('smem_bytes') or 0:>6} "
              f"{str(r.get('mma')):<5} {'x' if r['selectable'] else '-':>3} {'x' if r['heuristic'] else '-':>4}")
    report["summary"] = s = summary(rows, result["choices"])
    report["targets"] = targets(rows, arch, result["tuning_key_mismatches"])
    report["seconds"] = round(time.time() - start, 1)
    print(f"\n{len(launches)} launches on {len(report['paths'])} paths, {result['tuning_keys']} tuning keys; "
          f"{s['kernels']} distinct kernels, {s['compiles']} compiles for {args.arch}: {s['failed']} failed, "
          f"{s['spilling']} spill (largest {s['largest_spill']} B; {s['spilling_selectable']} selectable, "
          f"{s['spilling_heuristic']} heuristic choices), {s['wgmma']} use wgmma, {s['pipelined']} pipelined; "
          f"wgrad: {s['wgrad_selectable_overlapping']} of {s['wgrad_selectable']} selectable keep a wgmma in "
          f"flight; {report['seconds']} s")
    print("kernels per path: " + ", ".join(f"{p} {n}" for p, n in s["kernels_by_path"].items())
          + f"; train and eval together {s['kernels_train_and_eval']}")
    for c in s["one_configuration"]:
        print(f"one configuration left: {c['kernel']} key {c['key'][:12]}: {c['selectable']}")
    for name, ok in report["targets"].items():
        print(f"target {name:<48} {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            f.write(dumps(report))
    return 0 if all(report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
