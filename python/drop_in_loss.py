#!/usr/bin/env python
"""The drop-in LD losses in your own PyTorch training loop, on your own model.

    python python/drop_in_loss.py                            # synthetic images, 60 steps at 64x64
    python python/drop_in_loss.py --images DIR --size 128    # your images (any format ld_ext reads)
    python python/drop_in_loss.py --steps 3 --size 32        # a smoke run of a few seconds

The model (``TinyNet``) stands for yours: any network whose head gives per-pixel embeddings
z (N, D, H, W) and cluster logits s (N, K, H, W). Each step draws two random views of a batch of
images (``two_views``: crop, flip, gamma) and trains with

* ``ld_ext.PatchDiscriminationLoss``: the two views' pooled unit embeddings, each view's positive
  is the other view of the same image, every other image a negative;
* ``ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)``:
  the published clustering loss straight from the raw outputs (z, s), in one fused pass, plus
  the entropy term of the assignment.

At the first step the clustering loss is also computed the way the published code writes it
(``published_clustering_loss``, plain PyTorch, a tensor of N*K*D*H*W floats) and the difference
is printed. The last line of the output is a JSON summary (steps, first/last loss, that
difference, seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:  # a source checkout: make the in-place package importable
    import ld_ext
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import ld_ext


class TinyNet(nn.Module):
    """A small two-level U-Net with an embedding head (D channels) and a clustering head (K)."""

    def __init__(self, in_channels: int = 1, width: int = 16, emb_dim: int = 16, n_clusters: int = 8):
        super().__init__()

        def block(cin, cout):
            # GroupNorm, not BatchNorm: no batch statistics to synchronise across processes
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(inplace=True))

        self.enc1 = block(in_channels, width)
        self.enc2 = block(width, 2 * width)
        self.dec = block(3 * width, width)
        self.emb = nn.Conv2d(width, emb_dim, 1)
        self.clu = nn.Conv2d(width, n_clusters, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        up = F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        d = self.dec(torch.cat([up, e1], 1))
        return self.emb(d), self.clu(d)  # raw z and raw logits: the losses normalise them


def synthetic_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) in [0, 1]: a few bright and dark ellipses on a background, plus noise."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    imgs = 0.2 + 0.05 * torch.randn(n, size, size, generator=g)
    for i in range(n):
        for _ in range(4):
            cx, cy = (torch.rand(2, generator=g) * 1.2 - 0.6).tolist()
            ax, ay = (0.15 + 0.35 * torch.rand(2, generator=g)).tolist()
            level = float(torch.rand(1, generator=g))
            inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 < 1
            imgs[i][inside] = level
    return imgs.clamp(0, 1)[:, None]


def two_views(images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random views of each image: a crop of 60-100 % of the side resized back, a random
    horizontal flip and a random gamma in [0.7, 1.4]."""
    n, _, h, w = images.shape

    def view():
        out = []
        for img in images:
            s = int(h * (0.6 + 0.4 * float(torch.rand(1, generator=generator))))
            top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
            crop = img[:, top : top + s, left : left + s][None]
            crop = F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)[0]
            if float(torch.rand(1, generator=generator)) < 0.5:
                crop = crop.flip(-1)
            gamma = 0.7 + 0.7 * float(torch.rand(1, generator=generator))
            out.append(crop.clamp(0, 1) ** gamma)
        return torch.stack(out)

    return view(), view()


def published_clustering_loss(z: torch.Tensor, logits: torch.Tensor, tau: float = 0.2):
    """The published formulation in plain PyTorch (docs/reference.md, "Drop-in use"), for comparison only."""
    emb = z / (z.norm(dim=1, keepdim=True) + 1e-10)
    att = torch.sigmoid(logits) + 1e-9
    att = att / att.sum(dim=1, keepdim=True)
    rf = (emb[:, None] * att[:, :, None]).mean(dim=(3, 4))  # (N, K, D, H, W) in memory
    rf = rf / (rf.norm(dim=2, keepdim=True) + 1e-10)
    centres = rf.mean(0)
    centres = centres / (centres.norm(dim=1, keepdim=True) + 1e-10)
    sim = torch.exp(torch.einsum("nkd,jd->nkj", rf, centres) / tau)
    loss_rd = -torch.log(torch.diagonal(sim / sim.sum(2, keepdim=True), dim1=1, dim2=2)).mean()
    loss_ent = (-att * torch.log2(att + 1e-30) - (1 - att) * torch.log2(1 - att + 1e-30)).mean()
    return loss_rd, loss_ent


def pooled_unit(z: torch.Tensor) -> torch.Tensor:
    """(N, D, H, W) -> (N, D): the mean embedding of each image, made unit length."""
    v = z.mean(dim=(2, 3))
    return v / (v.norm(dim=1, keepdim=True) + 1e-10)


def train(args, rank: int = 0, world_size: int = 1, gather_distributed: bool = False, wrap=None) -> dict:
    """The training loop. ``rank``/``world_size`` pick this process's share of each batch;
    ``wrap(model)`` may wrap the model (``torch.nn.parallel.DistributedDataParallel``)."""
    torch.manual_seed(args.seed)
    if args.images:
        from ld_ext.data import ImageFolderDataset

        images = ImageFolderDataset(args.images, size=args.size, progress=False).images
    else:
        images = synthetic_images(args.n_images, args.size, seed=args.seed)
    model = TinyNet(images.shape[1], args.width, args.emb_dim, args.clusters)
    net = wrap(model) if wrap is not None else model
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    region_loss = ld_ext.RegionDiscriminationLoss(
        normalize=True, assignment="sigmoid", return_entropy=True, gather_distributed=gather_distributed
    )
    patch_loss = ld_ext.PatchDiscriminationLoss(gather_distributed=gather_distributed)
    local_region_loss = ld_ext.RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)
    g = torch.Generator().manual_seed(args.seed)  # the same draws in every process
    history, diff, t0 = [], None, time.perf_counter()
    for step in range(args.steps):
        idx = torch.randperm(len(images), generator=g)[: args.batch_size * world_size]
        batch = images[idx[rank::world_size]]  # this process's share of the global batch
        v1, v2 = two_views(batch, g)
        z, s = net(torch.cat([v1, v2]))
        z1, z2 = z.chunk(2)
        loss_pd = patch_loss(pooled_unit(z1), pooled_unit(z2))
        loss_rd, loss_ent = region_loss(z, s)
        loss = loss_pd + 10.0 * loss_rd + 0.1 * loss_ent
        if step == 0:  # the same numbers as the published formulation, on this process's images
            with torch.no_grad():
                ref_rd, ref_ent = published_clustering_loss(z, s)
                ours = (loss_rd, loss_ent) if not gather_distributed else local_region_loss(z, s)
            diff = max(abs(float(ref_rd) - float(ours[0])), abs(float(ref_ent) - float(ours[1])))
            if rank == 0:
                print(f"step 0: fused region loss {float(ours[0]):.6f}, published formulation {float(ref_rd):.6f} "
                      f"(largest difference of the two terms {diff:.2e})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} (pd {loss_pd.item():.4f}, "
                  f"rd {loss_rd.item():.4f}, ent {loss_ent.item():.4f})")
    return {
        "steps": args.steps,
        "images": len(images),
        "size": args.size,
        "processes": world_size,
        "first_loss": history[0],
        "last_loss": history[-1],
        "max_abs_diff_vs_published": diff,
        "seconds": round(time.perf_counter() - t0, 2),
        "model": model,
    }


def build_parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--images", default=None, help="a folder of images (default: synthetic images)")
    p.add_argument("--n-images", type=int, default=64, help="synthetic images to make (default 64)")
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (per process) (default 8)")
    p.add_argument("--width", type=int, default=16, help="network width (default 16)")
    p.add_argument("--emb-dim", type=int, default=16, help="embedding channels D (default 16)")
    p.add_argument("--clusters", type=int, default=8, help="clusters K (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    res = train(args)
    res.pop("model")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
