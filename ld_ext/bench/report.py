"""What a benchmark run writes: the CSV (one row per measurement), the markdown tables (ratios =
implementation time / fused time, measured in the same run) and the sweep plots.
"""

from __future__ import annotations

import csv

from ..viz import new_figure
from .specs import IMPLS, MODES, Case

__all__ = [
    "CSV_COLUMNS",
    "MD_COLUMNS",
    "write_csv",
    "markdown_table",
    "headline_markdown",
    "headline_targets",
    "summary_lines",
    "e2e_markdown",
    "plot_sweep",
]

CSV_COLUMNS = [
    "section",
    "sweep",
    "op",
    "mode",
    "impl",
    "device",
    "dtype",
    "N",
    "D",
    "K",
    "H",
    "W",
    "P",
    "M",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "max_ms",
    "repeats",
    "calls_per_sample",
    "input_sets",
    "speedup_of_fused",
    "bytes",
    "flops",
    "floor_ms",
    "floor_bound",
    "x_floor",
    "achieved_GBps",
    "pct_copy_bw",
    "peak_mem_bytes",
    "extra_mem_pct",
    "mem_method",
    "compile",
    "status",
]


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_val(r.get(k, "")) for k in CSV_COLUMNS})


def _csv_val(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _fmt_ms(v) -> str:
    if v == "" or v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _fmt_x(v) -> str:
    if v == "" or v is None:
        return "-"
    return f"{v:.0f}x" if v >= 100 else f"{v:.2f}x"


def _fmt_mb(v) -> str:
    return "-" if v == "" or v is None else f"{v / 2**20:.1f}"


def sweep_label(row: dict, sweep: str) -> str:
    """The x-axis label of a result row in ``sweep`` (its size, or the swept parameter's value)."""
    if sweep == "P":
        return f"{row['H']}x{row['W']}"
    if sweep in ("K", "D", "N"):
        return f"{sweep}={row[sweep]}"
    if sweep == "dtype":
        return row["dtype"]
    if row["op"] == "patch_discrimination":
        return f"M={row['M']} D={row['D']}"
    if row["op"] == "region_discrimination":
        return f"N={row['N']} K={row['K']} D={row['D']}"
    return f"N={row['N']} D={row['D']} K={row['K']} {row['H']}x{row['W']}"


MD_COLUMNS = [
    "case",
    "mode",
    "fused ms",
    "eager ms",
    "compile ms",
    "published ms",
    "eager/fused",
    "compile/fused",
    "published/fused",
    "fused % copy bw",
    "fused x floor",
    "fused peak MB",
    "eager peak MB",
    "published peak MB",
]


def markdown_table(rows: list[dict], sweep: str = "") -> str:
    """One line per (op, case, mode); implementations side by side; ratios = impl time / fused time.

    An ``op`` column comes first when the rows hold more than one op."""
    groups: dict = {}
    for r in rows:
        key = (sweep_label(r, sweep), r["mode"], r["op"])
        groups.setdefault(key, {})[r["impl"]] = r
    several_ops = len({r["op"] for r in rows}) > 1
    cols = (["op"] if several_ops else []) + MD_COLUMNS
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (label, mode, op), by in groups.items():

        def get(impl, col):
            r = by.get(impl)
            return "" if r is None else r.get(col, "")

        def ms(impl):
            r = by.get(impl)
            if r is None:
                return "n/a"
            if r["status"] != "ok":
                return "skip" if str(r["status"]).startswith("skipped") else "error"
            return _fmt_ms(r["median_ms"])

        f = by.get("fused", {})
        pct = f.get("pct_copy_bw", "")
        cells = [
            label,
            mode,
            ms("fused"),
            ms("eager"),
            ms("compile"),
            ms("published"),
            _fmt_x(get("eager", "speedup_of_fused")),
            _fmt_x(get("compile", "speedup_of_fused")),
            _fmt_x(get("published", "speedup_of_fused")),
            "-" if pct == "" else f"{pct:.0f}%",
            _fmt_x(f.get("x_floor", "")),
            _fmt_mb(get("fused", "peak_mem_bytes")),
            _fmt_mb(get("eager", "peak_mem_bytes")),
            _fmt_mb(get("published", "peak_mem_bytes")),
        ]
        if several_ops:
            cells.insert(0, op)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headline_markdown(rows: list[dict], extra: dict, case: Case) -> str:
    by = {r["impl"]: r for r in rows}
    f = by.get("fused")
    lines = [
        "| impl | median ms | IQR ms | time / fused | x floor | peak MB (profiler) | extra beyond grads, % of inputs |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in ("fused", "eager", "compile"):
        r = by.get(impl)
        if r is None:
            continue
        if r["status"] != "ok":
            lines.append(f"| {impl} | {r['status']} | | | | | |")
            continue
        pct = r.get("extra_mem_pct", "")
        lines.append(
            f"| {impl} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r['q1_ms'])}-{_fmt_ms(r['q3_ms'])} | "
            f"{_fmt_x(r['speedup_of_fused'])} | {_fmt_x(r.get('x_floor', ''))} | "
            f"{_fmt_mb(r.get('peak_mem_bytes', ''))} | "
            f"{'-' if pct == '' else f'{pct:.1f}%'} |"
        )
    out = ["\n".join(lines), ""]
    if f is not None and f.get("floor_ms", "") != "":
        in_bytes = (case.N * case.D * case.P + case.N * case.K * case.P) * case.itemsize
        out.append(
            f"Floor {f['floor_ms']:.2f} ms ({f['floor_bound']}-bound): {f['bytes'] / 1e6:.0f} MB must move "
            f"(inputs {in_bytes / 1e6:.0f} MB read in forward and backward, gradients written) at the measured copy "
            f"bandwidth {extra['bandwidth'] / 1e9:.1f} GB/s = {f['bytes'] / extra['bandwidth'] * 1e3:.2f} ms; "
            f"{f['flops'] / 1e9:.2f} GFLOP at the measured matmul rate {extra['rate'] / 1e9:.0f} GFLOP/s = "
            f"{f['flops'] / extra['rate'] * 1e3:.2f} ms."
        )
    for impl, res in extra.get("rss", {}).items():
        if res is None:
            continue
        if "error" in res:
            out.append(f"RSS probe ({impl}): failed: {res['error']}")
        else:
            grads = res["input_bytes"]
            out.append(
                f"RSS probe ({impl}): peak RSS increase {res['peak_rss_increase'] / 2**20:.1f} MB, i.e. "
                f"{100.0 * (res['peak_rss_increase'] - grads) / res['input_bytes']:.1f}% of the inputs beyond "
                "the gradients."
            )
    targets = headline_targets(rows)
    if targets:
        out.append(targets)
    return "\n".join(out)


def headline_targets(rows: list[dict]) -> str:
    """The headline's targets (fused >= 6x eager, faster than compile, extra memory < 10% of the
    inputs), met or not, as one sentence; "" when the fused row did not run."""
    by = {r["impl"]: r for r in rows}
    f = by.get("fused")
    if f is None or f["status"] != "ok":
        return ""
    checks = []
    e, c = by.get("eager"), by.get("compile")
    if e is not None and e["status"] == "ok":
        checks.append(
            f"fused >= 6x eager: {'met' if e['speedup_of_fused'] >= 6 else 'NOT met'} ({e['speedup_of_fused']:.2f}x)"
        )
    if c is not None and c["status"] == "ok":
        checks.append(
            f"fused faster than compile: {'met' if c['speedup_of_fused'] > 1 else 'NOT met'} "
            f"({c['speedup_of_fused']:.2f}x)"
        )
    if f.get("extra_mem_pct", "") != "":
        checks.append(
            f"extra memory < 10% of inputs: {'met' if f['extra_mem_pct'] < 10 else 'NOT met'} "
            f"({f['extra_mem_pct']:.1f}%)"
        )
    return "Targets: " + "; ".join(checks) + "."


def _ratio_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return "skip" if str(r["status"]).startswith("skipped") else "error"
    return _fmt_x(r.get("speedup_of_fused", ""))


def summary_lines(rows: list[dict]) -> list[str]:
    """A short summary of a run, one line per op (forward+backward at the base case; the region loss
    from the headline when it ran) and one for the end-to-end training step, side by side: the fused
    time and every other implementation's time / fused time; then the headline's targets."""
    impls = [i for i in IMPLS[1:] if any(r["impl"] == i and r["section"] in ("headline", "ops") for r in rows)]
    groups: dict = {}
    for r in rows:
        if r["section"] == "headline" or (r["section"] == "ops" and r["mode"] == "fwd+bwd"):
            key = r["op"] + (" (headline)" if r["section"] == "headline" else "")
            if r["section"] == "ops" and r["op"] + " (headline)" in groups:
                continue
            groups.setdefault(key, {})[r["impl"]] = r
    e2e = {r["impl"]: r for r in rows if r["section"] == "e2e"}
    width = 31
    lines = [
        f"{'fwd+bwd, time / fused time':<{width}} {'fused ms':>9}" + "".join(f" {i + '/fused':>15}" for i in impls)
    ]
    for op, by in groups.items():
        f = by.get("fused")
        ms = _fmt_ms(f["median_ms"]) if f is not None and f["status"] == "ok" else "error"
        lines.append(f"{op:<{width}} {ms:>9}" + "".join(f" {_ratio_cell(by.get(i)):>15}" for i in impls))
    if "fused" in e2e and "reference" in e2e:
        ratio = e2e["reference"]["median_ms"] / e2e["fused"]["median_ms"]
        cells = [f"{ratio:.2f}x" if i == "eager" else "-" for i in impls]
        lines.append(
            f"{'LD training step (end to end)':<{width}} {_fmt_ms(e2e['fused']['median_ms']):>9}"
            + "".join(f" {c:>15}" for c in cells)
            + ("" if "eager" in impls else f"  plain/fused {ratio:.2f}x")
        )
        lines.append("  (end to end: eager = the plain-PyTorch losses in the same training step)")
    targets = headline_targets([r for r in rows if r["section"] == "headline"])
    return lines + ([targets] if targets else [])


def e2e_markdown(rows: list[dict], how: str) -> str:
    lines = [
        "| losses | median step ms | IQR ms | steps/s | step-rate ratio fused/reference |",
        "|---|---|---|---|---|",
    ]
    by = {r["impl"]: r for r in rows}
    for impl in ("fused", "reference"):
        r = by.get(impl)
        if r is None:
            continue
        ratio = by["reference"]["median_ms"] / by["fused"]["median_ms"] if impl == "fused" else 1.0
        lines.append(
            f"| {impl} | {_fmt_ms(r['median_ms'])} | {_fmt_ms(r['q1_ms'])}-{_fmt_ms(r['q3_ms'])} | "
            f"{1e3 / r['median_ms']:.2f} | {ratio:.2f}x |"
        )
    return "\n".join(lines) + f"\n\nStep: {how}; {rows[0]['repeats'] if rows else 0} timed steps each, interleaved."


SWEEP_XLABEL = {"P": "pixels P = H*W", "K": "clusters K", "D": "embedding channels D", "N": "batch N"}


def plot_sweep(rows: list[dict], sweep: str, path: str) -> str | None:
    """Log-log time vs size, one line per implementation, one panel per mode. Returns a note on failure."""
    try:
        import matplotlib.figure  # noqa: F401  (only to know whether matplotlib is there)
    except ImportError:
        return "matplotlib is not installed: plots skipped"
    fig = new_figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    styles = {"fused": "o-", "eager": "s-", "compile": "^-", "published": "x-"}
    for ax, mode in zip(axes, MODES):
        mrows = [r for r in rows if r["mode"] == mode]
        if sweep == "dtype":
            dtypes = list(dict.fromkeys(r["dtype"] for r in mrows))
            impls = [i for i in IMPLS if any(r["impl"] == i and r["status"] == "ok" for r in mrows)]
            width = 0.8 / max(1, len(impls))
            for j, impl in enumerate(impls):
                ys = []
                for dt in dtypes:
                    r = next((r for r in mrows if r["impl"] == impl and r["dtype"] == dt and r["status"] == "ok"), None)
                    ys.append(r["median_ms"] if r else float("nan"))
                ax.bar([i + j * width for i in range(len(dtypes))], ys, width, label=impl)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(dtypes))], dtypes)
            ax.set_yscale("log")
        else:
            key = "P" if sweep == "P" else sweep
            for impl in IMPLS:
                pts = sorted((r[key], r["median_ms"]) for r in mrows if r["impl"] == impl and r["status"] == "ok")
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[impl], label=impl)
            floor = sorted({(r[key], r["floor_ms"]) for r in mrows if r.get("floor_ms", "") != ""})
            if floor:
                ax.plot([p[0] for p in floor], [p[1] for p in floor], "k--", lw=1, label="floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(SWEEP_XLABEL[sweep])
        ax.set_ylabel("time per call (ms)")
        ax.set_title(f"region loss, {mode}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"sweep {sweep} ({dev}; others at N=16 D=32 K=16 128x128 float32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None
