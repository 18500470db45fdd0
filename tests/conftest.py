"""Shared test helpers: random inputs, tolerance table, hypothesis profile."""
from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ld_ext",
    deadline=None,
    max_examples=int(os.environ.get("LD_EXT_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile("ld_ext")

# Tolerances for comparing against the float64 reference: a fused result in dtype X is accepted
# when its error is at most the error of the same formulation in plain PyTorch in dtype X, plus
# this absolute slack (Liger-Kernel / cut-cross-entropy style).
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rand_inputs(n, d, k, spatial, dtype=torch.float64, assignment="sigmoid", seed=None, device="cpu"):
    """Embeddings (n, d, *spatial) and assignments (n, k, *spatial) suited to the assignment mode."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    z = torch.randn(n, d, *spatial, dtype=torch.float64, generator=g)
    if assignment == "probs":
        s = torch.rand(n, k, *spatial, dtype=torch.float64, generator=g) * 0.98 + 0.01
        s = s / s.sum(dim=1, keepdim=True)
    else:
        s = 2.0 * torch.randn(n, k, *spatial, dtype=torch.float64, generator=g)
    return z.to(device=device, dtype=dtype), s.to(device=device, dtype=dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float = 0.0) -> None:
    """|actual - expected| <= atol + rtol * max|expected| elementwise, with a useful message."""
    scale = expected.double().abs().max().item() if expected.numel() else 0.0
    err = max_err(actual, expected)
    assert err <= atol + rtol * max(scale, 1e-300), f"max abs error {err:.3e} > {atol:.1e} + {rtol:.1e} * {scale:.3e}"

