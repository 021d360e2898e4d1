"""Every cuDNN fusion graph a converted torchvision ResNet runs (backend cuda, csrc/cudnn_fusion.cpp), checked
without running it:

  python bench/cudnn_check.py --model resnet50 --dtype bfloat16                 # descriptions (any machine)
  python bench/cudnn_check.py --device-properties FILE --model resnet50         # engines for that GPU (any machine)
  python bench/cudnn_check.py --save-device-properties FILE                     # on a GPU: write them, no check

Without --device-properties each graph's description goes through cudnn-frontend's validate(). With the JSON
cuDNN serialises for a GPU (--save-device-properties there; bench/gpu_suite.sh quick stores it in env.json), the
check also runs cuDNN's heuristics, support check and plan build for that GPU on this machine, no GPU needed:
whether an engine exists for every graph, the measurement a GPU run would otherwise be needed for.
Writes --json PATH: {"mode", "model", "dtype", "graphs": [{"unit", "graph", "features", "x", "w", "stride",
"padding", "ok", "why"}]}; exit status 1 if any graph fails.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

import torch
import torchvision

PROLOGUE, STATS, BIAS, RESIDUAL, RELU = 1, 2, 4, 8, 16  # csrc/cudnn_fusion.h Feature
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _unit_graphs(position: str) -> List[tuple]:
    """(graph, features) the block ops build for a unit: `first` (reads the block input), `inner` (reads the
    unit below's BN-apply + ReLU), `last` (inner, and closes the block in eval), `projection`."""
    reads_below = position in ("inner", "last")
    train = [("fprop", (PROLOGUE if reads_below else 0) | STATS), ("wgrad", PROLOGUE if reads_below else 0)]
    if reads_below:
        train.append(("dgrad", 0))  # dgrad with the unit below's dReLU + dBN weight
    evaluation = {"first": BIAS | RELU, "inner": BIAS | RELU, "last": BIAS | RESIDUAL | RELU, "projection": BIAS}
    return train + [("fprop", evaluation[position])]


def block_graphs(arch: str, batch: int = 256, size: int = 224) -> List[dict]:
    """Every (graph, features, sizes) of the residual blocks of torchvision's `arch` at this batch and size."""
    model = getattr(torchvision.models, arch)().to("meta")  # shapes only: nothing allocated or computed
    shapes, hooks = {}, []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, args, out: shapes.__setitem__(mod, list(args[0].shape))))
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    for h in hooks:
        h.remove()
    out, seen = [], set()
    for name, block in model.named_modules():
        if not isinstance(block, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck)):
            continue
        main = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
        units = [(c, "first" if i == 0 else "last" if i == len(main) - 1 else "inner") for i, c in enumerate(main)]
        if block.downsample is not None:
            units.append((block.downsample[0], "projection"))
        for conv, position in units:
            # dgrad's sizes are the unit below's activations: the conv's input, as for fprop and wgrad
            x = [batch] + shapes[conv][1:]
            for graph, features in _unit_graphs(position):
                key = (graph, features, tuple(x), tuple(conv.weight.shape), conv.stride, conv.padding)
                if key not in seen:
                    seen.add(key)
                    out.append({"unit": f"{name}.{position}", "graph": graph, "features": features, "x": x,
                                "w": list(conv.weight.shape), "stride": list(conv.stride),
                                "padding": list(conv.padding)})
    return out


def check(graphs: List[dict], dtype: torch.dtype, device_properties: str = "") -> List[dict]:
    ops = torch.ops.fused_resnet_C
    for g in graphs:
        args = (g["graph"], g["features"], g["x"], g["w"], g["stride"], g["padding"], [1, 1], dtype)
        why = ops.fusion_support(device_properties, *args) if device_properties else ops.fusion_validate(*args)[0]
        g.update(ok=why == "", why=why)
    return graphs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="torchvision ResNet (resnet18 ... resnet152)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--device-properties", default=None, help="cuDNN's JSON for a GPU: check engines for it")
    p.add_argument("--save-device-properties", default=None,
                   help="on a GPU: write its cuDNN device properties to this file and stop")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from fused_resnet.backends import cuda, extension

    if extension.load() is None:
        print(f"the extension is not built: {extension.status()['reason']}")
        return 1
    print(f"cudnn fusion {cuda.fusion_line()}")
    if args.save_device_properties:
        with open(args.save_device_properties, "w") as f:
            f.write(torch.ops.fused_resnet_C.fusion_device_properties())
        print(f"wrote {args.save_device_properties}")
        return 0
    props = open(args.device_properties).read() if args.device_properties else ""
    graphs = check(block_graphs(args.model, args.batch, args.size), DTYPES[args.dtype], props)
    mode = "engines (deviceless, from device properties)" if props else "descriptions (validate)"
    bad = [g for g in graphs if not g["ok"]]
    print(f"{args.model} {args.dtype} batch {args.batch}: {len(graphs)} graphs, {len(graphs) - len(bad)} pass "
          f"the check of {mode}")
    for g in bad:
        print(f"  FAIL {g['unit']} {g['graph']} features={g['features']} x={g['x']} w={g['w']}: {g['why']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mode": mode, "model": args.model, "dtype": args.dtype, "graphs": graphs}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
