#!/usr/bin/env python
"""Multi-process training with the LD losses under torchrun (gloo on CPU, nccl on GPUs).

    torchrun --standalone --nproc_per_node 2 python/torchrun_pretrain.py          # 2 processes, synthetic images (a free port)
    torchrun --nproc_per_node 2 python/torchrun_pretrain.py --images DIR --size 128
    torchrun --nproc_per_node 2 python/torchrun_pretrain.py --steps 3 --size 32    # a smoke run
    python python/torchrun_pretrain.py --steps 3                                  # also runs as 1 process

The training loop of ``python/drop_in_loss.py`` (your own model, your own loop), made
multi-process in three lines:

* ``torch.distributed.init_process_group`` from torchrun's environment;
* the model wrapped in ``DistributedDataParallel`` (gradients averaged over processes);
* the losses built with ``gather_distributed=True``: each process all-gathers the region
  features and the pooled embeddings of every process (with gradients), so the cluster centres
  and the negatives are those of the global batch. With DDP's averaging the update equals one
  process training on the concatenated batch (``tests/test_loss_gather.py`` checks this).

Each process takes its share of every global batch (``--batch-size`` images per process). At the
end the processes compare their weights (DDP keeps them identical) and process 0 prints a JSON
summary line; ``--out FILE`` also saves the trained model's weights there (atomically).

For the full LD pipeline (the published network and recipe, data cache, checkpoints, resume) the
same launch is ``torchrun --nproc_per_node 2 -m ld_ext.cli pretrain --data DIR --out DIR``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # drop_in_loss.py, beside this file
from drop_in_loss import build_parser, train  # noqa: E402


def main(argv=None) -> int:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="save the trained weights to this file (process 0)")
    args = parser.parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world_size > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"  # this example trains on the CPU
        dist.init_process_group(backend)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    rank = dist.get_rank() if distributed else 0
    try:
        wrap = torch.nn.parallel.DistributedDataParallel if distributed else None
        res = train(args, rank=rank, world_size=world_size, gather_distributed=distributed, wrap=wrap)
        model = res.pop("model")
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if distributed:  # every process must hold the same weights after the same updates
            spread = flat.clone()
            dist.all_reduce(spread, op=dist.ReduceOp.MAX)
            low = flat.clone()
            dist.all_reduce(low, op=dist.ReduceOp.MIN)
            res["max_weight_spread_across_processes"] = float((spread - low).abs().max())
        if rank == 0:
            if args.out:
                from ld_ext.atomic import atomic_write

                atomic_write(args.out, lambda f: torch.save(model.state_dict(), f))
                res["saved"] = args.out
            print(json.dumps(res))
        if distributed:
            # Every process reaches the teardown together: a process that destroyed its gloo group
            # while process 0 was still saving once aborted ("terminate called without an active
            # exception", SIGABRT) after all work was done.
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
