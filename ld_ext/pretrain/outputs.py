"""The files a run writes into ``--out`` besides checkpoints' contents: which ones there are, the
metrics log (JSON lines), the validation overlays and the loss curves; and the summary of the
training data logged before training (``data_summary``)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch

from .. import viz
from ..augment import normalize_intensity
from ..atomic import atomic_write_bytes, remove_stale_temp_files
from ..data import IMAGE_EXTENSIONS
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
    "data_summary",
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
    """Validation overlays: image | cluster arg-max overlay (stage 2) or embedding PCA (stage 1).
    Volumes (V, C, X, Y, Z): the middle axial slice of each input and of the network's outputs."""
    z, s = predict(model, images)
    if images.dim() == 5:
        mid = images.shape[-1] // 2
        images, z, s = images[..., mid], z[..., mid], (s[..., mid] if s is not None else None)
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


# ----------------------------------------------------------------------------- the data summary

# the format a file extension is counted under in the summary
_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".dcm": "dicom", ".dicom": "dicom"}
_FORMATS.update({".nii": "nifti", ".nii.gz": "nifti"})


def _split_name(name: str) -> tuple[str, str, str]:
    """(file, label, format) of a data set's image name ``file`` or ``file:label`` (a slice
    ``axisA:i`` of a volume, a frame ``frameN`` of a multi-frame DICOM)."""
    low, end, ext = name.lower(), -1, ""
    for e in IMAGE_EXTENSIONS:
        for m in re.finditer(re.escape(e) + r"(?=:|$)", low):
            if m.end() > end or (m.end() == end and len(e) > len(ext)):
                end, ext = m.end(), e
    if end < 0:
        return name, "", "in memory"
    return name[:end], name[end + 1 :], _FORMATS.get(ext, ext.lstrip("."))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _reason(text: str) -> str:
    """A skip reason without the file's own details: the exception's name, or the text."""
    head = text.split(":", 1)[0].strip()
    return head if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", head) else text[:60]


def data_summary(dataset, size: int, channels: int) -> list[str]:
    """The lines logged before training: images found per format (slices of volumes and frames
    counted as such), files skipped with their reasons counted, images dropped for NaN/Inf pixels,
    files that gave no image, and the size of the training set. Uses the data set's ``names``,
    ``skipped``, ``nonfinite``, ``n_upsampled`` and (a cache) ``meta["n_files"]``."""
    names = list(getattr(dataset, "names", []) or [])
    per_format: dict[str, Counter] = {}
    files_with_images: set[str] = set()
    for name in names:
        file, label, fmt = _split_name(name)
        c = per_format.setdefault(fmt, Counter())
        c["images"] += 1
        c["from_volumes"] += 1 if label else 0
        if file not in files_with_images:
            files_with_images.add(file)
            c["files"] += 1
    parts = []
    for fmt, c in sorted(per_format.items(), key=lambda kv: -kv[1]["images"]):
        what = ("slice" if fmt == "nifti" else "frame") if c["from_volumes"] else "image"
        parts.append(f"{fmt} {_plural(c['images'], what)} ({_plural(c['files'], 'file')})")
    lines = [f"data: found {len(names)} image(s) in {len(files_with_images)} file(s): " + ", ".join(parts)]
    skipped = list(getattr(dataset, "skipped", []) or [])
    if skipped:
        reasons = Counter(_reason(str(why)) for _, why in skipped)
        shown = ", ".join(f"{why} {k}" for why, k in reasons.most_common())
        lines.append(f"data: skipped {_plural(len(skipped), 'file')} ({shown}); first: {skipped[0][0]}")
    nonfinite = list(getattr(dataset, "nonfinite", []) or [])
    if nonfinite:
        lines.append(f"data: skipped {_plural(len(nonfinite), 'image')} with NaN or infinite pixels")
    n_files = getattr(dataset, "meta", {}).get("n_files") if isinstance(getattr(dataset, "meta", None), dict) else None
    if isinstance(n_files, int):
        unreadable = sum(1 for _, why in skipped if not str(why).startswith("not a regular file"))
        dropped = {_split_name(x)[0] for x in nonfinite} - files_with_images
        empty = n_files - len(files_with_images) - unreadable - len(dropped)
        if empty > 0:
            lines.append(
                f"data: {_plural(empty, 'file')} gave no image (every slice of the volume below --min-foreground)"
            )
    up = int(getattr(dataset, "n_upsampled", 0) or 0)
    note = f"; {up} smaller than {size}x{size}, upsampled" if up else ""
    lines.append(f"data: training set: {_plural(len(dataset), 'image')} of {channels}x{size}x{size}{note}")
    return lines
