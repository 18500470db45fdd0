#!/usr/bin/env bash
# One-shot check on a bare machine with a CUDA GPU (no network needed): build ld_ext in place with
# the CUDA kernels, run the CUDA tests, measure the must-hold GPU figures (benchmarks/gpu_figures.py),
# run the general GPU benchmark while time is left, and print a short table last.
# Meant to finish in under 6 minutes (LD_EXT_GPU_CHECK_BUDGET_S, default 345 s, caps the stages).
#
#   bash benchmarks/gpu_check.sh            # logs and results under $OUT (or bench_out/gpu_check)
#
# Knobs: TORCH_CUDA_ARCH_LIST (default: the visible GPU's architecture), MAX_JOBS (default: cores),
#        PYTHON (default python3), LD_EXT_GPU_CHECK_SKIP_BUILD=1 (reuse an existing build).
# What it leaves in the output folder (8 files at most, for a device lease that returns 8):
#   gpu_check.log build.log test_cuda.log gpu_figures.{json,md,log} bench.log bench.tgz
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/bench_out/gpu_check}"
mkdir -p "$DEST"
exec > >(tee "$DEST/gpu_check.log") 2>&1
T0=$(date +%s)
BUDGET="${LD_EXT_GPU_CHECK_BUDGET_S:-345}"
elapsed() { echo "$(( $(date +%s) - T0 ))"; }
left() { echo "$(( BUDGET - $(date +%s) + T0 ))"; }
cap() { local want=$1 keep=$2 l; l=$(( $(left) - keep )); (( l < want )) && want=$l; (( want < 10 )) && want=10; echo "$want"; }
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M UTC'): $(nvidia-smi -L 2>/dev/null | head -n 1)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null
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
if [[ "${LD_EXT_GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
  echo "== build (arch $TORCH_CUDA_ARCH_LIST, CUDA_HOME ${CUDA_HOME:-?}, $(nvcc --version 2>/dev/null | tail -n 2 | head -n 1)) ..."
  LD_EXT_FORCE_CUDA=1 LD_EXT_PTXAS_VERBOSE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout "$(cap 200 120)" \
    "$PY" setup.py build_ext --inplace >"$DEST/build.log" 2>&1
  build_rc=$?
  if [[ $build_rc -ne 0 ]]; then
    grep -n -E "error" "$DEST/build.log" | head -n 30
    tail -n 30 "$DEST/build.log"
    echo "== BUILD FAILED (rc=$build_rc) after $(elapsed)s"
    exit 1
  fi
  # ptxas resource report: the worst register count and any spills.
  regs=$(grep -oE "Used [0-9]+ registers" "$DEST/build.log" | awk '{print $2}' | sort -n | tail -n 1)
  spills=$(grep -E "bytes spill" "$DEST/build.log" | grep -vc " 0 bytes spill stores, 0 bytes spill loads")
  echo "== built in $(elapsed)s (ptxas: at most ${regs:-?} registers per thread; $spills kernel(s) with spills)"
  "$PY" benchmarks/ptxas_summary.py "$DEST/build.log" --match _rb_kernel | grep -E "<(f32|bf16)>" || true
fi
"$PY" -c "import ld_ext; print('== build_info', ld_ext.build_info())" || exit 1

# ---------------------------------------------------------------- CUDA tests
echo "== CUDA tests ..."
timeout "$(cap 150 150)" "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py >"$DEST/test_cuda.log" 2>&1
test_rc=$?
# Failures per test function (and parameter set), then the first messages.
grep -E "^(FAILED|ERROR)" "$DEST/test_cuda.log" | sed -E 's/^(FAILED|ERROR) ([^[ ]*).*/\2/' | sort | uniq -c | head -n 20
grep -E "^(FAILED|ERROR)" "$DEST/test_cuda.log" | cut -c1-220 | head -n 12
test_summary="$(tail -n 1 "$DEST/test_cuda.log")"
echo "== tests rc=$test_rc: $test_summary ($(elapsed)s)"

# ---------------------------------------------------------------- must-hold figures
echo "== benchmarks/gpu_figures.py --quick ..."
timeout "$(cap 180 20)" "$PY" benchmarks/gpu_figures.py --quick --out "$DEST" >"$DEST/gpu_figures.log" 2>&1
fig_rc=$?
echo "== figures rc=$fig_rc ($(elapsed)s)"

# ---------------------------------------------------------------- general benchmark, while time is left
bench_rc="skipped (no time left)"
if (( $(left) > 60 )); then
  echo "== benchmarks/run.py --device cuda --quick (at most $(cap 300 15)s) ..."
  BT="$(mktemp -d)"
  timeout "$(cap 300 15)" "$PY" benchmarks/run.py --device cuda --quick --out "$BT/bench" >"$DEST/bench.log" 2>&1
  bench_rc=$?
  tar -czf "$DEST/bench.tgz" -C "$BT" bench 2>/dev/null
  tail -n 12 "$DEST/bench.log"
fi

# ---------------------------------------------------------------- summary, printed last
echo
echo "== summary: build ok | tests rc=$test_rc ($test_summary) | bench rc=$bench_rc | figures rc=$fig_rc | total $(elapsed)s"
if [[ $fig_rc -eq 0 ]]; then
  cat "$DEST/gpu_figures.md"
else
  tail -n 25 "$DEST/gpu_figures.log"
fi
[[ $test_rc -eq 0 && $fig_rc -eq 0 ]]
