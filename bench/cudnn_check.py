"""Every cuDNN fusion graph backend cuda builds for a ResNet, asked of cuDNN for a GPU this machine need not have:

  python bench/cudnn_check.py                                  # ResNet-50, bf16, train + eval, H100 and H200
  python bench/cudnn_check.py --model resnet18 --dtype float16 --device-properties bench/cudnn_devices/h200.json
  python bench/cudnn_check.py --validate-only                  # descriptions only (cudnn-frontend's validate())
  python bench/cudnn_check.py --save-device-properties FILE    # on a GPU: write its properties, no check

The graphs are the ones the block ops ask for (fused_resnet.backends.cuda.fusion.requests: every fused block and
the stem, each unit in its position, training forward + backward and eval), for a model traced on the meta device.
Each unique graph gets cuDNN's answer for the GPU its device properties describe (bench/cudnn_devices/ holds the
H100's and the H200's): heuristics A and FALLBACK, the support check, and a plan built where the engine is
precompiled; a runtime-compiled engine passes the support check, and with --compile it is compiled too (once per
graph kind: the build then stops only at loading it, which needs the GPU). Verdicts: plan, runtime, none (cuDNN has
no engine: its reasons are printed), unknown (runtime-compiled engines were not considered: no CUDA driver library
could be loaded), error.

Without a GPU, cuDNN considers its runtime-compiled engines only if a driver library loads: --driver-shim auto (the
default) compiles bench/cudnn_driver_shim.c with the C compiler and loads it first wherever no real driver
library loads (never on a GPU machine).

Writes --json PATH: {"model", "dtype", "batch", "size", "modes", "devices": {name: [{"key", "request" (the
fusion_* ops' arguments: graph, features, x, w, stride, padding, dilation), "units", "mode", "verdict",
"detail"}]}}; exit status 1 unless every graph has an engine on every device asked.
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List

import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = sorted(glob.glob(os.path.join(ROOT, "bench", "cudnn_devices", "*.json")))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
ENGINE = ("plan", "runtime")  # the verdicts that mean cuDNN has an engine


def model_graphs(arch: str, dtype: torch.dtype, batch: int, size: int, train: bool) -> List[dict]:
    """The unique graphs (by key) that backend cuda's block ops ask for in torchvision's ``arch`` converted, for a
    batch of ``batch`` images of ``size`` px in ``dtype``: each with the units asking for it."""
    import fused_resnet
    from fused_resnet.backends.cuda import fusion
    from fused_resnet.warmup import block_calls

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)()
    model = fused_resnet.convert(model.to(dtype), backend="reference", inplace=True).train(train)
    example = torch.empty(batch, 3, size, size, dtype=dtype, device="meta")
    graphs: Dict[str, dict] = {}
    for call in block_calls(model, example):
        for r in fusion.requests(call.spec, call.x, call.weights, train):
            g = graphs.setdefault(r.key, {"key": r.key, "request": r, "units": []})
            g["units"].append(f"{call.name}.{call.unit_names[r.unit]}")
    return list(graphs.values())


def load_driver_shim(mode: str) -> str:
    """Loads the stand-in driver library where no real one loads (mode auto), always (on) or never (off); says
    what was done."""
    if mode == "off":
        return "no driver stand-in (--driver-shim off)"
    if mode == "auto":
        try:
            ctypes.CDLL("libcuda.so.1")
            return "a CUDA driver library loads here: no stand-in"
        except OSError:
            pass
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler to build the driver stand-in: runtime-compiled engines will read 'unknown'"
    with tempfile.TemporaryDirectory(prefix="cudnn_shim_") as folder:
        out = os.path.join(folder, "libcuda.so.1")
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", out,
                        os.path.join(ROOT, "bench", "cudnn_driver_shim.c")], check=True)
        # Loaded once, the library stays mapped after its file goes; cuDNN's dlopen("libcuda.so.1") finds it by
        # its soname.
        ctypes.CDLL(out, mode=ctypes.RTLD_GLOBAL)
    return "driver stand-in loaded (built from bench/cudnn_driver_shim.c)"


def check(graphs: List[dict], dtype: torch.dtype, props: str, deterministic: bool, compile_kinds: bool) -> None:
    """Each graph's verdict and detail from cuDNN for the GPU of ``props``; with ``compile_kinds`` the first
    runtime-compiled graph of each label is compiled too."""
    compiled = set()
    for g in graphs:
        label = g["key"].split(" ")[0]
        compile_this = compile_kinds and label not in compiled
        g["verdict"], g["detail"] = torch.ops.fused_resnet_C.fusion_support(props, *g["request"].args, dtype,
                                                                            deterministic, compile_this)
        if compile_this and g["verdict"] == "runtime":
            compiled.add(label)


def validate(graphs: List[dict], dtype: torch.dtype) -> None:
    for g in graphs:
        why, _ = torch.ops.fused_resnet_C.fusion_validate(*g["request"].args, dtype)
        g["verdict"], g["detail"] = ("valid", "") if why == "" else ("error", why)


def summary(graphs: List[dict]) -> str:
    counts: Dict[str, Dict[str, int]] = {}
    for g in graphs:
        label = g["key"].split(" ")[0]
        counts.setdefault(label, {}).setdefault(g["verdict"], 0)
        counts[label][g["verdict"]] += 1
    return "\n".join(f"  {label:<30} " + ", ".join(f"{v} {n}" for v, n in sorted(c.items()))
                     for label, c in sorted(counts.items()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="torchvision ResNet (resnet18 ... resnet152)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", default="train,eval", help="train (forward + backward), eval, or both")
    p.add_argument("--device-properties", action="append", default=None,
                   help="cuDNN's JSON for a GPU (repeatable; default: every file in bench/cudnn_devices/)")
    p.add_argument("--deterministic", action="store_true",
                   help="the graphs and engines of torch.use_deterministic_algorithms(True)")
    p.add_argument("--compile", action="store_true",
                   help="compile one runtime-compiled graph per kind (NVRTC; a few seconds each)")
    p.add_argument("--driver-shim", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--validate-only", action="store_true", help="cudnn-frontend's validate() only, no engines")
    p.add_argument("--save-device-properties", default=None,
                   help="on a GPU: write its cuDNN device properties to this file and stop")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from fused_resnet.backends import extension
    from fused_resnet.backends.cuda import fusion

    if extension.load() is None:
        print(f"the extension is not built: {extension.status()['reason']}")
        return 1
    print(f"cudnn fusion {fusion.line()}")
    if args.save_device_properties:
        with open(args.save_device_properties, "w") as f:
            f.write(torch.ops.fused_resnet_C.fusion_device_properties())
        print(f"wrote {args.save_device_properties}")
        return 0
    dtype = DTYPES[args.dtype]
    modes = [m.strip() for m in args.modes.split(",")]
    torch.use_deterministic_algorithms(args.deterministic)  # the block ops' graphs follow torch's flag
    result = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "size": args.size, "modes": modes,
              "devices": {}}
    if not args.validate_only:
        print(load_driver_shim(args.driver_shim))
    failed = False
    for path in (["(validate)"] if args.validate_only else args.device_properties or DEVICES):
        rows = []
        for mode in modes:
            graphs = model_graphs(args.model, dtype, args.batch, args.size, mode == "train")
            if args.validate_only:
                validate(graphs, dtype)
            else:
                check(graphs, dtype, open(path).read(), args.deterministic, args.compile)
            rows += [dict(g, mode=mode, request=list(g["request"].args)) for g in graphs]
        good = ("valid",) if args.validate_only else ENGINE
        bad = [g for g in rows if g["verdict"] not in good]
        failed |= bool(bad)
        name = os.path.splitext(os.path.basename(path))[0]
        print(f"{name}: {args.model} {args.dtype} batch {args.batch} {'+'.join(modes)}: {len(rows)} graphs, "
              f"{len(rows) - len(bad)} with {'a valid description' if args.validate_only else 'an engine'}")
        print(summary(rows))
        for g in bad:
            print(f"  {g['verdict'].upper()} {g['key']} ({', '.join(g['units'][:3])}"
                  f"{', ...' if len(g['units']) > 3 else ''}): {g['detail'][:600]}")
        result["devices"][name] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
