"""The layout that docs/architecture.md states: import rules between layers, module sizes, one
definition of the image extensions, one kernel file per op and device."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ld_ext

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "ld_ext"
OPS = ("region_features", "region_discrimination", "pixel_cluster_similarity", "patch_discrimination")
MAX_LINES = 800

# the layers below the pipeline (docs/architecture.md, "What each layer may import")
LOW = {"normalization", "reference", "ops", "losses", "models", "augment", "atomic", "viz", "distributed",
       "data", "checkpoint"}
PIPELINE = {"train", "pretrain", "batching", "train_state"}


def _modules():
    """(dotted name without the ld_ext prefix, path) of every module of the package."""
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        yield ".".join(parts), path


def _imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported ld_ext module without the prefix, line, at module level) for every import in the
    file, relative ones resolved; `from X import y` counts as X and X.y."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "ld_ext"]
            targets = [t.split(".", 1)[1] if "." in t else "" for t in targets]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "ld_ext":
                mod = node.module.split(".", 1)[1] if "." in node.module else ""
            else:
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
    edges = {t for t, _, _ in _imports("tasks.probe", ROOT / "tasks" / "probe.py")}
    assert {"tasks.common", "normalization", "tasks.segmentation"} <= edges
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
        if layer == "objective" and tlayer == "bench" and (at_top or not target.startswith("bench.baselines")):
            return "the objective imports only bench.baselines, and only when loss_impl='reference' asks"
        return None

    assert _violations(rule) == []


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(REPO)): n for _, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


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
