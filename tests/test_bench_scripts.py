"""The benchmark scripts run end to end (a CPU smoke run under the interpreter: the numbers mean nothing, the code
paths, numerics checks and the results schema are what is checked), so a GPU session is not spent on a typo."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fused_resnet import benchmark

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMA = {"model", "mode", "provider", "dtype", "batch", "img_per_s", "peak_mem_gib", "first_step_s", "gpu", "torch",
          "triton", "cudnn", "date"}
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke runs; the GPU suite runs them for real")


def _run(script, *args, tmp_path):
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_bench_conv_smoke(tmp_path):
    result = _run("bench_conv.py", "--model", "resnet18", "--batch", "1", "--size", "32", "--dtype", "float32",
                  "--limit", "2", "--passes", "fprop,wgrad", tmp_path=tmp_path)
    assert {r["provider"] for r in result["rows"]} == {"cudnn", "triton"}
    assert len(result["rows"]) == 2 * 2 * 2 and all(r["ok"] and r["ms"] > 0 for r in result["rows"])


def test_bench_inference_smoke_and_schema(tmp_path):
    result = _run("bench_inference.py", "--model", "resnet18", "--batch", "1", "--size", "32", "--dtype", "float32",
                  "--providers", "eager,triton", "--warmup-ms", "0", "--rep-ms", "0", tmp_path=tmp_path)
    runs = result["runs"]
    assert [r["provider"] for r in runs] == ["eager", "triton"]
    for r in runs:
        assert SCHEMA <= set(r) and r["mode"] == "infer" and r["ok"] and r["img_per_s"] > 0


def test_measure_on_cpu_reports_median_and_first_call():
    calls = []
    r = benchmark.measure(lambda: calls.append(sum(range(1000))), torch.device("cpu"), batch=4, warmup_ms=5,
                          rep_ms=20)
    assert r["img_per_s"] == pytest.approx(4 / (r["step_ms"] * 1e-3)) and r["peak_mem_gib"] is None
    assert len(calls) >= 3 and r["first_step_s"] >= 0
