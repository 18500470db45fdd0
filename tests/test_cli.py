"""The ld-ext command: subcommands are wired to their modules."""
from __future__ import annotations

import json

import pytest

from ld_ext import cli


def test_every_subcommand_is_present(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(cli.SUBCOMMANDS)
    assert cli.main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info) == {"cuda_compiled", "cpu_isa", "torch_version_built", "torch_version_running"}


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "pretrain" in capsys.readouterr().out


def test_demo_task_dispatches_to_the_task_demos(monkeypatch, tmp_path):
    from ld_ext.demos import tasks

    seen = {}

    def fake(task, args):
        seen["task"], seen["out"], seen["checkpoint"] = task, args.out, args.checkpoint
        return 0

    monkeypatch.setattr(tasks, "run_task_demo", fake)
    assert cli.main(["demo", "--task", "landmark", "--out", str(tmp_path), "--checkpoint", "m.pt"]) == 0
    assert seen == {"task": "landmark", "out": str(tmp_path), "checkpoint": "m.pt"}


def test_demo_rejects_unknown_task():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--task", "nope"])


def _cli(*argv, env=None, cwd=None):
    import os
    import subprocess
    import sys

    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "ld_ext", *argv], capture_output=True, text=True, timeout=300, env=e, cwd=cwd)


def test_user_error_is_one_line_exit_2_no_traceback(tmp_path):
    res = _cli("pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"))
    assert res.returncode == 2
    assert res.stderr == f"ld-ext: error: data path does not exist: {tmp_path / 'missing'}\n"
    assert not (tmp_path / "x").exists()  # nothing written
    dbg = _cli("pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), env={"LD_EXT_TRACEBACK": "1"})
    assert dbg.returncode == 1 and "Traceback" in dbg.stderr and "data path does not exist" in dbg.stderr


def test_bad_checkpoint_message_is_ours(tmp_path):
    import argparse

    import torch

    bad = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": argparse.Namespace(a=1)}, bad)  # not a weights-only type
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for path, words in ((bad, "it holds a Python object of type argparse.Namespace"), (tmp_path / "junk.pt", "not a PyTorch checkpoint")):
        res = _cli("landmark", "--checkpoint", str(path), "--template", "t.png", "--points", "p.json", "--targets", str(tmp_path),
                   "--out", str(tmp_path / "o.json"))
        assert res.returncode == 2, res.stderr
        assert res.stderr.startswith(f"ld-ext: error: could not read checkpoint {path}: {words}"), res.stderr
        assert res.stderr.count("\n") == 1 and "weights_only" not in res.stderr and "Traceback" not in res.stderr


def test_version_and_python_m():
    import ld_ext

    res = _cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"ld-ext {ld_ext.__version__}"
    res = _cli("info")
    assert res.returncode == 0 and json.loads(res.stdout)["torch_version_running"]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pretrain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "image size (square) fed to the network (default: 128)" in out
    assert "Adam learning rate (default: 0.001)" in out
    assert "--overwrite" in out and "--resume" in out


def test_library_never_selects_a_matplotlib_backend(tmp_path):
    """Plotting in the library leaves pyplot's figures and backend alone (a notebook's stay open)."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "ld_ext"
    hits = [p for p in src.rglob("*.py") if "matplotlib.use(" in p.read_text() or "pyplot" in p.read_text().replace("pyplot does not", "")]
    assert hits == []
    code = f"""
import matplotlib
matplotlib.use("svg")  # the user's choice
import matplotlib.pyplot as plt
fig = plt.figure()
from ld_ext import viz
viz.save_loss_curves([{{"stage": 1, "loss": 2.0}}, {{"stage": 2, "loss": 1.0, "rd": 0.5}}], r"{tmp_path / 'l.png'}")
assert matplotlib.get_backend().lower() == "svg", matplotlib.get_backend()
assert plt.get_fignums() == [fig.number], plt.get_fignums()
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_parser_imports_only_the_subcommand_the_command_line_names():
    """`ld-ext --help` lists the subcommands without importing their modules; `ld-ext probe
    --help` (or a run of probe) imports probe's module and no other subcommand's."""
    import subprocess
    import sys

    code = """
import sys
from ld_ext import cli
modules = {m for m, _ in cli.SUBCOMMANDS.values()} - {"ld_ext.cli"}
for argv in sys.argv[1:]:
    try:
        cli.build_parser().parse_args(argv.split())
    except SystemExit:
        pass
print(sorted(m for m in modules if m in sys.modules))
"""
    for argv, loaded in ((["--help"], "[]"), (["-q probe --help"], "['ld_ext.tasks.probe']"),
                         (["--help", "landmark --help"], "['ld_ext.tasks.landmarks']")):
        res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip().splitlines()[-1] == loaded, (argv, res.stdout)
