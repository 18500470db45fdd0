"""Run by tests/test_distributed.py in separate processes (plain or under torchrun): one small LD
pre-training from an image folder through the cache, in float64 so that results can be compared
tightly. Not a test module itself.

usage: python dist_worker.py DATA OUT CACHE BATCH [--stop-rank R --stop-step S] [--timeout SECONDS]
       [--kill-stage S --kill-epoch E --kill-step K] [--checkpoint-every N] [--resume] [--dtype float32]
       [--dims 3]

--dims 3: DATA is a folder of volumes, 16^3 patches (tests/test_distributed_3d.py).

--stop-*: the rank SIGSTOPs itself after that step; --kill-*: the process SIGKILLs itself after
that step (stage 1/2, epoch from 0, step counted from 1 within the epoch).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("cache")
    p.add_argument("batch", type=int)
    p.add_argument("--stop-rank", type=int, default=None)
    p.add_argument("--stop-step", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--kill-stage", type=int, default=None)
    p.add_argument("--kill-epoch", type=int, default=0)
    p.add_argument("--kill-step", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--dims", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(1)
    from ld_ext import train

    rank = int(os.environ.get("RANK", "0"))
    cfg = train.TrainConfig(
        data=[a.data], out=a.out, cache=a.cache, size=32 if a.dims == 2 else 16, dims=a.dims, emb_dim=8, n_clusters=4, widths=(8, 8, 16, 16, 16),
        batch_size=a.batch, epochs1=a.epochs, epochs2=a.epochs, steps_per_epoch=a.steps, lr_step=1, val_images=0, progress=False,
        lr=a.lr, seed=5, device="cpu", workers=0, loader_workers=1, dist_timeout=a.timeout, dtype=a.dtype,
        checkpoint_every=a.checkpoint_every, resume=a.resume,
    )

    step_losses = []

    def hook(info):
        step_losses.append(info["losses"])
        if a.stop_rank == rank and info["step"] == a.stop_step:
            print(f"rank {rank}: stopping myself (SIGSTOP)", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        if (info["stage"], info["epoch"], info["step"]) == (a.kill_stage, a.kill_epoch, a.kill_step):
            print(f"killing myself (SIGKILL) after stage {a.kill_stage} epoch {a.kill_epoch} step {a.kill_step}; "
                  f"checkpointed: {info['checkpointed']}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    from ld_ext import distributed as du

    try:
        res = train.pretrain(cfg, on_step_end=hook)
    finally:
        du.cleanup()
    if rank == 0:
        torch.save({k: v for k, v in res["final_model"].state_dict().items()}, os.path.join(a.out, "final_state.pt"))
        with open(os.path.join(a.out, "summary.json"), "w") as f:
            json.dump({"step_losses": step_losses, "records": res["records"], "world_size": res["world_size"], "streaming": res["streaming"]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
