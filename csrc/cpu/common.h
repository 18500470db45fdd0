// Shared pieces of the CPU kernels: run-time ISA dispatch, vectorisable math, tiling.
//
// Hot loops are written as plain loops over a fixed number of lanes so that the compiler
// vectorises them; the functions that contain them are compiled three times (AVX-512, AVX2+FMA,
// baseline) with GCC's target_clones and the best one is picked at load time. The summation order
// never depends on the clone or on the number of threads, so a given machine always produces
// bitwise the same result.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../ld_ext.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(LD_EXT_NO_CLONES)
#define LD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LD_CLONES
#endif

#if defined(__GNUC__)
#define LD_INLINE inline __attribute__((always_inline))
#else
#define LD_INLINE inline
#endif

namespace ld_ext {
namespace cpu {

// Pixels per tile: the unit of work that lives in L1/L2 (multiple of every lane count).
constexpr int64_t kTile = 256;
// Pixels per reduction chunk: partial sums are kept per (image, chunk) and added in chunk order,
// so results do not depend on the thread count.
constexpr int64_t kChunk = 8192;

template <typename T>
struct Lanes {
  static constexpr int value = 64 / sizeof(T);  // one 512-bit register
};

// ----------------------------------------------------------------------------- math
// exp/log2 for float: Cephes-style range reduction + polynomial (about 1 ulp), branch-free so the
// loops around them vectorise. NaN propagates. double uses the C library.

LD_INLINE float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}
LD_INLINE int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof i);
  return i;
}

LD_INLINE float fast_exp(float x) {
  // exp(x) for x clamped to [-87, 88] (results below e^-87 ~ 1.6e-38 are flushed up to it, which
  // is below every epsilon used by LD).
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: round-to-nearest without a rounding instruction
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t e = static_cast<int32_t>(n) + 127;
  return y * bits_to_float(e << 23);
}

LD_INLINE float fast_log2(float x) {
  // log2(x) for normal x > 0; 0 -> -inf, negative/NaN -> NaN, +inf -> +inf.
  int32_t bits = float_to_bits(x);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  float m = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // [1, 2)
  const bool big = (bits & 0x007fffff) > 0x003504f3;  // m > sqrt(2), decided on the bits
  m = big ? m * 0.5f : m;
  float ef = static_cast<float>(e) + (big ? 1.0f : 0.0f);
  float z = m - 1.0f;
  float z2 = z * z;
  float y = 7.0376836292e-2f;
  y = y * z - 1.1514610310e-1f;
  y = y * z + 1.1676998740e-1f;
  y = y * z - 1.2420140846e-1f;
  y = y * z + 1.4249322787e-1f;
  y = y * z - 1.6668057665e-1f;
  y = y * z + 2.0000714765e-1f;
  y = y * z - 2.4999993993e-1f;
  y = y * z + 3.3333331174e-1f;
  y = y * z * z2 - 0.5f * z2;
  float ln = z + y;
  float res = ef + ln * 1.44269504088896341f;
  // Special cases, blended in with integer masks (no branches, so the loop vectorises):
  // +-0 -> -inf, +inf -> +inf, negative (< 0) or NaN -> NaN.
  const int32_t mag = bits & 0x7fffffff;
  const int32_t zero = -static_cast<int32_t>(mag == 0);
  const int32_t pinf = -static_cast<int32_t>(bits == 0x7f800000);
  const int32_t bad = -static_cast<int32_t>(((bits < 0) & (mag != 0)) | (mag > 0x7f800000));
  int32_t rb = float_to_bits(res);
  rb = (rb & ~zero) | (static_cast<int32_t>(0xff800000u) & zero);
  rb = (rb & ~pinf) | (0x7f800000 & pinf);
  rb = (rb & ~bad) | (0x7fc00000 & bad);
  return bits_to_float(rb);
}

template <typename T>
LD_INLINE T vexp(T x) {
  return std::exp(x);
}
template <>
LD_INLINE float vexp<float>(float x) {
  return fast_exp(x);
}
template <typename T>
LD_INLINE T vlog2(T x) {
  return std::log2(x);
}
template <>
LD_INLINE float vlog2<float>(float x) {
  return fast_log2(x);
}

// Binary entropy (bits) of one assignment value and its derivative, docs/method.md section 4.
template <typename T>
LD_INLINE T binary_entropy(T a) {
  const T eps = static_cast<T>(kEntropyEps);
  return -a * vlog2<T>(a + eps) - (T(1) - a) * vlog2<T>(T(1) - a + eps);
}
template <typename T>
LD_INLINE T binary_entropy_grad(T a) {
  const T eps = static_cast<T>(kEntropyEps);
  const T inv_ln2 = static_cast<T>(1.4426950408889634);
  const T b = T(1) - a;
  return -vlog2<T>(a + eps) - a / (a + eps) * inv_ln2 + vlog2<T>(b + eps) + b / (b + eps) * inv_ln2;
}

// Dot product of two tile rows of length n (a multiple of the lane count), with a fixed lane
// structure and a fixed final summation order.
template <typename T>
LD_INLINE T dot_lanes(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int L = Lanes<T>::value;
  T acc[L];
  for (int j = 0; j < L; ++j) acc[j] = T(0);
  for (int64_t i = 0; i < n; i += L)
    for (int j = 0; j < L; ++j) acc[j] += a[i + j] * b[i + j];
  T s = T(0);
  for (int j = 0; j < L; ++j) s += acc[j];
  return s;
}

// Load embeddings of pixels [p0, p0+tn) into E (D rows of stride ts, zero padded to ts) and, when
// normalize, divide by (||z|| + eps). inv[t] = 1/(m+eps), m[t] = ||z_t|| are kept for backward.
template <typename T>
LD_INLINE void load_embeddings(const T* __restrict z, int64_t P, int64_t D, int64_t p0, int64_t tn, int64_t ts,
                               bool normalize, T* __restrict E, T* __restrict m, T* __restrict inv) {
  for (int64_t d = 0; d < D; ++d) {
    const T* src = z + d * P + p0;
    T* dst = E + d * ts;
    for (int64_t t = 0; t < tn; ++t) dst[t] = src[t];
    for (int64_t t = tn; t < ts; ++t) dst[t] = T(0);
  }
  if (!normalize) return;
  for (int64_t t = 0; t < ts; ++t) m[t] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* row = E + d * ts;
    for (int64_t t = 0; t < ts; ++t) m[t] += row[t] * row[t];
  }
  const T eps = static_cast<T>(kNormEps);
  const T big = std::numeric_limits<T>::max();
  int overflow = 0;
  for (int64_t t = 0; t < ts; ++t) {
    overflow |= static_cast<int>(m[t] > big);  // the sum of squares overflowed (|z| beyond about 1.8e19 in float)
    m[t] = std::sqrt(m[t]);
    inv[t] = T(1) / (m[t] + eps);
  }
  if (overflow) {
    // Rare: recompute those pixels' norms in double with the values divided by their largest
    // magnitude first (no overflow), so that large embeddings keep their direction.
    for (int64_t t = 0; t < tn; ++t) {
      if (!(m[t] > big)) continue;
      double amax = 0.0;
      for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::abs(static_cast<double>(E[d * ts + t])));
      if (!(amax <= std::numeric_limits<double>::max())) continue;  // an infinite value: norm inf
      double ss = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        const double v = static_cast<double>(E[d * ts + t]) / amax;
        ss += v * v;
      }
      const double md = amax * std::sqrt(ss);
      m[t] = static_cast<T>(md);
      inv[t] = static_cast<T>(1.0 / (md + kNormEps));
    }
  }
  for (int64_t d = 0; d < D; ++d) {
    T* row = E + d * ts;
    for (int64_t t = 0; t < ts; ++t) row[t] *= inv[t];
  }
}

// Backward of load_embeddings: writes dL/dz for pixels [p0, p0+tn) of one image (rows of stride P)
// from dL/de in gE (D x ts). With normalize, e = z/(m+eps) gives
// dL/dz = (g - e (e.g) (m+eps)/m) / (m+eps), the second term 0 where m = 0 (as torch's norm).
// dotv is scratch of ts entries.
template <typename T>
LD_INLINE void store_embedding_grad(const T* __restrict gE, const T* __restrict E, const T* __restrict m,
                                    const T* __restrict inv, int64_t P, int64_t D, int64_t p0, int64_t tn,
                                    int64_t ts, bool normalize, T* __restrict dotv, T* __restrict gz) {
  if (!normalize) {
    for (int64_t d = 0; d < D; ++d) {
      const T* ge = gE + d * ts;
      T* dst = gz + d * P + p0;
      for (int64_t t = 0; t < tn; ++t) dst[t] = ge[t];
    }
    return;
  }
  const T eps = static_cast<T>(kNormEps);
  for (int64_t t = 0; t < tn; ++t) dotv[t] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* ge = gE + d * ts;
    const T* e = E + d * ts;
    for (int64_t t = 0; t < tn; ++t) dotv[t] += ge[t] * e[t];
  }
  // (m + eps) / m written as 1 + eps / m: also right (1) for a norm that is infinite in T.
  for (int64_t t = 0; t < tn; ++t) dotv[t] = m[t] > T(0) ? dotv[t] * (T(1) + eps / m[t]) : T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* ge = gE + d * ts;
    const T* e = E + d * ts;
    T* dst = gz + d * P + p0;
    for (int64_t t = 0; t < tn; ++t) dst[t] = (ge[t] - dotv[t] * e[t]) * inv[t];
  }
}

// ---- register-blocked tile products ------------------------------------------------------------
// Written with GCC vector extensions (64-byte vectors: one AVX-512 register, two AVX2 registers, or
// four SSE registers in the baseline clone), so that the blocking is explicit and the
// accumulators stay in registers.

template <typename T>
struct VecT;
template <>
struct VecT<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct VecT<double> {
  typedef double type __attribute__((vector_size(64)));
};

template <typename T>
LD_INLINE typename VecT<T>::type vload(const T* p) {
  typename VecT<T>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
LD_INLINE void vstore(T* p, typename VecT<T>::type v) {
  std::memcpy(p, &v, sizeof v);
}
// Lane sum in lane order: the same order as dot_lanes, so blocked and unblocked paths agree bitwise.
template <typename T>
LD_INLINE T hsum(typename VecT<T>::type v) {
  T s = T(0);
  for (int j = 0; j < Lanes<T>::value; ++j) s += v[j];
  return s;
}

// out[r*C + c] += sum_{t < tl} X[r*ts + t] * Y[c*ts + t]   (X: R rows, Y: C rows of a tile;
// tl a multiple of the lane count). Blocks of 4x4 rows keep 16 vector accumulators in registers.
template <typename T>
LD_INLINE void tile_dot_block(const T* __restrict X, int64_t R, const T* __restrict Y, int64_t C, int64_t ts,
                              int64_t tl, double* __restrict out) {
  using V = typename VecT<T>::type;
  constexpr int L = Lanes<T>::value;
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {
    int64_t c = 0;
    for (; c + 4 <= C; c += 4) {
      V acc[4][4];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = V{};
      for (int64_t t = 0; t < tl; t += L) {
        V x[4], y[4];
        for (int i = 0; i < 4; ++i) x[i] = vload<T>(X + (r + i) * ts + t);
        for (int j = 0; j < 4; ++j) y[j] = vload<T>(Y + (c + j) * ts + t);
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] += x[i] * y[j];
      }
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) out[(r + i) * C + c + j] += static_cast<double>(hsum<T>(acc[i][j]));
    }
    for (; c < C; ++c)
      for (int i = 0; i < 4; ++i)
        out[(r + i) * C + c] += static_cast<double>(dot_lanes<T>(X + (r + i) * ts, Y + c * ts, tl));
  }
  for (; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) out[r * C + c] += static_cast<double>(dot_lanes<T>(X + r * ts, Y + c * ts, tl));
}

// out[o*ts + t] = sum_{i < I} W[i*si + o*so] * X[i*ts + t]   for o < O, t < tl (overwrites).
// Blocks of 4 outputs x 2 vectors of pixels: 8 independent accumulators.
template <typename T>
LD_INLINE void tile_combine(const T* __restrict W, int64_t si, int64_t so, const T* __restrict X, int64_t I,
                            int64_t O, int64_t ts, int64_t tl, T* __restrict out) {
  using V = typename VecT<T>::type;
  constexpr int L = Lanes<T>::value;
  int64_t o = 0;
  for (; o + 4 <= O; o += 4) {
    int64_t t = 0;
    for (; t + 2 * L <= tl; t += 2 * L) {
      V a0[4], a1[4];
      for (int j = 0; j < 4; ++j) a0[j] = a1[j] = V{};
      for (int64_t i = 0; i < I; ++i) {
        const V x0 = vload<T>(X + i * ts + t), x1 = vload<T>(X + i * ts + t + L);
        for (int j = 0; j < 4; ++j) {
          const T w = W[i * si + (o + j) * so];
          a0[j] += w * x0;
          a1[j] += w * x1;
        }
      }
      for (int j = 0; j < 4; ++j) {
        vstore<T>(out + (o + j) * ts + t, a0[j]);
        vstore<T>(out + (o + j) * ts + t + L, a1[j]);
      }
    }
    for (; t < tl; t += L) {
      V a0[4];
      for (int j = 0; j < 4; ++j) a0[j] = V{};
      for (int64_t i = 0; i < I; ++i) {
        const V x0 = vload<T>(X + i * ts + t);
        for (int j = 0; j < 4; ++j) a0[j] += W[i * si + (o + j) * so] * x0;
      }
      for (int j = 0; j < 4; ++j) vstore<T>(out + (o + j) * ts + t, a0[j]);
    }
  }
  for (; o < O; ++o) {
    for (int64_t t = 0; t < tl; t += L) {
      V a0 = V{};
      for (int64_t i = 0; i < I; ++i) a0 += W[i * si + o * so] * vload<T>(X + i * ts + t);
      vstore<T>(out + o * ts + t, a0);
    }
  }
}

// Sum of the binary entropies of n values (n a multiple of the lane count), lane-structured like
// dot_lanes so that the reduction vectorises with a fixed order.
template <typename T>
LD_INLINE T entropy_sum_lanes(const T* __restrict a, int64_t n) {
  constexpr int L = Lanes<T>::value;
  T acc[L];
  for (int j = 0; j < L; ++j) acc[j] = T(0);
  for (int64_t i = 0; i < n; i += L)
    for (int j = 0; j < L; ++j) acc[j] += binary_entropy<T>(a[i + j]);
  T s = T(0);
  for (int j = 0; j < L; ++j) s += acc[j];
  return s;
}

LD_INLINE int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Inputs of dtype float16/bfloat16 are computed in float32 on the CPU.
inline at::Tensor as_compute(const at::Tensor& t) {
  auto c = t.contiguous();
  if (c.scalar_type() == at::kHalf || c.scalar_type() == at::kBFloat16) return c.to(at::kFloat);
  return c;
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// Euclidean norm of n doubles: the plain sum of squares, recomputed with the values divided by
// their largest magnitude first where that overflows (values beyond about 1e154).
inline double safe_norm(const double* v, int64_t n, int64_t stride = 1) {
  double ss = 0.0;
  for (int64_t i = 0; i < n; ++i) ss += v[i * stride] * v[i * stride];
  if (!(ss > std::numeric_limits<double>::max())) return std::sqrt(ss);
  double amax = 0.0;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::abs(v[i * stride]));
  if (!(amax <= std::numeric_limits<double>::max())) return amax;
  ss = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = v[i * stride] / amax;
    ss += x * x;
  }
  return amax * std::sqrt(ss);
}

// A 0-dim result of dtype `dtype` from a value computed in double: rounded like any conversion
// (a value beyond the dtype's range becomes +-inf, as PyTorch's own reductions give), where
// at::full would refuse it.
inline at::Tensor scalar_result(double v, const at::TensorOptions& opts, at::ScalarType dtype) {
  return at::scalar_tensor(v, opts.dtype(at::kDouble)).to(dtype);
}

inline int64_t pixels_of(const at::Tensor& t) {
  int64_t p = 1;
  for (int64_t i = 2; i < t.dim(); ++i) p *= t.size(i);
  return p;
}

}  // namespace cpu
}  // namespace ld_ext
