"""GPU readiness on a machine without a GPU: the Triton kernels compile for sm_90 (Hopper) ahead of time, and the
conv kernels' dots become wgmma. The interpreter runs the kernels' Python, not Triton's GPU compiler: a kernel
that only fails to compile for a GPU (a non-constexpr global, a type error in a branch the interpreter skips)
is caught here. One variant per kernel family and epilogue kind, bf16 operands. The compiles run in a child
process without TRITON_INTERPRET (the test session's kernels are interpreted)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

def _variants():
    from fused_resnet.kernels import bn_act, conv, drelu_dbn
    from fused_resnet.spec import Residual

    gemm = dict(UPCAST=False, PRECISION="tf32", BLOCK_M=128, BLOCK_N=64, BLOCK_K=64)
    return [
        ("fprop 3x3 prologue+stats", conv.conv_fprop_kernel,
         dict(R=3, S=3, ROW=False, CP=1, PROLOGUE=True, STATS=True, HAS_BIAS=False,
              RES_MODE=int(Residual.NONE), RELU=False, **gemm), True),
        ("fprop 1x1 bias+option A+relu", conv.conv_fprop_kernel,
         dict(R=1, S=1, ROW=False, CP=1, PROLOGUE=False, STATS=False, HAS_BIAS=True,
              RES_MODE=int(Residual.OPTION_A), RELU=True, **gemm), True),
        ("fprop 7x7 stem (row layout)", conv.conv_fprop_kernel,
         dict(R=7, S=7, ROW=True, CP=8, PROLOGUE=False, STATS=True, HAS_BIAS=False, RES_MODE=int(Residual.NONE),
              RELU=False, **gemm), True),
        ("dgrad dbn+mask+stats+relu out+residual", conv.conv_dgrad_kernel,
         dict(R=3, S=3, DBN=True, MASK=True, STATS=True, RELU_OUT=True, RES_MODE=int(Residual.TENSOR), **gemm),
         True),
        ("wgrad 3x3 dbn (input written by dgrad)", conv.conv_wgrad_kernel,
         dict(R=3, S=3, FLAT=False, CP=1, DBN=True, PROLOGUE=False, **gemm), True),
        ("wgrad dbn+prologue", conv.conv_wgrad_kernel,
         dict(R=3, S=3, FLAT=False, CP=1, DBN=True, PROLOGUE=True, **gemm), True),
        ("wgrad 7x7 stem (flat, padded channels)", conv.conv_wgrad_kernel,
         dict(R=7, S=7, FLAT=True, CP=8, DBN=True, PROLOGUE=False, **gemm), True),
        ("bn_act affine", bn_act.bn_act_kernel,
         dict(RES_MODE=int(Residual.AFFINE), RELU=True, BLOCK_M=64, BLOCK_C=64), False),
        ("bn_act option A", bn_act.bn_act_kernel,
         dict(RES_MODE=int(Residual.OPTION_A), RELU=True, BLOCK_M=64, BLOCK_C=64), False),
        ("drelu_dbn_reduce", drelu_dbn.drelu_dbn_reduce_kernel, dict(MASK=True, BLOCK_M=128, BLOCK_C=64), False),
    ]


def compile_all() -> list:
    """fused_resnet.kernels.aot.compile_variant's row for every variant (run without the interpreter)."""
    from fused_resnet.kernels import aot

    # a ResNet launch specialises its channel counts as multiples of 16 (kernels.aot.specialized)
    return [{"name": name, "gemm": is_gemm,
             **aot.compile_variant(fn, constexprs, "bfloat16", 8 if is_gemm else 4, 4 if is_gemm else 3,
                                   divisible=("C", "K") if is_gemm else ())}
            for name, fn, constexprs, is_gemm in _variants()]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(10), ids=lambda i: f"variant{i}")
def test_kernel_compiles_for_sm90(compiled, index):
    """Compiles; within Hopper's limits; a conv's dots become wgmma, its main loop is one software-pipelined loop
    fed by asynchronous copies (kernels.aot.pipelined), and nothing spills (these variants at the 128x64x64 tile,
    8 warps, 4 stages; ResNet's 3x3 / 1x1 / stem shapes; bench/aot_check.py covers every configuration)."""
    row = compiled[index]
    assert row["ok"], f"{row['name']}: {row['error']}"
    assert row["smem_bytes"] <= 227 * 1024 and row["regs"] <= 255, row  # Hopper's limits per block / thread
    if row["gemm"]:
        assert row["mma"] == "wgmma", f"{row['name']}: the conv dot did not become wgmma"
        assert row["async_copy"] and row["pipelined"], f"{row['name']}: the main loop is not pipelined: {row}"
        assert row["spill_bytes"] == 0, f"{row['name']}: spills {row['spill_bytes']} bytes"
    if row["name"].startswith("wgrad") and "prologue" not in row["name"]:  # the ones the backends launch
        assert row["mma_overlap"], f"{row['name']}: waits for each wgmma before issuing the next"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
