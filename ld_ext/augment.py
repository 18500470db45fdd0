"""The LD view generator and its augmentations, in plain torch on the training device.

docs/method.md section 5. For each item of a batch two source images (img1, img2) are given;
each gets a source augmentation (random h/v flips, rotation in [-180, 180], random resized crop
with scale 0.9..1.0) and then two views (small rotation in [-2, 2], colour jitter
(0.4, 0.4, 0.4, 0.02), grayscale with p = 0.2). The second view (v2) is additionally flipped
and rotated by k*90 degrees; both are recorded so that v2's patch grid can be mapped back onto
v1's (``align_to_v1``). The mixup image is ``w*img1_v1 + (1-w)*img2_v1`` (before the intensity
normalisation), w ~ U(0.2, 0.8).

Randomness: every item draws its parameters from its own ``torch.Generator`` (see
``item_generator``), seeded from (seed, stage, epoch, step, global item index). An item is
therefore augmented identically whichever process or batch it lands in: this is what makes
2 processes x B equal to 1 process x 2B, and ``--resume`` exact.

Geometric transforms are composed into one affine map per view and applied with a single
``grid_sample`` (bilinear, zeros outside), so each view is interpolated once.

Our choices where the published code (torchvision) differs or is silent: the colour jitter
operations run in a fixed order (brightness, contrast, saturation, hue) instead of a random
one; hue is a rotation of the chroma plane in YIQ space; the v2 flips are drawn independently
per axis (p = 0.5 each); images are normalised with fixed ``NORM_MEAN``/``NORM_STD``.

Volumes (``VolumeViewGenerator``, our concretisation for 3-D, docs/method.md section 10): the
sources are cubic patches read with a margin (``read_size``); each source is flipped along each
axis (p = 0.5) and rotated by k*90 degrees in the axial (X, Y) plane; each view's map adds a small
affine part (rotation about each axis in [-2, 2] degrees, a scale per axis in [0.95, 1.05], shears
in [-0.03, 0.03]) and a smooth elastic warp with a closed-form inverse (``elastic_warp``), then
brightness/contrast changes (0.2); v2 is additionally flipped along each axis and rotated by k*90
degrees in the axial plane. ``VolumeViewBatch.align_v2`` maps v2's patch grid onto v1's through
v1's map and the exact inverse of v2's. One trilinear ``grid_sample`` per view; the margin
(``view_margin``) keeps every warped view inside the data. ``VolumeAugmentConfig()`` is the recipe
with the warps on; ``VolumeAugmentConfig.unwarped()`` turns them off (the generator before warps
existed: only v2's flips and turns are undone).
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "ViewBatch",
    "LDViewGenerator",
    "item_generator",
    "align_to_v1",
    "VolumeAugmentConfig",
    "VolumeViewBatch",
    "VolumeViewGenerator",
    "align_to_v1_3d",
    "elastic_warp",
    "view_margin",
    "normalize_intensity",
    "NORM_MEAN",
    "NORM_STD",
]

NORM_MEAN = 0.5
NORM_STD = 0.25
_LUMA = (0.299, 0.587, 0.114)


def item_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of the integer ``keys`` (e.g. seed, stage, epoch, step, index)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(keys)}q", *[int(k) for k in keys]), digest_size=8).digest()
    g = torch.Generator()
    g.manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))
    return g


@dataclass
class AugmentConfig:
    """Augmentation ranges (defaults: the published recipe)."""

    src_rotation: float = 180.0
    src_flip: bool = True
    crop_scale: tuple[float, float] = (0.9, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    view_rotation: float = 2.0
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.02
    grayscale_p: float = 0.2
    v2_flip_p: float = 0.5
    v2_rot90: bool = True
    mix_range: tuple[float, float] = (0.2, 0.8)


@dataclass
class ViewBatch:
    """One step's network input and what is needed to undo v2's flips/rotations.

    ``images`` (5B, C, S, S), normalised: [img1_v1, img2_v1, img1_v2, img2_v2, img3] (B each).
    ``flip_h``/``flip_v``/``rot_k`` (2B,) describe the extra transform of [img1_v2, img2_v2].
    ``mix_w`` (B,) the mixup weights.
    """

    images: torch.Tensor
    flip_h: torch.Tensor
    flip_v: torch.Tensor
    rot_k: torch.Tensor
    mix_w: torch.Tensor
    batch_size: int = field(default=0)

    def align_v2(self, x: torch.Tensor) -> torch.Tensor:
        """``align_to_v1`` with this batch's recorded transforms: maps of [img1_v2, img2_v2] onto v1."""
        return align_to_v1(x, self.flip_h, self.flip_v, self.rot_k)


def _u(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _rot(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)


def _sample_source(g: torch.Generator, cfg: AugmentConfig) -> torch.Tensor:
    """3x3 matrix mapping output (crop) coordinates to source coordinates, in [-1, 1] units."""
    fx = -1.0 if (cfg.src_flip and float(torch.rand((), generator=g)) < 0.5) else 1.0
    fy = -1.0 if (cfg.src_flip and float(torch.rand((), generator=g)) < 0.5) else 1.0
    angle = math.radians(_u(g, -cfg.src_rotation, cfg.src_rotation))
    scale = _u(g, *cfg.crop_scale)
    log_ratio = _u(g, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
    ratio = math.exp(log_ratio)
    cw = min(1.0, math.sqrt(scale * ratio))
    ch = min(1.0, math.sqrt(scale / ratio))
    cx = _u(g, -(1.0 - cw), 1.0 - cw)
    cy = _u(g, -(1.0 - ch), 1.0 - ch)
    flip = torch.diag(torch.tensor([fx, fy, 1.0], dtype=torch.float64))
    crop = torch.tensor([[cw, 0.0, cx], [0.0, ch, cy], [0.0, 0.0, 1.0]], dtype=torch.float64)
    # image transform: crop(rotate(flip(img))); sampling grid: flip^-1 . rot^-1 . crop^-1
    return flip @ _rot(-angle) @ crop


def _sample_view(g: torch.Generator, cfg: AugmentConfig, channels: int) -> tuple[torch.Tensor, list[float]]:
    angle = math.radians(_u(g, -cfg.view_rotation, cfg.view_rotation))
    b = _u(g, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
    c = _u(g, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
    s = _u(g, max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)
    h = _u(g, -cfg.hue, cfg.hue)
    gray = 1.0 if float(torch.rand((), generator=g)) < cfg.grayscale_p else 0.0
    return _rot(-angle), [b, c, s, h, gray]


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 3:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def colour_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-image brightness, contrast, saturation, hue and grayscale on [0, 1] images.

    ``params`` (N, 5): brightness factor, contrast factor, saturation factor, hue shift (in
    turns, [-0.5, 0.5]), grayscale flag. Saturation, hue and grayscale act on RGB only.
    """
    p = params.to(device=x.device, dtype=x.dtype)
    view = lambda col: p[:, col].view(-1, 1, 1, 1)  # noqa: E731
    x = (x * view(0)).clamp(0, 1)
    m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - m) * view(1) + m).clamp(0, 1)
    if x.shape[1] == 3:
        g = _gray(x)
        x = ((x - g) * view(2) + g).clamp(0, 1)
        # hue: rotate the (I, Q) chroma plane of YIQ
        to_yiq = torch.tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=x.dtype, device=x.device
        )
        from_yiq = torch.linalg.inv(to_yiq)
        yiq = torch.einsum("ij,njhw->nihw", to_yiq, x)
        th = p[:, 3] * 2 * math.pi
        cos, sin = torch.cos(th).view(-1, 1, 1), torch.sin(th).view(-1, 1, 1)
        i, q = yiq[:, 1], yiq[:, 2]
        yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], dim=1)
        x = torch.einsum("ij,njhw->nihw", from_yiq, yiq).clamp(0, 1)
        g = _gray(x).expand_as(x)
        x = torch.where(view(4) > 0.5, g, x)
    return x


def normalize_intensity(x: torch.Tensor) -> torch.Tensor:
    """The fixed mean/std normalisation applied to every network input."""
    return (x - NORM_MEAN) / NORM_STD


def _apply_v2(x: torch.Tensor, fh: bool, fv: bool, k: int) -> torch.Tensor:
    dims = [d for d, f in ((-1, fh), (-2, fv)) if f]
    if dims:
        x = torch.flip(x, dims)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def align_to_v1(x: torch.Tensor, flip_h: torch.Tensor, flip_v: torch.Tensor, rot_k: torch.Tensor) -> torch.Tensor:
    """Undo v2's extra transform on a spatial map (N, C, G, G) of v2 views (e.g. the patch grid)."""
    if x.shape[0] != rot_k.shape[0]:
        raise ValueError(f"x has {x.shape[0]} maps but {rot_k.shape[0]} transforms were recorded")
    out = []
    for i in range(x.shape[0]):
        y = x[i]
        k = int(rot_k[i])
        if k:
            y = torch.rot90(y, -k, dims=(-2, -1))
        dims = [d for d, f in ((-1, bool(flip_h[i])), (-2, bool(flip_v[i]))) if f]
        if dims:
            y = torch.flip(y, dims)
        out.append(y)
    return torch.stack(out)


class LDViewGenerator:
    """Makes the 5B network inputs of one LD step from B pairs of source images.

    ``__call__(img1, img2, generators)``: img1, img2 (B, C, H, W) in [0, 1] on the training
    device (square, H == W == ``size`` is the usual case; other sizes are resampled), and one
    ``torch.Generator`` per item. Returns a ``ViewBatch``.
    """

    def __init__(self, size: int, config: AugmentConfig | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.size = size
        self.cfg = config or AugmentConfig()

    def __call__(self, img1: torch.Tensor, img2: torch.Tensor, generators: Sequence[torch.Generator]) -> ViewBatch:
        if img1.shape != img2.shape or img1.dim() != 4:
            raise ValueError(
                f"img1 and img2 must both be (B, C, H, W), got {tuple(img1.shape)} and {tuple(img2.shape)}"
            )
        b, c = img1.shape[:2]
        if len(generators) != b:
            raise ValueError(f"need one generator per item: {b} items, {len(generators)} generators")
        cfg = self.cfg
        thetas = [[None] * b for _ in range(4)]  # order: img1_v1, img2_v1, img1_v2, img2_v2
        jitter = [[None] * b for _ in range(4)]
        fh, fv, rk, mw = [], [], [], []
        for i, g in enumerate(generators):
            src = [_sample_source(g, cfg), _sample_source(g, cfg)]
            for view in range(2):
                for j in range(2):
                    vrot, jit = _sample_view(g, cfg, c)
                    thetas[2 * view + j][i] = (src[j] @ vrot)[:2]
                    jitter[2 * view + j][i] = jit
            for _ in range(2):  # v2 extras for img1_v2 and img2_v2 of this item
                fh.append(cfg.v2_flip_p > 0 and float(torch.rand((), generator=g)) < cfg.v2_flip_p)
                fv.append(cfg.v2_flip_p > 0 and float(torch.rand((), generator=g)) < cfg.v2_flip_p)
                rk.append(int(torch.randint(0, 4, (), generator=g)) if cfg.v2_rot90 else 0)
            mw.append(_u(g, *cfg.mix_range))
        # rk/fh/fv are per item (img1_v2, img2_v2); reorder to [img1_v2 (B), img2_v2 (B)]
        fh = torch.tensor(fh[0::2] + fh[1::2])
        fv = torch.tensor(fv[0::2] + fv[1::2])
        rk = torch.tensor(rk[0::2] + rk[1::2])
        dev, dt = img1.device, img1.dtype
        theta = torch.stack([t for group in thetas for t in group]).to(device=dev, dtype=dt)  # (4B, 2, 3)
        src_imgs = torch.cat([img1, img2, img1, img2]).to(dt)
        grid = F.affine_grid(theta, [4 * b, c, self.size, self.size], align_corners=False)
        views = F.grid_sample(src_imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        params = torch.tensor([p for group in jitter for p in group], dtype=torch.float64)
        views = colour_jitter(views, params)
        v2 = views[2 * b :]
        v2 = torch.stack([_apply_v2(v2[i], bool(fh[i]), bool(fv[i]), int(rk[i])) for i in range(2 * b)])
        w = torch.tensor(mw, dtype=dt, device=dev)
        mix = w.view(-1, 1, 1, 1) * views[:b] + (1 - w.view(-1, 1, 1, 1)) * views[b : 2 * b]
        images = normalize_intensity(torch.cat([views[: 2 * b], v2, mix]))
        return ViewBatch(images=images, flip_h=fh, flip_v=fv, rot_k=rk, mix_w=w, batch_size=b)


# ----------------------------------------------------------------------------------------- volumes

# the axes of a volume tensor (N, C, X, Y, Z) and its axial plane (X, Y)
_VOL_AXES = (-3, -2, -1)
_AXIAL = (-3, -2)
ELASTIC_TERMS = 3  # cosines in each of the elastic warp's three displacement functions
ELASTIC_FREQ = 1.0  # their largest frequency per axis: at most one period across the patch


@dataclass
class VolumeAugmentConfig:
    """Augmentation ranges of 3-D views (our choices, docs/method.md section 10).

    The defaults are the recipe of ``ld-ext pretrain --dims 3``, small warps and exact alignment
    included (scale +-5 %, shear +-0.03, elastic 0.03 of S/2); ``VolumeAugmentConfig.unwarped()``
    switches the warp fields (``view_scale``, ``view_shear``, ``elastic``, ``exact_align``) off,
    which is the view generator as it was before warps existed.
    """

    src_flip: bool = True  # flip each axis of the source, p = 0.5 each
    src_rot90: bool = True  # k*90 degrees in the axial plane, k uniform in 0..3
    view_rotation: float = 2.0  # degrees, about each axis, per view
    brightness: float = 0.2
    contrast: float = 0.2
    v2_flip_p: float = 0.5
    v2_rot90: bool = True
    mix_range: tuple[float, float] = (0.2, 0.8)
    view_scale: float = 0.05  # per view and axis, a scale factor in [1 - s, 1 + s]
    view_shear: float = 0.03  # per view, each of the six off-diagonal entries in [-h, h]
    elastic: float = 0.03  # per view, the largest displacement of each elastic shear step (fraction of S/2)
    exact_align: bool = True  # align v2 onto v1 through both views' whole maps (else: v2's flips and turns)

    @classmethod
    def unwarped(cls, **changes) -> "VolumeAugmentConfig":
        """The recipe without the warps and the exact alignment (only v2's flips and turns are undone),
        with ``changes`` applied."""
        base = dict(view_scale=0.0, view_shear=0.0, elastic=0.0, exact_align=False)
        base.update(changes)
        return cls(**base)

    def check(self) -> None:
        """One-line errors for ranges that would not give small, invertible warps."""
        limits = (("view_rotation", 45.0), ("view_scale", 0.5), ("view_shear", 0.25))
        for name, hi in limits:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= hi:
                raise ValueError(f"VolumeAugmentConfig.{name} must be a number in [0, {hi}], got {v!r}")
        lip = math.pi * math.sqrt(2) * ELASTIC_FREQ  # Lipschitz constant of a displacement per unit amplitude
        e = self.elastic
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e < 1 / lip:
            raise ValueError(
                f"VolumeAugmentConfig.elastic must be a number in [0, {1 / lip:.3f}) (each elastic step "
                f"Lipschitz < 1), got {e!r}"
            )


def elastic_warp(p: torch.Tensor, coef: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The elastic part of a view's map, on points ``p`` (..., 3) in (X, Y, Z) order, [-1, 1] units.

    Three axis-wise shears, ``x' = x + a(y, z)``, ``y' = y + b(x', z)``, ``z' = z + c(x', y')``;
    ``coef`` (3, n, 4) holds (amplitude, frequency 1, frequency 2, phase) of the n cosines of each
    of a, b, c: ``a(u, v) = sum_k amp_k cos(pi (f1_k u + f2_k v) + phase_k)``. Each step moves one
    coordinate by a function of the other two, so it has unit Jacobian determinant and is undone
    exactly by subtracting the same function: ``inverse=True`` undoes c, then b, then a.
    """

    def shift(k: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = coef[k].to(p.dtype)
        arg = math.pi * (u[..., None] * c[:, 1] + v[..., None] * c[:, 2]) + c[:, 3]
        return (c[:, 0] * torch.cos(arg)).sum(-1)

    x, y, z = p.unbind(-1)
    if not inverse:
        x = x + shift(0, y, z)
        y = y + shift(1, x, z)
        z = z + shift(2, x, y)
    else:
        z = z - shift(2, x, y)
        y = y - shift(1, x, z)
        x = x - shift(0, y, z)
    return torch.stack([x, y, z], dim=-1)


def _cell_centres(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """The centres of a grid of cells/voxels ``shape`` (X, Y, Z) in [-1, 1] units, (X, Y, Z, 3) in
    (X, Y, Z) order (``grid_sample``'s ``align_corners=False`` convention)."""
    axes = [(torch.arange(n, dtype=dtype) * 2 + 1) / n - 1 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


@dataclass
class VolumeViewBatch:
    """One 3-D step's network input and what is needed to align v2 onto v1.

    ``images`` (5B, C, S, S, S), normalised: [img1_v1, img2_v1, img1_v2, img2_v2, img3] (B each).
    ``flips`` (2B, 3) bool: v2 flipped along X, Y, Z; ``rot_k`` (2B,): k*90 degrees in the axial
    plane, both of [img1_v2, img2_v2]. ``mix_w`` (B,) the mixup weights. With exact alignment
    (``VolumeAugmentConfig.exact_align``): ``lin`` (4B, 3, 3) the small affine part of the four
    views' maps and ``elastic`` (4B, 3, n, 4) their elastic coefficients (None without elastic
    warps), both float64, in the order of ``images``.
    """

    images: torch.Tensor
    flips: torch.Tensor
    rot_k: torch.Tensor
    mix_w: torch.Tensor
    batch_size: int = field(default=0)
    lin: torch.Tensor | None = None
    elastic: torch.Tensor | None = None

    @property
    def exact_align(self) -> bool:
        """Whether ``align_v2`` resamples through the views' whole maps (else it only permutes)."""
        return self.lin is not None

    def v2_coordinates(self, shape: Sequence[int]) -> torch.Tensor:
        """Where the centres of a grid ``shape`` (X, Y, Z) of v1's cells lie in v2 (before v2's flips
        and turns), in [-1, 1] units: (2B, X, Y, Z, 3) float64, (X, Y, Z) order.

        ``q = E2^-1(L2^-1 L1 E1(p))``: v1's map (elastic E1, then affine L1, then the source's flips
        and turn and the crop, which both views of an item share) followed by the exact inverse of
        v2's. A point with some ``|q| > 1`` lies outside v2's field of view."""
        if self.lin is None:
            raise ValueError("this batch records no warps (exact_align was off)")
        n = self.rot_k.shape[0]
        p = _cell_centres(shape, torch.float64).reshape(-1, 3)
        out = []
        for i in range(n):
            e1 = self.elastic[i] if self.elastic is not None else None
            e2 = self.elastic[n + i] if self.elastic is not None else None
            q = elastic_warp(p, e1) if e1 is not None else p
            q = q @ torch.linalg.solve(self.lin[n + i], self.lin[i]).T
            out.append(elastic_warp(q, e2, inverse=True) if e2 is not None else q)
        return torch.stack(out).reshape(n, *shape, 3)

    def align_v2(self, x: torch.Tensor) -> torch.Tensor:
        """A spatial map (2B, C, X, Y, Z) of [img1_v2, img2_v2] (e.g. the grid of sub-cubes) in v1's
        frame: v2's flips and turns undone exactly (``align_to_v1_3d``), then, with exact alignment,
        trilinear resampling at ``v2_coordinates`` (border padding: a v1 point outside v2 takes the
        value of v2's nearest cell)."""
        y = align_to_v1_3d(x, self.flips, self.rot_k)
        if self.lin is None:
            return y
        q = self.v2_coordinates(tuple(y.shape[-3:]))
        grid = q.flip(-1).to(device=y.device, dtype=y.dtype)  # grid_sample orders coordinates (Z, Y, X)
        return F.grid_sample(y, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _apply_v2_3d(x: torch.Tensor, flips: Sequence[bool], k: int) -> torch.Tensor:
    dims = [d for d, f in zip(_VOL_AXES, flips) if f]
    if dims:
        x = torch.flip(x, dims)
    return torch.rot90(x, k, dims=_AXIAL) if k else x


def align_to_v1_3d(x: torch.Tensor, flips: torch.Tensor, rot_k: torch.Tensor) -> torch.Tensor:
    """Undo v2's extra transform on a spatial map (N, C, G, G, G) of v2 views (e.g. the patch grid)."""
    if x.dim() != 5 or x.shape[0] != rot_k.shape[0] or tuple(flips.shape) != (rot_k.shape[0], 3):
        raise ValueError(
            f"x must be (N, C, G, G, G) with N = {rot_k.shape[0]} and flips (N, 3), got {tuple(x.shape)} "
            f"and {tuple(flips.shape)}"
        )
    out = []
    for i in range(x.shape[0]):
        y = x[i]
        k = int(rot_k[i])
        if k:
            y = torch.rot90(y, -k, dims=_AXIAL)
        dims = [d for d, f in zip(_VOL_AXES, flips[i].tolist()) if f]
        out.append(torch.flip(y, dims) if dims else y)
    return torch.stack(out)


def _axis_rotation(axis: int, angle: float) -> torch.Tensor:
    """3x3 rotation about tensor axis ``axis`` (0 = X, 1 = Y, 2 = Z) by ``angle`` radians."""
    c, s = math.cos(angle), math.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    m = torch.eye(3, dtype=torch.float64)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def _sample_source_3d(g: torch.Generator, cfg: VolumeAugmentConfig) -> torch.Tensor:
    """3x3 matrix (tensor axis order X, Y, Z) of a source's flips and axial 90-degree rotation,
    with exact integer entries."""
    flips = [-1.0 if (cfg.src_flip and float(torch.rand((), generator=g)) < 0.5) else 1.0 for _ in range(3)]
    k = int(torch.randint(0, 4, (), generator=g)) if cfg.src_rot90 else 0
    rot = torch.eye(3, dtype=torch.float64)
    for _ in range(k):  # exact quarter turns in the (X, Y) plane
        rot = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) @ rot
    return torch.diag(torch.tensor(flips, dtype=torch.float64)) @ rot


def _sample_warp_3d(g: torch.Generator, cfg: VolumeAugmentConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A view's scale and shear (3x3 K @ H) and elastic coefficients (3, n, 4) or None; nothing is
    drawn for a part that is off (so that no warps leaves the generator where it was)."""
    m = torch.eye(3, dtype=torch.float64)
    if cfg.view_shear > 0:
        u = torch.rand(6, generator=g, dtype=torch.float64)
        off = [(i, j) for i in range(3) for j in range(3) if i != j]
        for (i, j), v in zip(off, u.tolist()):
            m[i, j] = cfg.view_shear * (2 * v - 1)
    if cfg.view_scale > 0:
        u = torch.rand(3, generator=g, dtype=torch.float64)
        m = torch.diag(1 + cfg.view_scale * (2 * u - 1)) @ m
    coef = None
    if cfg.elastic > 0:
        u = torch.rand(3, ELASTIC_TERMS, 4, generator=g, dtype=torch.float64)
        # the amplitudes of a function add up to at most cfg.elastic: |a|, |b|, |c| <= elastic
        amp = cfg.elastic * (2 * u[..., 0] - 1) / ELASTIC_TERMS
        freq = ELASTIC_FREQ * (2 * u[..., 1:3] - 1)
        coef = torch.cat([amp[..., None], freq, 2 * math.pi * u[..., 3:]], dim=-1)
    return m, coef


def _sample_view_3d(g: torch.Generator, cfg: VolumeAugmentConfig):
    """A view's small affine map (rotations @ scale @ shear, 3x3), elastic coefficients (or None) and
    intensity parameters."""
    m = torch.eye(3, dtype=torch.float64)
    for axis in range(3):
        m = _axis_rotation(axis, math.radians(_u(g, -cfg.view_rotation, cfg.view_rotation))) @ m
    b = _u(g, max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
    c = _u(g, max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
    coef = None
    if cfg.view_scale > 0 or cfg.view_shear > 0 or cfg.elastic > 0:
        kh, coef = _sample_warp_3d(g, cfg)
        m = m @ kh
    return m, coef, [b, c]


def _intensity_3d(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Per-volume brightness and contrast (about the volume's mean) on [0, 1] volumes (N, C, X, Y, Z)."""
    p = params.to(device=x.device, dtype=x.dtype).view(-1, 2, 1, 1, 1, 1)
    x = (x * p[:, 0]).clamp(0, 1)
    m = x.mean(dim=(1, 2, 3, 4), keepdim=True)
    return ((x - m) * p[:, 1] + m).clamp(0, 1)


def view_margin(size: int, cfg: VolumeAugmentConfig) -> int:
    """Voxels added on each side of a view's patch so that its warped map never samples outside.

    Output voxel centres lie within r = S/2 - 1/2 voxels of the centre (max norm); the elastic
    steps move each coordinate by at most A = elastic * S/2 voxels (each step moves one coordinate,
    by at most the sum of its amplitudes); the affine part L = rotations @ scale @ shear grows the
    max norm by at most its max row sum, rho = (1 + theta)^3 (1 + s) (1 + 2h) (cos + sin <= 1 + theta
    per rotation); the flips and quarter turns keep it. So the reach beyond the patch is at most
    (r + A) rho - r; one voxel more covers the trilinear support. Without scale, shear and elastic
    this is the rotation-only margin used before warps existed, ceil(sqrt(3) S/2 * 3 theta) + 1.
    """
    theta, s, h = math.radians(cfg.view_rotation), cfg.view_scale, cfg.view_shear
    if theta == 0 and s == 0 and h == 0 and cfg.elastic == 0:
        return 0
    if s == 0 and h == 0 and cfg.elastic == 0:  # the rotation-only margin, unchanged
        return math.ceil(math.sqrt(3) * size / 2 * 3 * theta) + 1
    rho = (1 + theta) ** 3 * (1 + s) * (1 + 2 * h)
    a = cfg.elastic * size / 2
    return math.ceil((size / 2 + a) * rho - size / 2) + 1


class VolumeViewGenerator:
    """Makes the 5B network inputs of one 3-D LD step from B pairs of source patches.

    ``__call__(img1, img2, generators)``: img1, img2 (B, C, R, R, R) in [0, 1] (R = ``read_size``,
    the patch edge ``size`` plus ``view_margin`` on each side, which keeps the warped views inside
    the data; other edges are resampled to the same central field), and one ``torch.Generator``
    per item. Returns a ``VolumeViewBatch`` of (5B, C, size, size, size) views. ``config`` defaults
    to ``VolumeAugmentConfig()``, the recipe.
    """

    def __init__(self, size: int, config: VolumeAugmentConfig | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"size must be an int >= 16, got {size!r}")
        self.size = size
        self.cfg = config if config is not None else VolumeAugmentConfig()
        self.cfg.check()
        self.margin = view_margin(size, self.cfg)
        self.read_size = size + 2 * self.margin

    def _draw(self, generators: Sequence[torch.Generator]):
        """Per view (order of ``images``): the source map F, the small affine L, the elastic
        coefficients and the intensities; per v2: flips and turns; per item: the mixup weight."""
        cfg, b = self.cfg, len(generators)
        src_m, lin, coefs, inten = ([[None] * b for _ in range(4)] for _ in range(4))
        flips, rk, mw = [], [], []
        for i, g in enumerate(generators):
            src = [_sample_source_3d(g, cfg), _sample_source_3d(g, cfg)]
            for view in range(2):
                for j in range(2):  # both views of an image share its source map
                    k = 2 * view + j
                    src_m[k][i] = src[j]
                    lin[k][i], coefs[k][i], inten[k][i] = _sample_view_3d(g, cfg)
            for _ in range(2):  # v2 extras of img1_v2 and img2_v2
                flips.append(
                    [cfg.v2_flip_p > 0 and float(torch.rand((), generator=g)) < cfg.v2_flip_p for _ in range(3)]
                )
                rk.append(int(torch.randint(0, 4, (), generator=g)) if cfg.v2_rot90 else 0)
            mw.append(_u(g, *cfg.mix_range))
        flips = torch.tensor(flips[0::2] + flips[1::2], dtype=torch.bool)
        rk = torch.tensor(rk[0::2] + rk[1::2])
        flat = lambda grp: [m for row in grp for m in row]  # noqa: E731
        return flat(src_m), flat(lin), flat(coefs), flat(inten), flips, rk, mw

    def _grid(self, mats, coefs, shape, dev, dt) -> torch.Tensor:
        """The sampling grid of every view, (4B, S, S, S, 3): ``scale @ F @ L @ E(p)`` at the output
        voxel centres p (one ``affine_grid`` when there is no elastic part)."""
        s, n = self.size, len(mats)
        # the central size^3 of the source, in its [-1, 1] coordinates (per axis X, Y, Z)
        scale = torch.diag(torch.tensor([s / r for r in shape], dtype=torch.float64))
        if coefs[0] is None:
            rev = torch.eye(3, dtype=torch.float64).flip(0)  # affine_grid orders coordinates (Z, Y, X)
            theta = torch.stack([rev @ scale @ m @ rev for m in mats])
            theta = torch.cat([theta, torch.zeros(n, 3, 1, dtype=torch.float64)], dim=2).to(device=dev, dtype=dt)
            return F.affine_grid(theta, [n, 1, s, s, s], align_corners=False)
        p = _cell_centres((s, s, s), dt).to(dev)
        grids = []
        for m, coef in zip(mats, coefs):
            q = elastic_warp(p, coef.to(dev)) @ (scale @ m).to(device=dev, dtype=dt).T
            grids.append(q.flip(-1))
        return torch.stack(grids)

    def __call__(
        self, img1: torch.Tensor, img2: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> VolumeViewBatch:
        if img1.shape != img2.shape or img1.dim() != 5:
            raise ValueError(
                f"img1 and img2 must both be (B, C, X, Y, Z), got {tuple(img1.shape)} and {tuple(img2.shape)}"
            )
        b, c = img1.shape[:2]
        if len(generators) != b:
            raise ValueError(f"need one generator per item: {b} items, {len(generators)} generators")
        src_m, lin, coefs, inten, flips, rk, mw = self._draw(generators)
        dev, dt = img1.device, img1.dtype
        grid = self._grid([f @ m for f, m in zip(src_m, lin)], coefs, img1.shape[2:], dev, dt)
        src = torch.cat([img1, img2, img1, img2]).to(dt)
        views = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        views = _intensity_3d(views, torch.tensor(inten, dtype=torch.float64))
        v2 = views[2 * b :]
        v2 = torch.stack([_apply_v2_3d(v2[i], flips[i].tolist(), int(rk[i])) for i in range(2 * b)])
        w = torch.tensor(mw, dtype=dt, device=dev)
        wv = w.view(-1, 1, 1, 1, 1)
        mix = wv * views[:b] + (1 - wv) * views[b : 2 * b]
        images = normalize_intensity(torch.cat([views[: 2 * b], v2, mix]))
        exact = self.cfg.exact_align
        return VolumeViewBatch(
            images=images,
            flips=flips,
            rot_k=rk,
            mix_w=w,
            batch_size=b,
            lin=torch.stack(lin) if exact else None,
            elastic=torch.stack(coefs) if exact and coefs[0] is not None else None,
        )
