#!/usr/bin/env bash
# Compile-check ld_ext's CUDA kernels for sm_90 on a machine without a GPU.
#
# Creates (once) its own virtual environment .venv-cuda with a CUDA build of torch (torch==2.14.1,
# CUDA 13.0, matching the machine's nvcc 13.0), copies the sources to a temporary directory and
# builds the extension there with LD_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0, so that nothing is
# written into the checkout. Any compile error fails the script. The built library is then loaded
# (no GPU needed for that) and every op is checked to have a CUDA kernel registered.
#
# By default the CPU kernels (csrc/cpu/<op>.cpp, built and tested by the main build) are left out of
# this build; the ISA probe csrc/cpu/isa.cpp (the one CPU symbol ops.cpp uses, ld_ext::cpu_isa)
# stays, so the check compiles the CUDA sources, ops.cpp, autocast.cpp and isa.cpp only.
# LD_EXT_CUDA_COMPILE_FULL=1 builds everything (the CPU kernels against the CUDA torch too).
# Last, the same CUDA sources run on the CPU through the emulator in tools/cuda_emu.
#
# Knobs: LD_EXT_CUDA_VENV (venv path), LD_EXT_CUDA_TORCH (pip requirement for torch),
#        CUDA_HOME (toolkit; found from nvcc otherwise), MAX_JOBS (parallel compile jobs, default 2),
#        LD_EXT_SKIP_CUDA_COMPILE=1 (skip, saying so).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "${LD_EXT_SKIP_CUDA_COMPILE:-0}" == "1" ]]; then
  echo "cuda_compile: skipped (LD_EXT_SKIP_CUDA_COMPILE=1)"
  exit 0
fi

VENV="${LD_EXT_CUDA_VENV:-$ROOT/.venv-cuda}"
TORCH_REQ="${LD_EXT_CUDA_TORCH:-torch==2.14.1}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

# The CUDA toolkit: CUDA_HOME if set, else the directory above the real nvcc (resolving wrappers).
if [[ -z "${CUDA_HOME:-}" ]]; then
  for cand in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")"; do
    if [[ -x "$cand/bin/nvcc" && -f "$cand/include/cuda_runtime.h" ]]; then
      CUDA_HOME="$(readlink -f "$cand")"
      break
    fi
  done
fi
if [[ -z "${CUDA_HOME:-}" || ! -x "$CUDA_HOME/bin/nvcc" ]]; then
  echo "cuda_compile: FAILED: no CUDA toolkit found (set CUDA_HOME, or LD_EXT_SKIP_CUDA_COMPILE=1 to skip)" >&2
  exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "cuda_compile: toolkit $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1))"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1; then
  echo "cuda_compile: creating $VENV with $TORCH_REQ"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_REQ" numpy ninja setuptools wheel
fi
"$VENV/bin/python" -c "import torch; print('cuda_compile: torch', torch.__version__, 'CUDA', torch.version.cuda)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ld_ext_cuda_compile.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src"
cp -r "$ROOT/csrc" "$ROOT/ld_ext" "$ROOT/setup.py" "$ROOT/pyproject.toml" "$WORK/src/"
[[ -f "$ROOT/README.md" ]] && cp "$ROOT/README.md" "$WORK/src/"
find "$WORK/src" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
if [[ "${LD_EXT_CUDA_COMPILE_FULL:-0}" != "1" ]]; then
  find "$WORK/src/csrc/cpu" -name '*.cpp' ! -name isa.cpp -delete
  [[ -f "$WORK/src/csrc/cpu/isa.cpp" ]] || { echo "cuda_compile: FAILED: csrc/cpu/isa.cpp (the ISA probe ops.cpp needs) is missing" >&2; exit 1; }
fi

cd "$WORK/src"
start=$(date +%s)
set +e
LD_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="${MAX_JOBS:-2}" \
  "$VENV/bin/python" setup.py build_ext --inplace >"$WORK/build.log" 2>&1
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  grep -n -E "error|Error" "$WORK/build.log" | head -n 60 >&2 || true
  echo "---- last lines of the build log ----" >&2
  tail -n 40 "$WORK/build.log" >&2
  echo "cuda_compile: FAILED: the CUDA build did not compile (rc=$rc)" >&2
  exit 1
fi
if grep -q -E "warning #|warning:" "$WORK/build.log"; then
  echo "cuda_compile: compiler warnings:"
  # Unique warnings to a variable first: `... | head` fails under pipefail once head quits early.
  warnings="$(grep -E "warning #|warning:" "$WORK/build.log" | sort -u)"
  head -n 20 <<<"$warnings"
fi
SO="$(ls ld_ext/_C*.so)"
echo "cuda_compile: built $(basename "$SO") in $(( $(date +%s) - start )) s"

# Load the library (static registration runs; no GPU needed) and check every operator of the op
# registry (ld_ext/ops/registry.py, plain Python read by its path) has a CUDA kernel.
"$VENV/bin/python" - "$SO" ld_ext/ops/registry.py <<'EOF'
import runpy
import sys
import torch

torch.ops.load_library(sys.argv[1])
registry = runpy.run_path(sys.argv[2])
ops = list(registry["OPERATORS"])
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ld_ext::{op}", "CUDA")]
if missing:
    sys.exit(f"cuda_compile: FAILED: no CUDA kernel registered for {missing}")
fwd = list(registry["NAMES"])
no_autocast = [op for op in fwd if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ld_ext::{op}", "AutocastCUDA")]
if no_autocast:
    sys.exit(f"cuda_compile: FAILED: no AutocastCUDA kernel registered for {no_autocast}")
print(f"cuda_compile: OK: {len(ops)} ops have CUDA kernels (sm_90), {len(fwd)} have autocast kernels")
EOF

# Run the same kernel source on the CPU through the emulator in tools/cuda_emu (indexing, tiling,
# barriers and launch plans against the float64 reference), unless LD_EXT_SKIP_CUDA_EMULATION=1.
if [[ "${LD_EXT_SKIP_CUDA_EMULATION:-0}" == "1" ]]; then
  echo "cuda_compile: emulated run skipped (LD_EXT_SKIP_CUDA_EMULATION=1)"
else
  "$VENV/bin/python" "$ROOT/tools/cuda_emu/run_emulated.py" --build-dir "$WORK/emu"
fi
