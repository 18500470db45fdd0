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
(``FileNotFoundError`` for a missing file) naming the file; nothing the file declares is allocated
before it is checked. Before ``torch.load``: the archive (``check_archive``: the zip format, records
stored uncompressed, declaring no more bytes than the file holds). After it: every tensor is dense
and holds all its elements, every object is walked once (``check_tensor_storage``). Before the
network is built: its config, stored or inferred from the shapes, within bounds (``validate_config``)
and every tensor of the name, shape and kind of type the config implies, finite
(``check_state_dict``, and a comparison with the network built on the meta device).

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
from .models import DEFAULT_DEPTHS, DEFAULT_WIDTHS, SPATIAL_DIMS, LDNet

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
    "check_archive",
    "check_state_dict",
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
    """Load a checkpoint dict with ``weights_only=True``; clear errors naming the file.

    The archive is checked before ``torch.load`` reads it (``check_archive``) and every tensor after
    (``check_tensor_storage``), so a small file can neither expand in memory nor declare tensors
    larger than what it holds."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint file not found: {p}")
    if not p.is_file():
        raise ValueError(f"checkpoint path is not a file: {p}")
    check_archive(p)
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
        raise ValueError(f"checkpoint {p} has format {str(fmt)[:80]!r}, expected {FORMAT!r}")
    check_tensor_storage(obj, f"checkpoint {p}")
    if not isinstance(obj["model"], Mapping):
        raise ValueError(f"checkpoint {p}: 'model' entry is not a state dict")
    return obj


# The first bytes of the format torch.save wrote before PyTorch 1.6 (and still writes with
# _use_new_zipfile_serialization=False): pickle protocol 2, then the pickled magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def check_archive(path: str | os.PathLike) -> None:
    """Refuse, before ``torch.load`` reads anything, a file it would expand in memory: ``torch.load``
    inflates compressed records (a 1 MB record of zeros becomes 1 GB) and reads records that overlap
    in the file once each, so the records must be stored uncompressed (as ``torch.save`` writes them)
    and declare no more bytes than the file holds. A file that is not a zip archive is refused too:
    ld_ext reads only the zip format ``torch.save`` has written since PyTorch 1.6 (the older format
    sizes its storages from numbers in the file, unchecked)."""
    p = Path(path)
    size = p.stat().st_size
    why = None
    if size == 0:
        why = "the file is empty"
    elif not zipfile.is_zipfile(p):
        with open(p, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
        if head == _LEGACY_MAGIC:
            why = (
                "it is in the format torch.save wrote before PyTorch 1.6 (not a zip archive), which ld_ext does "
                "not read; load it with torch.load and save it again with torch.save's default format"
            )
        elif head.startswith(b"PK"):
            why = "the file is a truncated or damaged PyTorch archive"
        else:
            why = "not a PyTorch checkpoint (torch.save writes a zip archive; this file is not one)"
    else:
        why = _archive_problem(p, size)
    if why is not None:
        raise ValueError(f"could not read checkpoint {p}: {why}")


def _archive_problem(p: Path, size: int) -> str | None:
    """What is wrong with the records of the zip archive ``p`` (None: nothing)."""
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        return "the file is a truncated or damaged PyTorch archive"
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        return (
            f"its record {packed[0].filename[:120]!r} is compressed; torch.save stores records uncompressed, and "
            "ld_ext does not inflate them (a small file could expand to gigabytes in memory)"
        )
    declared = sum(i.file_size for i in infos)
    if declared > size:
        return (
            f"its records declare {declared:,} bytes, more than the file's {size:,} (records that overlap, "
            "which torch.save never writes)"
        )
    return None


# Bounds on the objects of one checkpoint (far above anything ld_ext writes: a training checkpoint
# holds a few thousand); they stop a small file from making the checks run for hours (a pickle can
# make 2**40 references to one list in 2 KB) or exhaust the Python stack.
MAX_OBJECTS = 1_000_000
MAX_NESTING = 100


def check_tensor_storage(obj: Any, where: str) -> None:
    """Refuse any tensor in ``obj`` (nested dicts, lists, tuples; keys too) that declares more
    elements than its storage holds, or that is not a dense (strided) tensor: a stride-0
    ("expanded") tensor stored from one number, or a sparse one without entries, can declare a
    (8192, 8192, 3, 3) weight in a file of a few KB, and the network built to receive it would then
    allocate gigabytes. Every tensor ld_ext (or ``torch.save`` of a network) writes holds all of its
    elements, so nothing real is refused; this costs no allocation.

    Each container is visited once (shared references are not walked again), nesting deeper than
    ``MAX_NESTING`` and more than ``MAX_OBJECTS`` objects are refused."""
    seen: set[int] = set()
    count = 0
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        o, path, depth = stack.pop()
        if isinstance(o, torch.Tensor):
            _check_one_tensor(o, where, path)
            continue
        if not isinstance(o, (Mapping, list, tuple)) or id(o) in seen:
            continue
        seen.add(id(o))
        if depth >= MAX_NESTING:
            short = path if len(path) <= 60 else path[:60] + "..."
            raise ValueError(f"{where}: {short or '(top level)'} is nested more than {MAX_NESTING} levels deep")
        if isinstance(o, Mapping):
            items = [(v, f"{path}.{_key_name(k)}" if path else _key_name(k)) for k, v in o.items()]
            items += [(k, f"{path}[key {_key_name(k)}]") for k in o if isinstance(k, (torch.Tensor, tuple))]
        else:
            items = [(v, f"{path}[{i}]") for i, v in enumerate(o)]
        count += 1 + len(items)
        if count > MAX_OBJECTS:
            raise ValueError(f"{where} holds more than {MAX_OBJECTS:,} objects; ld_ext's checkpoints hold far fewer")
        stack.extend((v, name, depth + 1) for v, name in reversed(items))


def _key_name(k: Any) -> str:
    return str(k)[:80] if isinstance(k, (str, int)) else type(k).__name__


def _check_one_tensor(t: torch.Tensor, where: str, path: str) -> None:
    name = path or "(top level)"
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise ValueError(f"{where}: tensor {name} is a {kind} tensor; ld_ext reads only dense tensors")
    n = t.numel()
    if n == 0:
        return
    esize = t.element_size()
    extent = t.storage_offset() + 1 + sum((d - 1) * abs(s) for d, s in zip(t.shape, t.stride()))
    held = t.untyped_storage().nbytes()
    if held < n * esize or held < extent * esize:
        raise ValueError(
            f"{where}: tensor {name} of shape {tuple(t.shape)} declares {n * esize:,} bytes "
            f"but its storage holds {held:,} (a stride-0 or overlapping view); ld_ext reads only tensors that "
            "hold all their elements"
        )


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
    blocked = re.search(r"unsupported GLOBAL ([\w.]+) whose module", text)
    if is_zip and blocked:
        return (
            f"it would call {blocked.group(1)} while being loaded (code in the file), which ld_ext never runs: it "
            "loads only tensors, numbers, strings and containers of them (weights-only)"
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
    known = {"in_channels", "emb_dim", "n_clusters", "widths", "depths", "spatial_dims"}
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
    if "spatial_dims" in cfg:  # absent in checkpoints written before 3-D networks: 2-D
        out["spatial_dims"] = _int_in("spatial_dims", cfg["spatial_dims"], min(SPATIAL_DIMS), max(SPATIAL_DIMS), where)
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
        first = state_dict["encoder.groups.0.0.0.weight"]
        in_channels = int(first.shape[1])
        spatial_dims = first.dim() - 2  # a Conv2d weight has 4 dims, a Conv3d one 5
        emb_dim = int(state_dict["decoder.emb_head.1.weight"].shape[0])
        ck = "decoder.cluster_head.1.weight"
        n_clusters = int(state_dict[ck].shape[0]) if ck in state_dict else None
    except (KeyError, IndexError, AttributeError, TypeError) as exc:
        raise ValueError(f"state dict is not an LDNet state dict (missing or malformed {exc})") from None
    cfg = {
        "in_channels": in_channels,
        "emb_dim": emb_dim,
        "n_clusters": n_clusters,
        "widths": widths,
        "spatial_dims": spatial_dims,
    }
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


def check_state_dict(sd: Any, where: str, key: str = "model") -> Mapping[str, torch.Tensor]:
    """``sd`` maps names to real-valued dense tensors that hold no NaN or infinity; returns it.

    ``where`` starts every error message, ``key`` is the entry of the checkpoint ``sd`` came from."""
    if not isinstance(sd, Mapping):
        raise ValueError(f"{where}: {key!r} entry is not a state dict")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{where}: {key!r} must map parameter names to tensors; {str(bad[0])[:80]!r} does not")
    for k, v in sd.items():
        if v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{where}: tensor {key}.{k} is of type {v.dtype}, expected real numbers")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"{where}: tensor {key}.{k} holds NaN or infinite values (a training run that diverged?); "
                "ld_ext does not use such a network"
            )
    return sd


def load_model(path: str | os.PathLike, map_location: Any = "cpu", part: str = "representation") -> LDNet:
    """Rebuild the ``LDNet`` saved in ``path`` (in eval mode), 2-D or 3-D as the file says
    (``config["spatial_dims"]``; a file without it is 2-D, and its weights must agree).

    ``part``: ``"representation"`` (default) reads ``"model"``; ``"landmark"`` reads
    ``"landmark_model"`` when the file has one (stage 3 of ``ld-ext pretrain``) and ``"model"``
    otherwise.
    """
    return model_from_checkpoint(
        load_checkpoint(path, map_location=map_location), f"checkpoint {path}", part, map_location
    )


def model_from_checkpoint(ckpt: dict, where: str, part: str = "representation", map_location: Any = "cpu") -> LDNet:
    """``load_model`` on a checkpoint dict already read with ``load_checkpoint`` (for callers that
    also read its other entries); ``where`` starts every error message.

    Nothing is allocated for the network before its config (stored, or inferred from the tensor
    shapes) is within bounds and every tensor of the file has the name, shape and kind of type the
    config implies (compared with the network built on the meta device)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    key = LANDMARK_KEY if part == "landmark" and LANDMARK_KEY in ckpt else "model"
    sd = check_state_dict(ckpt[key], where, key)
    cfg = _config_of(ckpt, sd, where)
    _check_against_config(sd, cfg, where, key)
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


def _config_of(ckpt: Mapping, sd: Mapping[str, torch.Tensor], where: str) -> dict:
    """The LDNet config of a checkpoint: the stored one (checked, and against the tensor shapes), or
    the one the shapes imply (within the same bounds)."""
    try:
        inferred = infer_config(sd)
    except ValueError as exc:
        raise ValueError(f"{where} does not describe an LDNet: {exc}") from None
    inferred = validate_config(inferred, f"{where} (its tensor shapes)")
    stored = ckpt.get("config")
    if stored is None:
        return inferred
    cfg = validate_config(stored, where)
    full = {
        "in_channels": 1,
        "emb_dim": 32,
        "n_clusters": 16,
        "widths": list(DEFAULT_WIDTHS),
        "depths": list(DEFAULT_DEPTHS),
        "spatial_dims": 2,
        **cfg,
    }
    have = {"depths": list(DEFAULT_DEPTHS), **inferred}
    diff = [f"{k}={full[k]!r} (the tensors say {have[k]!r})" for k in have if full[k] != have[k]]
    if diff:
        raise ValueError(f"{where}: its config does not match its weights: " + "; ".join(diff))
    return cfg


def _check_against_config(sd: Mapping[str, torch.Tensor], cfg: dict, where: str, key: str) -> None:
    """Every tensor of ``sd`` has the name, shape and kind of type (floating point or integer) of
    the network ``cfg`` describes, which is built on the meta device (no memory) to compare."""
    try:
        with torch.device("meta"):
            expected = LDNet(**cfg).state_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} does not describe an LDNet: {exc}") from None
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k}: {tuple(sd[k].shape)} in the file, {tuple(v.shape)} expected"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    types = [
        f"{k}: {sd[k].dtype} in the file, a {'floating-point' if v.is_floating_point() else 'integer'} type expected"
        for k, v in expected.items()
        if k in sd and sd[k].is_floating_point() != v.is_floating_point()
    ]
    parts = [
        f"{what} {items[:3]}{' ...' if len(items) > 3 else ''}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes), ("type", types))
        if items
    ]
    if parts:
        raise ValueError(f"{where} does not match the LDNet it describes ({key!r}): " + "; ".join(parts))
