"""The linear-probe table of ``ld-ext demo`` and its figure: small structures of held-out MNI152 slices,
LD's frozen features against the untrained network, intensity + local means and a position control.

The probe is ``ld_ext.tasks.probe``. Here it is run one (structure, feature set) at a time, so that
the demo's progress line moves during the probe (``on_step`` after each), and the parts are joined
into the result ``probe_experiment`` gives for all feature sets at once (the same splits, the same
numbers: each feature set's fits depend only on its own features and the split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import viz
from ..tasks import common, probe

__all__ = [
    "PROBE_SHOTS",
    "PROBE_SEEDS",
    "PROBE_MIN_PIXELS",
    "PROBE_CROP",
    "probe_plan",
    "probe_scores",
    "merge_probe_results",
    "save_probe_figure",
]

PROBE_SHOTS = (1, 5)
PROBE_SEEDS = 3
PROBE_MIN_PIXELS = 3
PROBE_CROP = 64  # the figure shows a 64-pixel window around each structure (at 128 x 128: half the slice)


def probe_plan(data: dict, seeds: int = PROBE_SEEDS, shots=PROBE_SHOTS, holdout_every: int = 5) -> list[dict]:
    """Per structure of ``data`` (``load_mni_slices(..., structures=...)``) with enough slices: its name,
    the slices it uses (``sel``), the split per shot count (indices into ``sel``) and the slice counts.

    Held-out images: the held-out slices that contain the structure (>= PROBE_MIN_PIXELS pixels).
    Training images: drawn per seed among the training slices that contain it and lie two slices
    away from the held-out ones (slice index = 0 mod ``holdout_every``), so no training image is
    a direct neighbour of a held-out one. Labels are used by the probe only, never in pre-training.
    """
    n = data["images"].shape[0]
    pos = torch.arange(n) % holdout_every  # held-out slices sit at holdout_every // 2
    plans = []
    for name, m in data["structures"].items():
        has = m.reshape(n, -1).sum(1) >= PROBE_MIN_PIXELS
        test = torch.nonzero(data["test"] & has)[:, 0].numpy()
        pool = torch.nonzero(data["train"] & has & (pos == 0))[:, 0].numpy()
        if len(test) == 0 or len(pool) < max(shots):
            continue
        trains = [
            np.sort(np.random.default_rng(1000 + s).choice(pool, size=max(shots), replace=False)) for s in range(seeds)
        ]
        split = {
            k: (
                test,
                [
                    t[np.sort(np.random.default_rng(2000 + i).choice(len(t), k, replace=False))]
                    for i, t in enumerate(trains)
                ],
            )
            for k in shots
        }
        sel = np.union1d(test, pool)
        remap = {int(j): i for i, j in enumerate(sel)}
        split = {
            k: (np.array([remap[int(j)] for j in te]), [np.array([remap[int(j)] for j in t]) for t in trs])
            for k, (te, trs) in split.items()
        }
        plans.append({"name": name, "sel": sel, "split": split, "heldout": len(test), "pool": len(pool)})
    return plans


def merge_probe_results(parts: Sequence[dict]) -> dict:
    """One ``probe_experiment`` result from results of the same structure and split, one feature set each."""
    if not parts:
        raise ValueError("parts must not be empty")
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in parts[0].items()}
    out["methods"] = list(parts[0]["methods"])
    for part in parts[1:]:
        if part["splits"] != out["splits"] or part["label"] != out["label"]:
            raise ValueError("parts must share the structure and the split")
        out["methods"] += part["methods"]
        out["seconds"] = out.get("seconds", 0.0) + part.get("seconds", 0.0)
        for key, value in part.items():
            if key in ("dice", "dice_pooled", "threshold", "summary", "summary_pooled", "_preds", "_thresholds"):
                out[key].update(value)
    return out


def probe_scores(
    trained,
    data: dict,
    seeds: int = PROBE_SEEDS,
    shots=PROBE_SHOTS,
    progress: bool = False,
    holdout_every: int = 5,
    on_step: Callable[[], None] | None = None,
    methods: Sequence[str] = probe.FEATURE_SETS,
) -> list:
    """The linear probe of ``ld_ext.tasks.probe`` on the small structures of ``data`` (see
    ``probe_plan``): LD's frozen embedding against the untrained network (a new draw per seed),
    intensity + local means and the position control; network features and probe settings are the
    probe's defaults (``probe.DEFAULT_FEATURES``). ``on_step()`` is called after each (structure,
    feature set); ``progress``: a bar of those steps."""
    from tqdm import tqdm

    plans = probe_plan(data, seeds, shots, holdout_every)
    bar = tqdm(total=len(plans) * len(methods), desc="probe", disable=not progress)
    results = []
    for plan in plans:
        sel = torch.as_tensor(plan["sel"])
        imgs = data["images"][sel, 0]
        masks = data["structures"][plan["name"]][sel].numpy()
        parts = []
        for method in methods:
            feats = probe.baseline_feature_sets(trained, imgs, methods=(method,))
            parts.append(
                probe.probe_experiment(
                    feats,
                    masks,
                    shots=shots,
                    seeds=seeds,
                    split=plan["split"],
                    label=plan["name"],
                    keep_predictions=True,
                )
            )
            bar.update(1)
            if on_step is not None:
                on_step()
        r = merge_probe_results(parts)
        r["_images"], r["_masks"] = imgs.numpy(), masks
        r["heldout_slices"], r["train_pool_slices"] = plan["heldout"], plan["pool"]
        results.append(r)
    bar.close()
    return results


def save_probe_figure(path: str | Path, results: Sequence[dict], crop: int | None = PROBE_CROP) -> Path:
    """One row per structure, one column per feature set: the held-out image with the most of the
    structure, ground truth (green) and the probe's prediction at its chosen threshold (red), seed 0
    at the largest shot count; captions give the Dice of that image and the mean over the held-out images."""
    rows = []
    methods = results[0]["methods"]
    for r in results:
        shots = str(max(r["shots"]))
        test = np.asarray(r["splits"][shots]["test"])
        masks = np.asarray(r["_masks"])
        j = int(np.argmax(masks[test].reshape(len(test), -1).sum(1)))
        img, truth = np.asarray(r["_images"])[test[j]], masks[test[j]]
        panels = []
        for m in methods:
            pred = r["_preds"][m][j] > r["_thresholds"][m]
            mean = r["summary"][m][shots]["mean"]
            panels.append(viz.MaskPanel(img, truth, pred, f"Dice {common.dice(pred, truth):.2f} (mean {mean:.2f})"))
        rows.append((r["label"].replace("_", " "), panels))
    title = (
        f"Linear probe on held-out slices, {max(results[0]['shots'])} shots, seed 0: the held-out image with the "
        "most of each structure\n(Dice of this image; mean: over all held-out images and seeds)"
    )
    titles = [probe.METHOD_LABELS.get(m, m) for m in methods]
    return viz.save_mask_grid(path, rows, titles, title=title, crop=crop)
