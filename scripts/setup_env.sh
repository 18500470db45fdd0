#!/usr/bin/env bash
# Set up a virtual environment in .venv with torch and everything ld_ext needs, and build ld_ext
# into it (editable: the compiled ld_ext/_C*.so lands next to the Python sources).
#
#   bash scripts/setup_env.sh          # idempotent; safe to rerun after pulling new code
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

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup_env: installing $TORCH_REQ"
  "${PIP[@]}" install -q "$TORCH_REQ"
fi
# Build requirements first: the extension is built against the installed torch (no isolation).
"${PIP[@]}" install -q setuptools wheel ninja
echo "setup_env: building ld_ext (C++ kernels$("$VENV/bin/python" -c 'import torch; print(" + CUDA if nvcc is found" if torch.version.cuda else "")'); the ready line says what was built)"
"${PIP[@]}" install -q --no-build-isolation -e ".[medical,test]"
"$VENV/bin/python" -c "import ld_ext, json; print('setup_env: ready', json.dumps(ld_ext.build_info()))"
