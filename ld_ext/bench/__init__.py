"""Benchmarks: the fused ops against plain PyTorch (time, memory, scaling), CPU and CUDA.

Entry points: ``ld-ext bench``, ``python -m ld_ext.bench`` and ``python benchmarks/run.py`` (same
arguments). Modules, one concern each: ``specs`` (what is measured: one ``OpSpec`` per op, the
``Case`` sizes), ``timing`` (the timer and the device's floor rates), ``memory`` (the peak-memory
probes), ``cases`` (one spec at one case -> CSV rows; the headline), ``end_to_end`` (LD training
steps, fused vs plain losses), ``baselines`` (the plain-PyTorch loss modules of
``ld_ext.plain_losses``), ``report`` (CSV, markdown, plots), ``cli`` (arguments and the run),
``head3d`` (``--head3d``: the LD head on 3-D embeddings, every case in its own guarded process).
``benchmarks/gpu_figures.py`` and ``benchmarks/gpu_train.py`` use the same timing and memory code. Sections:

* ``headline``: fused forward+backward of
  ``RegionDiscriminationLoss(normalize=True, assignment="sigmoid", return_entropy=True)`` at
  N=16, D=32, K=16, 128x128 (total = 10*L_rd + 0.1*L_ent) against the efficient eager
  formulation (``reference.region_discrimination_loss``) and ``torch.compile`` of it, with the
  floor (bytes / copy bandwidth, FLOPs / matmul rate, both measured in the same run) and the
  peak extra memory of the fused step.
* ``ops``: every fused op, forward and forward+backward, at the base configuration against
  ``published`` (the published code's formulation: the broadcast product e[:, None] * a[:, :, None]
  for region features, exp-then-normalise for the criteria), ``eager`` (the efficient plain-PyTorch
  formulation of ``ld_ext.reference``) and ``compile`` (``torch.compile`` of ``eager``).
* ``sweeps``: the region loss over P (pixels), K, D, N and dtype.
* ``e2e``: training steps per second of the LD network with the fused vs the plain-PyTorch losses
  (``end_to_end.make_training_step``).
* ``--head3d`` (instead of the sections): the region loss and the pixel-cluster similarity on
  (N, D, S, S, S) embeddings at S = 64 and 96, N = 2, 4, 8, K = 16, D = 32, fused vs the published
  broadcast vs eager bmm vs compile, forward+backward time and peak memory (``head3d``).

Method: every implementation gets warm-up calls, then samples are taken round-robin over the
implementations (so load changes on a shared machine hit all of them alike); each sample times
``number`` consecutive calls over rotating input sets (fresh random data, several sets, so that
caches do not flatter), and the median of the samples is reported with its quartiles. CUDA
samples are timed with CUDA events. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
above the memory held before the call; on CPU the running total of the ATen allocation events
recorded by ``torch.profiler.profile(profile_memory=True)`` (every tensor allocation and free on
the CPU allocator, in time order); the headline adds the peak RSS of a subprocess (glibc told to
mmap every block >= 64 KiB, so that freed memory leaves the RSS and the high-water mark tracks
allocations made outside ATen too).
"""

from __future__ import annotations

from .baselines import PlainPatchDiscriminationLoss, PlainRegionDiscriminationLoss
from .cases import RSS_METHOD, Settings, rss_probe, run_case, run_headline
from .cli import SECTIONS, SWEEPS, add_arguments, main, run
from .end_to_end import make_training_step, run_e2e, synthetic_images
from .head3d import Case3D, head3d_markdown, run_case3d, run_head3d
from .memory import CPU_MEM_METHOD, CUDA_MEM_METHOD, cuda_peak_memory, measure_peak_memory
from .report import CSV_COLUMNS, MD_COLUMNS, e2e_markdown, headline_markdown, markdown_table, write_csv
from .specs import BASE, IMPLS, MODES, OPS, Case, OpSpec, make_generator
from .timing import Machine, Timing, copy_bandwidth, matmul_rate, measure_group, time_call, time_once

__all__ = [
    "Case",
    "OpSpec",
    "OPS",
    "IMPLS",
    "MODES",
    "BASE",
    "SECTIONS",
    "SWEEPS",
    "CSV_COLUMNS",
    "MD_COLUMNS",
    "make_generator",
    "Timing",
    "measure_group",
    "time_call",
    "time_once",
    "copy_bandwidth",
    "matmul_rate",
    "Machine",
    "measure_peak_memory",
    "cuda_peak_memory",
    "CPU_MEM_METHOD",
    "CUDA_MEM_METHOD",
    "Settings",
    "run_case",
    "run_headline",
    "rss_probe",
    "RSS_METHOD",
    "make_training_step",
    "synthetic_images",
    "run_e2e",
    "Case3D",
    "run_case3d",
    "run_head3d",
    "head3d_markdown",
    "PlainRegionDiscriminationLoss",
    "PlainPatchDiscriminationLoss",
    "write_csv",
    "markdown_table",
    "headline_markdown",
    "e2e_markdown",
    "add_arguments",
    "run",
    "main",
]
