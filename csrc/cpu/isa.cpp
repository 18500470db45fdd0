// The ISA probe: which instruction set the CPU kernels dispatch to on this machine, reported as
// ld_ext.build_info()["cpu_isa"]. The hot functions of the CPU kernels (LD_CLONES in cpu/common.h)
// are compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline, and the loader picks
// the best clone the CPU supports; this names that level. In its own file so that the CUDA-only
// compile check (.ci/cuda_compile.sh) can build it without the CPU kernels.
#include <string>

#include "../ld_ext.h"

namespace ld_ext {

std::string cpu_isa() {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return "x86-64-v4 (AVX-512)";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "x86-64-v3 (AVX2+FMA)";
  return "x86-64 baseline";
#else
  return "generic";
#endif
}

}  // namespace ld_ext
