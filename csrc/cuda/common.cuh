// Shared helpers of the CUDA kernels: math overloads for the accumulation type, deterministic
// block reductions, shared-memory plans, and the host side that every op shares (input device
// checks, device guard and stream, shared-memory opt-in, grid sizing, the kernel launch itself).
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which pulls in cuBLAS headers that a
// bare CUDA toolkit may not ship).
//
// The CPU emulator (tools/cuda_emu) compiles these sources as plain C++ with its header emu.h
// included first. The CUDA constructs it must replace are written only through the macros below,
// which emu.h defines its own way (it also defines LD_EXT_CUDA_EMULATION, which skips this block);
// kernels and host code use these macros and the helpers at the end of this file, never the
// constructs themselves:
//   LD_CUDA_DYNAMIC_SMEM(T, name)  declares `T* name`, the block's dynamic shared memory
//   LD_CUDA_LAUNCH(kernel, grid, block, smem, stream)  `kernel<<<grid, block, smem, stream>>>`;
//                                  used by launch() only
//   LD_CUDA_IS_DEVICE_TENSOR(t)    whether t is on the kernels' device (`t.is_cuda()`)
//   LD_CUDA_DISPATCH_KEY           the dispatch key the kernels are registered for (`CUDA`)
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#ifndef LD_EXT_CUDA_EMULATION
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#define LD_CUDA_DYNAMIC_SMEM(T, name)                                   \
  extern __shared__ __align__(16) unsigned char ld_cuda_dynamic_smem[]; \
  T* name = reinterpret_cast<T*>(ld_cuda_dynamic_smem)
#define LD_CUDA_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define LD_CUDA_IS_DEVICE_TENSOR(t) ((t).is_cuda())
#define LD_CUDA_DISPATCH_KEY CUDA
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>

#include "../checks.h"
#include "../ld_ext.h"

namespace ld_ext {
namespace cuda {

// Threads per block of every kernel: a power of two (the block reductions rely on it).
constexpr int kThreads = 256;
constexpr int kSmallThreads = 128;
// Pixels per shared-memory tile, at most.
constexpr int kMaxTilePixels = 128;
// Dynamic shared memory a block may use without opting in.
constexpr size_t kDefaultSmem = 48 * 1024;

// ------------------------------------------------------------------ math on the accumulation type

__device__ __forceinline__ float dev_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double dev_sqrt(double x) { return sqrt(x); }
__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }
__device__ __forceinline__ float dev_log2(float x) { return log2f(x); }
__device__ __forceinline__ double dev_log2(double x) { return log2(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float dev_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dev_max(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float dev_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double dev_abs(double x) { return fabs(x); }
// x > the largest finite value: +inf (a sum of squares that overflowed); false for NaN.
__device__ __forceinline__ bool dev_overflows(float x) { return x > 3.402823466e+38f; }
__device__ __forceinline__ bool dev_overflows(double x) { return x > 1.7976931348623157e+308; }

// Euclidean norm of v[0], v[stride], ..., v[(n - 1) stride]. The plain sum of squares; where it
// overflows (a value beyond about 1.8e19 in float), it is recomputed with every value divided by
// the largest magnitude first, so that large vectors keep a finite norm and their direction.
template <typename acc_t>
__device__ __forceinline__ acc_t dev_norm(const acc_t* v, int n, int stride) {
  acc_t sq = 0;
#pragma unroll 4
  for (int d = 0; d < n; ++d) {
    const acc_t x = v[d * stride];
    sq += x * x;
  }
  if (!dev_overflows(sq)) return dev_sqrt(sq);
  acc_t amax = 0;
  for (int d = 0; d < n; ++d) amax = dev_max(amax, dev_abs(v[d * stride]));
  if (dev_overflows(amax)) return amax;  // an infinite value: the norm is infinite
  acc_t s = 0;
  for (int d = 0; d < n; ++d) {
    const acc_t x = v[d * stride] / amax;
    s += x * x;
  }
  return amax * dev_sqrt(s);
}

template <typename acc_t>
__device__ __forceinline__ acc_t dev_sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + dev_exp(-x));
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -INFINITY;
}

// ------------------------------------------------------------------ deterministic block reductions
// Fixed tree over the threads of the block (blockDim.x a power of two); every thread gets the
// result. `buf` holds blockDim.x elements; the function ends with a barrier so `buf` may be reused.

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return dev_max(a, b); }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

template <typename T, typename Op>
__device__ T block_reduce(T v, T* buf, Op op) {
  const int t = threadIdx.x;
  buf[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) buf[t] = op(buf[t], buf[t + s]);
    __syncthreads();
  }
  const T r = buf[0];
  __syncthreads();
  return r;
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* buf) {
  return block_reduce(v, buf, SumOp{});
}

template <typename acc_t>
__device__ acc_t block_max(acc_t v, acc_t* buf) {
  return block_reduce(v, buf, MaxOp{});
}

template <typename T>
__device__ T block_min(T v, T* buf) {
  return block_reduce(v, buf, MinOp{});
}

// out[b * L + i] = sum_{t < T} part[(b * T + t) * L + i], summed in order t = 0, 1, ... (so the
// result does not depend on scheduling). One thread per output element.
template <typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t B,
                                       int64_t T, int64_t L) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * L) return;
  const int64_t b = idx / L;
  const int64_t i = idx - b * L;
  const acc_t* p = part + b * T * L + i;
  acc_t s = 0;
  for (int64_t t = 0; t < T; ++t) s += p[t * L];
  out[idx] = s;
}

// Sum of v[0..n) in one block in a fixed order, times `scale`, written to *out (as out_t).
template <typename acc_t, typename out_t>
__global__ void sum_scalar_kernel(const acc_t* __restrict__ v, int64_t n, acc_t scale, out_t* __restrict__ out) {
  __shared__ acc_t buf[kThreads];
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += v[i];
  s = block_sum(s, buf);
  if (threadIdx.x == 0) *out = static_cast<out_t>(s * scale);
}

// ------------------------------------------------------------------ host helpers

inline int sm_count(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  return v > 0 ? v : 1;
}

inline size_t smem_optin_limit(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(std::max(v, 0));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared-memory plan of a tiled kernel: `fixed` elements plus `per_pixel` elements per tile pixel
// (elements of `elem` bytes). Picks the largest tile (<= kMaxTilePixels) that fits in 48 KiB, or,
// when fewer than 32 pixels would fit there, in the device's opt-in limit. Fails with a clear
// message when not even one pixel fits.
struct TilePlan {
  int pixels;
  size_t bytes;
};

inline TilePlan plan_tile(int64_t fixed, int64_t per_pixel, size_t elem, int device, const char* op,
                          const char* what) {
  auto fit = [&](size_t budget) -> int64_t {
    const int64_t avail = static_cast<int64_t>(budget / elem) - fixed;
    if (avail <= 0) return 0;
    return std::min<int64_t>(kMaxTilePixels, avail / per_pixel);
  };
  int64_t cp = fit(kDefaultSmem);
  if (cp < 32) {
    const int64_t cp_optin = fit(smem_optin_limit(device));
    cp = std::max(cp, cp_optin);
  }
  TORCH_CHECK(cp >= 1, op, ": ", what, " is too large for the CUDA kernel's shared memory on this device");
  return TilePlan{static_cast<int>(cp), static_cast<size_t>(fixed + cp * per_pixel) * elem};
}

// Shared-memory strides: rows of D (or K) values are padded by one so that the loads by pixel
// (stride D+1) and the reads by channel (stride 1) are both free of bank conflicts.
// Index arithmetic inside a tile is 32-bit (a tile fits in shared memory); offsets into the
// global tensors are 64-bit.
struct Tile {
  int cp;  // pixels per chunk
  int D;
  int K;
  int ds;  // D + 1
  int ks;  // K + 1
};

inline Tile make_tile(int cp, int64_t D, int64_t K) {
  return Tile{cp, static_cast<int>(D), static_cast<int>(K), static_cast<int>(D + 1), static_cast<int>(K + 1)};
}

// Softmax statistics of one row of K logits x[0..K): *mx = max_k x, *su = sum_k exp(x - max).
template <typename acc_t>
__device__ __forceinline__ void softmax_stats(const acc_t* x, int K, acc_t* mx, acc_t* su) {
  acc_t m = neg_inf<acc_t>();
  for (int k = 0; k < K; ++k) m = dev_max(m, x[k]);
  acc_t s = 0;
  for (int k = 0; k < K; ++k) s += dev_exp(x[k] - m);
  *mx = m;
  *su = s;
}

// Writes the embedding gradient of one chunk, ge_n[d * P + p0 + j] for j < np, from the gradient
// GE with respect to the (normalised) tile E: with normalize, e = z / (m + eps) and
// dL/dz = (g_e - e (e . g_e) (m + eps) / m) / (m + eps), DE[j] = e_j . g_e,j, M[j] = m (the
// projection term is 0 when m == 0). Used by every kernel that reads z through a tile.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_grad_emb(scalar_t* __restrict__ ge_n, int64_t P, int64_t p0, int np,
                                               const Tile& tl, bool normalize, const acc_t* GE, const acc_t* E,
                                               const acc_t* M, const acc_t* DE) {
  const int cp = tl.cp;
  const acc_t eps = static_cast<acc_t>(kNormEps);
  for (int i = threadIdx.x; i < tl.D * cp; i += blockDim.x) {
    const int d = i / cp;
    const int j = i - d * cp;
    if (j >= np) continue;
    acc_t v = GE[j * tl.ds + d];
    if (normalize) {
      const acc_t m = M[j];
      const acc_t den = m + eps;
      if (m > acc_t(0)) v -= E[j * tl.ds + d] * DE[j] * den / m;
      v = v / den;
    }
    ge_n[d * P + p0 + j] = static_cast<scalar_t>(v);
  }
}

// Four accumulation-type values read or written together from shared memory (one 16-byte access
// for float, two for double). Callers keep the address a multiple of 4 elements: every row stride
// and array offset of the register-blocked kernels' shared memory is.
template <typename T>
struct alignas(16) Vec4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Vec4<T> ld4(const T* p) {
  return *reinterpret_cast<const Vec4<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void st4(T* p, const Vec4<T>& x) {
  *reinterpret_cast<Vec4<T>*>(p) = x;
}

// Tile geometry of the register-blocked kernels: cp pixels per chunk (a power of two, 4..128),
// channel rows of cs = cp + 4 elements (so that consecutive rows start 16 bytes apart modulo 128
// and the 16-byte reads of a warp along the rows hit distinct banks), D and K padded to multiples
// of 4 (DP, KP; the padding rows are zeros) and split into DQ = DP/4, KQ = KP/4 row classes: a
// thread's 4x4 register block holds rows {q, q + DQ, q + 2 DQ, q + 3 DQ}.
struct RBTile {
  int cp;
  int lcp;  // log2(cp)
  int cs;
  int D, K, DP, KP, DQ, KQ;
};

inline RBTile make_rb_tile(int cp, int64_t D, int64_t K) {
  int lcp = 0;
  while ((1 << lcp) < cp) ++lcp;
  const int DP = static_cast<int>((D + 3) / 4 * 4), KP = static_cast<int>((K + 3) / 4 * 4);
  return RBTile{cp, lcp, cp + 4, static_cast<int>(D), static_cast<int>(K), DP, KP, DP / 4, KP / 4};
}

// Norm of pixel column j of a channels-as-rows tile Z (rows d < D, stride cs): *m = ||z_j||;
// returns 1 / (||z_j|| + eps).
template <typename acc_t>
__device__ __forceinline__ acc_t column_inv_norm(const acc_t* Z, int j, const RBTile& tl, acc_t* m) {
  *m = dev_norm(Z + j, tl.D, tl.cs);
  return acc_t(1) / (*m + static_cast<acc_t>(kNormEps));
}

// Hides a value from the optimiser (no code): it cannot hoist or precompute what depends on it.
template <typename T>
__device__ __forceinline__ void opaque(T*& p) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+l"(p));
#endif
}
__device__ __forceinline__ void opaque(int& x) {
#ifdef __CUDA_ARCH__
  asm volatile("" : "+r"(x));
#endif
}

// Register staging of one chunk, for software pipelining: the global reads of the next chunk are
// issued into registers before the current chunk's work and written to shared memory after it, so
// their latency overlaps that work (and all NPF reads of a thread are in flight together).
// A thread holds elements i = threadIdx.x + r * kThreads (r < NPF) of the (rows0 + rows1) x cp
// tile whose rows [0, rows0) are rows of src0 (0 where row >= n0) and rows [rows0, rows0 + rows1)
// rows of src1 (0 where row - rows0 >= n1); pixels >= np are 0. Kernels using it run kThreads
// threads, and their plans keep (rows0 + rows1) * cp <= NPF * kThreads (stage_fits). Raw values
// stay in the input type until `store` converts them, so no conversion waits on a read in flight.
template <typename scalar_t, int NPF>
struct StagedChunk {
  scalar_t v[NPF];

  // Blocks have kThreads threads and cp <= kThreads divides kThreads, so a thread's pixel
  // j = tid % cp is the same for all its elements and its rows are tid / cp + r * (kThreads / cp).
  __device__ __forceinline__ void load(const scalar_t* __restrict__ src0, int n0, int rows0,
                                       const scalar_t* __restrict__ src1, int n1, int rows1, int64_t P, int64_t p0,
                                       int np, const RBTile& tl) {
    const int j = static_cast<int>(threadIdx.x) & (tl.cp - 1);
    const int row0 = static_cast<int>(threadIdx.x) >> tl.lcp;
    const int rstep = kThreads >> tl.lcp;
    const bool in = j < np;
    // One running pointer (rows rstep apart), switched to src1 at its first row, rather than an
    // offset per element, which the compiler would hoist out of the chunk loop into registers.
    const int64_t step = static_cast<int64_t>(rstep) * P;
    const scalar_t* q = src0 + row0 * P + p0 + j;
    bool second = false;
    int row = row0;
#pragma unroll
    for (int r = 0; r < NPF; ++r) {
      if (!second && row >= rows0) {
        second = true;
        q = src1 + (row - rows0) * P + p0 + j;
      }
      scalar_t x{};
      if (in && (second ? row - rows0 < n1 : row < n0)) x = *q;
      v[r] = x;
      q += step;
      row += rstep;
      // Opaque to the optimiser, so that it steps the pointer and row instead of keeping an offset
      // and a predicate per element live across the chunk loop (which cost ~100 registers).
      opaque(q);
      opaque(row);
    }
  }

  // load() of chunk c: pixels [c * cp, min((c + 1) * cp, P)).
  __device__ __forceinline__ void load_chunk(int64_t c, const scalar_t* __restrict__ src0, int n0, int rows0,
                                             const scalar_t* __restrict__ src1, int n1, int rows1, int64_t P,
                                             const RBTile& tl) {
    const int64_t q0 = c * tl.cp;
    load(src0, n0, rows0, src1, n1, rows1, P, q0, static_cast<int>(min(static_cast<int64_t>(tl.cp), P - q0)), tl);
  }

  // X0[row * cs + j] for rows < rows0 and X1[(row - rows0) * cs + j] for the others, as acc_t. With
  // mode == kSigmoid the src1 rows become sigmoid(s) + kAssignEps, and sigmoid(s) goes to SG (same
  // layout as X1) when SG is given; padding rows and pixels stay 0 in both.
  template <typename acc_t>
  __device__ __forceinline__ void store(acc_t* X0, int rows0, acc_t* X1, int n1, int rows1, int np, const RBTile& tl,
                                        int mode, acc_t* SG) const {
    const int j = static_cast<int>(threadIdx.x) & (tl.cp - 1);
    const int row0 = static_cast<int>(threadIdx.x) >> tl.lcp;
    const int rstep = kThreads >> tl.lcp;
    const int rows = rows0 + rows1;
#pragma unroll
    for (int r = 0; r < NPF; ++r) {
      const int row = row0 + r * rstep;
      if (row < rows) {
        acc_t x = static_cast<acc_t>(v[r]);
        if (row < rows0) {
          X0[row * tl.cs + j] = x;
        } else {
          const int k = row - rows0;
          if (mode == kSigmoid) {
            acc_t sg = 0;
            if (k < n1 && j < np) {
              sg = dev_sigmoid(x);
              x = sg + static_cast<acc_t>(kAssignEps);
            }
            if (SG != nullptr) SG[k * tl.cs + j] = sg;
          }
          X1[k * tl.cs + j] = x;
        }
      }
    }
  }
};

// The chunk loop of the register-blocked kernels: block t of T takes chunks t, t + T, ... <
// nchunks of cp pixels. issue(c) stages chunk c's reads (StagedChunk::load_chunk), store(np) writes
// the staged chunk to shared memory, work(p0, np) consumes it. With prefetch the next chunk's reads
// are issued right after the store, so they are in flight during work(); without, each chunk's
// reads are issued just before its store.
template <bool prefetch, typename Issue, typename Store, typename Work>
__device__ __forceinline__ void staged_chunk_loop(int64_t t, int64_t T, int64_t nchunks, int cp, int64_t P,
                                                  Issue&& issue, Store&& store, Work&& work) {
  if (prefetch && t < nchunks) issue(t);
  for (int64_t ch = t; ch < nchunks; ch += T) {
    const int64_t p0 = ch * cp;
    const int np = static_cast<int>(min(static_cast<int64_t>(cp), P - p0));
    if (!prefetch) issue(ch);
    __syncthreads();  // the previous chunk is fully consumed
    store(np);
    __syncthreads();
    if (prefetch && ch + T < nchunks) issue(ch + T);
    work(p0, np);
  }
}

// Whether a chunk of cp pixels of `rows` staged rows fits the NPF registers per thread.
inline bool stage_fits(int64_t rows, int cp, int npf) { return rows * cp <= static_cast<int64_t>(npf) * kThreads; }

// Environment switch of the register-blocked kernels' software pipelining (a benchmark knob:
// LD_EXT_CUDA_RB_PREFETCH=0 reads each chunk just before its use instead of one chunk ahead).
inline bool env_prefetch() {
  const char* v = std::getenv("LD_EXT_CUDA_RB_PREFETCH");
  return v == nullptr || *v == '\0' || std::atoi(v) != 0;
}

// 4x4 register blocks of the register-blocked kernels.
//
// product44_store: dst rows r (r * rstep elements apart), 4 columns = sum_{i < n} X[i][r] Y[i][c],
// with X[i] = ld4(X + i * xs) (4 rows' values at inner index i) and Y[i] = ld4(Y + i * ys)
// (4 pixels' values), accumulated in i order.
template <typename T>
__device__ __forceinline__ void product44_store(const T* X, int xs, const T* Y, int ys, int n, T* dst, int rstep) {
  T acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] = 0;
  for (int i = 0; i < n; ++i) {
    const Vec4<T> x = ld4(X + i * xs);
    const Vec4<T> y = ld4(Y + i * ys);
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] += x.v[r] * y.v[c];
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) st4(dst + r * rstep, Vec4<T>{{acc[r][0], acc[r][1], acc[r][2], acc[r][3]}});
}

// acc[r][c] += sum_{x < 4} A[r * as + x] B[c * bs + x]: one pixel quad of a sum over pixels, with
// A and B pointing at the quad in the first of their 4 rows (as, bs: element distance of rows).
template <typename T>
__device__ __forceinline__ void accumulate_quad44(T (&acc)[4][4], const T* A, int as, const T* B, int bs) {
  Vec4<T> a[4], b[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    a[r] = ld4(A + r * as);
    b[r] = ld4(B + r * bs);
  }
#pragma unroll
  for (int x = 0; x < 4; ++x)
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] += a[r].v[x] * b[c].v[x];
}

// End of a block's sum over pixels: thread tid holds block ob = tid % nob (rows kb + KQ r,
// columns db + DQ c; kb = ob / DQ, db = ob % DQ) of pixel group g = tid / nob < groups. Adds the
// groups in order 0, 1, ... through RED (groups * nob * 16 elements of shared memory) and writes
// out[k * D + d] for k < K, d < D. Every thread of the block must call it (it has a barrier).
template <typename T>
__device__ __forceinline__ void reduce_groups44(const T (&acc)[4][4], T* RED, const RBTile& tl, int groups,
                                                T* __restrict__ out) {
  const int nob = tl.KQ * tl.DQ;
  const int tid = threadIdx.x;
  const int ob = tid % nob, g = tid / nob;
  if (g < groups) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) RED[(g * nob + ob) * 16 + r * 4 + c] = acc[r][c];
  }
  __syncthreads();
  for (int o = tid; o < nob * 16; o += blockDim.x) {
    T s = 0;
    for (int gg = 0; gg < groups; ++gg) s += RED[gg * nob * 16 + o];
    const int obo = o / 16, rc = o - obo * 16;
    const int k = obo / tl.DQ + tl.KQ * (rc / 4);
    const int d = obo % tl.DQ + tl.DQ * (rc % 4);
    if (k < tl.K && d < tl.D) out[k * tl.D + d] = s;
  }
}

// Plan of a register-blocked kernel: its tile, the offset of the arrays that follow the region
// shared with the final reduction (region0, in elements) and its shared-memory bytes.
// tile.cp == 0 means the fast path does not apply and the general kernels run.
struct RBPlan {
  RBTile tile;
  int region0;
  size_t bytes;
};

inline RBPlan rb_none() { return RBPlan{RBTile{0, 0, 0, 0, 0, 0, 0, 0, 0}, 0, 0}; }

// Cap on the register-blocked kernels' chunk from an environment variable (a tuning knob for
// benchmarks: LD_EXT_CUDA_RB_FWD_CP / LD_EXT_CUDA_RB_BWD_CP; 0 forces the general kernels).
inline int env_cap(const char* name, int dflt) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return dflt;
  return std::max(0, std::min(128, std::atoi(v)));
}

// The chunk search shared by the register-blocked kernels' plans: the largest cp in max_cp,
// max_cp / 2, ... >= 4 whose shared memory fits the default budget (else, the same search again
// within the opt-in limit) and whose `staged_rows` rows fit the NPF staging registers per thread.
// smem(cp) returns {region0, bytes} of that chunk. rb_none() when no chunk fits.
template <typename Smem>
RBPlan rb_search(int64_t D, int64_t K, int max_cp, int64_t staged_rows, int npf, int device, Smem smem) {
  if (max_cp < 4) return rb_none();
  for (size_t budget : {kDefaultSmem, smem_optin_limit(device)}) {
    for (int cp = max_cp; cp >= 4; cp /= 2) {
      const std::pair<int64_t, size_t> rs = smem(cp);
      if (rs.second <= budget && stage_fits(staged_rows, cp, npf)) {
        return RBPlan{make_rb_tile(cp, D, K), static_cast<int>(rs.first), rs.second};
      }
    }
  }
  return rb_none();
}

inline at::ScalarType out_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// ------------------------------------------------------------------ host side of every op

// An op's tensor inputs must be CUDA tensors (the argument checks of checks.h, which every kernel
// runs first, do not look at the device).
inline void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(LD_CUDA_IS_DEVICE_TENSOR(t), op, ": ", name, " must be a CUDA tensor");
}

// Where an op's kernels run: the device of the given tensor (made current while this lives) and
// that device's current stream. Every op makes one before it allocates or launches anything.
struct OpDevice {
  explicit OpDevice(const at::Tensor& t)
      : guard(t.device()), device(t.get_device()), stream(c10::cuda::getCurrentCUDAStream(device).stream()) {}
  c10::cuda::CUDAGuard guard;
  int device;
  cudaStream_t stream;
};

// Makes launch()'s kernel arguments take the kernel's parameter types (converted at the call, as
// at a `<<<...>>>` launch) instead of being deduced.
template <typename T>
struct NoDeduce {
  using type = T;
};

// Every kernel launch of ld_ext: `blocks` blocks of `threads` threads with `smem` bytes of dynamic
// shared memory on `stream`, then the launch-error check. A kernel with more than kDefaultSmem
// bytes must have opted in first (require_smem or wave_tiles).
template <typename... Params>
inline void launch(void (*kernel)(Params...), int64_t blocks, int threads, size_t smem, cudaStream_t stream,
                   typename NoDeduce<Params>::type... args) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), "ld_ext: a CUDA grid of ", blocks,
              " blocks (1 to 2^31 - 1 allowed)");
  LD_CUDA_LAUNCH(kernel, static_cast<unsigned>(blocks), threads, smem, stream)(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Raise a kernel's dynamic shared-memory limit when it needs more than the default.
template <typename Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// For a kernel whose shared memory follows from the shapes (no tile to shrink): fails with
// "<op>: <what> is too large for the CUDA kernel's shared memory" beyond the device's opt-in
// limit, else opts in.
template <typename Kernel>
inline void require_smem(Kernel kernel, size_t bytes, int device, const char* op, const char* what) {
  TORCH_CHECK(bytes <= smem_optin_limit(device), op, ": ", what, " is too large for the CUDA kernel's shared memory");
  allow_smem(kernel, bytes);
}

// Resident blocks of `kernel` per multiprocessor at this block size and shared memory (after
// allow_smem). Used to size grids to whole waves.
template <typename Kernel>
inline int blocks_per_sm(Kernel kernel, int threads, size_t smem) {
  int nb = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, threads, smem));
  return std::max(nb, 1);
}

// Tiles (blocks) per image so that all N * T blocks are resident at once (one full wave, no tail):
// T = floor(per_sm * SMs / N), at least 1, at most the number of chunks. Depends only on the
// shapes, the kernel and the device, so results are bitwise reproducible on a given GPU model.
inline int64_t tiles_per_image(int64_t N, int64_t nchunks, int device, int per_sm) {
  const int64_t target = static_cast<int64_t>(per_sm) * sm_count(device);
  const int64_t T = std::max<int64_t>(1, target / N);
  return std::min(T, nchunks);
}

// The grid of a tiled kernel (kThreads threads and `smem` bytes per block, N images of `nchunks`
// chunks each): opts in to the shared memory and returns T, the tiles per image (the launch has
// N * T blocks).
template <typename Kernel>
inline int64_t wave_tiles(Kernel kernel, size_t smem, int64_t N, int64_t nchunks, int device) {
  allow_smem(kernel, smem);
  return tiles_per_image(N, nchunks, device, blocks_per_sm(kernel, kThreads, smem));
}

// out[b * L + i] = sum_t part[(b * T + t) * L + i] for b < B, i < L (reduce_partials_kernel).
template <typename acc_t>
inline void launch_reduce_partials(const acc_t* part, acc_t* out, int64_t B, int64_t T, int64_t L,
                                   cudaStream_t stream) {
  launch(reduce_partials_kernel<acc_t>, ceil_div(B * L, kThreads), kThreads, 0, stream, part, out, B, T, L);
}

// *out = scale * (v[0] + ... + v[n - 1]), summed by one block in a fixed order (sum_scalar_kernel).
template <typename acc_t>
inline void launch_sum_scalar(const acc_t* v, int64_t n, acc_t scale, acc_t* out, cudaStream_t stream) {
  launch(sum_scalar_kernel<acc_t, acc_t>, 1, kThreads, 0, stream, v, n, scale, out);
}

}  // namespace cuda
}  // namespace ld_ext
