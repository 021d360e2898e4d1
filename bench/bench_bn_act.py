"""bn_act microbenchmark: y = relu(a·s + t [+ residual]) on every BatchNorm activation shape of a ResNet.

Providers, timed in one run with triton.testing.do_bench (median, warm-up excluded):
  eager    torchvision's sequence: F.batch_norm (eval) → += residual → relu_
  compile  torch.compile of that sequence
  triton   fused_resnet.kernels.bn_act
  cuda     torch.ops.fused_resnet_C.bn_act (the C++/CUDA extension)
Bandwidth counts the fewest bytes the op must move (read a [and the residual], write y), for every provider, so
GB/s is comparable to the device-to-device copy ceiling measured in the same run. Each provider's output is first
checked against float64 with the rule of fused_resnet.testing (torch's eager error is the yardstick).

    python bench/bench_bn_act.py --model resnet50 --batch 256 --dtype bfloat16 --out results.json
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from fused_resnet import testing
from fused_resnet.backends import extension, reference
from fused_resnet.tools import benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_bn_act needs a CUDA GPU; nothing measured")
        return 2
    import triton
    from triton.testing import do_bench

    from fused_resnet.kernels import bn_act as triton_bn_act

    dtype = testing.DTYPES[args.dtype]
    ext = extension.load(jit=True)
    ceiling = benchmark.copy_ceiling_gbps(torch.device("cuda"), 1 << 29, warmup_ms=25, rep_ms=200)  # 1 GiB
    eps = 1e-5

    def eager(a, rm, rv, w, b, r):
        out = F.batch_norm(a, rm, rv, w, b, False, 0.0, eps)
        if r is not None:
            out += r
        return torch.relu_(out)

    rows = []
    for shape in testing.bn_input_shapes(args.model, args.batch):
        for with_res in (True, False):
            # A fresh compile per variant: one compiled function reused across all 24 variants hits dynamo's
            # recompile limit (8) and silently runs eager for the rest (seen in the first H100 run).
            torch._dynamo.reset()
            compiled = torch.compile(eager, dynamic=False, fullgraph=True)
            g = torch.Generator(device="cuda").manual_seed(0)
            a = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
            r = torch.randn(shape, device="cuda", generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last) if with_res else None
            c = shape[1]
            w, b = torch.rand(c, device="cuda") + 0.5, torch.randn(c, device="cuda")
            rm, rv = torch.randn(c, device="cuda") * 0.1, torch.rand(c, device="cuda") + 0.5
            s, t, _ = reference.scale_shift(w, b, rm, rv, eps)
            providers = {
                "eager": lambda: eager(a, rm, rv, w, b, r),
                "compile": lambda: compiled(a, rm, rv, w, b, r),
                "triton": lambda: triton_bn_act.bn_act(a, s, t, r),
            }
            if ext is not None:
                providers["cuda"] = lambda: torch.ops.fused_resnet_C.bn_act(a, s, t, r, True)
            ref64 = reference.bn_act(a.double(), s.double(), t.double(), None if r is None else r.double())
            eager_out = providers["eager"]()
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            compiled(a, rm, rv, w, b, r)
            if torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs:
                raise RuntimeError(f"torch.compile compiled no graph for {shape}: the compile column would be eager")
            nbytes = (3 if with_res else 2) * a.numel() * a.element_size()
            for name, fn in providers.items():
                chk = testing.check("bn_act", fn(), ref64, eager_out, ref64, dtype)
                ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                rows.append({"shape": list(shape), "residual": with_res, "provider": name, "ms": ms,
                             "gbps": nbytes / (ms * 1e-3) / 1e9, "ok": chk.ok, "err": chk.err_fused,
                             "err_eager": chk.err_torch})
    for row in rows:
        same = [x for x in rows if x["shape"] == row["shape"] and x["residual"] == row["residual"]]
        by = {x["provider"]: x["ms"] for x in same}
        row["pct_copy_ceiling"] = 100 * row["gbps"] / ceiling
        row["speedup_vs_eager"] = by["eager"] / row["ms"]
        row["speedup_vs_compile"] = by["compile"] / row["ms"]
    result = {
        "benchmark": "bn_act", "model": args.model, "batch": args.batch, "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(), "cuda_extension": extension.status()["how"],
        "date": datetime.date.today().isoformat(), "copy_ceiling_gbps": ceiling, "rows": rows,
    }
    print(f"\nbn_act, {args.model} BN shapes, batch {args.batch}, {args.dtype}, channels_last, "
          f"{result['gpu']}; copy ceiling {ceiling:.0f} GB/s (read + write)")
    print(f"{'shape':<22} {'res':<4} {'provider':<8} {'ms':>8} {'GB/s':>7} {'%ceil':>6} {'vs eager':>9} "
          f"{'vs compile':>10} {'ok':>3}")
    for row in rows:
        print(f"{str(tuple(row['shape'])):<22} {'yes' if row['residual'] else 'no':<4} {row['provider']:<8} "
              f"{row['ms']:8.3f} {row['gbps']:7.0f} {row['pct_copy_ceiling']:6.1f} {row['speedup_vs_eager']:9.2f} "
              f"{row['speedup_vs_compile']:10.2f} {'ok' if row['ok'] else 'BAD':>3}")
    return benchmark.finish(result, args.out, all(r["ok"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
