"""The files a run writes into ``--out`` besides checkpoints' contents: which ones there are, the
metrics log (JSON lines), the validation overlays and the loss curves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from .. import viz
from ..augment import normalize_intensity
from ..atomic import atomic_write_bytes, remove_stale_temp_files
from ..models import LDNet

__all__ = [
    "RUN_FILES",
    "existing_run_files",
    "clean_temp_files",
    "write_jsonl",
    "read_jsonl",
    "predict",
    "save_overlays",
    "save_loss_plot",
]

logger = logging.getLogger("ld_ext.train")

# The files a run writes into --out (overlays/ holds stageS_epochEEE.png).
RUN_FILES = ("checkpoint.pt", "stage1.pt", "stage2.pt", "stage3.pt", "model.pt", "metrics.jsonl", "losses.png")


def existing_run_files(out: Path) -> list[str]:
    """The files of a previous run in ``out`` (names relative to it)."""
    found = [n for n in RUN_FILES if (out / n).exists()]
    ov = out / "overlays"
    if ov.is_dir():
        found += [f"overlays/{p.name}" for p in sorted(ov.glob("stage*_epoch*.png"))]
    return found


def clean_temp_files(out: Path) -> None:
    """Temp files of checkpoint/metric/overlay writes that a killed run left in out."""
    removed = remove_stale_temp_files(out, RUN_FILES) + remove_stale_temp_files(out / "overlays")
    if removed:
        logger.info("removed %d temp file(s) of an interrupted write in %s", len(removed), out)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


@torch.no_grad()
def predict(model: LDNet, images: torch.Tensor, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(z, s) of images in [0, 1] (normalised inside), in eval mode, on the model's device."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    zs, ss = [], []
    for i in range(0, images.shape[0], batch_size):
        z, s = model(normalize_intensity(images[i : i + batch_size].to(dev, next(model.parameters()).dtype)))
        zs.append(z.float().cpu())
        if s is not None:
            ss.append(s.float().cpu())
    model.train(was)
    return torch.cat(zs), (torch.cat(ss) if ss else None)


def save_overlays(model: LDNet, images: torch.Tensor, path: Path) -> Path:
    """Validation overlays: image | cluster arg-max overlay (stage 2) or embedding PCA (stage 1)."""
    z, s = predict(model, images)
    titles = ["image", "embedding (PCA)"] + (["clusters"] if s is not None else [])
    rows = []
    for i in range(images.shape[0]):
        row = [viz.overlay_clusters(images[i], torch.zeros(images.shape[-2:], dtype=torch.long), 1, alpha=0.0)]
        row.append(viz.embedding_rgb(z[i]))
        if s is not None:
            row.append(viz.overlay_clusters(images[i], s[i].argmax(0), s.shape[1]))
        rows.append(row)
    return viz.save_grid(rows, path, titles=titles)


def save_loss_plot(records: Sequence[dict], path: Path) -> None:
    """losses.png of the metrics records; a failure is logged (plotting must never lose a finished run)."""
    try:
        viz.save_loss_curves(records, path)
    except Exception as exc:  # plotting must never lose a finished run
        logger.warning("could not plot losses: %s", exc)
