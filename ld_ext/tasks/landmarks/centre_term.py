"""The centre-sensitive training term: a dense correspondence InfoNCE whose hard negatives are the
pixels next to the true one, and a fine-tuning loop on random warps of unlabelled images."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .. import common
from .pooling import sample_bilinear, pooled_descriptors

# ----------------------------------------------------------------------------- training term


def centre_sensitive_loss(
    e1: torch.Tensor,
    e2: torch.Tensor,
    p2: torch.Tensor,
    q1: torch.Tensor,
    radius: int = 4,
    n_random: int = 64,
    temperature: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dense correspondence InfoNCE that is sensitive to the centre.

    ``e1``, ``e2`` (1, D, H, W) unit embeddings of an image and of a warped copy; ``p2`` (M, 2)
    pixels of the copy and ``q1`` (M, 2) their exact positions in the original. The anchor
    e2[p2] must pick e1[q1] out of e1 sampled at q1 + every integer offset within ``radius``
    (the near neighbours are the hard negatives) and at ``n_random`` random pixels.
    """
    h, w = e1.shape[-2:]
    r = int(radius)
    oy, ox = torch.meshgrid(torch.arange(-r, r + 1.0), torch.arange(-r, r + 1.0), indexing="ij")
    keep = (ox**2 + oy**2) <= r * r
    offs = torch.stack([ox[keep], oy[keep]], 1)  # (O, 2), includes (0, 0)
    centre = int(((offs**2).sum(1) == 0).nonzero()[0])
    m = p2.shape[0]
    cand = q1[:, None, :] + offs[None]  # (M, O, 2)
    rnd = torch.stack(
        [
            torch.rand(m, n_random, generator=generator) * (w - 1),
            torch.rand(m, n_random, generator=generator) * (h - 1),
        ],
        -1,
    )
    cand = torch.cat([cand, rnd], 1)
    c = sample_bilinear(e1, cand)  # (M, O + R, D)
    a = sample_bilinear(e2, p2)  # (M, D)
    logits = torch.einsum("md,mod->mo", a, c) / temperature
    return F.cross_entropy(logits, torch.full((m,), centre, dtype=torch.long, device=logits.device))


def train_centre_sensitive(
    model,
    images: np.ndarray,
    *,
    steps: int = 100,
    batch: int = 4,
    points_per_image: int = 64,
    lr: float = 1e-4,
    radius: int = 4,
    temperature: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    pooling: dict | None = None,
    on_step=None,
):
    """Fine-tune a copy of ``model`` with ``centre_sensitive_loss`` on random affine + elastic
    warps of ``images`` (M, H, W) in [0, 1] (no labels). Returns (model copy, loss history).

    With ``pooling`` (keywords of ``pooled_descriptors``: radii, mode, sigma_frac) the loss is
    applied to the pooled descriptor maps that the locator matches instead of the raw pixel
    embeddings, so the near (1..radius px) negatives are exactly the offsets the search must
    reject. ``on_step(k, net)`` is called after step k (1-based), e.g. to keep snapshots: the first
    k steps of a longer run are exactly a k-step run (constant learning rate, same draws)."""
    from tqdm import tqdm

    common.check_positive_int("steps", steps)
    net = copy.deepcopy(model)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    h, w = images.shape[-2:]
    hist = []
    for _ in tqdm(range(steps), desc="centre-sensitive term", disable=not progress):
        idx = rng.integers(0, len(images), batch)
        v1, v2, warps = [], [], []
        for i in idx:
            wp = common.random_warp((h, w), rng, max_rotation_deg=30.0, scale_range=(0.85, 1.15), elastic_px=3.0)
            v1.append(np.clip(images[i] ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.02, (h, w)), 0, 1))
            t = common.warp_image(images[i], wp)
            v2.append(np.clip(np.clip(t, 0, 1) ** rng.uniform(0.8, 1.25) + rng.normal(0, 0.02, (h, w)), 0, 1))
            warps.append((wp, t))
        p0 = next(net.parameters())
        z, _ = net(common.model_input(np.stack(v1 + v2).astype(np.float32)).to(p0.device, p0.dtype))
        e = z / (z.norm(dim=1, keepdim=True) + 1e-10)
        if pooling:
            e = pooled_descriptors(e, **pooling)
        loss = 0.0
        for j, (wp, t) in enumerate(warps):
            fg = np.argwhere(t > 0.05)  # (row, col) of the warped copy
            if len(fg) == 0:
                continue
            pick = fg[rng.integers(0, len(fg), points_per_image)]
            p2 = pick[:, ::-1].astype(np.float64)
            q1 = wp.backward(p2)
            ok = (q1[:, 0] >= 0) & (q1[:, 0] <= w - 1) & (q1[:, 1] >= 0) & (q1[:, 1] <= h - 1)
            if ok.sum() < 2:
                continue
            loss = loss + centre_sensitive_loss(
                e[j : j + 1],
                e[batch + j : batch + j + 1],
                torch.as_tensor(p2[ok], dtype=torch.float32),
                torch.as_tensor(q1[ok], dtype=torch.float32),
                radius,
                temperature=temperature,
                generator=g,
            )
        loss = loss / batch
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
        if on_step is not None:
            on_step(len(hist), net)
    net.eval()
    return net, hist
