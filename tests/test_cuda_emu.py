"""The CUDA emulator's source check (tools/cuda_emu/run_emulated.py: check_sources).

The emulator compiles csrc/cuda as it is, with emu.h redefining the LD_CUDA_* macros of
csrc/cuda/common.cuh; a CUDA construct written outside those macros would not be replaced. The
check must accept the sources as they are and name file and line of each such construct. (The
emulated run itself, which compiles the kernels, is CI's step in .ci/cuda_compile.sh.)
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.path.join(ROOT, "csrc", "cuda")


@pytest.fixture(scope="module")
def emu():
    path = os.path.join(ROOT, "tools", "cuda_emu", "run_emulated.py")
    spec = importlib.util.spec_from_file_location("run_emulated", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def sources(tmp_path):
    for name in os.listdir(CUDA):
        if name.endswith((".cu", ".cuh")):
            shutil.copy(os.path.join(CUDA, name), tmp_path / name)
    return tmp_path


def _edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def test_sources_as_they_are_pass(emu):
    names = sorted(os.path.basename(p) for p in emu.check_sources())
    assert names == sorted(n for n in os.listdir(CUDA) if n.endswith((".cu", ".cuh")))
    for op in emu.REGISTRY.NAMES:  # ld_ext/ops/registry.py
        assert f"{op}.cu" in names


def test_raw_launch_is_named(emu, sources):
    _edit(sources / "region_discrimination.cu",
          "launch_sum_scalar<acc_t>(rows.data_ptr<acc_t>(), N * K, scale, loss.data_ptr<acc_t>(), dev.stream);",
          "sum_scalar_kernel<acc_t, acc_t><<<1, kThreads, 0, dev.stream>>>(rows.data_ptr<acc_t>(), N * K, scale,\n"
          "                                                                 loss.data_ptr<acc_t>());")
    with pytest.raises(SystemExit, match=r"region_discrimination\.cu:\d+: a kernel launch with <<<"):
        emu.check_sources(str(sources))


def test_raw_dynamic_shared_memory_and_device_check_are_named(emu, sources):
    _edit(sources / "patch_discrimination.cu", "LD_CUDA_DYNAMIC_SMEM(acc_t, buf);",
          "extern __shared__ __align__(16) unsigned char raw[]; acc_t* buf = reinterpret_cast<acc_t*>(raw);")
    _edit(sources / "pixel_cluster_similarity.cu", 'check_cuda_tensor(e, op, "embeddings");',
          'TORCH_CHECK(e.is_cuda(), op, ": embeddings must be a CUDA tensor");')
    with pytest.raises(SystemExit) as info:
        emu.check_sources(str(sources))
    msg = str(info.value)
    assert "patch_discrimination.cu" in msg and "extern __shared__" in msg
    assert "pixel_cluster_similarity.cu" in msg and "is_cuda()" in msg


def test_registration_for_the_cuda_key_is_named(emu, sources):
    _edit(sources / "region_features.cu", "TORCH_LIBRARY_IMPL(ld_ext, LD_CUDA_DISPATCH_KEY, m)",
          "TORCH_LIBRARY_IMPL(ld_ext, CUDA, m)")
    with pytest.raises(SystemExit, match=r"region_features\.cu:\d+: TORCH_LIBRARY_IMPL\(ld_ext, CUDA, m\)"):
        emu.check_sources(str(sources))


def test_common_cuh_without_the_emulation_block_is_an_error(emu, sources):
    _edit(sources / "common.cuh", "#ifndef LD_EXT_CUDA_EMULATION", "#if 1")
    with pytest.raises(SystemExit, match="no '#ifndef LD_EXT_CUDA_EMULATION' block"):
        emu.check_sources(str(sources))


def test_comments_do_not_count(emu, sources):
    _edit(sources / "region_discrimination.cu", "#include \"common.cuh\"",
          "#include \"common.cuh\"\n// kernel<<<grid, block>>>(...) and extern __shared__ in a comment are fine")
    emu.check_sources(str(sources))
