"""The repository's promises about itself: README's commands are the ones CI runs; the package's structure (no
import cycles, tools never imported by the library, no long positional parameter lists, docs that name real
files)."""
import ast
import pathlib
import re

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
