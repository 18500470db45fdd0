"""Build ld_ext._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found
(no GPU needs to be visible: a build on a machine without one works on a GPU later).

Environment knobs:
  LD_EXT_FORCE_CUDA=1   fail unless the CUDA kernels can be compiled (a CUDA build of torch and nvcc;
                        CI's compile check on a CPU machine sets it)
  LD_EXT_NO_CUDA=1      never compile the CUDA sources
  TORCH_CUDA_ARCH_LIST  CUDA architectures (default: those of the visible GPUs; without a visible GPU
                        "7.5;8.0;9.0+PTX": Turing, Ampere/Ada (sm_80 code runs on 8.6/8.9), Hopper,
                        and PTX that newer GPUs compile when the module loads)
  LD_EXT_DEBUG=1        -O0 -g builds
  LD_EXT_PTXAS_VERBOSE=1  print ptxas' per-kernel resource report (registers, shared memory, spills)
"""
import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"


def _cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' architectures; else DEFAULT_CUDA_ARCHS."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    caps = []
    try:
        if torch.cuda.is_available():
            caps = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except Exception:  # a broken driver: build for the default list
        caps = []
    archs = ";".join(caps) if caps else DEFAULT_CUDA_ARCHS
    why = "the visible GPU(s)" if caps else "no GPU visible; TORCH_CUDA_ARCH_LIST overrides"
    print(f"ld_ext setup: CUDA architectures {archs} ({why})")
    return archs


def _is_toolkit(home) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _cuda_home():
    """torch's CUDA_HOME (CUDA_HOME / CUDA_PATH, else the directory above the first nvcc on PATH) when
    it is a toolkit, else /usr/local/cuda (the guess is wrong when that nvcc is a wrapper script)."""
    guess = cpp_extension.CUDA_HOME
    if _is_toolkit(guess):
        return os.path.realpath(guess)
    if _is_toolkit("/usr/local/cuda"):
        print(f"ld_ext setup: {guess} has no include/cuda_runtime.h; using the CUDA toolkit in /usr/local/cuda")
        return os.path.realpath("/usr/local/cuda")
    return None


def _want_cuda() -> bool:
    if os.environ.get("LD_EXT_NO_CUDA", "0") == "1":
        return False
    missing = []
    home = None
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is not a CUDA build")
    else:
        home = _cuda_home()
        if home is None:
            missing.append(f"no CUDA toolkit found (torch's guess: {cpp_extension.CUDA_HOME}); set CUDA_HOME")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        missing.append("no csrc/cuda/*.cu sources")
    if missing and os.environ.get("LD_EXT_FORCE_CUDA", "0") == "1":
        raise RuntimeError("LD_EXT_FORCE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    if missing:
        return False
    cpp_extension.CUDA_HOME = home  # what BuildExtension and CUDAExtension use for nvcc and libcudart
    return True


def _extension():
    debug = os.environ.get("LD_EXT_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline in ATen's OpenMP backend headers; without the flag its
    # `#pragma omp parallel` is ignored and every kernel runs on one thread.
    cxx = opt + ["-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    use_cuda = _want_cuda()
    if use_cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_arch_list()
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        # No fast-math: the kernels must match the float64 reference within the dtype's rounding.
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("LD_EXT_PTXAS_VERBOSE", "0") == "1":
            nvcc += ["-Xptxas", "-v"]
        # The CUDA sources include only c10/cuda headers (not ATen/cuda/CUDAContext.h), so a bare
        # CUDA toolkit without cuBLAS/cuSPARSE headers is enough to build them.
        return CUDAExtension(
            "ld_ext._C",
            sources,
            define_macros=[("LD_EXT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("ld_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)})
