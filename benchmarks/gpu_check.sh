#!/usr/bin/env bash
# One-shot check on a bare machine with a CUDA GPU (no network needed): build ld_ext in place with
# the CUDA kernels, run the CUDA tests, measure the must-hold kernel figures
# (benchmarks/gpu_figures.py), time end-to-end LD training steps at 448x448 with the fused vs the
# plain-PyTorch losses, with and without bf16 AMP (benchmarks/gpu_train.py), pre-train for about 3
# minutes on the shipped MNI152 slices at 128x128 (the checkpoint comes back), benchmark the LD head in
# 3-D at 64^3 and 96^3 (ld-ext bench --head3d), run the general GPU benchmark while time is left, and
# print a short table last.
# Meant to finish in under 8 minutes (LD_EXT_GPU_CHECK_BUDGET_S, default 470 s, caps the stages).
#
#   python benchmarks/gpu_data.py           # HERE, before the device call: MNI152 slices as PNGs in
#                                           # .gpu_data/mni152 (the GPU machine has no nilearn); carry .gpu_data
#   bash benchmarks/gpu_check.sh            # logs and results under $OUT (or bench_out/gpu_check)
#   LD_EXT_GPU_CHECK_CPU=1 bash benchmarks/gpu_check.sh   # logic check on a CPU machine: no build, no
#                                           # CUDA tests/figures, tiny training sizes
#
# Knobs: TORCH_CUDA_ARCH_LIST (default: the visible GPU's architecture), MAX_JOBS (default: cores),
#        PYTHON (default python3), LD_EXT_GPU_CHECK_SKIP_BUILD=1 (reuse an existing build),
#        LD_EXT_GPU_DATA (default .gpu_data/mni152), LD_EXT_GPU_PRETRAIN_MIN (default 3).
# What it leaves in the output folder (8 files at most, for a device lease that returns 8):
#   gpu_check.log build.log test_cuda.log gpu_figures.md gpu_train.md pretrain.log model.pt
#   extra.tgz (gpu_figures.{json,log}, gpu_train.{json,log}, head3d.log, head3d/{head3d.md,head3d.json},
#              pretrain metrics/losses.png, bench/); head3d.md is also printed in gpu_check.log
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/bench_out/gpu_check}"
mkdir -p "$DEST"
exec > >(tee "$DEST/gpu_check.log") 2>&1
T0=$(date +%s)
BUDGET="${LD_EXT_GPU_CHECK_BUDGET_S:-470}"
CPU_MODE="${LD_EXT_GPU_CHECK_CPU:-0}"
EXTRA="$(mktemp -d)"   # files that travel back packed in extra.tgz
pack() { tar -czf "$DEST/extra.tgz" -C "$EXTRA" . 2>/dev/null; }
trap pack EXIT
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
if [[ "$CPU_MODE" == "1" ]]; then
  echo "== CPU logic check (LD_EXT_GPU_CHECK_CPU=1): no build, no CUDA tests or kernel figures, tiny sizes"
elif [[ "${LD_EXT_GPU_CHECK_SKIP_BUILD:-0}" != "1" ]]; then
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
test_rc=skipped; test_summary="CPU mode"
if [[ "$CPU_MODE" != "1" ]]; then
  echo "== CUDA tests ..."
  timeout "$(cap 150 300)" "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py >"$DEST/test_cuda.log" 2>&1
  test_rc=$?
  # Failures per test function (and parameter set), then the first messages.
  grep -E "^(FAILED|ERROR)" "$DEST/test_cuda.log" | sed -E 's/^(FAILED|ERROR) ([^[ ]*).*/\2/' | sort | uniq -c | head -n 20
  grep -E "^(FAILED|ERROR)" "$DEST/test_cuda.log" | cut -c1-220 | head -n 12
  test_summary="$(tail -n 1 "$DEST/test_cuda.log")"
  echo "== tests rc=$test_rc: $test_summary ($(elapsed)s)"
fi

# ---------------------------------------------------------------- must-hold kernel figures
fig_rc=skipped
if [[ "$CPU_MODE" != "1" ]]; then
  echo "== benchmarks/gpu_figures.py --quick ..."
  timeout "$(cap 150 250)" "$PY" benchmarks/gpu_figures.py --quick --out "$EXTRA" >"$EXTRA/gpu_figures.log" 2>&1
  fig_rc=$?
  cp "$EXTRA/gpu_figures.md" "$DEST/" 2>/dev/null
  echo "== figures rc=$fig_rc ($(elapsed)s)"
fi

# ---------------------------------------------------------------- end-to-end training steps
if [[ "$CPU_MODE" == "1" ]]; then TRAIN_ARGS=(--device cpu --size 32 --repeats 1); else TRAIN_ARGS=(--size 448 --batch-size 4); fi
echo "== benchmarks/gpu_train.py ${TRAIN_ARGS[*]} ..."
timeout "$(cap 120 200)" "$PY" benchmarks/gpu_train.py "${TRAIN_ARGS[@]}" --out "$EXTRA" >"$EXTRA/gpu_train.log" 2>&1
train_rc=$?
cp "$EXTRA/gpu_train.md" "$DEST/" 2>/dev/null || tail -n 20 "$EXTRA/gpu_train.log"
echo "== end-to-end steps rc=$train_rc ($(elapsed)s)"

# ---------------------------------------------------------------- the LD head in 3-D (issue 23)
# fused vs broadcast (published) vs eager bmm vs compile at 64^3 and 96^3, N = 2, 4, 8: time and peak
# memory under a guard (3/4 of the GPU; the cases in one process on CUDA); head3d.md is rewritten after
# every case, so a timeout keeps what was measured.
if [[ "$CPU_MODE" == "1" ]]; then
  HEAD3D_ARGS=(--device cpu --tiny --no-compile --repeats 1 --warmup 0)
else
  HEAD3D_ARGS=(--device cuda --repeats 3 --warmup 1)
fi
echo "== ld-ext bench --head3d ${HEAD3D_ARGS[*]} (at most $(cap 120 200)s) ..."
timeout "$(cap 120 200)" "$PY" -m ld_ext.bench --head3d "${HEAD3D_ARGS[@]}" --seed 23 --out "$EXTRA/head3d" \
  >"$EXTRA/head3d.log" 2>&1
head3d_rc=$?
grep -E "^bench \[" "$EXTRA/head3d.log" | tail -n 3
echo "== 3-D head rc=$head3d_rc ($(elapsed)s)"

# ---------------------------------------------------------------- short pre-training on MNI152 slices
DATA="${LD_EXT_GPU_DATA:-$ROOT/.gpu_data/mni152}"
pre_rc="skipped (no $DATA: run benchmarks/gpu_data.py before the device call and carry .gpu_data)"
if [[ -d "$DATA" ]]; then
  PT="$(mktemp -d)/pretrain"
  if [[ "$CPU_MODE" == "1" ]]; then
    PRE_ARGS=(--device cpu --size 64 --epochs1 1 --epochs2 1 --steps-per-epoch 2)
  else
    PRE_ARGS=(--device cuda --size 128 --max-minutes "${LD_EXT_GPU_PRETRAIN_MIN:-3}")
  fi
  echo "== ld-ext pretrain --data $DATA ${PRE_ARGS[*]} ..."
  timeout "$(cap 240 15)" "$PY" -m ld_ext.cli pretrain --data "$DATA" --out "$PT" --no-progress "${PRE_ARGS[@]}" >"$DEST/pretrain.log" 2>&1
  pre_rc=$?
  cp "$PT/model.pt" "$DEST/" 2>/dev/null
  mkdir -p "$EXTRA/pretrain"
  cp "$PT"/*.jsonl "$PT"/*.png "$EXTRA/pretrain/" 2>/dev/null
  tail -n 4 "$DEST/pretrain.log"
  echo "== pretrain rc=$pre_rc, model.pt $( [[ -f "$DEST/model.pt" ]] && echo "returned ($(du -h "$DEST/model.pt" | cut -f1))" || echo MISSING ) ($(elapsed)s)"
fi

# ---------------------------------------------------------------- general benchmark, while time is left
bench_rc="skipped (no time left)"
if [[ "$CPU_MODE" != "1" ]] && (( $(left) > 60 )); then
  echo "== benchmarks/run.py --device cuda --quick (at most $(cap 300 15)s) ..."
  timeout "$(cap 300 15)" "$PY" benchmarks/run.py --device cuda --quick --sections headline,ops,sweeps,e2e --full --out "$EXTRA/bench" >"$EXTRA/bench.log" 2>&1
  bench_rc=$?
  tail -n 12 "$EXTRA/bench.log"
fi

# ---------------------------------------------------------------- summary, printed last
echo
echo "== summary: build ok | tests rc=$test_rc ($test_summary) | figures rc=$fig_rc | e2e rc=$train_rc | 3-D head rc=$head3d_rc | pretrain rc=$pre_rc | bench rc=$bench_rc | total $(elapsed)s"
[[ -f "$DEST/gpu_figures.md" ]] && cat "$DEST/gpu_figures.md"
[[ "$fig_rc" != "0" && "$fig_rc" != "skipped" ]] && tail -n 25 "$EXTRA/gpu_figures.log"
[[ -f "$DEST/gpu_train.md" ]] && cat "$DEST/gpu_train.md"
[[ -f "$EXTRA/head3d/head3d.md" ]] && cat "$EXTRA/head3d/head3d.md"
[[ ( "$test_rc" == "0" || "$test_rc" == "skipped" ) && ( "$fig_rc" == "0" || "$fig_rc" == "skipped" ) && $train_rc -eq 0 ]]
