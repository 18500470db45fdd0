"""Translate ld_ext's CUDA sources into C++ that runs on the CPU with emu.h.

    python csrc/cuda/emu/translate.py OUT_DIR      # writes OUT_DIR/{ld_ext.h,checks.h,schemas.cpp,cuda/*}

Mechanical rewrites only (the kernels' code is left as written): c10/cuda includes become emu.h,
`extern __shared__` buffers point at the emulated shared memory, static `__shared__` arrays become
function statics (blocks run one at a time), `kernel<<<grid, block, smem, stream>>>(args)` (at the
start of a statement) becomes `emu::launch(kernel, {grid, block, smem})(args)`, and the ops are
registered as CPU kernels of a separate library `ld_ext_emu` with the schemas of csrc/ops.cpp.
"""
from __future__ import annotations

import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(os.path.dirname(HERE))


def translate(text: str) -> str:
    s = re.sub(r"#include <c10/cuda/[^>]*>\n", "", text)
    s = s.replace("#include <cuda_runtime.h>", '#include "emu.h"')
    s = s.replace("extern __shared__ __align__(16) unsigned char smem_raw[];", "unsigned char* smem_raw = emu::g_smem;")
    s = re.sub(r"__shared__ (\w+) (\w+)\[(\w+)\];", r"static \1 \2_emu_arr[\3]; \1* \2 = \2_emu_arr;", s)
    def launch(m: re.Match) -> str:
        cfg = re.sub(r"\bstream\b", "0", m.group(3))
        return m.group(1) + "emu::launch(" + m.group(2) + ", emu::Cfg{" + cfg + "})("

    s = re.sub(r"^(\s*)([\w:]+(?:<[^;\n]*?>)?)<<<(.*?)>>>\(", launch, s, flags=re.M | re.S)
    if "extern __shared__" in s:
        raise SystemExit("translate.py: a dynamic shared-memory declaration was not recognised")
    if "<<<" in s:
        raise SystemExit("translate.py: a kernel launch was not recognised (launches must start a statement)")
    s = s.replace('TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");', "(void)t; (void)op; (void)name;")
    s = s.replace("TORCH_LIBRARY_IMPL(ld_ext, CUDA, m)", "TORCH_LIBRARY_IMPL(ld_ext_emu, CPU, m)")
    s = s.replace(".get_device()", ".get_device() * 0")
    return s


def main(out: str) -> None:
    os.makedirs(os.path.join(out, "cuda"), exist_ok=True)
    for header in ("ld_ext.h", "checks.h"):
        with open(os.path.join(CSRC, header)) as f:
            text = f.read()
        with open(os.path.join(out, header), "w") as f:
            f.write(text)
    with open(os.path.join(HERE, "emu.h")) as f:
        emu = f.read()
    with open(os.path.join(out, "cuda", "emu.h"), "w") as f:
        f.write(emu)
    for path in sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")) + glob.glob(os.path.join(CSRC, "cuda", "*.cuh"))):
        with open(path) as f:
            text = translate(f.read())
        name = os.path.basename(path)
        if name.endswith(".cu"):
            name = name[:-3] + ".cpp"
        with open(os.path.join(out, "cuda", name), "w") as f:
            f.write(text)
    with open(os.path.join(CSRC, "ops.cpp")) as f:
        ops = f.read()
    defs = ops[ops.index("TORCH_LIBRARY(ld_ext, m)") : ops.index("PYBIND11_MODULE")]
    with open(os.path.join(out, "schemas.cpp"), "w") as f:
        f.write("#include <torch/library.h>\n\n" + defs.replace("TORCH_LIBRARY(ld_ext, m)", "TORCH_LIBRARY(ld_ext_emu, m)"))


if __name__ == "__main__":
    main(sys.argv[1])
