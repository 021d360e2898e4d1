"""Backend "cuda": its cuDNN fusion graphs (csrc/cudnn_fusion.cpp) and the statistics from their sums.

On the CPU: the build reports cudnn-frontend's version; every graph ResNet-50 and ResNet-18 use is described and
passes cudnn-frontend's own validation (no GPU needed); graph keys tell every input apart; which units may use
the graphs and why not; the statistics from Σ / Σx² (exact where they cancel); the switches and the tallies.
On a GPU (bench/gpu_suite.sh): blocks with the graphs against float64, that they really ran, a channel whose
|mean| ≫ std, a refused graph falling back (counted, same numbers), and eval's folded graphs. The existing
block tests of test_cuda.py run the graphs as well whenever they run in float16 / bfloat16 on a GPU.
"""
import copy
import glob
import importlib.util
import json
import os
import re

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import testing
from fused_resnet.backends import build, cuda, extension
from fused_resnet.spec import BlockSpec, Shortcut, UnitSpec, from_modules
from fused_resnet.tools import benchmark

from conftest import GPU, assert_checks, requires_gpu

pytestmark = pytest.mark.skipif(extension.load() is None, reason=f"extension not built: {extension.status()['reason']}")

BUILT = extension.load() is not None and torch.ops.fused_resnet_C.fusion_info().startswith("built")
requires_frontend = pytest.mark.skipif(not BUILT, reason="extension built without cudnn-frontend's headers")
DEVICE = torch.device("cuda" if GPU else "cpu")
PROLOGUE, STATS, BIAS, RESIDUAL, RELU = 1, 2, 4, 8, 16  # csrc/cudnn_fusion.h Feature
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ops():
    return torch.ops.fused_resnet_C


def _header_version(include: str) -> str:
    text = open(os.path.join(include, "cudnn_frontend_version.h")).read()
    return ".".join(re.search(rf"#define CUDNN_FRONTEND_{part}_VERSION (\d+)", text).group(1)
                    for part in ("MAJOR", "MINOR", "PATCH"))


# --------------------------------------------------------------------------------------------- build and info
def test_info_names_the_frontend_it_was_built_with():
    include = build.cudnn_frontend_include()
    info = _ops().fusion_info()
    if include is None:
        assert info.startswith("not built: cudnn-frontend's headers were not found"), info
        pytest.skip("cudnn-frontend's headers are not installed here")
    assert info == f"built (cudnn-frontend {_header_version(include)})"
    line = cuda.fusion_line()
    assert line.startswith(f"built (cudnn-frontend {_header_version(include)}, cuDNN ") and line.endswith(")"), line


def test_info_command_prints_the_fusion_line(capsys):
    from fused_resnet.tools import cli

    assert cli.main(["info"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cudnn fusion")]
    assert lines == [f"cudnn fusion   {cuda.fusion_line()}"]


def test_the_build_finds_the_headers_where_told_and_stages_a_copy(tmp_path, monkeypatch):
    """FUSED_RESNET_CUDNN_FRONTEND_INCLUDE wins ("none": build without); the staged copy for the GPU machine holds
    cudnn-frontend's headers alone, and the build then finds them there."""
    monkeypatch.setenv(build.CUDNN_FRONTEND_ENV, "none")
    assert build.cudnn_frontend_include() is None
    assert "-DFUSED_RESNET_WITH_CUDNN_FRONTEND" not in build.cxx_flags()
    monkeypatch.setenv(build.CUDNN_FRONTEND_ENV, str(tmp_path))
    assert build.cudnn_frontend_include() is None  # no cudnn_frontend.h there
    monkeypatch.delenv(build.CUDNN_FRONTEND_ENV)
    if build.cudnn_frontend_include() is None:
        pytest.skip("cudnn-frontend's headers are not installed here")
    staged = build.stage_cudnn_frontend(str(tmp_path / "staged"))
    assert os.path.isfile(os.path.join(staged, "cudnn_frontend.h"))
    assert all(name.startswith("cudnn") for name in os.listdir(staged))
    monkeypatch.setenv(build.CUDNN_FRONTEND_ENV, staged)
    assert build.cudnn_frontend_include() == staged
    assert build.include_dirs()[0] == staged and "-DFUSED_RESNET_WITH_CUDNN_FRONTEND" in build.cxx_flags()


# --------------------------------------------------------------------------------------------- graph descriptions
def _cudnn_check():
    spec = importlib.util.spec_from_file_location("cudnn_check", os.path.join(ROOT, "bench", "cudnn_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@requires_frontend
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_every_graph_of_a_resnet_passes_the_frontends_validation(arch, dtype, tmp_path):
    """bench/cudnn_check.py: every graph the block ops build for the model's blocks (each unit in its position,
    train and eval) is a complete description for cudnn-frontend (validate() on the CPU; whether an engine
    exists is the GPU's, or device properties', to say)."""
    out = tmp_path / "check.json"
    assert _cudnn_check().main(["--model", arch, "--dtype", dtype, "--json", str(out)]) == 0
    graphs = json.loads(out.read_text())["graphs"]
    assert all(g["ok"] for g in graphs)
    kinds = {(g["graph"], g["features"]) for g in graphs}
    assert kinds == {("fprop", STATS), ("fprop", PROLOGUE | STATS), ("wgrad", 0), ("wgrad", PROLOGUE),
                     ("dgrad", 0), ("fprop", BIAS | RELU), ("fprop", BIAS | RESIDUAL | RELU), ("fprop", BIAS)}
    projections = [g for g in graphs if g["unit"].endswith("projection")]
    assert {(g["graph"], g["features"]) for g in projections} == {("fprop", STATS), ("wgrad", 0), ("fprop", BIAS)}


@requires_frontend
def test_engine_check_reports_unreadable_device_properties():
    why = _ops().fusion_support("{}", "fprop", STATS, [2, 64, 8, 8], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1],
                                torch.bfloat16)
    assert why.startswith("device properties:"), why


DEVICE_PROPERTIES = sorted(glob.glob(os.path.join(ROOT, "bench", "results", "*", "cudnn_device.json")))


@requires_frontend
@pytest.mark.skipif(not DEVICE_PROPERTIES, reason="no GPU's cuDNN device properties committed yet "
                    "(bench/gpu_suite.sh quick writes them into env.json)")
@pytest.mark.parametrize("path", DEVICE_PROPERTIES, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_every_resnet50_graph_has_an_engine_on_the_measured_gpus(path, tmp_path):
    """From a GPU's device properties, cuDNN's heuristics and plan build on this machine: every ResNet-50 bf16
    graph has an engine on that GPU (a graph without one runs unfused there: slower, never wrong)."""
    out = tmp_path / "engines.json"
    rc = _cudnn_check().main(["--model", "resnet50", "--device-properties", path, "--json", str(out)])
    bad = [g for g in json.loads(out.read_text())["graphs"] if not g["ok"]]
    assert rc == 0 and not bad, bad


def _describe(graph, features, x=(2, 64, 8, 6), w=(32, 64, 3, 3), stride=(2, 1), padding=(1, 0)):
    why, text = _ops().fusion_validate(graph, features, list(x), list(w), list(stride), list(padding), [1, 1],
                                       torch.bfloat16)
    assert why == "", why
    d = json.loads(text)
    tensors = {t["name"]: t for t in d["tensors"]}
    return [(n["tag"], n.get("mode")) for n in d["nodes"]], d["nodes"], tensors


@requires_frontend
@pytest.mark.parametrize("graph,features,chain", [
    ("fprop", PROLOGUE | STATS, [("POINTWISE", "MUL"), ("POINTWISE", "ADD"), ("POINTWISE", "RELU_FWD"),
                                 ("CONV_FPROP", None), ("GENSTATS", None)]),
    ("fprop", STATS, [("CONV_FPROP", None), ("GENSTATS", None)]),
    ("fprop", BIAS | RESIDUAL | RELU, [("CONV_FPROP", None), ("POINTWISE", "ADD"), ("POINTWISE", "ADD"),
                                       ("POINTWISE", "RELU_FWD")]),
    ("fprop", BIAS, [("CONV_FPROP", None), ("POINTWISE", "ADD")]),
    ("dgrad", 0, [("CONV_DGRAD", None), ("POINTWISE", "SUB"), ("POINTWISE", "MUL"), ("POINTWISE", "MUL"),
                  ("POINTWISE", "ADD"), ("POINTWISE", "RELU_BWD"), ("DBN_WEIGHT", None)]),
    ("wgrad", PROLOGUE, [("POINTWISE", "MUL"), ("POINTWISE", "ADD"), ("POINTWISE", "RELU_FWD"),
                         ("CONV_WGRAD", None)]),
], ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else "")
def test_graph_descriptions_are_the_computation_they_stand_for(graph, features, chain):
    """The described nodes, in order, with the conv's geometry, NHWC operands and fp32 per-channel vectors."""
    nodes, raw, tensors = _describe(graph, features)
    assert nodes == chain
    conv = next(n for n in raw if n["tag"].startswith("CONV"))
    assert conv["stride"] == [2, 1] and conv["pre_padding"] == [1, 0] and conv["post_padding"] == [1, 0]
    assert conv["math_mode"] == "CROSS_CORRELATION"  # torch's conv
    x = "a" if graph == "dgrad" else "x"
    assert tensors[x]["dim"] == [2, 64, 8, 6] and tensors[x]["stride"] == [8 * 6 * 64, 1, 6 * 64, 64]
    assert tensors[x]["data_type"] == "BFLOAT16"
    if graph != "wgrad":  # wgrad's filter is its output
        assert tensors["w"]["dim"] == [32, 64, 3, 3] and tensors["w"]["stride"] == [64 * 9, 1, 3 * 64, 64]
    prologue = {"scale", "shift"} if features & PROLOGUE else set()
    vectors = {"fprop": prologue | ({"bias"} if features & BIAS else set()),
               "dgrad": {"mean", "rstd", "gamma", "beta"}, "wgrad": prologue}[graph]
    assert vectors <= set(tensors)
    for name in vectors:
        channels = 32 if name == "bias" else 64
        assert tensors[name]["data_type"] == "FLOAT" and tensors[name]["dim"] == [1, channels, 1, 1]
    by_uid = {t["uid"]: t for t in tensors.values()}
    for n in raw:  # a ReLU's output is in the activations' dtype: the prologue's as the unfused path stores r
        if n.get("mode") == "RELU_FWD":
            assert by_uid[n["outputs"]["OUT_0"]]["data_type"] == "BFLOAT16"
    if features & STATS:  # the sums leave the graph in fp32, one per output channel
        sums = [t for t in tensors.values() if t["name"].endswith("sum_output")]
        assert [(t["data_type"], t["dim"]) for t in sums] == [("FLOAT", [1, 32, 1, 1])] * 2


@requires_frontend
def test_validation_rejects_a_malformed_graph():
    """The check can fail: cudnn-frontend refuses a filter with more than INT32_MAX elements."""
    why, _ = _ops().fusion_validate("fprop", STATS, [1, 65536, 1, 1], [32768, 65536, 1, 1], [1, 1], [0, 0], [1, 1],
                                    torch.bfloat16)
    assert "INT32_MAX" in why


def test_validation_of_an_unknown_graph_is_refused():
    with pytest.raises(ValueError, match="unknown fusion graph 'conv'"):
        _ops().fusion_validate("conv", 0, [2, 64, 8, 8], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], torch.bfloat16)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        _ops().fusion_validate("fprop", 0, [2, 64, 8], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], torch.bfloat16)


def test_graph_keys_tell_every_input_apart():
    base = ("fprop+prologue+stats", [256, 64, 56, 56], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], torch.bfloat16, 0)
    key = _ops().fusion_key(*base)
    assert key == _ops().fusion_key(*base)
    variants = [("fprop+stats",), ([128, 64, 56, 56],), ([64, 64, 1, 1],), ([2, 2],), ([0, 0],), ([2, 2],),
                (torch.float16,), (1,)]
    positions = [0, 1, 2, 3, 4, 5, 6, 7]
    keys = {key}
    for pos, (value,) in zip(positions, variants):
        args = list(base)
        args[pos] = value
        keys.add(_ops().fusion_key(*args))
    assert len(keys) == 1 + len(variants)


# --------------------------------------------------------------------------------------------- which units may fuse
def _spec(**unit):
    return BlockSpec((UnitSpec(padding=(1, 1), **unit), UnitSpec(padding=(1, 1))), Shortcut.IDENTITY)


def _plan(spec, dtype, device="cpu"):
    x = torch.zeros(2, 16, 8, 8, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(16, 16, 3, 3, dtype=dtype, device=device)
    return cuda.fusion_plan(spec, x, [w, w])


def test_the_plan_says_why_a_unit_cannot_fuse():
    if not BUILT:
        assert all(why.startswith("cudnn fusion not built") for why in _plan(_spec(), torch.bfloat16))
        return
    assert _plan(_spec(), torch.float32)[0].startswith("dtype float32")
    assert _plan(_spec(groups=2), torch.bfloat16)[0] == "grouped convolution"
    assert _plan(_spec(sync_group=1), torch.bfloat16)[0].startswith("synchronised BatchNorm")
    previous = _ops().fusion_set_cpu_probe(False)
    try:
        assert _plan(_spec(), torch.bfloat16) == ("tensors on cpu (cuDNN runs on CUDA tensors)",) * 2
        _ops().fusion_set_cpu_probe(True)  # the tests' CPU mode: CPU tensors try the graphs
        assert _plan(_spec(), torch.bfloat16) == ("", "")
    finally:
        _ops().fusion_set_cpu_probe(previous)
    with cuda.fusion_switched(False):
        assert all(why.startswith("cudnn fusion switched off") for why in _plan(_spec(), torch.bfloat16))
    if GPU:
        assert _plan(_spec(), torch.bfloat16, "cuda") == ("", "")


def test_switch_and_refusal_knobs():
    before = cuda.fusion_enabled()
    with cuda.fusion_switched(not before):
        assert cuda.fusion_enabled() is (not before)
    assert cuda.fusion_enabled() is before
    with pytest.raises(ValueError, match="unknown fusion graph"):
        _ops().fusion_set_refused("fwd", True)
    _ops().fusion_reset()
    assert cuda.fusion_status()["tallies"] == {} and cuda.fusion_status()["unsupported"] == {}


def test_bench_measures_the_unfused_path_beside_the_fused_one():
    assert benchmark.provider_backend(benchmark.UNFUSED) == "cuda"
    assert benchmark.provider_backend("triton") == "triton"
    if extension.load() is not None:
        with benchmark.provider_context(benchmark.UNFUSED):
            assert not cuda.fusion_enabled()


# --------------------------------------------------------------------------------------------- statistics from sums
def _sums(a):
    """Σa and Σa² per channel in float32, as a conv epilogue accumulates them (naively, in order)."""
    af = a.float().permute(1, 0, 2, 3).reshape(a.shape[1], -1)
    return af.sum(1).contiguous(), (af * af).sum(1).contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_from_sums_are_exact_where_the_sums_cancel(dtype):
    """Channels 0..3: |mean| / std = 0, 2, 1000, 10000 (var from Σa² − M·mean² is noise at the last two); channel
    4 constant. Every channel's mean and var against float64 of the same values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 5, 6, 7, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0.0, 2.0, 1000.0, 10000.0, 3.0], dtype=torch.float64).view(1, 5, 1, 1)
    scales = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64).view(1, 5, 1, 1)
    a = (base * scales + offsets).to(dtype).contiguous(memory_format=torch.channels_last)
    gamma, beta = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    mean, var, s, t = _ops().bn_stats_from_sums(a, *_sums(a), gamma, beta, 1e-5)
    a64 = a.double()
    ref_var, ref_mean = torch.var_mean(a64, dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-9)
    ref_s = gamma.double() / torch.sqrt(ref_var + 1e-5)
    torch.testing.assert_close(s.double(), ref_s, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(t.double(), beta.double() - ref_mean * ref_s, rtol=1e-5, atol=1e-3)


def test_statistics_from_sums_use_the_sums_where_they_are_well_conditioned():
    """A well-conditioned channel takes its statistics from the sums it is given (no second pass over a), so
    changing the sums changes the result; the exact recompute is for the flagged channels only."""
    a = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    total, sq = _sums(a)
    ones, zeros = torch.ones(3), torch.zeros(3)
    shifted = total + a[:, 0].numel() * 0.5  # the sums of a + 0.5 in channel 0..2, a itself unchanged
    sq_shifted = sq + 2 * 0.5 * total + a[:, 0].numel() * 0.25
    mean, var, _, _ = _ops().bn_stats_from_sums(a, shifted, sq_shifted, ones, zeros, 1e-5)
    ref_var, ref_mean = torch.var_mean(a.double(), dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), ref_mean + 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5)


def test_statistics_from_sums_reject_bad_arguments_and_handle_an_empty_batch():
    a = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    ones = torch.ones(4)
    with pytest.raises(RuntimeError, match="bn_stats_from_sums: expected sum as a contiguous float32 \\[4\\]"):
        _ops().bn_stats_from_sums(a, ones.double(), ones, ones, ones, 1e-5)
    with pytest.raises(RuntimeError, match="bn_stats_from_sums: expected sq_sum"):
        _ops().bn_stats_from_sums(a, ones, torch.ones(3), ones, ones, 1e-5)
    empty = torch.empty(0, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    mean, var, s, t = _ops().bn_stats_from_sums(empty, ones, ones, ones, ones, 1e-5)
    assert torch.isnan(mean).all() and torch.isnan(var).all()


# --------------------------------------------------------------------------------------------- eval, BN folded
def _eval_op_args(name, dtype):
    """(x, spec, weights, gammas, betas, running_means, running_vars) of a torchvision block in eval mode."""
    tv = testing.randomize_batchnorm(_blocks()[name], torch.Generator().manual_seed(9)).eval().to(dtype)
    units = [(tv.conv1, tv.bn1), (tv.conv2, tv.bn2)] + ([(tv.conv3, tv.bn3)] if hasattr(tv, "conv3") else [])
    shortcut = Shortcut.IDENTITY
    if tv.downsample is not None:
        units.append((tv.downsample[0], tv.downsample[1]))
        shortcut = Shortcut.PROJECTION
    spec = from_modules([c for c, _ in units], [b for _, b in units], shortcut)
    x = _input(name).to(dtype).contiguous(memory_format=torch.channels_last)
    return tv, x, spec, [[getattr(b if k else c, a) for c, b in units] for k, a in
                         ((0, "weight"), (1, "weight"), (1, "bias"), (1, "running_mean"), (1, "running_var"))]


@pytest.mark.parametrize("name", ["basic", "bottleneck-projection"])
def test_eval_with_folded_weights_matches_eval_with_running_statistics(name):
    """block_inference_folded (W·s from the shared fold cache, one shift per unit) computes what block_inference
    computes from the running statistics: to float32 rounding in float32, within the rule in bfloat16."""
    from fused_resnet.backends import folding

    for dtype in (torch.float32, torch.bfloat16):
        tv, x, spec, (ws, gs, bs, rms, rvs) = _eval_op_args(name, dtype)
        folded = [folding.fold_bn(w, g, b, rm, rv, u.eps) for w, g, b, rm, rv, u in zip(ws, gs, bs, rms, rvs,
                                                                                         spec.units)]
        with torch.no_grad():
            y = _ops().block_inference_folded(x, [w for w, _ in folded], [t for _, t in folded], None, spec.ints,
                                              spec.floats)
            y_bn = _ops().block_inference(x, ws, gs, bs, rms, rvs, None, spec.ints, spec.floats)
            if dtype == torch.float32:
                torch.testing.assert_close(y, y_bn, rtol=1e-5, atol=1e-5)
                continue
            oracle = copy.deepcopy(tv).double()
            ref = oracle(x.double())
            c = testing.check("folded eval", y, ref, tv(x), ref, dtype)
            assert c.ok, c.row()


def test_eval_with_folded_weights_checks_its_shifts():
    _, x, spec, (ws, *_rest) = _eval_op_args("basic", torch.float32)
    with pytest.raises(RuntimeError, match="block_inference_folded: expected shift 1 as a \\[64\\] vector"):
        _ops().block_inference_folded(x, ws, [torch.zeros(64), torch.zeros(3)], None, spec.ints, spec.floats)
    with pytest.raises(RuntimeError, match="one tensor per unit"):
        _ops().block_inference_folded(x, ws, [torch.zeros(64)], None, spec.ints, spec.floats)


# --------------------------------------------------------------------------------------------- fallback
ALL_LABELS = {"fprop+stats", "fprop+prologue+stats", "wgrad", "wgrad+prologue", "dgrad+drelu+dbn"}


@requires_frontend
@pytest.mark.skipif(GPU, reason="on a GPU the graphs build; the refusal test below covers the fallback there")
def test_without_an_engine_every_graph_falls_back_counted_with_the_same_numbers():
    """The tests' CPU mode asks for every graph on CPU tensors, where none can be built: every call must take the
    unfused path (the block still within the float64 rule, train and eval), be counted as a fallback, and leave
    the key's reason in fusion_status()."""
    _ops().fusion_reset()
    for name in ("bottleneck-projection", "basic"):  # the eval closing graph with a shortcut: the basic block's
        block = testing.randomize_batchnorm(_blocks()[name], torch.Generator().manual_seed(4))
        checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                        _input(name)[:2, :, :8, :8], torch.bfloat16, DEVICE, channels_last=True,
                                        train_steps=1)
        assert_checks(checks, f"{name} without an engine")
    status = cuda.fusion_status()
    eval_labels = {"fprop+bias+relu", "fprop+bias", "fprop+bias+residual+relu"}
    assert ALL_LABELS | eval_labels <= set(status["tallies"]), status["tallies"]
    assert all(fused == 0 and fallback > 0 for fused, fallback in status["tallies"].values()), status["tallies"]
    assert status["unsupported"] and all(why for why in status["unsupported"].values())


# --------------------------------------------------------------------------------------------- on a GPU
def _blocks():
    proj = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1, stride=2, bias=False), torch.nn.BatchNorm2d(128))
    return {"basic": torchvision.models.resnet.BasicBlock(64, 64),
            "bottleneck-projection": torchvision.models.resnet.Bottleneck(64, 32, stride=2, downsample=proj),
            "bottleneck": torchvision.models.resnet.Bottleneck(128, 32)}


def _input(name, offset=0.0):
    c = 128 if name == "bottleneck" else 64
    return torch.randn(4, c, 16, 16, generator=torch.Generator().manual_seed(5)) + offset


def _tallies():
    return cuda.fusion_status()["tallies"]


@requires_gpu
@requires_frontend
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["basic", "bottleneck-projection", "bottleneck"])
def test_fused_graphs_train_and_eval_a_block_within_the_rule(name, dtype):
    """Training (two passes) and eval against float64, and every graph kind ran fused, none fell back."""
    _ops().fusion_reset()
    block = testing.randomize_batchnorm(_blocks()[name], torch.Generator().manual_seed(2))
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                    _input(name), testing.DTYPES[dtype], DEVICE, channels_last=True, train_steps=2)
    assert_checks(checks, f"{name} {dtype}")
    tallies = _tallies()
    assert cuda.fusion_status()["unsupported"] == {}
    for label in ("fprop+prologue+stats", "fprop+stats", "dgrad+drelu+dbn", "wgrad+prologue", "wgrad",
                  "fprop+bias+relu", "fprop+bias+residual+relu"):
        assert tallies.get(label, (0, 0))[0] > 0, (label, tallies)
    assert all(fallback == 0 for _, fallback in tallies.values()), tallies


@requires_gpu
@requires_frontend
def test_a_channel_whose_mean_dwarfs_its_spread_keeps_exact_statistics():
    """The block input offset by 300: the first conv's outputs have |mean| ≫ std, where Σx² − M·mean² cancels in
    fp32; the flagged channels are recomputed and the block stays within the rule, running statistics too."""
    block = testing.randomize_batchnorm(_blocks()["basic"], torch.Generator().manual_seed(3))
    with torch.no_grad():
        block.conv1.weight.abs_()  # every output channel sums the offset with one sign: a large mean
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                    _input("basic", offset=300.0), torch.bfloat16, DEVICE, channels_last=True,
                                    train_steps=2)
    assert_checks(checks, "offset input")


@requires_gpu
@requires_frontend
@pytest.mark.parametrize("graph", ["fprop", "dgrad", "wgrad"])
def test_a_graph_without_an_engine_falls_back_counted_with_the_same_numbers(graph):
    """As if cuDNN had no engine for one graph kind: its calls run the unfused path, are counted as fallbacks,
    and the block still matches float64."""
    _ops().fusion_reset()
    _ops().fusion_set_refused(graph, True)
    try:
        block = testing.randomize_batchnorm(_blocks()["bottleneck-projection"], torch.Generator().manual_seed(4))
        checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                        _input("bottleneck-projection"), torch.bfloat16, DEVICE,
                                        channels_last=True, train_steps=1)
    finally:
        _ops().fusion_set_refused(graph, False)
    assert_checks(checks, f"{graph} refused")
    refused = {label: t for label, t in _tallies().items() if label.startswith(graph)}
    assert refused and all(fused == 0 and fallback > 0 for fused, fallback in refused.values()), _tallies()


@requires_gpu
@requires_frontend
def test_fused_and_unfused_paths_agree_closely():
    """The same block and input with the graphs on and off: outputs and gradients agree to bf16 rounding."""
    block = testing.randomize_batchnorm(_blocks()["bottleneck"], torch.Generator().manual_seed(6))
    fused = fused_resnet.convert(copy.deepcopy(block), backend="cuda").cuda().to(
        memory_format=torch.channels_last)
    x = _input("bottleneck").cuda().to(memory_format=torch.channels_last).requires_grad_(True)
    results = []
    for on in (True, False):
        model = copy.deepcopy(fused)
        with cuda.fusion_switched(on), torch.autocast("cuda", torch.bfloat16):
            y = model(x)
            (gx,) = torch.autograd.grad(y.float().square().sum(), x)
        results.append((y.float(), gx.float()))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g1, g2, rtol=5e-2, atol=5e-2 * g2.abs().max().item())

