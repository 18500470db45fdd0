"""Run helpers shared by the pre-training tests of images (test_train.py) and of volumes
(test_pretrain_3d.py): a small run's config, the objective's two implementations compared, an
interrupted run resumed, a child process's environment, and the command's refusals."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

from ld_ext import train
from ld_ext.checkpoint import load_checkpoint
from ld_ext.objective import LOSS_IMPLS, LDObjective

SMALL = (8, 8, 16, 16, 16)  # the network's widths in these tests
TIMING = ("seconds", "images_per_s", "data_wait_s")  # record fields that differ from run to run


def small_config(out, **kw) -> train.TrainConfig:
    """A run of a few steps on the CPU (1 + 2 epochs of 2 steps, batch 2, 4 clusters of 8 dims);
    ``kw`` sets the other fields and overrides any of these (``size``; ``dims=3`` for volumes)."""
    base = dict(out=str(out), emb_dim=8, n_clusters=4, widths=SMALL, batch_size=2, epochs1=1, epochs2=2,
                steps_per_epoch=2, lr_step=1, val_images=2, progress=False, seed=3, device="cpu")
    base.update(kw)
    return train.TrainConfig(**base)


def strip_timing(records):
    """The records without their timings (what two equal runs must agree on)."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def read_metrics(out) -> list[dict]:
    """The records a run wrote to ``out``/metrics.jsonl."""
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(got: dict, want: dict) -> None:
    """Two state dicts with the same keys and bitwise equal tensors."""
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def assert_loss_impls_agree(net, vb, grid: int, stage: int) -> dict:
    """The fused and the reference objective on the views ``vb``: the same terms (those of ``stage``),
    values and parameter gradients; returns the fused run's terms as floats."""
    out = {}
    for impl in LOSS_IMPLS:
        net.zero_grad()
        z, s = net(vb.images)
        losses = LDObjective(impl, grid=grid)(z, s, vb)
        losses["loss"].backward()
        out[impl] = ({k: float(v.detach()) for k, v in losses.items()}, [p.grad.clone() for p in net.parameters()])
    (lf, gf), (lr, gr) = out["fused"], out["reference"]
    assert set(lf) == ({"loss", "pd", "mix", "rd", "ent"} if stage == 2 else {"loss", "pd", "mix"})
    for k in lf:
        assert lf[k] == pytest.approx(lr[k], rel=1e-9), k
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    return lf


def assert_resume_mid_epoch_is_exact(config, dataset, tmp_path, **kw) -> dict:
    """A run of ``config(out, **kw)`` stopped by Ctrl-C right after the step checkpoint of stage 2,
    epoch 1, step 2, then resumed, ends like an uninterrupted run (records and weights, bitwise).
    Returns the checkpoint it resumed from."""
    full = train.pretrain(config(tmp_path / "full", **kw), dataset=dataset)
    out = tmp_path / "cut"

    def stop(info):
        if (info["stage"], info["epoch"], info["step"]) == (2, 1, 2):
            assert info["checkpointed"]
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.pretrain(config(out, **kw), dataset=dataset, on_step_end=stop)
    ck = load_checkpoint(out / "checkpoint.pt")
    assert (ck["stage"], ck["epoch"], ck["step"]) == (2, 1, 2)
    resumed = train.pretrain(config(out, resume=True, **kw), dataset=dataset)
    assert strip_timing(resumed["records"]) == strip_timing(full["records"])
    assert_same_weights(resumed["final_model"].state_dict(), full["final_model"].state_dict())
    return ck


def child_env() -> dict:
    """The environment of a child process that imports this checkout's ld_ext, on one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + ((":" + env["PYTHONPATH"]) if env.get("PYTHONPATH") else "")
    return env


def assert_killed_run_resumed_equals_full(full, cut, full_records) -> None:
    """The final weights (``final_state.pt``) and metrics of the killed-and-resumed run in ``cut``
    equal those of the uninterrupted run in ``full`` (``full_records``: its records)."""
    a = torch.load(Path(full) / "final_state.pt", weights_only=True)
    b = torch.load(Path(cut) / "final_state.pt", weights_only=True)
    assert_same_weights(b, a)
    assert strip_timing(read_metrics(cut)) == strip_timing(full_records)


def parse_pretrain_args(*argv) -> train.TrainConfig:
    """The config of ``ld-ext pretrain --data x --out o *argv``."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return train.config_from_args(parser.parse_args(["--data", "x", "--out", "o", *argv]))


def pretrain_refusal(tmp_path, capsys, argv) -> str:
    """What ``ld-ext pretrain`` prints on stderr when it refuses ``argv`` (exit 2, nothing written)."""
    from ld_ext.cli import main

    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(tmp_path), "--out", str(out), "--no-progress", *argv]) == 2
    assert not out.exists()
    return capsys.readouterr().err
