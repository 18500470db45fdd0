"""Checkpoints: written atomically (temp name + rename), loaded without executing code.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "ld_ext.checkpoint", "version": 1,
     "config": LDNet constructor arguments, "model": state_dict,
     ... anything else the trainer adds (optimizer, scheduler, rng, epoch, stage, args)}

``save_checkpoint(path, obj)`` accepts an ``LDNet`` (wrapped into that dict), a dict of that
form, or a plain state dict. ``load_model(path)`` rebuilds the ``LDNet``; for a plain state dict
it infers the architecture from the tensor shapes. Every load uses ``weights_only=True`` and any
problem is reported as a ``ValueError`` (``FileNotFoundError`` for a missing file) naming the file.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .models import DEFAULT_DEPTHS, LDNet

__all__ = ["save_checkpoint", "load_checkpoint", "load_model", "infer_config", "atomic_write", "atomic_write_bytes", "FORMAT", "VERSION"]

FORMAT = "ld_ext.checkpoint"
VERSION = 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: str | os.PathLike, write) -> Path:
    """Write through ``write(file_object)`` to a temp file beside ``path``, then rename onto it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


atomic_write = _atomic  # public name: atomic_write(path, write) for writers that take a binary file


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic(path, lambda f: f.write(data))


def _wrap(obj: Any) -> dict:
    if isinstance(obj, LDNet):
        return {"format": FORMAT, "version": VERSION, "config": obj.config, "model": obj.state_dict()}
    if isinstance(obj, nn.Module):
        return {"format": FORMAT, "version": VERSION, "model": obj.state_dict()}
    if isinstance(obj, Mapping):
        d = dict(obj)
        if "model" in d:
            d.setdefault("format", FORMAT)
            d.setdefault("version", VERSION)
        return d
    raise TypeError(f"save_checkpoint expects an nn.Module or a dict, got {type(obj).__name__}")


def save_checkpoint(path: str | os.PathLike, state_dict_like: Any) -> Path:
    """Save a model / checkpoint dict / state dict to ``path`` atomically; returns the path."""
    payload = _wrap(state_dict_like)
    return _atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; clear errors naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise ValueError(f"checkpoint path is not a file: {p}")
    try:
        obj = torch.load(str(p), map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, pickle refusing a global, truncated file, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"could not read checkpoint {p}: not a valid ld_ext/PyTorch checkpoint ({first})") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {p} holds a {type(obj).__name__}, expected a dict")
    if "model" not in obj:
        # a plain state dict
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            obj = {"format": FORMAT, "version": VERSION, "model": obj}
        else:
            raise ValueError(f"checkpoint {p} has no 'model' entry and is not a state dict")
    fmt = obj.get("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"checkpoint {p} has format {fmt!r}, expected {FORMAT!r}")
    if not isinstance(obj["model"], Mapping):
        raise ValueError(f"checkpoint {p}: 'model' entry is not a state dict")
    return obj


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """LDNet constructor arguments recovered from the shapes in a state dict."""
    try:
        widths, depths = [], []
        for g in range(5):
            d = 0
            while f"encoder.groups.{g}.{d}.0.weight" in state_dict:
                d += 1
            if d == 0:
                raise KeyError(f"encoder.groups.{g}.0.0.weight")
            depths.append(d)
            widths.append(int(state_dict[f"encoder.groups.{g}.0.0.weight"].shape[0]))
        in_channels = int(state_dict["encoder.groups.0.0.0.weight"].shape[1])
        emb_dim = int(state_dict["decoder.emb_head.1.weight"].shape[0])
        ck = "decoder.cluster_head.1.weight"
        n_clusters = int(state_dict[ck].shape[0]) if ck in state_dict else None
    except (KeyError, IndexError, AttributeError) as exc:
        raise ValueError(f"state dict is not an LDNet state dict (missing {exc})") from exc
    cfg = {"in_channels": in_channels, "emb_dim": emb_dim, "n_clusters": n_clusters, "widths": widths}
    if tuple(depths) != DEFAULT_DEPTHS:
        cfg["depths"] = depths
    return cfg


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> LDNet:
    """Rebuild the ``LDNet`` saved in ``path`` (in eval mode)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    sd = ckpt["model"]
    try:
        cfg = ckpt.get("config") or infer_config(sd)
        model = LDNet(**cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {path} does not describe an LDNet: {exc}") from exc
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {path} does not match the LDNet it describes: {exc}") from exc
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    return model.eval()
