"""The repository's promises about itself: README's commands are the ones CI runs; the package's structure (no
import cycles, tools never imported by the library, no long positional parameter lists, docs that name real
files)."""
import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEST_COMMAND = "python -m pytest -q tests"


def test_readme_opens_with_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line for line in first_block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].endswith("fused-resnet verify")
    assert commands[1].endswith(TEST_COMMAND)
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{TEST_COMMAND}\n" in ci
    for step in commands[1].split(" && ")[2:4]:  # the two pip installs, as CI runs them (it adds -q to one)
        assert step.replace("pip install ", "") in ci, step


# --------------------------------------------------------------------------------------------- structure
PACKAGE = ROOT / "fused_resnet"
SOURCE_DIRS = {"fused_resnet": PACKAGE, "fused_resnet.kernels": ROOT / "kernels"}  # the installed layout


def _modules() -> dict:
    """Dotted module name → source file, for every module of the installed package."""
    found = {}
    for prefix, folder in SOURCE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if prefix == "fused_resnet" and parts and parts[0] == "kernels":
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((prefix,) + parts)] = path
    return found


def _imports(name: str, path: pathlib.Path, known: set) -> set:
    """The package modules that ``name`` imports anywhere in its file (function-local imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_import_cycles():
    """No module reaches itself through imports, function-local ones included (importing a submodule's parent
    package first is Python's doing and not counted)."""
    graph = _graph()
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_library_never_imports_its_tools():
    graph = _graph()
    offenders = {m: sorted(i for i in deps if i.startswith("fused_resnet.tools"))
                 for m, deps in graph.items() if not m.startswith("fused_resnet.tools")}
    assert not {m: d for m, d in offenders.items() if d}


def _is_triton_kernel(fn: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(fn, "decorator_list", []))


def test_no_function_outside_the_op_layer_takes_twelve_positional_parameters():
    """Configuration travels as a BlockSpec; only the torch.library layers have flat schemas (ops.py, and backend
    cuda's ops.py for the extension's), and Triton kernels take their pointers and sizes one by one."""
    too_long = []
    for name, path in _modules().items():
        if name in ("fused_resnet.ops", "fused_resnet.backends.cuda.ops"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.Lambda)) and not _is_triton_kernel(node):
                params = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(params) >= 12:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} ({len(params)})")
    assert not too_long, too_long


def test_docs_name_files_that_exist():
    pattern = re.compile(r"\b((?:fused_resnet|kernels|csrc|bench|tests|docs)/[\w/.-]*\w)")
    missing = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for ref in pattern.findall(doc.read_text()):
            generated = ref == "bench/results/latest" or ref.endswith("_")  # written by a GPU run: h200_<date>
            if not (ROOT / ref).exists() and not generated:
                missing.append(f"{doc.name}: {ref}")
    assert not missing, missing


# --------------------------------------------------------------------------------------------- README's "Not yet"
def _not_yet() -> dict:
    """README's "Not yet" claims: {"gpu": bullets of what has not run on a GPU, "written": bullets of what the code
    does not do (those of the "Not yet written" list and every "- Not yet:" bullet elsewhere), "met": the targets
    paragraph}."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Not yet here\n", 1)[1].split("\n## ", 1)[0]

    def bullets(lead: str) -> list:
        block = section.split(f"\n{lead}", 1)[1].split("\n\n", 1)[0]
        return [" ".join(b.split()) for b in re.split(r"\n- ", block)[1:]]

    elsewhere = [" ".join(m.split()) for m in re.findall(r"^- Not yet:(.*(?:\n  .*)*)", readme, re.M)]
    met = " ".join(section.split("\nNot yet met:", 1)[1].split("\n\n", 1)[0].split())
    return {"gpu": bullets("Not yet run on a GPU"), "written": bullets("Not yet written:") + elsewhere, "met": met}


def _capabilities(field: str, backends_named=("reference", "triton", "cuda", "cuda-unfused")) -> bool:
    from fused_resnet import backends
    from fused_resnet.spec import Shortcut

    caps = [backends.get(n).capabilities for n in backends_named]
    if field == "dims":
        return all(c.dims >= {1, 2} for c in caps)
    if field == "shortcuts":
        return all(c.shortcuts == frozenset(Shortcut) for c in caps)
    return all(getattr(c, field) for c in caps)


def _timm_block_fuses(**slots) -> bool:
    """Whether convert fuses a timm BasicBlock given these slots (se=..., drop_path=...); a plain one must fuse (else
    the answer would say nothing about the slots)."""
    import warnings

    import fused_resnet
    timm = pytest.importorskip("timm")
    assert not slots or _timm_block_fuses(), "a plain timm BasicBlock no longer fuses"
    block = timm.models.resnet.BasicBlock(8, 8)
    for name, make in slots.items():
        setattr(block, name, make(timm))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fused_resnet.convert(block, backend="reference")
    return type(fused) is not type(block)


def _capability_named(*names: str) -> bool:
    """Whether a backend capability (a field of Capabilities) has one of these names."""
    import dataclasses

    from fused_resnet.backends.registry import Capabilities
    return any(f.name in names for f in dataclasses.fields(Capabilities))


def _fully_fused(model: str) -> bool:
    """Whether convert fuses every conv-BN unit of this coverage-table model on backend reference."""
    from fused_resnet.testing import coverage
    fused, units = coverage.coverage(model, "reference")
    return fused == units


def _backbone_stem_fuses() -> bool:
    """Whether convert fuses the stem of torchvision's DeepLabV3 backbone (an IntermediateLayerGetter)."""
    return _fully_fused("deeplabv3_resnet50 (backbone)")


def _timm_stem_fuses() -> bool:
    """Whether convert fuses the stem of timm's resnet18."""
    import warnings

    import fused_resnet
    from fused_resnet.blocks import FusedStemMixin
    timm = pytest.importorskip("timm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fused_resnet.convert(timm.create_model("resnet18"), backend="reference")
    return any(isinstance(m, FusedStemMixin) and m.backend is not None for m in fused.modules())


def _double_backward_runs() -> bool:
    import torch
    import torchvision

    import fused_resnet
    block = fused_resnet.convert(torchvision.models.resnet.BasicBlock(4, 4), backend="reference").double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(block(x).square().sum(), x, create_graph=True)
    try:
        g.sum().backward()
    except RuntimeError:
        return False
    return True


def _reference_runs_float64() -> bool:
    import torch

    from fused_resnet import backends
    return torch.float64 in backends.get("reference").capabilities.dtypes


def _frozen_bn_is_a_unit() -> bool:
    from torchvision.ops.misc import FrozenBatchNorm2d

    from fused_resnet import spec
    return FrozenBatchNorm2d in spec.BN_TYPES


def _sync_bn_is_a_unit() -> bool:
    from torch import nn

    from fused_resnet import spec
    return nn.SyncBatchNorm in spec.BN_TYPES and _capabilities("synced_bn")


# What a "Not yet" bullet may name: feature → (a pattern naming it, whether the code does it now). A "Not yet
# written" bullet must name at least one feature the code does not do, and none that it does: a bullet with no
# entry here, or one whose feature gets written, fails until README (or this table) says what is true.
FEATURES = {
    "SyncBatchNorm fused": (r"SyncBatchNorm|synchroni[sz]ed B(atch)?N", _sync_bn_is_a_unit),
    "FrozenBatchNorm2d fused": (r"FrozenBatchNorm|frozen B(atch)?N", _frozen_bn_is_a_unit),
    "grouped convs on every backend": (r"grouped|groups\s*>|depth-?wise|ResNeXt", lambda: _capabilities("groups")),
    "dilated convs on every backend": (r"dilat", lambda: _capabilities("dilation")),
    "1-D blocks on every backend": (r"Conv1d|1-D|dim=1", lambda: _capabilities("dims")),
    "every shortcut on every backend": (r"option A|projection shortcut|plain \(no shortcut",
                                        lambda: _capabilities("shortcuts")),
    "residual scale on every backend": (r"residual.scale|SkipInit", lambda: _capabilities("residual_scale")),
    "cuDNN fusion graphs": (r"cuDNN (runtime-)?fusion graph|runtime-fusion",
                            lambda: (ROOT / "csrc" / "cudnn_fusion.cpp").exists()),
    "float64 on reference": (r"float64", _reference_runs_float64),
    "backend cuda's own convs": (r"own convs", lambda: any((ROOT / "csrc").glob("*conv*.c*"))),
    "fusing around an attention module": (
        r"fus\w* around[^.]*(attention|squeeze)", lambda: _timm_block_fuses(se=lambda timm: timm.layers.SEModule(8))),
    "fusing around stochastic depth": (
        r"fus\w* around[^.]*(stochastic depth|drop.?path)",
        lambda: _timm_block_fuses(drop_path=lambda timm: timm.layers.DropPath(0.1))),
    "a closing with SE / attention inside the fused op": (
        r"(SE|ECA|attention)[^.]*inside the fused op", lambda: _capability_named("closing", "se", "attention")),
    "drop_path inside the fused op on every backend": (
        r"drop.?path inside the fused op", lambda: _capabilities("drop_path")),
    "timm's stems fused": (r"timm's stems", _timm_stem_fuses),
    "torchvision's backbone wrappers' stems fused": (r"IntermediateLayerGetter|BackboneWithFPN", _backbone_stem_fuses),
    "the avg-pool shortcut inside its conv on every backend": (r"avg-pool inside (its|the projection) conv",
                                                               lambda: _capabilities("avg_pool")),
    "timm's deep stem fused": (r"timm's deep stem", lambda: _fully_fused("timm resnet26d")),
    "double backward": (r"double backward", _double_backward_runs),
}


def _named(text: str) -> list:
    return [name for name, (pattern, _) in FEATURES.items() if re.search(pattern, text, re.I)]


def _written_claims_that_fail(bullets: list) -> list:
    """Why each "Not yet written" bullet is not what the code says, one line per such bullet (empty when every
    bullet names only features the code lacks)."""
    does = {}
    problems = []
    for bullet in bullets:
        named = _named(bullet)
        for name in named:
            if name not in does:
                does[name] = FEATURES[name][1]()
        written = [n for n in named if does[n]]
        if not named:
            problems.append(f"{bullet!r} names no feature of tests/test_repo.py's FEATURES: add it with a check "
                            f"against the code")
        elif written:
            problems.append(f"{bullet!r} names {', '.join(map(repr, written))}, which the code does")
    return problems


def test_readmes_not_yet_written_list_names_only_what_the_code_does_not_do():
    claims = _not_yet()
    assert len(claims["written"]) >= 3 and len(claims["gpu"]) >= 2 and claims["met"]
    problems = _written_claims_that_fail(claims["written"])
    assert not problems, "\n".join(problems)


def test_the_not_yet_check_fails_a_bullet_naming_what_the_code_does():
    """The check itself can fail: a bullet naming a written feature, or one no check covers."""
    problems = _written_claims_that_fail(["Fusing SyncBatchNorm layers", "Grouped convs on triton",
                                          "dilated convs", "a tensor-core teapot"])
    assert len(problems) == 4
    assert problems[0].endswith("names 'SyncBatchNorm fused', which the code does")
    assert "names no feature" in problems[3]


def _gpu_evidence() -> set:
    """What the GPU runs committed in bench/results/ ran: the fused backends their ``fused-resnet info`` lists as
    available, and "nccl" / "capture" where a test of that name passed (their junit.xml)."""
    import xml.etree.ElementTree as ET

    ran = set()
    for info in (ROOT / "bench" / "results").glob("*/info.txt"):
        text = info.read_text()
        if re.search(r"^gpu \d", text, re.M):
            ran |= set(re.findall(r"^\s+(triton|cuda|cuda-unfused)\s+available\b", text, re.M))
    for junit in (ROOT / "bench" / "results").glob("*/junit.xml"):
        for case in ET.parse(junit).iter("testcase"):
            if not any(child.tag in ("failure", "error", "skipped") for child in case):
                ran |= {k for k in ("nccl", "capture") if k in case.get("name", "").lower()}
    return ran


def test_readmes_not_yet_on_a_gpu_list_names_nothing_a_committed_gpu_run_ran():
    ran = _gpu_evidence()
    claims = " ".join(_not_yet()["gpu"])
    named = set(re.findall(r"backend `(triton|cuda)`", claims, re.I)) | {k for k, pattern in (
        ("nccl", r"NCCL"), ("capture", r"graph capture")) if re.search(pattern, claims)}
    assert named >= {"triton", "cuda", "nccl", "capture"}, named
    assert not named & ran, f"README says these have not run on a GPU; bench/results/ holds a run: {named & ran}"


def test_readmes_not_yet_met_targets_are_the_accounts(tmp_path):
    """The launches and DRAM bytes README quotes for a ResNet-50 training step are what ``fused-resnet account``
    prints, and are indeed above half of eager's (the targets docs/PERFORMANCE.md sets). Run as a command, without
    the Triton interpreter the tests set: under it the kernels launch other tiles, whose partial sums move other
    bytes."""
    import json
    import os
    import subprocess
    import sys

    met = _not_yet()["met"]
    assert "ResNet-50 training step (bs 256, bf16, channels_last)" in met
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "account.json"
    subprocess.run([sys.executable, "-m", "fused_resnet.tools.cli", "account", "--providers", "eager,triton,cuda",
                    "--json", str(out)], check=True, env=env, cwd=ROOT, capture_output=True)
    totals = {a["provider"]: a["totals"] for a in json.loads(out.read_text())["accounts"]}
    launches = re.search(r"\((\d+) and (\d+) against (\d+)\)", met).groups()
    assert [int(n) for n in launches] == [totals[p]["launches"] for p in ("triton", "cuda", "eager")]
    ratios = re.search(r"([\d.]+)× on triton, ([\d.]+)× on cuda", met).groups()
    for quoted, p in zip(ratios, ("triton", "cuda")):
        ratio = totals[p]["bytes"] / totals["eager"]["bytes"]
        assert f"{ratio:.2f}" == quoted and ratio > 0.5 and totals[p]["launches"] > totals["eager"]["launches"] / 2
