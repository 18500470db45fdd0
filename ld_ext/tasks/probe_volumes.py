"""The linear probe on volumes: ``ld-ext probe`` with a 3-D checkpoint (docs/tasks.md, "Volumes").

The same experiment as on 2-D images (``ld_ext.tasks.probe``: split, seeds, shots, class-balanced
logistic regression, threshold chosen on the training volumes, the same baselines in the same run),
with volumes in place of images:

* features of whole volumes by sliding windows of the checkpoint's training patch size
  (``ld_ext.tasks.volumes.sliding_window``: 50 % overlap, Gaussian weights), never the whole volume
  through the network at once;
* baselines: the same network at random initialisation (a new draw per seed), the intensity and its
  local means over cubes of edge 3, 5, 9 and 17, and the position control: intensity, x, y, z (voxel
  centres in [-1, 1] along each axis of the volume), x^2, y^2, z^2, x*y, x*z, y*z;
* the probe is fitted on at most ``MAX_TRAIN_VOXELS`` voxels of the training volumes (per volume an
  equal share, half foreground and half background where the volume has enough of each; every voxel
  when there are fewer), drawn with the seed; its threshold is chosen on every voxel of the training
  volumes;
* scores: Dice per volume (the mean over the held-out volumes that contain the structure, the
  headline) and the pooled Dice over every held-out voxel.

The result dicts have the keys of ``probe.probe_experiment``'s (``unit`` is ``"volume"``), so the
probe's tables and sentence report them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models import LDNet
from ..normalization import normalize_embeddings
from . import common, volumes
from .linear_probe import DEFAULT_WEIGHT_DECAY, FEATURE_SETS, NETWORK_FEATURES, LinearProbe, choose_threshold

logger = logging.getLogger("ld_ext.tasks")

__all__ = [
    "MAX_TRAIN_VOXELS",
    "CUBE_WINDOWS",
    "volume_network_features",
    "volume_intensity_features",
    "volume_position_features",
    "LazyFeatures",
    "volume_feature_sets",
    "volume_probe_experiments",
    "volume_probe_experiment",
    "probe_volume_structures",
    "plot_probe_overlays",
]

MAX_TRAIN_VOXELS = 200_000
CUBE_WINDOWS = (3, 5, 9, 17)


def volume_network_features(model, volume: np.ndarray, kind: str, window, *, weight: str = "gaussian") -> torch.Tensor:
    """Frozen features (C, X, Y, Z) of a 3-D LD network for one volume, by sliding windows: ``kind`` as in
    ``probe.network_features`` (``z``, ``decoder`` or ``z+decoder``)."""
    if kind not in NETWORK_FEATURES:
        raise ValueError(f"kind must be one of {NETWORK_FEATURES}, got {kind!r}")

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = common.model_input(x)
        if x.shape[1] != model.in_channels:
            x = x.expand(-1, model.in_channels, -1, -1, -1)
        h = model.decoder.features(model.encoder(x))
        parts = []
        if kind in ("z", "z+decoder"):
            parts.append(normalize_embeddings(model.decoder.emb_head(h)))
        if kind in ("decoder", "z+decoder"):
            parts.append(h)
        return torch.cat(parts, 1)

    was = model.training
    model.eval()
    try:
        return volumes.sliding_window(
            fn, torch.from_numpy(np.asarray(volume, dtype=np.float32))[None], window, weight=weight
        )
    finally:
        model.train(was)


def volume_intensity_features(volume: np.ndarray, windows: Sequence[int] = CUBE_WINDOWS) -> torch.Tensor:
    """The intensity and its local means over odd cubes (1 + len(windows), X, Y, Z)."""
    x = torch.from_numpy(np.asarray(volume, dtype=np.float32))[None, None]
    chans = [x]
    for w in windows:
        w = common.check_positive_int("window", w)
        if w % 2 == 0:
            raise ValueError(f"windows must be odd, got {w}")
        # mean over the voxels of the cube inside the volume (any volume size: zero padding, then count)
        r = w // 2
        total = F.avg_pool3d(F.pad(x, [r] * 6), w, stride=1)
        count = F.avg_pool3d(F.pad(torch.ones_like(x), [r] * 6), w, stride=1)
        chans.append(total / count)
    return torch.cat(chans, 1)[0]


def volume_position_features(volume: np.ndarray) -> torch.Tensor:
    """The position control (10, X, Y, Z): intensity, x, y, z, x^2, y^2, z^2, x*y, x*z, y*z with x, y, z
    the voxel centres in [-1, 1] along the volume's three axes."""
    v = torch.from_numpy(np.asarray(volume, dtype=np.float32))
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 - 1 for n in v.shape]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([v, x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])


class LazyFeatures:
    """A feature set computed when the probe reaches it: ``compute(seed)`` -> [(C, X, Y, Z) per volume];
    ``per_seed``: drawn anew for every seed (the random-init network), else computed once. The probe
    holds one feature set at a time."""

    def __init__(self, compute: Callable[[int], list], per_seed: bool = False) -> None:
        self.compute = compute
        self.per_seed = bool(per_seed)


def volume_feature_sets(model, vols: Sequence[np.ndarray], kind: str, window, methods=FEATURE_SETS) -> dict:
    """name -> ``LazyFeatures`` for the probe: the network's features, the same network at random
    initialisation (seeded per probe seed as in 2-D), intensity and position."""
    unknown = [m for m in methods if m not in FEATURE_SETS]
    if unknown:
        raise ValueError(f"methods must be among {FEATURE_SETS}, got {unknown}")
    cfg = dict(model.config)

    def random_init(seed: int) -> list:
        torch.manual_seed(10_000 + seed)
        net = LDNet(**cfg)
        return [volume_network_features(net, v, kind, window) for v in vols]

    sources = {
        "LD": LazyFeatures(lambda seed: [volume_network_features(model, v, kind, window) for v in vols]),
        "random-init": LazyFeatures(random_init, per_seed=True),
        "intensity": LazyFeatures(lambda seed: [volume_intensity_features(v) for v in vols]),
        "position": LazyFeatures(lambda seed: [volume_position_features(v) for v in vols]),
    }
    return {m: sources[m] for m in methods}


def _training_voxels(feats, masks, train, seed: int, max_voxels: int):
    """(features (1, C, M, 1), labels (1, M, 1)) of at most ``max_voxels`` voxels of the training volumes
    (module docstring), drawn with ``seed``."""
    rng = np.random.default_rng(2000 + seed)
    per = max(2, max_voxels // len(train))
    xs, ys = [], []
    for i in train:
        m = np.asarray(masks[i], dtype=bool).reshape(-1)
        fg, bg = np.flatnonzero(m), np.flatnonzero(~m)
        n_fg = min(len(fg), max(per // 2, per - len(bg)))
        n_bg = min(len(bg), per - n_fg)
        idx = np.concatenate([rng.choice(fg, n_fg, replace=False), rng.choice(bg, n_bg, replace=False)])
        f = feats[i].reshape(feats[i].shape[0], -1)
        xs.append(f[:, torch.from_numpy(idx)])
        ys.append(m[idx])
    return torch.cat(xs, 1)[None, :, :, None], np.concatenate(ys)[None, :, None]


def _probe_volumes_once(feats, masks, train, test, seed: int, weight_decay: float, max_voxels: int):
    """Fit one probe on the training volumes, choose its threshold there and score the held-out volumes:
    (threshold, Dice per volume, pooled Dice, held-out predictions)."""
    x, y = _training_voxels(feats, masks, train, seed, max_voxels)
    probe = LinearProbe(weight_decay=weight_decay).fit(x, y)
    p_train = np.concatenate([probe.predict_proba(feats[i][None])[0].reshape(-1) for i in train])
    m_train = np.concatenate([np.asarray(masks[i], dtype=bool).reshape(-1) for i in train])
    thr = choose_threshold(p_train, m_train)
    preds = [probe.predict_proba(feats[i][None])[0] > thr for i in test]
    truth = [masks[i] for i in test]
    return thr, volumes.dice_per_volume(preds, truth), volumes.pooled_dice(preds, truth), preds


def _checked_split(masks, shots, seeds: int, test_fraction: float, label: str):
    has = np.array([np.asarray(m).any() for m in masks])
    splits = {}
    for s in shots:
        test, trains = common.split_indices(
            len(masks),
            s,
            seeds,
            test_fraction,
            has_foreground=has,
            pool_words="of the {rest} non-held-out volumes contain the structure",
        )
        if not has[np.asarray(test)].any():
            raise ValueError(
                f"{label}: no held-out volume contains the structure ({s} shot(s)); "
                "give more labelled volumes or a larger test fraction"
            )
        splits[s] = (test, trains)
    return splits


def _empty_result(label: str, masks, splits, shots, seeds: int, methods) -> dict:
    voxels = sum(int(np.asarray(m).size) for m in masks)
    return {
        "label": label,
        "unit": "volume",
        "shots": shots,
        "seeds": seeds,
        "methods": list(methods),
        "foreground_fraction": sum(int(np.asarray(m).sum()) for m in masks) / voxels,
        "splits": {
            str(s): {"test": np.asarray(t).tolist(), "train": [np.asarray(x).tolist() for x in tr]}
            for s, (t, tr) in splits.items()
        },
        **{key: {name: {} for name in methods} for key in ("dice", "dice_pooled", "threshold")},
        "summary": {},
        "summary_pooled": {},
    }


def _features_of(src, seed: int, held):
    """The features of ``src`` for ``seed``: a list as it is, ``LazyFeatures`` computed (once unless
    ``per_seed``; ``held``: what it gave before), a plain function called per seed."""
    if isinstance(src, LazyFeatures):
        return src.compute(seed) if held is None or src.per_seed else held
    return src(seed) if callable(src) else src


def volume_probe_experiments(
    features: dict,
    structures: Sequence[tuple[str, Sequence[np.ndarray]]],
    *,
    shots: Sequence[int] = (1,),
    seeds: int = 3,
    test_fraction: float = 0.5,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    max_voxels: int = MAX_TRAIN_VOXELS,
) -> list[dict]:
    """The probe of every feature set, shot count and seed on volumes (module docstring), for each
    structure of ``structures`` ((label, a bool volume per volume)); one result per structure. Each
    feature set (name -> ``LazyFeatures``, [(C, X, Y, Z) per volume], or seed -> that list) is computed
    once for all structures (per seed when drawn per seed), and let go before the next one."""
    shots = [common.check_positive_int("shots", s) for s in shots]
    seeds = common.check_positive_int("seeds", seeds)
    jobs = []
    for label, masks in structures:
        if len(masks) < 2:
            raise ValueError(f"need at least 2 labelled volumes (one to train, one to test), got {len(masks)}")
        splits = _checked_split(masks, shots, seeds, test_fraction, label)
        res = _empty_result(label, masks, splits, shots, seeds, features)
        res["_shown"], res["_preds"] = volumes.shown_slice(masks, splits[max(shots)][0]), {}
        jobs.append((res, masks, splits))
    t0 = time.perf_counter()
    for name, src in features.items():
        feats = None
        for seed in range(seeds):
            feats = _features_of(src, seed, feats)
            for res, masks, splits in jobs:
                for s in shots:
                    test, trains = splits[s]
                    *scores, preds = _probe_volumes_once(
                        feats, masks, trains[seed], test, seed, weight_decay, max_voxels
                    )
                    for key, v in zip(("threshold", "dice", "dice_pooled"), scores):
                        res[key][name].setdefault(str(s), []).append(v)
                    if seed == 0 and s == max(shots):  # the overlays: one slice of one held-out volume
                        j, z = res["_shown"]
                        res["_preds"][name] = preds[list(test).index(j)][..., z]
        feats = None  # one feature set in memory at a time
        for res, _, _ in jobs:
            for key, skey in (("dice", "summary"), ("dice_pooled", "summary_pooled")):
                res[skey][name] = {k: dict(zip(("mean", "std"), common.mean_std(v))) for k, v in res[key][name].items()}
    for res, _, _ in jobs:
        res["seconds"] = time.perf_counter() - t0
    return [res for res, _, _ in jobs]


def volume_probe_experiment(features: dict, masks: Sequence[np.ndarray], *, label: str = "structure", **kw) -> dict:
    """``volume_probe_experiments`` of one structure (``masks``: a bool volume per volume)."""
    return volume_probe_experiments(features, [(label, masks)], **kw)[0]


def probe_volume_structures(args, model, window, reading: dict) -> list[dict]:
    """``ld-ext probe`` on volumes: per --masks folder (label volumes) and per --labels value, one result."""
    results = []
    for mdir in args.masks:
        pairs = volumes.pair_volumes(args.images, mdir)
        vols, labels = volumes.load_volume_pairs(pairs, checkpoint=args.checkpoint, images=args.images, **reading)
        logger.info("%s: %d volume(s), features by sliding windows of %s", Path(mdir).name, len(vols), window)
        structures = volumes.structure_masks(labels, args.labels, Path(mdir).name)
        rs = volume_probe_experiments(
            volume_feature_sets(model, vols, args.features, window),
            structures,
            shots=args.shots,
            seeds=args.seeds,
            test_fraction=args.test_fraction,
            weight_decay=args.weight_decay,
        )
        for r, (_, masks) in zip(rs, structures):
            j, z = r["_shown"]
            r["_slice"] = {"image": vols[j][..., z], "mask": masks[j][..., z], "name": f"{pairs[j][0].name} z={z}"}
            r["files"] = [p[0].name for p in pairs]
            for s in r["shots"]:
                used = sorted({i for t in r["splits"][str(s)]["train"] for i in t})
                print(f"{r['label']}: {s} shot(s): training volumes used: {', '.join(pairs[i][0].name for i in used)}")
        results.extend(rs)
    return results


def plot_probe_overlays(path, results: Sequence[dict]) -> None:
    """overlays.png of the probe on volumes: per structure, one axial slice of the held-out volume with the
    most of it, ground truth and each method's prediction (seed 0, the largest shot count)."""
    rows = [
        [
            {
                "title": f"{r['label']}: {m}",
                "where": r["_slice"]["name"],
                "image": r["_slice"]["image"],
                "mask": r["_slice"]["mask"],
                "pred": r["_preds"][m],
            }
            for m in r["methods"]
        ]
        for r in results
    ]
    volumes.plot_volume_overlays(
        path, rows, "held-out volumes, axial slice: ground truth (green contour), probe prediction (red)"
    )
