#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch and everything ld_ext needs, and build ld_ext
# into it (editable: the compiled ld_ext/_C*.so lands next to the Python sources).
#
#   bash scripts/setup_env.sh          # idempotent; safe to rerun after pulling new code
#
# A rerun with nothing changed does not rebuild: the build is skipped when a stamp in the venv
# (a hash of csrc/, setup.py, pyproject.toml, the torch and Python versions and the build knobs)
# matches and the compiled module of this checkout imports. LD_EXT_REBUILD=1 forces the build.
#
# Knobs: PYTHON (interpreter, default python3), LD_EXT_VENV (default .venv),
#        LD_EXT_TORCH (pip requirement for torch, default torch==2.13.0, the CPU build; with a
#        CUDA build of torch and nvcc present the CUDA kernels are compiled too).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="${LD_EXT_VENV:-.venv}"
TORCH_REQ="${LD_EXT_TORCH:-torch==2.13.0}"
EXTRAS="medical,demo,test"
t0=$(date +%s)
say() { echo "setup_env [$(( $(date +%s) - t0 ))s]: $*"; }

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
# numpy first: torch imported without numpy prints "Failed to initialize NumPy".
if ! "$VPY" -c "import numpy" >/dev/null 2>&1; then
  say "installing numpy"
  "${PIP[@]}" install -q numpy
fi
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  say "installing $TORCH_REQ"
  "${PIP[@]}" install -q "$TORCH_REQ"
fi

# The build stamp: what the compiled module depends on.
stamp_file="$VENV/.ld_ext_build_stamp"
stamp="$( { find csrc setup.py pyproject.toml -type f ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum;
            "$VPY" -c 'import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)';
            env | grep -E '^(LD_EXT_(NO|FORCE)_CUDA|LD_EXT_DEBUG|TORCH_CUDA_ARCH_LIST|CUDA_HOME)=' | LC_ALL=C sort || true;
            echo "$EXTRAS"; } | sha256sum | cut -d' ' -f1 )"
up_to_date() {
  [ "${LD_EXT_REBUILD:-0}" != "1" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] &&
    "$VPY" -c "
import os, sys, ld_ext, ld_ext._C
sys.exit(0 if os.path.dirname(os.path.abspath(ld_ext.__file__)) == os.path.join(sys.argv[1], 'ld_ext') else 1)
" "$ROOT" >/dev/null 2>&1
}

if up_to_date; then
  say "ld_ext is up to date (csrc/, setup.py, pyproject.toml and torch unchanged since the last build); not rebuilding"
else
  rm -f "$stamp_file"
  # Build requirements first: the extension is built against the installed torch (no isolation).
  "${PIP[@]}" install -q setuptools wheel ninja
  say "building ld_ext (C++ kernels$("$VPY" -c 'import torch; print(" + CUDA if nvcc is found" if torch.version.cuda else "")'); several minutes on 2 cores; compile steps are shown as they finish)"
  log="$VENV/ld_ext_build.log"
  # -v streams the build's output into the log; only ninja's "[i/n]" steps are shown here.
  "${PIP[@]}" install -v --no-build-isolation -e ".[$EXTRAS]" >"$log" 2>&1 </dev/null &
  pid=$!
  tail -n +1 -F --pid=$pid "$log" 2>/dev/null |
    sed -nuE 's#^ *\[([0-9]+/[0-9]+)\] .* -c ([^ ]*/)?(csrc/[^ ]+) .*#  compiled [\1] \3#p; s#^ *\[([0-9]+/[0-9]+)\] .* -o ([^ ]*/)?([^ /]+\.so)( .*)?$#  linked [\1] \3#p' || true
  if ! wait $pid; then
    echo "setup_env: the build failed; the end of $log:" >&2
    tail -n 60 "$log" >&2
    exit 1
  fi
  echo "$stamp" >"$stamp_file"
fi
"$VPY" -c "import ld_ext, json; print('setup_env: ready', json.dumps(ld_ext.build_info()))"
say "done"
