"""One LD training step as the distributed tests compare it (tests/test_distributed.py and
tests/test_distributed_3d.py): forward, the LD objective, backward, gradients averaged over the
processes (a no-op in one process)."""

from __future__ import annotations

from ld_ext import distributed as du


def ld_step(model, views, objective):
    """(losses as floats, gradients per parameter, BatchNorm running statistics) after one step of
    ``objective`` (an ``LDObjective``) on ``views`` (a view batch of the 2-D or 3-D generator)."""
    model.train()
    z, s = model(views.images)
    losses = objective(z, s, views)
    model.zero_grad()
    losses["loss"].backward()
    du.average_gradients(model)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    bn = {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n}
    return {k: float(v.detach()) for k, v in losses.items()}, grads, bn


def assert_runs_agree(one_dir, two_dir):
    """A run on one process (``one_dir``) and the same run on two (``two_dir``), written by
    tests/dist_worker.py: every step's losses within rel 1e-10 and the final weights within 1e-9.
    Returns (the one-process summary, the two-process summary, the one-process final state)."""
    import json
    from pathlib import Path

    import pytest
    import torch

    one = json.loads((Path(one_dir) / "summary.json").read_text())
    two = json.loads((Path(two_dir) / "summary.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["step_losses"]) == len(two["step_losses"]) == 4  # 2 steps x 2 stages
    for a, b in zip(one["step_losses"], two["step_losses"]):
        assert set(a) == set(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-10, abs=1e-12), k
    assert {"rd", "ent"} <= set(one["step_losses"][-1])
    sa = torch.load(Path(one_dir) / "final_state.pt", weights_only=True)
    sb = torch.load(Path(two_dir) / "final_state.pt", weights_only=True)
    for k, v in sa.items():
        if v.is_floating_point():
            torch.testing.assert_close(sb[k], v, rtol=0, atol=1e-9)
    return one, two, sa
