"""2 processes x B (gloo, CPU) must equal 1 process x 2B: same loss, same gradients, same BN stats.

Run in float64 so that "equal" can be tested tightly: a wrong gradient scaling, a batch-norm
using local statistics or negatives taken from the local batch only are all off by far more.
"""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ld_ext import distributed as du
from ld_ext.augment import LDViewGenerator, item_generator
from ld_ext.models import LDNet
from ld_ext.train import LDCriterion, synthetic_images

SIZE = 32
B = 2  # per process
WIDTHS = (8, 8, 16, 16, 16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(stage: int) -> LDNet:
    torch.manual_seed(0)
    return LDNet(1, 8, 4 if stage == 2 else None, WIDTHS).double()


def _step(model: LDNet, items: list[int], loss_impl: str):
    """Forward + LD loss + backward on the given global item numbers; returns (losses, grads, bn stats)."""
    pool = synthetic_images(8, SIZE, seed=1).double()
    idx = torch.tensor(items)
    gens = [item_generator(7, i) for i in items]
    vb = LDViewGenerator(SIZE)(pool[idx % 8], pool[(idx + 3) % 8], gens)
    model.train()
    z, s = model(vb.images)
    losses = LDCriterion(loss_impl, grid=4)(z, s, vb)
    model.zero_grad()
    losses["loss"].backward()
    du.average_gradients(model)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    bn = {n: b.detach().clone() for n, b in model.named_buffers() if "running" in n}
    return {k: float(v.detach()) for k, v in losses.items()}, grads, bn


def _worker(rank: int, world: int, port: int, out: str, stage: int, loss_impl: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = du.init_from_env("cpu")
    assert info.world_size == world and du.is_distributed()
    model = du.convert_batchnorm(_model(stage), "cpu")
    du.broadcast_module(model)
    items = list(range(rank * B, (rank + 1) * B))
    result = _step(model, items, loss_impl)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    du.cleanup()


@pytest.mark.parametrize("stage,loss_impl", [(2, "fused"), (2, "reference")])
def test_two_processes_equal_one_process_with_double_batch(stage, loss_impl):
    torch.set_num_threads(1)
    single_losses, single_grads, single_bn = _step(_model(stage), list(range(2 * B)), loss_impl)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.pt")
        mp.start_processes(_worker, args=(2, _free_port(), out, stage, loss_impl), nprocs=2, join=True, start_method="spawn")
        dist_losses, dist_grads, dist_bn = torch.load(out, weights_only=True)
    assert set(dist_losses) == set(single_losses)
    if stage == 2:
        assert {"rd", "ent"} <= set(single_losses)
    for k in single_losses:
        assert dist_losses[k] == pytest.approx(single_losses[k], rel=1e-10, abs=1e-12), k
    assert dist_grads.keys() == single_grads.keys()
    worst = 0.0
    for n, g in single_grads.items():
        scale = g.abs().max().item() + 1e-8
        worst = max(worst, (dist_grads[n] - g).abs().max().item() / scale)
    assert worst < 1e-8, f"largest relative gradient difference {worst}"
    # a real difference would be visible: the gradients are not all zero
    assert sum(g.abs().sum().item() for g in single_grads.values()) > 0
    for n, b in single_bn.items():
        torch.testing.assert_close(dist_bn[n], b, rtol=1e-10, atol=1e-12)


def test_all_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert du.all_gather_with_grad(x) is x
    assert not du.is_distributed()


def test_global_batchnorm_matches_batchnorm_single_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    gbn = du.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), "cpu")[0]
    assert isinstance(gbn, du.GlobalBatchNorm2d)
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(gbn(x), bn(x))
    assert set(gbn.state_dict()) == set(bn.state_dict())
