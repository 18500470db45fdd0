"""The LD training objective (docs/method.md sections 5 and 6), built on the drop-in loss modules.

``LDObjective(z, s, views)`` turns the raw network outputs of one ``ViewBatch`` (5B images: the
4B aligned views, then the B mixups) into the loss terms of one step:

* ``pd``: patch discrimination on the G x G patch cells of the 4B views (view 2 flipped/rotated
  back onto view 1), ``PatchDiscriminationLoss``;
* ``mix``: the same criterion on the mixup cells against their detached targets;
* stage 2 (``s`` given): ``rd`` and ``ent``, region discrimination and the assignment entropy of
  the 4B views, ``RegionDiscriminationLoss(normalize=True, return_entropy=True)`` with the
  network's assignment kind (``LDNet.assignment``);
* ``loss`` = pd + mix (+ ``W_RD`` rd + ``W_ENT`` ent).

Volumes (a ``VolumeViewBatch``, outputs (5B, D, X, Y, Z)): the same terms on a G x G x G grid of
sub-cubes, view 2 realigned in 3-D (through both views' whole maps with exact alignment, the
interpolated cells normalised again); region discrimination runs through the same fused ops, which
take one to three spatial dims.

These are the modules of ``ld_ext.losses`` a user would put in their own training loop; with
``gather_distributed=True`` a torch.distributed job computes every term over the global batch.
``loss_impl="reference"`` swaps in their plain-PyTorch twins (``ld_ext.plain_losses``, also the
comparison baseline of the benchmarks; same interface, no fused op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import ViewBatch, VolumeViewBatch
from .losses import PatchDiscriminationLoss, RegionDiscriminationLoss
from .normalization import compute_dtype, normalize_embeddings, unit
from .plain_losses import PlainPatchDiscriminationLoss, PlainRegionDiscriminationLoss

__all__ = ["LOSS_IMPLS", "W_RD", "W_ENT", "RD_TEMPERATURE", "PD_TEMPERATURE", "LDObjective"]

LOSS_IMPLS = ("fused", "reference")
W_RD = 10.0  # L = L_pd + L_mix + 10 L_rd + 0.1 L_ent (docs/method.md section 6)
W_ENT = 0.1
RD_TEMPERATURE = 0.2  # tau of region discrimination (section 3)
PD_TEMPERATURE = 0.1  # T of the PD and mixup criterion (section 5)


def _loss_modules(loss_impl: str):
    if loss_impl == "fused":
        return RegionDiscriminationLoss, PatchDiscriminationLoss
    return PlainRegionDiscriminationLoss, PlainPatchDiscriminationLoss


class LDObjective(nn.Module):
    """The LD losses of one step, from the raw network outputs ``z`` (5B, D, H, W), ``s``
    (5B, K, H, W) or None (stage 1) and the ``ViewBatch`` they came from (or (5B, D, X, Y, Z),
    (5B, K, X, Y, Z) and a ``VolumeViewBatch``).

    Args:
        loss_impl: "fused" (the ld_ext ops, through ``ld_ext.losses``) or "reference" (the same
            modules in plain PyTorch, for comparisons).
        grid: G, the patch grid of the PD and mixup terms (G x G cells, G x G x G for volumes).
        rd_temperature: tau of region discrimination (0.2).
        pd_temperature: T of the PD / mixup criterion (0.1).
        assignment: how ``s`` becomes the assignment (``LDNet.assignment``: "sigmoid").
        w_rd, w_ent: the weights of L_rd and L_ent in the stage-2 loss.

    Returns a dict of 0-dim tensors: ``pd``, ``mix``, in stage 2 ``rd`` and ``ent``, and ``loss``.
    """

    def __init__(
        self,
        loss_impl: str = "fused",
        grid: int = 8,
        *,
        rd_temperature: float = RD_TEMPERATURE,
        pd_temperature: float = PD_TEMPERATURE,
        assignment: str = "sigmoid",
        w_rd: float = W_RD,
        w_ent: float = W_ENT,
    ) -> None:
        super().__init__()
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be a positive int, got {grid!r}")
        self.loss_impl = loss_impl
        self.grid = grid
        self.w_rd, self.w_ent = w_rd, w_ent
        rd_cls, pd_cls = _loss_modules(loss_impl)
        self.region_loss = rd_cls(
            rd_temperature, normalize=True, assignment=assignment, return_entropy=True, gather_distributed=True
        )
        self.patch_loss = pd_cls(pd_temperature, gather_distributed=True)

    def extra_repr(self) -> str:
        return f"loss_impl={self.loss_impl!r}, grid={self.grid}, w_rd={self.w_rd}, w_ent={self.w_ent}"

    def forward(
        self, z: torch.Tensor, s: torch.Tensor | None, views: ViewBatch | VolumeViewBatch
    ) -> dict[str, torch.Tensor]:
        b = views.batch_size
        if z.shape[0] != 5 * b:
            raise ValueError(f"z must hold 5B = {5 * b} images, got {z.shape[0]}")
        want = 5 if isinstance(views, VolumeViewBatch) else 4
        if z.dim() != want:
            raise ValueError(f"z must have {want} dims for a {type(views).__name__}, got shape {tuple(z.shape)}")
        pool = F.adaptive_avg_pool3d if want == 5 else F.adaptive_avg_pool2d
        f = unit(pool(normalize_embeddings(compute_dtype(z)), self.grid), dim=1)  # (5B, D, G, G[, G])
        d = f.shape[1]
        f_v2 = views.align_v2(f[2 * b : 4 * b])
        if isinstance(views, VolumeViewBatch) and views.exact_align:  # interpolated cells: unit again
            f_v2 = unit(f_v2, dim=1)
        w = views.mix_w.to(f.dtype).view(-1, *([1] * (f.dim() - 1)))
        target = unit(w * f[:b] + (1 - w) * f[b : 2 * b], dim=1).detach()

        def rows(x):  # (n, D, G, G[, G]) -> (n * G^dims, D)
            return x.flatten(2).transpose(1, 2).reshape(-1, d)

        # row i of view 1 pairs with row i of view 2: [img1_v1; img2_v1] with [img1_v2; img2_v2]
        l_pd = self.patch_loss(rows(f[: 2 * b]), rows(f_v2))
        l_mix = self.patch_loss(rows(f[4 * b :]), rows(target))
        out = {"pd": l_pd, "mix": l_mix}
        loss = l_pd + l_mix
        if s is not None:
            l_rd, ent = self.region_loss(z[: 4 * b], s[: 4 * b])
            out["rd"], out["ent"] = l_rd, ent
            loss = loss + self.w_rd * l_rd + self.w_ent * ent
        out["loss"] = loss
        return out
