"""Input checks of the public functions (ld_ext/ops/api.py) and the dtype rules they share.

Each check raises ``TypeError``/``ValueError`` naming the argument, before any operator runs. The
operators check their arguments again themselves (csrc/checks.h), since ``torch.ops.ld_ext.*`` can
be called directly.
"""

from __future__ import annotations

import math
import numbers

import torch

from ..normalization import ASSIGNMENT_MODES
from .compiled import _C

LOW_PRECISION = (torch.float16, torch.bfloat16)
SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Smallest temperature the ops accept: 1/temperature must be finite in float32 (csrc/checks.h).
MIN_TEMPERATURE: float = float(_C.min_temperature)


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of an op's result for inputs of ``dtype``: float16/bfloat16 give float32."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), got {x.dtype}"
        )


def check_nonempty(name: str, x: torch.Tensor) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type):
        # Under autocast mixed floating dtypes are fine: the Autocast kernels (csrc/autocast.cpp)
        # bring both to a common compute dtype in one place.
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def check_temperature(temperature) -> float:
    """``temperature`` as a float, after checking it is a real number in [MIN_TEMPERATURE, inf)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (0.0 < t < math.inf):  # comparisons only (no math.isfinite): traceable with symbolic floats
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {MIN_TEMPERATURE:.6g} (1/temperature must be finite in float32), got "
            f"{temperature!r}"
        )
    return t


def check_pixel_tensor(name: str, x: torch.Tensor, channels: str) -> None:
    check_float_tensor(name, x)
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"{name} must have shape (N, {channels}, *spatial) with 1, 2 or 3 spatial dims, got shape {tuple(x.shape)}"
        )
    check_nonempty(name, x)


def check_pair(embeddings: torch.Tensor, assignments: torch.Tensor) -> None:
    check_pixel_tensor("embeddings", embeddings, "D")
    check_pixel_tensor("assignments", assignments, "K")
    check_same("embeddings", embeddings, "assignments", assignments)
    if assignments.dim() != embeddings.dim():
        raise ValueError(
            "embeddings and assignments must have the same number of dims, got shapes "
            f"{tuple(embeddings.shape)} and {tuple(assignments.shape)}"
        )
    if assignments.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"embeddings and assignments must have the same batch size N, got {embeddings.shape[0]} "
            f"and {assignments.shape[0]}"
        )
    if assignments.shape[2:] != embeddings.shape[2:]:
        raise ValueError(
            "embeddings and assignments must have the same spatial size, got "
            f"{tuple(embeddings.shape[2:])} and {tuple(assignments.shape[2:])}"
        )


def assignment_mode(assignment) -> int:
    """The operators' number for the assignment mode named ``assignment`` (ASSIGNMENT_MODES)."""
    if not isinstance(assignment, str) or assignment not in ASSIGNMENT_MODES:
        raise ValueError(f"assignment must be one of {tuple(ASSIGNMENT_MODES)}, got {assignment!r}")
    return ASSIGNMENT_MODES[assignment]
