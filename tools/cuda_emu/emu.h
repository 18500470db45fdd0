// A small CPU emulation of the CUDA execution model, enough to run ld_ext's kernels (their real
// source, csrc/cuda/*.cu, compiled as C++ with this header included first) on CPU tensors, so that
// indexing, tiling, barriers and the host-side launch plans are exercised on machines without a GPU.
//
// The sources are not rewritten. This header defines LD_EXT_CUDA_EMULATION, which makes
// csrc/cuda/common.cuh skip the CUDA headers and its definitions of the LD_CUDA_* macros, and
// defines those macros here instead: the launch, the dynamic shared memory, the device-tensor
// check and the dispatch key (the kernels register for CPU tensors). It also supplies the subset
// of the CUDA runtime and c10::cuda that the host code calls, and the CUDA keywords.
//
// Model: the blocks of a launch run one after another; the threads of a block are real OS threads
// (blockDim of them, reused across blocks) and __syncthreads() is a blocking barrier, so a missing
// barrier can show up as a wrong or non-reproducible result. Shared memory is one buffer, filled
// with NaN-like bytes at each launch, so reads of shared memory nobody wrote show up too; static
// __shared__ arrays are function statics (one block runs at a time).
// Not emulated: warps, memory-model subtleties, performance. Debug aid only; never shipped.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifndef EMU_SMS
#define EMU_SMS 4
#endif

#define LD_EXT_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)

struct emu_dim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {
// A blocking barrier (threads sleep instead of spinning: a block has hundreds of OS threads).
// arrive_and_drop: the thread leaves, later phases wait for one thread fewer.
class Barrier {
 public:
  explicit Barrier(int n) : expected_(n), count_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(m_);
    const uint64_t phase = phase_;
    if (--count_ == 0) {
      next_phase();
    } else {
      cv_.wait(lock, [&] { return phase_ != phase; });
    }
  }
  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(m_);
    --expected_;
    if (--count_ == 0) next_phase();
  }

 private:
  void next_phase() {
    ++phase_;
    count_ = expected_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_;
  int count_;
  uint64_t phase_ = 0;
};

constexpr size_t kSmemBytes = 232448;  // an sm_90 block's opt-in limit
alignas(16) inline unsigned char g_smem[kSmemBytes];
inline thread_local Barrier* t_bar = nullptr;
inline void sync() { t_bar->arrive_and_wait(); }

struct Cfg {
  unsigned grid;
  unsigned block;
  size_t smem = 0;
};

template <typename F>
auto launch(F f, Cfg cfg) {
  return [=](auto... args) {
    TORCH_CHECK(cfg.smem <= kSmemBytes, "emu: launch asks for more shared memory than a block has");
    std::fill(g_smem, g_smem + kSmemBytes, static_cast<unsigned char>(0xFF));
    std::vector<std::unique_ptr<Barrier>> bars;
    bars.reserve(cfg.grid);
    for (unsigned b = 0; b < cfg.grid; ++b) bars.emplace_back(std::make_unique<Barrier>(static_cast<int>(cfg.block)));
    Barrier block_end(static_cast<int>(cfg.block));
    std::vector<std::thread> threads;
    threads.reserve(cfg.block);
    for (unsigned t = 0; t < cfg.block; ++t) {
      threads.emplace_back([&, t]() {
        threadIdx.x = t;
        blockDim.x = cfg.block;
        gridDim.x = cfg.grid;
        for (unsigned b = 0; b < cfg.grid; ++b) {
          blockIdx.x = b;
          t_bar = bars[b].get();
          f(args...);
          t_bar->arrive_and_drop();  // an exited thread no longer takes part in this block's barriers
          block_end.arrive_and_wait();
        }
      });
    }
    for (auto& th : threads) th.join();
  };
}
}  // namespace emu

#define __syncthreads() emu::sync()
using std::max;
using std::min;

typedef int cudaStream_t;
enum {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaFuncAttributeMaxDynamicSharedMemorySize
};
inline int cudaDeviceGetAttribute(int* v, int what, int) {
  *v = what == cudaDevAttrMultiProcessorCount ? EMU_SMS : static_cast<int>(emu::kSmemBytes);
  return 0;
}
template <typename K>
inline int cudaFuncSetAttribute(K, int, int bytes) {
  TORCH_CHECK(static_cast<size_t>(bytes) <= emu::kSmemBytes, "emu: shared memory request over the limit");
  return 0;
}
template <typename K>
inline int cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* nb, K, int, size_t) {
  *nb = 2;
  return 0;
}
#define C10_CUDA_CHECK(x) (void)(x)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() (void)0

// The macros of csrc/cuda/common.cuh, emulated.
#define LD_CUDA_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::g_smem)
#define LD_CUDA_LAUNCH(kernel, grid, block, smem, stream) \
  emu::launch(kernel, emu::Cfg{static_cast<unsigned>(grid), static_cast<unsigned>(block), static_cast<size_t>(smem)})
#define LD_CUDA_IS_DEVICE_TENSOR(t) ((t).is_cpu())
#define LD_CUDA_DISPATCH_KEY CPU

namespace c10 {
namespace cuda {
struct CUDAGuard {
  template <typename T>
  explicit CUDAGuard(T) {}
};
struct EmuStream {
  int stream() const { return 0; }
};
inline EmuStream getCurrentCUDAStream(int = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
