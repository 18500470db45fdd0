"""Linear probe of frozen per-pixel features: the standard test of a self-supervised representation.

For each structure (a folder of binary masks paired with the images), a class-balanced per-pixel
logistic regression is trained on the features of ``N`` labelled images that contain the
structure. The decision threshold is then chosen on those same training images (the one of
``THRESHOLDS`` with the highest Dice there): a class-balanced fit puts its 0.5 where foreground
and background are equally likely *after reweighting*, which for a small structure marks regions
several times its size. The held-out images are scored at that threshold by

* **Dice per image** (the headline figure): the mean of the Dice of each held-out image that
  contains the structure, what a user sees image by image;
* **pooled Dice**: one Dice over all held-out pixels (images without the structure included),
  which also counts false positives on images where the structure is absent.

The network is frozen: only the linear classifier (one weight per feature channel and a bias) and
the threshold are learned, so the score says how linearly readable the structure is from the
features.

The same probe, with the same training images and the same held-out images, is run on the
sceptic's baselines (``FEATURE_SETS``):

* ``LD``: the checkpoint's features (``--features``: the unit embedding e = z / ||z||, the
  decoder's full-resolution features that feed the heads, or both, the default);
* ``random-init``: the same network at random initialisation (a new draw per seed), same features;
* ``intensity``: the intensity plus its local means over square windows of side 3, 5, 9 and 17;
* ``position``: the intensity plus the pixel coordinates x, y (in [-1, 1]), x^2, y^2 and x*y, a
  control that scores how much of a structure is "where in the image" rather than what it looks like.

Every feature channel is standardised with the mean and standard deviation over the training
pixels. The classifier minimises the class-balanced logistic loss (foreground and background
pixels each carry half of the total weight) plus ``weight_decay * ||w||^2`` with L-BFGS.

Split (``probe_splits``): the pairs are shuffled once (seed 0) and ``test_fraction`` of them are
held out for every seed and shot count; each seed draws its ``N`` training pairs among the other
pairs whose mask is not empty (a probe on an empty mask cannot learn the structure).

With a 3-D checkpoint the command takes volumes and label volumes instead (``ld_ext.tasks.probe_volumes``:
the same experiment and baselines, features by sliding windows, Dice per volume and pooled).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models import LDNet
from ..normalization import normalize_embeddings
from ..viz import new_figure
from . import common, volumes
from .common import split_indices
from .linear_probe import (  # re-exported: one definition each, in tasks.linear_probe
    DEFAULT_WEIGHT_DECAY,
    FEATURE_SETS,
    NETWORK_FEATURES,
    THRESHOLDS,
    LinearProbe,
    choose_threshold,
)
from .probe_volumes import plot_probe_overlays, probe_volume_structures

__all__ = [
    "FEATURE_SETS",
    "DEFAULT_FEATURES",
    "NETWORK_FEATURES",
    "METHOD_LABELS",
    "network_features",
    "intensity_features",
    "position_features",
    "LinearProbe",
    "probe_splits",
    "THRESHOLDS",
    "choose_threshold",
    "dice_per_image",
    "probe_experiment",
    "baseline_feature_sets",
    "results_markdown",
    "summary_sentence",
    "plot_overlays",
    "write_results",
    "add_arguments",
    "run",
]

METHOD_LABELS = {
    "LD": "LD (frozen)",
    "random-init": "random-init network",
    "intensity": "intensity + local means",
    "position": "position control",
}
INTENSITY_WINDOWS = (3, 5, 9, 17)
# Selected on the development slices of the MNI152 protocol (docs/tasks.md, "Linear probe"):
# z + decoder features gave the highest LD Dice there (z alone and decoder alone were lower; a
# weight decay of 1e-2 was lower than 1e-3: DEFAULT_WEIGHT_DECAY, in tasks.linear_probe).
DEFAULT_FEATURES = "z+decoder"


# ----------------------------------------------------------------------------- features


def _as_images(images) -> torch.Tensor:
    x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, dtype=np.float32))
    x = x.float()
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("images must not be empty")
    return x


@torch.no_grad()
def network_features(model, images, kind: str = DEFAULT_FEATURES, batch: int = 8) -> torch.Tensor:
    """Frozen per-pixel features (N, C, H, W) of an LD network for images in [0, 1].

    ``kind``: ``"z"`` the unit embedding e = z / (||z|| + 1e-10) (D channels), ``"decoder"`` the
    full-resolution decoder features that feed both heads, ``"z+decoder"`` both concatenated.
    """
    if kind not in NETWORK_FEATURES:
        raise ValueError(f"kind must be one of {NETWORK_FEATURES}, got {kind!r}")
    x = common.model_input(_as_images(images))
    if x.shape[1] != model.in_channels:
        x = x.expand(-1, model.in_channels, -1, -1)
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, x.shape[0], batch):
            h = model.decoder.features(model.encoder(x[i : i + batch]))
            parts = []
            if kind in ("z", "z+decoder"):
                z = model.decoder.emb_head(h)
                parts.append(normalize_embeddings(z))
            if kind in ("decoder", "z+decoder"):
                parts.append(h)
            out.append(torch.cat(parts, 1).float())
    finally:
        model.train(was)
    return torch.cat(out)


def intensity_features(images, windows: Sequence[int] = INTENSITY_WINDOWS) -> torch.Tensor:
    """The intensity and its local means over odd square windows (N, 1 + len(windows), H, W)."""
    x = _as_images(images)[:, None]
    chans = [x]
    for w in windows:
        w = common.check_positive_int("window", w)
        if w % 2 == 0:
            raise ValueError(f"windows must be odd, got {w}")
        chans.append(F.avg_pool2d(x, w, stride=1, padding=w // 2, count_include_pad=False))
    return torch.cat(chans, 1)


def position_features(images) -> torch.Tensor:
    """The position control (N, 6, H, W): intensity, x, y, x^2, y^2, x*y with x, y in [-1, 1]
    (pixel centres, x along columns)."""
    x = _as_images(images)
    n, h, w = x.shape
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h * 2 - 1
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w * 2 - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    pos = torch.stack([xx, yy, xx * xx, yy * yy, xx * yy])[None].expand(n, -1, -1, -1)
    return torch.cat([x[:, None], pos], 1)


# ----------------------------------------------------------------------------- the probe


def probe_splits(masks, shots: int, seeds: int, test_fraction: float = 0.5, min_pixels: int = 1):
    """(held-out indices, [training indices per seed]) as in the module docstring.

    Training images are drawn (per seed, ``1000 + seed``) among the non-held-out images whose mask
    has at least ``min_pixels`` foreground pixels.
    """
    masks = np.asarray(masks, dtype=bool)
    common.check_positive_int("shots", shots)
    common.check_positive_int("seeds", seeds)
    n = masks.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 labelled images (one to train, one to test), got {n}")
    fg = masks.reshape(n, -1).sum(1) >= min_pixels
    return split_indices(
        n,
        shots,
        seeds,
        test_fraction,
        has_foreground=fg,
        pool_words=f"of the {{rest}} non-held-out images contain the structure (>= {min_pixels} foreground pixels)",
    )


def dice_per_image(pred, masks) -> float:
    """Mean Dice over the images whose mask is not empty (images without the structure are left
    out: their Dice is 0 or 1 whatever the features); NaN when no image contains the structure."""
    pred = np.asarray(pred, dtype=bool)
    masks = np.asarray(masks, dtype=bool)
    if pred.shape != masks.shape or pred.ndim != 3:
        raise ValueError(f"pred and masks must have the same (N, H, W) shape, got {pred.shape} and {masks.shape}")
    has = masks.reshape(len(masks), -1).any(1)
    if not has.any():
        return float("nan")
    return float(np.mean([common.dice(pred[i], masks[i]) for i in np.nonzero(has)[0]]))


def _checked_probe_inputs(masks, shots, seeds, test_fraction, split, label):
    """(masks as bool, shots as a list, seeds, splits per shot count), each checked; every split must
    hold out at least one image that contains the structure."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    shots = [common.check_positive_int("shots", s) for s in shots]
    if not shots:
        raise ValueError("shots must not be empty")
    seeds = common.check_positive_int("seeds", seeds)
    splits = split or {s: probe_splits(masks, s, seeds, test_fraction) for s in shots}
    for s_count in shots:
        if not masks[np.asarray(splits[s_count][0])].any():
            raise ValueError(
                f"{label}: no held-out image contains the structure ({s_count} shot(s)); "
                "give more labelled images or a larger test fraction"
            )
    return masks, shots, seeds, splits


def _empty_probe_result(label, shots, seeds, features, masks) -> dict:
    """The result dict of ``probe_experiment`` before any probe has run."""
    return {
        "label": label,
        "shots": shots,
        "seeds": seeds,
        "methods": list(features),
        "foreground_fraction": float(masks.mean()),
        "splits": {},
        "dice": {},
        "dice_pooled": {},
        "threshold": {},
        "summary": {},
        "summary_pooled": {},
    }


def _feature_getter(features):
    """``(name, seed) -> features``: a tensor as given, or ``features[name](seed)`` for a drawn feature
    set (the last one drawn is cached, one at a time for memory)."""
    cache: dict = {}

    def feats(name, seed):
        src = features[name]
        if not callable(src):
            return src
        if (name, seed) not in cache:
            cache.clear()  # one drawn feature set at a time (memory)
            cache[(name, seed)] = src(seed)
        return cache[(name, seed)]

    return feats


def _record_splits(res: dict, splits, shots) -> None:
    """The held-out and training indices of every shot count, as lists, in ``res["splits"]``."""
    for s_count in shots:
        test, trains = splits[s_count]
        res["splits"][str(s_count)] = {
            "test": np.asarray(test).tolist(),
            "train": [np.asarray(t).tolist() for t in trains],
        }


def _fit_and_score_probe(f: torch.Tensor, masks: np.ndarray, train, test, weight_decay: float):
    """Fit one probe on the ``train`` images, choose its threshold there and score the ``test`` images:
    (held-out probabilities, threshold, Dice per image, pooled Dice)."""
    tr, te = np.asarray(train), np.asarray(test)
    probe = LinearProbe(weight_decay=weight_decay).fit(f[tr], masks[tr])
    thr = choose_threshold(probe.predict_proba(f[tr]), masks[tr])
    p = probe.predict_proba(f[te])
    return p, thr, dice_per_image(p > thr, masks[te]), common.dice(p > thr, masks[te])


def _probe_one_feature_set(res: dict, name: str, feats, masks, splits, shots, seeds: int, weight_decay: float):
    """Run the probe of feature set ``name`` for every seed and shot count, recording its scores and their
    summaries in ``res``; returns the held-out probabilities and threshold of seed 0 at the largest shot count."""
    for key in ("dice", "dice_pooled", "threshold"):
        res[key][name] = {}
    kept = None
    for seed in range(seeds):
        f = feats(name, seed)
        if f.shape[0] != masks.shape[0] or tuple(f.shape[2:]) != masks.shape[1:]:
            raise ValueError(f"features {name!r} have shape {tuple(f.shape)}; masks are {masks.shape}")
        for s_count in shots:
            test, trains = splits[s_count]
            p, thr, dice, dice_pooled = _fit_and_score_probe(f, masks, trains[seed], test, weight_decay)
            for key, v in (("dice", dice), ("dice_pooled", dice_pooled), ("threshold", thr)):
                res[key][name].setdefault(str(s_count), []).append(v)
            if seed == 0 and s_count == max(shots):
                kept = (p, thr)
    for key, skey in (("dice", "summary"), ("dice_pooled", "summary_pooled")):
        res[skey][name] = {k: dict(zip(("mean", "std"), common.mean_std(v))) for k, v in res[key][name].items()}
    return kept


def probe_experiment(
    features: Mapping[str, "torch.Tensor | Callable[[int], torch.Tensor]"],
    masks,
    *,
    shots: Sequence[int] = (1, 5),
    seeds: int = 3,
    test_fraction: float = 0.5,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    split=None,
    label: str = "structure",
    keep_predictions: bool = True,
) -> dict:
    """Run the probe for every feature set, shot count and seed.

    ``features``: name -> (N, C, H, W) tensor, or a function ``seed -> tensor`` for features that
    are drawn anew per seed (the random-init network). ``split``: optional ``{shots: (test,
    trains)}`` to reuse a split; by default ``probe_splits`` per shot count. Returns, per method,
    shot count and seed, the held-out Dice per image (``"dice"``, over the held-out images that
    contain the structure), the pooled Dice (``"dice_pooled"``) and the threshold chosen on the
    training images (``"threshold"``); their mean/std (``"summary"``, ``"summary_pooled"``); the
    indices used; and (``keep_predictions``) the held-out probabilities and threshold of seed 0 at
    the largest shot count under ``"_preds"`` and ``"_thresholds"``.
    """
    masks, shots, seeds, splits = _checked_probe_inputs(masks, shots, seeds, test_fraction, split, label)
    res = _empty_probe_result(label, shots, seeds, features, masks)
    feats = _feature_getter(features)
    preds: dict = {}
    thresholds: dict = {}
    t0 = time.perf_counter()
    _record_splits(res, splits, shots)
    for name in features:
        kept = _probe_one_feature_set(res, name, feats, masks, splits, shots, seeds, weight_decay)
        if keep_predictions:
            preds[name], thresholds[name] = kept
    res["seconds"] = time.perf_counter() - t0
    if keep_predictions:
        res["_preds"], res["_thresholds"] = preds, thresholds
    return res


def baseline_feature_sets(model, images, kind: str = DEFAULT_FEATURES, methods: Sequence[str] = FEATURE_SETS) -> dict:
    """name -> features (or seed -> features) for the probe: the trained network, the same
    architecture at random initialisation (seeded per probe seed), intensity and position."""
    unknown = [m for m in methods if m not in FEATURE_SETS]
    if unknown:
        raise ValueError(f"methods must be among {FEATURE_SETS}, got {unknown}")
    imgs = _as_images(images)
    cfg = dict(model.config)
    out: dict = {}
    for m in methods:
        if m == "LD":
            out[m] = network_features(model, imgs, kind)
        elif m == "random-init":

            def rand_feats(seed, cfg=cfg):
                torch.manual_seed(10_000 + seed)
                return network_features(LDNet(**cfg), imgs, kind)

            out[m] = rand_feats
        elif m == "intensity":
            out[m] = intensity_features(imgs)
        else:
            out[m] = position_features(imgs)
    return out


# ----------------------------------------------------------------------------- reporting


def _overall(results: Sequence[dict], method: str, key: str = "dice") -> float:
    vals = [np.mean(r[key][method][s]) for r in results for s in r[key][method]]
    return float(np.mean(vals))


def results_markdown(results: Sequence[dict]) -> str:
    """One row per structure and shot count, one column per method: held-out Dice per image (mean
    +- std over seeds); then the mean over structures per shot count and overall, and the overall
    pooled Dice and mean chosen threshold per method."""
    if not results:
        raise ValueError("results must not be empty")
    methods = results[0]["methods"]
    seeds = results[0]["seeds"]
    unit = results[0].get("unit", "image")
    head = "| structure | shots | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |"
    lines = [
        f"Linear probe of frozen features: held-out Dice per {unit} (mean over the held-out {unit}s that contain the "
        f"structure), at the threshold chosen on the training {unit}s; mean +- std over {seeds} seeds",
        "",
        head,
        "|---|---|" + "---|" * len(methods),
    ]
    shots = results[0]["shots"]
    for r in results:
        for s in shots:
            cells = [f"{r['summary'][m][str(s)]['mean']:.3f} +- {r['summary'][m][str(s)]['std']:.3f}" for m in methods]
            lines.append(f"| {r['label']} | {s} | " + " | ".join(cells) + " |")
    for s in shots:
        cells = [f"{np.mean([r['summary'][m][str(s)]['mean'] for r in results]):.3f}" for m in methods]
        lines.append(f"| **mean** | {s} | " + " | ".join(cells) + " |")
    cells = [f"**{_overall(results, m):.3f}**" for m in methods]
    lines.append("| **mean** | all | " + " | ".join(cells) + " |")
    if all("dice_pooled" in r for r in results):
        cells = [f"{_overall(results, m, 'dice_pooled'):.3f}" for m in methods]
        px = "voxels" if unit == "volume" else "pixels"
        lines.append(f"| pooled Dice (all held-out {px}) | all | " + " | ".join(cells) + " |")
        cells = [f"{_overall(results, m, 'threshold'):.2f}" for m in methods]
        lines.append(f"| threshold (chosen on the training {unit}s) | all | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_sentence(results: Sequence[dict]) -> str:
    """One sentence saying what the table means (LD against each baseline, in Dice points)."""
    methods = results[0]["methods"]
    if "LD" not in methods:
        return "No LD features in this table."
    ld = _overall(results, "LD")
    parts = []
    for m in methods:
        if m == "LD":
            continue
        d = 100 * (ld - _overall(results, m))
        parts.append(f"{'+' if d >= 0 else '-'}{abs(d):.1f} points against the {METHOD_LABELS.get(m, m)}")
    n_struct = len(results)
    shots = "/".join(str(s) for s in results[0]["shots"])
    verdict = (
        "LD's frozen features make these structures more linearly readable than every baseline"
        if all(_overall(results, m) < ld for m in methods if m != "LD")
        else "LD's frozen features do NOT beat every baseline here"
    )
    unit = results[0].get("unit", "image")
    return (
        f"{verdict}: mean held-out Dice per {unit} {ld:.3f} over {n_struct} structure(s), {shots} shot(s) and "
        f"{results[0]['seeds']} seed(s), " + ", ".join(parts) + "."
    )


def plot_overlays(path, images, results: Sequence[dict], n_show: int = 3) -> None:
    """Per structure, one row per method: the held-out images with the most of the structure, with
    ground truth (green contour) and the probe's prediction at its chosen threshold (red), seed 0
    at the largest shot count; each panel titled with its own Dice."""
    rows = [(r, m) for r in results for m in r["methods"]]
    fig = new_figure(figsize=(2.2 * n_show, 2.4 * len(rows)))
    axes = fig.subplots(len(rows), n_show, squeeze=False)
    for ri, (r, m) in enumerate(rows):
        imgs = np.asarray(r.get("_images", images))
        masks = np.asarray(r["_masks"])
        test = np.asarray(r["splits"][str(max(r["shots"]))]["test"])
        fg = masks[test].reshape(len(test), -1).sum(1)
        show = np.sort(np.argsort(-fg)[:n_show])
        thr = r.get("_thresholds", {}).get(m, 0.5)
        for ci in range(n_show):
            ax = axes[ri, ci]
            ax.axis("off")
            if ci >= len(show):
                continue
            j = show[ci]
            ax.imshow(imgs[test[j]], cmap="gray", vmin=0, vmax=1)
            ax.contour(masks[test[j]].astype(float), levels=[0.5], colors="lime", linewidths=0.7)
            pr = r["_preds"][m][j] > thr
            ov = np.zeros(pr.shape + (4,))
            ov[pr] = (1.0, 0.1, 0.1, 0.45)
            ax.imshow(ov)
            ax.set_title(
                f"{r['label']}: {METHOD_LABELS.get(m, m)}\nDice {common.dice(pr, masks[test[j]]):.2f} (t = {thr:.2f})",
                fontsize=6.5,
            )
    height = 2.4 * len(rows)
    fig.subplots_adjust(top=1.0 - 0.5 / height, hspace=0.35)
    fig.suptitle(
        "held-out images: ground truth (green contour), probe prediction above its threshold t (red)",
        fontsize=8,
        y=1.0 - 0.1 / height,
    )
    common.atomic_savefig(fig, path)


def write_results(out, results: Sequence[dict], images=None, extra: dict | None = None) -> str:
    """results.json, results.md (table + sentence) and overlays.png in ``out``; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = results_markdown(results) + "\n" + summary_sentence(results) + "\n"
    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]
    common.atomic_write_json(out / "results.json", {"results": clean, **(extra or {})})
    common.atomic_write_text(out / "results.md", md)
    if all("_preds" in r and "_masks" in r for r in results):
        plot_overlays(out / "overlays.png", images, results)
    return md


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="LD checkpoint (ld-ext pretrain)")
    parser.add_argument("--images", required=True, help="folder of 2-D images (of volumes, with a 3-D checkpoint)")
    parser.add_argument(
        "--masks",
        required=True,
        nargs="+",
        metavar="DIR",
        help="one folder of binary masks per structure (named like the images, optional _mask suffix; with a 3-D "
        "checkpoint: label volumes, see --labels)",
    )
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5], help="labelled training images (default 1 5)")
    parser.add_argument("--seeds", type=int, default=3, help="repetitions with different training draws (default 3)")
    parser.add_argument(
        "--features",
        choices=NETWORK_FEATURES,
        default=DEFAULT_FEATURES,
        help=f"network features: unit embedding z, decoder features, or both (default {DEFAULT_FEATURES})",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=DEFAULT_WEIGHT_DECAY,
        help=f"L2 penalty of the linear probe (default {DEFAULT_WEIGHT_DECAY})",
    )
    parser.add_argument("--test-fraction", type=float, default=0.5, help="held-out share of the pairs (default 0.5)")
    common.add_size_argument(parser)
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, overlays.png)")
    volumes.add_volume_arguments(parser)


def _probe_image_structures(args, model, size):
    """``ld-ext probe`` on 2-D images: one result per --masks folder, and the images of the last one."""
    results = []
    images = None
    for mdir in args.masks:
        pairs = common.pair_images_masks(args.images, mdir)
        imgs, masks = common.load_pairs(pairs, size)
        if min(imgs.shape[1:]) < 16:
            raise ValueError(f"images must be at least 16x16 pixels, got {imgs.shape[2]}x{imgs.shape[1]}")
        feats = baseline_feature_sets(model, imgs, args.features)
        r = probe_experiment(
            feats,
            masks,
            shots=args.shots,
            seeds=args.seeds,
            test_fraction=args.test_fraction,
            weight_decay=args.weight_decay,
            label=Path(mdir).name,
        )
        r["files"] = [p[0].name for p in pairs]
        r["_images"], r["_masks"] = imgs, masks
        for s in r["shots"]:
            used = sorted({i for t in r["splits"][str(s)]["train"] for i in t})
            print(f"{r['label']}: {s} shot(s): training images used: {', '.join(pairs[i][0].name for i in used)}")
        results.append(r)
        images = imgs
    return results, images


def run(args: argparse.Namespace) -> int:
    common.check_positive_int("--seeds", args.seeds)
    for s in args.shots:
        common.check_positive_int("--shots", s)
    if args.size is not None:
        common.check_positive_int("--size", args.size, 16)
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    model, trained = common.load_ld_model_and_size(args.checkpoint)
    dims = volumes.check_task_inputs(args, model)
    extra = {"checkpoint": str(args.checkpoint), "features": args.features, "weight_decay": args.weight_decay}
    if dims == 3:
        window = volumes.volume_window(args.size, trained, args.checkpoint)
        reading = volumes.reading_options(args, volumes.recorded_reading(args.checkpoint))
        results, images = probe_volume_structures(args, model, window, reading), None
        extra.update(volumes.reading_record(window, reading))
    else:
        size = common.task_size(args.size, trained, args.checkpoint)
        results, images = _probe_image_structures(args, model, size)
        extra["size"] = size
    md = write_results(Path(args.out), results, images, extra)
    if dims == 3:
        plot_probe_overlays(Path(args.out) / "overlays.png", results)
    print(md)
    print(f"wrote {args.out}")
    return 0
