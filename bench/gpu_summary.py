"""The bring-up run's results in one place: reads what ``bench/gpu_suite.sh quick`` left in OUT (env.json,
stages.tsv, junit.xml, verify.json, rows.jsonl — any of them may be missing when a stage was cut short) and writes
OUT/results.json and OUT/summary.md.

results.json: {"env", "autotune", "dry_run", "stages": [{"name", "exit", "seconds", "limit"}], "tests": {"tests",
"failures", "errors", "skipped"}, "verify": [{"model", "backend", "dtype", "layout", "ok", "worst"}], "runs":
[rows in the results schema of ``fused-resnet bench``], "not_measured": [{"model", "mode", "provider"}]}.
summary.md: the stage times, the test and verify outcome, and the model table with each fused provider's
throughput and peak memory as ratios to eager and to torch.compile measured in the same process, each beside the
launch account's roofline prediction for that GPU (``fused-resnet account``: a model, calibrated on one eager
measurement; "predicted" in results.json's runs; none for torch.compile, whose kernels the account does not see).

    python bench/gpu_summary.py OUT
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

PROVIDERS = ("eager", "compile", "cuda", "triton", "cuda-unfused")
MODES = ("train", "infer")


def _json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _stages(path: Path) -> List[dict]:
    if not path.exists():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [{"name": n, "exit": int(rc), "seconds": int(sec), "limit": int(lim)} for n, rc, sec, lim in rows]


def _tests(path: Path) -> Optional[Dict[str, int]]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def _verify(doc: dict) -> List[dict]:
    out = []
    for run in doc.get("runs", []):
        checks = run.get("checks", [])
        worst = max((c["err_fused"] / c["bound"] for c in checks if c.get("bound")), default=None)
        out.append({"model": run["model"], "backend": run["backend"], "dtype": run["dtype"], "layout": run["layout"],
                    "ok": bool(checks) and all(c["ok"] for c in checks), "worst": worst})
    return out


def _rows(path: Path) -> List[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _count(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:,.0f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


def _gpu_key(name: str) -> str:
    return "h200" if "H200" in name.upper() else "h100"


def predict(runs: List[dict], gpu: str) -> None:
    """Each run's predicted img/s from the launch account of the same configuration (in place: "predicted")."""
    from fused_resnet.tools import accounting, roofline

    cal = roofline.calibration()
    for r in runs:
        if r["provider"] not in accounting.PROVIDERS:
            continue
        config = accounting.Config(model=r["model"], batch=r["batch"], dtype=r["dtype"],
                                   channels_last=r.get("layout") == "channels_last",
                                   mode="train" if r["mode"] == "train" else "eval", amp=bool(r.get("amp")))
        acc = accounting.account(config, r["provider"])
        r["predicted"] = round(roofline.predict(acc, roofline.GPUS[gpu], cal)["img_per_s"], 1)


def summarize(out: Path) -> dict:
    env = _json(out / "env.json", {})
    runs = _rows(out / "rows.jsonl")
    predict(runs, _gpu_key(env.get("gpu", "")))
    measured = {(r["model"], r["mode"], r["provider"]) for r in runs}
    models = sorted({r["model"] for r in runs}) or []
    missing = [{"model": m, "mode": mode, "provider": p} for m in models for mode in MODES for p in PROVIDERS
               if (m, mode, p) not in measured]
    return {"env": env, "autotune": env.get("autotune"), "dry_run": env.get("dry_run"),
            "stages": _stages(out / "stages.tsv"), "tests": _tests(out / "junit.xml"),
            "verify": _verify(_json(out / "verify.json", {})), "runs": runs, "not_measured": missing}


def markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# Bring-up run: {env.get('gpu', '?')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, cuDNN "
             f"{env.get('cudnn')}; Triton autotune: {res['autotune']}"
             + (" — **CPU rehearsal (dry run): no number here means anything**" if res["dry_run"] else ""), "",
             "| stage | exit | seconds | limit |", "|---|---|---|---|"]
    for s in res["stages"]:
        lines.append(f"| {s['name']} | {s['exit']} | {s['seconds']} | {s['limit'] or '–'} |")
    total = sum(s["seconds"] for s in res["stages"])
    lines += [f"| total | | {total} | |", ""]
    t = res["tests"]
    lines.append("Tests: " + ("no junit.xml (the stage did not finish)" if t is None else
                              f"{t['tests']} run, {t['failures']} failed, {t['errors']} errors, "
                              f"{t['skipped']} skipped"))
    lines += ["", "| verify | backend | dtype | layout | ok | worst error / bound |", "|---|---|---|---|---|---|"]
    for v in res["verify"]:
        worst = "–" if v["worst"] is None else f"{v['worst']:.2f}"
        lines.append(f"| {v['model']} | {v['backend']} | {v['dtype']} | {v['layout']} | "
                     f"{'yes' if v['ok'] else 'NO'} | {worst} |")
    runs = res["runs"]

    def find(r, provider):
        return next((o for o in runs if (o["model"], o["mode"], o["provider"]) == (r["model"], r["mode"], provider)),
                    None)

    lines += ["", "| model | mode | provider | img/s | predicted img/s (model) | vs eager | vs compile | peak GiB | "
              "mem vs eager | first step s | host ms/step | step ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        eager, comp = find(r, "eager"), find(r, "compile")
        peak = r.get("peak_mem_gib")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['provider']} | {r['img_per_s']:,.0f} | "
            f"{_count(r.get('predicted'))} | "
            f"{_ratio(r['img_per_s'], eager and eager['img_per_s'])} | "
            f"{_ratio(r['img_per_s'], comp and comp['img_per_s'])} | {'–' if peak is None else f'{peak:.2f}'} | "
            f"{_ratio(peak, eager and eager.get('peak_mem_gib'))} | {r['first_step_s']:.1f} | "
            f"{r.get('host_ms', float('nan')):.1f} | {r['step_ms']:.1f} |")
    fusion = [r for r in runs if r.get("cudnn_fusion")]
    if fusion:  # backend cuda's cuDNN fusion graphs in each measured run: calls fused / fallen back, plan builds
        lines += ["", "| model | mode | cuDNN fusion graph | fused calls | fell back | plans built | build ms |",
                  "|---|---|---|---|---|---|---|"]
        for r in fusion:
            for label, t in sorted(r["cudnn_fusion"]["tallies"].items()):
                lines.append(f"| {r['model']} | {r['mode']} | {label} | {t['fused']} | {t['fallback']} | "
                             f"{t['built']} | {t['build_ms']:.0f} |")
            lines += [f"| {r['model']} | {r['mode']} | no engine: `{key}` | | {why[:120]} | | |"
                      for key, why in r["cudnn_fusion"]["unsupported"].items()]
    if res["not_measured"]:
        lines += ["", "Not measured (their stage reached its time limit first): " + ", ".join(
            f"{m['model']} {m['mode']} {m['provider']}" for m in res["not_measured"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    res = summarize(out)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "summary.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
