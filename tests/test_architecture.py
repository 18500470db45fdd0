"""The layout that docs/architecture.md states: import rules between layers, module sizes, one
definition of the image extensions, one kernel file per op and device."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ld_ext

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "ld_ext"
OPS = ld_ext.ops.registry.NAMES
MAX_LINES = 800
MAX_FUNCTION_LINES = 80  # def line through last line, after ruff format

# the layers below the pipeline (docs/architecture.md, "What each layer may import")
LOW = {"normalization", "reference", "ops", "losses", "plain_losses", "models", "augment", "atomic", "viz",
       "distributed", "data", "checkpoint"}
PIPELINE = {"train", "pretrain", "batching", "train_state"}

# The compiled extension is ld_ext._C by the convention of torch extensions: a public module
# whose name starts with an underscore, not a private helper.
EXTENSION = "_C"


def _modules():
    """(dotted name without the ld_ext prefix, path) of every module of the package."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported ld_ext module without the prefix, line, at module level) for every import in the
    file, relative ones resolved; `from X import y` counts as X and X.y."""
    package = _package_of(name, path)
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "ld_ext"]
            targets = [t.split(".", 1)[1] if "." in t else "" for t in targets]
        elif isinstance(node, ast.ImportFrom):
            mod = _from_module(node, package)
            if mod is None:
                continue
            targets = [mod] + [f"{mod}.{a.name}" if mod else a.name for a in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top_level) for t in targets if t]
    return found


def _layer(mod: str) -> str:
    return mod.split(".")[0]


def _violations(rule) -> list[str]:
    bad = []
    for name, path in _modules():
        for target, line, at_top in _imports(name, path):
            why = rule(name, target, at_top)
            if why:
                bad.append(f"ld_ext/{path.relative_to(ROOT)}:{line} imports {target}: {why}")
    return bad


def test_the_import_checker_sees_relative_and_absolute_imports(tmp_path):
    # a check that cannot fail is a defect: the parser must find the edges the rules look for
    edges = {t for t, _, _ in _imports("tasks.segmentation", ROOT / "tasks" / "segmentation.py")}
    assert {"tasks.common", "normalization", "tasks.probe"} <= edges
    edges = {t for t, _, _ in _imports("pretrain.config", ROOT / "pretrain" / "config.py")}
    assert {"objective", "data", "models"} <= edges
    f = tmp_path / "x.py"
    f.write_text("import ld_ext.reference\nfrom ld_ext import reference as r\ndef f():\n    from ..bench import cli\n")
    got = _imports("tasks.x", f)
    assert ("reference", 1, True) in got and ("reference", 2, True) in got and ("bench.cli", 4, False) in got


def test_no_pipeline_task_or_demo_module_imports_the_test_oracle():
    # ld_ext/__init__.py re-exports it for users; ld_ext.bench uses it as its baseline
    def rule(name, target, at_top):
        if name in ("", "reference") or _layer(name) == "bench":
            return None
        return "the test oracle" if target == "reference" or target.startswith("reference.") else None

    assert _violations(rule) == []


def test_lower_layers_never_import_upper_ones():
    upper = PIPELINE | {"objective", "tasks", "demos", "bench", "cli"}

    def rule(name, target, at_top):
        if _layer(name) in LOW and _layer(target) in upper:
            return f"{_layer(name)} is below {_layer(target)}"
        return None

    assert _violations(rule) == []


def test_tasks_and_the_pipeline_stay_below_demos_bench_and_cli():
    def rule(name, target, at_top):
        layer, tlayer = _layer(name), _layer(target)
        if layer == "tasks" and tlayer in PIPELINE | {"demos", "bench", "cli"}:
            return "tasks never import the trainer, demos, benchmarks or the CLI"
        if layer in PIPELINE and tlayer in {"demos", "bench", "cli"}:
            return "the pipeline never imports demos, benchmarks or the CLI"
        if layer in PIPELINE and tlayer == "tasks" and not target.startswith("tasks.landmarks"):
            return "the pipeline calls into a task only for stage 3 (tasks.landmarks.pretrain_stage)"
        if layer == "demos" and tlayer in {"bench", "cli"}:
            return "demos never import benchmarks or the CLI"
        if layer == "objective" and tlayer == "bench":
            return "the objective never imports the benchmarks (its plain-PyTorch losses are ld_ext.plain_losses)"
        return None

    assert _violations(rule) == []


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(REPO)): n for _, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _long_functions(modules) -> dict:
    found = {}
    for name, path in modules:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found[f"{name}.{node.name}"] = n
    return found


def test_no_function_over_80_lines():
    assert _long_functions(_modules()) == {}


def test_the_function_length_check_sees_a_long_function(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 80 + "    return x\n")
    assert _long_functions([("x", f)]) == {"x.long": 82}


def test_image_extensions_defined_once():
    defs = []
    for _, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "IMAGE_EXTENSIONS" for t in targets):
                    defs.append(str(path.relative_to(REPO)))
    assert defs == ["ld_ext/data/readers.py"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_its_kernel_files_and_test_file(op):
    for rel in (f"csrc/cpu/{op}.cpp", f"csrc/cuda/{op}.cu", f"tests/test_{op}.py"):
        assert (REPO / rel).is_file(), rel
    # the CPU file registers this op's kernels
    src = (REPO / "csrc" / "cpu" / f"{op}.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(ld_ext, CPU" in src and f'm.impl("{op}"' in src
    src = (REPO / "csrc" / "cuda" / f"{op}.cu").read_text()
    assert "TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY" in src and f'm.impl("{op}"' in src
    assert hasattr(ld_ext, op)


# ----------------------------------------------------------------------------- the module graph


def _module_names() -> set[str]:
    return {name for name, _ in _modules()} | {"_C"}


def _package_of(name: str, path: Path) -> list[str]:
    """The package a module's relative imports start from (the module itself for an __init__)."""
    return name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]


def _from_module(node: ast.ImportFrom, package: list[str]) -> str | None:
    """The ld_ext module (without the prefix; "" = ld_ext itself) that ``from X import ...`` reads,
    or None when X is not part of ld_ext."""
    if node.level:
        base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
        return ".".join(base + ([node.module] if node.module else []))
    if node.module and node.module.split(".")[0] == "ld_ext":
        return node.module.split(".", 1)[1] if "." in node.module else ""
    return None


def _edges(name: str, path: Path, known: set[str]) -> list[tuple[str, int, ast.AST]]:
    """(imported ld_ext module, line, import node) for every import of the file, in functions too.
    ``import ld_ext.a.b`` is an edge to a.b; ``from pkg import sub`` is an edge to the submodule
    pkg.sub when there is one (not to pkg's __init__), else to pkg; ``from . import _C`` is an edge
    to the extension only."""
    package = _package_of(name, path)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ld_ext":
                    out.append((a.name.split(".", 1)[1] if "." in a.name else "", node.lineno, node))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "ld_ext":
                mod = node.module.split(".", 1)[1] if "." in node.module else ""
            else:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                out.append((sub if sub in known else mod, node.lineno, node))
    return [(t, line, n) for t, line, n in out if t != name]


def _graph() -> dict[str, set[str]]:
    known = _module_names()
    return {name: {t for t, _, _ in _edges(name, path, known)} for name, path in _modules()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) through every strongly connected group of modules."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # a shortest way back to the start, inside the group
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


def test_the_cycle_finder_finds_cycles_and_the_graph_builder_resolves_submodules(tmp_path):
    # a check that cannot fail is a defect
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    f = tmp_path / "x.py"
    f.write_text("from . import _C, ops\nfrom .tasks import common\ndef f():\n    from .models import LDNet\n")
    got = {t for t, _, _ in _edges("x", f, _module_names())}
    assert got == {"_C", "ops", "tasks.common", "models"}, got  # the extension and the submodule, never ""
    assert "models" in {t for t, _, _ in _edges("tasks.shape_guided", ROOT / "tasks" / "shape_guided.py", _module_names())}


def test_no_import_cycle_between_ld_ext_modules_counting_imports_in_functions():
    assert [" -> ".join(c) for c in _cycles(_graph())] == []


def test_the_ops_and_the_normalisations_stay_at_the_bottom_and_bench_never_imports_the_cli():
    bad = []
    for name, targets in _graph().items():
        for t in sorted(targets):
            if (name == "ops" or name.startswith("ops.")) and not (t in ("_C", "normalization") or t.startswith("ops.") or t == "ops"):
                bad.append(f"{name} imports {t}: ops imports only _C and normalization from ld_ext")
            if name == "normalization":
                bad.append(f"normalization imports {t}: it imports nothing from ld_ext")
            if _layer(name) == "bench" and t == "cli":
                bad.append(f"{name} imports ld_ext.cli: the benchmarks never import the command")
    assert bad == []


def _private_imports(modules=None) -> set[tuple[str, str]]:
    """(importing module, "owner._name") for every underscore name one ld_ext module (of
    ``modules``, default all) takes from another: ``from owner import _name`` or ``owner_alias._name``."""
    modules = list(_modules() if modules is None else modules)
    known = _module_names() | {name for name, _ in modules}

    def private(n: str) -> bool:
        return n.startswith("_") and not n.startswith("__") and n != EXTENSION

    found = set()
    for name, path in modules:
        package = _package_of(name, path)
        tree = ast.parse(path.read_text())
        aliases = {}  # local name -> the ld_ext module it is bound to ("" = ld_ext itself)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] != "ld_ext":
                        continue
                    if a.asname:
                        aliases[a.asname] = a.name.split(".", 1)[1] if "." in a.name else ""
                    else:
                        aliases["ld_ext"] = ""
            elif isinstance(node, ast.ImportFrom):
                mod = _from_module(node, package)
                if mod is None:
                    continue
                for a in node.names:
                    sub = f"{mod}.{a.name}" if mod else a.name
                    if sub in known:
                        aliases[a.asname or a.name] = sub
                    elif private(a.name) and mod != name:
                        found.add((name, sub))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            parts = ast.unparse(node.value).split(".")
            if parts[0] not in aliases:
                continue
            owner = aliases[parts[0]]
            for p in parts[1:]:  # ld_ext.ops._x after import ld_ext.ops
                owner = f"{owner}.{p}" if owner else p
            if owner in known and owner not in (name, "_C"):
                found.add((name, f"{owner}.{node.attr}" if owner else node.attr))
    return found


def test_the_private_name_finder_sees_both_forms(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from .pooling import _sample, ok\nfrom ... import ops\nimport ld_ext.data.readers as r\n"
                 "def f():\n    ops._mode('probs')\n    r._as_path_list([])\n    ops.ok()\n")
    got = _private_imports([("tasks.landmarks.x", f)])
    assert got == {("tasks.landmarks.x", "tasks.landmarks.pooling._sample"), ("tasks.landmarks.x", "ops._mode"),
                   ("tasks.landmarks.x", "data.readers._as_path_list")}, got


def test_no_underscore_name_is_imported_across_ld_ext_modules():
    """A helper that another module needs is public in the module that owns it."""
    found = _private_imports()
    assert sorted(found) == []
