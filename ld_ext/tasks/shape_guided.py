"""Shape-guided cross-modality segmentation (docs/method.md section 8).

LD training in which cluster channel 0 is pushed towards the shape of a structure seen in
another modality: a small CNN discriminator sees binary prior masks (real) and the soft
assignment a[:, 0:1] of the LD views (fake); the generator (the LD network) adds
``BCE(D(fake), 1)`` with weight 1 to the LD loss, and the discriminator is trained with BCE and
Adam at 0.05 x the generator's learning rate. Priors are augmented like the images (flips,
rotation, crop, resize) and binarised (> 0.1).

The LD loss is the stage-2 loss of section 6, ``L_pd + L_mixup + 10 L_rd + 0.1 L_ent``, computed
by the pipeline's ``ld_ext.objective.LDObjective`` (fused ops) on views from its
``ld_ext.augment.LDViewGenerator``. The same schedule without the adversarial term ("plain LD") runs
beside it from the same initialisation, so the two are compared at equal cost.

Evaluation (when masks are given): Dice of ``a[:, 0] > 0.5`` and of ``S[0] > 0.5`` (S the soft
segmentation of section 7, via the fused ``region_features`` and ``pixel_cluster_similarity``)
against ground truth, pooled over all images; for plain LD the best-matching cluster (chosen by
that same Dice, i.e. with the ground truth's help) is reported.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..augment import LDViewGenerator, item_generator
from ..checkpoint import save_checkpoint
from ..models import CLUSTER_PREFIX, LDNet
from ..normalization import normalize_assignments, normalize_embeddings
from ..objective import LDObjective
from ..viz import new_figure
from . import common

__all__ = [
    "ShapeDiscriminator",
    "augment_priors",
    "ld_loss",
    "train_shape_guided",
    "soft_segmentation",
    "evaluate_clusters",
    "add_arguments",
    "run",
]

PRIOR_THRESHOLD = 0.1
DEFAULT_SIZE = 96  # image side without --size and without a checkpoint that records its training size
DEFAULT_CLUSTERS = 8  # K of a fresh clustering branch when neither a checkpoint's nor --clusters is given


class ShapeDiscriminator(nn.Module):
    """5 x [conv3x3, LeakyReLU, maxpool 2], two valid conv3x3, global average pool, two 1x1 convs
    -> one logit per image (the sigmoid is folded into ``BCEWithLogits``). Inputs are resized to
    ``input_size`` (160 = 5 * 2^5, so the valid convolutions end at 1x1)."""

    def __init__(
        self, widths: Sequence[int] = (8, 16, 32, 64, 64), input_size: int = 160, spectral_norm: bool = False
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.MaxPool2d(2)]
            cin = w
        layers += [nn.Conv2d(cin, cin, 3), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(cin, cin, 3)]
        layers += [nn.LeakyReLU(0.2, inplace=True), nn.AdaptiveAvgPool2d(1)]
        layers += [nn.Conv2d(cin, cin // 2, 1), nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(cin // 2, 1, 1)]
        if spectral_norm:
            layers = [nn.utils.parametrizations.spectral_norm(m) if isinstance(m, nn.Conv2d) else m for m in layers]
        self.net = nn.Sequential(*layers)
        self.input_size = int(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"x must have shape (B, 1, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(x).flatten()


def augment_priors(priors: torch.Tensor, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``n`` augmented binary prior masks (n, 1, size, size): random choice, h/v flips, rotation in
    [-180, 180], crop (scale 0.9..1), resize; binarised at > 0.1."""
    idx = torch.randint(0, priors.shape[0], (n,), generator=g)
    x = priors[idx][:, None].float()
    th = (torch.rand(n, generator=g) * 2 - 1) * math.pi
    sc = torch.sqrt(0.9 + 0.1 * torch.rand(n, generator=g))
    fx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    off = (torch.rand(n, 2, generator=g) * 2 - 1) * (1 - sc[:, None])
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(th) * sc * fx
    theta[:, 0, 1] = -torch.sin(th) * sc * fy
    theta[:, 1, 0] = torch.sin(th) * sc * fx
    theta[:, 1, 1] = torch.cos(th) * sc * fy
    theta[:, :, 2] = off
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out > PRIOR_THRESHOLD).float()


def assignment(s: torch.Tensor) -> torch.Tensor:
    """a = L1-normalised (sigmoid(s) + 1e-9) over K (``LDNet.assignment``)."""
    return normalize_assignments(s, LDNet.assignment)


def ld_loss(model, vb, criterion):
    """Stage-2 LD loss of one ViewBatch via the pipeline's ``LDObjective``:
    (total, parts dict, s of the 4B aligned views)."""
    b = vb.batch_size
    z, s = model(vb.images)
    out = criterion(z, s, vb)
    parts = {k: float(v.detach()) for k, v in out.items() if k != "loss"}
    return out["loss"], parts, s[: 4 * b]


def _noisy(x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    """Instance noise for the discriminator's inputs (0 = off, the published setting)."""
    return x if sigma <= 0 else x + sigma * torch.randn(x.shape, generator=g)


def _init_model(checkpoint, n_clusters: int | None, seed: int):
    """The network to train. From a checkpoint with a clustering branch and ``n_clusters=None``:
    the pre-trained network as it is (LD training continues, now with the prior). With
    ``n_clusters=K``: the checkpoint's encoder/decoder/embedding and a fresh K-cluster branch.
    Without a checkpoint: a random network with ``n_clusters`` (default 8) clusters."""
    torch.manual_seed(seed)
    if checkpoint is None:
        return LDNet(in_channels=1, n_clusters=n_clusters or DEFAULT_CLUSTERS)
    ld = common.load_ld_model(checkpoint)
    common.require_2d_network(ld, checkpoint, "the shape-guided task")
    cfg = dict(ld.config)
    if cfg.get("in_channels", 1) != 1:
        raise ValueError(
            f"checkpoint {checkpoint}: the shape-guided task uses 1-channel networks, got {cfg['in_channels']}"
        )
    if n_clusters is None:
        if ld.n_clusters is None:
            raise ValueError(
                f"checkpoint {checkpoint} has no clustering branch (a stage-1 network): pass n_clusters "
                "(--clusters K) to add a fresh one"
            )
        return ld
    cfg["n_clusters"] = n_clusters
    model = LDNet(**cfg)
    sd = {k: v for k, v in ld.state_dict().items() if not k.startswith(CLUSTER_PREFIX)}
    model.load_stage1(sd)
    return model


def train_shape_guided(
    images: np.ndarray,
    priors: np.ndarray | None,
    *,
    checkpoint=None,
    n_clusters: int | None = None,
    steps: int = 300,
    batch: int = 4,
    lr: float = 1e-3,
    adv_weight: float = 1.0,
    d_lr_factor: float = 0.05,
    instance_noise: float = 0.0,
    d_spectral_norm: bool = False,
    seed: int = 0,
    progress: bool = True,
    desc: str = "shape-guided",
):
    """LD training with (``priors`` given) or without (``priors=None``) the adversarial shape prior.

    ``images`` (M, H, W) in [0, 1], square; ``priors`` (P, h, w) binary. Returns (model, history).
    """
    from tqdm import tqdm

    common.check_positive_int("steps", steps)
    common.check_positive_int("batch", batch)
    size = images.shape[-1]
    if images.shape[-2] != size:
        raise ValueError(f"images must be square, got {images.shape[-2]}x{images.shape[-1]}")
    model = _init_model(checkpoint, n_clusters, seed)
    views = LDViewGenerator(size)
    criterion = LDObjective("fused", assignment=model.assignment)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    disc = d_opt = None
    pri = None
    if priors is not None:
        torch.manual_seed(seed + 7)
        disc = ShapeDiscriminator(spectral_norm=d_spectral_norm)
        d_opt = torch.optim.Adam(disc.parameters(), lr=d_lr_factor * lr)
        pri = torch.from_numpy(np.asarray(priors, dtype=np.float32))
    bce = nn.BCEWithLogitsLoss()
    imgs = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    g = torch.Generator().manual_seed(seed)
    gp = torch.Generator().manual_seed(seed + 1)
    hist = []
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress):
        i1 = torch.randint(0, imgs.shape[0], (batch,), generator=g)
        i2 = torch.randint(0, imgs.shape[0], (batch,), generator=g)
        gens = [item_generator(seed, 2, step, j) for j in range(batch)]
        vb = views(imgs[i1], imgs[i2], gens)
        loss, parts, s = ld_loss(model, vb, criterion)
        if disc is not None:
            fake = assignment(s)[:, 0:1]
            for p in disc.parameters():
                p.requires_grad_(False)
            g_adv = bce(disc(_noisy(fake, instance_noise, gp)), torch.ones(fake.shape[0]))
            for p in disc.parameters():
                p.requires_grad_(True)
            loss = loss + adv_weight * g_adv
            parts["adv_g"] = g_adv.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None:
            real = augment_priors(pri, fake.shape[0], size, gp)
            d_real = disc(_noisy(real, instance_noise, gp))
            d_fake = disc(_noisy(fake.detach(), instance_noise, gp))
            d_loss = bce(d_real, torch.ones(real.shape[0])) + bce(d_fake, torch.zeros(fake.shape[0]))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
            parts["adv_d"] = d_loss.item()
        parts["total"] = loss.item()
        hist.append(parts)
    model.eval()
    return model, hist


@torch.no_grad()
def soft_segmentation(model, images: np.ndarray, temperature: float = 0.2, batch: int = 8):
    """(a, S): the assignment a (M, K, H, W) and the soft segmentation S (M, K, H, W) of section 7
    (per-image region features through the fused ops)."""
    model.eval()
    x = common.model_input(images)
    a_all, s_all = [], []
    for i in range(0, x.shape[0], batch):
        z, s = model(x[i : i + batch])
        r = ops.region_features(z, s, normalize=True, assignment=model.assignment)
        e = normalize_embeddings(z)
        a_all.append(assignment(s))
        s_all.append(ops.pixel_cluster_similarity(e, r, temperature))
    return torch.cat(a_all).numpy(), torch.cat(s_all).numpy()


def evaluate_clusters(a: np.ndarray, S: np.ndarray, masks: np.ndarray) -> dict:
    """Dice (pooled over images) of every cluster's ``a[:, k] > 0.5`` and ``S[k] > 0.5``."""
    k = a.shape[1]
    return {
        "a": [common.dice(a[:, j] > 0.5, masks) for j in range(k)],
        "S": [common.dice(S[:, j] > 0.5, masks) for j in range(k)],
    }


def plot_shape_guided(path, images, masks, priors, guided, plain, best_k: int, n_show: int = 4, guided_a=None) -> None:
    """Columns: ``n_show`` images. Rows: image, guided a[:, 0] (if given), guided S[0], plain LD's
    best S[k], and one prior each (as loaded, not augmented); red contours: ground truth (if given)."""
    idx = np.linspace(0, len(images) - 1, n_show).round().astype(int)
    pidx = np.linspace(0, len(priors) - 1, n_show).round().astype(int)
    panels = [("image", images, "gray")]
    if guided_a is not None:
        panels.append(("guided: a[0]", guided_a, "viridis"))
    panels += [("guided: S[0]", guided, "viridis"), (f"plain LD: best S[{best_k}]", plain, "viridis")]
    rows = len(panels) + 1
    fig = new_figure(figsize=(2.3 * n_show, 2.3 * rows))
    ax = fig.subplots(rows, n_show, squeeze=False)
    for c, j in enumerate(idx):
        for r, (title, arr, cmap) in enumerate(panels):
            kw = {} if cmap == "gray" else {"vmin": 0, "vmax": 1}
            ax[r, c].imshow(arr[j], cmap=cmap, **kw)
            ax[r, c].set_title(title, fontsize=8)
            if masks is not None and r > 0:
                ax[r, c].contour(masks[j].astype(float), levels=[0.5], colors="red", linewidths=0.6)
        ax[rows - 1, c].imshow(priors[pidx[c]], cmap="gray")
        ax[rows - 1, c].set_title("a shape prior (other source)", fontsize=8)
        for r in range(rows):
            ax[r, c].axis("off")
    fig.suptitle(
        "shape-guided LD (cluster 0) vs plain LD" + ("; red: ground truth" if masks is not None else ""), fontsize=9
    )
    common.atomic_savefig(fig, path)


ADV_TAIL = 10  # steps over which the final adversarial loss is averaged to choose among restarts


def final_adversarial_loss(hist: list[dict], tail: int = ADV_TAIL) -> float:
    """Mean of the network's adversarial term ``BCE(D(fake), 1)`` over the last ``tail`` steps:
    low when the discriminator takes cluster 0 for a prior mask (uses no labels)."""
    vals = [h["adv_g"] for h in hist[-tail:] if "adv_g" in h]
    if not vals:
        raise ValueError("hist has no adversarial term (was it a plain-LD run?)")
    return float(np.mean(vals))


def _restart_record(model, hist: list[dict], seed: int, images, masks) -> tuple[dict, tuple | None]:
    """The record of one guided run (seed, final adversarial loss and, with masks, the Dice of cluster 0)
    and its soft segmentation maps (a, S) when masks are given (else None)."""
    rec = {"seed": seed, "final_adv_g": final_adversarial_loss(hist)}
    maps = None
    if masks is not None:
        maps = soft_segmentation(model, images)
        rec["dice_cluster0_a"] = common.dice(maps[0][:, 0] > 0.5, masks)
        rec["dice_cluster0_S"] = common.dice(maps[1][:, 0] > 0.5, masks)
    return rec, maps


def _best_guided_run(images, priors, masks, seed: int, restarts: int, records: list, train_kw: dict, adv_kw: dict):
    """Train the guided network from seeds ``seed, seed+1, ...`` (``restarts`` runs), append each run's record
    to ``records`` and return the run with the lowest final adversarial loss: (model, history, record, maps)."""
    best = None
    for r in range(restarts):
        model, hist = train_shape_guided(
            images, priors, **train_kw, seed=seed + r, desc=f"LD + shape prior (seed {seed + r})", **adv_kw
        )
        rec, maps = _restart_record(model, hist, seed + r, images, masks)
        records.append(rec)
        if best is None or rec["final_adv_g"] < best[2]["final_adv_g"]:
            best = (model, hist, rec, maps)
    return best


def _guided_vs_plain_dice(ag, sg, ap, sp, masks) -> dict:
    """Dice of the guided network's cluster 0 and of plain LD's best-matching cluster (chosen by that Dice),
    for the assignment a and the soft segmentation S, with every cluster's Dice."""
    dg = evaluate_clusters(ag, sg, masks)
    dp = evaluate_clusters(ap, sp, masks)
    best_a = int(np.argmax(dp["a"]))
    best_s = int(np.argmax(dp["S"]))
    return {
        "guided_cluster0_a": dg["a"][0],
        "guided_cluster0_S": dg["S"][0],
        "plain_best_a": dp["a"][best_a],
        "plain_best_a_cluster": best_a,
        "plain_best_S": dp["S"][best_s],
        "plain_best_S_cluster": best_s,
        "guided_all_clusters": dg,
        "plain_all_clusters": dp,
    }


def shape_guided_experiment(
    images,
    priors,
    masks=None,
    *,
    checkpoint=None,
    steps=300,
    n_clusters=None,
    lr=1e-3,
    batch=4,
    seed=0,
    progress=True,
    d_lr_factor: float = 0.05,
    instance_noise: float = 0.0,
    d_spectral_norm: bool = False,
    restarts: int = 1,
) -> dict:
    """Train guided and plain LD from the same initialisation, evaluate both (if masks given).

    ``restarts > 1``: the guided run is repeated with seeds ``seed, seed+1, ...`` and the one with the
    lowest final adversarial loss (:func:`final_adversarial_loss`, no labels involved) is kept;
    every restart's loss (and Dice, when masks are given) is recorded in ``out["restarts"]``.
    """
    common.check_positive_int("restarts", restarts)
    out: dict = {
        "steps": steps,
        "n_clusters": n_clusters,
        "batch": batch,
        "lr": lr,
        "seed": seed,
        "d_lr_factor": d_lr_factor,
        "instance_noise": instance_noise,
        "d_spectral_norm": d_spectral_norm,
        "restarts": [],
    }
    train_kw = dict(checkpoint=checkpoint, n_clusters=n_clusters, steps=steps, batch=batch, lr=lr, progress=progress)
    adv_kw = dict(d_lr_factor=d_lr_factor, instance_noise=instance_noise, d_spectral_norm=d_spectral_norm)
    t0 = time.perf_counter()
    guided, hg, chosen, guided_maps = _best_guided_run(
        images, priors, masks, seed, restarts, out["restarts"], train_kw, adv_kw
    )
    out["chosen_seed"] = chosen["seed"]
    out["seconds_guided"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain, hp = train_shape_guided(images, None, **train_kw, seed=chosen["seed"], desc="plain LD")
    out["seconds_plain"] = time.perf_counter() - t0
    out["n_clusters"] = guided.n_clusters
    out["final_losses"] = {"guided": hg[-1], "plain": hp[-1]}
    ag, sg = guided_maps if guided_maps is not None else soft_segmentation(guided, images)
    ap, sp = soft_segmentation(plain, images)
    out["_maps"] = (ag, sg, ap, sp)
    out["_models"] = (guided, plain)
    if masks is not None:
        out["dice"] = _guided_vs_plain_dice(ag, sg, ap, sp, masks)
    return out


def results_markdown(res: dict) -> str:
    d = res["dice"]
    md = (
        "| method | Dice of a[:,k] > 0.5 | Dice of S[k] > 0.5 |\n|---|---|---|\n"
        f"| LD + shape prior, cluster 0 (seed {res.get('chosen_seed', res['seed'])}) | "
        f"{d['guided_cluster0_a']:.3f} | {d['guided_cluster0_S']:.3f} |\n"
        f"| plain LD, best cluster (a: k={d['plain_best_a_cluster']}, S: k={d['plain_best_S_cluster']}) | "
        f"{d['plain_best_a']:.3f} | {d['plain_best_S']:.3f} |\n"
    )
    rs = res.get("restarts") or []
    if len(rs) > 1:
        md += (
            "\nGuided restarts (the kept one has the lowest final adversarial loss; no labels used):\n\n"
            "| seed | final BCE(D(fake), 1) | Dice a[:,0] > 0.5 | Dice S[0] > 0.5 |\n|---|---|---|---|\n"
        )
        for r in rs:
            mark = " (kept)" if r["seed"] == res.get("chosen_seed") else ""
            md += (
                f"| {r['seed']}{mark} | {r['final_adv_g']:.3f} | {r.get('dice_cluster0_a', float('nan')):.3f} | "
                f"{r.get('dice_cluster0_S', float('nan')):.3f} |\n"
            )
    return md


def write_results(out: Path, res: dict, images, masks, priors, note: str = "") -> str | None:
    """Checkpoints, results.json, the picture and (with masks) results.md, with ``note`` appended."""
    out.mkdir(parents=True, exist_ok=True)
    guided, plain = res["_models"]
    save_checkpoint(out / "shape_guided.pt", guided)
    save_checkpoint(out / "plain_ld.pt", plain)
    ag, sg, ap, sp = res["_maps"]
    md = None
    best = 0
    if "dice" in res:
        md = results_markdown(res) + note
        common.atomic_write_text(out / "results.md", md)
        best = res["dice"]["plain_best_S_cluster"]
    common.atomic_write_json(out / "results.json", {k: v for k, v in res.items() if not k.startswith("_")})
    plot_shape_guided(out / "shape_guided.png", images, masks, priors, sg[:, 0], sp[:, best], best, guided_a=ag[:, 0])
    return md


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of 2-D images to segment (one modality)")
    parser.add_argument("--priors", required=True, help="folder of binary masks of the structure from ANOTHER source")
    parser.add_argument("--masks", default=None, help="ground truth for --images (same pairing rules as finetune)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, results.json/md, PNG)")
    parser.add_argument("--checkpoint", default=None, help="initialise from this LD checkpoint (default: random)")
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"images and priors are resized to SIZE x SIZE (default: the size --checkpoint was pre-trained at, "
        f"when it records it; else {DEFAULT_SIZE})",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="replace the checkpoint's clustering branch by a fresh one with K clusters "
        "(default: keep the checkpoint's; without --checkpoint, 8)",
    )
    parser.add_argument("--batch", type=int, default=4, help="B pairs per step (5B images through the net)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--d-lr-factor", type=float, default=0.05, help="discriminator lr = FACTOR x --lr (published: 0.05)"
    )
    parser.add_argument(
        "--instance-noise",
        type=float,
        default=0.0,
        help="sd of Gaussian noise added to the discriminator's inputs (default 0, as published)",
    )
    parser.add_argument(
        "--d-spectral-norm",
        action="store_true",
        help="spectral normalisation on the discriminator's convolutions (default off, as published)",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="train the guided network from R seeds and keep the one with the lowest final adversarial "
        "loss (label-free; default 1)",
    )
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.size is not None:
        common.check_positive_int("--size", args.size, 16)
    common.check_positive_int("--steps", args.steps)
    if args.clusters is not None:
        common.check_positive_int("--clusters", args.clusters, 2)
    common.check_positive_int("--batch", args.batch)
    common.check_positive_int("--restarts", args.restarts)
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if not args.d_lr_factor > 0:
        raise ValueError(f"--d-lr-factor must be > 0, got {args.d_lr_factor}")
    trained = common.checkpoint_train_size(args.checkpoint) if args.checkpoint is not None else None
    size = common.task_size(args.size, trained, args.checkpoint, default=DEFAULT_SIZE)
    prior_files = common.list_images(args.priors, "priors")
    priors = np.stack([common.resize_image(common.load_mask(p).astype(np.float32), size) > 0.5 for p in prior_files])
    if masks_dir := args.masks:
        pairs = common.pair_images_masks(args.images, masks_dir)
        images, masks = common.load_pairs(pairs, size)
    else:
        files = common.list_images(args.images, "images")
        images = np.stack([common.resize_image(common.scale_intensity(common.load_image(f)), size) for f in files])
        masks = None
    res = shape_guided_experiment(
        images,
        priors,
        masks,
        checkpoint=args.checkpoint,
        steps=args.steps,
        n_clusters=args.clusters,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        d_lr_factor=args.d_lr_factor,
        instance_noise=args.instance_noise,
        d_spectral_norm=args.d_spectral_norm,
        restarts=args.restarts,
    )
    md = write_results(Path(args.out), res, images, masks, priors)
    if md:
        print(md)
    print(f"wrote {args.out}")
    return 0
