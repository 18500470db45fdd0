"""The op registry (ld_ext/ops/registry.py) against what exists: the operators registered in
torch.ops.ld_ext, the kernel and test files, the public functions, and the consumers that enumerate
the ops. Also the import rules of the ld_ext.ops package (docs/architecture.md)."""
from __future__ import annotations

import ast
import importlib.util
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ld_ext
from ld_ext.ops import registry

REPO = Path(__file__).resolve().parents[1]
OPS_DIR = REPO / "ld_ext" / "ops"
REGISTRY_PY = OPS_DIR / "registry.py"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_are_unique():
    assert len(set(registry.NAMES)) == len(registry.NAMES)
    assert len({op.short for op in registry.OPS}) == len(registry.OPS)
    assert registry.OPERATORS == tuple(n for op in registry.NAMES for n in (op, f"{op}_backward"))


def test_registry_is_the_operators_registered_in_torch_ops_ld_ext():
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("ld_ext::")}
    assert registered == set(registry.OPERATORS)


@pytest.mark.parametrize("operator", registry.OPERATORS)
def test_every_operator_has_checks_a_fake_kernel_and_an_autograd_kernel(operator):
    assert callable(getattr(ld_ext._C, f"check_{operator}")), operator
    for key in ("CPU", "Meta", "Autograd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ld_ext::{operator}", key), (operator, key)


@pytest.mark.parametrize("op", registry.NAMES)
def test_every_op_has_an_autocast_kernel(op):
    # csrc/autocast.cpp; .ci/cuda_compile.sh requires the AutocastCUDA one of every op likewise
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ld_ext::{op}", "AutocastCPU"), op


def test_registry_is_the_kernel_files():
    cpu = {p.stem for p in (REPO / "csrc" / "cpu").glob("*.cpp")} - {"isa"}  # isa.cpp: the ISA probe
    cuda = {p.stem for p in (REPO / "csrc" / "cuda").glob("*.cu")}
    assert cpu == set(registry.NAMES)
    assert cuda == set(registry.NAMES)


@pytest.mark.parametrize("op", registry.NAMES)
def test_every_op_has_its_test_file_and_public_function(op):
    assert (REPO / "tests" / f"test_{op}.py").is_file()
    assert callable(getattr(ld_ext, op)) and getattr(ld_ext, op) is getattr(ld_ext.ops, op)


def test_registry_is_read_without_torch():
    code = (
        "import runpy, sys; r = runpy.run_path(sys.argv[1]); "
        "assert not any(m.split('.')[0] in ('torch', 'ld_ext') for m in sys.modules), 'imports torch or ld_ext'; "
        "print(' '.join(r['NAMES']))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REGISTRY_PY)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == list(registry.NAMES)
    # as the shell scripts (.ci/run, .ci/cuda_compile.sh) read it
    out = subprocess.run([sys.executable, str(REGISTRY_PY)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == list(registry.NAMES)
    out = subprocess.run([sys.executable, str(REGISTRY_PY), "--operators"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == list(registry.OPERATORS)


# ----------------------------------------------------------------------------- the consumers


def test_the_gpu_tests_cover_every_op():
    tree = ast.parse((REPO / "tests" / "test_cuda.py").read_text())
    tests = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    missing = [op for op in registry.NAMES if not any(t.startswith(f"test_{op}") for t in tests)]
    assert missing == [], f"tests/test_cuda.py has no test_<op>... function for {missing}"


def test_the_fuzzer_has_a_valid_call_and_an_oracle_for_every_operator():
    worker = _load(REPO / "tests" / "fuzz_ops_worker.py", "_fuzz_ops_worker")
    assert list(worker.SCHEMA) == list(registry.OPERATORS)
    for operator in registry.OPERATORS:
        assert worker.is_valid(operator, worker.valid_call(random.Random(0), operator)), operator


def test_the_cuda_emulator_checks_every_op():
    emu = _load(REPO / "tools" / "cuda_emu" / "run_emulated.py", "_run_emulated")
    assert set(emu.RUNNERS) == set(registry.NAMES)
    assert emu.REGISTRY.NAMES == registry.NAMES


# ----------------------------------------------------------------------------- the package's imports


def _ops_imports() -> dict[str, set[str]]:
    """ld_ext.ops module -> the ld_ext modules it imports (dotted, without the ld_ext prefix)."""
    found = {}
    for path in sorted(OPS_DIR.glob("*.py")):
        name = "ops" if path.stem == "__init__" else f"ops.{path.stem}"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level <= 2, f"{path.name}: an import from outside ld_ext"
                base = ["ops"] if node.level == 1 else []  # level 1: ld_ext.ops, level 2: ld_ext
                if node.module:
                    targets.add(".".join(base + [node.module]))
                else:  # from . import x / from .. import x
                    targets |= {".".join(base + [a.name]) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "ld_ext":
                targets.add(node.module.split(".", 1)[1] if "." in node.module else "")
            elif isinstance(node, ast.Import):
                targets |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("ld_ext.")}
        found[name] = targets
    return found


def test_the_import_parser_sees_the_package_edges():
    imports = _ops_imports()
    assert {"ops.compiled", "ops.checks"} <= imports["ops.api"]
    assert {"normalization"} <= imports["ops.jvp"]
    assert "_C" in imports["ops.compiled"]
    assert {"ops.api", "ops.autograd", "ops.fake"} <= imports["ops"]


def test_ops_imports_only_itself_c_and_normalization():
    bad = {m: sorted(t for t in ts if not (t == "ops" or t.startswith("ops.") or t in ("_C", "normalization")))
           for m, ts in _ops_imports().items()}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_no_import_cycle_inside_ops():
    graph = {m: {t for t in ts if t.startswith("ops.")} for m, ts in _ops_imports().items() if m != "ops"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join(path + [m]))
        if state.get(m) == 2 or m not in graph:
            return
        state[m] = 1
        for t in sorted(graph[m]):
            visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_the_registry_imports_nothing_but_the_standard_library():
    assert _ops_imports()["ops.registry"] == set()
    tree = ast.parse(REGISTRY_PY.read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert modules <= {"__future__", "sys", "typing"}
