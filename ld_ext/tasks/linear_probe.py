"""The linear probe's classifier: a class-balanced per-pixel (per-voxel) logistic regression on
standardised features, and the choice of its decision threshold on its own training images; and the
names of the probe's feature sets (2-D and 3-D alike).

Used by ``ld-ext probe`` (``ld_ext.tasks.probe``, 2-D and 3-D) and by the "probe" head start of
``ld-ext finetune`` (``ld_ext.tasks.segmentation.fit_head``); ``ld_ext.tasks.probe`` re-exports it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import common

__all__ = ["FEATURE_SETS", "NETWORK_FEATURES", "DEFAULT_WEIGHT_DECAY", "THRESHOLDS", "LinearProbe", "choose_threshold"]

# The probe's feature sets (docs/tasks.md, "Linear probe"), and the network's features it can read.
FEATURE_SETS = ("LD", "random-init", "intensity", "position")
NETWORK_FEATURES = ("z", "decoder", "z+decoder")

# Selected on the development slices of the MNI152 protocol (docs/tasks.md, "Linear probe").
DEFAULT_WEIGHT_DECAY = 1e-3
# Candidate decision thresholds, chosen per probe on its training images (ties: nearest 0.5).
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


class LinearProbe:
    """Class-balanced per-pixel logistic regression on standardised features (L-BFGS).

    ``fit(features (N, C, H, W), masks (N, H, W) bool)``; ``predict_proba(features) -> (N, H, W)``.
    Volumes work the same way: features (N, C, X, Y, Z), masks and probabilities (N, X, Y, Z).
    """

    def __init__(self, weight_decay: float = DEFAULT_WEIGHT_DECAY, max_iter: int = 100, balanced: bool = True) -> None:
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0 and math.isfinite(weight_decay)):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        self.weight_decay = float(weight_decay)
        self.max_iter = common.check_positive_int("max_iter", max_iter)
        self.balanced = bool(balanced)
        self.mean = self.std = self.weight = self.bias = None

    @staticmethod
    def _pixels(features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.dim() not in (4, 5):
            raise ValueError(
                "features must be a (N, C, H, W) or (N, C, X, Y, Z) tensor, "
                f"got {getattr(features, 'shape', type(features))}"
            )
        return features.movedim(1, -1).reshape(-1, features.shape[1]).double()

    def fit(self, features: torch.Tensor, masks) -> "LinearProbe":
        x = self._pixels(features)
        y = torch.as_tensor(np.asarray(masks, dtype=bool)).reshape(-1)
        if y.numel() != x.shape[0]:
            raise ValueError(
                f"masks must have shape {(features.shape[0],) + tuple(features.shape[2:])} (features without C), "
                f"got {tuple(np.shape(masks))}"
            )
        npos = int(y.sum())
        if npos == 0 or npos == y.numel():
            raise ValueError("the training masks must contain both foreground and background pixels")
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-6)
        xs = (x - self.mean) / self.std
        yf = y.double()
        if self.balanced:
            wt = torch.where(y, 0.5 / npos, 0.5 / (y.numel() - npos)).double()
        else:
            wt = torch.full_like(yf, 1.0 / y.numel())
        w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b],
            lr=1.0,
            max_iter=self.max_iter,
            line_search_fn="strong_wolfe",
            tolerance_grad=1e-9,
            tolerance_change=1e-12,
        )
        sign = 2 * yf - 1

        def closure():
            opt.zero_grad()
            logit = xs @ w + b
            loss = (wt * F.softplus(-sign * logit)).sum() + self.weight_decay * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def predict_proba(self, features: torch.Tensor) -> np.ndarray:
        if self.weight is None:
            raise RuntimeError("fit the probe first")
        x = self._pixels(features)
        if x.shape[1] != self.weight.numel():
            raise ValueError(f"features have {x.shape[1]} channels, the probe was fitted on {self.weight.numel()}")
        p = torch.sigmoid((x - self.mean) / self.std @ self.weight + self.bias)
        return p.reshape((features.shape[0],) + tuple(features.shape[2:])).float().numpy()


def choose_threshold(proba, masks, thresholds: Sequence[float] = THRESHOLDS) -> float:
    """The threshold of ``thresholds`` with the highest pooled Dice of ``proba > t`` against
    ``masks`` (the probe's own training images); ties go to the one nearest 0.5."""
    p = np.asarray(proba)
    m = np.asarray(masks, dtype=bool)
    if p.shape != m.shape:
        raise ValueError(f"proba and masks must have the same shape, got {p.shape} and {m.shape}")
    if not len(thresholds):
        raise ValueError("thresholds must not be empty")
    scores = [(common.dice(p > t, m), -abs(t - 0.5), t) for t in thresholds]
    return float(max(scores)[2])
