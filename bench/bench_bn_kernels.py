"""The C++/CUDA extension's memory-bound kernels on every BatchNorm shape of a ResNet.

Two tables, from one run:
  kernels  each extension kernel alone: achieved GB/s, counting the fewest bytes it must move (its reads and
           writes of activations; per-channel vectors are negligible), as a percentage of the device-to-device
           copy ceiling measured in the same run (read + write bytes per second)
  units    BN + ReLU training forward (statistics, running-statistics update, apply) and its backward (dReLU,
           dγ / dβ, dx), as eager PyTorch runs them, as torch.compile of the same eager code, and as the
           extension runs them — all timed here (median, warm-up excluded) and checked against float64 first

    python bench/bench_bn_kernels.py --model resnet50 --batch 256 --dtype bfloat16 --out results.json

Without a GPU, FUSED_RESNET_EXT_ON_CPU=1 runs a smoke pass on the CPU (the extension's CPU registrations; the
numbers mean nothing, the code paths, checks and schema are what it tests).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from fused_resnet import testing
from fused_resnet.backends import extension, cuda as cuda_backend, reference
from fused_resnet.tools import benchmark

EPS, MOMENTUM = 1e-5, 0.1


def problem(shape, dtype, device):
    """Activations (channels_last), gradient, residual and BN vectors for one BN shape."""
    g = torch.Generator().manual_seed(0)

    def act(offset=0.0):
        t = torch.randn(shape, generator=g) + offset
        return t.to(device, dtype).contiguous(memory_format=torch.channels_last)

    c = shape[1]
    p = {"a": act(1.0), "dy": act(), "r": act(), "gamma": (torch.rand(c, generator=g) + 0.5).to(device),
         "beta": torch.randn(c, generator=g).to(device)}
    p["mean"], p["var"] = reference.bn_stats(p["a"])
    p["s"], p["t"], p["rstd"] = reference.scale_shift(p["gamma"], p["beta"], p["mean"], p["var"], EPS)
    p["y"] = reference.bn_act(p["a"], p["s"], p["t"])
    return p


KERNELS = ("bn_stats", "bn_act relu", "bn_act + residual + relu", "bn_act dual affine (projection)",
           "drelu_dbn_reduce (mask from y)", "drelu_dbn_reduce (own relu)", "dbn_apply (mask from y)",
           "dbn_apply (own relu)", "residual_grad (identity)", "bn_running_update")


def kernel_rows(p):
    """(name, bytes, fn) for each extension kernel alone, in the order of KERNELS."""
    ops = torch.ops.fused_resnet_C
    a, dy, y, r = p["a"], p["dy"], p["y"], p["r"]
    mean, rstd, s, t, gamma, beta = (p[k] for k in ("mean", "rstd", "s", "t", "gamma", "beta"))
    size = a.numel() * a.element_size()
    sums = ops.drelu_dbn_reduce(dy, y, a, mean, rstd, s, t)
    rm, rv, nbt = torch.zeros_like(mean), torch.ones_like(mean), torch.zeros((), dtype=torch.long, device=a.device)
    count = a.numel() // a.shape[1]
    rows = [
        ("bn_stats", size, lambda: ops.bn_stats(a, gamma, beta, EPS)),
        ("bn_act relu", 2 * size, lambda: ops.bn_act(a, s, t, None, True)),
        ("bn_act + residual + relu", 3 * size, lambda: ops.bn_act(a, s, t, r, True)),
        ("bn_act dual affine (projection)", 3 * size,
         lambda: ops.bn_act(a, s, t, r, True, residual_scale=s, residual_shift=t)),
        ("drelu_dbn_reduce (mask from y)", 3 * size, lambda: ops.drelu_dbn_reduce(dy, y, a, mean, rstd, s, t)),
        ("drelu_dbn_reduce (own relu)", 2 * size, lambda: ops.drelu_dbn_reduce(dy, None, a, mean, rstd, s, t)),
        ("dbn_apply (mask from y)", 4 * size, lambda: ops.dbn_apply(dy, y, a, mean, rstd, s, t, *sums, True)),
        ("dbn_apply (own relu)", 3 * size, lambda: ops.dbn_apply(dy, None, a, mean, rstd, s, t, *sums, True)),
        ("residual_grad (identity)", 4 * size, lambda: ops.residual_grad(r, dy, y, a, [])),
        ("bn_running_update", 0, lambda: ops.bn_running_update(rm, rv, nbt, mean, p["var"], count, MOMENTUM)),
    ]
    assert tuple(r[0] for r in rows) == KERNELS
    return rows


def unit_providers(p, compile_fns):
    """{unit: ({provider: fn}, float64 reference, check output index)} for the forward and backward units."""
    ops = torch.ops.fused_resnet_C
    a, dy, gamma, beta = p["a"], p["dy"], p["gamma"], p["beta"]
    c = a.shape[1]
    rm, rv = torch.zeros(c, device=a.device), torch.ones(c, device=a.device)
    nbt = torch.zeros((), dtype=torch.long, device=a.device)
    count = a.numel() // c

    def eager_fwd(a):
        return torch.relu(F.batch_norm(a, rm, rv, gamma, beta, True, MOMENTUM, EPS))

    def cuda_fwd(a):
        mean, var, s, t = ops.bn_stats(a, gamma, beta, EPS)
        ops.bn_running_update(rm, rv, nbt, mean, var, count, MOMENTUM)
        return ops.bn_act(a, s, t, None, True)

    mean, y = p["mean"], p["y"]
    invstd = p["rstd"]

    def eager_bwd(dy):
        dz = torch.ops.aten.threshold_backward(dy, y, 0)
        return torch.ops.aten.native_batch_norm_backward(dz, a, gamma, rm, rv, mean, invstd, True, EPS,
                                                         [True, True, True])

    def cuda_bwd(dy):
        sums = ops.drelu_dbn_reduce(dy, y, a, mean, p["rstd"], p["s"], p["t"])
        return ops.dbn_apply(dy, y, a, mean, p["rstd"], p["s"], p["t"], *sums, True), sums[1], sums[0]

    fwd64 = reference.bn_act(a.double(), *reference.scale_shift(gamma.double(), beta.double(),
                                                                *reference.bn_stats(a.double()), EPS)[:2])
    m64, v64 = reference.bn_stats(a.double())
    s64, _, r64 = reference.scale_shift(gamma.double(), beta.double(), m64, v64, EPS)
    dz64 = dy.double() * (y > 0)
    sums64 = reference.drelu_dbn_reduce(dz64, a.double(), m64, r64)
    bwd64 = reference.dbn_apply(dz64, a.double(), m64, r64, s64, *sums64, True)
    c_fwd, c_bwd = compile_fns(eager_fwd), compile_fns(eager_bwd)
    return {
        "bn+relu forward (train)": ({"eager": lambda: eager_fwd(a), "compile": lambda: c_fwd(a),
                                     "cuda": lambda: cuda_fwd(a)}, fwd64, None),
        "bn+relu backward": ({"eager": lambda: eager_bwd(dy), "compile": lambda: c_bwd(dy),
                              "cuda": lambda: cuda_bwd(dy)}, bwd64, 0),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--limit", type=int, default=0, help="only the first N BN shapes (0: all)")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        device, warmup_ms, rep_ms = torch.device("cuda"), 25, 100
    elif os.environ.get(cuda_backend.ENV_ON_CPU) == "1":
        device, warmup_ms, rep_ms = torch.device("cpu"), 0, 0
    else:
        print(f"bench_bn_kernels needs a CUDA GPU (or {cuda_backend.ENV_ON_CPU}=1 for a CPU smoke run); "
              "nothing measured")
        return 2
    if extension.load(jit=True) is None:
        print(f"the extension is not available: {extension.status()['reason']}")
        return 2
    dtype = testing.DTYPES[args.dtype]
    ceiling = benchmark.copy_ceiling_gbps(device, (1 << 29) if device.type == "cuda" else (1 << 22), warmup_ms,
                                          rep_ms)
    shapes = testing.bn_input_shapes(args.model, args.batch, args.size)
    shapes = shapes[:args.limit] if args.limit else shapes

    def compile_fn(fn):
        torch._dynamo.reset()  # a fresh compile per shape: dynamo's recompile limit would silently fall back
        return torch.compile(fn, dynamic=False, fullgraph=True) if device.type == "cuda" else fn

    kernels, units = [], []
    for shape in shapes:
        p = problem(shape, dtype, device)
        for name, nbytes, fn in kernel_rows(p):
            ms = benchmark.median_ms(fn, device, warmup_ms, rep_ms)
            gbps = nbytes / (ms * 1e-3) / 1e9
            kernels.append({"shape": list(shape), "kernel": name, "ms": ms, "bytes": nbytes, "gbps": gbps,
                            "pct_copy_ceiling": 100 * gbps / ceiling})
        for unit, (fns, ref64, index) in unit_providers(p, compile_fn).items():
            eager_out = fns["eager"]()
            eager_out = eager_out if index is None else eager_out[index]
            times = {}
            for provider, fn in fns.items():
                out = fn()
                out = out if index is None else out[index]
                chk = testing.check(unit, out, ref64, eager_out, ref64, dtype)
                times[provider] = benchmark.median_ms(fn, device, warmup_ms, rep_ms)
                units.append({"shape": list(shape), "unit": unit, "provider": provider, "ms": times[provider],
                              "ok": chk.ok, "err": chk.err_fused, "err_eager": chk.err_torch})
            for row in units[-len(fns):]:
                row["speedup_vs_eager"] = times["eager"] / row["ms"]
                row["speedup_vs_compile"] = times["compile"] / row["ms"]
    result = {"benchmark": "bn_kernels", "model": args.model, "batch": args.batch, "dtype": args.dtype,
              **benchmark.environment(), "cuda_extension": extension.status()["how"], "copy_ceiling_gbps": ceiling,
              "compile": device.type == "cuda", "kernels": kernels, "units": units}
    print(f"\nextension kernels, {args.model} BN shapes, batch {args.batch}, {args.dtype}, channels_last, "
          f"{result['gpu']}; copy ceiling {ceiling:.0f} GB/s (read + write)")
    print(f"{'shape':<22} {'kernel':<34} {'ms':>8} {'GB/s':>7} {'%ceil':>6}")
    for row in kernels:
        print(f"{str(tuple(row['shape'])):<22} {row['kernel']:<34} {row['ms']:8.3f} {row['gbps']:7.0f} "
              f"{row['pct_copy_ceiling']:6.1f}")
    print(f"\n{'shape':<22} {'unit':<26} {'provider':<8} {'ms':>8} {'vs eager':>9} {'vs compile':>10} {'ok':>3}")
    for row in units:
        print(f"{str(tuple(row['shape'])):<22} {row['unit']:<26} {row['provider']:<8} {row['ms']:8.3f} "
              f"{row['speedup_vs_eager']:9.2f} {row['speedup_vs_compile']:10.2f} {'ok' if row['ok'] else 'BAD':>3}")
    return benchmark.finish(result, args.out, all(r["ok"] for r in units))


if __name__ == "__main__":
    sys.exit(main())
