"""The benchmark scripts run end to end (a CPU smoke run under the interpreter: the numbers mean nothing, the code
paths, numerics checks and the results schema are what is checked), so a GPU session is not spent on a typo."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fused_resnet.tools import benchmark, cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = {"model", "mode", "provider", "dtype", "batch", "img_per_s", "peak_mem_gib", "first_step_s", "gpu", "torch",
          "triton", "cudnn", "date"}
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke runs; the GPU suite runs them for real")


def _run(script, *args, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1", FUSED_RESNET_EXT_ON_CPU="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_bench_conv_smoke(tmp_path):
    result = _run("bench_conv.py", "--model", "resnet18", "--batch", "1", "--size", "32", "--dtype", "float32",
                  "--limit", "2", "--passes", "fprop,wgrad", tmp_path=tmp_path)
    assert {r["provider"] for r in result["rows"]} == {"cudnn", "triton"}
    assert len(result["rows"]) == 2 * 2 * 2 and all(r["ok"] and r["ms"] > 0 for r in result["rows"])


def test_bench_wgrad_input_smoke(tmp_path):
    """The two ways of a chained unit's backward (dgrad writes r / wgrad recomputes it) and cuDNN, both checked."""
    result = _run("bench_wgrad_input.py", "--model", "resnet18", "--batch", "1", "--size", "32", "--dtype", "float32",
                  "--limit", "2", tmp_path=tmp_path)
    assert [r["provider"] for r in result["rows"]] == ["written", "recompute", "cudnn"] * 2
    assert all(r["ok"] and r["ms"] > 0 for r in result["rows"])


def test_bench_host_overhead_smoke(tmp_path):
    result = _run("bench_host_overhead.py", "--reps", "20", tmp_path=tmp_path)
    rows = {(r["row"], r["provider"]) for r in result["rows"]}
    assert {("block eval", "eager"), ("block train f+b", "reference"), ("op layer", "reference"),
            ("guard check", "reference"), ("spec check", "reference")} <= rows
    assert all(r["us"] > 0 for r in result["rows"] if r["row"] != "op layer")


def test_aot_check_smoke(tmp_path):
    """bench/aot_check.py traces a converted model's conv launches on every path (train, eval, eval with
    autograd; NCHW and channels_last) and compiles the launches of the first tuning key for sm_90 through the JIT
    with each of its kernel's tile configurations: the report has the documented schema, every compile succeeds
    and meets the static targets (exit status 0)."""
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "aot_check.py"), "--model", "cifar_resnet20",
                           "--limit", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "sm_90" and report["kernels"]
    fields = {"kernel", "features", "config", "ok", "error", "regs", "spill_bytes", "smem_bytes", "mma", "async_copy",
              "pipelined", "mma_overlap", "selectable", "equal_to_1", "divisible_by_16", "heuristic"}
    assert all(fields <= set(r) and r["ok"] and r["mma"] == "wgmma" for r in report["kernels"])
    assert len(report["paths"]) == 6 and report["launches"] > report["tuning_keys"] == 1
    assert report["targets"] and all(report["targets"].values()), report["targets"]
    assert sum(r["heuristic"] for r in report["kernels"]) >= 1
    assert report["summary"]["compiles"] == len(report["kernels"]) >= 4


def test_bench_inference_smoke_and_schema(tmp_path):
    result = _run("bench_inference.py", "--model", "resnet18", "--batch", "1", "--size", "32", "--dtype", "float32",
                  "--providers", "eager,triton", "--warmup-ms", "0", "--rep-ms", "0", tmp_path=tmp_path)
    runs = result["runs"]
    assert [r["provider"] for r in runs] == ["eager", "triton"]
    for r in runs:
        assert SCHEMA <= set(r) and r["mode"] == "infer" and r["ok"] and r["img_per_s"] > 0


def test_bench_bn_kernels_smoke(tmp_path):
    """The extension-kernel benchmark on its CPU registrations: every kernel row, both units, all checks pass."""
    from fused_resnet.backends import extension

    if extension.load() is None:
        pytest.skip(f"extension not built: {extension.status()['reason']}")
    result = _run("bench_bn_kernels.py", "--model", "resnet18", "--batch", "1", "--size", "32", "--dtype", "float16",
                  "--limit", "1", tmp_path=tmp_path)
    assert len({r["kernel"] for r in result["kernels"]}) == 10 and all(r["ms"] > 0 for r in result["kernels"])
    assert {(r["unit"], r["provider"]) for r in result["units"]} == {
        (u, p) for u in ("bn+relu forward (train)", "bn+relu backward") for p in ("eager", "compile", "cuda")}
    assert all(r["ok"] for r in result["units"]) and result["copy_ceiling_gbps"] > 0


def test_measure_on_cpu_reports_median_and_first_call():
    calls = []
    r = benchmark.measure(lambda: calls.append(sum(range(1000))), torch.device("cpu"), batch=4, warmup_ms=5,
                          rep_ms=20)
    assert r["img_per_s"] == pytest.approx(4 / (r["step_ms"] * 1e-3)) and r["peak_mem_gib"] is None
    assert len(calls) >= 3 and r["first_step_s"] >= 0


def test_bench_command_cpu_comparison(tmp_path, capsys):
    """Without a GPU, `fused-resnet bench` says so and compares the reference backend with eager: table, JSON in
    the results schema, Markdown, throughput and per-layer plots, and the profile report."""
    assert cli.main(["bench", "--steps", "2", "--quiet", "--profile", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "no CUDA GPU here" in out and "| cifar_resnet20 | train | reference |" in out
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert {(r["mode"], r["provider"]) for r in runs} == {(m, p) for m in ("train", "infer")
                                                         for p in ("eager", "reference")}
    assert all(SCHEMA <= set(r) and r["img_per_s"] > 0 and r["batch"] == 8 for r in runs)
    for name in ("results.md", "throughput.png", "layers_cifar_resnet20_train.png",
                 "layers_cifar_resnet20_infer.json", "profile_cifar_resnet20_reference_train.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    layers = json.loads((tmp_path / "layers_cifar_resnet20_infer.json").read_text())
    assert len(layers) == 9 and all(set(v) == {"eager", "reference"} for v in layers.values())
    assert "layer3.2" in (tmp_path / "profile_cifar_resnet20_reference_train.txt").read_text()


def test_bench_command_rejects_bad_options():
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["bench", "--model", "resnet19"])
    with pytest.raises(SystemExit, match="unknown mode"):
        cli.main(["bench", "--mode", "training"])
    with pytest.raises(SystemExit, match="unknown backend"):
        cli.main(["bench", "--providers", "eager,fastest"])


def test_microbenchmarks_smoke(tmp_path):
    """bench/test_microbench.py (pytest-benchmark) runs, checks numerics and writes its report JSON."""
    out = tmp_path / "micro.json"
    env = dict(os.environ, TRITON_INTERPRET="1", FUSED_RESNET_EXT_ON_CPU="1", FUSED_RESNET_MICRO_JSON=str(out))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                           "(conv and fprop) or (bn_act and residual) or (extension and bn_stats)",
                           str(ROOT / "bench" / "test_microbench.py")],
                          env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["provider"] for r in rows} == {"eager", "compile", "triton", "cuda"}
    assert all(r["speedup_vs_eager"] > 0 and r["speedup_vs_compile"] > 0 for r in rows if r["family"] != "ext")
    assert {r["family"] for r in rows if r["provider"] == "cuda"} == {"ext", "bn_act"}


def test_bench_parity_smoke(tmp_path):
    result = _run("bench_parity.py", "--model", "cifar_resnet20", "--dtype", "float32", "--batch", "4", "--size", "8",
                  "--steps", "2", tmp_path=tmp_path)
    rows = {r["provider"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "cuda", "triton"} and all(len(r["losses"]) == 2 and r["ok"] for r in rows.values())


def test_bringup_rehearsal_produces_every_stage_and_file(tmp_path):
    """`bench/gpu_suite.sh quick --dry-run`: the bring-up run on the CPU (interpreter, the extension's CPU path,
    tiny sizes) goes through every stage and writes every file the GPU run returns, so the script cannot rot."""
    from fused_resnet.backends import extension

    if extension.load() is None:
        pytest.skip(f"extension not built: {extension.status()['reason']}")
    env = dict(os.environ, OUT=str(tmp_path))
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_suite.sh"), "quick", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"env.json", "suite.log", "stages.tsv", "junit.xml", "verify.json", "rows.jsonl", "results.json",
                     "summary.md"}  # at most 8 files come back from the device machine
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dry_run"] is True and res["autotune"] == "heuristic"
    names = [s["name"] for s in res["stages"]]
    assert names[:3] == ["build", "info", "tests (GPU-only + slice)"] and all(s["exit"] == 0 for s in res["stages"])
    assert {"verify cuda float32", "verify triton float32", "models cifar_resnet8"} <= set(names)
    assert res["tests"]["tests"] > 0 and res["tests"]["failures"] == 0
    assert {(v["backend"], v["ok"]) for v in res["verify"]} == {("cuda", True), ("triton", True)}
    assert {(r["mode"], r["provider"]) for r in res["runs"]} == {
        (m, p) for m in ("train", "infer") for p in ("eager", "cuda", "compile", "triton", "cuda-unfused")}
    assert not res["not_measured"] and all(SCHEMA <= set(r) and r["host_ms"] > 0 for r in res["runs"])
    # beside each measurement the account's prediction, except for torch.compile (the account cannot see it)
    assert all((r.get("predicted", 0) > 0) == (r["provider"] != "compile") for r in res["runs"])
    summary = (tmp_path / "summary.md").read_text()
    assert "CPU rehearsal" in summary and "| cifar_resnet8 | train | compile |" in summary
