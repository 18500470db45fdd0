"""Per-kernel registers and spills from a build log made with LD_EXT_PTXAS_VERBOSE=1.

    python benchmarks/ptxas_summary.py BUILD_LOG [--match rb_kernel]

Prints one line per kernel instantiation whose (mangled) name contains --match: the kernel,
its input type, registers per thread, spill stores/loads in bytes and the stack frame.
"""
from __future__ import annotations

import argparse
import re
import sys

_TYPES = [("N3c108BFloat16E", "bf16"), ("N3c104HalfE", "f16"), ("d", "f64"), ("f", "f32")]


def _describe(mangled: str) -> str:
    m = re.search(r"\d+([a-z_]+kernel)I(.*)$", mangled)
    if not m:
        return mangled
    name, args = m.group(1), m.group(2)
    flags = "".join(f",{b}" for b in re.findall(r"Lb([01])E", args))  # bool template arguments
    for code, label in _TYPES:
        if args.startswith(code):
            return f"{name}<{label}{flags}>"
    return name


def parse(text: str) -> list[dict]:
    rows: list[dict] = []
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = {"kernel": m.group(1)}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and "stack" not in current:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and "regs" not in current:
            current["regs"] = int(m.group(1))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log")
    ap.add_argument("--match", default="rb_kernel", help="substring of the kernels to list (default rb_kernel)")
    args = ap.parse_args(argv)
    with open(args.log, errors="replace") as f:
        rows = [r for r in parse(f.read()) if args.match in r["kernel"]]
    if not rows:
        print(f"ptxas_summary: no kernel matching {args.match!r} in {args.log}")
        return 1
    seen = set()
    for r in rows:
        key = (r["kernel"], r.get("regs"))
        if key in seen:  # the same kernel compiled for the same arch twice
            continue
        seen.add(key)
        print(f"  {_describe(r['kernel']):44s} {r.get('regs', '?'):>4} regs  spill {r.get('spill_st', '?')}/"
              f"{r.get('spill_ld', '?')} B  stack {r.get('stack', '?')} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
