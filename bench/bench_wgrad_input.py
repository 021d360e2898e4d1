"""The backward of a chained unit (one whose input is the previous unit's relu(a·s + t)), two ways, timed in one run:

  written    what backend triton runs: dgrad (dBN on load, the previous ReLU mask and Σdz, Σdz·x̂ in its epilogue)
             also writes the unit's input r = relu(a·s + t); wgrad (dBN on load) reads r plain
  recompute  the same dgrad without that write; wgrad recomputes r while loading (both GEMM operands
             transformed: on sm_90 its main loop waits for every wgmma)
  cudnn      torch's dgrad + wgrad of the same conv with no BN work at all (a yardstick, not a like-for-like)

docs/TRITON.md explains the choice; this measures it. Per chained conv shape of the model (a block's conv2 and
conv3): ms of dgrad + wgrad per provider (triton.testing.do_bench, median, warm-up excluded) and
written / recompute. Both Triton results are checked against float64 with the rule of fused_resnet.testing.

    python bench/bench_wgrad_input.py --model resnet50 --batch 256 --dtype bfloat16 --out bench_wgrad_input.json
"""
from __future__ import annotations

import sys

import torch

from fused_resnet import testing
from fused_resnet.tools import benchmark


def _problem(shape: testing.ConvShape, dtype: torch.dtype, dev: torch.device):
    """(prev, w, dy, a, per-channel vectors): prev is the previous unit's pre-BN output (the conv's input before
    its BN + ReLU), a this unit's pre-BN output; α, β, γ, mean of the dBN; s, t, mean, rstd of the previous BN."""
    prev, w, dy = shape.problem(dtype, dev, seed=1)
    g = torch.Generator(device=dev).manual_seed(2)

    def vec(n, lo, hi):
        return torch.rand(n, device=dev, generator=g) * (hi - lo) + lo

    a = torch.randn(dy.shape, device=dev, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    dbn = (a, vec(shape.k, -0.2, 0.2), vec(shape.k, 0.5, 1.5), vec(shape.k, -0.1, 0.1), vec(shape.k, -0.1, 0.1))
    relu_of = (prev, vec(shape.c, 0.5, 1.5), vec(shape.c, -0.3, 0.3), vec(shape.c, -0.2, 0.2), vec(shape.c, 0.8, 1.2))
    return prev, w, dy, dbn, relu_of


def _reference(shape, prev, w, dy, dbn, relu_of, dtype):
    """dW of the unfused sequence (da = α·dy + β·(a − mean) + γ; r = relu(prev·s + t); torch's wgrad) in
    ``dtype`` (each step rounded, as torch would) — float64 gives the oracle."""
    a, amean, alpha, beta, gamma = dbn
    _, s, t, _, _ = relu_of

    def chan(v):
        return v.to(dtype).view(1, -1, 1, 1)

    da = (dy.to(dtype) * chan(alpha) + (a.to(dtype) - chan(amean)) * chan(beta) + chan(gamma))
    r = torch.relu(prev.to(dtype) * chan(s) + chan(t))
    return shape.torch_pass("wgrad", r, w.to(dtype), da)


def _bench_shape(shape: testing.ConvShape, dtype: torch.dtype, dev: torch.device) -> list:
    from fused_resnet.kernels import conv

    prev, w, dy, dbn, relu_of = _problem(shape, dtype, dev)
    stride, hw, rs = (shape.stride,) * 2, (shape.h, shape.w), (shape.r, shape.s)

    def written():
        *_, r = conv.conv_dgrad(dy, w, hw, stride, shape.pad, dbn=dbn, relu_of=relu_of, relu_out=True)
        return conv.conv_wgrad(dy, r, rs, stride, shape.pad, dbn=dbn)

    def recompute():
        conv.conv_dgrad(dy, w, hw, stride, shape.pad, dbn=dbn, relu_of=relu_of)
        return conv.conv_wgrad(dy, prev, rs, stride, shape.pad, dbn=dbn, in_affine=relu_of[1:3])

    def cudnn():
        return shape.backward(dy, prev, w)

    ref64 = _reference(shape, prev, w, dy, dbn, relu_of, torch.float64)
    same = _reference(shape, prev, w, dy, dbn, relu_of, dtype)
    checks = {name: testing.check(f"dW {name}", fn(), ref64, same, ref64, dtype)
              for name, fn in (("written", written), ("recompute", recompute))}
    del ref64, same
    times = {name: benchmark.median_ms(fn, dev) for name, fn in
             (("written", written), ("recompute", recompute), ("cudnn", cudnn))}
    print(f"{str(shape):<34} written {times['written']:7.3f} ms  recompute {times['recompute']:7.3f} ms  "
          f"cudnn {times['cudnn']:7.3f} ms  written/recompute {times['written'] / times['recompute']:.2f}  "
          f"{'ok' if all(c.ok for c in checks.values()) else 'BAD'}", flush=True)
    return [{"shape": str(shape), "provider": name, "ms": ms, "vs_recompute": ms / times["recompute"],
             "ok": checks[name].ok if name in checks else True,
             "err": checks[name].err_fused if name in checks else None} for name, ms in times.items()]


def main(argv=None) -> int:
    parser = benchmark.shape_parser(__doc__)
    args = parser.parse_args(argv)
    dev = benchmark.bench_device("bench_wgrad_input")
    if dev is None:
        return 2
    dtype = testing.DTYPES[args.dtype]
    shapes = testing.conv_shapes(args.model, args.batch, args.size, chained=True)[:args.limit]
    rows = [row for shape in shapes for row in _bench_shape(shape, dtype, dev)]
    result = {"benchmark": "wgrad_input", "model": args.model, "batch": args.batch, "dtype": args.dtype,
              "layout": "channels_last", **benchmark.environment(), "rows": rows}
    total = {p: sum(r["ms"] for r in rows if r["provider"] == p) for p in ("written", "recompute", "cudnn")}
    print(f"\n{args.model}, batch {args.batch}, {args.dtype}, {result['gpu']}: sum over chained shapes written "
          f"{total['written']:.3f} ms, recompute {total['recompute']:.3f} ms, cudnn {total['cudnn']:.3f} ms")
    return benchmark.finish(result, args.out, all(r["ok"] for r in rows))


if __name__ == "__main__":
    sys.exit(main())
