"""End to end: LD training steps per second with the fused vs the plain-PyTorch losses.

``make_training_step`` builds one full stage-2 (or stage-1) LD training step as a callable on
synthetic images; ``run_e2e`` times the two loss implementations interleaved on identical networks
and data (``ld-ext bench --sections e2e``; ``benchmarks/gpu_train.py`` on a GPU).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..augment import LDViewGenerator, item_generator
from ..batching import batch_indices
from ..models import LDNet
from ..objective import LOSS_IMPLS, LDObjective
from .report import CSV_COLUMNS
from .timing import measure_group

__all__ = ["synthetic_images", "make_training_step", "run_e2e"]


def synthetic_images(n: int, size: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Smooth random blob images (n, C, size, size) in [0, 1], for benchmarks and tests."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 8, 8, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    x = x + 0.05 * torch.randn(n, channels, size, size, generator=g)
    x = x - x.amin(dim=(1, 2, 3), keepdim=True)
    return (x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)).clamp(0, 1)


def make_training_step(
    model: LDNet,
    loss_impl: str = "fused",
    batch_size: int = 4,
    size: int = 128,
    *,
    device: str | torch.device | None = None,
    lr: float = 1e-3,
    seed: int = 0,
    grid: int = 8,
) -> Callable[[], dict[str, float]]:
    """One full LD training step as a callable, for end-to-end step-rate measurements.

    Each call draws B pairs from a fixed pool of synthetic images (with the pipeline's batching),
    makes the 5B views on the model's device, runs forward, the LD objective (``loss_impl``
    "fused" or "reference"; stage 1 if ``model.n_clusters`` is None, else stage 2), backward and
    an Adam update. Returns the loss terms as floats. Images per call: ``5 * batch_size``.
    """
    if loss_impl not in LOSS_IMPLS:
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev).train()
    pool = synthetic_images(max(2 * batch_size, 8), size, model.in_channels, seed).to(dev)
    viewgen = LDViewGenerator(size)
    objective = LDObjective(loss_impl, grid, assignment=model.assignment)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    counter = {"step": 0}

    def step() -> dict[str, float]:
        k = counter["step"]
        counter["step"] += 1
        idx, partner, item_no = batch_indices(pool.shape[0], 0, 0, k, batch_size, seed)
        gens = [item_generator(seed, 0, 0, k, int(i)) for i in item_no]
        vb = viewgen(pool[idx.to(dev)], pool[partner.to(dev)], gens)
        z, s = model(vb.images)
        losses = objective(z, s, vb)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return {k2: float(v.detach()) for k2, v in losses.items()}

    step.images_per_call = 5 * batch_size  # type: ignore[attr-defined]
    return step


def run_e2e(settings, batch_size: int = 4, size: int = 128, steps: int = 7, warmup: int = 2) -> tuple[list[dict], str]:
    """Training steps per second with the fused vs the plain-PyTorch losses (same model init, same
    data); ``settings`` is the run's ``cases.Settings`` (device, seed). Returns (rows, how)."""
    device = settings.device
    torch.manual_seed(settings.seed)
    base = LDNet(in_channels=1, emb_dim=32, n_clusters=16)
    steps_fn = {}
    for impl in LOSS_IMPLS:
        model = LDNet(in_channels=1, emb_dim=32, n_clusters=16)
        model.load_state_dict(base.state_dict())
        model.to(device).train()
        torch.manual_seed(settings.seed)  # same data for both
        step = make_training_step(
            model, loss_impl=impl, batch_size=batch_size, size=size, device=device, seed=settings.seed
        )
        steps_fn[impl] = (lambda s: lambda i: s())(step)
    t = measure_group(steps_fn, 1, device, warmup=warmup, repeats=steps, target_sample_s=0.0, max_number=1)
    rows = []
    for impl, tm in t.items():
        row = {c: "" for c in CSV_COLUMNS}
        row.update(
            section="e2e",
            op=f"LD training step (B={batch_size}, {5 * batch_size} images, {size}x{size})",
            mode="step",
            impl=impl,
            device=device.type,
            dtype="float32",
            H=size,
            W=size,
            P=size * size,
            median_ms=tm.median_ms,
            q1_ms=tm.q1_ms,
            q3_ms=tm.q3_ms,
            min_ms=tm.min_ms,
            max_ms=tm.max_ms,
            repeats=tm.repeats,
            calls_per_sample=1,
            input_sets=1,
            status="ok",
            speedup_of_fused=tm.median_ms / t["fused"].median_ms,
        )
        rows.append(row)
    return rows, "ld_ext.bench.end_to_end.make_training_step (LDObjective with loss_impl fused / reference)"
