"""Segmentation transfer: LD-initialised network vs the same network from random initialisation.

docs/method.md section 8. The network is the LD network (encoder + decoder + embedding branch,
initialised from an LD checkpoint; the clustering branch is dropped) with a 1-channel 1x1
convolution + sigmoid head (``--head``) on the hypercolumn: z, the decoder features and the
encoder's levels 2-5 upsampled to full resolution (the default for images; ``--head z``: on the raw
embedding z, the default for volumes; ``--head e``: on sqrt(D) times the unit embedding;
``--head decoder``: on the decoder features that feed the embedding branch).
``--body-lr-factor`` scales the body's learning rate against the head's, ``--freeze-steps`` trains
the head alone first, ``--warmup-steps`` (default 10) raises both learning rates linearly over the
first steps. It is trained on ``--shots`` labelled images with the soft Dice loss
``-2 TP / (|G| + |P| + 1)`` (sums over the batch), and scored by the Dice of the prediction
thresholded at 0.5 on a held-out split. The same schedule (optimiser, steps, augmentation, data
order) runs from a random initialisation beside it, for each seed.

The head's start (``--head-init``, ``--random-head-init``): ``probe`` fits the head first as a
per-pixel logistic regression on the frozen features of the training images (``fit_head``; the
"linear probe, then fine-tune" recipe, LP-FT), ``zero`` starts it near zero. By default the
LD-initialised network starts from its probe and the random network from zero: on the development
slices LP-FT raised LD init by 4 Dice points and lowered random init by 13 (a probe on random
features calls almost nothing foreground, and soft Dice then barely recovers), docs/tasks.md
section 1. The head on the hypercolumn and the 10 warm-up steps were chosen the same way for both
inits (the best of the two heads x with or without warm-up on the development slices; without the
warm-up a probe-started head could collapse to predicting nothing, section 1).

Pairing (``--images DIR --masks DIR``): the mask of ``images/NAME.ext`` is the file of
``masks/`` named ``NAME`` or ``NAME_mask`` / ``NAME_seg`` / ``NAME_label`` / ``NAME_gt`` with any
supported extension (PNG, JPEG, TIFF, BMP, .npy, 2-D NIfTI). Nonzero (8-bit: > 127) mask pixels
are foreground. An image without a mask, or a mask whose size differs from its image's, is an
error naming the file.

Split: the pairs are shuffled once (seed 0) and ``--test-fraction`` of them (at least one) are
held out for every seed; each seed then draws its ``--shots`` training pairs from the rest whose
mask is not empty (``--include-empty``: from all of the rest; an empty training mask is then
reported with a warning, since the soft Dice loss of an image without the structure is 0 whatever
the prediction). The training files of each seed are printed and saved.
Dice is pooled over all held-out pixels (global Dice), so slices where the structure is absent
count through their false positives.

Volumes (a 3-D checkpoint; ``transfer_experiment_volumes``): the same two inits, schedule, head starts
and split, on volumes and label volumes (``ld_ext.tasks.volumes``: pairing, ``--labels``). Each step
trains on ``--batch`` random patches of the sliding window's size (``--size``, by default the
pre-training patch size) from the training volumes, half of them placed to hold foreground, flipped
along each axis at random; the probe start is fitted on two foreground patches per training volume.
Held-out volumes are predicted whole by sliding windows (50 % overlap, Gaussian weights, logits
averaged, then the sigmoid) and scored by the pooled Dice over every held-out voxel and the Dice per
volume (the mean over the held-out volumes that contain the structure).
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import infer_config, load_checkpoint
from ..models import CLUSTER_PREFIX, LDNet
from ..normalization import normalize_embeddings
from ..viz import new_figure
from . import common, volumes
from .common import split_indices  # the split that the probe shares; importable from here as before
from .probe import LinearProbe

# Defaults (docs/tasks.md section 1 has the measurements behind them).
DEFAULT_STEPS = 100
# The head on the hypercolumn with 10 warm-up steps: the best of {z, hypercolumn} x {0, 10 warm-up
# steps} for LD init and for random init alike on the development slices (2-D, 128 x 128). Without
# the warm-up, Adam's first full-size steps on the body swing the probe-started head's logits by
# about 10 and can leave it predicting nothing (Dice 0) from which the soft Dice loss never recovers.
DEFAULT_HEAD = "hypercolumn"
# Volumes keep the head on z: the hypercolumn was never measured in 3-D, and its upsampled encoder
# levels (about 15x the channels of z) cost memory at every voxel of a patch.
DEFAULT_HEAD_3D = "z"
DEFAULT_BODY_LR_FACTOR = 1.0
DEFAULT_FREEZE_STEPS = 0
DEFAULT_WARMUP_STEPS = 10
# LD init starts from the linear probe of its features (LP-FT), random init from a near-zero
# head: each the better of the two on the development slices (docs/tasks.md section 1).
DEFAULT_HEAD_INIT = "probe"
DEFAULT_RANDOM_HEAD_INIT = "zero"

__all__ = [
    "SegNet",
    "HEADS",
    "build_segnet",
    "train_segnet",
    "predict",
    "transfer_experiment",
    "transfer_experiment_volumes",
    "add_arguments",
    "run",
]


HEADS = ("z", "e", "decoder", "hypercolumn")
HEAD_INITS = ("zero", "probe", "probe-balanced")


class SegNet(nn.Module):
    """LD network body + a 1x1 conv head -> 1-channel logits (1x1x1 on a 3-D body).

    ``head="z"``: the head reads the raw embedding z (D channels); ``head="e"``: the unit embedding
    e = z / (||z|| + 1e-10) that the LD objective and the linear probe see, times sqrt(D) (unit rms
    per channel); ``head="decoder"``: it reads the
    decoder's full-resolution features that feed the embedding branch (the embedding branch is
    then unused); ``head="hypercolumn"``: z, those decoder features and the encoder's levels 2-5
    upsampled (bilinear / trilinear) to full resolution, concatenated.
    """

    def __init__(self, body: nn.Module, head: str = "z") -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.body = body
        self.head_on = head
        cin = {
            "decoder": body.decoder.out_channels,
            "hypercolumn": body.emb_dim + body.decoder.out_channels + sum(body.encoder.widths[1:]),
        }.get(head, body.emb_dim)
        self.head = (nn.Conv3d if getattr(body, "spatial_dims", 2) == 3 else nn.Conv2d)(cin, 1, kernel_size=1)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the 1x1 head reads (N, C, H, W)."""
        if self.head_on in ("z", "e"):
            z, _ = self.body(x)
            # e scaled by sqrt(D): unit rms per channel, the scale of the probe's standardised features
            return z if self.head_on == "z" else normalize_embeddings(z) * z.shape[1] ** 0.5
        enc = self.body.encoder(x)
        h = self.body.decoder.features(enc)
        if self.head_on == "decoder":
            return h
        mode = "trilinear" if h.dim() == 5 else "bilinear"
        up = [F.interpolate(e, size=h.shape[2:], mode=mode, align_corners=False) for e in enc[1:]]
        return torch.cat([self.body.decoder.emb_head(h), h, *up], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_features(x))


@torch.no_grad()
def fit_head(
    net: SegNet, images: np.ndarray, masks: np.ndarray, *, balanced: bool = False, weight_decay: float = 1e-3
) -> None:
    """Set the head to the linear probe of the frozen head features (LP-FT's first step).

    The network in eval mode reads the training images as they are (no augmentation); a per-pixel
    logistic regression on the standardised features (``ld_ext.tasks.probe.LinearProbe``) is fitted
    to the masks and folded into the 1x1 convolution, so fine-tuning starts from the best linear
    read-out of the initial features instead of a near-zero head.
    """
    net.eval()
    feats = torch.cat([net.head_features(common.model_input(images[i : i + 8])) for i in range(0, len(images), 8)])
    pr = LinearProbe(weight_decay=weight_decay, balanced=balanced).fit(feats, np.asarray(masks, dtype=bool))
    w = pr.weight / pr.std
    net.head.weight.copy_(w.reshape(net.head.weight.shape).to(net.head.weight.dtype))
    net.head.bias.fill_(float(pr.bias - (w * pr.mean).sum()))


def build_segnet(checkpoint=None, config: dict | None = None, seed: int = 0, head: str = "z") -> SegNet:
    """A SegNet from an LD checkpoint (clustering branch dropped) or, with ``checkpoint=None``,
    from random initialisation with ``config`` (LDNet constructor arguments)."""
    torch.manual_seed(seed)
    if checkpoint is not None:
        ld = common.load_ld_model(checkpoint)
        cfg = dict(ld.config)
        cfg["n_clusters"] = None
        body = LDNet(**cfg)
        sd = {k: v for k, v in ld.state_dict().items() if not k.startswith(CLUSTER_PREFIX)}
        body.load_state_dict(sd, strict=True)
    else:
        cfg = dict(config or {})
        cfg["n_clusters"] = None
        body = LDNet(**cfg)
    net = SegNet(body, head=head)
    torch.manual_seed(seed + 1)
    nn.init.normal_(net.head.weight, std=0.01)
    nn.init.zeros_(net.head.bias)
    return net


def _augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator):
    """Random flips, rotation (+-15 deg) and scale (0.9..1.1), the same map for image and mask."""
    b = x.shape[0]
    th = (torch.rand(b, generator=g) * 2 - 1) * (15 * np.pi / 180)
    sc = 0.9 + 0.2 * torch.rand(b, generator=g)
    fx = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(th) / sc, torch.sin(th) / sc
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * fx, -sin * fy
    theta[:, 1, 0], theta[:, 1, 1] = sin * fx, cos * fy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ya = F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return xa, (ya > 0.5).float()


def train_segnet(
    net: SegNet,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch: int = 5,
    seed: int = 0,
    body_lr_factor: float = 1.0,
    freeze_steps: int = 0,
    warmup_steps: int = 0,
    head_init: str = "zero",
    progress: bool = False,
    desc: str = "finetune",
    batches=None,
) -> list[float]:
    """Adam on the soft Dice loss with flip/rotation/scale augmentation; returns the loss curve.

    ``body_lr_factor``: the network body trains at ``lr * body_lr_factor`` (the head at ``lr``);
    ``freeze_steps``: the body is frozen (head only, BN statistics fixed) for the first steps.
    ``warmup_steps``: both learning rates rise linearly from 1/(N+1) of their value to it over the
    first N steps (Adam's first steps move every weight by about lr whatever its gradient).
    ``head_init``: ``"zero"`` keeps the head as built (near zero); ``"probe"`` first fits it as a
    linear probe of the frozen features of the training images (``fit_head``).
    ``batches``: a function ``generator -> (x, y)`` that draws each step's batch (network input and
    masks, e.g. ``volumes.PatchSampler``) instead of the augmented images; ``images`` and ``masks``
    then serve the probe start only.
    """
    from tqdm import tqdm

    common.check_positive_int("steps", steps)
    common.check_positive_int("freeze_steps", freeze_steps, 0)
    common.check_positive_int("warmup_steps", warmup_steps, 0)
    if not body_lr_factor >= 0:
        raise ValueError(f"body_lr_factor must be >= 0, got {body_lr_factor}")
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    if head_init != "zero":
        fit_head(net, images, masks, balanced=head_init == "probe-balanced")
    if batches is None:
        x_all = common.model_input(images)
        y_all = torch.from_numpy(np.asarray(masks, dtype=np.float32))[:, None]
        n = x_all.shape[0]
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(
        [
            {"params": list(net.head.parameters()), "lr": lr},
            {"params": list(net.body.parameters()), "lr": lr * body_lr_factor},
        ]
    )
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        frozen = step < freeze_steps
        net.train()
        if frozen:
            net.body.eval()  # BN statistics stay those of the initialisation
        ramp = min(1.0, (step + 1) / (warmup_steps + 1))
        opt.param_groups[0]["lr"] = lr * ramp
        opt.param_groups[1]["lr"] = 0.0 if frozen else lr * body_lr_factor * ramp
        if batches is not None:
            x, y = batches(g)
        else:
            idx = torch.randint(0, n, (batch,), generator=g) if n < batch else torch.randperm(n, generator=g)[:batch]
            x, y = _augment(x_all[idx], y_all[idx], g)
        loss = common.soft_dice_loss(torch.sigmoid(net(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    net.eval()
    return losses


@torch.no_grad()
def predict(net: SegNet, images: np.ndarray, batch: int = 8) -> np.ndarray:
    """Foreground probabilities (B, H, W)."""
    net.eval()
    x = common.model_input(images)
    out = [torch.sigmoid(net(x[i : i + batch]))[:, 0] for i in range(0, x.shape[0], batch)]
    return torch.cat(out).numpy()


def _transfer_split(images, masks: np.ndarray, shots: int, seeds: int, test_fraction: float, include_empty, label):
    """(held-out indices, training indices per seed) as in ``transfer_experiment``; warns (at the caller of
    ``transfer_experiment``) about every seed whose training masks include empty ones."""
    has_fg = np.array([np.asarray(m).any() for m in masks])
    test, trains = split_indices(len(images), shots, seeds, test_fraction, None if include_empty else has_fg)
    for s, tr in enumerate(trains):
        empty = [int(i) for i in tr if not has_fg[i]]
        if empty:
            warnings.warn(
                f"{label}: seed {s}: {len(empty)} of the {len(tr)} training masks are empty (indices {empty}); "
                "the soft Dice loss gives no gradient on them",
                stacklevel=3,
            )
    return test, trains


def _checkpoint_config(checkpoint) -> dict:
    """The LDNet constructor arguments of a checkpoint (saved, or inferred from its weights)."""
    ck = load_checkpoint(checkpoint)
    cfg = dict(ck.get("config") or {})
    if not cfg:
        cfg = infer_config(ck["model"])
    return cfg


def _finetune_and_predict(
    images, masks, train, test, checkpoint, cfg: dict, init: str, seed: int, settings: dict, progress: bool, label: str
):
    """Build the ``init`` ("LD" or "random") network of ``seed``, fine-tune it on the ``train`` pairs with
    ``settings`` and predict the ``test`` images: (held-out probabilities, training seconds)."""
    net = build_segnet(checkpoint if init == "LD" else None, config=cfg, seed=seed, head=settings["head"])
    t0 = time.perf_counter()
    train_segnet(
        net,
        images[train],
        masks[train],
        steps=settings["steps"],
        lr=settings["lr"],
        seed=seed,
        batch=settings["batch"],
        body_lr_factor=settings["body_lr_factor"],
        freeze_steps=settings["freeze_steps"],
        warmup_steps=settings["warmup_steps"],
        head_init=settings["head_init"] if init == "LD" else settings["random_head_init"],
        progress=progress,
        desc=f"{label} seed {seed} {init} init",
    )
    seconds = time.perf_counter() - t0
    return predict(net, images[test]), seconds


def _finetune_all_seeds(images, masks, test, trains, checkpoint, cfg: dict, settings: dict, progress, label):
    """LD-init and random-init runs for every seed: (held-out Dice per init, held-out predictions of
    seed 0 per init, total training seconds per init)."""
    from tqdm import tqdm

    dices = {"LD": [], "random": []}
    preds_first = {}
    seconds = {"LD": 0.0, "random": 0.0}
    for s, tr in enumerate(trains):
        for init in ("LD", "random"):
            p, sec = _finetune_and_predict(images, masks, tr, test, checkpoint, cfg, init, s, settings, progress, label)
            seconds[init] += sec
            dices[init].append(common.dice(p > 0.5, masks[test]))
            if progress:
                tqdm.write(f"{label} seed {s} {init} init: held-out Dice {dices[init][-1]:.3f}")
            if s == 0:
                preds_first[init] = p
    return dices, preds_first, seconds


def transfer_experiment(
    images: np.ndarray,
    masks: np.ndarray,
    checkpoint,
    *,
    shots: int = 5,
    seeds: int = 3,
    steps: int = DEFAULT_STEPS,
    lr: float = 1e-3,
    test_fraction: float = 0.5,
    include_empty: bool = False,
    head: str = DEFAULT_HEAD,
    body_lr_factor: float = DEFAULT_BODY_LR_FACTOR,
    freeze_steps: int = DEFAULT_FREEZE_STEPS,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    head_init: str = DEFAULT_HEAD_INIT,
    random_head_init: str = DEFAULT_RANDOM_HEAD_INIT,
    batch: int = 5,
    progress: bool = True,
    label: str = "target",
) -> dict:
    """Run LD-init and random-init fine-tuning for each seed; returns Dice per seed, the training
    indices used and the held-out predictions of the first seed (for overlays).

    Both inits get the same schedule (steps, learning rates, data order, augmentation) except the
    head's start: ``head_init`` for the LD-initialised network, ``random_head_init`` for the
    random one (defaults: each the one that suited it on the development slices).

    Training pairs are drawn among the pairs whose mask is not empty unless ``include_empty``;
    a training mask that is empty anyway is reported with a warning (on an image without the
    structure the soft Dice loss is 0 whatever the prediction, so that image teaches nothing).
    """
    common.check_positive_int("shots", shots)
    common.check_positive_int("seeds", seeds)
    masks = np.asarray(masks, dtype=bool)
    test, trains = _transfer_split(images, masks, shots, seeds, test_fraction, include_empty, label)
    cfg = _checkpoint_config(checkpoint)
    settings = {
        "steps": steps,
        "lr": lr,
        "head": head,
        "body_lr_factor": body_lr_factor,
        "freeze_steps": freeze_steps,
        "warmup_steps": warmup_steps,
        "head_init": head_init,
        "random_head_init": random_head_init,
        "batch": batch,
        "include_empty": include_empty,
    }
    res: dict = {
        "label": label,
        "test_indices": test.tolist(),
        "train_indices": [t.tolist() for t in trains],
        "settings": settings,
    }
    dices, preds_first, seconds = _finetune_all_seeds(
        images, masks, test, trains, checkpoint, cfg, settings, progress, label
    )
    res["dice"] = dices
    res["train_seconds_per_run"] = {k: v / seeds for k, v in seconds.items()}
    res["summary"] = {k: dict(zip(("mean", "std"), common.mean_std(v))) for k, v in dices.items()}
    res["_preds"] = preds_first
    return res


def _finetune_volumes_once(vols, masks, train, test, checkpoint, cfg: dict, init: str, seed: int, settings, label):
    """``_finetune_and_predict`` on volumes: (held-out probabilities per volume, training seconds)."""
    net = build_segnet(checkpoint if init == "LD" else None, config=cfg, seed=seed, head=settings["head"])
    sampler = volumes.PatchSampler(
        [vols[i] for i in train], [masks[i] for i in train], settings["sliding_window"], settings["batch"]
    )
    fit_x, fit_y = sampler.fixed(torch.Generator().manual_seed(3000 + seed), 2 * len(train))
    t0 = time.perf_counter()
    train_segnet(
        net,
        fit_x,
        fit_y,
        steps=settings["steps"],
        lr=settings["lr"],
        seed=seed,
        batch=settings["batch"],
        body_lr_factor=settings["body_lr_factor"],
        freeze_steps=settings["freeze_steps"],
        warmup_steps=settings["warmup_steps"],
        head_init=settings["head_init"] if init == "LD" else settings["random_head_init"],
        progress=settings["progress"],
        desc=f"{label} seed {seed} {init} init",
        batches=sampler,
    )
    seconds = time.perf_counter() - t0
    return [volumes.predict_volume(net, vols[i], settings["sliding_window"]) for i in test], seconds


def transfer_experiment_volumes(
    vols,
    masks,
    checkpoint,
    *,
    window,
    shots: int = 5,
    seeds: int = 3,
    test_fraction: float = 0.5,
    include_empty: bool = False,
    progress: bool = True,
    label: str = "target",
    **schedule,
) -> dict:
    """``transfer_experiment`` on volumes (module docstring): ``vols`` float32 volumes in [0, 1], ``masks``
    a bool volume each, ``window`` the patch / sliding-window edge; ``schedule``: steps, lr, head,
    body_lr_factor, freeze_steps, warmup_steps, head_init, random_head_init, batch (``transfer_experiment``'s defaults).
    Returns the 2-D result's keys (``dice``: pooled) and ``dice_per_volume`` with its ``summary_per_volume``."""
    common.check_positive_int("shots", shots)
    common.check_positive_int("seeds", seeds)
    masks = [np.asarray(m, dtype=bool) for m in masks]
    test, trains = _transfer_split(vols, masks, shots, seeds, test_fraction, include_empty, label)
    settings = {
        "steps": DEFAULT_STEPS,
        "lr": 1e-3,
        "head": DEFAULT_HEAD_3D,
        "body_lr_factor": DEFAULT_BODY_LR_FACTOR,
        "freeze_steps": DEFAULT_FREEZE_STEPS,
        "warmup_steps": DEFAULT_WARMUP_STEPS,
        "head_init": DEFAULT_HEAD_INIT,
        "random_head_init": DEFAULT_RANDOM_HEAD_INIT,
        "batch": 5,
        **schedule,
    }
    settings.update(include_empty=include_empty, sliding_window=list(volumes.window_size(window)))
    cfg = _checkpoint_config(checkpoint)
    res: dict = {
        "label": label,
        "unit": "volume",
        "test_indices": test.tolist(),
        "train_indices": [t.tolist() for t in trains],
        "settings": settings,
    }
    dices, per_volume, seconds = {"LD": [], "random": []}, {"LD": [], "random": []}, {"LD": 0.0, "random": 0.0}
    truth = [masks[i] for i in test]
    res["_shown"], res["_preds"] = volumes.shown_slice(masks, test), {}
    for s, tr in enumerate(trains):
        for init in ("LD", "random"):
            probs, sec = _finetune_volumes_once(
                vols, masks, tr, test, checkpoint, cfg, init, s, {**settings, "progress": progress}, label
            )
            preds = [p > 0.5 for p in probs]
            seconds[init] += sec
            dices[init].append(volumes.pooled_dice(preds, truth))
            per_volume[init].append(volumes.dice_per_volume(preds, truth))
            if s == 0:  # the overlays: one slice of one held-out volume
                j, z = res["_shown"]
                res["_preds"][init] = preds[list(test).index(j)][..., z]
    res["dice"], res["dice_per_volume"] = dices, per_volume
    res["train_seconds_per_run"] = {k: v / seeds for k, v in seconds.items()}
    for key, skey in (("dice", "summary"), ("dice_per_volume", "summary_per_volume")):
        res[skey] = {k: dict(zip(("mean", "std"), common.mean_std(v))) for k, v in res[key].items()}
    return res


def results_markdown(results: Sequence[dict], shots: int, seeds: int) -> str:
    st = results[0].get("settings", {}) if results else {}
    heads = ""
    if "head_init" in st:
        heads = f"; head start: LD init {st['head_init']}, random init {st.get('random_head_init', st['head_init'])}"
    unit = results[0].get("unit", "image") if results else "image"
    px = "voxels" if unit == "volume" else "pixels"
    lines = [
        f"Held-out Dice at 0.5 (pooled over held-out {px}), {shots} labelled {unit}s, mean +- std over {seeds} seeds"
        + heads
        + (
            "; rows '(Dice per volume)': the mean over the held-out volumes that contain the target"
            if unit == "volume"
            else ""
        ),
        "",
        "| target | LD init | random init | difference |",
        "|---|---|---|---|",
    ]
    for r in results:
        ld, rnd = r["summary"]["LD"], r["summary"]["random"]
        lines.append(
            f"| {r['label']} | {ld['mean']:.3f} +- {ld['std']:.3f} | {rnd['mean']:.3f} +- {rnd['std']:.3f} | "
            f"{ld['mean'] - rnd['mean']:+.3f} |"
        )
        if "summary_per_volume" in r:
            ld, rnd = r["summary_per_volume"]["LD"], r["summary_per_volume"]["random"]
            lines.append(
                f"| {r['label']} (Dice per volume) | {ld['mean']:.3f} +- {ld['std']:.3f} | {rnd['mean']:.3f} +- "
                f"{rnd['std']:.3f} | {ld['mean'] - rnd['mean']:+.3f} |"
            )
    if len(results) > 1:
        ld = np.mean([r["summary"]["LD"]["mean"] for r in results])
        rnd = np.mean([r["summary"]["random"]["mean"] for r in results])
        lines.append(f"| mean over targets | {ld:.3f} | {rnd:.3f} | {ld - rnd:+.3f} |")
    return "\n".join(lines) + "\n"


def plot_overlays(path, images, masks, results: Sequence[dict], n_show: int = 3) -> None:
    """Rows: targets; columns: held-out images with ground truth (green) and LD / random predictions."""
    rows = len(results)
    fig = new_figure(figsize=(2.2 * 2 * n_show, 2.4 * rows))
    axes = fig.subplots(rows, 2 * n_show, squeeze=False)
    for ri, r in enumerate(results):
        test = np.asarray(r["test_indices"])
        gt_all = r.get("_masks", masks)[test]
        img_all = r.get("_images", images)[test]
        fg = gt_all.reshape(len(test), -1).sum(1)
        show = np.argsort(-fg)[:n_show] if len(test) > n_show else np.arange(len(test))
        show = np.sort(show)
        for ci, j in enumerate(show):
            for k, init in enumerate(("LD", "random")):
                ax = axes[ri, 2 * ci + k]
                ax.imshow(img_all[j], cmap="gray")
                ax.contour(gt_all[j].astype(float), levels=[0.5], colors="lime", linewidths=0.8)
                pr = r["_preds"][init][j] > 0.5
                ov = np.zeros(pr.shape + (4,))
                ov[pr] = (1.0, 0.1, 0.1, 0.45) if init == "LD" else (0.2, 0.4, 1.0, 0.45)
                ax.imshow(ov)
                ax.set_title(f"{r['label']}: {init}", fontsize=8)
                ax.axis("off")
    fig.suptitle(
        "held-out slices: ground truth (green contour), prediction (red = LD init, blue = random init)", fontsize=9
    )
    common.atomic_savefig(fig, path)


def write_results(
    out: Path, results: Sequence[dict], images, masks, shots: int, seeds: int, extra: dict | None = None
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    md = results_markdown(results, shots, seeds)
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    common.atomic_write_json(out / "results.json", {"shots": shots, "seeds": seeds, "results": clean, **(extra or {})})
    common.atomic_write_text(out / "results.md", md)
    if images is not None:  # 2-D images (volumes: no overlays)
        plot_overlays(out / "overlays.png", images, masks, results)
    return md


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LD checkpoint (ld-ext pretrain)")
    parser.add_argument("--images", required=True, help="folder of 2-D images (of volumes, with a 3-D checkpoint)")
    parser.add_argument(
        "--masks",
        required=True,
        help="folder of binary masks (same names, optional _mask suffix; with a 3-D checkpoint: label volumes, "
        "see --labels)",
    )
    parser.add_argument("--shots", type=int, default=5, help="labelled training images per seed (default 5)")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions with different training draws (default 3)")
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help=f"optimiser steps per run (default {DEFAULT_STEPS})"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--head",
        choices=HEADS,
        default=None,
        help="1x1 head on the embedding z, on sqrt(D) times the unit embedding z/||z||, on the decoder features "
        f"or on the hypercolumn (z, decoder features, encoder levels 2-5 upsampled) (default {DEFAULT_HEAD}; "
        f"with a 3-D checkpoint {DEFAULT_HEAD_3D})",
    )
    parser.add_argument(
        "--body-lr-factor",
        type=float,
        default=DEFAULT_BODY_LR_FACTOR,
        help=f"the network body trains at lr x FACTOR, the head at lr (default {DEFAULT_BODY_LR_FACTOR})",
    )
    parser.add_argument(
        "--freeze-steps",
        type=int,
        default=DEFAULT_FREEZE_STEPS,
        help=f"train the head only for the first N steps (default {DEFAULT_FREEZE_STEPS})",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=DEFAULT_WARMUP_STEPS,
        help="raise the learning rates linearly to --lr over the first N steps, for both inits "
        f"(default {DEFAULT_WARMUP_STEPS})",
    )
    parser.add_argument(
        "--head-init",
        choices=HEAD_INITS,
        default=DEFAULT_HEAD_INIT,
        help="LD-initialised network: start the head near zero, or as the linear probe of the "
        "network's features on the training images (probe: plain logistic loss; probe-balanced: "
        f"class-balanced), then fine-tune everything (default {DEFAULT_HEAD_INIT})",
    )
    parser.add_argument(
        "--random-head-init",
        choices=HEAD_INITS,
        default=DEFAULT_RANDOM_HEAD_INIT,
        help=f"the same for the random-init network (default {DEFAULT_RANDOM_HEAD_INIT})",
    )
    parser.add_argument("--batch", type=int, default=5, help="images per step (default 5)")
    parser.add_argument(
        "--include-empty",
        action="store_true",
        help="draw training pairs among all pairs, also those whose mask is empty (default: only non-empty)",
    )
    parser.add_argument("--test-fraction", type=float, default=0.5, help="held-out share of the pairs (default 0.5)")
    common.add_size_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, overlays.png)")
    volumes.add_volume_arguments(parser)


def _run_volumes(args, trained: int | None, schedule: dict) -> int:
    """``ld-ext finetune`` with a 3-D checkpoint: one fine-tuning experiment per structure (--labels)."""
    window = volumes.volume_window(args.size, trained, args.checkpoint)
    reading = volumes.reading_options(args, volumes.recorded_reading(args.checkpoint))
    pairs = volumes.pair_volumes(args.images, args.masks)
    vols, labels = volumes.load_volume_pairs(pairs, checkpoint=args.checkpoint, images=args.images, **reading)
    results, panels = [], []
    for label, masks in volumes.structure_masks(labels, args.labels, Path(args.masks).name):
        r = transfer_experiment_volumes(
            vols,
            masks,
            args.checkpoint,
            window=window,
            shots=args.shots,
            seeds=args.seeds,
            test_fraction=args.test_fraction,
            include_empty=args.include_empty,
            progress=not args.no_progress,
            label=label,
            **schedule,
        )
        r["test_files"] = [pairs[i][0].name for i in r["test_indices"]]
        r["train_files"] = [[pairs[i][0].name for i in t] for t in r["train_indices"]]
        for s, files in enumerate(r["train_files"]):
            print(f"{label}: seed {s}: trained on {', '.join(files)}")
        j, z = r["_shown"]
        panels.append(
            [
                {
                    "title": f"{label}: {init} init",
                    "where": f"{pairs[j][0].name} z={z}",
                    "image": vols[j][..., z],
                    "mask": masks[j][..., z],
                    "pred": r["_preds"][init],
                }
                for init in ("LD", "random")
            ]
        )
        results.append(r)
    extra = volumes.reading_record(window, reading)
    md = write_results(Path(args.out), results, None, None, args.shots, args.seeds, extra)
    volumes.plot_volume_overlays(
        Path(args.out) / "overlays.png", panels, "held-out volumes, axial slice: ground truth (green), prediction (red)"
    )
    print(md)
    print(f"wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    common.check_positive_int("--shots", args.shots)
    common.check_positive_int("--seeds", args.seeds)
    common.check_positive_int("--steps", args.steps)
    if args.size is not None:
        common.check_positive_int("--size", args.size, 16)
    if not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    common.check_positive_int("--batch", args.batch)
    common.check_positive_int("--freeze-steps", args.freeze_steps, 0)
    common.check_positive_int("--warmup-steps", args.warmup_steps, 0)
    if not args.body_lr_factor >= 0:
        raise ValueError(f"--body-lr-factor must be >= 0, got {args.body_lr_factor}")
    model, trained = common.load_ld_model_and_size(args.checkpoint)
    schedule = {
        "steps": args.steps,
        "lr": args.lr,
        "head": args.head or DEFAULT_HEAD,
        "body_lr_factor": args.body_lr_factor,
        "freeze_steps": args.freeze_steps,
        "warmup_steps": args.warmup_steps,
        "head_init": args.head_init,
        "random_head_init": args.random_head_init,
        "batch": args.batch,
    }
    if volumes.check_task_inputs(args, model) == 3:
        return _run_volumes(args, trained, {**schedule, "head": args.head or DEFAULT_HEAD_3D})
    size = common.task_size(args.size, trained, args.checkpoint)
    pairs = common.pair_images_masks(args.images, args.masks)
    images, masks = common.load_pairs(pairs, size)
    if min(images.shape[1:]) < 16:
        raise ValueError(f"images must be at least 16x16 pixels, got {images.shape[2]}x{images.shape[1]}")
    r = transfer_experiment(
        images,
        masks,
        args.checkpoint,
        shots=args.shots,
        seeds=args.seeds,
        test_fraction=args.test_fraction,
        include_empty=args.include_empty,
        progress=not args.no_progress,
        label=Path(args.masks).name,
        **schedule,
    )
    r["test_files"] = [pairs[i][0].name for i in r["test_indices"]]
    r["train_files"] = [[pairs[i][0].name for i in t] for t in r["train_indices"]]
    for s, files in enumerate(r["train_files"]):
        print(f"seed {s}: trained on {', '.join(files)}")
    md = write_results(Path(args.out), [r], images, masks, args.shots, args.seeds, {"size": size})
    print(md)
    print(f"wrote {args.out}")
    return 0
