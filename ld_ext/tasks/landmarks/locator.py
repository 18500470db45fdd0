"""``LandmarkLocator``: one-shot landmark search with pooled LD embeddings."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .. import common
from .pooling import (
    DEFAULT_EDGE,
    DEFAULT_FRACTIONAL,
    DEFAULT_JAC_STEP,
    DEFAULT_RADII,
    DEFAULT_SIGMA_FRAC,
    FRACTIONAL_MODES,
    FractionalSampler,
    check_pooling,
    check_radii,
    cosine_maps,
    fractional_descriptors,
    pooled_descriptors,
    sample_descriptors,
)
from .search import (
    DEFAULT_SUBPIXEL,
    DEFAULT_WINDOW,
    SEARCH_MODES,
    SUBPIXEL_METHODS,
    split_matcher_output,
    locate_image,
    locate_in_maps,
)

# ----------------------------------------------------------------------------- LD locator


class LandmarkLocator:
    """One-shot landmark search with pooled LD embeddings (see the module docstring).

    Args:
        radii: pooling radii in pixels.
        mode: "gaussian" (centre-sensitive) or "uniform" (ablation).
        search, top_k, tol, window, subpixel: see ``locate_in_maps``.
        rectified: in ``locate_image``, a second pass in the template frame (see ``locate_image``).
        edge: the discs' rim, "hard" or "soft" (anti-aliased; see ``pooling_kernel``).
        fractional: how descriptors at fractional positions (the template landmarks, D(p) in the
            Gauss-Newton step) are made: "bilinear" interpolation of the pooled field on the pixel
            grid, or "exact": the window pooled at the fractional centre (``fractional_descriptors``).
        jac_step: central-difference step (px) of the Gauss-Newton Jacobians with "exact".
    """

    def __init__(
        self,
        radii: Sequence[int] = DEFAULT_RADII,
        mode: str = "gaussian",
        sigma_frac: float = DEFAULT_SIGMA_FRAC,
        search: str = "consistent",
        top_k: int = 5,
        tol: float = 4.0,
        window: float = DEFAULT_WINDOW,
        subpixel: str = DEFAULT_SUBPIXEL,
        rectified: bool = True,
        passes: int = 1,
        edge: str = DEFAULT_EDGE,
        fractional: str = DEFAULT_FRACTIONAL,
        jac_step: float = DEFAULT_JAC_STEP,
    ) -> None:
        check_pooling(mode, sigma_frac, edge)
        if fractional not in FRACTIONAL_MODES:
            raise ValueError(f"fractional must be one of {FRACTIONAL_MODES}, got {fractional!r}")
        if not jac_step > 0:
            raise ValueError(f"jac_step must be > 0, got {jac_step!r}")
        self.edge, self.fractional, self.jac_step = edge, fractional, float(jac_step)
        self.radii = check_radii(radii)
        if search not in SEARCH_MODES:
            raise ValueError(f"search must be one of {SEARCH_MODES}, got {search!r}")
        if subpixel not in SUBPIXEL_METHODS:
            raise ValueError(f"subpixel must be one of {SUBPIXEL_METHODS}, got {subpixel!r}")
        self.mode = mode
        self.sigma_frac = float(sigma_frac)
        self.search = dict(
            search=search,
            top_k=common.check_positive_int("top_k", top_k),
            tol=float(tol),
            window=float(window),
            subpixel=subpixel,
        )
        self.rectified = bool(rectified)
        self.passes = common.check_positive_int("passes", passes)
        self.protos: torch.Tensor | None = None
        self.points: np.ndarray | None = None
        self.template_shape: tuple[int, int] | None = None

    def fit(self, template_emb: torch.Tensor, points: np.ndarray) -> "LandmarkLocator":
        """Describe the landmarks ``points`` (M, 2) of the template's unit embeddings (1, D, H, W)."""
        self.points = np.asarray(points, dtype=np.float64)
        if self.fractional == "exact":
            self.protos = fractional_descriptors(
                template_emb, self.points, self.radii, self.mode, self.sigma_frac, self.edge
            )
        else:
            desc = pooled_descriptors(template_emb, self.radii, self.mode, self.sigma_frac, self.edge)
            self.protos = sample_descriptors(desc, self.points)  # (M, R*D)
        self.template_shape = tuple(template_emb.shape[-2:])
        return self

    @torch.no_grad()
    def score_maps(self, target_emb: torch.Tensor) -> torch.Tensor:
        """Cosine maps (M, H, W) of the landmark descriptors over one target (fused op)."""
        return split_matcher_output(self.match(target_emb))[0]

    @torch.no_grad()
    def match(self, target_emb: torch.Tensor):
        """The maps of ``score_maps``, with (descriptor field, landmark descriptors) when the
        sub-pixel step is ``"gauss-newton"`` (the answer ``locate_image`` expects of a matcher)."""
        if self.protos is None:
            raise RuntimeError("call fit() first")
        desc = pooled_descriptors(target_emb, self.radii, self.mode, self.sigma_frac, self.edge)
        protos = self.protos.to(desc.dtype)
        maps = cosine_maps(desc, protos)[0]
        if self.search["subpixel"] != "gauss-newton":
            return maps
        if self.fractional == "exact":
            field = FractionalSampler(
                target_emb.to(desc.dtype), self.radii, self.mode, self.sigma_frac, self.edge, self.jac_step
            )
            return maps, (field, protos)
        return maps, (desc, protos)

    @torch.no_grad()
    def locate(self, target_emb: torch.Tensor, return_maps: bool = False):
        """Landmark positions (M, 2) in one target's unit embeddings (1, D, H, W)."""
        maps, feats = split_matcher_output(self.match(target_emb))
        out, _ = locate_in_maps(maps, self.points, features=feats, **self.search)
        return (out, maps) if return_maps else out

    @torch.no_grad()
    def locate_image(self, model, image: np.ndarray, target_emb: torch.Tensor | None = None, return_info: bool = False):
        """Landmark positions (M, 2) in a target image (H, W) in [0, 1], embedded with the LD
        network ``model`` (``target_emb``: its embeddings if already computed); with ``rectified``
        the second pass embeds the target resampled into the template frame.

        ``return_info``: (positions, info) with info = the search's (``"affine"``: the template ->
        target affine or None, ``"inliers"``) and ``"scores"`` (M,): each landmark's cosine similarity
        (``score_maps``) at the target pixel nearest its position (clamped into the image): 1 = the
        target's pooled descriptor there equals the template's."""
        if self.protos is None:
            raise RuntimeError("call fit() first")
        dtype = self.protos.dtype
        emb = common.embed(model, np.asarray(image, dtype=np.float32)[None])[0] if target_emb is None else target_emb

        def fn(img):
            return self.match(common.embed(model, np.asarray(img, dtype=np.float32)[None])[0].to(dtype))

        first = self.match(emb.to(dtype))
        out, info = locate_image(
            fn,
            image,
            self.points,
            self.template_shape,
            rectified=self.rectified,
            maps=first,
            passes=self.passes,
            **self.search,
        )
        if not return_info:
            return out
        maps = split_matcher_output(first)[0]
        h, w = maps.shape[-2:]
        ix = np.clip(np.rint(out[:, 0]), 0, w - 1).astype(int)
        iy = np.clip(np.rint(out[:, 1]), 0, h - 1).astype(int)
        info["scores"] = maps[torch.arange(len(out)), torch.as_tensor(iy), torch.as_tensor(ix)].double().numpy()
        return out, info
