"""Correctness smoke tests of the benchmark harness (ld_ext.bench) on tiny sizes.

No timing asserts: these check that every implementation the benchmark compares computes the
same thing, that the timer/memory helpers measure what they claim, and that the writers and the
CLI produce what they promise.
"""
from __future__ import annotations

import csv
import importlib.util
import os
import sys

import pytest
import torch

from ld_ext import bench
from ld_ext import reference as ref
from ld_ext.bench.cases import _prepare

CPU = torch.device("cpu")
TINY = bench.Case(N=3, D=5, K=4, H=6, W=7, M=12, dtype="float64")


def _outputs_and_grads(spec, fn, inputs, cotangent):
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    out = fn(*inputs)
    if spec.scalar is not None:
        grads = torch.autograd.grad(spec.scalar(out), inputs)
    else:
        grads = torch.autograd.grad(out, inputs, grad_outputs=cotangent)
    outs = out if isinstance(out, tuple) else (out,)
    return [o.detach() for o in outs], [g.detach() for g in grads]


@pytest.mark.parametrize("op", list(bench.OPS))
def test_all_implementations_agree(op):
    spec = bench.OPS[op]
    g = bench.make_generator(CPU, 7)
    inputs = spec.make_inputs(TINY, CPU, g)
    settings = bench.Settings(device=CPU, compile_backend="eager")  # dynamo traces, no codegen: fast
    with torch.no_grad():
        ref_out = spec.impls["eager"]()(*inputs)
    cot = torch.randn(ref_out.shape, dtype=ref_out.dtype, generator=g) if spec.scalar is None else None
    want_out, want_grads = _outputs_and_grads(spec, spec.impls["eager"](), inputs, cot)
    assert set(spec.impls) >= {"fused", "eager", "compile"}
    for impl in spec.impls:
        got_out, got_grads = _outputs_and_grads(spec, _prepare(spec, impl, settings), inputs, cot)
        assert len(got_out) == len(want_out)
        for a, b in zip(got_out, want_out):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=f"{op} {impl} output")
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=f"{op} {impl} gradient")


def test_headline_loss_matches_issue_definition():
    """The region-loss benchmark times backward of 10*L_rd + 0.1*L_ent of the sigmoid/normalised loss."""
    spec = bench.OPS["region_loss"]
    e, s = spec.make_inputs(TINY, CPU, bench.make_generator(CPU, 3))
    rd, ent = spec.impls["eager"]()(e, s)
    want_rd, want_ent = ref.region_discrimination_loss(
        e, s, temperature=0.2, normalize=True, assignment="sigmoid", return_entropy=True
    )
    torch.testing.assert_close(spec.scalar((rd, ent)), 10 * want_rd + 0.1 * want_ent)


def test_measure_group_rotates_sets_and_reports_order_statistics():
    calls = {"a": [0, 0, 0], "b": [0, 0, 0]}

    def make(name):
        def fn(i):
            calls[name][i] += 1
            return torch.ones(4).sum()

        return fn

    res = bench.measure_group(
        {"a": make("a"), "b": make("b")}, 3, CPU, warmup=2, repeats=6, target_sample_s=0.0, slow_call_s=60.0
    )
    assert set(res) == {"a", "b"}
    for name, t in res.items():
        assert t.repeats == 6 and len(t.samples_ms) == 6 and t.number == 1
        assert t.min_ms <= t.q1_ms <= t.median_ms <= t.q3_ms <= t.max_ms
        # 2 warm-up + 1 calibration + 6 timed calls, spread over the three sets in turn
        assert calls[name] == [3, 3, 3]


def test_peak_memory_sees_cpu_allocations():
    def fn():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)  # 4 MiB more, both alive
        return a + b  # and a third 4 MiB

    peak, method = bench.measure_peak_memory(fn, CPU)
    assert "profiler" in method
    assert 12 * 2**20 <= peak < 13 * 2**20


def test_peak_memory_ignores_what_existed_before():
    held = torch.ones(1 << 22)  # 16 MiB allocated before the measured call
    peak, _ = bench.measure_peak_memory(lambda: held.sum(), CPU)
    assert peak < 2**20


def test_run_case_rows_and_writers(tmp_path):
    settings = bench.Settings(device=CPU, warmup=0, repeats=5, sets=2, impls=("fused", "eager", "published"), verbose=False)
    machine = bench.Machine(CPU, tiny=True)
    case = bench.Case(N=2, D=4, K=3, H=8, W=8, dtype="float32")
    rows = bench.run_case(bench.OPS["region_loss"], case, settings, machine)
    assert [(r["mode"], r["impl"]) for r in rows] == [(m, i) for m in bench.MODES for i in ("fused", "eager", "published")]
    for r in rows:
        assert r["status"] == "ok", r["status"]
        assert set(r) == set(bench.CSV_COLUMNS)
        assert r["repeats"] == 5 and r["input_sets"] == 2
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"]
        assert r["floor_ms"] > 0 and r["floor_bound"] in ("memory", "compute")
        assert r["peak_mem_bytes"] >= 0
    fused = [r for r in rows if r["impl"] == "fused"]
    assert all(r["speedup_of_fused"] == 1.0 for r in fused)
    fb = [r for r in rows if r["mode"] == "fwd+bwd"][0]
    assert fb["bytes"] == 3 * (2 * 4 * 64 + 2 * 3 * 64) * 4  # inputs read twice + gradients written
    assert fb["flops"] == 3 * 2 * 2 * 3 * 4 * 64

    path = tmp_path / "r.csv"
    bench.write_csv(rows, str(path))
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == bench.CSV_COLUMNS
    assert len(got) == len(rows)
    assert float(got[0]["median_ms"]) == pytest.approx(rows[0]["median_ms"], rel=1e-5)

    md = bench.markdown_table(rows).splitlines()
    assert md[0] == "| " + " | ".join(bench.MD_COLUMNS) + " |"
    assert len(md) == 2 + len(bench.MODES)  # header, rule, one line per mode
    assert all(line.count("|") == len(bench.MD_COLUMNS) + 1 for line in md)
    assert "n/a" in md[2]  # compile was not requested


def test_time_cap_skips_slow_implementations():
    settings = bench.Settings(device=CPU, warmup=0, repeats=5, sets=1, impls=("fused", "eager"), max_call_s=0.0, verbose=False, memory=False)
    rows = bench.run_case(bench.OPS["region_loss"], bench.Case(N=2, D=4, K=3, H=8, W=8), settings, None, modes=("fwd",))
    assert [r["status"].split(":")[0] for r in rows] == ["skipped", "skipped"]
    assert "--max-call-s" in rows[0]["status"]


def test_memory_cap_skips_instead_of_running():
    settings = bench.Settings(device=CPU, warmup=0, repeats=5, sets=1, impls=("fused", "published"), max_bytes=1, verbose=False, memory=False)
    rows = bench.run_case(bench.OPS["region_loss"], bench.Case(N=2, D=4, K=3, H=8, W=8), settings, None, modes=("fwd",))
    assert all(r["status"].startswith("skipped") for r in rows)
    assert "skip" in bench.markdown_table(rows)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats", "2"], "--repeats must be >= 5"),
        (["--sections", "headline,bogus"], "--sections"),
        (["--sweeps", "Q"], "--sweeps"),
        (["--impls", "eager,compile"], "must include fused"),
        (["--device", "tpu"], "--device"),
        (["--max-mem-gb", "-1"], "--max-mem-gb"),
        (["--sets", "0"], "--sets"),
        (["--max-call-s", "0"], "--max-call-s"),
    ],
)
def test_cli_rejects_bad_input(argv, message, capsys, tmp_path):
    assert bench.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is absent")
def test_cli_cuda_without_gpu_is_a_clear_error(capsys, tmp_path):
    assert bench.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_cli_tiny_run_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench.main(
        ["--tiny", "--no-compile", "--out", str(out), "--sweeps", "P,dtype", "--warmup", "0", "--seed", "1"]
    )
    assert rc == 0
    text = capsys.readouterr().out
    # stdout: the short summary only (the full tables are in results.md, or printed with --full)
    assert "## Headline" not in text and "## End to end" not in text
    assert len(text.strip().splitlines()) <= 16, text
    assert text.count("region_loss (headline)") == 1 and "LD training step (end to end)" in text
    assert "full tables: " + str(out / "results.md") in text
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == bench.CSV_COLUMNS
    sections = {r["section"] for r in rows}
    assert sections == {"headline", "ops", "sweeps", "e2e"}
    assert {r["op"] for r in rows if r["section"] == "ops"} == set(bench.OPS)
    assert {r["sweep"] for r in rows if r["section"] == "sweeps"} == {"P", "dtype"}
    assert all(r["status"] == "ok" for r in rows), [r["status"] for r in rows if r["status"] != "ok"]
    assert {r["impl"] for r in rows if r["section"] == "e2e"} == {"fused", "reference"}
    md = (out / "results.md").read_text()
    assert "| case | mode | fused ms |" in md  # sweep tables
    assert "| op | case | mode | fused ms |" in md  # the ops table names the op of each line
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench_sweep_P.png").stat().st_size > 0
        assert (out / "bench_sweep_dtype.png").stat().st_size > 0
    else:
        assert "plots skipped" in md


def test_cli_quick_run_is_headline_ops_fwd_bwd_and_e2e_with_a_short_summary(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = bench.main(["--tiny", "--quick", "--no-compile", "--out", str(out), "--warmup", "0", "--seed", "1", "--full"])
    assert rc == 0
    text = capsys.readouterr().out
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["section"] for r in rows} == {"headline", "ops", "e2e"}  # no sweeps
    ops = [r for r in rows if r["section"] == "ops"]
    assert {r["op"] for r in ops} == set(bench.OPS)
    assert {r["mode"] for r in ops} == {"fwd+bwd"} and {r["impl"] for r in ops} == {"fused", "eager"}
    head = [r for r in rows if r["section"] == "headline"]
    assert [r["median_ms"] for r in ops if r["op"] == "region_loss"] == [r["median_ms"] for r in head]
    assert "## Headline" in text  # --full: the whole report, then the summary
    summary = text[text.index("ld-ext bench summary"):].splitlines()
    assert summary[1].split() == ["fwd+bwd,", "time", "/", "fused", "time", "fused", "ms", "eager/fused"]
    assert [line.split()[0] for line in summary[2:7]] == ["region_loss"] + [o for o in bench.OPS if o != "region_loss"]
    assert summary[7].startswith("LD training step (end to end)") and summary[7].split()[-1].endswith("x")


def test_summary_lines_put_the_ops_and_the_end_to_end_ratio_side_by_side():
    from ld_ext.bench.report import summary_lines

    def row(section, op, impl, ms, fused_ms, mode="fwd+bwd", status="ok"):
        return dict(section=section, op=op, mode=mode, impl=impl, median_ms=ms, status=status,
                    speedup_of_fused=ms / fused_ms)

    rows = [row("headline", "region_loss", "fused", 2.0, 2.0), row("headline", "region_loss", "eager", 30.0, 2.0),
            row("headline", "region_loss", "compile", 4.0, 2.0),
            row("ops", "region_loss", "fused", 9.0, 9.0), row("ops", "region_loss", "eager", 9.0, 9.0),
            row("ops", "patch_discrimination", "fused", 1.0, 1.0, mode="fwd"),
            row("ops", "patch_discrimination", "fused", 3.0, 3.0), row("ops", "patch_discrimination", "eager", 6.0, 3.0),
            row("ops", "patch_discrimination", "compile", 0.0, 3.0, status="skipped: too slow"),
            row("e2e", "LD step", "fused", 100.0, 100.0, mode="step"),
            row("e2e", "LD step", "reference", 150.0, 100.0, mode="step")]
    lines = summary_lines(rows)
    assert [ln.split() for ln in lines[1:4]] == [
        ["region_loss", "(headline)", "2.00", "15.00x", "2.00x"],  # the ops' own region-loss row is not repeated
        ["patch_discrimination", "3.00", "2.00x", "skip"],
        ["LD", "training", "step", "(end", "to", "end)", "100", "1.50x", "-"],
    ]
    assert lines[-1] == "Targets: fused >= 6x eager: met (15.00x); fused faster than compile: met (2.00x)."


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="the RSS probe needs Linux /proc")
def test_rss_probe_reports_a_peak():
    res = bench.rss_probe("fused", bench.Case(N=2, D=4, K=3, H=16, W=16), seed=0)
    assert res is not None and "error" not in res, res
    assert res["peak_rss_increase"] >= 0
    assert res["input_bytes"] == (2 * 4 * 256 + 2 * 3 * 256) * 4


def test_plain_baselines_match_the_fused_loss_modules():
    """The plain-PyTorch loss modules (LDObjective's "reference" path) compute the fused modules'
    values and gradients, in both call forms of the PD module."""
    import ld_ext

    g = bench.make_generator(CPU, 11)
    e = torch.randn(3, 5, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 4, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    for kw in (dict(normalize=True, assignment="sigmoid", return_entropy=True), dict(assignment="softmax")):
        fused = ld_ext.RegionDiscriminationLoss(0.3, **kw)(e, s)
        plain = bench.PlainRegionDiscriminationLoss(0.3, **kw)(e, s)
        fused, plain = (v if isinstance(v, tuple) else (v,) for v in (fused, plain))
        for a, b in zip(fused, plain):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        gf = torch.autograd.grad(fused[0], (e, s))
        gp = torch.autograd.grad(plain[0], (e, s))
        for a, b in zip(gf, gp):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    for args in ((x,), (x[:6], x[6:])):
        fused = ld_ext.PatchDiscriminationLoss(0.2)(*args)
        plain = bench.PlainPatchDiscriminationLoss(0.2)(*args)
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        bench.PlainPatchDiscriminationLoss(-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_losses_are_the_oracle_formulation_bit_for_bit(dtype):
    """ld_ext.plain_losses writes the oracle's eager formulation again (the losses layer never
    imports ld_ext.reference): same operations in the same order, so the same bits, values and
    gradients."""
    from ld_ext import plain_losses as pl
    from ld_ext import reference as ref

    g = bench.make_generator(CPU, 5)
    e = torch.randn(3, 5, 6, 7, generator=g, dtype=dtype, requires_grad=True)
    s = torch.randn(3, 4, 6, 7, generator=g, dtype=dtype, requires_grad=True)
    x = torch.nn.functional.normalize(torch.randn(12, 5, generator=g, dtype=dtype), dim=1).requires_grad_()
    for normalize, assignment in ((True, "sigmoid"), (False, "softmax"), (False, "probs")):
        sa = s.softmax(1) if assignment == "probs" else s  # "probs" takes probabilities as given
        a = pl.region_features(e, sa, normalize=normalize, assignment=assignment)
        b = ref.region_features_bmm(e, sa, normalize=normalize, assignment=assignment)
        assert torch.equal(a, b)
        la, lb = pl.region_discrimination(a, 0.3), ref.region_discrimination(b, 0.3)
        assert torch.equal(la, lb)
        ha, hb = pl.assignment_entropy(sa, assignment), ref.assignment_entropy(sa, assignment)
        assert torch.equal(ha, hb)
        ga_all = torch.autograd.grad(la + ha, (e, s), retain_graph=True)  # sa's softmax is shared
        for ga, gb in zip(ga_all, torch.autograd.grad(lb + hb, (e, s))):
            assert torch.equal(ga, gb)
    pa, pb = pl.patch_discrimination(x, 0.2), ref.patch_discrimination(x, 0.2)
    assert torch.equal(pa, pb)
    assert torch.equal(torch.autograd.grad(pa, x)[0], torch.autograd.grad(pb, x)[0])
    assert bench.PlainRegionDiscriminationLoss is pl.PlainRegionDiscriminationLoss


def test_time_call_and_time_once_call_what_they_time():
    calls = []
    t = bench.time_call(lambda: calls.append(1), CPU, warmup=2, repeats=5)
    assert len(calls) == 3 + 5 and t.repeats == 5 and t.number == 1  # 2 warm-up + 1 sizing + 5 timed
    assert 0 <= t.min_ms <= t.median_ms <= t.max_ms
    assert bench.time_once(lambda: calls.append(2), CPU) >= 0 and calls[-1] == 2


def test_child_peak_rss_sees_the_child_allocation():
    """A child that touches 800 MiB more than the measuring process's own peak peaks that much
    higher than one that does nothing. (Linux keeps the forking process's peak in the child's
    ru_maxrss across exec, so the measuring process is a fresh interpreter and the child allocates
    800 MiB on top of that interpreter's peak: importing a CUDA build of torch alone peaks near
    500 MiB, which broke a fixed 800 MiB child on torch 2.11+cu130.)"""
    import json
    import subprocess
    import sys

    if not hasattr(os, "wait4"):
        pytest.skip("os.wait4 is Unix only")
    driver = (
        "import json, sys\n"
        "from ld_ext.bench.memory import child_peak_rss\n"
        "small = child_peak_rss([sys.executable, '-c', 'pass'])\n"
        "import resource\n"
        "n = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + (800 << 20)\n"
        "big = child_peak_rss([sys.executable, '-c', f'b = bytearray({n}); b[::4096] = bytes(len(b[::4096]))'])\n"
        "bad = child_peak_rss([sys.executable, '-c', 'import sys; sys.exit(\"boom\")'])\n"
        "print(json.dumps([small, big, bad]))\n"
    )
    res = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    small, big, bad = json.loads(res.stdout.strip().splitlines()[-1])
    assert small[0] == 0 and big[0] == 0
    assert big[1] >= 800 << 20 and big[1] - small[1] > 400 << 20
    assert bad[0] == 1 and "boom" in bad[2]


def test_module_entry_point_is_the_cli(tmp_path):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "ld_ext.bench", "--repeats", "2", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "--repeats must be >= 5" in res.stderr


# ---------------------------------------------------------------- the LD head in 3-D (ld-ext bench --head3d)


def _head3d_loss_and_grads(case, impl, backend="eager"):
    from ld_ext.bench import head3d

    run, inputs = head3d.make_runner(case, impl, CPU, seed=5, backend=backend)
    spec = bench.OPS[case.op]
    fn = torch.compile(spec.impls[impl](), backend=backend) if impl == "compile" else spec.impls[impl]()
    out = fn(*inputs)
    return (out if isinstance(out, tuple) else (out,)), run()


@pytest.mark.parametrize("op", ["region_loss", "pixel_cluster_similarity"])
def test_head3d_implementations_agree_on_a_16_cubed_volume(op):
    """At 16^3 the fused ops, the published broadcast, the eager bmm and its compile compute the same
    loss (similarity map) and the same gradients on (N, D, X, Y, Z) embeddings."""
    from ld_ext.bench import head3d

    case = head3d.Case3D(op, size=16, N=2, K=4, D=8)
    want_out, want_grads = _head3d_loss_and_grads(case, "fused")
    assert want_out[0].shape == (() if op == "region_loss" else (2, 4, 16, 16, 16))
    assert want_grads[0].shape == (2, 8, 16, 16, 16)
    impls = [i for i in head3d.HEAD3D_IMPLS if i in bench.OPS[op].impls and i != "fused"]
    assert ("published" in impls) == (op == "region_loss") and {"eager", "compile"} <= set(impls)
    for impl in impls:
        out, grads = _head3d_loss_and_grads(case, impl)
        for a, b in zip(out, want_out):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{op} {impl} value")
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{op} {impl} gradient")


def test_head3d_broadcast_declared_size_and_not_run_above_the_guard():
    from ld_ext.bench import head3d

    big = head3d.Case3D("region_loss", size=96, N=8)
    assert head3d.declared_bytes(big, "published") == 2 * 4 * 8 * 16 * 32 * 96**3  # 27 GiB: 13.5 + its gradient
    assert head3d.declared_bytes(big, "fused") is None
    settings = dict(device=CPU, guard_bytes=12 << 30)
    row = head3d.run_case3d(big, "published", settings)  # returns at once: nothing is allocated
    assert row["status"] == "not run (needs 27.0 GiB)" and row["median_ms"] is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU guard is RLIMIT_AS of a Linux process")
def test_head3d_guard_turns_an_oversized_case_into_a_failed_row():
    """A case that needs more than the guard fails in its own process and is reported, not fatal."""
    from ld_ext.bench import head3d

    settings = dict(device=CPU, guard_bytes=1 << 20, warmup=0, repeats=1, seed=0, threads=1, compile_dynamic=True,
                    backend="eager")
    row = head3d.run_case3d(head3d.Case3D("region_loss", size=32, N=2, K=4, D=8), "eager", settings)
    assert row["status"].startswith("failed: out of memory under the"), row
    ok = head3d.run_case3d(head3d.Case3D("region_loss", size=32, N=2, K=4, D=8), "fused",
                           dict(settings, guard_bytes=1 << 30))
    assert ok["status"] == "ok" and ok["median_ms"] > 0, ok
    if os.path.exists("/proc/self/clear_refs"):
        assert ok["peak_bytes"] >= 0


def test_cli_head3d_tiny_run_writes_the_tables(tmp_path, capsys):
    import json

    out = tmp_path / "h3"
    rc = bench.main(["--head3d", "--tiny", "--no-compile", "--repeats", "1", "--warmup", "0", "--seed", "1",
                     "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads((out / "head3d.json").read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} == {
        ("region_loss", "fused"), ("region_loss", "published"), ("region_loss", "eager"),
        ("pixel_cluster_similarity", "fused"), ("pixel_cluster_similarity", "eager")}
    assert all(r["status"] == "ok" and r["size"] == 16 and r["N"] == 2 for r in rows), rows
    md = (out / "head3d.md").read_text()
    assert "| patch | N | fused ms | broadcast (published) ms | eager bmm ms |" in md
    assert "fused / broadcast peak" in md and "| 16^3 | 2 |" in md and "Load average" in md
    assert md in text and "tables: " + str(out / "head3d.md") in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quick"], "--head3d runs on its own"),
        (["--head3d-sizes", "64,x"], "--head3d-sizes must be"),
        (["--head3d-batches", "0"], "--head3d-batches must be"),
        (["--impls", "eager"], "--impls must be"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--max-mem-gb", "0"], "--max-mem-gb must be"),
    ],
)
def test_cli_head3d_rejects_bad_input(argv, message, capsys, tmp_path):
    assert bench.main(["--head3d"] + argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
