"""Checkpoints: written atomically (temp name + rename), loaded without executing code.

A checkpoint is a dict saved with ``torch.save``::

    {"format": "ld_ext.checkpoint", "version": 1,
     "config": LDNet constructor arguments, "model": state_dict,
     ... anything else the trainer adds (optimizer, scheduler, rng, epoch, stage, args)}

``save_checkpoint(path, obj)`` accepts an ``LDNet`` (wrapped into that dict), a dict of that
form, or a plain state dict. ``load_model(path)`` rebuilds the ``LDNet``; for a plain state dict
it infers the architecture from the tensor shapes.

A checkpoint may carry two networks of the same architecture: ``"model"``, the representation
(what segmentation, probe and shape-guided transfer read), and ``"landmark_model"``, the same
network after the centre-sensitive landmark term (stage 3 of ``ld-ext pretrain``), which only
``ld-ext landmark`` reads. ``load_model(path, part="landmark")`` returns the latter when present and
the representation otherwise; ``checkpoint_parts(ckpt)`` says which the file holds.

Every load uses ``weights_only=True`` and any problem is reported as a ``ValueError``
(``FileNotFoundError`` for a missing file) naming the file. Tensors that declare more elements
than their storage holds are refused (``check_tensor_storage``). A stored ``config`` is checked
(types, bounds, agreement with the tensor shapes) before any network is built, so a malformed file
cannot make the loader allocate a huge model.

``defer_signals()`` holds SIGINT/SIGTERM back while a file is being written and delivers them
after. The atomic writers (``atomic_write``, ``atomic_write_bytes``) and
``remove_stale_temp_files(folder)`` (temp files a killed writer left behind) are those of
``ld_ext.atomic``, importable from here too.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .atomic import (
    atomic_write,
    atomic_write_bytes,
    remove_stale_temp_files,
)  # re-exported: the writers live in ld_ext.atomic
from .models import DEFAULT_DEPTHS, DEFAULT_WIDTHS, LDNet

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "infer_config",
    "validate_config",
    "atomic_write",
    "atomic_write_bytes",
    "defer_signals",
    "remove_stale_temp_files",
    "FORMAT",
    "VERSION",
    "LANDMARK_KEY",
    "PARTS",
    "checkpoint_parts",
    "check_tensor_storage",
]

FORMAT = "ld_ext.checkpoint"
VERSION = 1
# The entry holding the landmark network (stage 3) beside the representation in ``"model"``.
LANDMARK_KEY = "landmark_model"
PARTS = ("representation", "landmark")

# Bounds on a stored LDNet config (far above any real network; they stop a malformed file from
# making the loader allocate gigabytes or loop for minutes before the shapes are compared).
MAX_WIDTH = 8192
MAX_DEPTH = 64
MAX_CHANNELS = 8192


@contextlib.contextmanager
def defer_signals(signals=(signal.SIGINT, signal.SIGTERM)):
    """Hold the given signals back inside the block and deliver them when it ends.

    A Ctrl-C in the middle of ``torch.save`` otherwise breaks the zip writer and ends the program
    with a RuntimeError instead of a clean KeyboardInterrupt. Outside the main thread (where
    handlers cannot be installed) the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    old = {}

    def hold(signum, frame):
        pending.append(signum)

    try:
        for sig in signals:
            old[sig] = signal.signal(sig, hold)
    except (ValueError, OSError):  # e.g. an embedded interpreter without signal support
        for sig, h in old.items():
            signal.signal(sig, h)
        yield
        return
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        for sig in dict.fromkeys(pending):  # each held signal once, in arrival order
            signal.raise_signal(sig)


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
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; clear errors naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise ValueError(f"checkpoint path is not a file: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: our message says it
            obj = torch.load(str(p), map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt zip, pickle refusing a global, truncated file, ...
        raise ValueError(f"could not read checkpoint {p}: {_why_unreadable(p, exc)}") from None
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
    check_tensor_storage(obj, f"checkpoint {p}")
    return obj


def check_tensor_storage(obj: Any, where: str, _path: str = "") -> None:
    """Refuse any tensor in ``obj`` (nested dicts, lists, tuples) that declares more elements than
    its storage holds: a stride-0 ("expanded") tensor stored from one number can declare a
    (8192, 8192, 3, 3) weight in a file of a few KB, and the network built to receive it would
    then allocate gigabytes. Every tensor ld_ext (or ``torch.save`` of a network) writes holds all
    of its elements, so nothing real is refused; this costs no allocation."""
    if isinstance(obj, torch.Tensor):
        n = obj.numel()
        if n == 0:
            return
        esize = obj.element_size()
        extent = obj.storage_offset() + 1 + sum((d - 1) * abs(s) for d, s in zip(obj.shape, obj.stride()))
        held = obj.untyped_storage().nbytes()
        if held < n * esize or held < extent * esize:
            raise ValueError(
                f"{where}: tensor {_path or '(top level)'} of shape {tuple(obj.shape)} declares {n * esize:,} bytes "
                f"but its storage holds {held:,} (a stride-0 or overlapping view); ld_ext reads only tensors that "
                "hold all their elements"
            )
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            check_tensor_storage(v, where, f"{_path}.{k}" if _path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_tensor_storage(v, where, f"{_path}[{i}]")


def _why_unreadable(p: Path, exc: Exception) -> str:
    """torch.load's failure in our words (its own messages advise weights_only=False, which would
    execute code from the file: not advice to pass on)."""
    text = str(exc)
    if p.stat().st_size == 0:
        return "the file is empty"
    is_zip = zipfile.is_zipfile(p)
    glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if is_zip and glob:
        return (
            f"it holds a Python object of type {glob.group(1)}; ld_ext loads only tensors, numbers, strings "
            "and containers of them (weights-only), so that loading a file cannot run code"
        )
    if is_zip and "central directory" not in text:
        return f"the file is a damaged PyTorch archive ({type(exc).__name__})"
    with open(p, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "the file is a truncated or damaged PyTorch archive"
    return "not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)"


def _int_in(name: str, v: Any, lo: int, hi: int, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: {name} must be an int, got {type(v).__name__} {v!r}"[:300])
    if not lo <= v <= hi:
        raise ValueError(f"{where}: {name} must be in [{lo}, {hi}], got {v}")
    return v


def validate_config(cfg: Any, where: str = "config") -> dict:
    """Check an LDNet config dict (types, bounds) without building anything; returns a clean copy.

    ``where`` starts every error message (e.g. ``"checkpoint path/model.pt"``).
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: 'config' must be a dict of LDNet arguments, got {type(cfg).__name__}")
    known = {"in_channels", "emb_dim", "n_clusters", "widths", "depths"}
    unknown = [k for k in cfg if k not in known]
    if unknown:
        raise ValueError(f"{where}: 'config' has unknown entries {unknown[:5]!r} (LDNet takes {sorted(known)})"[:400])
    out: dict = {}
    if "in_channels" in cfg:
        out["in_channels"] = _int_in("in_channels", cfg["in_channels"], 1, MAX_CHANNELS, where)
    if "emb_dim" in cfg:
        out["emb_dim"] = _int_in("emb_dim", cfg["emb_dim"], 1, MAX_CHANNELS, where)
    if "n_clusters" in cfg:
        k = cfg["n_clusters"]
        out["n_clusters"] = None if k is None else _int_in("n_clusters", k, 1, MAX_CHANNELS, where)
    for name, hi in (("widths", MAX_WIDTH), ("depths", MAX_DEPTH)):
        if name not in cfg:
            continue
        v = cfg[name]
        if not isinstance(v, (list, tuple)) or len(v) != 5:
            raise ValueError(f"{where}: {name} must be a list of 5 ints, got {v!r}"[:300])
        out[name] = [_int_in(f"{name}[{i}]", x, 1, hi, where) for i, x in enumerate(v)]
    return out


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """LDNet constructor arguments recovered from the shapes in a state dict."""
    try:
        widths, depths = [], []
        for g in range(5):
            d = 0
            while f"encoder.groups.{g}.{d}.0.weight" in state_dict and d <= MAX_DEPTH:
                d += 1
            if d == 0:
                raise KeyError(f"encoder.groups.{g}.0.0.weight")
            depths.append(d)
            widths.append(int(state_dict[f"encoder.groups.{g}.0.0.weight"].shape[0]))
        in_channels = int(state_dict["encoder.groups.0.0.0.weight"].shape[1])
        emb_dim = int(state_dict["decoder.emb_head.1.weight"].shape[0])
        ck = "decoder.cluster_head.1.weight"
        n_clusters = int(state_dict[ck].shape[0]) if ck in state_dict else None
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"state dict is not an LDNet state dict (missing or malformed {exc})") from None
    cfg = {"in_channels": in_channels, "emb_dim": emb_dim, "n_clusters": n_clusters, "widths": widths}
    if tuple(depths) != DEFAULT_DEPTHS:
        cfg["depths"] = depths
    return cfg


def checkpoint_parts(ckpt: Mapping) -> dict:
    """What a loaded checkpoint dict holds: ``{"representation": bool, "landmark": bool,
    "legacy_stage3": bool}``. ``legacy_stage3`` marks a file of ld_ext before the two parts were kept
    apart, or a ``stage3.pt``: its ``"model"`` is the network after stage 3 (a ``"centre_term"`` record
    and no ``"landmark_model"``), so the representation and the landmark network are one and the same."""
    has_lm = LANDMARK_KEY in ckpt
    legacy = not has_lm and ckpt.get("centre_term") is not None
    return {"representation": True, "landmark": has_lm or ckpt.get("centre_term") is not None, "legacy_stage3": legacy}


def _check_state_dict(sd: Any, where: str, key: str) -> Mapping[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise ValueError(f"{where}: {key!r} entry is not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: {key!r} must map parameter names to tensors; {bad[0]!r} does not")
    return sd


def load_model(path: str | os.PathLike, map_location: Any = "cpu", part: str = "representation") -> LDNet:
    """Rebuild the ``LDNet`` saved in ``path`` (in eval mode).

    ``part``: ``"representation"`` (default) reads ``"model"``; ``"landmark"`` reads
    ``"landmark_model"`` when the file has one (stage 3 of ``ld-ext pretrain``) and ``"model"``
    otherwise.
    """
    return model_from_checkpoint(
        load_checkpoint(path, map_location=map_location), f"checkpoint {path}", part, map_location
    )


def model_from_checkpoint(ckpt: dict, where: str, part: str = "representation", map_location: Any = "cpu") -> LDNet:
    """``load_model`` on a checkpoint dict already read with ``load_checkpoint`` (for callers that
    also read its other entries); ``where`` starts every error message."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    key = LANDMARK_KEY if part == "landmark" and LANDMARK_KEY in ckpt else "model"
    sd = _check_state_dict(ckpt[key], where, key)
    try:
        inferred = infer_config(sd)
    except ValueError as exc:
        raise ValueError(f"{where} does not describe an LDNet: {exc}") from None
    stored = ckpt.get("config")
    if stored is None:
        cfg = inferred
    else:
        cfg = validate_config(stored, where)
        full = {
            "in_channels": 1,
            "emb_dim": 32,
            "n_clusters": 16,
            "widths": list(DEFAULT_WIDTHS),
            "depths": list(DEFAULT_DEPTHS),
            **cfg,
        }
        have = {"depths": list(DEFAULT_DEPTHS), **inferred}
        diff = [f"{k}={full[k]!r} (the tensors say {have[k]!r})" for k in have if full[k] != have[k]]
        if diff:
            raise ValueError(f"{where}: its config does not match its weights: " + "; ".join(diff))
    try:
        model = LDNet(**cfg)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} does not describe an LDNet: {exc}") from None
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise ValueError(f"{where} does not match the LDNet it describes: {msg[:600]}") from None
    if map_location is not None and not callable(map_location) and not isinstance(map_location, dict):
        model = model.to(map_location)
    return model.eval()
