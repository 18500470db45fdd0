"""The one list of ld_ext's fused ops. Everything that enumerates the ops reads it from here.

Each op ``foo`` is a pair of operators, ``torch.ops.ld_ext.foo`` and ``foo_backward`` (schemas in
csrc/ops.cpp), with kernels in ``csrc/cpu/foo.cpp`` and ``csrc/cuda/foo.cu``, the public function
``ld_ext.foo`` and the tests ``tests/test_foo.py``; tests/test_ops_registry.py checks that all of
these exist for exactly the ops listed here, and the consumers (the autograd registration in
ld_ext/ops/autograd.py, tests/test_cuda.py, tests/fuzz_ops_worker.py, tests/test_errors.py,
tools/cuda_emu/run_emulated.py, .ci/cuda_compile.sh, .ci/run) fail loudly on an op they do not
cover.

Plain Python, no imports from torch or ld_ext, so it can be read without building or loading
anything: by path (``runpy.run_path``), or from a shell:

    python3 ld_ext/ops/registry.py              # the ops, one per line
    python3 ld_ext/ops/registry.py --operators  # every operator: each op and its backward
"""

from __future__ import annotations

import sys
from typing import NamedTuple

__all__ = ["Op", "OPS", "NAMES", "OPERATORS", "backward"]


class Op(NamedTuple):
    name: str  # the operator, the public function, the kernel and test files (see above)
    short: str  # its name for `tools/cuda_emu/run_emulated.py --only`


OPS: tuple[Op, ...] = (
    Op("region_features", "rf"),
    Op("region_discrimination", "rd"),
    Op("pixel_cluster_similarity", "pcs"),
    Op("patch_discrimination", "pd"),
)

NAMES: tuple[str, ...] = tuple(op.name for op in OPS)


def backward(name: str) -> str:
    """The name of op ``name``'s backward operator."""
    return f"{name}_backward"


# Every operator of torch.ops.ld_ext: each op, then its backward.
OPERATORS: tuple[str, ...] = tuple(n for name in NAMES for n in (name, backward(name)))


def main(argv: list[str]) -> int:
    if argv not in ([], ["--operators"]):
        print(f"usage: {sys.argv[0]} [--operators]", file=sys.stderr)
        return 2
    print("\n".join(OPERATORS if argv else NAMES))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
