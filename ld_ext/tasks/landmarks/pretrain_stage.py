"""Stage 3 of ``ld-ext pretrain``: the centre-sensitive term learned once, on the pre-training images.

After stages 1 and 2 the network is fine-tuned for ``steps`` steps with ``centre_sensitive_loss``
on random affine + elastic warps of the pre-training images (``train_centre_sensitive``, no
labels), so that ``ld-ext landmark`` needs no per-call training. The stage tunes a copy: the
stage-2 network stays the representation (``"model"`` of ``OUT/model.pt``, what segmentation, probe
and shape-guided read), and the tuned copy goes to ``OUT/stage3.pt`` and, beside the
representation, to ``"landmark_model"`` of ``OUT/model.pt`` (what ``ld-ext landmark`` reads), with a
``"centre_term"`` record (steps, loss at the start and end, seconds, images); one line
``{"stage": 3, ...}`` is added to ``metrics.jsonl``. Trained into the same weights, the term
lowered the representation's linear-probe Dice (docs/tasks.md section 2); kept apart it cannot.

Resume: a run resumed after stage 3 finished loads ``stage3.pt`` (when it was made with the same
number of steps and seed) instead of training again; stage 3 itself has no mid-stage checkpoint,
an interrupted stage 3 is redone from the stage-2 weights (100 steps by default; on a shared
2-core CPU at 128 x 128 under heavy load 50 steps took 7-13 min, far less than stages 1-2).
Multi-process runs: stage 3 runs on process 0 only (it is short and has no collectives); the
others finish when stages 1-2 are done.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from ...checkpoint import check_state_dict, defer_signals, load_checkpoint, save_checkpoint
from .centre_term import train_centre_sensitive

__all__ = ["STAGE3_FILE", "DEFAULT_CENTRE_STEPS", "MAX_STAGE_IMAGES", "centre_term_record", "run_centre_stage"]

logger = logging.getLogger("ld_ext.train")

STAGE3_FILE = "stage3.pt"
# Selected on the protocol's selection slices at 128 x 128 (docs/tasks.md section 2, "The term in
# pre-training"; protocols/landmark_protocol.py) among 0, 50 and 100 steps (longer runs were not
# measured): MRE 2.46 px (0), 0.70 (50), 0.68 (100).
DEFAULT_CENTRE_STEPS = 100
MAX_STAGE_IMAGES = 2048  # images drawn (with the seed) from a larger training set for the stage


def centre_term_record(state: dict) -> dict | None:
    """The ``"centre_term"`` record of a checkpoint dict (model.pt, stage3.pt), or None when the
    network was saved without stage 3."""
    rec = state.get("centre_term") if isinstance(state, dict) else None
    if rec is None:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("steps"), int) or isinstance(rec.get("steps"), bool):
        raise ValueError("checkpoint: 'centre_term' must be a dict with an int 'steps'")
    for key, value in rec.items():
        kind = RECORD_FIELDS.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is None or not number or (kind == "int" and not isinstance(value, int)) or not math.isfinite(value):
            expected = f"one of {', '.join(RECORD_FIELDS)}" if kind is None else f"a finite {kind}"
            shown = f" {value!r}" if number or isinstance(value, str) else ""
            raise ValueError(
                f"checkpoint: 'centre_term' entry {key!r} must be {expected}, got {type(value).__name__}{shown}"
            )
    return rec


def centre_term_result(steps: int, seed: int, n_images: int, hist, seconds: float) -> dict:
    """The ``"centre_term"`` record of a stage-3 run: its settings, the mean loss of the first and
    last (up to 10, a quarter of the steps) steps of ``hist``, and its duration."""
    k = max(1, min(10, len(hist) // 4))
    return {
        "steps": int(steps),
        "seed": int(seed),
        "images": int(n_images),
        "loss_first": float(np.mean(hist[:k])),
        "loss_last": float(np.mean(hist[-k:])),
        "seconds": round(float(seconds), 3),
    }


# the fields of a "centre_term" record: "int", or "number" (int or float)
RECORD_FIELDS = {
    "steps": "int",
    "seed": "int",
    "images": "int",
    "loss_first": "number",
    "loss_last": "number",
    "seconds": "number",
}


def _stage_images(dataset, seed: int) -> np.ndarray:
    """(N, H, W) gray images in [0, 1] of the training set (at most ``MAX_STAGE_IMAGES``)."""
    n = len(dataset)
    g = torch.Generator().manual_seed(seed + 3)
    idx = torch.randperm(n, generator=g)[:MAX_STAGE_IMAGES].sort().values
    x = dataset.read(idx)
    return x[:, 0].float().cpu().numpy()


def run_centre_stage(model, dataset, out: Path, steps: int, seed: int = 0, progress: bool = True):
    """Stage 3 on a copy of ``model`` (the stage-2 network; a plain LDNet, left unchanged): returns
    (landmark network, record); (``model``, None) when the stage does not apply.

    ``dataset``: the pre-training images (``read(indices)`` -> (n, C, S, S)). A ``stage3.pt`` in
    ``out`` made with the same ``steps`` and ``seed`` is loaded instead of training again.
    """
    path = Path(out) / STAGE3_FILE
    if path.exists():
        st = load_checkpoint(path, map_location="cpu")
        try:
            rec = centre_term_record(st)
        except ValueError as exc:  # a damaged record: trained again, as for another network's file
            logger.warning("centre-sensitive term (stage 3): %s: %s; trained again", path, exc)
            rec = None
        if rec is not None and rec.get("steps") == steps and rec.get("seed") == seed:
            tuned = copy.deepcopy(model)  # the stage-2 network stays as it is: it is the representation
            try:
                tuned.load_state_dict(check_state_dict(st["model"], f"checkpoint {path}"))  # finite, real
            except (RuntimeError, TypeError, ValueError) as exc:  # another network's stage3.pt
                why = " ".join(str(exc).split())[:300]
                logger.warning(
                    "centre-sensitive term (stage 3): %s does not fit this network (%s); trained again", path, why
                )
            else:
                logger.info("centre-sensitive term (stage 3): loaded from %s, not trained again", path)
                return tuned, rec
    if model.in_channels != 1:
        logger.info("centre-sensitive term (stage 3) skipped: it is for gray images (channels 1)")
        return model, None
    images = _stage_images(dataset, seed)
    t0 = time.time()
    logger.info("centre-sensitive term (stage 3): %d steps on %d images", steps, len(images))
    tuned, hist = train_centre_sensitive(model, images, steps=steps, seed=seed, progress=progress)
    rec = centre_term_result(steps, seed, len(images), hist, time.time() - t0)
    state = {k2: v.detach().cpu().clone() for k2, v in tuned.state_dict().items()}
    with defer_signals():
        save_checkpoint(path, {"config": tuned.config, "model": state, "stage": 3, "centre_term": rec})
    logger.info(
        "centre-sensitive term (stage 3): loss %.4f -> %.4f in %.1f s",
        rec["loss_first"],
        rec["loss_last"],
        rec["seconds"],
    )
    return tuned, rec
