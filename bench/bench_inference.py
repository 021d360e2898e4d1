"""Model inference throughput: a converted ResNet in eval mode against eager PyTorch and torch.compile, one run.

Providers: eager (torchvision's model), compile (torch.compile of it, default mode), and each fused backend
available here (the model converted with fused_resnet.convert). All in eval mode under torch.no_grad, same
weights (BN statistics randomised so folding is exercised), same input, channels_last. Each provider's output
is checked against float64 with the rule of fused_resnet.testing (on the first 8 images; eval mode keeps images
independent).

    python bench/bench_inference.py --model resnet50 --batch 256 --dtype bfloat16 --out bench_inference.json
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torchvision

import fused_resnet
from fused_resnet import backends, testing
from fused_resnet.tools import benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet18", "resnet34", "resnet50", "resnet101",
                                                               "resnet152"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--providers", default="eager,compile,triton,cuda",
                        help="eager, compile and the fused backends to measure (a backend only where available)")
    parser.add_argument("--warmup-ms", type=float, default=100, help="warm-up time per provider (after the first call)")
    parser.add_argument("--rep-ms", type=float, default=500, help="timed repetitions per provider, in milliseconds")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    dev = benchmark.bench_device("bench_inference")
    if dev is None:
        return 2
    wanted = args.providers.split(",")
    dtype = testing.DTYPES[args.dtype]
    torch.manual_seed(0)
    base = testing.randomize_batchnorm(getattr(torchvision.models, args.model)(),
                                       torch.Generator().manual_seed(0)).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(dtype).contiguous(
        memory_format=torch.channels_last)
    oracle = copy.deepcopy(base).to(dev, torch.float64)
    with torch.no_grad():
        ref64 = oracle(x[:8].double())
    del oracle
    eager = copy.deepcopy(base).to(dev, dtype).to(memory_format=torch.channels_last)
    providers = {name: m for name, m in (("eager", eager), ("compile", torch.compile(eager))) if name in wanted}
    for name in [w for w in wanted if w in backends.names()]:
        if backends.backend_status()[name] is None:
            providers[name] = fused_resnet.convert(eager, backend=name)
        else:
            print(f"backend {name} not measured: {backends.backend_status()[name]}")
    runs = []
    env = benchmark.environment()
    with torch.no_grad():
        eager_out = eager(x)[:8]  # the yardstick, whether or not eager is timed
        for name, model in providers.items():
            # the first call (at the timed batch size: compile / autotune happen here) is reported separately
            r = benchmark.measure(lambda m=model: m(x), dev, args.batch, args.warmup_ms, args.rep_ms)
            chk = testing.check("logits", model(x)[:8], ref64, eager_out, ref64, dtype)
            runs.append({"model": args.model, "mode": "infer", "provider": name, "dtype": args.dtype,
                         "batch": args.batch, **{k: r[k] for k in ("img_per_s", "peak_mem_gib", "first_step_s")},
                         **env, "step_ms": r["step_ms"], "ok": chk.ok, "err": chk.err_fused,
                         "err_eager": chk.err_torch})
            peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.2f} GiB"
            print(f"{name:<8} {r['img_per_s']:9.0f} img/s  {r['step_ms']:8.2f} ms/step  "
                  f"peak {peak}  first call {r['first_step_s']:.1f} s  "
                  f"{'ok' if chk.ok else 'BAD'} (err {chk.err_fused:.2e}, eager {chk.err_torch:.2e})", flush=True)
    return benchmark.finish({"runs": runs}, args.out, all(r["ok"] for r in runs))


if __name__ == "__main__":
    sys.exit(main())
