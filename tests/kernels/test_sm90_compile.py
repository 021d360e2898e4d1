"""GPU readiness on a machine without a GPU: the Triton kernels compile for sm_90 (Hopper) ahead of time, as Triton's
JIT compiles them there, and the conv kernels' dots become wgmma. The interpreter runs the kernels' Python, not
Triton's GPU compiler: a kernel that only fails to compile for a GPU (a non-constexpr global, a type error in a
branch the interpreter skips) is caught here. One launch per kernel family and epilogue kind, bf16, recorded from
the kernels' host functions in this (interpreted) session on ResNet's 3x3 / 1x1 / stem shapes (and a grouped
fprop and a dilated dgrad: ResNeXt's and DeepLab's 3x3s; the closing and the first backward reduction with
stochastic depth; the "-d" shortcut's 1x1 fprop, dgrad and wgrad pooling on load / on store), then compiled in a
child process without TRITON_INTERPRET through the JIT's own argument binding (fused_resnet.kernels.aot): stride
and padding 1 are constants there, channel counts of 64 divisible by 16, as on the GPU. The same child runs the
spill pruning of autotuning with the spill read from the sm_90 cubins."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

TILE = (128, 64, 64, 8, 4)
# An fprop pooling on load stages four input tiles per step: at 128 rows and 4 stages that is 256 KB of shared
# memory, over Hopper's 227 (autotuning drops such a configuration: it cannot load); 64 rows fit.
POOL_TILE = (64, 128, 64, 4, 4)
BF16 = torch.bfloat16


def _record(call, kernels) -> list:
    """(kernel name, launch arguments) of every launch ``call`` makes of the given kernels; nothing runs."""
    from fused_resnet.kernels import aot, conv

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv, "_launch", lambda kernel, grid, kwargs, mnk, caps, **_: seen.append((kernel, kwargs)))
        for k in kernels:
            mp.setattr(k, "run", lambda *a, _k=k, grid, warmup, **kwargs: seen.append((_k, kwargs)))
        call()
    return [(k.__name__, aot.describe(kw)) for k, kw in seen]


def _small_kernels(bn_finalize, conv) -> list:
    """The small kernels between the GEMMs: the BN vector arithmetic and the wgrad's split reduction."""
    return [bn_finalize.bn_finalize_kernel, bn_finalize.dbn_finalize_kernel, bn_finalize.bn_running_update_kernel,
            conv.wgrad_reduce_kernel]


CASES = 25  # the launches of _launches()


def _launches() -> list:
    """[name, kernel name, described arguments, tile or None (a launch with Triton's default warps and stages)]."""
    from fused_resnet.kernels import bn_act, bn_finalize, conv, drelu_dbn

    g = torch.Generator().manual_seed(0)

    def t(*shape, dtype=BF16):
        v = torch.randn(*shape, generator=g).to(dtype)
        return v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v

    def vec(c=64):
        return t(c, dtype=torch.float32)

    x, w3, w1 = t(2, 64, 8, 8), t(64, 64, 3, 3), t(64, 64, 1, 1)
    xg, wg = t(2, 128, 8, 8), t(128, 64, 3, 3)  # two groups of 64 channels (ResNeXt's wider stages)
    block_in = t(2, 32, 16, 16)
    dy, a, prev = t(2, 64, 8, 8), t(2, 64, 8, 8), t(2, 64, 8, 8)
    dbn = (a, vec(), vec(), vec(), vec())
    stem_x, stem_w, stem_dy = t(2, 3, 32, 32), t(64, 3, 7, 7), t(2, 64, 16, 16)
    tile = torch.tensor([128], dtype=torch.int32)
    partials = conv.TilePartials(vec(256 * 64).view(256, 64), vec(256 * 64).view(256, 64), tile, 8192)
    phases = conv.TilePartials(vec(4 * 64 * 64).view(256, 64), vec(4 * 64 * 64).view(256, 64), tile, 4096, 4)
    count = torch.tensor(8192.0, dtype=torch.float64)
    cases = [
        ("fprop 3x3 prologue+stats", lambda: conv.conv_fprop(x, w3, (1, 1), (1, 1), in_affine=(vec(), vec()),
                                                             stats=True), TILE),
        ("fprop 1x1 bias+option A+relu", lambda: conv.conv_fprop(x, w1, bias=vec(), residual=block_in,
                                                                 option_a_stride=(2, 2), relu=True), TILE),
        ("fprop 7x7 stem (row layout)", lambda: conv.conv_fprop(stem_x, stem_w, (2, 2), (3, 3), stats=True), TILE),
        ("dgrad dbn+mask+stats+relu out+residual", lambda: conv.conv_dgrad(
            dy, w3, (8, 8), (1, 1), (1, 1), dbn=dbn, relu_of=(prev, vec(), vec(), vec(), vec()),
            residual=t(2, 64, 8, 8), relu_out=True), TILE),
        ("wgrad 3x3 dbn (input written by dgrad)", lambda: conv.conv_wgrad(dy, x, (3, 3), (1, 1), (1, 1), dbn=dbn),
         TILE),
        ("wgrad dbn+prologue", lambda: conv.conv_wgrad(dy, x, (3, 3), (1, 1), (1, 1), dbn=dbn,
                                                       in_affine=(vec(), vec())), TILE),
        ("fprop 3x3 grouped prologue+stats", lambda: conv.conv_fprop(xg, wg, (1, 1), (1, 1), in_affine=(vec(128),
                                                                    vec(128)), stats=True, groups=2), TILE),
        ("dgrad dilated dbn+mask+stats+relu out+residual", lambda: conv.conv_dgrad(
            dy, w3, (8, 8), (1, 1), (2, 2), dbn=dbn, relu_of=(prev, vec(), vec(), vec(), vec()),
            residual=t(2, 64, 8, 8), relu_out=True, dilation=(2, 2)), TILE),
        ("fprop 1x1 avg-pool on load+stats", lambda: conv.conv_fprop(x, w1, stats=True, avg_pool=2), POOL_TILE),
        ("dgrad 1x1 dbn+avg-pool on store", lambda: conv.conv_dgrad(t(2, 64, 4, 4), w1, (8, 8), dbn=(
            t(2, 64, 4, 4), vec(), vec(), vec(), vec()), avg_pool=2), TILE),
        ("wgrad 1x1 dbn+avg-pool on load (both operands transformed)", lambda: conv.conv_wgrad(t(2, 64, 4, 4), x, (1, 1), dbn=(
            t(2, 64, 4, 4), vec(), vec(), vec(), vec()), avg_pool=2), TILE),
        ("wgrad 7x7 stem (flat, padded channels)", lambda: conv.conv_wgrad(
            stem_dy, stem_x, (7, 7), (2, 2), (3, 3), dbn=(stem_dy, vec(), vec(), vec(), vec())), TILE),
        ("bn_act affine", lambda: bn_act.bn_act(a, vec(), vec(), residual=prev, residual_affine=(vec(), vec())),
         None),
        ("bn_act option A", lambda: bn_act.bn_act(a, vec(), vec(), residual=block_in, option_a_stride=(2, 2)), None),
        ("drelu_dbn_reduce", lambda: drelu_dbn.drelu_dbn_reduce(dy, a, vec(), vec(), 1e-5, y=prev), None),
        ("drelu_dbn_reduce + a projection's BN", lambda: drelu_dbn.drelu_dbn_reduce(
            dy, a, vec(), vec(), 1e-5, y=prev, second=(x, vec(), vec(), 1e-5)), None),
        ("bn_act affine + stochastic depth", lambda: bn_act.bn_act(
            a, vec(), vec(), residual=prev, residual_affine=(vec(), vec()), sample_scale=t(2)), None),
        ("drelu_dbn_reduce + a projection's BN + stochastic depth", lambda: drelu_dbn.drelu_dbn_reduce(
            dy, a, vec(), vec(), 1e-5, y=prev, second=(x, vec(), vec(), 1e-5), sample_scale=t(2)), None),
        ("bn_finalize partials+affine", lambda: bn_finalize.bn_finalize(
            t(64), t(64), 1e-5, partials=partials), None),
        ("bn_finalize running statistics", lambda: bn_finalize.bn_finalize(
            t(64), t(64), 1e-5, stats=(t(64), t(64))), None),
        ("dbn_finalize phases+previous affine+dW", lambda: bn_finalize.dbn_finalize(
            phases, t(64), t(64), vec(), 1e-5, 8192, prev=(t(64), t(64), vec(), vec(), 1e-5),
            reduce=conv.WgradWorkspace(vec(4 * 64 * 9 * 64).view(4, 64, 3, 3, 64), 64, BF16)), None),
        ("dbn_finalize group sums", lambda: bn_finalize.dbn_finalize(
            (vec(), vec()), t(64), t(64), vec(), 1e-5, count, grads=False), None),
        ("dbn_finalize local sums", lambda: bn_finalize.dbn_finalize(
            partials, t(64), t(64), vec(), 1e-5, 8192, coeffs=False, sums_out=True), None),
        ("bn_running_update cumulative", lambda: bn_finalize.bn_running_update(
            t(64), t(64), torch.zeros((), dtype=torch.long), vec(), vec(), count, None), None),
        ("dW: the wgrad split reduction", lambda: conv.wgrad_reduce(
            conv.WgradWorkspace(vec(4 * 64 * 9 * 64).view(4, 64, 3, 3, 64), 64, BF16)), None),
    ]
    own = [bn_act.bn_act_kernel, drelu_dbn.drelu_dbn_reduce_kernel, *_small_kernels(bn_finalize, conv)]
    assert len(cases) == CASES
    gemms = {k.__name__ for k in conv._TILES}
    out = []
    for name, call, tile in cases:  # a GEMM case's one GEMM (a wgrad's split reduction follows it), or one launch
        (kernel, args), = [r for r in _record(call, own) if (r[0] in gemms) == (tile is not None)]
        out.append([name, kernel, args, tile])
    return out


PRUNED = ("fprop 1x1 bias+option A+relu", "dgrad dbn+mask+stats+relu out+residual")  # every tile, then pruned


def compile_all(launches: list) -> list:
    """For every launch: fused_resnet.kernels.aot's analysis of its sm_90 compile, what the JIT specialised, and
    for those in PRUNED every tile's spill with what autotuning's pruning keeps (run without the interpreter)."""
    from fused_resnet.kernels import aot, bn_act, bn_finalize, conv, drelu_dbn

    kernels = {k.__name__: k for k in [*conv._TILES, bn_act.bn_act_kernel, drelu_dbn.drelu_dbn_reduce_kernel,
                                       *_small_kernels(bn_finalize, conv)]}
    rows = []
    for name, kernel_name, args, tile in launches:
        kernel = kernels[kernel_name]
        kwargs = aot.rebuild(args)
        if "PRECISION" in kwargs:  # as the GPU's launcher passes them (the trace ran under the interpreter)
            kwargs.update(UPCAST=False, PRECISION=conv._precision(BF16))
        row = {"name": name, "gemm": tile is not None}
        try:
            compiled = (aot.compile_launch(kernel, kwargs, 90) if tile is None
                        else aot.compile_tile(kernel, kwargs, tuple(tile), 90))
        except Exception as e:  # reported per launch
            rows.append({**row, "ok": False, "error": f"{type(e).__name__}: {str(e)[:1500]}"})
            continue
        row.update(ok=True, error=None, **aot.specialisation(compiled), **aot.analyse(compiled))
        if name in PRUNED:
            probe = aot.spill_probe(90)
            row["spills"] = [[list(t), probe(kernel, kwargs, t)] for t in conv._TILES[kernel]]
            with conv.spill_probe(probe):
                row["selectable"] = [list(t) for t in conv.selectable_tiles(kernel, kwargs)]
                row["heuristic"] = list(conv.heuristic_tile(kernel, kwargs, (128, 64, 576)))
            with aot.for_target(90):  # what Triton's autotuner then calls for each kept configuration
                cache = kernel.device_caches[aot._TargetDriver(90).device][0]
                before = len(cache)
                for t in row["selectable"]:
                    kernel.run(grid=(1,), warmup=True, **kwargs, **conv.tile_options(tuple(t)))
            row["compiled_again"] = len(cache) - before
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, input=json.dumps(_launches()), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("index", range(CASES), ids=lambda i: f"variant{i}")
def test_kernel_compiles_for_sm90(compiled, index):
    """Compiles; within Hopper's limits; a conv's dots become wgmma, its main loop is one software-pipelined loop
    fed by asynchronous copies (kernels.aot.pipelined), and nothing spills (these launches at the 128x64x64 tile,
    8 warps, 4 stages; bench/aot_check.py covers every configuration of every launch of a model)."""
    row = compiled[index]
    assert row["ok"], f"{row['name']}: {row['error']}"
    assert row["smem_bytes"] <= 227 * 1024 and row["regs"] <= 255, row  # Hopper's limits per block / thread
    if row["gemm"]:
        assert row["mma"] == "wgmma", f"{row['name']}: the conv dot did not become wgmma"
        assert row["async_copy"] and row["pipelined"], f"{row['name']}: the main loop is not pipelined: {row}"
        assert row["spill_bytes"] == 0, f"{row['name']}: spills {row['spill_bytes']} bytes"
    # the wgrads the backends launch with one operand transformed; the pooled projection's transforms both (its
    # BN backward on dy, the pool on x: docs/TRITON.md)
    if row["name"].startswith("wgrad") and "prologue" not in row["name"] and "both" not in row["name"]:
        assert row["mma_overlap"], f"{row['name']}: waits for each wgmma before issuing the next"


def test_the_compile_is_the_jits_specialisation(compiled):
    """Stride, padding and the unused residual geometry equal to 1 are constants of the compiled kernel and the
    64-channel counts are divisible by 16, as the JIT specialises a GPU launch (a runtime i32 instead changes the
    registers and spills)."""
    fprop = compiled[0]
    assert {"stride_h", "stride_w", "pad_h", "pad_w", "RES_C", "res_stride_h", "res_stride_w"} <= set(
        fprop["equal_to_1"])
    assert {"C", "K", "x_ptr", "w_ptr", "y_ptr"} <= set(fprop["divisible_by_16"])
    assert not {"N", "H", "W", "P", "Q"} & set(fprop["equal_to_1"] + fprop["divisible_by_16"])  # sizes: not at all
    stem = compiled[2]
    assert "C" not in stem["divisible_by_16"] and {"pad_h", "stride_h"}.isdisjoint(stem["equal_to_1"])


def test_autotuning_prunes_exactly_the_tiles_whose_sm90_compile_spills(compiled):
    """The pruning rule of autotuning (kernels.conv.selectable_tiles), measured on the sm_90 compile: a tile is
    kept if and only if its compiled kernel does not spill, and the heuristic choice is one of those. The dgrad
    with every epilogue spills in its 256-wide tile, so the rule has something to drop."""
    pruned = [r for r in compiled if "spills" in r]
    assert len(pruned) == len(PRUNED)
    for row in pruned:
        clean = [t for t, b in row["spills"] if b == 0]
        assert clean and row["selectable"] == clean, row
        assert row["heuristic"] in clean
    dgrad = dict((tuple(t), b) for t, b in pruned[1]["spills"])
    assert dgrad[(128, 256, 64, 8, 3)] > 0
    assert all(r["compiled_again"] == 0 for r in pruned)  # the benchmark and launch reuse pruning's compile


if __name__ == "__main__":
    print(json.dumps(compile_all(json.load(sys.stdin))))
