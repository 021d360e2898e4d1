"""Backend "cuda": its cuDNN fusion graphs (csrc/cudnn_fusion.cpp) and the statistics from their sums.

On the CPU:
- cuDNN itself, asked deviceless for the H100 and H200 (bench/cudnn_check.py): every graph the block ops build for
  ResNet-50 and ResNet-18, bfloat16 and float16, training and eval, has an engine on sm_90;
- each graph kind's description node by node; keys; which units may use the graphs and why not;
- the graphs' CPU twins (the tests' CPU mode): the fused paths of the block ops — the dgrad's sums handed to the unit
  below, statistics from sums, dBN-apply on masked gradients, the wgrad reading the dgrad's relu output, the eval
  graphs — run in CI against float64; the graphs the blocks ask for are the list the warm-up and the checks use;
- fallbacks (no engine, a failed execution), the bounded plan cache, build times, determinism, the capture check.
On a GPU (bench/gpu_suite.sh): the real graphs against float64, that they ran, NaN-poisoned memory, a channel whose
|mean| ≫ std, a captured step after warm_up, and the refusal of a capture that would build a plan.
"""
import copy
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

import fused_resnet
from fused_resnet import functional, testing
from fused_resnet.backends import build, extension
from fused_resnet.backends.cuda import fusion
from fused_resnet.spec import BlockSpec, Shortcut, UnitSpec, from_modules

from conftest import GPU, assert_checks, requires_gpu

pytestmark = pytest.mark.skipif(extension.load() is None, reason=f"extension not built: {extension.status()['reason']}")

BUILT = extension.load() is not None and fusion.built()
requires_frontend = pytest.mark.skipif(not BUILT, reason="extension built without cudnn-frontend's headers")
DEVICE = torch.device("cuda" if GPU else "cpu")
PROLOGUE, STATS, BIAS, RESIDUAL, RELU = fusion.PROLOGUE, fusion.STATS, fusion.BIAS, fusion.RESIDUAL, fusion.RELU
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LABELS_TRAIN = {"fprop+stats", "fprop+prologue+stats", "wgrad", "dgrad+drelu+dbn"}
LABELS_EVAL = {"fprop+bias+relu", "fprop+bias", "fprop+bias+residual+relu"}


def _ops():
    return torch.ops.fused_resnet_C


@pytest.fixture(autouse=True)
def _fresh_graphs():
    """Each test starts with no graph built and no tally (the cache is process-wide)."""
    if extension.load() is not None:
        fusion.reset()
    yield
    if extension.load() is not None:
        for graph in ("fprop", "dgrad", "wgrad"):
            fusion.set_refused(graph, "")


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
    line = fusion.line()
    assert line.startswith(f"built (cudnn-frontend {_header_version(include)}, cuDNN ") and line.endswith(")"), line


def test_info_command_prints_the_fusion_line(capsys):
    from fused_resnet.tools import cli

    assert cli.main(["info"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cudnn fusion")]
    assert lines == [f"cudnn fusion   {fusion.line()}"]


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


# --------------------------------------------------------------------------------------------- cuDNN, deviceless
def _cudnn_check(*args, timeout=600):
    """bench/cudnn_check.py in its own process (it may load the driver stand-in, which must not meet this
    process's CUDA runtime): (exit status, its --json)."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cudnn_check_{os.getpid()}_{abs(hash(args))}.json")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cudnn_check.py"), *args, "--json", out],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return proc.returncode, result, proc.stdout + proc.stderr


DEVICE_PROPERTIES = sorted(os.listdir(os.path.join(ROOT, "bench", "cudnn_devices")))


def test_the_committed_device_properties_are_sm90_gpus():
    assert {"h100_sxm.json", "h200.json"} <= set(DEVICE_PROPERTIES)
    for name in ("h100_sxm.json", "h200.json"):
        props = json.load(open(os.path.join(ROOT, "bench", "cudnn_devices", name)))
        assert props["deviceVer"] == 900 and props["multiProcessorCount"] == 132, name


@requires_frontend
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_every_graph_of_a_resnet_has_an_engine_on_sm90(arch, dtype):
    """cuDNN's own answer for the H100 and the H200, asked on this machine: every graph backend cuda builds for
    the model (every block and the stem, training forward + backward and eval) has an engine configuration that
    passes cuDNN's support check on sm_90; where the engine is precompiled its plan is built here. A graph kind
    that lost its engine (a cuDNN or cudnn-frontend upgrade, a new graph form) fails this test."""
    rc, result, log = _cudnn_check("--model", arch, "--dtype", dtype)
    assert rc == 0, log
    for device, rows in result["devices"].items():
        assert rows and all(g["verdict"] in ("plan", "runtime") for g in rows), (device, log)
        kinds = {g["key"].split(" ")[0] for g in rows}
        assert kinds == LABELS_TRAIN | LABELS_EVAL, kinds
        wgrads = [g for g in rows if g["key"].startswith("wgrad ")]
        assert wgrads and all(g["verdict"] == "plan" for g in wgrads)  # precompiled: plans built deviceless
        trained_units = {u for g in rows if g["mode"] == "train" for u in g["units"]}
        assert "<root>.conv1" in trained_units and any(u.endswith("downsample.0") for u in trained_units)


@requires_frontend
def test_runtime_compiled_graphs_compile_for_sm90():
    """Each runtime-compiled kind is compiled with NVRTC for sm_90 here: the build stops only at loading the
    module, for want of a GPU."""
    rc, result, log = _cudnn_check("--model", "resnet18", "--device-properties",
                                   os.path.join(ROOT, "bench", "cudnn_devices", "h100_sxm.json"), "--compile")
    assert rc == 0, log
    rows = result["devices"]["h100_sxm"]
    compiled = {g["key"].split(" ")[0] for g in rows if "compiled; loading it needs the GPU" in g["detail"]}
    assert compiled == (LABELS_TRAIN | LABELS_EVAL) - {"wgrad"}, compiled


@requires_frontend
def test_deterministic_mode_has_an_engine_for_every_graph():
    """Under torch.use_deterministic_algorithms(True) the graphs are deterministic (reductions and engines): cuDNN
    has no fprop engine with deterministic reductions on sm_90, so a training unit's fprop graph carries the
    prologue only and the extension's fixed-order kernel reduces its statistics; every graph has an engine."""
    rc, result, log = _cudnn_check("--model", "resnet18", "--deterministic", "--device-properties",
                                   os.path.join(ROOT, "bench", "cudnn_devices", "h100_sxm.json"))
    assert rc == 0, log
    rows = result["devices"]["h100_sxm"]
    assert all(g["key"].endswith(" deterministic") for g in rows)
    kinds = {g["key"].split(" ")[0] for g in rows}
    assert kinds == {"fprop", "fprop+prologue", "dgrad+drelu+dbn", "wgrad"} | LABELS_EVAL, kinds


@requires_frontend
@pytest.mark.skipif(GPU, reason="a GPU machine has a driver library: the stand-in is never loaded there")
def test_without_a_driver_library_the_check_says_it_cannot_answer():
    """Without the driver stand-in cuDNN does not consider its runtime-compiled engines here: those graphs read
    'unknown' (this environment cannot answer), not 'none' (cuDNN has no engine), and the check fails."""
    rc, result, _ = _cudnn_check("--model", "resnet18", "--modes", "eval", "--driver-shim", "off",
                                 "--device-properties", os.path.join(ROOT, "bench", "cudnn_devices", "h200.json"))
    rows = result["devices"]["h200"]
    assert rc == 1 and {g["verdict"] for g in rows} == {"unknown"}
    assert all("no CUDA driver library" in g["detail"] for g in rows)


@requires_frontend
def test_the_engine_check_reports_what_it_cannot_read():
    args = ("fprop", STATS, [2, 64, 8, 8], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], torch.bfloat16, False, False)
    verdict, detail = _ops().fusion_support("{}", *args)
    assert verdict == "error" and detail.startswith("device properties: no deviceVer"), detail
    props = open(os.path.join(ROOT, "bench", "cudnn_devices", "h100_sxm.json")).read()
    bad = json.loads(props)
    del bad["warpSize"]
    verdict, detail = _ops().fusion_support(json.dumps(bad), *args)
    assert verdict == "error" and detail.startswith("device properties") and "HasMember" in detail, detail
    verdict, detail = _ops().fusion_support(props, "fprop", STATS | RELU, *args[2:])
    assert verdict == "error" and "statistics writes the plain conv output" in detail, detail


# --------------------------------------------------------------------------------------------- descriptions
def _describe(graph, features, x=(2, 64, 8, 6), w=(32, 64, 3, 3), stride=(2, 1), padding=(1, 0)):
    why, text = _ops().fusion_validate(graph, features, list(x), list(w), list(stride), list(padding), [1, 1],
                                       torch.bfloat16)
    assert why == "", why
    d = json.loads(text)
    return [(n["tag"], n.get("mode")) for n in d["nodes"]], d["nodes"], d["tensors"]


@requires_frontend
@pytest.mark.parametrize("graph,features,chain", [
    ("fprop", PROLOGUE | STATS, [("POINTWISE", "MUL"), ("POINTWISE", "ADD"), ("POINTWISE", "RELU_FWD"),
                                 ("CONV_FPROP", None), ("REDUCTION", "ADD"), ("POINTWISE", "MUL"),
                                 ("REDUCTION", "ADD")]),
    ("fprop", STATS, [("CONV_FPROP", None), ("REDUCTION", "ADD"), ("POINTWISE", "MUL"), ("REDUCTION", "ADD")]),
    ("fprop", BIAS | RESIDUAL | RELU, [("CONV_FPROP", None), ("POINTWISE", "ADD"), ("POINTWISE", "ADD"),
                                       ("POINTWISE", "RELU_FWD")]),
    ("fprop", BIAS, [("CONV_FPROP", None), ("POINTWISE", "ADD")]),
    ("dgrad", 0, [("CONV_DGRAD", None), ("POINTWISE", "MUL"), ("POINTWISE", "ADD"), ("POINTWISE", "RELU_BWD"),
                  ("POINTWISE", "RELU_FWD"), ("POINTWISE", "SUB"), ("POINTWISE", "MUL"), ("REDUCTION", "ADD"),
                  ("POINTWISE", "MUL"), ("REDUCTION", "ADD")]),
    ("wgrad", 0, [("CONV_WGRAD", None)]),
], ids=lambda v: v if isinstance(v, str) else str(v) if isinstance(v, int) else "")
def test_graph_descriptions_are_the_computation_they_stand_for(graph, features, chain):
    """The described nodes, in order, with the conv's geometry, NHWC operands and fp32 per-channel vectors."""
    nodes, raw, listed = _describe(graph, features)
    tensors = {t["name"]: t for t in listed}
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
               "dgrad": {"scale", "shift", "mean", "rstd"}, "wgrad": set()}[graph]
    assert vectors <= set(tensors)
    for name in vectors:
        channels = 32 if name == "bias" else 64
        assert tensors[name]["data_type"] == "FLOAT" and tensors[name]["dim"] == [1, channels, 1, 1]
    by_uid = {t["uid"]: t for t in listed}
    for n in raw:  # a ReLU's output is in the activations' dtype: the prologue's as the unfused path stores r
        if n.get("mode") == "RELU_FWD" and not features & BIAS:
            assert by_uid[n["outputs"]["OUT_0"]]["data_type"] == "BFLOAT16"
        if n["tag"] == "REDUCTION":  # the sums leave the graph in fp32, one per channel, accumulated in fp32
            out = by_uid[n["outputs"]["Y"]]
            assert out["data_type"] == "FLOAT" and out["dim"] == [1, 64 if graph == "dgrad" else 32, 1, 1]
            assert n["compute_data_type"] == "FLOAT" and n["is_deterministic"] is False


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
    with pytest.raises(ValueError, match="expected at = '' \\(none\\), 'build' or 'execute'"):
        fusion.set_refused("fprop", "sometimes")


def test_graph_keys_tell_every_input_apart():
    base = ("fprop", PROLOGUE | STATS, [256, 64, 56, 56], [64, 64, 3, 3], [1, 1], [1, 1], [1, 1], torch.bfloat16,
            "cuda:0", False)
    key = _ops().fusion_key(*base)
    assert key == _ops().fusion_key(*base) and key.startswith("fprop+prologue+stats BFloat16 ")
    variants = [(0, "wgrad"), (1, STATS), (2, [128, 64, 56, 56]), (3, [64, 64, 1, 1]), (4, [2, 2]), (5, [0, 0]),
                (6, [2, 2]), (7, torch.float16), (8, "cuda:1"), (9, True)]
    keys = {key}
    for pos, value in variants:
        args = list(base)
        args[pos] = value
        keys.add(_ops().fusion_key(*args))
    assert len(keys) == 1 + len(variants)


# --------------------------------------------------------------------------------------------- which units may fuse
def _spec(**unit):
    return BlockSpec((UnitSpec(padding=(1, 1), **unit), UnitSpec(padding=(1, 1))), Shortcut.IDENTITY)


def _plan(spec, dtype, device="cpu", graphs=True):
    x = torch.zeros(2, 16, 8, 8, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(16, 16, 3, 3, dtype=dtype, device=device)
    return fusion.plan(spec, x, [w, w], graphs)


def test_the_plan_says_why_a_unit_cannot_fuse():
    if not BUILT:
        assert all(why.startswith("cudnn fusion not built") for why in _plan(_spec(), torch.bfloat16))
        return
    assert _plan(_spec(), torch.float32)[0].startswith("dtype float32")
    assert _plan(_spec(groups=2), torch.bfloat16)[0] == "grouped convolution"
    assert _plan(_spec(sync_group=1), torch.bfloat16)[0].startswith("synchronised BatchNorm")
    assert _plan(_spec(), torch.bfloat16, graphs=False) == ("cuDNN fusion graphs off (backend cuda-unfused)",) * 2
    previous = fusion.set_cpu_twins(False)
    try:
        assert _plan(_spec(), torch.bfloat16) == ("tensors on cpu (cuDNN runs on CUDA tensors)",) * 2
        fusion.set_cpu_twins(True)  # the tests' CPU mode: CPU tensors run the graphs' twins
        assert _plan(_spec(), torch.bfloat16) == ("", "")
    finally:
        fusion.set_cpu_twins(previous)
    if GPU:
        assert _plan(_spec(), torch.bfloat16, "cuda") == ("", "")


def test_cuda_unfused_is_a_backend_of_its_own():
    """The unfused path is a registered backend (the graphs off per call), not a process-wide switch."""
    from fused_resnet import backends
    from fused_resnet.tools import benchmark

    assert "cuda-unfused" in backends.names() and backends.get("cuda-unfused").auto_rank is None
    assert not hasattr(_ops(), "fusion_set_enabled") and not hasattr(benchmark, "provider_context")


# --------------------------------------------------------------------------------------------- the blocks' graphs
def _blocks():
    proj = torch.nn.Sequential(torch.nn.Conv2d(64, 128, 1, stride=2, bias=False), torch.nn.BatchNorm2d(128))
    return {"basic": torchvision.models.resnet.BasicBlock(64, 64),
            "bottleneck-projection": torchvision.models.resnet.Bottleneck(64, 32, stride=2, downsample=proj),
            "bottleneck": torchvision.models.resnet.Bottleneck(128, 32)}


def _input(name, offset=0.0, size=16):
    c = 128 if name == "bottleneck" else 64
    return torch.randn(4, c, size, size, generator=torch.Generator().manual_seed(5)) + offset


def _size():
    return 16 if GPU else 8  # the CPU twins run ATen convolutions in fp32: small images keep CI quick


def _tallies():
    return fusion.status()["tallies"]


@requires_frontend
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["basic", "bottleneck-projection", "bottleneck"])
def test_fused_graphs_train_and_eval_a_block_within_the_rule(name, dtype):
    """Training (two passes) and eval against float64 with every unit on its graphs, none falling back. On the CPU
    the graphs are their twins: the dgrad's sums and relu output, statistics from sums and the eval graphs run
    through the block ops' fused paths."""
    block = testing.randomize_batchnorm(_blocks()[name], torch.Generator().manual_seed(2))
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                    _input(name, size=_size()), testing.DTYPES[dtype], DEVICE, channels_last=True,
                                    train_steps=2)
    assert_checks(checks, f"{name} {dtype}")
    status = fusion.status()
    assert status["unsupported"] == {}
    eval_labels = {"fprop+bias+relu", "fprop+bias+residual+relu"} | ({"fprop+bias"} if "projection" in name else set())
    for label in LABELS_TRAIN | eval_labels:
        assert status["tallies"].get(label, {}).get("fused", 0) > 0, (label, status["tallies"])
    assert all(t["fallback"] == 0 and t["built"] > 0 and t["build_ms"] >= 0 for t in status["tallies"].values())


@requires_frontend
@pytest.mark.parametrize("name", ["basic", "bottleneck-projection"])
def test_the_blocks_ask_for_the_graphs_that_requests_lists(name):
    """fusion.requests (what warm_up builds, what a capture checks, what bench/cudnn_check.py asks cuDNN about) is
    what the block ops ask for: after one training step and one eval call every listed graph exists, and the
    blocks built no other."""
    model = fused_resnet.convert(_blocks()[name], backend="cuda").to(DEVICE, torch.bfloat16)
    x = _input(name, size=_size()).to(DEVICE, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    spec, weights = model.block_spec(), [c.weight for c in model._structure()[0]]
    listed = fusion.requests(spec, x, weights, train=True) + fusion.requests(spec, x, weights, train=False)
    assert fusion.capture_refusal(spec, x, weights, train=True) is not None
    model(x.requires_grad_(True)).float().sum().backward()
    with torch.no_grad():
        model.eval()(x)
    for train in (True, False):
        assert fusion.capture_refusal(spec, x, weights, train) is None
    built = sum(t["built"] for t in _tallies().values())
    assert built == len({r.key for r in listed}), (built, listed)


@requires_frontend
def test_warm_up_builds_every_plan_and_the_report_shows_each_units_route():
    model = fused_resnet.convert(torchvision.models.resnet18(num_classes=10), backend="cuda").to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.autocast(DEVICE.type, torch.bfloat16):
        before = fused_resnet.conversion_report(model, x)
        assert fused_resnet.warm_up(model, x) == []
        after = fused_resnet.conversion_report(model, x)
    assert "plan not built yet" in before and "plan not built yet" not in after
    route = "cuDNN graph" if GPU else "the cuDNN graph's CPU twin"
    assert f"conv2: fprop+prologue+stats: {route}; dgrad+drelu+dbn: {route}; wgrad: {route}" in after
    assert f"downsample.0: fprop+stats: {route}; wgrad: {route}" in after
    assert sum(t["built"] for t in _tallies().values()) > 0
    assert all(t["fused"] == 0 for t in _tallies().values())  # built, nothing run yet
    fusion.set_refused("dgrad", "build")
    fusion.reset()
    with torch.autocast(DEVICE.type, torch.bfloat16):
        problems = fused_resnet.warm_up(model, x)
        report = fused_resnet.conversion_report(model, x, train=False)
    assert problems == []  # refusals are per call, as cuDNN's answer is: a warm-up builds what it can
    assert "dgrad" not in report and "fprop+bias+relu" in report  # eval's routes only
    with torch.autocast(DEVICE.type, torch.float16, enabled=False):
        assert "unfused (dtype float32" in fused_resnet.conversion_report(model, x)


@requires_frontend
@pytest.mark.parametrize("graph", ["fprop", "dgrad", "wgrad"])
@pytest.mark.parametrize("at", ["build", "execute"])
def test_a_graph_without_an_engine_falls_back_counted_with_the_same_numbers(graph, at):
    """As if cuDNN had no engine for one graph kind (at build), or its built graph failed to run (at execute):
    those calls run the unfused path, are counted as fallbacks, the key is remembered with why (a failed
    execution is not retried), and the block still matches float64."""
    fusion.set_refused(graph, at)
    block = testing.randomize_batchnorm(_blocks()["bottleneck-projection"], torch.Generator().manual_seed(4))
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                    _input("bottleneck-projection", size=_size()), torch.bfloat16, DEVICE,
                                    channels_last=True, train_steps=2)
    assert_checks(checks, f"{graph} refused at {at}")
    refused = {label: t for label, t in _tallies().items() if label.startswith(graph)}
    assert refused and all(t["fused"] == 0 and t["fallback"] > 0 for t in refused.values()), _tallies()
    others = {label: t for label, t in _tallies().items() if not label.startswith(graph)}
    assert all(t["fused"] > 0 for t in others.values()), _tallies()
    unsupported = fusion.status()["unsupported"]
    if at == "execute":
        assert unsupported and all(k.startswith(graph) and "executing the built graph failed" in why
                                   for k, why in unsupported.items())
        assert all(t["built"] == len([k for k in unsupported if k.startswith(label + " ")])
                   for label, t in refused.items())  # built once each, never rebuilt after failing
    else:
        assert unsupported == {}


@requires_frontend
def test_the_plan_cache_is_bounded_and_rebuilds_what_it_dropped():
    block = fused_resnet.convert(_blocks()["basic"], backend="cuda").to(DEVICE, torch.bfloat16)
    x = _input("basic", size=_size()).to(DEVICE, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    spec, weights = block.block_spec(), [block.conv1.weight, block.conv2.weight]
    n_keys = len({r.key for r in fusion.requests(spec, x, weights, train=True)})
    previous = fusion.set_capacity(2)
    try:
        with pytest.raises(ValueError, match="at least one key"):
            fusion.set_capacity(0)
        for _ in range(2):
            block(x.requires_grad_(True)).float().sum().backward()
        missing = _ops().fusion_missing(x, weights, spec.ints, spec.floats, True, True)
        assert len(missing) == n_keys - 2  # two kept, the rest dropped
        assert sum(t["built"] for t in _tallies().values()) == 2 * n_keys  # each step rebuilt every key
    finally:
        fusion.set_capacity(previous)


@requires_frontend
def test_deterministic_mode_keys_deterministic_plans():
    block = fused_resnet.convert(_blocks()["basic"], backend="cuda").to(DEVICE, torch.bfloat16)
    x = _input("basic", size=_size()).to(DEVICE, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    spec, weights = block.block_spec(), [block.conv1.weight, block.conv2.weight]
    plain = {r.key for r in fusion.requests(spec, x, weights, train=True)}
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        deterministic = {r.key for r in fusion.requests(spec, x, weights, train=True)}
        block(x.requires_grad_(True)).float().sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert all(k.endswith(" deterministic") for k in deterministic) and not plain & deterministic
    assert fusion.status()["unsupported"] == {} and all(t["fused"] > 0 for t in _tallies().values())
    assert set(_tallies()) == {"fprop", "fprop+prologue", "dgrad+drelu+dbn", "wgrad"}  # statistics: the kernel's


@requires_frontend
def test_a_capture_that_would_build_a_plan_is_refused_naming_the_block(monkeypatch):
    """Inside a CUDA graph capture no plan is built: a block whose plans are missing refuses with its name
    (simulated capture on the CPU); after warm_up it runs."""
    model = fused_resnet.convert(torchvision.models.resnet18(num_classes=10), backend="cuda").to(DEVICE,
                                                                                              torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, device=DEVICE, dtype=torch.bfloat16)
    monkeypatch.setattr(functional, "capturing", lambda t: True)
    with pytest.raises(RuntimeError, match=r"fused_resnet: ResNet stem: \d+ cuDNN fusion plan\(s\) for these shapes "
                                           r"are not built.*fused_resnet.warm_up\(model, x\)"):
        model(x)
    monkeypatch.setattr(functional, "capturing", lambda t: False)
    assert fused_resnet.warm_up(model, x) == []
    monkeypatch.setattr(functional, "capturing", lambda t: True)
    model(x).float().sum().backward()  # every plan exists: nothing is refused
    with pytest.raises(RuntimeError, match=r"fused_resnet: ResNet stem: "):  # a new shape: new plans
        model(torch.randn(2, 3, 48, 48, device=DEVICE, dtype=torch.bfloat16))
    assert fused_resnet.warm_up(model.layer2, torch.randn(2, 64, 8, 8, device=DEVICE, dtype=torch.bfloat16)) == []
    with pytest.raises(RuntimeError, match=r"fused_resnet: layer2\.0: "):  # a block reached with a new shape
        model.layer2(torch.randn(2, 64, 12, 12, device=DEVICE, dtype=torch.bfloat16))


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
                                              spec.floats, True)
            y_bn = _ops().block_inference(x, ws, gs, bs, rms, rvs, None, spec.ints, spec.floats, True)
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
        _ops().block_inference_folded(x, ws, [torch.zeros(64), torch.zeros(3)], None, spec.ints, spec.floats, True)
    with pytest.raises(RuntimeError, match="one tensor per unit"):
        _ops().block_inference_folded(x, ws, [torch.zeros(64)], None, spec.ints, spec.floats, True)


# --------------------------------------------------------------------------------------------- on a GPU
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
def test_the_graphs_write_every_output_element_over_nan_poisoned_memory():
    """The caching allocator's free memory filled with NaN before the graphs run: every statistic, gradient and
    output the graphs write is finite and within the rule (none is read from what the allocator handed out)."""
    poison = torch.full((1 << 28,), float("nan"), device="cuda")  # 1 GiB, freed into the cache
    del poison
    block = testing.randomize_batchnorm(_blocks()["bottleneck-projection"], torch.Generator().manual_seed(8))
    checks = testing.compare_models(block, lambda m: fused_resnet.convert(m, backend="cuda", inplace=True),
                                    _input("bottleneck-projection"), torch.bfloat16, DEVICE, channels_last=True,
                                    train_steps=2)
    assert_checks(checks, "over NaN-poisoned memory")
    assert all(t["fused"] > 0 and t["fallback"] == 0 for t in _tallies().values()), _tallies()


@requires_gpu
@requires_frontend
def test_a_captured_training_step_after_warm_up_and_a_capture_that_would_build_is_refused():
    model = fused_resnet.convert(torchvision.models.resnet18(num_classes=10), backend="cuda").cuda().to(
        memory_format=torch.channels_last)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    graph = torch.cuda.CUDAGraph()
    with torch.autocast("cuda", torch.bfloat16), pytest.raises(RuntimeError, match="not built"):
        with torch.cuda.graph(graph):
            model(x).float().sum().backward()
    fusion.reset()
    with torch.autocast("cuda", torch.bfloat16):
        assert fused_resnet.warm_up(model, x) == []
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # torch's recipe: a warm-up step on a side stream before capturing
            model(x).float().sum().backward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = model(x).float().sum()
            loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@requires_gpu
@requires_frontend
def test_fused_and_unfused_backends_agree_closely():
    """The same block and input on backend cuda and cuda-unfused: outputs and gradients agree to bf16 rounding."""
    block = testing.randomize_batchnorm(_blocks()["bottleneck"], torch.Generator().manual_seed(6))
    x = _input("bottleneck").cuda().to(memory_format=torch.channels_last).requires_grad_(True)
    results = []
    for backend in ("cuda", "cuda-unfused"):
        model = fused_resnet.convert(copy.deepcopy(block), backend=backend).cuda().to(
            memory_format=torch.channels_last)
        with torch.autocast("cuda", torch.bfloat16):
            y = model(x)
            (gx,) = torch.autograd.grad(y.float().square().sum(), x)
        results.append((y.float(), gx.float()))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(g1, g2, rtol=5e-2, atol=5e-2 * g2.abs().max().item())
