"""3-D pre-training on several processes (gloo, CPU): 2 processes x B must equal 1 process x 2B,
for one step (losses, gradients, 3-D batch-norm statistics) and for whole ``--dims 3`` runs on 2
torchrun "nodes" (every step's losses and the final weights), as tests/test_distributed.py checks
in 2-D, with the same tolerances. float64 throughout; views with the default warps and exact
alignment (``VolumeViewGenerator``'s recipe)."""
from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ld_ext import distributed as du
from ld_ext.augment import VolumeViewGenerator, item_generator
from ld_ext.models import LDNet
from ld_ext.objective import LDObjective

from helpers_dist import ld_step
from test_distributed import _free_port, one_process_and_two_nodes

S = 16
B = 2  # per process
WIDTHS = (8, 8, 16, 16, 16)


def _model() -> LDNet:
    torch.manual_seed(0)
    return LDNet(1, 8, 4, WIDTHS, spatial_dims=3).double()


def _step(model: LDNet, items: list[int], loss_impl: str):
    """Forward + stage-2 LD loss + backward on the given global item numbers; returns (losses, grads, bn stats)."""
    gen = VolumeViewGenerator(S)
    r = gen.read_size
    pool = torch.rand(6, 1, r, r, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    idx = torch.tensor(items)
    vb = gen(pool[idx % 6], pool[(idx + 3) % 6], [item_generator(7, i) for i in items])
    assert vb.exact_align and vb.elastic is not None
    return ld_step(model, vb, LDObjective(loss_impl, grid=2))


def _worker(rank: int, world: int, port: int, out: str, loss_impl: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    du.init_from_env("cpu")
    model = du.convert_batchnorm(_model(), "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm3d) and not isinstance(m, du.GlobalBatchNorm3d)
                   for m in model.modules())
    du.broadcast_module(model)
    result = _step(model, list(range(rank * B, (rank + 1) * B)), loss_impl)
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    du.cleanup()


@pytest.mark.parametrize("loss_impl", ["fused", "reference"])
def test_two_processes_equal_one_process_with_double_batch_3d(loss_impl):
    torch.set_num_threads(1)
    single_losses, single_grads, single_bn = _step(_model(), list(range(2 * B)), loss_impl)
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.pt")
        mp.start_processes(_worker, args=(2, _free_port(), out, loss_impl), nprocs=2, join=True, start_method="spawn")
        dist_losses, dist_grads, dist_bn = torch.load(out, weights_only=True)
    assert set(dist_losses) == set(single_losses) >= {"pd", "mix", "rd", "ent", "loss"}
    for k in single_losses:
        assert dist_losses[k] == pytest.approx(single_losses[k], rel=1e-10, abs=1e-12), k
    worst = 0.0
    for n, g in single_grads.items():
        worst = max(worst, (dist_grads[n] - g).abs().max().item() / (g.abs().max().item() + 1e-8))
    assert worst < 1e-8, f"largest relative gradient difference {worst}"
    assert sum(g.abs().sum().item() for g in single_grads.values()) > 0
    assert single_bn
    for n, b in single_bn.items():
        torch.testing.assert_close(dist_bn[n], b, rtol=1e-10, atol=1e-12)


def test_global_batchnorm3d_matches_batchnorm3d_single_process():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(3)
    gbn = du.convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm3d(3)), "cpu")[0]
    assert isinstance(gbn, du.GlobalBatchNorm3d)
    x = torch.randn(4, 3, 5, 4, 3)
    torch.testing.assert_close(gbn(x), bn(x))
    assert set(gbn.state_dict()) == set(bn.state_dict())


def _nifti_folder(root, n: int = 4, shape=(22, 20, 18)):
    import nibabel as nib

    root.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        v = torch.nn.functional.interpolate(torch.rand(1, 1, 5, 5, 5, generator=g), size=shape, mode="trilinear")
        v = (v + 0.1 * torch.rand(1, 1, *shape, generator=g))[0, 0].numpy()
        nib.save(nib.Nifti1Image((v * 800 + 50).astype(np.float32), np.diag([1.5, 1.0, 2.0, 1.0])),
                 str(root / f"scan{i}.nii.gz"))
    return root


def test_two_nodes_with_torchrun_equal_one_process_3d(tmp_path):
    """``--dims 3`` through the volume cache: torchrun --nnodes 2 (1 process each, gloo) = 1 process
    x 2B, every step's losses and the final weights, float64, tolerances of the 2-D test (lr tiny
    for the same reason: Adam's first step is about lr * sign(gradient))."""
    _, _, sa = one_process_and_two_nodes(tmp_path, _nifti_folder(tmp_path / "scans"), "--dims", "3")
    assert any(v.dim() == 5 for v in sa.values())  # a 3-D network
