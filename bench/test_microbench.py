"""Kernel microbenchmarks (pytest-benchmark), run explicitly:

    python -m pytest bench/test_microbench.py --benchmark-columns=median,min,max --benchmark-json=micro.json

Op families and providers, on the shape tables shared with the tests (``testing.conv_shapes`` /
``testing.bn_input_shapes`` of the models in ``FUSED_RESNET_MICRO_MODELS``, default resnet18,resnet50, at batch
``FUSED_RESNET_MICRO_BATCH``, default 256 on a GPU):

* conv fprop / dgrad / wgrad — eager (cuDNN), compile (torch.compile of the conv), triton (kernels/conv.py);
* bn_act (BN-apply + residual + ReLU) — eager (F.batch_norm, add, relu), compile (that sequence compiled), triton
  (kernels/bn_act.py), cuda (the extension's kernel);
* extension — every kernel of the C++/CUDA extension alone (bench_bn_kernels.KERNELS), GB/s against the copy
  ceiling (bench/bench_bn_kernels.py also times BN + ReLU units beside eager and compile).

Each call is synchronised, so pytest-benchmark's median is the device time per call; warm-up rounds (compilation
and autotuning included) are excluded. Every result is first checked against float64 with the rule of
fused_resnet.testing. At the end a table gives ms, TFLOP/s (convs) or GB/s (bn_act), % of the bf16 GEMM and
device-copy ceilings measured in the same session, and the speedup against eager and compile; with
``FUSED_RESNET_MICRO_JSON=path`` it is also written as JSON. Without a GPU (under TRITON_INTERPRET=1) the two
smallest shapes of each family run at batch 2 as a smoke test of this file (the extension's kernels on their CPU
registrations with FUSED_RESNET_EXT_ON_CPU=1): the numbers mean nothing there.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import bench_bn_kernels  # bench/ is on sys.path: pytest prepends a test file's folder
from fused_resnet import testing
from fused_resnet.backends import extension, cuda as cuda_backend, reference
from fused_resnet.tools import benchmark

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
BATCH = int(os.environ.get("FUSED_RESNET_MICRO_BATCH", 256 if GPU else 2))
SIZE = 224 if GPU else 32
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a CUDA GPU (or TRITON_INTERPRET=1 for a smoke run)", allow_module_level=True)


def _table(fn, model_names):
    shapes = list(dict.fromkeys(s for m in model_names for s in fn(m, BATCH, SIZE)))
    return shapes if GPU else shapes[:2]


MODELS = os.environ.get("FUSED_RESNET_MICRO_MODELS", "resnet18,resnet50").split(",")
CONV_SHAPES = _table(testing.conv_shapes, MODELS)
BN_SHAPES = _table(testing.bn_input_shapes, MODELS)
RESULTS: list = []


def _sync(fn):
    def call():
        out = fn()
        if GPU:
            torch.cuda.synchronize()
        return out

    return call


def _run(bench, fn):
    """Median seconds per call of fn (synchronised), warm-up excluded."""
    bench.pedantic(_sync(fn), rounds=20 if GPU else 2, iterations=1, warmup_rounds=3 if GPU else 1)
    return bench.stats.stats.median


@pytest.fixture(scope="session")
def ceilings():
    n = 8192 if GPU else 256
    a = torch.randn(n, n, device=DEV, dtype=DTYPE)
    gemm = 2 * n**3 / (benchmark.median_ms(lambda: a @ a, DEV) * 1e-3) / 1e12
    copy = benchmark.copy_ceiling_gbps(DEV, 1 << (29 if GPU else 20))
    yield {"gemm_tflops": gemm, "copy_gbps": copy}
    _report(gemm, copy)


def _report(gemm, copy):
    for r in RESULTS:
        same = [o for o in RESULTS if (o["family"], o["shape"]) == (r["family"], r["shape"])]
        for base in ("eager", "compile"):
            t = next((o["ms"] for o in same if o["provider"] == base), None)
            r[f"speedup_vs_{base}"] = t / r["ms"] if t else None
    print(f"\nmicrobenchmarks, batch {BATCH}, {DTYPE}, channels_last; ceilings: GEMM {gemm:.0f} TFLOP/s, copy "
          f"{copy:.0f} GB/s")
    for r in RESULTS:
        rate = (f"{r['tflops']:8.1f} TFLOP/s {100 * r['tflops'] / gemm:5.1f}%" if "tflops" in r
                else f"{r['gbps']:8.0f} GB/s   {100 * r['gbps'] / copy:5.1f}%")
        rel = "  ".join(f"vs {b} {r[f'speedup_vs_{b}']:.2f}x" for b in ("eager", "compile")
                        if r[f"speedup_vs_{b}"])
        print(f"{r['family']:<6} {r['shape']:<40} {r['provider']:<8} {r['ms']:8.3f} ms {rate}  {rel}")
    path = os.environ.get("FUSED_RESNET_MICRO_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"batch": BATCH, "dtype": str(DTYPE), "gemm_ceiling_tflops": gemm, "copy_ceiling_gbps": copy,
                       **benchmark.environment(), "rows": RESULTS}, f, indent=1)


def _need_extension():
    if extension.load(jit=True) is None:
        pytest.skip(f"the extension is not available: {extension.status()['reason']}")
    if not GPU and not cuda_backend.on_cpu_for_testing():
        pytest.skip(f"the extension's kernels run on a GPU ({cuda_backend.ENV_ON_CPU}=1: their CPU registrations)")


def _conv_fns(shape, x, w, dy, which):
    """{provider: fn} and the float64 reference for one conv pass."""
    compiled = torch.compile(lambda x, w, dy: shape.torch_pass(which, x, w, dy), dynamic=False)
    fns = {"eager": lambda: shape.torch_pass(which, x, w, dy), "compile": lambda: compiled(x, w, dy),
           "triton": lambda: shape.triton_pass(which, x, w, dy)}
    return fns, shape.torch_pass(which, x.double(), w.double(), dy.double())


@pytest.mark.parametrize("provider", ["eager", "compile", "triton"])
@pytest.mark.parametrize("which", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=str)
def test_conv(benchmark, ceilings, shape, which, provider):
    torch._dynamo.reset()
    x, w, dy = shape.problem(DTYPE, DEV)
    fns, ref64 = _conv_fns(shape, x, w, dy, which)
    chk = testing.check(which, fns[provider](), ref64, fns["eager"](), ref64, DTYPE)
    assert chk.ok, chk.row()
    seconds = _run(benchmark, fns[provider])
    RESULTS.append({"family": which, "shape": str(shape), "provider": provider, "ms": 1e3 * seconds,
                    "tflops": shape.flops / seconds / 1e12})


@pytest.mark.parametrize("provider", ["eager", "compile", "triton", "cuda"])
@pytest.mark.parametrize("with_res", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_bn_act(benchmark, ceilings, shape, with_res, provider):
    if provider == "cuda":
        _need_extension()
    from fused_resnet.kernels import bn_act as triton_bn_act

    torch._dynamo.reset()
    g = torch.Generator(device=DEV).manual_seed(0)
    a = torch.randn(shape, device=DEV, generator=g).to(DTYPE).contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, device=DEV, generator=g).to(DTYPE).contiguous(
        memory_format=torch.channels_last) if with_res else None
    c = shape[1]
    gamma, beta = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV)
    rm, rv = torch.randn(c, device=DEV) * 0.1, torch.rand(c, device=DEV) + 0.5
    s, t, _ = reference.scale_shift(gamma, beta, rm, rv, 1e-5)

    def eager(a, r):
        out = F.batch_norm(a, rm, rv, gamma, beta, False, 0.0, 1e-5)
        return torch.relu(out if r is None else out + r)

    compiled = torch.compile(eager, dynamic=False)
    fns = {"eager": lambda: eager(a, r), "compile": lambda: compiled(a, r),
           "triton": lambda: triton_bn_act.bn_act(a, s, t, r),
           "cuda": lambda: torch.ops.fused_resnet_C.bn_act(a, s, t, r, True)}
    ref64 = reference.bn_act(a.double(), s.double(), t.double(), None if r is None else r.double())
    chk = testing.check("bn_act", fns[provider](), ref64, fns["eager"](), ref64, DTYPE)
    assert chk.ok, chk.row()
    seconds = _run(benchmark, fns[provider])
    nbytes = (3 if with_res else 2) * a.numel() * a.element_size()
    RESULTS.append({"family": "bn_act", "shape": f"{tuple(shape)}{'+res' if with_res else ''}",
                    "provider": provider, "ms": 1e3 * seconds, "gbps": nbytes / seconds / 1e9})


@pytest.mark.parametrize("kernel", range(len(bench_bn_kernels.KERNELS)), ids=bench_bn_kernels.KERNELS)
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_extension(benchmark, ceilings, shape, kernel):
    _need_extension()
    name, nbytes, fn = bench_bn_kernels.kernel_rows(bench_bn_kernels.problem(shape, DTYPE, DEV))[kernel]
    seconds = _run(benchmark, fn)
    RESULTS.append({"family": "ext", "shape": f"{tuple(shape)} {name}", "provider": "cuda", "ms": 1e3 * seconds,
                    "gbps": nbytes / seconds / 1e9})
