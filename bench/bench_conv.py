"""Conv engine microbenchmark: fprop, dgrad and wgrad of every convolution of a ResNet, Triton vs cuDNN.

Providers, timed in one run with triton.testing.do_bench (median, warm-up excluded):
  cudnn    torch's conv (F.conv2d / aten.convolution_backward with only that gradient requested)
  triton   fused_resnet.kernels.conv (conv_fprop / conv_dgrad / conv_wgrad), autotuned on its first call
Reported per shape and pass: ms, TFLOP/s (2·N·P·Q·K·C·R·S per pass), % of the bf16 GEMM ceiling measured in the
same run (an 8192³ torch.matmul), speedup against cuDNN, and the target (≥ 0.95× cuDNN on 3x3, ≥ 1.0× on 1x1 and
the stem). Each Triton result is first checked against float64 with the rule of fused_resnet.testing (cuDNN's
same-dtype error is the yardstick).

    python bench/bench_conv.py --model resnet50 --batch 256 --dtype bfloat16 --out bench_conv.json
"""
from __future__ import annotations

import sys

import torch

from fused_resnet import testing
from fused_resnet.tools import benchmark


def gemm_ceiling_tflops(dtype: torch.dtype, dev: torch.device) -> float:
    n = 8192 if dev.type == "cuda" else 256
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = benchmark.median_ms(lambda: a @ b, dev)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _bench_shape(shape: testing.ConvShape, dtype: torch.dtype, ceiling: float, pass_names,
                 dev: torch.device) -> list:
    """Rows (cudnn and triton) for each requested pass of one conv shape."""
    x, w, dy = shape.problem(dtype, dev)
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    rows = []
    for name in pass_names:
        def cudnn_fn(name=name):
            return shape.torch_pass(name, x, w, dy)

        def triton_fn(name=name):
            return shape.triton_pass(name, x, w, dy)

        ref64 = shape.torch_pass(name, x64, w64, dy64)
        chk = testing.check(name, triton_fn(), ref64, cudnn_fn(), ref64, dtype)
        del ref64
        times = {"cudnn": benchmark.median_ms(cudnn_fn, dev), "triton": benchmark.median_ms(triton_fn, dev)}
        target = 0.95 if shape.r == 3 and shape.s == 3 else 1.0
        for provider, ms in times.items():
            tflops = shape.flops / (ms * 1e-3) / 1e12
            rows.append({"shape": str(shape), "pass": name, "provider": provider, "ms": ms, "tflops": tflops,
                         "pct_gemm_ceiling": 100 * tflops / ceiling, "speedup_vs_cudnn": times["cudnn"] / ms,
                         "target_vs_cudnn": target, "ok": chk.ok if provider == "triton" else True,
                         "err": chk.err_fused if provider == "triton" else chk.err_torch})
        print(f"{str(shape):<34} {name:<6} cudnn {times['cudnn']:7.3f} ms  triton {times['triton']:7.3f} ms  "
              f"x{times['cudnn'] / times['triton']:.2f} (target {target})  {'ok' if chk.ok else 'BAD'}", flush=True)
    return rows


def main(argv=None) -> int:
    parser = benchmark.shape_parser(__doc__)
    parser.add_argument("--passes", default="fprop,dgrad,wgrad")
    args = parser.parse_args(argv)
    dev = benchmark.bench_device("bench_conv")
    if dev is None:
        return 2
    dtype = testing.DTYPES[args.dtype]
    ceiling = gemm_ceiling_tflops(dtype, dev)
    rows = []
    for shape in testing.conv_shapes(args.model, args.batch, args.size)[:args.limit]:
        rows += _bench_shape(shape, dtype, ceiling, args.passes.split(","), dev)
    result = {"benchmark": "conv", "model": args.model, "batch": args.batch, "dtype": args.dtype,
              "layout": "channels_last", "gemm_ceiling_tflops": ceiling, **benchmark.environment(), "rows": rows}
    triton_rows = [r for r in rows if r["provider"] == "triton"]
    missed = [r for r in triton_rows if r["speedup_vs_cudnn"] < r["target_vs_cudnn"]]
    print(f"\n{args.model} convs, batch {args.batch}, {args.dtype}, channels_last, {result['gpu']}; "
          f"{args.dtype} GEMM ceiling {ceiling:.0f} TFLOP/s. Targets missed: {len(missed)} of {len(triton_rows)}")
    return benchmark.finish(result, args.out, all(r["ok"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
