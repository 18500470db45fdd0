#!/usr/bin/env bash
# One-shot check on a bare machine with a CUDA GPU (no network needed): build ld_ext in place with
# the CUDA kernels, run the CUDA tests, run the general GPU benchmark, and print the must-hold GPU
# figures (benchmarks/gpu_figures.py) as the last thing. Meant to finish in under 6 minutes.
#
#   bash benchmarks/gpu_check.sh            # logs and results under $OUT (or bench_out/gpu_check)
#
# Knobs: TORCH_CUDA_ARCH_LIST (default: the visible GPU's architecture), MAX_JOBS (default: cores),
#        PYTHON (default python3), LD_EXT_GPU_CHECK_SKIP_BUILD=1 (reuse an existing build).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/bench_out/gpu_check}"
mkdir -p "$DEST"
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "== gpu_check: $(nvidia-smi -L 2>/dev/null | head -n 1)"
"$PY" -c "import torch, sys; print('== python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"

if [[ -z "${CUDA_HOME:-}" ]]; then
  for cand in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent)")")")"; do
    if [[ -x "$cand/bin/nvcc" ]]; then export CUDA_HOME="$cand"; break; fi
  done
fi
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null || echo 9.0)"
fi
export TORCH_CUDA_ARCH_LIST

# ---------------------------------------------------------------- build
build_rc=0
if [[ "${LD_EXT_GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
  echo "== build (arch $TORCH_CUDA_ARCH_LIST, CUDA_HOME ${CUDA_HOME:-?}) ..."
  LD_EXT_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout 240 \
    "$PY" setup.py build_ext --inplace >"$DEST/build.log" 2>&1
  build_rc=$?
  if [[ $build_rc -ne 0 ]]; then
    grep -n -E "error" "$DEST/build.log" | head -n 30
    tail -n 30 "$DEST/build.log"
    echo "== BUILD FAILED (rc=$build_rc) after $(elapsed)"
    exit 1
  fi
  echo "== built in $(elapsed)"
fi
"$PY" -c "import ld_ext; print('== build_info', ld_ext.build_info())" || exit 1

# ---------------------------------------------------------------- CUDA tests
echo "== CUDA tests ..."
timeout 150 "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider tests/test_cuda.py >"$DEST/test_cuda.log" 2>&1
test_rc=$?
grep -E "^(FAILED|ERROR)|Error|assert" "$DEST/test_cuda.log" | head -n 20
test_summary="$(tail -n 1 "$DEST/test_cuda.log")"
echo "== tests rc=$test_rc: $test_summary ($(elapsed))"

# ---------------------------------------------------------------- general benchmark (another helper's entry point)
bench_rc="absent"
if [[ -f benchmarks/run.py ]]; then
  echo "== benchmarks/run.py --device cuda --quick ..."
  timeout 90 "$PY" benchmarks/run.py --device cuda --quick --out "$DEST/bench" >"$DEST/bench.log" 2>&1
  bench_rc=$?
  tail -n 15 "$DEST/bench.log"
  echo "== bench rc=$bench_rc ($(elapsed))"
fi

# ---------------------------------------------------------------- must-hold figures, printed last
timeout 150 "$PY" benchmarks/gpu_figures.py --quick --out "$DEST" >"$DEST/gpu_figures.log" 2>&1
fig_rc=$?
echo
echo "== summary: build ok | tests rc=$test_rc ($test_summary) | bench rc=$bench_rc | figures rc=$fig_rc | total $(elapsed)"
if [[ $fig_rc -eq 0 ]]; then
  cat "$DEST/gpu_figures.md"
else
  tail -n 20 "$DEST/gpu_figures.log"
fi
[[ $test_rc -eq 0 && $fig_rc -eq 0 ]]
