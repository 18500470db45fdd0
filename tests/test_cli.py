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
    from ld_ext.tasks import demos

    seen = {}

    def fake(task, args):
        seen["task"], seen["out"], seen["checkpoint"] = task, args.out, args.checkpoint
        return 0

    monkeypatch.setattr(demos, "run_task_demo", fake)
    assert cli.main(["demo", "--task", "landmark", "--out", str(tmp_path), "--checkpoint", "m.pt"]) == 0
    assert seen == {"task": "landmark", "out": str(tmp_path), "checkpoint": "m.pt"}


def test_demo_rejects_unknown_task():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--task", "nope"])


@pytest.mark.parametrize(
    "script, expected",
    [
        ("demo.py", "ld-ext demo"),
        ("pretrain_folder.py", "--data"),
        ("finetune.py", "ld-ext finetune"),
        ("landmark.py", "ld-ext landmark"),
        ("shape_guided.py", "ld-ext shape-guided"),
        ("probe.py", "ld-ext probe"),
    ],
)
def test_workflow_scripts_run(script, expected):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / script
    res = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert expected in res.stdout
