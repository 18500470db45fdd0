"""The MNI152 demo (``ld-ext demo``, ``ld_ext.demos``): data preparation, scoring (NMI, k-means) and a tiny end-to-end run."""
from __future__ import annotations

import argparse
import io
import json
import logging
import math

import pytest
import torch

from ld_ext import demos
from ld_ext.demos.progress import DemoProgress, Phase, format_seconds


def test_nmi_known_values():
    a = torch.tensor([0, 0, 1, 1])
    assert demos.normalized_mutual_info(a, a) == pytest.approx(1.0)
    assert demos.normalized_mutual_info(a, 5 - a) == pytest.approx(1.0)  # label names do not matter
    assert demos.normalized_mutual_info(a, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0, abs=1e-12)
    # hand computation: I = 0.5 ln(4/3) + 0.25 ln(2/3) + 0.25 ln 2, H(a) = ln 2, H(b) = -(0.75 ln 0.75 + 0.25 ln 0.25)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    hb = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = mi / ((math.log(2) + hb) / 2)
    assert demos.normalized_mutual_info(a, torch.tensor([0, 0, 0, 1])) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError):
        demos.normalized_mutual_info(a, torch.tensor([0, 1]))


def test_kmeans_1d_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (3000,), generator=g)
    values = torch.tensor([0.1, 0.5, 0.9])[truth] + 0.01 * torch.randn(3000, generator=g)
    labels, centres = demos.kmeans_1d(values, 3)
    assert demos.normalized_mutual_info(labels, truth) == pytest.approx(1.0)
    torch.testing.assert_close(centres.sort().values.float(), torch.tensor([0.1, 0.5, 0.9]), atol=0.01, rtol=0)


def test_mni_slices_and_tissue_labels():
    pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
    d = demos.load_mni_slices(size=32)
    n = d["images"].shape[0]
    assert d["images"].shape == (n, 1, 32, 32) and d["probs"].shape == (n, 4, 32, 32)
    assert n > 100 and d["test"].sum() > 10 and not (d["test"] & d["train"]).any()
    torch.testing.assert_close(d["probs"].sum(1), torch.ones(n, 32, 32), atol=1e-4, rtol=0)
    labels = demos.tissue_labels(d["probs"])
    assert set(labels.unique().tolist()) == {0, 1, 2, 3}
    # the template is brain-extracted: background pixels are dark, white matter bright
    img = d["images"][:, 0]
    assert img[labels == 0].mean() < 0.1 < img[labels == 2].mean() < img[labels == 3].mean()


def test_demo_defaults_are_a_fixed_step_budget():
    """By default every step runs (no time budget that a busy machine would turn into fewer steps)."""
    parser = argparse.ArgumentParser()
    demos.add_arguments(parser)
    args = parser.parse_args([])
    assert args.max_minutes is None
    assert (args.epochs1, args.epochs2, args.steps_per_epoch, args.centre_steps) == (4, 12, 5, 25)
    assert parser.parse_args(["--max-minutes", "3"]).max_minutes == 3.0


def test_tiny_demo_end_to_end(tmp_path, capsys):
    pytest.importorskip("nilearn", reason="the demo data ship inside nilearn")
    parser = argparse.ArgumentParser()
    demos.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--size", "32", "--epochs1", "1", "--epochs2", "1",
                              "--steps-per-epoch", "1", "--batch-size", "2", "--clusters", "4", "--probe-seeds", "1",
                              "--centre-steps", "2", "--no-progress"])
    res = demos.run_pretrain_demo(args)
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["scores"] == res["scores"]
    assert set(res["scores"]) == {"LD (trained)", "untrained network", "k-means on intensities (K=4)"}
    for s in res["scores"].values():
        assert 0.0 <= s["nmi"] <= 1.0 and 0.0 <= s["nmi_brain"] <= 1.0
    assert res["first_epoch"]["stage"] == 1 and res["last_epoch"]["stage"] == 2 and not res["stopped_early"]
    assert set(saved["seconds_per_phase"]) == {
        "reading the data", "pre-training", "stage 3", "cluster scores", "probe", "figures"}
    # the final probe table: every structure with enough slices at 32x32, the four feature sets
    assert saved["probe"] and {r["label"] for r in saved["probe"]} <= {"ventricles", "striatum", "thalamus", "corpus_callosum"}
    for r in saved["probe"]:
        assert set(r["dice"]) == {"LD", "random-init", "intensity", "position"}
        assert all(0.0 <= d <= 1.0 for m in r["dice"].values() for v in m.values() for d in v)
        test = set(r["splits"]["5"]["test"])
        assert not test & set(r["splits"]["5"]["train"][0]) and set(r["splits"]["1"]["train"][0]) <= set(r["splits"]["5"]["train"][0])
    md = (tmp_path / "probe" / "results.md").read_text()
    assert "| **mean** | all |" in md and "points against the random-init network" in md
    assert "NMI scores how well" in (tmp_path / "nmi.md").read_text()
    for name in ("demo_clusters.png", "nmi.md", "model.pt", "stage3.pt", "metrics.jsonl", "overlays/stage2_epoch001.png",
                 "probe/overlays.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    # stage 3 is in model.pt, so `ld-ext landmark` reads its landmark network without the no-stage-3 warning
    from ld_ext.checkpoint import checkpoint_parts, load_checkpoint, load_model
    from ld_ext.tasks.landmarks import centre_term_record
    ck = load_checkpoint(tmp_path / "model.pt")
    assert centre_term_record(ck)["steps"] == 2 and checkpoint_parts(ck) == {
        "representation": True, "landmark": True, "legacy_stage3": False}
    rep, lm = load_model(tmp_path / "model.pt"), load_model(tmp_path / "model.pt", part="landmark")
    assert any(not torch.equal(a, b) for a, b in zip(rep.state_dict().values(), lm.state_dict().values()))
    assert [r["stage"] for r in demos_records(tmp_path)][-1] == 3 and saved["stage3"]["steps"] == 2
    # printed: the probe table before the NMI table, then every output with what it is, the probe folder named last
    printed = capsys.readouterr().out
    assert 0 <= printed.index("Linear probe") < printed.index("| method | NMI (all pixels)") < printed.index("Outputs in")
    listed = printed[printed.index("Outputs in"):]
    for entry in tmp_path.iterdir():  # every file and folder the demo wrote is listed and described
        assert str(entry) in listed, entry.name
    assert printed.rstrip().splitlines()[-1].endswith(f"the probe table and figure are in {tmp_path / 'probe'}")


def demos_records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_demo_stage3_is_the_pipelines_stage3(tmp_path):
    """The demo runs stage 3 step by step (for its progress line); it must train exactly what stage 3 of
    `ld-ext pretrain` (run_centre_stage) trains on the same images, and write the same record."""
    from ld_ext.checkpoint import LANDMARK_KEY, load_checkpoint, save_checkpoint
    from ld_ext.data import ImageFolderDataset
    from ld_ext.demos.pretrain import run_stage3
    from ld_ext.models import LDNet
    from ld_ext.tasks.landmarks import run_centre_stage

    torch.manual_seed(0)
    net = LDNet(in_channels=1, emb_dim=8, n_clusters=4, widths=(4, 4, 8, 8, 8)).eval()
    imgs = torch.rand(5, 1, 32, 32)
    ours, pipe = tmp_path / "demo", tmp_path / "pipeline"
    ours.mkdir(), pipe.mkdir()
    save_checkpoint(ours / "model.pt", {"config": net.config, "model": net.state_dict()})
    steps = []
    tuned, rec = run_stage3(net, imgs, ours, 3, seed=1, on_step=lambda: steps.append(1))
    ref, ref_rec = run_centre_stage(net, ImageFolderDataset.from_tensor(imgs), pipe, 3, seed=1, progress=False)
    assert len(steps) == 3
    for (k, a), b in zip(tuned.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    assert {k: v for k, v in rec.items() if k != "seconds"} == {k: v for k, v in ref_rec.items() if k != "seconds"}
    ck = load_checkpoint(ours / "model.pt")
    assert ck["centre_term"] == rec and set(ck) >= {"config", "model", LANDMARK_KEY}
    for k, v in net.state_dict().items():  # the representation stays the stage-2 network
        assert torch.equal(ck["model"][k], v), k
    assert demos_records(ours) == [{"stage": 3, **rec}]


def test_probe_one_feature_set_at_a_time_equals_all_at_once():
    """The demo probes one (structure, feature set) at a time, for its progress line; joined, the parts must be
    the result of probe_experiment on all feature sets at once."""
    from ld_ext.demos.probe_table import merge_probe_results
    from ld_ext.tasks import probe

    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(8, 16, 16, dtype=torch.bool)
    masks[:, 5:9, 6:11] = True
    feats = {"a": torch.rand(8, 3, 16, 16, generator=g), "b": torch.rand(8, 2, 16, 16, generator=g)}
    feats["a"][:, 0] += masks.float()
    split = {k: (torch.arange(4, 8).numpy(), [torch.arange(0, k).numpy(), torch.arange(4 - k, 4).numpy()])
             for k in (1, 2)}
    kw = dict(shots=(1, 2), seeds=2, split=split, label="box", keep_predictions=True)
    whole = probe.probe_experiment(feats, masks.numpy(), **kw)
    parts = [probe.probe_experiment({k: v}, masks.numpy(), **kw) for k, v in feats.items()]
    joined = merge_probe_results(parts)
    for key in ("methods", "dice", "dice_pooled", "threshold", "summary", "summary_pooled", "splits", "_thresholds"):
        assert joined[key] == whole[key], key
    for m in feats:
        assert (joined["_preds"][m] == whole["_preds"][m]).all()
    assert probe.results_markdown([joined]) == probe.results_markdown([whole])
    with pytest.raises(ValueError, match="share the structure"):
        merge_probe_results([parts[0], {**parts[1], "label": "other"}])


# ----------------------------------------------------------------------------- the progress line


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_counts_steps_over_all_phases_and_scales_the_time_left_by_the_measured_speed():
    clock = Clock()
    phases = [Phase("train", 4, 1.0), Phase("stage 3", 2, 3.0), Phase("probe", 2, 0.5)]
    p = DemoProgress(phases, enabled=False, clock=clock)
    assert p.total == 8 and p.seconds_left() is None
    p.set_steps("probe", 3)  # known once the data are read
    p.set_steps("probe", 2)
    assert p.total == 8
    p.start("train")
    clock.t = 4.0  # two steps in 4 s: twice the prior's 1 s per step
    p.step(2)
    assert p.done == 2
    # left: 2 x 1 + 2 x 3 + 2 x 0.5 = 9 prior seconds, at twice the prior
    assert p.seconds_left() == pytest.approx(18.0)
    assert "train 2/4" in p.summary() and "all phases 2/8 steps" in p.summary() and "about 18 s left" in p.summary()
    p.start("probe")  # stage 3 skipped (and the rest of train): their steps count as done, not as time spent
    assert p.done == 6 and p.seconds_left() == pytest.approx(2.0)
    clock.t = 5.0
    p.step(5)  # never more than the phase declared
    assert p.done == 8 and p.seconds_left() == 0.0
    with pytest.raises(ValueError, match="already started"):
        p.start("train")
    with pytest.raises(ValueError, match="not a phase still to come"):
        p.set_steps("train", 3)
    with pytest.raises(ValueError, match="unknown phase"):
        p.start("figures")


def test_bad_phases_are_refused():
    with pytest.raises(ValueError, match="must not be empty"):
        DemoProgress([])
    with pytest.raises(ValueError, match="distinct"):
        DemoProgress([Phase("a", 1, 1.0), Phase("a", 1, 1.0)])
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        DemoProgress([Phase("a", -1, 1.0)])
    with pytest.raises(ValueError, match="seconds_per_step must be > 0"):
        DemoProgress([Phase("a", 1, 0.0)])
    with pytest.raises(ValueError, match="start a phase first"):
        DemoProgress([Phase("a", 1, 1.0)], enabled=False).step()


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 42.4, 185, 3725)] == ["0 s", "42 s", "3 min 05 s", "1 h 02 min"]


def test_the_line_shows_phase_counts_and_time_left_and_log_lines_go_above_it(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    log = logging.getLogger("ld_ext")
    handler = logging.StreamHandler(err)
    log.addHandler(handler)
    clock = Clock()
    try:
        with DemoProgress([Phase("train", 2, 1.0), Phase("probe", 3, 1.0)], clock=clock) as p:
            assert handler not in log.handlers  # wrapped for the bar's lifetime
            p.start("train")
            clock.t = 2.0
            p.step()
            logging.getLogger("ld_ext.train").warning("an epoch line")
        assert handler in log.handlers
    finally:
        log.removeHandler(handler)
    text = err.getvalue().replace("\r", "\n")
    assert "demo [train 1/2]" in text and "1/5 steps" in text and "about 8 s left" in text
    assert "an epoch line" in text.split("\n")  # on a line of its own, not glued to the bar


def test_without_a_line_each_phase_start_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="ld_ext"):
        with DemoProgress([Phase("train", 2, 1.0), Phase("probe", 3, 1.0)], enabled=False) as p:
            p.start("train")
            p.step(2)
            p.start("probe")
    msgs = [r.getMessage() for r in caplog.records]
    assert any("train 0/2 | all phases 0/5 steps" in m for m in msgs)
    assert any("probe 0/3 | all phases 2/5 steps" in m for m in msgs)


# ----------------------------------------------------------------------------- the README's quick start


def _repo_file(name):
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / name).read_text()


def test_readme_quick_start_matches_ci_and_the_demo():
    """The README's test command is the one .ci/run runs; its demo paragraph and outputs table say what
    the demo does (stage-3 steps, every output it lists); it says that no weights are shipped."""
    from ld_ext.demos.pretrain import CENTRE_STEPS, OUTPUTS

    readme, ci = _repo_file("README.md"), _repo_file(".ci/run")
    test_cmd = "bash scripts/setup_env.sh && .venv/bin/python -m pytest -q -p no:cacheprovider tests"
    assert test_cmd in ci and f"```bash\n{test_cmd}\n```" in readme
    assert "```bash\nbash scripts/setup_env.sh && .venv/bin/ld-ext demo --out runs/demo\n```" in readme
    assert f"then {CENTRE_STEPS} steps of\nstage 3" in readme or f"then {CENTRE_STEPS} steps of stage 3" in readme
    for name, _ in OUTPUTS:
        assert f"`{name}`" in readme, name
    assert "No pre-trained weights are shipped" in readme and "load_model(" in readme
    assert len(readme) < 12_000  # a quick-start; measurements live in docs/history.md
