"""The LD network: a VGG16-BN-tiny encoder and a U-Net style two-branch decoder.

docs/method.md section 1. ``LDNet(in_channels, emb_dim, n_clusters)`` returns the raw pixel
embeddings ``z`` (not normalised) and the raw clustering logits ``s`` (pre-sigmoid); with
``n_clusters=None`` (stage 1) the clustering branch is absent and ``s`` is ``None``.
``spatial_dims=3`` builds the same network on volumes (Conv3d, BatchNorm3d, 2x2x2 max-pools,
nearest upsampling; same widths and heads).

Stage 2 is built with the clustering branch and takes every other weight from a stage-1
model *by parameter name* (``LDNet.load_stage1``), never by position.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VGGEncoder",
    "LDDecoder",
    "LDNet",
    "DEFAULT_WIDTHS",
    "DEFAULT_DEPTHS",
    "CLUSTER_PREFIX",
    "SPATIAL_DIMS",
    "check_spatial_dims",
]

DEFAULT_WIDTHS = (16, 32, 64, 128, 128)
DEFAULT_DEPTHS = (2, 2, 3, 3, 3)
CLUSTER_PREFIX = "decoder.cluster_head."
SPATIAL_DIMS = (2, 3)  # images (H, W) and volumes (X, Y, Z)

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_POOL = {2: F.max_pool2d, 3: F.max_pool3d}


def check_spatial_dims(value) -> int:
    """``value`` is 2 or 3 (an int); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"spatial_dims must be an int (2 or 3), got {type(value).__name__}")
    if value not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 2 or 3, got {value}")
    return value


def conv_bn_relu(cin: int, cout: int, spatial_dims: int = 2) -> nn.Sequential:
    return nn.Sequential(
        _CONV[spatial_dims](cin, cout, kernel_size=3, padding=1, bias=False),
        _BN[spatial_dims](cout),
        nn.ReLU(inplace=True),
    )


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class VGGEncoder(nn.Module):
    """VGG16-BN-tiny: five groups of conv3x3-BN-ReLU with a 2x2 max-pool between groups
    (3x3x3 convolutions and 2x2x2 pools with ``spatial_dims=3``).

    ``forward`` returns the five feature maps taken just before each pool
    (widths[0] @1, widths[1] @1/2, ..., widths[4] @1/16 for the defaults).
    """

    def __init__(
        self,
        in_channels: int = 1,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        depths: Sequence[int] = DEFAULT_DEPTHS,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths must have 5 entries, got {widths} and {depths}")
        for w in widths + depths:
            _check_positive_int("widths/depths entry", w)
        self.widths = widths
        self.depths = depths
        groups = []
        cin = in_channels
        for w, d in zip(widths, depths):
            layers = []
            for _ in range(d):
                layers.append(conv_bn_relu(cin, w, spatial_dims))
                cin = w
            groups.append(nn.Sequential(*layers))
        self.groups = nn.ModuleList(groups)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, g in enumerate(self.groups):
            if i > 0:
                x = _POOL[self.spatial_dims](x, kernel_size=2, stride=2)
            x = g(x)
            feats.append(x)
        return feats


class _UpBlock(nn.Module):
    """Nearest x2 upsampling (to the skip's exact size), concatenation, two conv3x3-BN-ReLU."""

    def __init__(self, cin: int, cskip: int, cmid: int, cout: int, spatial_dims: int = 2) -> None:
        super().__init__()
        self.conv1 = conv_bn_relu(cin + cskip, cmid, spatial_dims)
        self.conv2 = conv_bn_relu(cmid, cout, spatial_dims)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return self.conv2(self.conv1(torch.cat([x, skip], dim=1)))


class _Head(nn.Sequential):
    """conv3x3-BN-ReLU to C, then conv3x3 to C (raw output)."""

    def __init__(self, cin: int, cout: int, spatial_dims: int = 2) -> None:
        super().__init__(
            conv_bn_relu(cin, cout, spatial_dims), _CONV[spatial_dims](cout, cout, kernel_size=3, padding=1)
        )


class LDDecoder(nn.Module):
    """U-Net decoder with an embedding branch and an optional clustering branch.

    Blocks (defaults): 1/8: (128+128)->128->64; 1/4: (64+64)->64->32; 1/2: (32+32)->32->16;
    at full resolution the concatenation (16+16 = 32 ch) feeds the two heads.
    """

    def __init__(
        self,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        emb_dim: int = 32,
        n_clusters: int | None = 16,
        spatial_dims: int = 2,
    ):
        super().__init__()
        w = tuple(widths)
        sd = check_spatial_dims(spatial_dims)
        self.up4 = _UpBlock(w[4], w[3], w[3], w[2], sd)
        self.up3 = _UpBlock(w[2], w[2], w[2], w[1], sd)
        self.up2 = _UpBlock(w[1], w[1], w[1], w[0], sd)
        self.out_channels = 2 * w[0]
        self.emb_head = _Head(self.out_channels, emb_dim, sd)
        self.cluster_head = _Head(self.out_channels, n_clusters, sd) if n_clusters is not None else None

    def features(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The full-resolution concatenation that feeds both heads."""
        f1, f2, f3, f4, f5 = feats
        x = self.up4(f5, f4)
        x = self.up3(x, f3)
        x = self.up2(x, f2)
        x = F.interpolate(x, size=f1.shape[2:], mode="nearest")
        return torch.cat([x, f1], dim=1)

    def forward(self, feats: Sequence[torch.Tensor]):
        h = self.features(feats)
        z = self.emb_head(h)
        s = self.cluster_head(h) if self.cluster_head is not None else None
        return z, s


class LDNet(nn.Module):
    """The LD network (docs/method.md section 1).

    Args:
        in_channels: image channels (1 for grayscale, 3 for RGB / replicated gray).
        emb_dim: D, channels of the pixel embedding z.
        n_clusters: K, channels of the clustering logits s; ``None`` builds the stage-1 network
            without the clustering branch.
        widths: the five encoder group widths (the decoder widths follow from them).
        depths: conv layers per encoder group.
        spatial_dims: 2 (images, the default) or 3 (volumes: Conv3d, BatchNorm3d, 2x2x2 pools).

    ``forward(x (B, C, H, W)) -> (z (B, D, H, W), s (B, K, H, W) or None)``: z raw (not
    normalised), s raw logits (pre-sigmoid). H and W must be at least 16. With ``spatial_dims=3``
    the same with one more spatial dim: ``x (B, C, X, Y, Z) -> (z (B, D, X, Y, Z), s (B, K, X, Y, Z))``.

    ``assignment`` says how ``s`` becomes the soft assignment a (docs/method.md section 2): the
    ``assignment=`` argument of the ops and loss modules (``"sigmoid"``: sigmoid, then L1 over K).
    """

    assignment = "sigmoid"  # the clustering head's output kind (a property of the architecture)

    def __init__(
        self,
        in_channels: int = 1,
        emb_dim: int = 32,
        n_clusters: int | None = 16,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        depths: Sequence[int] = DEFAULT_DEPTHS,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        _check_positive_int("in_channels", in_channels)
        _check_positive_int("emb_dim", emb_dim)
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if n_clusters is not None:
            _check_positive_int("n_clusters", n_clusters)
        self.in_channels = in_channels
        self.emb_dim = emb_dim
        self.n_clusters = n_clusters
        self.encoder = VGGEncoder(in_channels, widths, depths, spatial_dims)
        self.decoder = LDDecoder(self.encoder.widths, emb_dim, n_clusters, spatial_dims)

    @property
    def config(self) -> dict:
        """Constructor arguments; ``LDNet(**model.config)`` rebuilds the same architecture."""
        return {
            "in_channels": self.in_channels,
            "emb_dim": self.emb_dim,
            "n_clusters": self.n_clusters,
            "widths": list(self.encoder.widths),
            "depths": list(self.encoder.depths),
            "spatial_dims": self.spatial_dims,
        }

    def forward(self, x: torch.Tensor):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        nd = self.spatial_dims
        if x.dim() != 2 + nd or x.shape[1] != self.in_channels:
            dims = "H, W" if nd == 2 else "X, Y, Z"
            raise ValueError(f"x must have shape (B, {self.in_channels}, {dims}), got {tuple(x.shape)}")
        if min(x.shape[2:]) < 16:
            what = "16x16 pixels (four 2x2 poolings)" if nd == 2 else "16x16x16 voxels (four 2x2x2 poolings)"
            raise ValueError(f"x must be at least {what}, got {tuple(x.shape[2:])}")
        return self.decoder(self.encoder(x))

    # ------------------------------------------------------------------ stage 1 -> stage 2

    def load_stage1(self, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
        """Copy every weight of a stage-1 model into this one by name.

        Every parameter/buffer of this model except the clustering branch must be present in
        ``state_dict`` with the same shape; keys of ``state_dict`` that this model lacks are an
        error too. Returns the names of the parameters left at their initial values (the
        clustering branch).
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and not k.startswith(CLUSTER_PREFIX)]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [
            f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
            for k in own
            if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or mismatched:
            parts = []
            if missing:
                parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
            if unexpected:
                parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
            if mismatched:
                parts.append(f"shape mismatch {mismatched[:5]}")
            raise ValueError("stage-1 weights do not fit this network: " + "; ".join(parts))
        with torch.no_grad():
            for k, v in state_dict.items():
                own[k].copy_(v)
        return [k for k in own if k not in state_dict]

    @classmethod
    def from_stage1(cls, stage1: "LDNet | Mapping[str, torch.Tensor]", n_clusters: int = 16, **config) -> "LDNet":
        """Build a stage-2 network (with the clustering branch) from a stage-1 model or its state dict."""
        if isinstance(stage1, LDNet):
            cfg = dict(stage1.config)
            sd = stage1.state_dict()
        else:
            cfg = {}
            sd = stage1
        cfg.update(config)
        cfg["n_clusters"] = n_clusters
        model = cls(**cfg)
        model.load_stage1(sd)
        return model

    def cluster_parameters(self) -> Iterable[nn.Parameter]:
        return self.decoder.cluster_head.parameters() if self.decoder.cluster_head is not None else iter(())
